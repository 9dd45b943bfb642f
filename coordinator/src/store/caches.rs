//! Job caches: (scope, key) -> blob digest. Keys are immutable once written, like GitHub's caches.
//!
//! Cache writes are rare (one per successful job with a cache miss) and independent of the run state,
//! so they commit on their own rather than through the group committer.

use rusqlite::{params, OptionalExtension, Row};

use super::{Store, StoreError};

/// One stored cache entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheRow {
    /// Who shares the key (by default the run's name).
    pub scope: String,
    /// The key.
    pub key: String,
    /// sha256 of the archive in the blob store.
    pub digest: String,
    /// Archive size in bytes.
    pub size: u64,
    /// Unix ms when saved.
    pub created_ms: i64,
    /// Unix ms of the last restore (or the save).
    pub last_used_ms: i64,
    /// Run that saved it.
    pub run_id: String,
    /// Job that saved it.
    pub job: String,
}

const COLUMNS: &str = "scope, key, digest, size, created_ms, last_used_ms, run_id, job";

fn row(r: &Row<'_>) -> rusqlite::Result<CacheRow> {
    Ok(CacheRow {
        scope: r.get(0)?,
        key: r.get(1)?,
        digest: r.get(2)?,
        size: r.get::<_, i64>(3)?.max(0) as u64,
        created_ms: r.get(4)?,
        last_used_ms: r.get(5)?,
        run_id: r.get(6)?,
        job: r.get(7)?,
    })
}

impl Store {
    /// The entry to restore in `scope`: the exact `key`, else the newest entry whose key starts with
    /// the first of `prefixes` that has one. The bool is true for an exact hit. A hit's last use is
    /// set to `now_ms`.
    pub async fn resolve_cache(
        &self,
        scope: &str,
        key: &str,
        prefixes: Vec<String>,
        now_ms: i64,
    ) -> Result<Option<(CacheRow, bool)>, StoreError> {
        let (scope, key) = (scope.to_string(), key.to_string());
        self.call(move |c| {
            let exact = c
                .query_row(
                    &format!("SELECT {COLUMNS} FROM caches WHERE scope = ?1 AND key = ?2"),
                    params![scope, key],
                    row,
                )
                .optional()?;
            let mut found = exact.map(|r| (r, true));
            if found.is_none() {
                // `substr` rather than LIKE: keys may hold `%` and `_`.
                let mut st = c.prepare(&format!(
                    "SELECT {COLUMNS} FROM caches WHERE scope = ?1 AND substr(key, 1, length(?2)) = ?2
                     ORDER BY created_ms DESC, key DESC LIMIT 1"
                ))?;
                for prefix in &prefixes {
                    if let Some(r) = st.query_row(params![scope, prefix], row).optional()? {
                        found = Some((r, false));
                        break;
                    }
                }
            }
            if let Some((r, _)) = &mut found {
                c.execute(
                    "UPDATE caches SET last_used_ms = ?3 WHERE scope = ?1 AND key = ?2",
                    params![r.scope, r.key, now_ms],
                )?;
                r.last_used_ms = now_ms;
            }
            Ok(found)
        })
        .await
    }

    /// Stores `entry` unless its key is already stored. Returns the entry now under the key and
    /// whether it is `entry`.
    pub async fn save_cache(&self, entry: CacheRow) -> Result<(CacheRow, bool), StoreError> {
        self.call(move |c| {
            let tx = c.transaction()?;
            let inserted = tx.execute(
                &format!(
                    "INSERT INTO caches ({COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)
                     ON CONFLICT(scope, key) DO NOTHING"
                ),
                params![
                    entry.scope,
                    entry.key,
                    entry.digest,
                    i64::try_from(entry.size).unwrap_or(i64::MAX),
                    entry.created_ms,
                    entry.last_used_ms,
                    entry.run_id,
                    entry.job
                ],
            )? > 0;
            let now = tx.query_row(
                &format!("SELECT {COLUMNS} FROM caches WHERE scope = ?1 AND key = ?2"),
                params![entry.scope, entry.key],
                row,
            )?;
            tx.commit()?;
            Ok((now, inserted))
        })
        .await
    }

    /// Whether some entry of `scope` has the archive `digest`.
    pub async fn cache_has_digest(&self, scope: &str, digest: &str) -> Result<bool, StoreError> {
        let (scope, digest) = (scope.to_string(), digest.to_string());
        self.call(move |c| {
            Ok(c.query_row(
                "SELECT 1 FROM caches WHERE scope = ?1 AND digest = ?2 LIMIT 1",
                params![scope, digest],
                |_| Ok(()),
            )
            .optional()?
            .is_some())
        })
        .await
    }

    /// Every entry (of `scope` when given), by scope, then newest first.
    pub async fn caches(&self, scope: Option<String>) -> Result<Vec<CacheRow>, StoreError> {
        self.call(move |c| {
            let mut st = c.prepare(&format!(
                "SELECT {COLUMNS} FROM caches WHERE ?1 IS NULL OR scope = ?1
                 ORDER BY scope, created_ms DESC, key"
            ))?;
            let rows = st.query_map(params![scope], row)?;
            Ok(rows.collect::<Result<Vec<_>, _>>()?)
        })
        .await
    }

    /// Deletes the entry `key` of `scope`; whether it existed. The archive blob stays (it may be
    /// shared by identical content elsewhere).
    pub async fn delete_cache(&self, scope: &str, key: &str) -> Result<bool, StoreError> {
        let (scope, key) = (scope.to_string(), key.to_string());
        self.call(move |c| {
            Ok(c.execute(
                "DELETE FROM caches WHERE scope = ?1 AND key = ?2",
                params![scope, key],
            )? > 0)
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(key: &str, digest: &str, created_ms: i64) -> CacheRow {
        CacheRow {
            scope: "ci.yml".into(),
            key: key.into(),
            digest: digest.into(),
            size: 10,
            created_ms,
            last_used_ms: created_ms,
            run_id: "r".into(),
            job: "build".into(),
        }
    }

    #[tokio::test]
    async fn keys_are_immutable_and_prefixes_take_the_newest() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("db.sqlite")).unwrap();
        assert!(store.save_cache(entry("cargo-a", "d1", 1)).await.unwrap().1);
        assert!(store.save_cache(entry("cargo-b", "d2", 2)).await.unwrap().1);
        // The same key again: refused, the first entry stays.
        let (now, stored) = store.save_cache(entry("cargo-a", "d3", 3)).await.unwrap();
        assert!(!stored);
        assert_eq!(now.digest, "d1");

        let (hit, exact) = store
            .resolve_cache("ci.yml", "cargo-a", vec![], 10)
            .await
            .unwrap()
            .unwrap();
        assert!(exact);
        assert_eq!((hit.digest.as_str(), hit.last_used_ms), ("d1", 10));
        let (hit, exact) = store
            .resolve_cache(
                "ci.yml",
                "cargo-z",
                vec!["npm-".into(), "cargo-".into()],
                11,
            )
            .await
            .unwrap()
            .unwrap();
        assert!(!exact);
        assert_eq!(hit.key, "cargo-b");
        // Another scope sees nothing; `_` and `%` are no wildcards.
        assert!(store
            .resolve_cache("other.yml", "cargo-a", vec!["cargo-".into()], 12)
            .await
            .unwrap()
            .is_none());
        assert!(store
            .resolve_cache("ci.yml", "x", vec!["cargo_".into(), "%".into()], 12)
            .await
            .unwrap()
            .is_none());

        assert!(store.cache_has_digest("ci.yml", "d2").await.unwrap());
        assert!(!store.cache_has_digest("other.yml", "d2").await.unwrap());
        assert_eq!(store.caches(None).await.unwrap().len(), 2);
        assert!(store.delete_cache("ci.yml", "cargo-b").await.unwrap());
        assert!(!store.delete_cache("ci.yml", "cargo-b").await.unwrap());
        assert!(!store.cache_has_digest("ci.yml", "d2").await.unwrap());
    }
}
