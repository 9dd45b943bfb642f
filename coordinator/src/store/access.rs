//! API tokens (hashed, with a role), kept apart from runs and agents so access data never mixes with
//! scheduling data.

use std::collections::BTreeMap;

use rusqlite::params;

use super::{parse_labels, Store, StoreError};

/// A stored enrollment token as listed (its hash, never the token).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnrollmentTokenInfo {
    /// sha256 of the token, hex.
    pub hash: String,
    /// Enrollments left.
    pub uses_left: u32,
    /// Unix milliseconds when it expires.
    pub expires_ms: i64,
    /// Labels an enrolling agent must have.
    pub labels: BTreeMap<String, String>,
}

/// A stored API token: only its sha256 is kept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiTokenRec {
    /// sha256 of the token, hex.
    pub hash: String,
    /// `read`, `submit` or `admin`.
    pub role: String,
    /// What it is for, for operators.
    pub name: String,
    /// Unix milliseconds at creation.
    pub created_ms: i64,
}

impl Store {
    /// Stores a new API token.
    pub async fn create_api_token(&self, t: ApiTokenRec) -> Result<(), StoreError> {
        self.call(move |c| {
            c.execute(
                "INSERT INTO api_tokens (hash, role, name, created_ms) VALUES (?1, ?2, ?3, ?4)",
                params![t.hash, t.role, t.name, t.created_ms],
            )?;
            Ok(())
        })
        .await
    }

    /// Every API token.
    pub async fn api_tokens(&self) -> Result<Vec<ApiTokenRec>, StoreError> {
        self.call(|c| {
            let mut st = c.prepare("SELECT hash, role, name, created_ms FROM api_tokens")?;
            let rows = st.query_map([], |r| {
                Ok(ApiTokenRec {
                    hash: r.get(0)?,
                    role: r.get(1)?,
                    name: r.get(2)?,
                    created_ms: r.get(3)?,
                })
            })?;
            Ok(rows.collect::<Result<Vec<_>, _>>()?)
        })
        .await
    }

    /// Deletes the API token hashed `hash`; false when there was none.
    pub async fn delete_api_token(&self, hash: String) -> Result<bool, StoreError> {
        self.call(move |c| {
            Ok(c.execute("DELETE FROM api_tokens WHERE hash = ?1", params![hash])? > 0)
        })
        .await
    }

    /// Every enrollment token, soonest to expire first.
    pub async fn enrollment_tokens(&self) -> Result<Vec<EnrollmentTokenInfo>, StoreError> {
        self.call(|c| {
            let mut st = c.prepare(
                "SELECT hash, uses_left, expires_ms, labels FROM tokens ORDER BY expires_ms, hash",
            )?;
            let rows = st.query_map([], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, i64>(1)?,
                    r.get::<_, i64>(2)?,
                    r.get::<_, String>(3)?,
                ))
            })?;
            let mut out = Vec::new();
            for row in rows {
                let (hash, uses, expires_ms, labels) = row?;
                out.push(EnrollmentTokenInfo {
                    hash,
                    uses_left: u32::try_from(uses.max(0)).unwrap_or(u32::MAX),
                    expires_ms,
                    labels: parse_labels(&labels)?,
                });
            }
            Ok(out)
        })
        .await
    }

    /// Deletes the enrollment token hashed `hash`; false when there was none.
    pub async fn delete_enrollment_token(&self, hash: String) -> Result<bool, StoreError> {
        self.call(move |c| Ok(c.execute("DELETE FROM tokens WHERE hash = ?1", params![hash])? > 0))
            .await
    }
}
