-- Agents, their enrollment tokens, check definitions, observations and
-- their history (issue: the agent and monitoring).

-- One-time (or reusable) enrollment tokens; the secret is stored hashed.
CREATE TABLE agent_tokens (
    id          TEXT PRIMARY KEY,
    secret_hash TEXT NOT NULL,
    system_id   TEXT NOT NULL REFERENCES systems(id),
    reusable    INTEGER NOT NULL,
    created_by  TEXT NOT NULL,
    created_at  INTEGER NOT NULL,
    expires_at  INTEGER NOT NULL,
    uses        INTEGER NOT NULL DEFAULT 0,
    last_used_at INTEGER,
    revoked_at  INTEGER
);

CREATE TABLE agents (
    id            TEXT PRIMARY KEY,
    name          TEXT NOT NULL UNIQUE,
    system_id     TEXT NOT NULL REFERENCES systems(id),
    public_key    TEXT NOT NULL,
    version       TEXT NOT NULL DEFAULT '',
    subscriptions TEXT NOT NULL DEFAULT '[]',
    -- Inventory facts the agent reported (JSON object).
    facts         TEXT NOT NULL DEFAULT '{}',
    token_id      TEXT NOT NULL,
    enrolled_at   INTEGER NOT NULL,
    last_seen     INTEGER,
    -- Highest record sequence committed: the deduplication mark.
    acked_seq     INTEGER NOT NULL DEFAULT 0,
    queue_depth   INTEGER NOT NULL DEFAULT 0,
    dropped       INTEGER NOT NULL DEFAULT 0,
    -- Keepalive verdict last recorded: unknown, ok, warning or critical.
    keepalive     TEXT NOT NULL DEFAULT 'unknown',
    -- Set by an admin to let this agent enroll again with a new key.
    reenroll      INTEGER NOT NULL DEFAULT 0,
    revoked_at    INTEGER
);

CREATE TABLE checks (
    id         TEXT PRIMARY KEY,
    name       TEXT NOT NULL UNIQUE,
    spec       TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    updated_at INTEGER NOT NULL
);

-- The latest result per (system, check, labels).
CREATE TABLE observations (
    system_id    TEXT NOT NULL REFERENCES systems(id),
    check_name   TEXT NOT NULL,
    labels_key   TEXT NOT NULL,
    labels       TEXT NOT NULL,
    status       INTEGER NOT NULL,
    -- The state that counts (after the occurrences threshold).
    state        TEXT NOT NULL,
    output       TEXT NOT NULL,
    metrics      TEXT NOT NULL,
    agent_id     TEXT,
    executed_at  INTEGER NOT NULL,
    received_at  INTEGER NOT NULL,
    -- Consecutive results with this status.
    occurrences  INTEGER NOT NULL,
    state_since  INTEGER NOT NULL,
    -- Dead-man's switch: CRITICAL when nothing arrives before this.
    ttl_deadline INTEGER,
    PRIMARY KEY (system_id, check_name, labels_key)
);
CREATE INDEX observations_ttl ON observations (ttl_deadline) WHERE ttl_deadline IS NOT NULL;

CREATE TABLE observation_history (
    id          INTEGER PRIMARY KEY,
    system_id   TEXT NOT NULL,
    check_name  TEXT NOT NULL,
    labels_key  TEXT NOT NULL,
    status      INTEGER NOT NULL,
    output      TEXT NOT NULL,
    metrics     TEXT NOT NULL,
    agent_id    TEXT,
    agent_seq   INTEGER,
    executed_at INTEGER NOT NULL,
    received_at INTEGER NOT NULL
);
CREATE INDEX observation_history_key ON observation_history (system_id, check_name, labels_key, executed_at);
CREATE INDEX observation_history_age ON observation_history (received_at);
