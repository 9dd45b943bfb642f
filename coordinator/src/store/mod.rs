//! The durable store: SQLite (WAL, `synchronous=FULL`). All SQL of the coordinator lives here.
//!
//! Every call runs on a blocking thread (`spawn_blocking`) against one connection, so the async runtime
//! never waits on an fsync; a call returns only after its transaction committed. The engine's state changes
//! go through the group committer ([`commit`]): batches queued while a transaction is being written share
//! the next one, so concurrent changes cost one fsync together.

mod access;
mod availability;
mod caches;
pub mod commit;
mod secrets;
mod traces;

pub use access::{ApiTokenRec, EnrollmentTokenInfo};
pub use caches::CacheRow;
pub use secrets::SecretRow;
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};

use rusqlite::{params, Connection, OptionalExtension, Row, Transaction};

use crate::engine::model::{
    AgentRec, ArtifactRec, AttemptRec, JobRec, RunRec, RunStatus, Status, StepRec, TokenRec,
};

const SCHEMA: &str = include_str!("schema.sql");
const SCHEMA_VERSION: i64 = 1;

/// The runs a start loads (served by the partial index `runs_running`).
const RUNNING_RUNS: &str = "SELECT id FROM runs WHERE state = 'running' ORDER BY seq";

/// The attempts a start loads (served by the partial index `attempts_running`).
const RUNNING_ATTEMPTS: &str =
    "SELECT id, run_id, job, agent_id, epoch, state, created_ms, finished_ms
     FROM attempts WHERE state = 'running'";

/// Failures of the store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// SQLite failed.
    #[error("sqlite: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// A stored value could not be decoded (the database was edited or is from another version).
    #[error("corrupt row: {0}")]
    Corrupt(String),
    /// The database was written by a newer coordinator.
    #[error("database schema version {found} is newer than this coordinator's {supported}")]
    Version {
        /// Version in the file.
        found: i64,
        /// Version this build knows.
        supported: i64,
    },
    /// The blocking task died.
    #[error("store task failed: {0}")]
    Task(String),
    /// An earlier commit failed; nothing is committed any more until the coordinator restarts.
    #[error("the store stopped committing after a failed commit ({0}); restart the coordinator")]
    Poisoned(String),
}

/// One change to write; a batch of them commits in one transaction. A transition writes only the rows it
/// changed: the whole run is written once, at submit.
#[derive(Debug, Clone)]
pub enum Write {
    /// Insert or replace a run with all its jobs, steps and artifacts.
    Run(RunRec),
    /// The mutable columns of a run's row.
    RunState(RunRow),
    /// The mutable columns of one job's row (its spec never changes).
    Job(JobRow),
    /// One step's row.
    Step {
        /// Run id.
        run_id: String,
        /// Job name.
        job: String,
        /// Step index.
        idx: u32,
        /// State and exit code.
        step: StepRec,
    },
    /// Replace every artifact of one job.
    Artifacts {
        /// Run id.
        run_id: String,
        /// Job name.
        job: String,
        /// The job's artifacts now.
        artifacts: Vec<ArtifactRec>,
    },
    /// Insert or replace an attempt.
    Attempt(AttemptRec),
    /// Insert or replace an agent.
    Agent(AgentRec),
}

/// The columns of a run that change after submit.
#[derive(Debug, Clone, PartialEq)]
pub struct RunRow {
    /// Run id.
    pub id: String,
    /// State.
    pub state: RunStatus,
    /// A user asked to cancel it.
    pub cancel_requested: bool,
    /// Unix ms when finished.
    pub finished_ms: Option<i64>,
}

impl RunRow {
    /// The mutable columns of `r`.
    pub fn of(r: &RunRec) -> RunRow {
        RunRow {
            id: r.id.clone(),
            state: r.state,
            cancel_requested: r.cancel_requested,
            finished_ms: r.finished_ms,
        }
    }
}

/// The columns of a job that change after submit.
#[derive(Debug, Clone, PartialEq)]
pub struct JobRow {
    /// Run id.
    pub run_id: String,
    /// Job name.
    pub name: String,
    /// State.
    pub state: Status,
    /// Failure class (`FailureClass` as i32).
    pub failure: i32,
    /// Reason shown to users.
    pub reason: String,
    /// Exit code of the failing step.
    pub exit_code: i32,
    /// Attempts made so far.
    pub attempts: u32,
    /// Current attempt.
    pub attempt_id: Option<String>,
    /// Fencing epoch of the current attempt.
    pub epoch: u64,
    /// Agent of the current attempt.
    pub agent_id: Option<String>,
    /// Unix ms when its first step started.
    pub started_ms: Option<i64>,
    /// Unix ms when it ended.
    pub finished_ms: Option<i64>,
}

impl JobRow {
    /// The mutable columns of job `j` of run `run_id`.
    pub fn of(run_id: &str, j: &JobRec) -> JobRow {
        JobRow {
            run_id: run_id.to_string(),
            name: j.name.clone(),
            state: j.state,
            failure: j.failure,
            reason: j.reason.clone(),
            exit_code: j.exit_code,
            attempts: j.attempts,
            attempt_id: j.attempt_id.clone(),
            epoch: j.epoch,
            agent_id: j.agent_id.clone(),
            started_ms: j.started_ms,
            finished_ms: j.finished_ms,
        }
    }

    /// Do the mutable columns of `a` and `b` differ?
    pub fn differs(a: &JobRec, b: &JobRec) -> bool {
        a.state != b.state
            || a.failure != b.failure
            || a.reason != b.reason
            || a.exit_code != b.exit_code
            || a.attempts != b.attempts
            || a.attempt_id != b.attempt_id
            || a.epoch != b.epoch
            || a.agent_id != b.agent_id
            || a.started_ms != b.started_ms
            || a.finished_ms != b.finished_ms
    }
}

/// The rows that changed from `old` to `new` (the same run), in write order.
pub fn run_changes(old: &RunRec, new: &RunRec, out: &mut Vec<Write>) {
    if old.state != new.state
        || old.cancel_requested != new.cancel_requested
        || old.finished_ms != new.finished_ms
    {
        out.push(Write::RunState(RunRow::of(new)));
    }
    for (i, j) in new.jobs.iter().enumerate() {
        let Some(o) = old.jobs.get(i).filter(|o| o.name == j.name) else {
            // Jobs never change after submit; a mismatch means a bug: write the run whole.
            out.push(Write::Run(new.clone()));
            return;
        };
        if JobRow::differs(o, j) {
            out.push(Write::Job(JobRow::of(&new.id, j)));
        }
        for (k, s) in j.steps.iter().enumerate() {
            if o.steps.get(k) != Some(s) {
                out.push(Write::Step {
                    run_id: new.id.clone(),
                    job: j.name.clone(),
                    idx: k as u32,
                    step: *s,
                });
            }
        }
        if o.artifacts != j.artifacts {
            out.push(Write::Artifacts {
                run_id: new.id.clone(),
                job: j.name.clone(),
                artifacts: j.artifacts.clone(),
            });
        }
    }
}

/// What the engine loads at start: everything not finished.
#[derive(Debug, Default)]
pub struct Loaded {
    /// Runs still running.
    pub runs: Vec<RunRec>,
    /// Attempts still running.
    pub attempts: Vec<AttemptRec>,
    /// Every enrolled agent.
    pub agents: Vec<AgentRec>,
    /// Largest run sequence number so far.
    pub max_seq: i64,
}

/// Why an enrollment was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EnrollRefusal {
    /// No such token.
    Unknown,
    /// Past its expiry.
    Expired,
    /// No uses left.
    UsedUp,
    /// The agent lacks labels the token requires.
    MissingLabels(Vec<String>),
}

/// The SQLite store. Clone is cheap (shared connection and committer).
#[derive(Debug, Clone)]
pub struct Store {
    conn: Arc<Mutex<Connection>>,
    commits: Arc<commit::Committer>,
}

fn lock(m: &Mutex<Connection>) -> MutexGuard<'_, Connection> {
    // A panic while holding the lock can only come from a bug in this module; the connection itself is
    // still usable (SQLite rolls back an unfinished transaction), so recover the guard.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Store {
    /// Open (or create) the database at `path` and apply the schema.
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        let conn = Connection::open(path)?;
        let store = Self::init(conn)?;
        // Checkpoints move WAL pages into the database file and fsync it: done inline they would stall the
        // commit that crossed the threshold (the p99 of every acknowledgement). A thread with its own
        // connection does them instead; PASSIVE never blocks the committer.
        {
            let conn = lock(&store.conn);
            conn.pragma_update(None, "wal_autocheckpoint", 0)?;
            // After the pragma, which replaces any WAL hook: the committer restarts the WAL with it.
            conn.wal_hook(Some(commit::note_wal_frames));
        }
        spawn_checkpointer(path, Arc::downgrade(&store.conn))?;
        Ok(store)
    }

    /// An in-memory database, for tests.
    pub fn open_in_memory() -> Result<Store, StoreError> {
        Self::init(Connection::open_in_memory()?)
    }

    fn init(conn: Connection) -> Result<Store, StoreError> {
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        let version: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
        if version > SCHEMA_VERSION {
            return Err(StoreError::Version {
                found: version,
                supported: SCHEMA_VERSION,
            });
        }
        conn.execute_batch(SCHEMA)?;
        conn.pragma_update(None, "user_version", SCHEMA_VERSION)?;
        let conn = Arc::new(Mutex::new(conn));
        let commits = Arc::new(commit::Committer::start(conn.clone())?);
        Ok(Store { conn, commits })
    }

    async fn call<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection) -> Result<T, StoreError> + Send + 'static,
    {
        let conn = self.conn.clone();
        tokio::task::spawn_blocking(move || f(&mut lock(&conn)))
            .await
            .map_err(|e| StoreError::Task(e.to_string()))?
    }

    /// Commit a batch of writes (in one transaction, possibly shared with other batches).
    pub async fn commit(&self, writes: Vec<Write>) -> Result<(), StoreError> {
        self.enqueue(writes, None).durable().await
    }

    /// Queue a batch for the group committer without waiting; `after` runs on the committer thread once
    /// the batch is durable, in queue order (so effects are published in the order changes were made).
    pub fn enqueue(&self, writes: Vec<Write>, after: Option<commit::After>) -> commit::Commit {
        self.commits.enqueue(writes, after)
    }

    /// [`Store::enqueue`], handing the caller the wake-up of an idle committer (see
    /// [`commit::HeldWake`]).
    pub fn enqueue_held(
        &self,
        writes: Vec<Write>,
        after: Option<commit::After>,
    ) -> (commit::Commit, Option<commit::HeldWake>) {
        self.commits.enqueue_held(writes, after)
    }

    /// Sequence number of the last queued batch (see [`Store::wait_durable`]).
    pub fn enqueued(&self) -> u64 {
        self.commits.enqueued()
    }

    /// Wait until every batch up to `seq` (from [`Store::enqueued`]) is durable.
    pub async fn wait_durable(&self, seq: u64) -> Result<(), StoreError> {
        self.commits.wait_durable(seq).await
    }

    /// Tell `observer` how long each group transaction takes (write and fsync).
    pub fn observe_commits(&self, observer: commit::Observer) {
        self.commits.observe(observer);
    }

    /// Why the store stopped committing, if a commit failed.
    pub fn poisoned(&self) -> Option<String> {
        self.commits.poisoned()
    }

    /// Hold the connection (so no group can commit) while `f` runs: lets tests see what happens before a
    /// batch is durable, as on a slow disk.
    #[cfg(test)]
    pub(crate) fn with_commits_stalled<T>(&self, f: impl FnOnce() -> T) -> T {
        let _held = lock(&self.conn);
        f()
    }

    /// Everything the engine keeps in memory: unfinished runs, running attempts, all agents.
    pub async fn load(&self) -> Result<Loaded, StoreError> {
        self.call(|c| {
            let max_seq: i64 = c.query_row("SELECT COALESCE(MAX(seq), 0) FROM runs", [], |r| r.get(0))?;
            let ids: Vec<String> = {
                let mut st = c.prepare(RUNNING_RUNS)?;
                let rows = st.query_map([], |r| r.get(0))?;
                rows.collect::<Result<_, _>>()?
            };
            let mut runs = Vec::new();
            for id in ids {
                if let Some(r) = read_run(c, &id)? {
                    runs.push(r);
                }
            }
            let attempts = {
                let mut st = c.prepare(RUNNING_ATTEMPTS)?;
                let rows = st.query_map([], |r| Ok(attempt_row(r)))?;
                let mut out = Vec::new();
                for row in rows {
                    out.push(row??);
                }
                out
            };
            let agents = {
                let mut st = c.prepare(
                    "SELECT id, hostname, labels, required_labels, capacity, credential_hash, revoked,
                            created_ms, last_seen_ms FROM agents ORDER BY id",
                )?;
                let rows = st.query_map([], |r| Ok(agent_row(r)))?;
                let mut out = Vec::new();
                for row in rows {
                    out.push(row??);
                }
                out
            };
            Ok(Loaded { runs, attempts, agents, max_seq })
        })
        .await
    }

    /// One run, finished or not.
    pub async fn get_run(&self, id: &str) -> Result<Option<RunRec>, StoreError> {
        let id = id.to_string();
        self.call(move |c| read_run(c, &id)).await
    }

    /// The newest `limit` runs, newest first.
    pub async fn list_runs(&self, limit: u32) -> Result<Vec<RunRec>, StoreError> {
        Ok(self.list_runs_page(limit, None).await?.unwrap_or_default())
    }

    /// The newest `limit` runs submitted before run `after` (all runs when `None`), newest first; `None`
    /// when there is no run `after`. Reads only the rows of the page (the primary key orders runs).
    pub async fn list_runs_page(
        &self,
        limit: u32,
        after: Option<String>,
    ) -> Result<Option<Vec<RunRec>>, StoreError> {
        self.call(move |c| {
            let before = match after {
                None => i64::MAX,
                Some(id) => {
                    let seq: Option<i64> = c
                        .prepare_cached("SELECT seq FROM runs WHERE id = ?1")?
                        .query_row([&id], |r| r.get(0))
                        .optional()?;
                    match seq {
                        Some(s) => s,
                        None => return Ok(None),
                    }
                }
            };
            let ids: Vec<String> = {
                let mut st = c.prepare_cached(
                    "SELECT id FROM runs WHERE seq < ?1 ORDER BY seq DESC LIMIT ?2",
                )?;
                let rows = st.query_map(params![before, limit], |r| r.get(0))?;
                rows.collect::<Result<_, _>>()?
            };
            let mut out = Vec::new();
            for id in ids {
                if let Some(r) = read_run(c, &id)? {
                    out.push(r);
                }
            }
            Ok(Some(out))
        })
        .await
    }

    /// Store a new enrollment token.
    pub async fn create_token(&self, t: TokenRec) -> Result<(), StoreError> {
        self.call(move |c| {
            c.execute(
                "INSERT INTO tokens (hash, uses_left, expires_ms, labels) VALUES (?1, ?2, ?3, ?4)",
                params![t.hash, t.uses_left, t.expires_ms, labels_json(&t.labels)],
            )?;
            Ok(())
        })
        .await
    }

    /// Spend one use of the token hashed `token_hash` and create `agent`, together. The agent's
    /// `required_labels` are set to the token's labels. Goes through the group committer: a burst of
    /// enrollments (a fleet coming up) shares one transaction and one fsync instead of one each, and the
    /// committer thread runs them one after the other, so two enrollments never both spend a last use.
    pub async fn enroll(
        &self,
        token_hash: String,
        now_ms: i64,
        agent: AgentRec,
    ) -> Result<Result<AgentRec, EnrollRefusal>, StoreError> {
        type Outcome = Result<Result<AgentRec, EnrollRefusal>, StoreError>;
        let slot: Arc<Mutex<Option<Outcome>>> = Arc::new(Mutex::new(None));
        let filled = slot.clone();
        let op: commit::Op = Box::new(move |tx| {
            // A savepoint of its own: a refusal or a corrupt token row rolls back this enrollment alone
            // and is reported to its caller, never failing the other batches of the group.
            let mut sp = tx.savepoint()?;
            let outcome = enroll_in(&sp, &token_hash, now_ms, agent);
            if matches!(outcome, Ok(Ok(_))) {
                sp.commit()?;
            } else {
                sp.rollback()?;
            }
            *filled.lock().unwrap_or_else(|p| p.into_inner()) = Some(outcome);
            Ok(())
        });
        self.commits
            .enqueue_op(Vec::new(), Some(op), None)
            .durable()
            .await?;
        let outcome = slot.lock().unwrap_or_else(|p| p.into_inner()).take();
        outcome.unwrap_or_else(|| Err(StoreError::Task("the enrollment did not run".into())))
    }
}

/// The checks and writes of one enrollment, inside the caller's transaction.
fn enroll_in(
    c: &Connection,
    token_hash: &str,
    now_ms: i64,
    mut agent: AgentRec,
) -> Result<Result<AgentRec, EnrollRefusal>, StoreError> {
    let row: Option<(u32, i64, String)> = c
        .prepare_cached("SELECT uses_left, expires_ms, labels FROM tokens WHERE hash = ?1")?
        .query_row([token_hash], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .optional()?;
    let Some((uses_left, expires_ms, labels)) = row else {
        return Ok(Err(EnrollRefusal::Unknown));
    };
    if expires_ms <= now_ms {
        return Ok(Err(EnrollRefusal::Expired));
    }
    if uses_left == 0 {
        return Ok(Err(EnrollRefusal::UsedUp));
    }
    let required = parse_labels(&labels)?;
    let missing: Vec<String> = required
        .iter()
        .filter(|(k, v)| agent.labels.get(*k) != Some(*v))
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    if !missing.is_empty() {
        return Ok(Err(EnrollRefusal::MissingLabels(missing)));
    }
    c.prepare_cached("UPDATE tokens SET uses_left = uses_left - 1 WHERE hash = ?1")?
        .execute([token_hash])?;
    agent.required_labels = required;
    write_agent(c, &agent)?;
    Ok(Ok(agent))
}

/// How often the checkpointer looks at the WAL.
const CHECKPOINT_EVERY: std::time::Duration = std::time::Duration::from_millis(200);

/// Checkpoint the WAL of the database at `path` from a thread of its own until the store is dropped.
fn spawn_checkpointer(
    path: &Path,
    store: std::sync::Weak<Mutex<Connection>>,
) -> Result<(), StoreError> {
    let conn = Connection::open(path)?;
    conn.busy_timeout(std::time::Duration::from_secs(5))?;
    std::thread::Builder::new()
        .name("drover-store-checkpoint".into())
        .spawn(move || {
            while store.strong_count() > 0 {
                std::thread::sleep(CHECKPOINT_EVERY);
                // Cheap when the WAL holds nothing new; never waits for the committer.
                if let Err(e) = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(())) {
                    tracing::warn!("WAL checkpoint failed: {e}");
                }
            }
        })
        .map_err(|e| StoreError::Task(format!("cannot start the checkpointer thread: {e}")))?;
    Ok(())
}

fn labels_json(l: &BTreeMap<String, String>) -> String {
    serde_json::to_string(l).unwrap_or_else(|_| "{}".into())
}

fn parse_labels(s: &str) -> Result<BTreeMap<String, String>, StoreError> {
    serde_json::from_str(s).map_err(|e| StoreError::Corrupt(format!("labels {s:?}: {e}")))
}

fn status(s: &str) -> Result<Status, StoreError> {
    Status::parse(s).ok_or_else(|| StoreError::Corrupt(format!("unknown state {s:?}")))
}

/// Apply one write inside a transaction.
pub(crate) fn apply_write(tx: &Transaction<'_>, w: &Write) -> Result<(), StoreError> {
    match w {
        Write::Run(r) => write_run(tx, r),
        Write::RunState(r) => {
            tx.prepare_cached(
                "UPDATE runs SET state = ?2, cancel_requested = ?3, finished_ms = ?4 WHERE id = ?1",
            )?
            .execute(params![
                r.id,
                r.state.as_str(),
                r.cancel_requested,
                r.finished_ms
            ])?;
            Ok(())
        }
        Write::Job(j) => {
            tx.prepare_cached(
                "UPDATE jobs SET state = ?3, failure = ?4, reason = ?5, exit_code = ?6, attempts = ?7,
                     attempt_id = ?8, epoch = ?9, agent_id = ?10, started_ms = ?11, finished_ms = ?12
                 WHERE run_id = ?1 AND name = ?2",
            )?
            .execute(params![
                j.run_id,
                j.name,
                j.state.as_str(),
                j.failure,
                j.reason,
                j.exit_code,
                j.attempts,
                j.attempt_id,
                j.epoch as i64,
                j.agent_id,
                j.started_ms,
                j.finished_ms
            ])?;
            Ok(())
        }
        Write::Step {
            run_id,
            job,
            idx,
            step,
        } => {
            tx.prepare_cached(
                "INSERT OR REPLACE INTO steps (run_id, job, idx, state, exit_code) VALUES (?1, ?2, ?3, ?4, ?5)",
            )?
            .execute(params![run_id, job, idx, step.state.as_str(), step.exit_code])?;
            Ok(())
        }
        Write::Artifacts {
            run_id,
            job,
            artifacts,
        } => {
            tx.prepare_cached("DELETE FROM artifacts WHERE run_id = ?1 AND job = ?2")?
                .execute(params![run_id, job])?;
            let mut ins = tx.prepare_cached(
                "INSERT OR REPLACE INTO artifacts (run_id, job, path, digest, size, mode, attempt_id)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            )?;
            for a in artifacts {
                ins.execute(params![
                    run_id,
                    job,
                    a.path,
                    a.digest,
                    a.size as i64,
                    a.mode,
                    a.attempt_id
                ])?;
            }
            Ok(())
        }
        Write::Attempt(a) => write_attempt(tx, a),
        Write::Agent(a) => write_agent(tx, a),
    }
}

fn write_run(tx: &Transaction<'_>, r: &RunRec) -> Result<(), StoreError> {
    tx.prepare_cached(
        "INSERT INTO runs (seq, id, name, state, cancel_requested, created_ms, finished_ms, context_digest, pipeline)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)
         ON CONFLICT(id) DO UPDATE SET state = excluded.state, cancel_requested = excluded.cancel_requested,
             finished_ms = excluded.finished_ms",
    )?
    .execute(params![
            r.seq,
            r.id,
            r.name,
            r.state.as_str(),
            r.cancel_requested,
            r.created_ms,
            r.finished_ms,
            r.context_digest,
            r.pipeline
        ])?;
    // The artifacts of a run are rewritten whole: a retried job replaces its previous attempt's files.
    tx.prepare_cached("DELETE FROM artifacts WHERE run_id = ?1")?
        .execute([&r.id])?;
    let mut job_row = tx.prepare_cached(
        "INSERT OR REPLACE INTO jobs (run_id, name, idx, spec, state, failure, reason, exit_code, attempts,
             attempt_id, epoch, agent_id, started_ms, finished_ms)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14)",
    )?;
    let mut step_row = tx.prepare_cached(
        "INSERT OR REPLACE INTO steps (run_id, job, idx, state, exit_code) VALUES (?1, ?2, ?3, ?4, ?5)",
    )?;
    let mut artifact_row = tx.prepare_cached(
        "INSERT OR REPLACE INTO artifacts (run_id, job, path, digest, size, mode, attempt_id)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
    )?;
    for j in &r.jobs {
        let spec =
            serde_json::to_string(&*j.spec).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        job_row.execute(params![
            r.id,
            j.name,
            j.idx,
            spec,
            j.state.as_str(),
            j.failure,
            j.reason,
            j.exit_code,
            j.attempts,
            j.attempt_id,
            j.epoch as i64,
            j.agent_id,
            j.started_ms,
            j.finished_ms
        ])?;
        for (i, s) in j.steps.iter().enumerate() {
            step_row.execute(params![
                r.id,
                j.name,
                i as u32,
                s.state.as_str(),
                s.exit_code
            ])?;
        }
        for a in &j.artifacts {
            artifact_row.execute(params![
                r.id,
                j.name,
                a.path,
                a.digest,
                a.size as i64,
                a.mode,
                a.attempt_id
            ])?;
        }
    }
    Ok(())
}

fn write_attempt(tx: &Transaction<'_>, a: &AttemptRec) -> Result<(), StoreError> {
    tx.prepare_cached(
        "INSERT OR REPLACE INTO attempts (id, run_id, job, agent_id, epoch, state, created_ms, finished_ms)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
    )?
    .execute(params![a.id, a.run_id, a.job, a.agent_id, a.epoch as i64, a.state.as_str(), a.created_ms, a.finished_ms])?;
    Ok(())
}

fn write_agent(tx: &Connection, a: &AgentRec) -> Result<(), StoreError> {
    tx.prepare_cached(
        "INSERT OR REPLACE INTO agents (id, hostname, labels, required_labels, capacity, credential_hash, revoked,
             created_ms, last_seen_ms) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
    )?
    .execute(params![
            a.id,
            a.hostname,
            labels_json(&a.labels),
            labels_json(&a.required_labels),
            a.capacity,
            a.credential_hash,
            a.revoked,
            a.created_ms,
            a.last_seen_ms
        ])?;
    Ok(())
}

fn attempt_row(r: &Row<'_>) -> Result<AttemptRec, StoreError> {
    let epoch: i64 = r.get(4)?;
    let state: String = r.get(5)?;
    Ok(AttemptRec {
        id: r.get(0)?,
        run_id: r.get(1)?,
        job: r.get(2)?,
        agent_id: r.get(3)?,
        epoch: epoch as u64,
        state: status(&state)?,
        created_ms: r.get(6)?,
        finished_ms: r.get(7)?,
    })
}

fn agent_row(r: &Row<'_>) -> Result<AgentRec, StoreError> {
    let labels: String = r.get(2)?;
    let required: String = r.get(3)?;
    Ok(AgentRec {
        id: r.get(0)?,
        hostname: r.get(1)?,
        labels: parse_labels(&labels)?,
        required_labels: parse_labels(&required)?,
        capacity: r.get(4)?,
        credential_hash: r.get(5)?,
        revoked: r.get(6)?,
        created_ms: r.get(7)?,
        last_seen_ms: r.get(8)?,
    })
}

fn read_run(c: &Connection, id: &str) -> Result<Option<RunRec>, StoreError> {
    let row = c
        .prepare_cached(
            "SELECT seq, id, name, state, cancel_requested, created_ms, finished_ms, context_digest, pipeline
             FROM runs WHERE id = ?1",
        )?
        .query_row(
            [id],
            |r| {
                Ok((
                    r.get::<_, i64>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, String>(2)?,
                    r.get::<_, String>(3)?,
                    r.get::<_, bool>(4)?,
                    r.get::<_, i64>(5)?,
                    r.get::<_, Option<i64>>(6)?,
                    r.get::<_, String>(7)?,
                    r.get::<_, String>(8)?,
                ))
            },
        )
        .optional()?;
    let Some((
        seq,
        id,
        name,
        state,
        cancel_requested,
        created_ms,
        finished_ms,
        context_digest,
        pipeline,
    )) = row
    else {
        return Ok(None);
    };
    let state = RunStatus::parse(&state)
        .ok_or_else(|| StoreError::Corrupt(format!("run state {state:?}")))?;
    let mut jobs = Vec::new();
    {
        let mut st = c.prepare_cached(
            "SELECT name, idx, spec, state, failure, reason, exit_code, attempts, attempt_id, epoch, agent_id,
                    started_ms, finished_ms FROM jobs WHERE run_id = ?1 ORDER BY idx",
        )?;
        let mut rows = st.query([&id])?;
        while let Some(r) = rows.next()? {
            let spec: String = r.get(2)?;
            let state: String = r.get(3)?;
            let epoch: i64 = r.get(9)?;
            jobs.push(JobRec {
                name: r.get(0)?,
                idx: r.get(1)?,
                spec: std::sync::Arc::new(
                    serde_json::from_str(&spec)
                        .map_err(|e| StoreError::Corrupt(format!("job spec: {e}")))?,
                ),
                state: status(&state)?,
                failure: r.get(4)?,
                reason: r.get(5)?,
                exit_code: r.get(6)?,
                attempts: r.get(7)?,
                attempt_id: r.get(8)?,
                epoch: epoch as u64,
                agent_id: r.get(10)?,
                started_ms: r.get(11)?,
                finished_ms: r.get(12)?,
                steps: Vec::new(),
                artifacts: Vec::new(),
            });
        }
    }
    for j in &mut jobs {
        let mut st = c.prepare_cached(
            "SELECT state, exit_code FROM steps WHERE run_id = ?1 AND job = ?2 ORDER BY idx",
        )?;
        let mut rows = st.query(params![id, j.name])?;
        while let Some(r) = rows.next()? {
            let state: String = r.get(0)?;
            j.steps.push(StepRec {
                state: status(&state)?,
                exit_code: r.get(1)?,
            });
        }
        // Keep the step list the length of the spec even if rows are missing (written before any attempt).
        j.steps.resize(
            j.spec.steps.len(),
            StepRec {
                state: Status::Queued,
                exit_code: 0,
            },
        );
        let mut st = c.prepare_cached(
            "SELECT path, digest, size, mode, attempt_id FROM artifacts WHERE run_id = ?1 AND job = ?2 ORDER BY path",
        )?;
        let mut rows = st.query(params![id, j.name])?;
        while let Some(r) = rows.next()? {
            let size: i64 = r.get(2)?;
            j.artifacts.push(ArtifactRec {
                path: r.get(0)?,
                digest: r.get(1)?,
                size: size as u64,
                mode: r.get(3)?,
                attempt_id: r.get(4)?,
            });
        }
    }
    Ok(Some(RunRec {
        seq,
        id,
        name,
        state,
        cancel_requested,
        created_ms,
        finished_ms,
        context_digest,
        pipeline: pipeline.into(),
        jobs,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::{JobSpec, PullPolicy, StepSpec};
    use std::time::Duration;

    fn run() -> RunRec {
        let spec = JobSpec {
            name: "build".into(),
            needs: vec![],
            agents: BTreeMap::new(),
            env: BTreeMap::new(),
            steps: vec![StepSpec {
                name: "s".into(),
                image: "img".into(),
                commands: vec!["true".into()],
                env: BTreeMap::new(),
                workdir: None,
                timeout_secs: None,
                pull: PullPolicy::IfNotPresent,
                resources: Default::default(),
                host: Default::default(),
            }],
            artifacts: vec![],
            timeout_secs: None,
            secrets: Vec::new(),
            cache: None,
        };
        RunRec {
            seq: 1,
            id: "r1".into(),
            name: "n".into(),
            state: RunStatus::Running,
            cancel_requested: false,
            created_ms: 5,
            finished_ms: None,
            context_digest: String::new(),
            pipeline: "jobs: {}".into(),
            jobs: vec![JobRec {
                name: "build".into(),
                idx: 0,
                spec: std::sync::Arc::new(spec),
                state: Status::Queued,
                failure: 0,
                reason: String::new(),
                exit_code: 0,
                attempts: 0,
                attempt_id: None,
                epoch: 0,
                agent_id: None,
                started_ms: None,
                finished_ms: None,
                steps: vec![StepRec {
                    state: Status::Queued,
                    exit_code: 0,
                }],
                artifacts: vec![],
            }],
        }
    }

    #[tokio::test]
    async fn run_round_trip_and_reload_after_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db.sqlite");
        let store = Store::open(&path).unwrap();
        let mut r = run();
        store.commit(vec![Write::Run(r.clone())]).await.unwrap();
        r.jobs[0].artifacts.push(ArtifactRec {
            path: "a.txt".into(),
            digest: "d".repeat(64),
            size: 3,
            mode: 0o644,
            attempt_id: "at".into(),
        });
        r.jobs[0].state = Status::Running;
        store.commit(vec![Write::Run(r.clone())]).await.unwrap();
        drop(store);
        let store = Store::open(&path).unwrap();
        assert_eq!(store.get_run("r1").await.unwrap().unwrap(), r);
        let loaded = store.load().await.unwrap();
        assert_eq!(loaded.runs, vec![r]);
        assert_eq!(loaded.max_seq, 1);
        assert!(store.get_run("nope").await.unwrap().is_none());
    }

    /// A start finds the running runs and attempts through the partial indexes (which hold nothing
    /// else), and a store made with the earlier indexes of every state loses them on open.
    #[tokio::test]
    async fn running_rows_are_indexed_alone_and_the_old_state_indexes_go() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db.sqlite");
        drop(Store::open(&path).unwrap());
        let c = Connection::open(&path).unwrap();
        c.execute_batch(
            "CREATE INDEX runs_state ON runs(state); CREATE INDEX attempts_state ON attempts(state);",
        )
        .unwrap();
        drop(c);
        let store = Store::open(&path).unwrap();
        let mut r = run();
        store.commit(vec![Write::Run(r.clone())]).await.unwrap();
        let mut done = r.clone();
        (done.id, done.seq, done.state) = ("r2".into(), 2, RunStatus::Succeeded);
        store.commit(vec![Write::Run(done)]).await.unwrap();
        {
            let c = lock(&store.conn);
            let plan = |sql: &str| -> String {
                let mut st = c.prepare(&format!("EXPLAIN QUERY PLAN {sql}")).unwrap();
                let rows = st.query_map([], |r| r.get::<_, String>(3)).unwrap();
                rows.map(Result::unwrap).collect::<Vec<_>>().join("; ")
            };
            assert!(
                plan(RUNNING_RUNS).contains("runs_running"),
                "{}",
                plan(RUNNING_RUNS)
            );
            assert!(
                plan(RUNNING_ATTEMPTS).contains("attempts_running"),
                "{}",
                plan(RUNNING_ATTEMPTS)
            );
            let indexes: Vec<String> = c
                .prepare(
                    "SELECT name FROM sqlite_master WHERE type = 'index' AND name LIKE '%_state'",
                )
                .unwrap()
                .query_map([], |r| r.get(0))
                .unwrap()
                .map(Result::unwrap)
                .collect();
            assert!(indexes.is_empty(), "{indexes:?}");
            let entries: i64 = c
                .query_row(
                    "SELECT COUNT(*) FROM runs INDEXED BY runs_running WHERE state = 'running'",
                    [],
                    |r| r.get(0),
                )
                .unwrap();
            assert_eq!(entries, 1);
        }
        r.state = RunStatus::Running;
        assert_eq!(store.load().await.unwrap().runs, vec![r]);
    }

    #[tokio::test]
    async fn the_wal_starts_over_under_a_steady_stream_of_commits() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db.sqlite");
        let store = Store::open(&path).unwrap();
        let mut r = run();
        // A run with 64 KiB of pipeline text per commit: each writes at least 16 pages, so 1,000 commits
        // back to back are over 64 MiB of WAL frames, four times the size past which it must start over.
        let text = "x".repeat(64 * 1024);
        for i in 1..=1_000 {
            (r.seq, r.id, r.pipeline) = (i, format!("r{i}"), format!("{i}{text}").into());
            store.commit(vec![Write::Run(r.clone())]).await.unwrap();
        }
        let wal = std::fs::metadata(dir.path().join("db.sqlite-wal"))
            .unwrap()
            .len();
        assert!(wal < 32 << 20, "the WAL grew to {wal} bytes");
        drop(store);
        let store = Store::open(&path).unwrap();
        assert_eq!(store.get_run("r1000").await.unwrap().unwrap(), r);
        assert_eq!(store.load().await.unwrap().runs.len(), 1_000);
    }

    #[tokio::test]
    async fn a_held_wake_up_holds_only_a_quiet_committer_and_only_until_it_is_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("db.sqlite")).unwrap();
        let mut r = run();
        store.commit(vec![Write::Run(r.clone())]).await.unwrap();
        // Quiet: the committer has been idle longer than `QUIET`; the caller holds its wake-up.
        tokio::time::sleep(Duration::from_millis(20)).await;
        (r.seq, r.id) = (2, "r2".into());
        let (commit, held) = store.enqueue_held(vec![Write::Run(r.clone())], None);
        let held = held.expect("a quiet committer's wake-up is handed to the caller");
        let mut durable = tokio::spawn(commit.durable());
        assert!(
            tokio::time::timeout(Duration::from_millis(200), &mut durable)
                .await
                .is_err(),
            "the committer started while its wake-up was held"
        );
        // A plain enqueue meanwhile does not wake it either (the wake-up is taken): it rides along.
        (r.seq, r.id) = (3, "r3".into());
        let along = store.enqueue(vec![Write::Run(r.clone())], None);
        assert!(
            tokio::time::timeout(Duration::from_millis(100), &mut durable)
                .await
                .is_err()
        );
        drop(held);
        durable.await.unwrap().unwrap();
        along.durable().await.unwrap();
        assert!(store.get_run("r2").await.unwrap().is_some());
        assert!(store.get_run("r3").await.unwrap().is_some());
        // A committer already woken (here by a plain enqueue) is never held back.
        (r.seq, r.id) = (4, "r4".into());
        let woke = store.enqueue(vec![Write::Run(r.clone())], None);
        (r.seq, r.id) = (5, "r5".into());
        let (commit, held) = store.enqueue_held(vec![Write::Run(r.clone())], None);
        assert!(held.is_none(), "a woken committer's wake-up was held");
        woke.durable().await.unwrap();
        tokio::time::timeout(Duration::from_secs(10), commit.durable())
            .await
            .expect("committed without anyone waking it by hand")
            .unwrap();
    }

    #[tokio::test]
    async fn runs_list_in_pages_newest_first() {
        let store = Store::open_in_memory().unwrap();
        for i in 1..=5 {
            let mut r = run();
            r.seq = i;
            r.id = format!("r{i}");
            store.commit(vec![Write::Run(r)]).await.unwrap();
        }
        let ids = |p: Option<Vec<RunRec>>| -> Vec<String> {
            p.unwrap().into_iter().map(|r| r.id).collect()
        };
        assert_eq!(
            ids(store.list_runs_page(2, None).await.unwrap()),
            ["r5", "r4"]
        );
        assert_eq!(
            ids(store.list_runs_page(2, Some("r4".into())).await.unwrap()),
            ["r3", "r2"]
        );
        assert_eq!(
            ids(store.list_runs_page(2, Some("r2".into())).await.unwrap()),
            ["r1"]
        );
        assert!(store
            .list_runs_page(2, Some("nope".into()))
            .await
            .unwrap()
            .is_none());
    }

    #[tokio::test]
    async fn only_changed_rows_are_written_and_reload_the_same() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db.sqlite");
        let store = Store::open(&path).unwrap();
        let old = run();
        store.commit(vec![Write::Run(old.clone())]).await.unwrap();
        let mut new = old.clone();
        new.jobs[0].state = Status::Running;
        new.jobs[0].attempt_id = Some("at".into());
        new.jobs[0].steps[0].state = Status::Succeeded;
        new.cancel_requested = true;
        let mut writes = Vec::new();
        run_changes(&old, &new, &mut writes);
        assert_eq!(writes.len(), 3, "{writes:?}");
        assert!(writes.iter().all(|w| !matches!(w, Write::Run(_))));
        store.commit(writes).await.unwrap();
        drop(store);
        let store = Store::open(&path).unwrap();
        assert_eq!(store.get_run("r1").await.unwrap().unwrap(), new);
    }

    #[tokio::test]
    async fn enroll_spends_token_and_checks_labels() {
        let store = Store::open_in_memory().unwrap();
        let mut labels = BTreeMap::new();
        labels.insert("os".to_string(), "linux".to_string());
        store
            .create_token(TokenRec {
                hash: "h".into(),
                uses_left: 1,
                expires_ms: 1000,
                labels: labels.clone(),
            })
            .await
            .unwrap();
        let agent = AgentRec {
            id: "a1".into(),
            hostname: "h".into(),
            labels: BTreeMap::new(),
            required_labels: BTreeMap::new(),
            capacity: 1,
            credential_hash: "c".into(),
            revoked: false,
            created_ms: 0,
            last_seen_ms: 0,
        };
        let r = store.enroll("h".into(), 10, agent.clone()).await.unwrap();
        assert_eq!(
            r,
            Err(EnrollRefusal::MissingLabels(vec!["os=linux".into()]))
        );
        assert_eq!(
            store.enroll("x".into(), 10, agent.clone()).await.unwrap(),
            Err(EnrollRefusal::Unknown)
        );
        assert_eq!(
            store.enroll("h".into(), 2000, agent.clone()).await.unwrap(),
            Err(EnrollRefusal::Expired)
        );
        let mut ok = agent.clone();
        ok.labels = labels.clone();
        let got = store
            .enroll("h".into(), 10, ok.clone())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(got.required_labels, labels);
        ok.id = "a2".into();
        assert_eq!(
            store.enroll("h".into(), 10, ok).await.unwrap(),
            Err(EnrollRefusal::UsedUp)
        );
        assert_eq!(store.load().await.unwrap().agents, vec![got]);
    }
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_burst_of_enrollments_shares_one_commit_and_spends_each_use_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db.sqlite");
        let store = Store::open(&path).unwrap();
        let mut labels = BTreeMap::new();
        labels.insert("os".to_string(), "linux".to_string());
        store
            .create_token(TokenRec {
                hash: "h".into(),
                uses_left: 5,
                expires_ms: i64::MAX,
                labels: labels.clone(),
            })
            .await
            .unwrap();
        let commits = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counted = commits.clone();
        store.observe_commits(Arc::new(move |_| {
            counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }));
        let agent = |i: usize, labels: &BTreeMap<String, String>| AgentRec {
            id: format!("a{i}"),
            hostname: "h".into(),
            labels: labels.clone(),
            required_labels: BTreeMap::new(),
            capacity: 1,
            credential_hash: "c".into(),
            revoked: false,
            created_ms: 0,
            last_seen_ms: 0,
        };
        // Queue 20 enrollments (one of them without the token's labels) while nothing can commit, so they
        // all wait for the same transaction.
        let (release, released) = std::sync::mpsc::channel::<()>();
        let (held_tx, held_rx) = std::sync::mpsc::channel::<()>();
        let holder = {
            let store = store.clone();
            std::thread::spawn(move || {
                store.with_commits_stalled(|| {
                    held_tx.send(()).unwrap();
                    released.recv().unwrap();
                })
            })
        };
        held_rx.recv().unwrap();
        let mut waiting = Vec::new();
        let before = store.enqueued();
        for i in 0..20u64 {
            let l = if i == 3 {
                BTreeMap::new()
            } else {
                labels.clone()
            };
            let s = store.clone();
            let a = agent(i as usize, &l);
            waiting.push(tokio::spawn(
                async move { s.enroll("h".into(), 10, a).await },
            ));
            // One at a time, so the queue order (and so which five spend the uses) is a0, a1, ...
            while store.enqueued() < before + i + 1 {
                tokio::time::sleep(std::time::Duration::from_millis(1)).await;
            }
        }
        release.send(()).unwrap();
        holder.join().unwrap();
        let mut ok = Vec::new();
        let mut used_up = 0;
        let mut missing = 0;
        for w in waiting {
            match w.await.unwrap().unwrap() {
                Ok(a) => ok.push(a.id),
                Err(EnrollRefusal::UsedUp) => used_up += 1,
                Err(EnrollRefusal::MissingLabels(_)) => missing += 1,
                Err(other) => panic!("unexpected refusal {other:?}"),
            }
        }
        assert_eq!((ok.len(), used_up, missing), (5, 14, 1), "{ok:?}");
        // The committer may have taken the first one alone before it blocked on the held connection.
        let transactions = commits.load(std::sync::atomic::Ordering::SeqCst);
        assert!(
            transactions <= 2,
            "20 enrollments took {transactions} transactions"
        );
        drop(store);
        let store = Store::open(&path).unwrap();
        let mut stored: Vec<String> = store
            .load()
            .await
            .unwrap()
            .agents
            .into_iter()
            .map(|a| a.id)
            .collect();
        stored.sort();
        ok.sort();
        assert_eq!(stored, ok);
        let left: u32 = lock(&store.conn)
            .query_row("SELECT uses_left FROM tokens WHERE hash = 'h'", [], |r| {
                r.get(0)
            })
            .unwrap();
        assert_eq!(left, 0);
    }
}
