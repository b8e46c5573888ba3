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
-- batch or an earlier one). Set-based where it counts: each account the batch touches is
-- locked once (in id order, the order every writer follows), its items run in arrival
-- order on the row held in variables, and the row is written once; reservations, usage rows
-- and credit transactions go in one multi-row statement each. This is the one
-- implementation of admission and finish for API keys: tollway_admit and
-- tollway_account_finish (called by 0002's tollway_finish) below are batches of one.
CREATE FUNCTION tollway_ledger_many(p_items jsonb) RETURNS TABLE (
  idx              int,
  status           text,
  account_id       uuid,
  key_id           uuid,
  held             numeric,
  available        numeric,
  retry_after_ms   bigint,
  rate_limit       int,
  rate_remaining   int,
  other_request    uuid,
  concurrency_room int,
  charged          numeric,
  balance          numeric,
  -- Channel finishes: the channel after the charge (for the request's receipt).
  accepted_cumulative numeric,
  spent            numeric
) LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
  ts timestamptz := clock_timestamp();
  this_month date := date_trunc('month', ts AT TIME ZONE 'UTC')::date;
  e record;   -- an item: n, op, v (the JSON), acct, kid, and for finishes the reservation
  a record;   -- the account row, locked, with its plan's limits
  cur uuid;   -- the account whose row is in the variables below
  bal numeric; res numeric; act int; tat timestamptz; mstart date; mtok bigint;
  wtok double precision; wat timestamptz; dirty boolean := false;
  period interval; new_tat timestamptz; remaining int; wallet double precision;
  amount numeric; tokens bigint; month_used bigint; idem record; ikey text;
  -- Rows to write once the loop is done.
  r_id uuid[] := '{}'; r_acct uuid[] := '{}'; r_key uuid[] := '{}'; r_model text[] := '{}';
  r_stream boolean[] := '{}'; r_held numeric[] := '{}'; r_idem text[] := '{}'; r_exp timestamptz[] := '{}';
  u_id uuid[] := '{}'; u_acct uuid[] := '{}'; u_key uuid[] := '{}'; u_model text[] := '{}';
  u_stream boolean[] := '{}'; u_pt int[] := '{}'; u_ct int[] := '{}'; u_cost numeric[] := '{}';
  u_status text[] := '{}'; u_lat int[] := '{}'; u_ttft int[] := '{}';
  c_acct uuid[] := '{}'; c_amount numeric[] := '{}'; c_req uuid[] := '{}';
  done int[] := '{}';  -- finishes handled here
  others int := 0;     -- finishes of channel reservations, or of reservations already gone
BEGIN
  PERFORM set_config('synchronous_commit', 'off', true); -- see the note at the top of 0001

  FOR e IN
    WITH items AS (
      SELECT (i.ordinality - 1)::int AS n, i.value->>'op' AS op, i.value AS v
      FROM jsonb_array_elements(p_items) WITH ORDINALITY i
    ), finished AS (
      DELETE FROM reservations r USING items
      WHERE items.op = 'finish' AND r.id = (items.v->>'id')::uuid AND r.account_id IS NOT NULL
      RETURNING items.n, r.*
    )
    SELECT items.n, items.op, items.v, ak.account_id AS acct, ak.id AS kid,
      NULL::numeric AS r_held, NULL::text AS r_model, NULL::boolean AS r_stream, NULL::text AS r_idem
    FROM items LEFT JOIN api_keys ak ON ak.hash = decode(items.v->>'keyHash', 'hex') AND ak.revoked_at IS NULL
    WHERE items.op = 'admit'
    UNION ALL
    SELECT f.n, 'finish', items.v, f.account_id, f.key_id, f.held, f.model, f.stream, f.idem_key
    FROM finished f JOIN items ON items.n = f.n
    UNION ALL
    -- Finishes of channel reservations, or of reservations already finished: counted here,
    -- run one by one after the loop.
    SELECT items.n, 'other', items.v, NULL, NULL, NULL, NULL, NULL, NULL
    FROM items WHERE items.op = 'finish' AND NOT EXISTS (SELECT 1 FROM finished f WHERE f.n = items.n)
    ORDER BY acct NULLS FIRST, n
  LOOP
    IF e.op = 'other' THEN
      others := others + 1;
      CONTINUE;
    END IF;
    IF e.acct IS NULL THEN
      -- An admission whose key is unknown or revoked.
      RETURN QUERY SELECT e.n, 'unauthorized', NULL::uuid, NULL::uuid, NULL::numeric, NULL::numeric,
        NULL::bigint, NULL::int, NULL::int, NULL::uuid, NULL::int, NULL::numeric, NULL::numeric, NULL::numeric, NULL::numeric;
      CONTINUE;
    END IF;
    IF cur IS DISTINCT FROM e.acct THEN
      IF dirty THEN
        UPDATE accounts SET balance = bal, reserved = res, active_requests = act, rate_tat = tat,
          month_start = mstart, month_tokens = mtok, wallet_tokens = wtok, wallet_at = wat
        WHERE id = cur;
      END IF;
      SELECT ac.*, pl.tier, pl.requests_per_minute, pl.max_concurrent, pl.tokens_per_month,
          pl.wallet_floor, pl.wallet_refill_per_day, pl.wallet_cap
        INTO a FROM accounts ac JOIN plans pl ON pl.name = ac.plan
        WHERE ac.id = e.acct FOR UPDATE OF ac;
      cur := e.acct; dirty := false;
      bal := a.balance; res := a.reserved; act := a.active_requests; tat := a.rate_tat;
      mstart := a.month_start; mtok := a.month_tokens; wtok := a.wallet_tokens; wat := a.wallet_at;
    END IF;

    IF e.op = 'finish' THEN
      -- Charge the cost, never more than the account can pay (its free balance plus this
      -- reservation); release the rest; count the tokens against the plan.
      amount := greatest(0, least((e.v->>'cost')::numeric, bal - res + e.r_held));
      tokens := (e.v->>'promptTokens')::bigint + (e.v->>'completionTokens')::bigint;
      bal := bal - amount; res := res - e.r_held; act := act - 1;
      mtok := CASE WHEN mstart < this_month THEN 0 ELSE mtok END + tokens;
      mstart := this_month;
      IF a.wallet_floor IS NULL THEN
        wtok := NULL; wat := NULL;
      ELSE
        wtok := greatest(0, least(a.wallet_cap::double precision,
          coalesce(wtok, a.wallet_cap) + coalesce(extract(epoch FROM ts - wat), 0) / 86400.0 * a.wallet_refill_per_day) - tokens);
        wat := ts;
      END IF;
      dirty := true; done := done || e.n;
      IF amount > 0 THEN
        c_acct := c_acct || cur; c_amount := c_amount || -amount; c_req := c_req || (e.v->>'id')::uuid;
      END IF;
      u_id := u_id || (e.v->>'id')::uuid; u_acct := u_acct || cur; u_key := u_key || e.kid;
      u_model := u_model || e.r_model; u_stream := u_stream || e.r_stream;
      u_pt := u_pt || (e.v->>'promptTokens')::int; u_ct := u_ct || (e.v->>'completionTokens')::int;
      u_cost := u_cost || amount; u_status := u_status || (e.v->>'status');
      u_lat := u_lat || (e.v->>'latencyMs')::int; u_ttft := u_ttft || (e.v->>'ttftMs')::int;
      IF e.r_idem IS NOT NULL THEN
        IF amount > 0 OR e.v->>'status' = 'ok' THEN
          UPDATE idempotency_keys SET state = 'completed' WHERE account_id = cur AND key = e.r_idem;
        ELSE
          -- Nothing was charged: the key may be used again.
          DELETE FROM idempotency_keys WHERE account_id = cur AND key = e.r_idem;
        END IF;
      END IF;
      RETURN QUERY SELECT e.n, 'finished', cur, e.kid, NULL::numeric, NULL::numeric, NULL::bigint,
        NULL::int, NULL::int, NULL::uuid, NULL::int, amount, bal, NULL::numeric, NULL::numeric;
      CONTINUE;
    END IF;

    -- An admission: tier, Idempotency-Key, concurrency, request rate (GCRA), monthly
    -- tokens, token wallet, then between need and want of the free balance.
    IF a.tier < (e.v->>'minTier')::int THEN
      RETURN QUERY SELECT e.n, 'tier', cur, e.kid, NULL::numeric, NULL::numeric, NULL::bigint,
        NULL::int, NULL::int, NULL::uuid, NULL::int, NULL::numeric, NULL::numeric, NULL::numeric, NULL::numeric;
      CONTINUE;
    END IF;
    ikey := e.v->>'idempotencyKey';
    IF ikey IS NOT NULL THEN
      SELECT * INTO idem FROM idempotency_keys ik WHERE ik.account_id = cur AND ik.key = ikey;
      IF FOUND THEN
        RETURN QUERY SELECT e.n,
          CASE WHEN idem.fingerprint <> decode(e.v->>'fingerprint', 'hex') THEN 'idempotency_mismatch'
               WHEN idem.state = 'in_progress' THEN 'idempotency_in_progress'
               ELSE 'idempotency_completed' END,
          cur, e.kid, NULL::numeric, NULL::numeric, NULL::bigint, NULL::int, NULL::int,
          idem.request_id, NULL::int, NULL::numeric, NULL::numeric, NULL::numeric, NULL::numeric;
        CONTINUE;
      END IF;
    END IF;
    IF a.max_concurrent IS NOT NULL AND act >= a.max_concurrent THEN
      RETURN QUERY SELECT e.n, 'concurrency', cur, e.kid, NULL::numeric, NULL::numeric, 1000::bigint,
        a.max_concurrent, 0, NULL::uuid, NULL::int, NULL::numeric, NULL::numeric, NULL::numeric, NULL::numeric;
      CONTINUE;
    END IF;
    new_tat := NULL; remaining := NULL;
    IF a.requests_per_minute IS NOT NULL THEN
      -- Allowed while the theoretical arrival time stays within one minute.
      period := interval '60 seconds' / a.requests_per_minute;
      new_tat := greatest(coalesce(tat, ts), ts) + period;
      IF new_tat - ts > interval '60 seconds' THEN
        RETURN QUERY SELECT e.n, 'rate', cur, e.kid, NULL::numeric, NULL::numeric,
          ceil(extract(epoch FROM (new_tat - interval '60 seconds' - ts)) * 1000)::bigint,
          a.requests_per_minute, 0, NULL::uuid, NULL::int, NULL::numeric, NULL::numeric, NULL::numeric, NULL::numeric;
        CONTINUE;
      END IF;
      remaining := floor(extract(epoch FROM (interval '60 seconds' - (new_tat - ts))) / extract(epoch FROM period))::int;
    END IF;
    month_used := CASE WHEN mstart < this_month THEN 0 ELSE mtok END;
    IF a.tokens_per_month IS NOT NULL AND month_used + (e.v->>'promptTokens')::bigint > a.tokens_per_month THEN
      RETURN QUERY SELECT e.n, 'quota', cur, e.kid, NULL::numeric, NULL::numeric,
        ceil(extract(epoch FROM ((this_month + interval '1 month') AT TIME ZONE 'UTC' - ts)) * 1000)::bigint,
        a.requests_per_minute, remaining, NULL::uuid, NULL::int, NULL::numeric, NULL::numeric, NULL::numeric, NULL::numeric;
      CONTINUE;
    END IF;
    IF a.wallet_floor IS NOT NULL THEN
      wallet := least(a.wallet_cap::double precision,
        coalesce(wtok, a.wallet_cap) + coalesce(extract(epoch FROM ts - wat), 0) / 86400.0 * a.wallet_refill_per_day);
      IF wallet < a.wallet_floor THEN
        RETURN QUERY SELECT e.n, 'wallet', cur, e.kid, NULL::numeric, NULL::numeric,
          ceil((a.wallet_floor - wallet) / a.wallet_refill_per_day * 86400000.0)::bigint,
          a.requests_per_minute, remaining, NULL::uuid, NULL::int, NULL::numeric, NULL::numeric, NULL::numeric, NULL::numeric;
        CONTINUE;
      END IF;
    END IF;
    IF bal - res < (e.v->>'need')::numeric THEN
      RETURN QUERY SELECT e.n, 'insufficient', cur, e.kid, NULL::numeric, bal - res, NULL::bigint,
        a.requests_per_minute, remaining, NULL::uuid, NULL::int, NULL::numeric, NULL::numeric, NULL::numeric, NULL::numeric;
      CONTINUE;
    END IF;
    amount := least((e.v->>'want')::numeric, bal - res);
    res := res + amount; act := act + 1; tat := coalesce(new_tat, tat); dirty := true;
    r_id := r_id || (e.v->>'requestId')::uuid; r_acct := r_acct || cur; r_key := r_key || e.kid;
    r_model := r_model || (e.v->>'model'); r_stream := r_stream || (e.v->>'stream')::boolean;
    r_held := r_held || amount; r_idem := r_idem || ikey;
    r_exp := r_exp || (ts + make_interval(secs => (e.v->>'leaseSeconds')::int));
    IF ikey IS NOT NULL THEN
      INSERT INTO idempotency_keys (account_id, key, fingerprint, request_id, state)
        VALUES (cur, ikey, decode(e.v->>'fingerprint', 'hex'), (e.v->>'requestId')::uuid, 'in_progress');
    END IF;
    RETURN QUERY SELECT e.n, 'ok', cur, e.kid, amount, bal - res, NULL::bigint,
      a.requests_per_minute, remaining, NULL::uuid, a.max_concurrent - act, NULL::numeric, NULL::numeric, NULL::numeric, NULL::numeric;
  END LOOP;
  IF dirty THEN
    UPDATE accounts SET balance = bal, reserved = res, active_requests = act, rate_tat = tat,
      month_start = mstart, month_tokens = mtok, wallet_tokens = wtok, wallet_at = wat
    WHERE id = cur;
  END IF;

  -- Only tables with rows to write are touched (an empty INSERT still takes the table's lock).
  IF cardinality(r_id) > 0 THEN
    INSERT INTO reservations (id, account_id, key_id, model, stream, held, idem_key, expires_at)
      SELECT * FROM unnest(r_id, r_acct, r_key, r_model, r_stream, r_held, r_idem, r_exp);
  END IF;
  IF cardinality(c_acct) > 0 THEN
    INSERT INTO credit_transactions (account_id, amount, kind, request_id)
      SELECT x.a, x.amt, 'usage', x.req FROM unnest(c_acct, c_amount, c_req) x(a, amt, req);
  END IF;
  IF cardinality(u_id) > 0 THEN
    INSERT INTO usage (id, account_id, key_id, model, stream, prompt_tokens, completion_tokens, cost, status, latency_ms, ttft_ms)
      SELECT * FROM unnest(u_id, u_acct, u_key, u_model, u_stream, u_pt, u_ct, u_cost, u_status, u_lat, u_ttft);
  END IF;

  -- Finishes of channel reservations (and of reservations already finished): one by one.
  IF others = 0 THEN RETURN; END IF;
  -- Channel rows commit synchronously (0001's note): this statement then does too.
  PERFORM set_config('synchronous_commit', 'on', true);
  RETURN QUERY SELECT (i.ordinality - 1)::int, 'finished', NULL::uuid, NULL::uuid, NULL::numeric,
      NULL::numeric, NULL::bigint, NULL::int, NULL::int, NULL::uuid, NULL::int, f.charged, f.balance, f.accepted_cumulative, f.spent
    FROM jsonb_array_elements(p_items) WITH ORDINALITY i,
      LATERAL tollway_finish((i.value->>'id')::uuid, (i.value->>'cost')::numeric,
        (i.value->>'promptTokens')::int, (i.value->>'completionTokens')::int, i.value->>'status',
        (i.value->>'latencyMs')::int, (i.value->>'ttftMs')::int) f
    WHERE i.value->>'op' = 'finish'
      AND NOT ((i.ordinality - 1)::int = ANY (done));
END $$;
-- Its statements take a JSON parameter whose size does not change their plans: planning them
-- on every call (a custom plan) cost more than running them.
ALTER FUNCTION tollway_ledger_many(jsonb) SET plan_cache_mode = force_generic_plan;

-- The single-item forms, as batches of one, so admission and finish have one implementation.
CREATE FUNCTION tollway_admit(
  p_key_hash bytea,
  p_model text,
  p_stream boolean,
  p_min_tier int,
  p_prompt_tokens bigint,
  p_want numeric,
  p_need numeric,
  p_idem_key text,
  p_fingerprint bytea,
  p_request_id uuid,
  p_lease_seconds int
) RETURNS TABLE (
  status         text,
  account_id     uuid,
  key_id         uuid,
  held           numeric,
  available      numeric,
  retry_after_ms bigint,
  rate_limit     int,
  rate_remaining int,
  other_request  uuid,
  concurrency_room int
) LANGUAGE sql AS $$
  SELECT status, account_id, key_id, held, available, retry_after_ms, rate_limit, rate_remaining,
    other_request, concurrency_room
  FROM tollway_ledger_many(jsonb_build_array(jsonb_build_object(
    'op', 'admit', 'keyHash', encode(p_key_hash, 'hex'), 'model', p_model, 'stream', p_stream,
    'minTier', p_min_tier, 'promptTokens', p_prompt_tokens, 'want', p_want::text,
    'need', p_need::text, 'idempotencyKey', p_idem_key, 'fingerprint', encode(p_fingerprint, 'hex'),
    'requestId', p_request_id, 'leaseSeconds', p_lease_seconds)))
$$;

CREATE FUNCTION tollway_account_finish(
  p_id uuid,
  p_cost numeric,
  p_prompt_tokens int,
  p_completion_tokens int,
  p_status text,
  p_latency_ms int,
  p_ttft_ms int
) RETURNS TABLE (charged numeric, balance numeric) LANGUAGE sql AS $$
  SELECT charged, balance
  FROM tollway_ledger_many(jsonb_build_array(jsonb_build_object(
    'op', 'finish', 'id', p_id, 'cost', p_cost::text, 'promptTokens', p_prompt_tokens,
    'completionTokens', p_completion_tokens, 'status', p_status, 'latencyMs', p_latency_ms,
    'ttftMs', p_ttft_ms)))
$$;

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

-- Admissions of requests paid from channels, several in one statement (and one durable
-- commit): each item through tollway_channel_admit, channels locked in id order.
CREATE FUNCTION tollway_channel_admit_many(p_items jsonb) RETURNS TABLE (
  idx                 int,
  status              text,
  held                numeric,
  available           numeric,
  accepted_cumulative numeric,
  deposit             numeric,
  spent               numeric,
  other_request       uuid
) LANGUAGE plpgsql AS $$
DECLARE
  i record;
BEGIN
  FOR i IN
    SELECT (e.ordinality - 1)::int AS n, e.value AS v
    FROM jsonb_array_elements(p_items) WITH ORDINALITY e
    ORDER BY decode(e.value->>'channelId', 'hex'), e.ordinality
  LOOP
    RETURN QUERY SELECT i.n, a.* FROM tollway_channel_admit(
      decode(i.v->>'channelId', 'hex'), i.v->>'model', (i.v->>'stream')::boolean,
      (i.v->>'want')::numeric, (i.v->>'need')::numeric, (i.v->>'requestId')::uuid,
      (i.v->>'leaseSeconds')::int, i.v->>'idempotencyKey', decode(i.v->>'fingerprint', 'hex')) a;
  END LOOP;
END $$;
