-- Access: one-time passwords expire, failed logins are throttled, refused
-- attempts are counted.

-- When the one-time password (must_change_password) stops opening anything.
ALTER TABLE users ADD COLUMN password_expires_at BIGINT;

-- Failed logins per account ('user:<name>') and per source ('addr:<ip>').
CREATE TABLE login_failures (
    key          TEXT PRIMARY KEY,
    failures     BIGINT NOT NULL,
    last_at      BIGINT NOT NULL,
    locked_until BIGINT
);

-- Refused attempts on system-scoped routes, per caller, kind, window and
-- target (up to 20 distinct targets a window, the rest under '*'); the first
-- of each is an event on the instance's timeline.
CREATE TABLE refusals (
    caller       TEXT NOT NULL,
    kind         TEXT NOT NULL,
    window_start BIGINT NOT NULL,
    target       TEXT NOT NULL,
    attempts     BIGINT NOT NULL,
    PRIMARY KEY (caller, kind, window_start, target)
);
