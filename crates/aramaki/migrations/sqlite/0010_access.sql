-- Access: one-time passwords expire, failed logins are throttled, refused
-- attempts are counted.

-- When the one-time password (must_change_password) stops opening anything.
ALTER TABLE users ADD COLUMN password_expires_at INTEGER;

-- Failed logins per account ('user:<name>') and per source ('addr:<ip>').
CREATE TABLE login_failures (
    key          TEXT PRIMARY KEY,
    failures     INTEGER NOT NULL,
    last_at      INTEGER NOT NULL,
    locked_until INTEGER
);

-- Refused attempts on system-scoped routes, per caller, kind, window and
-- target (up to 20 distinct targets a window, the rest under '*'); the first
-- of each is an event on the instance's timeline.
CREATE TABLE refusals (
    caller       TEXT NOT NULL,
    kind         TEXT NOT NULL,
    window_start INTEGER NOT NULL,
    target       TEXT NOT NULL,
    attempts     INTEGER NOT NULL,
    PRIMARY KEY (caller, kind, window_start, target)
);
