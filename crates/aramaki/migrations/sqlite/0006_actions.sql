-- Actions: definitions on systems, runs and their per-agent targets
-- (issue: actions — flush the cache at 3am).

CREATE TABLE actions (
    id         TEXT PRIMARY KEY,
    system_id  TEXT NOT NULL REFERENCES systems(id),
    name       TEXT NOT NULL,
    spec       TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    updated_at INTEGER NOT NULL,
    UNIQUE (system_id, name)
);

CREATE TABLE action_runs (
    id              TEXT PRIMARY KEY,
    action_id       TEXT NOT NULL REFERENCES actions(id),
    system_id       TEXT NOT NULL REFERENCES systems(id),
    actor           TEXT NOT NULL,
    params          TEXT NOT NULL,
    override_reason TEXT,
    -- running, succeeded, failed, cancelled
    state           TEXT NOT NULL,
    started_at      INTEGER NOT NULL,
    finished_at     INTEGER
);
CREATE INDEX action_runs_action ON action_runs (action_id, started_at);

CREATE TABLE action_run_targets (
    run_id      TEXT NOT NULL REFERENCES action_runs(id),
    agent_id    TEXT NOT NULL REFERENCES agents(id),
    -- sent, running, succeeded, failed, cancelled, timed_out, refused, unreachable
    state       TEXT NOT NULL,
    exit_code   INTEGER,
    output      TEXT NOT NULL DEFAULT '',
    output_size INTEGER NOT NULL DEFAULT 0,
    message     TEXT NOT NULL DEFAULT '',
    finished_at INTEGER,
    PRIMARY KEY (run_id, agent_id)
);
CREATE INDEX action_run_targets_agent ON action_run_targets (agent_id, state);
