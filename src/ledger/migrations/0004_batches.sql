-- Batches: many admissions, finishes or vouchers in one statement (one round trip, one
-- commit, one WAL flush for vouchers). An instance sends what arrived while its previous
-- batch was in flight (src/ledger/Batch.ts), so under load the hot rows (an account that
-- many requests share, a busy channel) are locked once per batch instead of once per
-- request, and batches of one instance never queue on each other's row locks.
--
-- Each item runs through the single-item function, so a batch means exactly what its items
-- run one after another mean. Items are taken in the order of the row they lock (account or
-- channel, then their place in the batch): batches of different instances lock rows in one
-- global order and cannot deadlock. Results come back with the item's index.

CREATE FUNCTION tollway_admit_many(p_items jsonb) RETURNS TABLE (
  idx            int,
  status         text,
  account_id     uuid,
  key_id         uuid,
  held           numeric,
  available      numeric,
  retry_after_ms bigint,
  rate_limit     int,
  rate_remaining int,
  other_request  uuid
) LANGUAGE plpgsql AS $$
DECLARE
  i record;
BEGIN
  FOR i IN
    SELECT (e.ordinality - 1)::int AS n, e.value AS v, decode(e.value->>'keyHash', 'hex') AS key_hash
    FROM jsonb_array_elements(p_items) WITH ORDINALITY e
    LEFT JOIN api_keys ak ON ak.hash = decode(e.value->>'keyHash', 'hex')
    ORDER BY ak.account_id NULLS FIRST, e.ordinality
  LOOP
    RETURN QUERY SELECT i.n, a.* FROM tollway_admit(
      i.key_hash, i.v->>'model', (i.v->>'stream')::boolean, (i.v->>'minTier')::int,
      (i.v->>'promptTokens')::bigint, (i.v->>'want')::numeric, (i.v->>'need')::numeric,
      i.v->>'idempotencyKey', decode(i.v->>'fingerprint', 'hex'), (i.v->>'requestId')::uuid,
      (i.v->>'leaseSeconds')::int) a;
  END LOOP;
END $$;

CREATE FUNCTION tollway_finish_many(p_items jsonb) RETURNS TABLE (
  idx     int,
  charged numeric,
  balance numeric
) LANGUAGE plpgsql AS $$
DECLARE
  i record;
BEGIN
  FOR i IN
    SELECT (e.ordinality - 1)::int AS n, e.value AS v
    FROM jsonb_array_elements(p_items) WITH ORDINALITY e
    LEFT JOIN reservations r ON r.id = (e.value->>'id')::uuid
    ORDER BY r.account_id NULLS LAST, r.channel_id NULLS LAST, e.ordinality
  LOOP
    RETURN QUERY SELECT i.n, f.* FROM tollway_finish(
      (i.v->>'id')::uuid, (i.v->>'cost')::numeric, (i.v->>'promptTokens')::int,
      (i.v->>'completionTokens')::int, i.v->>'status', (i.v->>'latencyMs')::int,
      (i.v->>'ttftMs')::int) f;
  END LOOP;
END $$;

CREATE FUNCTION tollway_accept_voucher_many(p_items jsonb) RETURNS TABLE (
  idx                 int,
  status              text,
  accepted_cumulative numeric,
  deposit             numeric,
  spent               numeric,
  reserved            numeric
) LANGUAGE plpgsql AS $$
DECLARE
  i record;
BEGIN
  FOR i IN
    SELECT (e.ordinality - 1)::int AS n, e.value AS v
    FROM jsonb_array_elements(p_items) WITH ORDINALITY e
    ORDER BY decode(e.value->>'channelId', 'hex'), e.ordinality
  LOOP
    RETURN QUERY SELECT i.n, a.* FROM tollway_accept_voucher(
      decode(i.v->>'channelId', 'hex'), (i.v->>'amount')::numeric,
      decode(i.v->>'signature', 'hex'), (i.v->>'minDelta')::numeric) a;
  END LOOP;
END $$;
