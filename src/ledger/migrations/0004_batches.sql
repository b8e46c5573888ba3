-- Batches: many admissions, finishes or vouchers in one statement (one round trip, one
-- commit, one WAL flush for vouchers). An instance sends what arrived while its previous
-- batch was in flight (src/ledger/Batch.ts), so under load the hot rows (an account that
-- many requests share, a busy channel) are locked once per batch instead of once per
-- request, and batches of one instance never queue on each other's row locks.
--
-- Each item runs through the single-item function, so a batch means exactly what its items
-- run one after another mean. Rows are locked in one global order (by id), so batches of
-- different instances cannot deadlock. Results come back with the item's index.

-- The API-key ledger: admissions and finishes of one instance, in one ordered stream (a
-- finish queued before a later admission of the same account runs before it, in the same
-- batch or an earlier one). Locks first, in the global order every writer follows
-- (reservations, then accounts, then channels, each by id), then runs the items in arrival
-- order.
CREATE FUNCTION tollway_ledger_many(p_items jsonb) RETURNS TABLE (
  idx            int,
  status         text,
  account_id     uuid,
  key_id         uuid,
  held           numeric,
  available      numeric,
  retry_after_ms bigint,
  rate_limit     int,
  rate_remaining int,
  other_request  uuid,
  concurrency_room int,
  charged        numeric,
  balance        numeric
) LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
  i record;
BEGIN
  PERFORM 1 FROM reservations r
    WHERE r.id IN (SELECT (e->>'id')::uuid FROM jsonb_array_elements(p_items) e WHERE e->>'op' = 'finish')
    ORDER BY r.id FOR UPDATE;
  PERFORM 1 FROM accounts a
    WHERE a.id IN (
      SELECT ak.account_id FROM jsonb_array_elements(p_items) e
        JOIN api_keys ak ON ak.hash = decode(e->>'keyHash', 'hex') WHERE e->>'op' = 'admit'
      UNION
      SELECT r.account_id FROM jsonb_array_elements(p_items) e
        JOIN reservations r ON r.id = (e->>'id')::uuid WHERE e->>'op' = 'finish')
    ORDER BY a.id FOR UPDATE;
  PERFORM 1 FROM channels c
    WHERE c.channel_id IN (
      SELECT r.channel_id FROM jsonb_array_elements(p_items) e
        JOIN reservations r ON r.id = (e->>'id')::uuid WHERE e->>'op' = 'finish')
    ORDER BY c.channel_id FOR UPDATE;
  FOR i IN
    SELECT (e.ordinality - 1)::int AS n, e.value AS v
    FROM jsonb_array_elements(p_items) WITH ORDINALITY e ORDER BY e.ordinality
  LOOP
    IF i.v->>'op' = 'admit' THEN
      RETURN QUERY SELECT i.n, a.*, NULL::numeric, NULL::numeric FROM tollway_admit(
        decode(i.v->>'keyHash', 'hex'), i.v->>'model', (i.v->>'stream')::boolean,
        (i.v->>'minTier')::int, (i.v->>'promptTokens')::bigint, (i.v->>'want')::numeric,
        (i.v->>'need')::numeric, i.v->>'idempotencyKey', decode(i.v->>'fingerprint', 'hex'),
        (i.v->>'requestId')::uuid, (i.v->>'leaseSeconds')::int) a;
    ELSE
      RETURN QUERY SELECT i.n, 'finished', NULL::uuid, NULL::uuid, NULL::numeric, NULL::numeric,
        NULL::bigint, NULL::int, NULL::int, NULL::uuid, NULL::int, f.charged, f.balance
      FROM tollway_finish(
        (i.v->>'id')::uuid, (i.v->>'cost')::numeric, (i.v->>'promptTokens')::int,
        (i.v->>'completionTokens')::int, i.v->>'status', (i.v->>'latencyMs')::int,
        (i.v->>'ttftMs')::int) f;
    END IF;
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
