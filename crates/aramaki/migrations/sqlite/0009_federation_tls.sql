-- Whether a peer serves TLS with a certificate of its own instance key
-- (its document says so, signed): dialers then accept no other certificate.
ALTER TABLE peers ADD COLUMN tls_pinned INTEGER NOT NULL DEFAULT 0;
