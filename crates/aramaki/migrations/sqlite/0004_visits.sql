-- When each user last looked at each system's page, for the "new since your
-- last visit" marker.
CREATE TABLE visits (
    user_id   TEXT NOT NULL REFERENCES users(id),
    system_id TEXT NOT NULL REFERENCES systems(id),
    seen_at   INTEGER NOT NULL,
    PRIMARY KEY (user_id, system_id)
);
