//! API tokens (hashed, with a role), kept apart from runs and agents so access data never mixes with
//! scheduling data.

use rusqlite::params;

use super::{Store, StoreError};

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
}
