//! `drover.v1.ControlService`: pipelines, runs, logs, artifacts, agents, tokens.

use std::collections::BTreeMap;
use std::pin::Pin;
use std::time::Duration;

use drover_proto::v1 as pb;
use drover_proto::v1::control_service_server::ControlService;
use futures::{Stream, StreamExt};
use tokio::sync::{broadcast, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::engine::model::Status as JobStatus;
use crate::engine::Engine;
use crate::error::{CoordError, CoordResult};

/// Largest source context accepted by UploadContext.
pub const MAX_CONTEXT_BYTES: u64 = 2 * 1024 * 1024 * 1024;

/// The ControlService implementation.
#[derive(Debug, Clone)]
pub struct ControlApi {
    engine: Engine,
    access: Option<crate::access::AccessControl>,
}

impl ControlApi {
    /// Serve clients from `engine`.
    pub fn new(engine: Engine) -> Self {
        ControlApi {
            engine,
            access: None,
        }
    }

    /// Also create API tokens in `access` (CreateApiToken).
    pub fn with_access(mut self, access: crate::access::AccessControl) -> Self {
        self.access = Some(access);
        self
    }

    fn access(&self) -> Result<&crate::access::AccessControl, CoordError> {
        self.access.as_ref().ok_or_else(|| {
            CoordError::FailedPrecondition("this server has no API token store".into())
        })
    }
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl ControlService for ControlApi {
    async fn create_api_token(
        &self,
        req: Request<pb::CreateApiTokenRequest>,
    ) -> Result<Response<pb::CreateApiTokenResponse>, Status> {
        let r = req.into_inner();
        let role = crate::access::Role::parse(&r.role)?;
        let token = self.access()?.create(role, &r.name).await?;
        Ok(Response::new(pb::CreateApiTokenResponse {
            token,
            role: role.as_str().into(),
        }))
    }

    async fn list_tokens(
        &self,
        _req: Request<pb::ListTokensRequest>,
    ) -> Result<Response<pb::ListTokensResponse>, Status> {
        let tokens = self.access()?.list().await?;
        Ok(Response::new(pb::ListTokensResponse { tokens }))
    }

    async fn revoke_token(
        &self,
        req: Request<pb::RevokeTokenRequest>,
    ) -> Result<Response<pb::TokenInfo>, Status> {
        Ok(Response::new(
            self.access()?.revoke(&req.into_inner().id).await?,
        ))
    }

    async fn revoke_agent(
        &self,
        req: Request<pb::AgentRequest>,
    ) -> Result<Response<pb::Agent>, Status> {
        Ok(Response::new(
            self.engine.revoke_agent(&req.into_inner().agent_id).await?,
        ))
    }

    async fn set_secret(
        &self,
        req: Request<pb::SetSecretRequest>,
    ) -> Result<Response<pb::SecretInfo>, Status> {
        let r = req.into_inner();
        Ok(Response::new(
            self.engine.set_secret(&r.name, &r.value).await?,
        ))
    }

    async fn list_secrets(
        &self,
        _req: Request<pb::ListSecretsRequest>,
    ) -> Result<Response<pb::ListSecretsResponse>, Status> {
        Ok(Response::new(pb::ListSecretsResponse {
            secrets: self.engine.list_secrets(),
        }))
    }

    async fn delete_secret(
        &self,
        req: Request<pb::DeleteSecretRequest>,
    ) -> Result<Response<pb::DeleteSecretResponse>, Status> {
        let deleted = self.engine.delete_secret(&req.into_inner().name).await?;
        Ok(Response::new(pb::DeleteSecretResponse { deleted }))
    }

    async fn list_caches(
        &self,
        req: Request<pb::ListCachesRequest>,
    ) -> Result<Response<pb::ListCachesResponse>, Status> {
        let caches = crate::caches::list(&self.engine, &req.into_inner().scope).await?;
        Ok(Response::new(pb::ListCachesResponse { caches }))
    }

    async fn delete_cache(
        &self,
        req: Request<pb::DeleteCacheRequest>,
    ) -> Result<Response<pb::DeleteCacheResponse>, Status> {
        let r = req.into_inner();
        let deleted = crate::caches::delete(&self.engine, &r.scope, &r.key).await?;
        Ok(Response::new(pb::DeleteCacheResponse { deleted }))
    }

    async fn validate_pipeline(
        &self,
        req: Request<pb::ValidatePipelineRequest>,
    ) -> Result<Response<pb::ValidatePipelineResponse>, Status> {
        let errors = self
            .engine
            .validate(&req.into_inner().pipeline)
            .into_iter()
            .map(|e| pb::PipelineError {
                line: e.line,
                column: e.column,
                message: e.message,
            })
            .collect();
        Ok(Response::new(pb::ValidatePipelineResponse { errors }))
    }

    async fn upload_context(
        &self,
        req: Request<Streaming<pb::ContextChunk>>,
    ) -> Result<Response<pb::ContextUploaded>, Status> {
        let mut inbound = req.into_inner();
        let store = self.engine.blobs().clone().with_max_size(MAX_CONTEXT_BYTES);
        let mut w = store.writer().await.map_err(CoordError::from)?;
        while let Some(chunk) = inbound.message().await? {
            w.write(&chunk.data).await.map_err(CoordError::from)?;
        }
        let (digest, size) = w.finish(None).await.map_err(CoordError::from)?;
        Ok(Response::new(pb::ContextUploaded { digest, size }))
    }

    async fn submit_run(
        &self,
        req: Request<pb::SubmitRunRequest>,
    ) -> Result<Response<pb::SubmitRunResponse>, Status> {
        let r = req.into_inner();
        let run_id = self
            .engine
            .submit(&r.pipeline, &r.context_digest, &r.name)
            .await?;
        Ok(Response::new(pb::SubmitRunResponse { run_id }))
    }

    async fn get_run(&self, req: Request<pb::GetRunRequest>) -> Result<Response<pb::Run>, Status> {
        Ok(Response::new(
            self.engine.get_run(&req.into_inner().run_id).await?,
        ))
    }

    async fn list_runs(
        &self,
        req: Request<pb::ListRunsRequest>,
    ) -> Result<Response<pb::ListRunsResponse>, Status> {
        let r = req.into_inner();
        let (runs, next_page_token) = self.engine.list_runs_page(r.limit, &r.page_token).await?;
        Ok(Response::new(pb::ListRunsResponse {
            runs,
            next_page_token,
        }))
    }

    async fn watch_run(
        &self,
        req: Request<pb::GetRunRequest>,
    ) -> Result<Response<BoxStream<pb::Run>>, Status> {
        let run_id = req.into_inner().run_id;
        // Subscribe before the first snapshot so no change between the two is missed.
        let changes = self.engine.subscribe();
        let first = self.engine.get_run(&run_id).await?;
        let (tx, rx) = mpsc::channel(16);
        tokio::spawn(watch_run(self.engine.clone(), run_id, first, changes, tx));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn follow_logs(
        &self,
        req: Request<pb::FollowLogsRequest>,
    ) -> Result<Response<BoxStream<pb::LogEvent>>, Status> {
        let rx = start_follow_logs(&self.engine, req.into_inner()).await?;
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn cancel_run(
        &self,
        req: Request<pb::CancelRunRequest>,
    ) -> Result<Response<pb::CancelRunResponse>, Status> {
        let canceled_jobs = self.engine.cancel_run(&req.into_inner().run_id).await?;
        Ok(Response::new(pb::CancelRunResponse { canceled_jobs }))
    }

    async fn list_artifacts(
        &self,
        req: Request<pb::ListArtifactsRequest>,
    ) -> Result<Response<pb::ListArtifactsResponse>, Status> {
        let r = req.into_inner();
        let artifacts = self
            .engine
            .list_artifacts(&r.run_id, &r.job)
            .await?
            .into_iter()
            .map(|(job, a)| pb::Artifact {
                job,
                path: a.path,
                digest: a.digest,
                size: a.size,
                mode: a.mode,
            })
            .collect();
        Ok(Response::new(pb::ListArtifactsResponse { artifacts }))
    }

    async fn get_artifact(
        &self,
        req: Request<pb::GetArtifactRequest>,
    ) -> Result<Response<BoxStream<pb::BlobChunk>>, Status> {
        let r = req.into_inner();
        let a = self.engine.artifact(&r.run_id, &r.job, &r.path).await?;
        let s = self
            .engine
            .blobs()
            .read_from(&a.digest, r.offset)
            .await
            .map_err(CoordError::from)?;
        let s = s.map(|r| {
            r.map(|b| pb::BlobChunk { data: b.to_vec() })
                .map_err(|e| Status::from(CoordError::from(e)))
        });
        Ok(Response::new(Box::pin(s)))
    }

    async fn list_agents(
        &self,
        _req: Request<pb::ListAgentsRequest>,
    ) -> Result<Response<pb::ListAgentsResponse>, Status> {
        let agents = self.engine.list_agents();
        // Answer only once what was read is durable.
        self.engine.settled().await?;
        Ok(Response::new(pb::ListAgentsResponse { agents }))
    }

    async fn create_token(
        &self,
        req: Request<pb::CreateTokenRequest>,
    ) -> Result<Response<pb::CreateTokenResponse>, Status> {
        let r = req.into_inner();
        let ttl = Duration::from_secs(if r.ttl_secs == 0 { 3600 } else { r.ttl_secs });
        let labels: BTreeMap<String, String> = r.labels.into_iter().collect();
        let (token, expires_ms) = self.engine.create_token(r.uses, ttl, labels).await?;
        Ok(Response::new(pb::CreateTokenResponse { token, expires_ms }))
    }

    async fn explain_job(
        &self,
        req: Request<pb::ExplainJobRequest>,
    ) -> Result<Response<pb::ExplainJobResponse>, Status> {
        let r = req.into_inner();
        Ok(Response::new(
            self.engine.explain_job(&r.run_id, &r.job).await?,
        ))
    }

    async fn drain_agent(
        &self,
        req: Request<pb::AgentRequest>,
    ) -> Result<Response<pb::Agent>, Status> {
        let id = agent_id_of(req.into_inner())?;
        Ok(Response::new(self.engine.drain_agent(&id).await?))
    }

    async fn pause_agent(
        &self,
        req: Request<pb::AgentRequest>,
    ) -> Result<Response<pb::Agent>, Status> {
        let id = agent_id_of(req.into_inner())?;
        Ok(Response::new(self.engine.pause_agent(&id).await?))
    }

    async fn resume_agent(
        &self,
        req: Request<pb::AgentRequest>,
    ) -> Result<Response<pb::Agent>, Status> {
        let id = agent_id_of(req.into_inner())?;
        Ok(Response::new(self.engine.resume_agent(&id).await?))
    }

    async fn cancel_job(
        &self,
        req: Request<pb::CancelJobRequest>,
    ) -> Result<Response<pb::CancelJobResponse>, Status> {
        let r = req.into_inner();
        if r.run_id.is_empty() || r.job.is_empty() {
            return Err(CoordError::InvalidArgument(
                "run_id and job: both required (the run id and a job name of that run)".into(),
            )
            .into());
        }
        let canceled = self.engine.cancel_job(&r.run_id, &r.job).await?;
        Ok(Response::new(pb::CancelJobResponse { canceled }))
    }
}

/// The agent id of an agent request, which must not be empty.
fn agent_id_of(r: pb::AgentRequest) -> CoordResult<String> {
    if r.agent_id.is_empty() {
        return Err(CoordError::InvalidArgument(
            "agent_id: empty; expected an agent id as `drover agents` lists them".into(),
        ));
    }
    Ok(r.agent_id)
}

/// Start streaming a job's logs (the FollowLogs rpc; also the dashboard's log endpoint): checks the run,
/// job and step now, then pumps events into a bounded channel from a task that stops when the receiver is
/// dropped.
pub(crate) async fn start_follow_logs(
    engine: &Engine,
    r: pb::FollowLogsRequest,
) -> CoordResult<mpsc::Receiver<Result<pb::LogEvent, Status>>> {
    let changes = engine.subscribe();
    let view = engine.job_view(&r.run_id, &r.job).await?;
    let steps: Vec<u32> = if r.step.is_empty() {
        (0..view.steps.len() as u32).collect()
    } else {
        let i = view
            .steps
            .iter()
            .position(|(n, _)| *n == r.step)
            .ok_or_else(|| {
                CoordError::NotFound(format!(
                    "job {:?} of run {} has no step {:?}",
                    r.job, r.run_id, r.step
                ))
            })?;
        vec![i as u32]
    };
    let (tx, rx) = mpsc::channel(16);
    let engine = engine.clone();
    tokio::spawn(async move {
        if let Err(e) = follow_logs(&engine, &r, &steps, changes, &tx).await {
            let _ = tx.send(Err(e.into())).await;
        }
    });
    Ok(rx)
}

/// Wait for the next change of `run_id`. Returns false when the coordinator is closing.
async fn next_change(
    engine: &Engine,
    changes: &mut broadcast::Receiver<String>,
    run_id: &str,
) -> bool {
    let mut closing = engine.closing();
    if *closing.borrow() {
        return false;
    }
    loop {
        tokio::select! {
            r = changes.recv() => match r {
                Ok(id) if id == run_id => return true,
                Ok(_) => {}
                // Missed notifications: re-read the state, it may have changed.
                Err(broadcast::error::RecvError::Lagged(_)) => return true,
                Err(broadcast::error::RecvError::Closed) => return false,
            },
            _ = closing.changed() => return false,
        }
    }
}

async fn watch_run(
    engine: Engine,
    run_id: String,
    first: pb::Run,
    mut changes: broadcast::Receiver<String>,
    tx: mpsc::Sender<Result<pb::Run, Status>>,
) {
    let done = |r: &pb::Run| r.state != pb::RunState::Running as i32;
    let mut last = first.clone();
    if tx.send(Ok(first)).await.is_err() || done(&last) {
        return;
    }
    while next_change(&engine, &mut changes, &run_id).await {
        let run = match engine.get_run(&run_id).await {
            Ok(r) => r,
            Err(e) => {
                let _ = tx.send(Err(e.into())).await;
                return;
            }
        };
        if run == last {
            continue;
        }
        last = run.clone();
        if tx.send(Ok(run)).await.is_err() || done(&last) {
            return;
        }
    }
}

/// How long a follower of a finished job gives an incomplete log to be completed by the commit
/// that ended its attempt (milliseconds, normally) before completing it itself.
const ENDED_LOG_GRACE: Duration = Duration::from_secs(2);

/// Whether the log of `step` of an ended attempt is complete, or becomes so within
/// [`ENDED_LOG_GRACE`] (woken by the log itself, like any follower).
async fn log_completes_soon(engine: &Engine, attempt: &str, step: u32) -> CoordResult<bool> {
    let status = engine.logs().status(attempt, step).await?;
    if status.complete {
        return Ok(true);
    }
    let mut rest = std::pin::pin!(engine.logs().read(attempt, step, status.len, true));
    let ended = tokio::time::timeout(ENDED_LOG_GRACE, async {
        while let Some(piece) = rest.next().await {
            if piece?.eof {
                return Ok(true);
            }
        }
        Ok::<_, CoordError>(false)
    })
    .await;
    ended.unwrap_or(Ok(false))
}

/// Stream the logs of `steps` of a job in order. A step not started yet is waited for (with follow) until
/// the job ends; if the job moves to a new attempt meanwhile, the new attempt's logs follow from its first
/// step.
async fn follow_logs(
    engine: &Engine,
    r: &pb::FollowLogsRequest,
    steps: &[u32],
    mut changes: broadcast::Receiver<String>,
    tx: &mpsc::Sender<Result<pb::LogEvent, Status>>,
) -> CoordResult<()> {
    let mut pos = 0;
    let mut offset = r.offset;
    let mut attempt: Option<String> = None;
    let mut closing = engine.closing();
    while pos < steps.len() {
        let step = steps[pos];
        // Wait until this step of the current attempt has output or has started, or the job is over.
        let (att, name, job_over) = loop {
            let view = engine.job_view(&r.run_id, &r.job).await?;
            let name = view
                .steps
                .get(step as usize)
                .map(|(n, _)| n.clone())
                .unwrap_or_default();
            if let Some(att) = &view.attempt_id {
                let started = view
                    .steps
                    .get(step as usize)
                    .is_some_and(|(_, s)| *s != JobStatus::Queued);
                let has_log = engine
                    .logs()
                    .status(att, step)
                    .await
                    .map(|s| s.len > 0 || s.complete)?;
                if started || has_log {
                    break (att.clone(), name, view.state.is_terminal());
                }
            }
            if !r.follow || view.state.is_terminal() {
                return Ok(());
            }
            if !next_change(engine, &mut changes, &r.run_id).await {
                return Ok(());
            }
        };
        if attempt.as_ref().is_some_and(|a| *a != att) && pos > 0 {
            // A retry: show the new attempt from its first step.
            pos = 0;
            offset = 0;
            attempt = Some(att);
            continue;
        }
        attempt = Some(att.clone());
        if r.follow && job_over && !log_completes_soon(engine, &att, step).await? {
            // The job is over but this log is not complete, nor about to be: the coordinator
            // stopped between ending the attempt and completing its logs. Complete them now, or
            // this follower (and every later one) would wait for bytes that never come.
            engine
                .complete_ended_attempt_logs(&r.run_id, &r.job, &att)
                .await?;
        }
        let mut pieces = std::pin::pin!(engine.logs().read(&att, step, offset, r.follow));
        loop {
            let piece = tokio::select! {
                p = pieces.next() => p,
                _ = closing.changed() => return Ok(()),
            };
            let Some(piece) = piece else { break };
            let p = piece?;
            let times = if r.timestamps {
                engine
                    .logs()
                    .times(&att, step, p.offset, p.data.len() as u64)
                    .await?
            } else {
                Vec::new()
            };
            let ev = pb::LogEvent {
                job: r.job.clone(),
                step: name.clone(),
                step_index: step,
                offset: p.offset,
                data: p.data.to_vec(),
                eof: p.eof,
                times,
            };
            if tx.send(Ok(ev)).await.is_err() {
                return Ok(());
            }
        }
        offset = 0;
        pos += 1;
    }
    Ok(())
}
