-- The agent queue incarnations the server has committed records of (JSON
-- list, newest last, bounded): a restored agent's new records under used
-- numbers are told apart from replays by them.
ALTER TABLE agents ADD COLUMN queue_incarnations TEXT NOT NULL DEFAULT '[]';
