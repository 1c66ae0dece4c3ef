-- Per-system roles. A grant on a system holds on everything it includes,
-- transitively. `users.role` is the instance-wide role: admin (the instance
-- admin), operator or viewer on every system, or none (grants only).
CREATE TABLE grants (
    user_id    TEXT NOT NULL REFERENCES users(id),
    system_id  TEXT NOT NULL REFERENCES systems(id),
    role       TEXT NOT NULL,
    granted_by TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    PRIMARY KEY (user_id, system_id)
);
CREATE INDEX grants_system ON grants (system_id);
