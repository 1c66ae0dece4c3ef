-- Sequence epochs: the numbering of messages to and from a peer is only
-- meaningful within an epoch. A side that finds the numbering broken (its
-- peer holds numbers it never gave, or resumes after messages already
-- trimmed: a restored backup) starts a new epoch from 1 with fresh
-- snapshots. out_epoch is ours for the messages we send the peer; in_epoch
-- is the peer's for the messages counted by in_seq.
ALTER TABLE peers ADD COLUMN out_epoch TEXT NOT NULL DEFAULT '';
ALTER TABLE peers ADD COLUMN in_epoch TEXT NOT NULL DEFAULT '';
-- Each message carries a random mark: the receiver keeps the mark of the
-- last one it committed (in_mark), the sender the mark of the last one
-- acknowledged (acked_seq, acked_mark). The same number with another mark
-- is another message: the numbering diverged.
ALTER TABLE federation_outbox ADD COLUMN mark TEXT NOT NULL DEFAULT '';
ALTER TABLE peers ADD COLUMN in_mark TEXT NOT NULL DEFAULT '';
ALTER TABLE peers ADD COLUMN acked_seq INTEGER NOT NULL DEFAULT 0;
ALTER TABLE peers ADD COLUMN acked_mark TEXT NOT NULL DEFAULT '';
-- The last time the numbering with the peer was found broken, and why.
ALTER TABLE peers ADD COLUMN resynced_at INTEGER;
ALTER TABLE peers ADD COLUMN resync_reason TEXT;
-- When the peer told us, signed, that it suspended this instance (cleared
-- when a link comes up again).
ALTER TABLE peers ADD COLUMN suspended_by_peer_at INTEGER;
