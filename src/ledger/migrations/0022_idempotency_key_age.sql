-- Completed Idempotency-Keys are forgotten once older than the configured window
-- (`idempotencyWindowSeconds`, IdempotencyKeys.ts): the prune takes them oldest first, a chunk
-- at a time, and without an index on their age each chunk read the whole table (a backlog of
-- N keys cost N/chunk full scans). On `created_at` alone, not a partial index on completed
-- keys: `state` stays out of every index, so a key's completion (an UPDATE of `state`) can
-- still be a HOT update, and an admission with a key writes one index entry more.
CREATE INDEX IF NOT EXISTS idempotency_keys_created ON idempotency_keys (created_at);
CREATE INDEX IF NOT EXISTS channel_idempotency_keys_created ON channel_idempotency_keys (created_at);
