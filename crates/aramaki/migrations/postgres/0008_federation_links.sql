-- Federation, part two: the per-peer outbox and cursors, use relations
-- between instances, the systems mirrored from peers, and key history.

-- Sequence numbers per peer: the last one queued for it (out_seq) and the
-- last one received from it and committed (in_seq, its cursor).
ALTER TABLE peers ADD COLUMN out_seq BIGINT NOT NULL DEFAULT 0;
ALTER TABLE peers ADD COLUMN in_seq BIGINT NOT NULL DEFAULT 0;
-- Last time a link to the peer was up.
ALTER TABLE peers ADD COLUMN last_seen_at BIGINT;

-- Messages for a peer, until it acknowledges them.
CREATE TABLE federation_outbox (
    peer_id    TEXT NOT NULL,
    seq        BIGINT NOT NULL,
    kind       TEXT NOT NULL,
    body       TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    PRIMARY KEY (peer_id, seq)
);

-- One row per use relation on each side: the consumer asked (role
-- consumer) or was asked (role provider). The id is the consumer's.
CREATE TABLE uses (
    peer_id       TEXT NOT NULL,
    id            TEXT NOT NULL,
    role          TEXT NOT NULL,
    -- The slug asked for, as the provider knows it.
    system_slug   TEXT NOT NULL,
    -- Provider: the local system used. Consumer: the local mirror, once accepted.
    system_id     TEXT,
    -- requested (consumer), pending (provider), accepted, rejected, ended
    state         TEXT NOT NULL,
    -- status or timeline
    level         TEXT NOT NULL,
    subsystems    BIGINT NOT NULL DEFAULT 1,
    handbook      BIGINT NOT NULL DEFAULT 0,
    contacts      BIGINT NOT NULL DEFAULT 0,
    requested_by  TEXT NOT NULL,
    decided_by    TEXT,
    created_at    BIGINT NOT NULL,
    updated_at    BIGINT NOT NULL,
    PRIMARY KEY (peer_id, id)
);
CREATE INDEX uses_state ON uses (role, state);

-- A provider's standing answer: requests from this peer for this system
-- are accepted at once, with this exposure.
CREATE TABLE use_policies (
    system_id  TEXT NOT NULL,
    peer_id    TEXT NOT NULL,
    level      TEXT NOT NULL,
    subsystems BIGINT NOT NULL DEFAULT 1,
    handbook   BIGINT NOT NULL DEFAULT 0,
    contacts   BIGINT NOT NULL DEFAULT 0,
    created_at BIGINT NOT NULL,
    PRIMARY KEY (system_id, peer_id)
);

-- Systems mirrored from a peer (read-only here), by their id there.
CREATE TABLE remote_systems (
    system_id TEXT PRIMARY KEY,
    peer_id   TEXT NOT NULL,
    remote_id TEXT NOT NULL,
    use_id    TEXT NOT NULL,
    UNIQUE (peer_id, remote_id)
);

-- This instance's keys: the current one and those it retired, each with
-- the previous key's signature over it (the rotation proof).
CREATE TABLE instance_keys (
    public_key TEXT PRIMARY KEY,
    proof      TEXT,
    created_at BIGINT NOT NULL,
    retired_at BIGINT
);

-- Keys peers used before they rotated: they verify history only.
CREATE TABLE peer_keys (
    peer_id    TEXT NOT NULL,
    public_key TEXT NOT NULL,
    retired_at BIGINT NOT NULL,
    PRIMARY KEY (peer_id, public_key)
);
