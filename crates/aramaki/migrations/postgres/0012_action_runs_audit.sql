-- Actions (issue 13): the timeout a run asked for and the one each agent
-- applied (its local configuration caps it), and who cancelled a run.

ALTER TABLE action_runs ADD COLUMN timeout_secs BIGINT;
ALTER TABLE action_runs ADD COLUMN cancelled_by TEXT;
ALTER TABLE action_runs ADD COLUMN cancelled_at BIGINT;
ALTER TABLE action_run_targets ADD COLUMN timeout_secs BIGINT;
