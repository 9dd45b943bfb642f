//! `drover.v1.AgentService`: enrollment, the Attach session, log shipping, artifact upload, blob download.

use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use drover_proto::v1 as pb;
use drover_proto::v1::agent_message::Msg;
use drover_proto::v1::agent_service_server::AgentService;
use drover_proto::v1::artifact_chunk::Part;
use futures::{FutureExt, Stream, StreamExt};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use super::auth::agent_of;
use crate::artifacts::UploadTicket;
use crate::engine::model::ArtifactRec;
use crate::engine::{Engine, AGENT_CHANNEL};
use crate::error::CoordError;
use crate::mtls::AgentCa;

/// How long a new Attach stream may take to send its hello.
pub const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

/// State changes of one agent session queued for commit and not yet known durable, at most.
const MAX_INFLIGHT_COMMITS: usize = 64;

/// Log chunks handled before the durable acknowledgement of a batch.
const LOG_BATCH: usize = 64;

/// The AgentService implementation.
#[derive(Debug, Clone)]
pub struct AgentApi {
    engine: Engine,
    /// The agent CA when mutual TLS is on: it signs certificates and every call but Enroll needs one.
    mtls: Option<Arc<AgentCa>>,
}

impl AgentApi {
    /// Serve agents from `engine`.
    pub fn new(engine: Engine) -> Self {
        AgentApi { engine, mtls: None }
    }

    /// Require the client certificates `ca` issues (mutual TLS), and issue them at enrollment.
    pub fn with_mtls(mut self, ca: Option<Arc<AgentCa>>) -> Self {
        self.mtls = ca;
        self
    }

    fn agent_of<T>(&self, req: &Request<T>) -> Result<String, CoordError> {
        agent_of(&self.engine, self.mtls.as_deref(), req)
    }
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

/// Largest artifact an agent may upload (one file): 16 GiB.
pub const MAX_ARTIFACT_BYTES: u64 = 16 << 30;

/// How long a resumed upload (or a progress query) waits for the connection that streamed into it
/// before to let go of it: the server notices a broken connection quickly, but not instantly.
const UPLOAD_CLAIM_WAIT: Duration = Duration::from_secs(10);

/// A workspace-relative artifact path: not empty, not absolute, no `..`, no NUL.
fn check_artifact_path(path: &str) -> Result<(), CoordError> {
    let bad = path.is_empty()
        || path.starts_with('/')
        || path.contains('\0')
        || path.split('/').any(|c| c == "..");
    if bad {
        return Err(CoordError::InvalidArgument(format!(
            "artifact path {path:?}: expected a non-empty path relative to the workspace without `..`"
        )));
    }
    Ok(())
}

#[tonic::async_trait]
impl AgentService for AgentApi {
    async fn enroll(
        &self,
        req: Request<pb::EnrollRequest>,
    ) -> Result<Response<pb::EnrollResponse>, Status> {
        let r = req.into_inner();
        // Checked before the token is spent: a bad request leaves the token's uses untouched.
        let csr = match &self.mtls {
            Some(_) => Some(AgentCa::parse_csr(&r.csr_pem)?),
            None => None,
        };
        let labels: BTreeMap<String, String> = r.labels.into_iter().collect();
        let (agent_id, credential) = self.engine.enroll(&r.token, labels, &r.hostname).await?;
        let client_cert_pem = match (&self.mtls, csr) {
            (Some(ca), Some(csr)) => ca.issue(&csr, &agent_id)?,
            _ => String::new(),
        };
        Ok(Response::new(pb::EnrollResponse {
            agent_id,
            credential,
            client_cert_pem,
        }))
    }

    async fn renew_certificate(
        &self,
        req: Request<pb::RenewCertificateRequest>,
    ) -> Result<Response<pb::RenewCertificateResponse>, Status> {
        let Some(ca) = &self.mtls else {
            return Err(CoordError::FailedPrecondition(
                "this coordinator does not run mutual TLS: there is no client certificate to renew"
                    .into(),
            )
            .into());
        };
        let agent_id = self.agent_of(&req)?;
        let csr = AgentCa::parse_csr(&req.get_ref().csr_pem)?;
        let client_cert_pem = ca.issue(&csr, &agent_id)?;
        tracing::info!(agent = %agent_id, "renewed the agent's client certificate");
        Ok(Response::new(pb::RenewCertificateResponse {
            client_cert_pem,
        }))
    }

    async fn attach(
        &self,
        req: Request<Streaming<pb::AgentMessage>>,
    ) -> Result<Response<BoxStream<pb::CoordinatorMessage>>, Status> {
        let agent_id = self.agent_of(&req)?;
        let inbound = req.into_inner();
        let (tx, rx) = mpsc::channel(AGENT_CHANNEL);
        let engine = self.engine.clone();
        // The session outlives this call: it reads the agent's messages until the stream ends.
        tokio::spawn(agent_session(engine, agent_id, inbound, tx));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn push_logs(
        &self,
        req: Request<Streaming<pb::LogChunk>>,
    ) -> Result<Response<BoxStream<pb::LogAck>>, Status> {
        let agent_id = self.agent_of(&req)?;
        let inbound = req.into_inner();
        let (tx, rx) = mpsc::channel(16);
        tokio::spawn(ship_logs(self.engine.clone(), agent_id, inbound, tx));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn upload_artifact(
        &self,
        req: Request<Streaming<pb::ArtifactChunk>>,
    ) -> Result<Response<pb::ArtifactUploaded>, Status> {
        let agent_id = self.agent_of(&req)?;
        let mut inbound = req.into_inner();
        let header = match inbound.message().await? {
            Some(pb::ArtifactChunk {
                part: Some(Part::Header(h)),
            }) => h,
            _ => {
                return Err(CoordError::InvalidArgument(
                    "first message of an upload must be its header".into(),
                )
                .into())
            }
        };
        check_artifact_path(&header.path)?;
        // Empty: the agent streams the file while it reads it for the first time, so it learns the
        // digest only with the last byte; the digest of what arrived is stored and returned, and the
        // agent checks it against its own.
        if !header.digest.is_empty() {
            crate::artifacts::validate_digest(&header.digest).map_err(CoordError::from)?;
        }
        if header.size > MAX_ARTIFACT_BYTES {
            return Err(CoordError::ResourceExhausted(format!(
                "artifact {:?} has {} bytes; the limit is {MAX_ARTIFACT_BYTES}",
                header.path, header.size
            ))
            .into());
        }
        self.engine
            .check_attempt(&agent_id, &header.attempt_id, header.epoch)?;
        let resumable = !header.upload_id.is_empty();
        let upload_id = if resumable {
            header.upload_id.clone()
        } else {
            format!("once-{}", uuid::Uuid::new_v4().simple())
        };
        let ticket = UploadTicket {
            upload_id,
            owner: agent_id.clone(),
            digest: header.digest.clone(),
            size: header.size,
        };
        let mut w = self
            .engine
            .blobs()
            .claim_upload(ticket, UPLOAD_CLAIM_WAIT)
            .await
            .map_err(CoordError::from)?;
        if !resumable {
            w.discard_on_drop();
        }
        if header.offset != w.held() {
            return Err(CoordError::FailedPrecondition(format!(
                "artifact {:?}: upload {:?} holds {} bytes; a resumed upload must start there, not at {}",
                header.path,
                header.upload_id,
                w.held(),
                header.offset
            ))
            .into());
        }
        // A broken connection ends the loop with an error: `w` is dropped and, being resumable, parked
        // with what it holds. Bad data discards it.
        while let Some(chunk) = inbound.message().await? {
            match chunk.part {
                Some(Part::Data(d)) => {
                    // Stop at the first byte past the header's size: an agent cannot stream without end.
                    if w.held().saturating_add(d.len() as u64) > header.size {
                        w.discard_on_drop();
                        return Err(CoordError::InvalidArgument(format!(
                            "artifact {:?}: more data than the {} bytes its header announced",
                            header.path, header.size
                        ))
                        .into());
                    }
                    self.engine.metrics().artifact_bytes(d.len() as u64);
                    w.write(&d).await.map_err(CoordError::from)?
                }
                Some(Part::Header(_)) => {
                    w.discard_on_drop();
                    return Err(CoordError::InvalidArgument(
                        "an upload has exactly one header".into(),
                    )
                    .into());
                }
                None => {}
            }
        }
        if w.held() != header.size {
            // The stream ended cleanly but short: the agent stopped sending (it may resume).
            return Err(CoordError::InvalidArgument(format!(
                "artifact {:?}: header says {} bytes, received {}",
                header.path,
                header.size,
                w.held()
            ))
            .into());
        }
        let (digest, size) = w
            .finish((!header.digest.is_empty()).then_some(header.digest.as_str()))
            .await
            .map_err(CoordError::from)?;
        let art = ArtifactRec {
            path: header.path,
            digest: digest.clone(),
            size,
            mode: header.mode,
            attempt_id: header.attempt_id,
        };
        self.engine
            .record_artifact(&agent_id, header.epoch, art)
            .await?;
        Ok(Response::new(pb::ArtifactUploaded { digest, size }))
    }

    async fn download_blob(
        &self,
        req: Request<pb::BlobRequest>,
    ) -> Result<Response<BoxStream<pb::BlobChunk>>, Status> {
        let agent_id = self.agent_of(&req)?;
        let r = req.into_inner();
        if let Err(denied) = self
            .engine
            .check_blob_access(&agent_id, &r.attempt_id, &r.digest)
        {
            // Not a context or input: it may be a cache archive of the attempt's scope.
            if !crate::caches::may_download(&self.engine, &agent_id, &r.attempt_id, &r.digest)
                .await?
            {
                return Err(denied.into());
            }
        }
        let s = self
            .engine
            .blobs()
            .read_from(&r.digest, r.offset)
            .await
            .map_err(CoordError::from)?;
        let s = s.map(|r| {
            r.map(|b| pb::BlobChunk { data: b.to_vec() })
                .map_err(|e| Status::from(CoordError::from(e)))
        });
        Ok(Response::new(Box::pin(s)))
    }

    async fn resolve_cache(
        &self,
        req: Request<pb::ResolveCacheRequest>,
    ) -> Result<Response<pb::ResolveCacheResponse>, Status> {
        let agent_id = self.agent_of(&req)?;
        let found = crate::caches::resolve(&self.engine, &agent_id, req.into_inner()).await?;
        Ok(Response::new(found))
    }

    async fn save_cache(
        &self,
        req: Request<Streaming<pb::CacheChunk>>,
    ) -> Result<Response<pb::CacheSaved>, Status> {
        let agent_id = self.agent_of(&req)?;
        let saved = crate::caches::save(&self.engine, &agent_id, req.into_inner()).await?;
        Ok(Response::new(saved))
    }

    async fn query_upload(
        &self,
        req: Request<pb::UploadQuery>,
    ) -> Result<Response<pb::UploadProgress>, Status> {
        let agent_id = self.agent_of(&req)?;
        let held_bytes = self
            .engine
            .blobs()
            .upload_progress(&req.get_ref().upload_id, &agent_id, UPLOAD_CLAIM_WAIT)
            .await
            .map_err(CoordError::from)?;
        Ok(Response::new(pb::UploadProgress { held_bytes }))
    }
}

fn cancel(attempt_id: &str, reason: String) -> pb::CoordinatorMessage {
    pb::CoordinatorMessage {
        msg: Some(pb::coordinator_message::Msg::Cancel(pb::Cancel {
            attempt_id: attempt_id.to_string(),
            grace_ms: 0,
            reason,
        })),
    }
}

/// One Attach stream: hello within [`HELLO_TIMEOUT`], then the agent's messages until the stream ends.
async fn agent_session(
    engine: Engine,
    agent_id: String,
    mut inbound: Streaming<pb::AgentMessage>,
    tx: mpsc::Sender<Result<pb::CoordinatorMessage, Status>>,
) {
    let hello = match tokio::time::timeout(HELLO_TIMEOUT, inbound.message()).await {
        Ok(Ok(Some(pb::AgentMessage {
            msg: Some(Msg::Hello(h)),
        }))) => h,
        Ok(Ok(Some(_))) => {
            let _ = tx
                .send(Err(Status::failed_precondition(
                    "the first Attach message must be a hello",
                )))
                .await;
            return;
        }
        Ok(Ok(None)) => return,
        Ok(Err(e)) => {
            // An undecodable or oversized first message: say so instead of ending the stream silently.
            tracing::warn!(agent = %agent_id, "attach refused: {}", e.message());
            let _ = tx
                .send(Err(Status::new(
                    e.code(),
                    format!("attach refused: {}", e.message()),
                )))
                .await;
            return;
        }
        Err(_) => {
            let _ = tx
                .send(Err(Status::deadline_exceeded("no hello within 10 s")))
                .await;
            return;
        }
    };
    // The engine keeps the only strong sender: when it drops the session (lease expired, replaced by a newer
    // session, shutdown) the response stream ends and the agent reconnects.
    let weak = tx.downgrade();
    let follows_pacing = hello.follows_heartbeat_pacing;
    let crate::engine::Attached {
        session,
        seen,
        mut told,
    } = match engine.hello(&agent_id, hello, tx.clone()).await {
        Ok(s) => s,
        Err(e) => {
            let _ = tx.send(Err(e.into())).await;
            return;
        }
    };
    drop(tx);
    let mut inflight: std::collections::VecDeque<crate::engine::Commit> = Default::default();
    // The first heartbeat is acknowledged at once.
    let mut last_ack: Option<std::time::Instant> = None;
    let mut closing = engine.closing();
    // One shutdown future for the whole session rather than a new one per message: an idle fleet is ten
    // thousand sessions each reading a heartbeat every few seconds, and each new `changed()` future
    // registers with (and on drop, unregisters from) the same shared notifier.
    let shutdown = closing.changed();
    tokio::pin!(shutdown);
    loop {
        let msg = tokio::select! {
            m = inbound.message() => m,
            _ = &mut shutdown => break,
        };
        let msg = match msg {
            Ok(Some(m)) => m,
            Ok(None) => break,
            Err(e) => {
                tracing::info!(agent = %agent_id, "attach stream error: {e}");
                if let Some(tx) = weak.upgrade() {
                    let _ = tx.try_send(Err(Status::new(
                        e.code(),
                        format!("attach stream refused: {}", e.message()),
                    )));
                }
                break;
            }
        };
        seen.touch();
        let stale = match msg.msg {
            Some(Msg::Heartbeat(_)) => {
                // The agent's side of the lease: without these it cannot tell a silent partition
                // from a quiet coordinator. It needs one message per lease TTL it holds, so a
                // quarter of that apart is plenty (an idle fleet is mostly heartbeats: every ack is
                // a socket write), unless the pace changed: then the next heartbeat is answered
                // with the new one at once.
                let pace = engine.pace();
                let repace = follows_pacing && pace != told;
                let due = last_ack.is_none_or(|at| at.elapsed() >= told.lease_ttl / 4);
                if repace || due {
                    if let Some(tx) = weak.upgrade() {
                        let ack = pb::CoordinatorMessage {
                            msg: Some(pb::coordinator_message::Msg::HeartbeatAck(
                                pb::HeartbeatAck {
                                    unix_ms: crate::engine::now_ms(),
                                    heartbeat_interval_ms: pace.interval.as_millis() as u64,
                                    lease_ttl_ms: pace.lease_ttl.as_millis() as u64,
                                },
                            )),
                        };
                        // A full channel skips one ack; the next heartbeat retries.
                        if tx.try_send(Ok(ack)).is_ok() {
                            last_ack = Some(std::time::Instant::now());
                            if repace {
                                // The agent re-arms its heartbeat at the new interval as this
                                // arrives, and this heartbeat just renewed its lease: from here
                                // on it is held to the new TTL, shorter or longer.
                                told = pace;
                                seen.told_ttl(pace.lease_ttl);
                            }
                        }
                    }
                }
                None
            }
            Some(Msg::Draining(_)) => {
                engine.agent_draining(&agent_id);
                None
            }
            None => None,
            Some(Msg::Hello(_)) => {
                tracing::warn!(agent = %agent_id, "ignoring a second hello on the same stream");
                None
            }
            Some(Msg::Accepted(a)) => engine
                .accepted(&agent_id, &a)
                .err()
                .map(|e| (a.attempt_id, e)),
            Some(Msg::Step(u)) => {
                let id = u.attempt_id.clone();
                match engine.step_update_queued(&agent_id, u) {
                    Ok(c) => {
                        inflight.extend(c);
                        None
                    }
                    Err(e) => Some((id, e)),
                }
            }
            Some(Msg::Result(r)) => {
                let id = r.attempt_id.clone();
                match engine.job_result_queued(&agent_id, r).await {
                    Ok(c) => {
                        inflight.extend(c);
                        None
                    }
                    Err(e) => Some((id, e)),
                }
            }
        };
        // Nothing answers these changes, so the next message is read while they commit (in order: they
        // were queued in order); a bounded window keeps a fast agent from queueing without end.
        while inflight.len() > MAX_INFLIGHT_COMMITS {
            if let Some(c) = inflight.pop_front() {
                if let Err(e) = c.durable().await {
                    tracing::error!(agent = %agent_id, "state change not committed: {e}");
                }
            }
        }
        if let Some((attempt, e)) = stale {
            tracing::warn!(agent = %agent_id, attempt = %attempt, "rejected: {e}");
            // A fenced-off attempt must stop writing: tell the agent (it may already have finished).
            if matches!(e, CoordError::FailedPrecondition(ref m) if m.starts_with("stale attempt"))
            {
                if let Some(tx) = weak.upgrade() {
                    let _ = tx.try_send(Ok(cancel(&attempt, e.to_string())));
                }
            }
        }
    }
    engine.detach(&agent_id, session);
}

/// One PushLogs stream: append each chunk (fenced) as it comes; the logs touched are handed to a syncer
/// beside it, which makes them durable and acknowledges each one's durable offset. While the syncer waits
/// for the disk, the next chunks are appended (and gathered into its next round), so the disk's flush
/// time overlaps the network instead of stalling it; an ack still only names bytes that are on disk.
async fn ship_logs(
    engine: Engine,
    agent_id: String,
    mut inbound: Streaming<pb::LogChunk>,
    tx: mpsc::Sender<Result<pb::LogAck, Status>>,
) {
    let mut closing = engine.closing();
    // One round waiting at most: the rest gathers in `pending` meanwhile.
    let (sync_tx, sync_rx) = mpsc::channel::<Vec<Touched>>(1);
    let syncer = tokio::spawn(sync_and_ack(engine.clone(), sync_rx, tx.clone()));
    let mut pending: Vec<Touched> = Vec::new();
    loop {
        let first = tokio::select! {
            m = inbound.next() => m,
            permit = sync_tx.reserve(), if !pending.is_empty() => match permit {
                Ok(permit) => {
                    permit.send(std::mem::take(&mut pending));
                    continue;
                }
                // The syncer failed and said so on the stream.
                Err(_) => return,
            },
            _ = closing.changed() => return,
        };
        let first = match first {
            Some(Ok(c)) => c,
            Some(Err(e)) => {
                // Say why (an undecodable or oversized chunk) rather than end the stream as if all was well.
                finish_syncs(sync_tx, syncer, pending).await;
                let _ = tx.send(Err(bad_log_stream(&agent_id, e))).await;
                return;
            }
            None => {
                finish_syncs(sync_tx, syncer, pending).await;
                return;
            }
        };
        let mut batch = vec![first];
        let mut ended = false;
        let mut broken = None;
        while batch.len() < LOG_BATCH {
            match inbound.next().now_or_never() {
                Some(Some(Ok(c))) => batch.push(c),
                Some(Some(Err(e))) => {
                    ended = true;
                    broken = Some(e);
                    break;
                }
                Some(None) => {
                    ended = true;
                    break;
                }
                None => break,
            }
        }
        engine.touch(&agent_id);
        for run in merge_contiguous(batch) {
            let c = match append_run(&engine, &agent_id, run).await {
                Ok(c) => c,
                Err((c, e)) => {
                    tracing::warn!(agent = %agent_id, attempt = %c.attempt_id, "log chunk rejected: {e}");
                    let _ = tx.send(Err(e.into())).await;
                    return;
                }
            };
            touch(&mut pending, (c.attempt_id, c.step_index, c.eof));
        }
        if ended {
            finish_syncs(sync_tx, syncer, pending).await;
            if let Some(e) = broken {
                let _ = tx.send(Err(bad_log_stream(&agent_id, e))).await;
            }
            return;
        }
        // Hand the logs over now if the syncer is free; otherwise they join its next round.
        if !pending.is_empty() {
            if let Ok(permit) = sync_tx.try_reserve() {
                permit.send(std::mem::take(&mut pending));
            }
        }
    }
}

/// Chunks of one log that continue each other: written in one trip to the disk, their bytes kept in
/// the pieces they arrived in rather than copied together.
#[derive(Debug)]
struct ChunkRun {
    /// The first chunk, its data moved to `pieces`; its `eof` and `times` are the run's.
    head: pb::LogChunk,
    /// The data of every chunk of the run, in order.
    pieces: Vec<bytes::Bytes>,
    /// Bytes in `pieces`.
    len: u64,
}

/// Joins chunks that continue each other (same log and epoch, each starting where the previous one
/// ends) into one run, so a batch of a fast log costs one write trip rather than one per 128 KiB
/// chunk.
fn merge_contiguous(batch: Vec<pb::LogChunk>) -> Vec<ChunkRun> {
    let mut out: Vec<ChunkRun> = Vec::with_capacity(batch.len());
    for mut c in batch {
        let data = std::mem::take(&mut c.data);
        if let Some(last) = out.last_mut() {
            let head = &mut last.head;
            let continues = head.attempt_id == c.attempt_id
                && head.epoch == c.epoch
                && head.step_index == c.step_index
                && !head.eof
                && head.truncated == c.truncated
                && head.offset.checked_add(last.len) == Some(c.offset);
            if continues {
                last.len += data.len() as u64;
                last.pieces.push(data);
                head.times.extend(c.times);
                head.eof = c.eof;
                continue;
            }
        }
        out.push(ChunkRun {
            len: data.len() as u64,
            pieces: vec![data],
            head: c,
        });
    }
    out
}

/// Appends one run of chunks (its times first, so a follower asking for them never sees bytes whose
/// times are missing), fenced by the attempt's epoch. Returns the run's first chunk (without its data).
async fn append_run(
    engine: &Engine,
    agent_id: &str,
    run: ChunkRun,
) -> Result<pb::LogChunk, (pb::LogChunk, CoordError)> {
    let ChunkRun { head, pieces, len } = run;
    match append_pieces(engine, agent_id, &head, pieces).await {
        Ok(()) => {
            engine.metrics().log_bytes(len);
            Ok(head)
        }
        Err(e) => Err((head, e)),
    }
}

async fn append_pieces(
    engine: &Engine,
    agent_id: &str,
    c: &pb::LogChunk,
    pieces: Vec<bytes::Bytes>,
) -> Result<(), CoordError> {
    let steps = engine.check_attempt(agent_id, &c.attempt_id, c.epoch)?;
    if c.step_index >= steps {
        return Err(CoordError::InvalidArgument(format!(
            "step_index {} out of range: the job has {steps} steps",
            c.step_index
        )));
    }
    engine
        .logs()
        .record_times(&c.attempt_id, c.step_index, &c.times)
        .await?;
    if c.truncated {
        engine
            .logs()
            .mark_truncated(&c.attempt_id, c.step_index)
            .await?;
    }
    engine
        .logs()
        .append_pieces(&c.attempt_id, c.step_index, c.offset, pieces, c.eof)
        .await?;
    Ok(())
}

/// Hands the last logs to the syncer, then waits until it has acknowledged everything.
async fn finish_syncs(
    sync_tx: mpsc::Sender<Vec<Touched>>,
    syncer: tokio::task::JoinHandle<()>,
    pending: Vec<Touched>,
) {
    if !pending.is_empty() {
        let _ = sync_tx.send(pending).await;
    }
    drop(sync_tx);
    let _ = syncer.await;
}

/// A log a batch wrote to: (attempt, step, the batch ended it).
type Touched = (String, u32, bool);

/// Adds a log to a round of logs to sync (once; ended if any batch ended it).
fn touch(round: &mut Vec<Touched>, (attempt, step, ended): Touched) {
    match round
        .iter_mut()
        .find(|(a, s, _)| *a == attempt && *s == step)
    {
        Some(t) => t.2 |= ended,
        None => round.push((attempt, step, ended)),
    }
}

/// Least time between the starts of two syncs of a PushLogs stream while its logs stream on. Back
/// to back, the syncs of a fast log covered about 100 KiB each (`perf stat`: 10.6 `fdatasync`s per
/// MiB), each a data write, an inode write and a cache flush on the disk, an ack to encode, and a
/// wake-up of the agent to read it. Paced, one covers what arrived in the interval. A round that
/// ends a log is synced at once: a job's result waits for its logs to be complete, and no
/// acknowledgement is held back longer than this.
const SYNC_PACE: Duration = Duration::from_millis(5);

/// The syncer of one PushLogs stream: for each round of touched logs, sync each and acknowledge its
/// durable offset. A failed sync ends the stream with the error. Rounds that arrive while it waits
/// out [`SYNC_PACE`] join the round it holds.
async fn sync_and_ack(
    engine: Engine,
    mut rounds: mpsc::Receiver<Vec<Touched>>,
    tx: mpsc::Sender<Result<pb::LogAck, Status>>,
) {
    let mut last_start: Option<tokio::time::Instant> = None;
    while let Some(mut round) = rounds.recv().await {
        if let Some(due) = last_start.map(|at| at + SYNC_PACE) {
            let pause = tokio::time::sleep_until(due);
            tokio::pin!(pause);
            while !round.iter().any(|t| t.2) {
                tokio::select! {
                    () = &mut pause => break,
                    more = rounds.recv() => match more {
                        Some(more) => more.into_iter().for_each(|t| touch(&mut round, t)),
                        // The stream is ending: sync what is held now.
                        None => break,
                    },
                }
            }
        }
        last_start = Some(tokio::time::Instant::now());
        for (attempt_id, step_index, _) in round {
            let ack = match engine.logs().sync(&attempt_id, step_index).await {
                Ok(s) => pb::LogAck {
                    attempt_id,
                    step_index,
                    durable_offset: s.len,
                    complete: s.complete,
                },
                Err(e) => {
                    let _ = tx.send(Err(CoordError::from(e).into())).await;
                    return;
                }
            };
            if tx.send(Ok(ack)).await.is_err() {
                return;
            }
        }
    }
}

/// The status answering a PushLogs stream that broke on the agent's side (a message that does not decode
/// or is over the size limit): its own code (OUT_OF_RANGE for size), a message saying where it happened.
fn bad_log_stream(agent_id: &str, e: Status) -> Status {
    tracing::warn!(agent = %agent_id, "log stream broken: {}", e.message());
    Status::new(e.code(), format!("log stream refused: {}", e.message()))
}

#[cfg(test)]
mod tests {
    use super::{check_artifact_path, merge_contiguous, pb, touch};

    #[test]
    fn a_round_names_each_log_once_and_remembers_that_a_batch_ended_it() {
        let mut round = Vec::new();
        touch(&mut round, ("a".into(), 0, false));
        touch(&mut round, ("a".into(), 1, false));
        touch(&mut round, ("a".into(), 0, true));
        touch(&mut round, ("a".into(), 0, false));
        touch(&mut round, ("b".into(), 0, false));
        assert_eq!(
            round,
            vec![
                ("a".to_string(), 0, true),
                ("a".to_string(), 1, false),
                ("b".to_string(), 0, false),
            ]
        );
    }

    #[test]
    fn contiguous_chunks_of_one_log_are_merged_and_others_kept_apart() {
        let chunk = |attempt: &str, step: u32, offset: u64, data: &[u8], eof: bool| pb::LogChunk {
            attempt_id: attempt.to_string(),
            epoch: 1,
            step_index: step,
            offset,
            data: bytes::Bytes::copy_from_slice(data),
            eof,
            times: vec![pb::LineTime {
                offset,
                unix_ms: offset as i64,
            }],
            truncated: false,
        };
        let merged = merge_contiguous(vec![
            chunk("a", 0, 0, b"ab", false),
            chunk("a", 0, 2, b"cd", false),
            chunk("a", 0, 4, b"e", true),
            // After eof, a resend: kept apart so the store judges it.
            chunk("a", 0, 5, b"", true),
            chunk("a", 1, 0, b"x", false),
            // A gap: not merged, the store reports it.
            chunk("a", 1, 5, b"y", false),
            chunk("b", 1, 6, b"z", false),
        ]);
        let got: Vec<(String, u32, u64, Vec<u8>, bool, usize)> = merged
            .into_iter()
            .map(|r| {
                assert_eq!(
                    r.len,
                    r.pieces.iter().map(bytes::Bytes::len).sum::<usize>() as u64
                );
                (
                    r.head.attempt_id,
                    r.head.step_index,
                    r.head.offset,
                    r.pieces.concat(),
                    r.head.eof,
                    r.head.times.len(),
                )
            })
            .collect();
        assert_eq!(
            got,
            vec![
                ("a".into(), 0, 0, b"abcde".to_vec(), true, 3),
                ("a".into(), 0, 5, vec![], true, 1),
                ("a".into(), 1, 0, b"x".to_vec(), false, 1),
                ("a".into(), 1, 5, b"y".to_vec(), false, 1),
                ("b".into(), 1, 6, b"z".to_vec(), false, 1),
            ]
        );
    }

    #[test]
    fn artifact_paths_stay_in_the_workspace() {
        assert!(check_artifact_path("dist/app.txt").is_ok());
        assert!(check_artifact_path("a").is_ok());
        assert!(check_artifact_path("").is_err());
        assert!(check_artifact_path("/etc/passwd").is_err());
        assert!(check_artifact_path("a/../../x").is_err());
        assert!(check_artifact_path("..").is_err());
    }
}
