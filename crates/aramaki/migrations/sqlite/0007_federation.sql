-- Federation: invites, peers with their pinned keys, and the envelope ids
-- seen (replay protection).

CREATE TABLE peer_invites (
    id          TEXT PRIMARY KEY,
    secret_hash TEXT NOT NULL,
    created_by  TEXT NOT NULL,
    created_at  INTEGER NOT NULL,
    expires_at  INTEGER NOT NULL,
    used_by     TEXT,
    used_at     INTEGER
);

CREATE TABLE peers (
    instance_id TEXT PRIMARY KEY,
    name        TEXT NOT NULL,
    url         TEXT NOT NULL,
    public_key  TEXT NOT NULL,
    -- pending, active, unreachable, suspended, revoked
    state       TEXT NOT NULL,
    created_at  INTEGER NOT NULL,
    updated_at  INTEGER NOT NULL
);

CREATE TABLE federation_seen (
    id         TEXT PRIMARY KEY,
    issuer     TEXT NOT NULL,
    expires_at INTEGER NOT NULL
);
