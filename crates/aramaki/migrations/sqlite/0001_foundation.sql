-- Foundation: instance, categories, systems, inclusions, timeline, users, tokens.
-- Portable conventions (shared with the PostgreSQL set): ids are UUIDv7 text,
-- times are BIGINT microseconds since the Unix epoch (UTC), booleans are
-- INTEGER 0/1, JSON is TEXT.

CREATE TABLE instance (
    id          TEXT PRIMARY KEY,
    name        TEXT NOT NULL,
    public_key  TEXT NOT NULL,
    -- The system that stands for this instance: its audit trail lives there.
    system_id   TEXT,
    created_at  INTEGER NOT NULL
);

CREATE TABLE categories (
    name        TEXT PRIMARY KEY,
    title       TEXT NOT NULL,
    description TEXT NOT NULL DEFAULT '',
    builtin     INTEGER NOT NULL DEFAULT 0,
    created_at  INTEGER NOT NULL
);

INSERT INTO categories (name, title, description, builtin, created_at) VALUES
    ('infrastructure', 'Infrastructure', 'Data centers, storage and compute clusters, networks.', 1, 0),
    ('service', 'Service', 'Shared services: databases, caches, mail, queues.', 1, 0),
    ('project', 'Project', 'Customer or internal projects.', 1, 0),
    ('environment', 'Environment', 'Staging, production and other environments of a project.', 1, 0),
    ('host', 'Host', 'Machines, virtual or physical.', 1, 0);

CREATE TABLE systems (
    id          TEXT PRIMARY KEY,
    slug        TEXT NOT NULL,
    title       TEXT NOT NULL,
    category    TEXT NOT NULL REFERENCES categories(name),
    description TEXT NOT NULL DEFAULT '',
    handbook    TEXT NOT NULL DEFAULT '',
    links       TEXT NOT NULL DEFAULT '[]',
    contacts    TEXT NOT NULL DEFAULT '[]',
    selector    TEXT,
    instance_id TEXT NOT NULL,
    version     INTEGER NOT NULL DEFAULT 1,
    created_at  INTEGER NOT NULL,
    updated_at  INTEGER NOT NULL,
    deleted_at  INTEGER
);
CREATE UNIQUE INDEX systems_live_slug ON systems (slug) WHERE deleted_at IS NULL;
CREATE INDEX systems_category ON systems (category);

CREATE TABLE system_labels (
    system_id TEXT NOT NULL REFERENCES systems(id),
    key       TEXT NOT NULL,
    value     TEXT NOT NULL,
    PRIMARY KEY (system_id, key)
);
CREATE INDEX system_labels_kv ON system_labels (key, value);

CREATE TABLE inclusions (
    parent_id  TEXT NOT NULL REFERENCES systems(id),
    child_id   TEXT NOT NULL REFERENCES systems(id),
    created_at INTEGER NOT NULL,
    PRIMARY KEY (parent_id, child_id)
);
CREATE INDEX inclusions_child ON inclusions (child_id);

-- The timeline, and the outbox: `seq` orders events by commit, subscribers
-- follow it by cursor.
CREATE TABLE events (
    seq          INTEGER PRIMARY KEY AUTOINCREMENT,
    id           TEXT NOT NULL UNIQUE,
    system_id    TEXT NOT NULL REFERENCES systems(id),
    occurred_at  INTEGER NOT NULL,
    recorded_at  INTEGER NOT NULL,
    kind         TEXT NOT NULL,
    severity     INTEGER NOT NULL,
    title        TEXT NOT NULL,
    body         TEXT NOT NULL DEFAULT '',
    actor_kind   TEXT NOT NULL,
    actor_id     TEXT,
    actor_name   TEXT NOT NULL,
    data         TEXT NOT NULL DEFAULT '{}',
    origin       TEXT NOT NULL,
    caused_by    TEXT,
    idem_scope   TEXT,
    idem_key     TEXT,
    idem_hash    TEXT
);
-- A timeline page is a merge of short newest-first probes, one per system
-- (and per kind and severity when filtered); each probe is one index range.
CREATE INDEX events_system_time ON events (system_id, occurred_at, id);
CREATE INDEX events_system_severity ON events (system_id, severity, occurred_at, id);
CREATE INDEX events_system_kind ON events (system_id, kind, severity, occurred_at, id);
CREATE INDEX events_time ON events (occurred_at, id);
CREATE UNIQUE INDEX events_idempotency ON events (idem_scope, idem_key);

-- The latest state per (system, source), written with the state event that
-- set it; the decomposed status reads it.
CREATE TABLE system_states (
    system_id TEXT NOT NULL REFERENCES systems(id),
    source    TEXT NOT NULL,
    severity  INTEGER NOT NULL,
    summary   TEXT NOT NULL,
    event_id  TEXT NOT NULL,
    since     INTEGER NOT NULL,
    PRIMARY KEY (system_id, source)
);

CREATE TABLE subscriber_cursors (
    name       TEXT PRIMARY KEY,
    seq        INTEGER NOT NULL,
    updated_at INTEGER NOT NULL
);

CREATE TABLE users (
    id                   TEXT PRIMARY KEY,
    username             TEXT NOT NULL UNIQUE,
    display_name         TEXT NOT NULL,
    password_hash        TEXT NOT NULL,
    must_change_password INTEGER NOT NULL DEFAULT 0,
    role                 TEXT NOT NULL,
    created_at           INTEGER NOT NULL,
    disabled_at          INTEGER
);

CREATE TABLE api_tokens (
    id           TEXT PRIMARY KEY,
    user_id      TEXT NOT NULL REFERENCES users(id),
    name         TEXT NOT NULL,
    prefix       TEXT NOT NULL UNIQUE,
    secret_hash  TEXT NOT NULL,
    created_at   INTEGER NOT NULL,
    last_used_at INTEGER,
    expires_at   INTEGER,
    revoked_at   INTEGER
);
CREATE INDEX api_tokens_user ON api_tokens (user_id);
