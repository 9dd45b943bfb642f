-- Drover coordinator schema, version 1. Applied at open; `PRAGMA user_version` records the version.
CREATE TABLE IF NOT EXISTS runs (
    seq              INTEGER PRIMARY KEY,
    id               TEXT NOT NULL UNIQUE,
    name             TEXT NOT NULL,
    state            TEXT NOT NULL,
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    created_ms       INTEGER NOT NULL,
    finished_ms      INTEGER,
    context_digest   TEXT NOT NULL DEFAULT '',
    pipeline         TEXT NOT NULL
);
-- Only the runs still running (what a restart loads): an entry goes in at submit and out at the end, so
-- the index stays a page or two that every commit rewrites, where an index of every state also took each
-- finished run at its end (two pages per commit).
DROP INDEX IF EXISTS runs_state;
CREATE INDEX IF NOT EXISTS runs_running ON runs(seq) WHERE state = 'running';

CREATE TABLE IF NOT EXISTS jobs (
    run_id      TEXT NOT NULL REFERENCES runs(id),
    name        TEXT NOT NULL,
    idx         INTEGER NOT NULL,
    spec        TEXT NOT NULL,
    state       TEXT NOT NULL,
    failure     INTEGER NOT NULL DEFAULT 0,
    reason      TEXT NOT NULL DEFAULT '',
    exit_code   INTEGER NOT NULL DEFAULT 0,
    attempts    INTEGER NOT NULL DEFAULT 0,
    attempt_id  TEXT,
    epoch       INTEGER NOT NULL DEFAULT 0,
    agent_id    TEXT,
    started_ms  INTEGER,
    finished_ms INTEGER,
    PRIMARY KEY (run_id, name)
);

CREATE TABLE IF NOT EXISTS steps (
    run_id    TEXT NOT NULL,
    job       TEXT NOT NULL,
    idx       INTEGER NOT NULL,
    state     TEXT NOT NULL,
    exit_code INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (run_id, job, idx)
);

CREATE TABLE IF NOT EXISTS attempts (
    id          TEXT PRIMARY KEY,
    run_id      TEXT NOT NULL,
    job         TEXT NOT NULL,
    agent_id    TEXT NOT NULL,
    epoch       INTEGER NOT NULL,
    state       TEXT NOT NULL,
    created_ms  INTEGER NOT NULL,
    finished_ms INTEGER,
    UNIQUE (run_id, job, epoch)
);
-- Likewise only the attempts still running.
DROP INDEX IF EXISTS attempts_state;
CREATE INDEX IF NOT EXISTS attempts_running ON attempts(id) WHERE state = 'running';

CREATE TABLE IF NOT EXISTS agents (
    id              TEXT PRIMARY KEY,
    hostname        TEXT NOT NULL,
    labels          TEXT NOT NULL,
    required_labels TEXT NOT NULL,
    capacity        INTEGER NOT NULL,
    credential_hash TEXT NOT NULL,
    revoked         INTEGER NOT NULL DEFAULT 0,
    created_ms      INTEGER NOT NULL,
    last_seen_ms    INTEGER NOT NULL DEFAULT 0
);

CREATE TABLE IF NOT EXISTS tokens (
    hash       TEXT PRIMARY KEY,
    uses_left  INTEGER NOT NULL,
    expires_ms INTEGER NOT NULL,
    labels     TEXT NOT NULL
);

CREATE TABLE IF NOT EXISTS artifacts (
    run_id     TEXT NOT NULL,
    job        TEXT NOT NULL,
    path       TEXT NOT NULL,
    digest     TEXT NOT NULL,
    size       INTEGER NOT NULL,
    mode       INTEGER NOT NULL,
    attempt_id TEXT NOT NULL,
    PRIMARY KEY (run_id, job, path)
);

-- Operator decisions about an agent's new work (pause, drain); absent means active.
CREATE TABLE IF NOT EXISTS agent_availability (
    agent_id     TEXT PRIMARY KEY,
    availability TEXT NOT NULL
);

-- API tokens for the ControlService (sha256 only) and their role: read, submit or admin.
CREATE TABLE IF NOT EXISTS api_tokens (
    hash       TEXT PRIMARY KEY,
    role       TEXT NOT NULL,
    name       TEXT NOT NULL,
    created_ms INTEGER NOT NULL
);

-- The W3C traceparent of each run's root span (only when tracing is on), so later spans join its trace.
CREATE TABLE IF NOT EXISTS run_traces (
    run_id      TEXT PRIMARY KEY,
    traceparent TEXT NOT NULL
);

-- Secrets, encrypted with ChaCha20-Poly1305 under the coordinator's secrets key; the name is the
-- associated data, so a ciphertext moved to another name does not decrypt.
CREATE TABLE IF NOT EXISTS secrets (
    name       TEXT PRIMARY KEY,
    nonce      BLOB NOT NULL,
    ciphertext BLOB NOT NULL,
    updated_ms INTEGER NOT NULL
);

-- Job caches: key -> blob (a zstd-compressed tar in the blob store), per scope (by default the run's
-- name). A key is written once and never replaced; restore-key lookups take the newest entry of a prefix.
CREATE TABLE IF NOT EXISTS caches (
    scope        TEXT NOT NULL,
    key          TEXT NOT NULL,
    digest       TEXT NOT NULL,
    size         INTEGER NOT NULL,
    created_ms   INTEGER NOT NULL,
    last_used_ms INTEGER NOT NULL,
    run_id       TEXT NOT NULL,
    job          TEXT NOT NULL,
    PRIMARY KEY (scope, key)
);
CREATE INDEX IF NOT EXISTS caches_by_digest ON caches (scope, digest);
