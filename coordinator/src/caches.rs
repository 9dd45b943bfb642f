//! Job caches (`cache:` in a pipeline): resolving the entry an attempt restores, storing the archive
//! it saves, and the operator's list and delete.
//!
//! An archive is a blob of the content-addressed store (identical content is stored once); the
//! `caches` table maps (scope, key) to its digest. An agent reaches only the scope of a job it is
//! running, and only through the attempt's current epoch when it writes.

use drover_proto::cache_key::check_key;
use drover_proto::v1 as pb;
use drover_proto::v1::cache_chunk::Part;
use futures::{Stream, StreamExt};
use tonic::Status;

use crate::engine::{now_ms, Engine};
use crate::error::{CoordError, CoordResult};
use crate::store::CacheRow;

/// Largest cache archive accepted: 16 GiB, as for an artifact file.
pub const MAX_CACHE_BYTES: u64 = 16 << 30;
/// Most restore keys a lookup may carry (the pipeline parser allows as many).
pub const MAX_RESTORE_KEYS: usize = 16;

fn invalid_key(what: &str, key: &str, problem: String) -> CoordError {
    CoordError::InvalidArgument(format!("{what} {key:?}: {problem}"))
}

/// The entry `r.attempt_id` restores: its exact key, else the newest entry of the first restore-key
/// prefix that has one.
pub async fn resolve(
    engine: &Engine,
    agent_id: &str,
    r: pb::ResolveCacheRequest,
) -> CoordResult<pb::ResolveCacheResponse> {
    check_key(&r.key).map_err(|p| invalid_key("cache key", &r.key, p))?;
    if r.restore_keys.len() > MAX_RESTORE_KEYS {
        return Err(CoordError::InvalidArgument(format!(
            "{} restore keys; at most {MAX_RESTORE_KEYS} are allowed",
            r.restore_keys.len()
        )));
    }
    for k in &r.restore_keys {
        check_key(k).map_err(|p| invalid_key("restore key", k, p))?;
    }
    let owner = engine.cache_owner(agent_id, &r.attempt_id, Some(r.epoch))?;
    let found = engine
        .store()
        .resolve_cache(&owner.scope, &r.key, r.restore_keys, now_ms())
        .await?;
    let Some((row, exact)) = found else {
        return Ok(pb::ResolveCacheResponse::default());
    };
    if !engine.blobs().exists(&row.digest).await? {
        // The blob store lost it (deleted by hand): a miss, and the save after success replaces it.
        tracing::warn!(scope = %row.scope, key = %row.key, digest = %row.digest, "cache entry without its blob; removing it");
        engine.store().delete_cache(&row.scope, &row.key).await?;
        return Ok(pb::ResolveCacheResponse::default());
    }
    Ok(pb::ResolveCacheResponse {
        found: true,
        exact,
        key: row.key,
        digest: row.digest,
        size: row.size,
    })
}

/// Stores the archive of an upload (header first, then data) under its key, unless the key is
/// stored already (keys are immutable: the first save wins).
pub async fn save<S>(engine: &Engine, agent_id: &str, mut inbound: S) -> CoordResult<pb::CacheSaved>
where
    S: Stream<Item = Result<pb::CacheChunk, Status>> + Unpin,
{
    let header = match inbound.next().await {
        Some(Ok(pb::CacheChunk {
            part: Some(Part::Header(h)),
        })) => h,
        Some(Err(status)) => return Err(CoordError::InvalidArgument(status.message().to_string())),
        _ => {
            return Err(CoordError::InvalidArgument(
                "first message of a cache upload must be its header".into(),
            ))
        }
    };
    check_key(&header.key).map_err(|p| invalid_key("cache key", &header.key, p))?;
    crate::artifacts::validate_digest(&header.digest)?;
    if header.size > MAX_CACHE_BYTES {
        return Err(CoordError::ResourceExhausted(format!(
            "cache {:?} has {} bytes; the limit is {MAX_CACHE_BYTES}",
            header.key, header.size
        )));
    }
    let owner = engine.cache_owner(agent_id, &header.attempt_id, Some(header.epoch))?;
    let mut w = engine.blobs().writer().await?;
    while let Some(chunk) = inbound.next().await {
        let chunk = chunk.map_err(|s| {
            CoordError::InvalidArgument(format!("cache upload broke off: {}", s.message()))
        })?;
        match chunk.part {
            Some(Part::Data(d)) => {
                if w.size().saturating_add(d.len() as u64) > header.size {
                    return Err(CoordError::InvalidArgument(format!(
                        "cache {:?}: more data than the {} bytes its header announced",
                        header.key, header.size
                    )));
                }
                w.write(&d).await?;
            }
            Some(Part::Header(_)) => {
                return Err(CoordError::InvalidArgument(
                    "a cache upload has exactly one header".into(),
                ))
            }
            None => {}
        }
    }
    if w.size() != header.size {
        return Err(CoordError::InvalidArgument(format!(
            "cache {:?}: header says {} bytes, received {}",
            header.key,
            header.size,
            w.size()
        )));
    }
    let (digest, size) = w.finish(Some(&header.digest)).await?;
    // The attempt must still hold its job when the entry is recorded, not only when it began.
    engine.cache_owner(agent_id, &header.attempt_id, Some(header.epoch))?;
    let now = now_ms();
    let (row, stored) = engine
        .store()
        .save_cache(CacheRow {
            scope: owner.scope,
            key: header.key,
            digest,
            size,
            created_ms: now,
            last_used_ms: now,
            run_id: owner.run_id,
            job: owner.job,
        })
        .await?;
    tracing::info!(scope = %row.scope, key = %row.key, digest = %row.digest, size = row.size, stored, "cache saved");
    Ok(pb::CacheSaved {
        stored,
        digest: row.digest,
        size: row.size,
    })
}

/// May `agent_id` download `digest` for `attempt_id` as a cache archive? Only an entry of the scope
/// of a job it is running.
pub async fn may_download(
    engine: &Engine,
    agent_id: &str,
    attempt_id: &str,
    digest: &str,
) -> CoordResult<bool> {
    let Ok(owner) = engine.cache_owner(agent_id, attempt_id, None) else {
        return Ok(false);
    };
    Ok(engine
        .store()
        .cache_has_digest(&owner.scope, digest)
        .await?)
}

/// The stored entries (of `scope` when not empty), by scope, newest first.
pub async fn list(engine: &Engine, scope: &str) -> CoordResult<Vec<pb::CacheEntry>> {
    let scope = (!scope.is_empty()).then(|| scope.to_string());
    let rows = engine.store().caches(scope).await?;
    Ok(rows
        .into_iter()
        .map(|r| pb::CacheEntry {
            scope: r.scope,
            key: r.key,
            digest: r.digest,
            size: r.size,
            created_ms: r.created_ms,
            last_used_ms: r.last_used_ms,
            run_id: r.run_id,
            job: r.job,
        })
        .collect())
}

/// Deletes the entry `key` of `scope`; whether it existed. Its archive stays in the blob store
/// (identical content may be referred to elsewhere).
pub async fn delete(engine: &Engine, scope: &str, key: &str) -> CoordResult<bool> {
    if scope.is_empty() || key.is_empty() {
        return Err(CoordError::InvalidArgument(
            "deleting a cache needs its scope and key; `drover caches list` shows them".into(),
        ));
    }
    let deleted = engine.store().delete_cache(scope, key).await?;
    if deleted {
        tracing::info!(scope, key, "cache deleted");
    }
    Ok(deleted)
}
