-- Channel charges, many in one statement, the way tollway_ledger_many charges accounts.
--
-- A batch of channel charges went through tollway_finish one item at a time: about seven
-- statements an item (the reservation, the channel locked, updated, the usage row, ...), a
-- millisecond of PostgreSQL a paid request on the 2-core development box. Here the
-- reservations go in one DELETE, each channel is locked once (in id order, the order channel
-- admissions and vouchers lock them in, so batches under way together cannot deadlock), the
-- items run in order on the channel's balances held in variables, and the channels and the
-- usage rows are written once each. The outcome is the one tollway_finish gives item by
-- item. Channel rows commit synchronously (0001's note): this statement does too.
--
-- Items: {"id", "cost", "promptTokens", "completionTokens", "status", "latencyMs", "ttftMs"}.
-- An item whose reservation is gone, or is an account's, returns no row.
CREATE FUNCTION tollway_channel_finish_many(p_items jsonb) RETURNS TABLE (
  idx                 int,
  charged             numeric,
  balance             numeric,
  accepted_cumulative numeric,
  spent               numeric
) LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
  e record;
  cur bytea;  -- the channel whose balances are in the variables below
  acc numeric; sp numeric; res numeric;
  amount numeric;
  c_id bytea[] := '{}'; c_spent numeric[] := '{}'; c_reserved numeric[] := '{}';
  u_id uuid[] := '{}'; u_channel bytea[] := '{}'; u_model text[] := '{}'; u_stream boolean[] := '{}';
  u_pt int[] := '{}'; u_ct int[] := '{}'; u_cost numeric[] := '{}'; u_status text[] := '{}';
  u_lat int[] := '{}'; u_ttft int[] := '{}';
BEGIN
  FOR e IN
    WITH items AS (
      SELECT (i.ordinality - 1)::int AS n, i.value AS v
      FROM jsonb_array_elements(p_items) WITH ORDINALITY i
    ), gone AS (
      DELETE FROM reservations r USING items
      WHERE r.id = (items.v->>'id')::uuid AND r.channel_id IS NOT NULL
      RETURNING items.n, items.v, r.id, r.channel_id, r.model, r.stream, r.held, r.idem_key
    )
    SELECT * FROM gone ORDER BY channel_id, n
  LOOP
    IF cur IS DISTINCT FROM e.channel_id THEN
      IF cur IS NOT NULL THEN
        c_id := c_id || cur; c_spent := c_spent || sp; c_reserved := c_reserved || res;
      END IF;
      SELECT ch.accepted_cumulative, ch.spent, ch.reserved INTO acc, sp, res
        FROM channels ch WHERE ch.channel_id = e.channel_id FOR UPDATE;
      cur := e.channel_id;
    END IF;
    -- As tollway_channel_finish: never more than the channel's free balance plus this hold.
    amount := greatest(0, least((e.v->>'cost')::numeric, acc - sp - res + e.held));
    sp := sp + amount; res := res - e.held;
    u_id := u_id || e.id; u_channel := u_channel || e.channel_id; u_model := u_model || e.model;
    u_stream := u_stream || e.stream; u_pt := u_pt || (e.v->>'promptTokens')::int;
    u_ct := u_ct || (e.v->>'completionTokens')::int; u_cost := u_cost || amount;
    u_status := u_status || (e.v->>'status'); u_lat := u_lat || (e.v->>'latencyMs')::int;
    u_ttft := u_ttft || (e.v->>'ttftMs')::int;
    IF e.idem_key IS NOT NULL THEN
      IF amount > 0 OR e.v->>'status' = 'ok' THEN
        UPDATE channel_idempotency_keys SET state = 'completed'
          WHERE channel_id = e.channel_id AND key = e.idem_key;
      ELSE
        -- Nothing was charged: the key may be used again.
        DELETE FROM channel_idempotency_keys WHERE channel_id = e.channel_id AND key = e.idem_key;
      END IF;
    END IF;
    idx := e.n; charged := amount; balance := acc - sp; accepted_cumulative := acc; spent := sp;
    RETURN NEXT;
  END LOOP;
  IF cur IS NULL THEN RETURN; END IF;
  c_id := c_id || cur; c_spent := c_spent || sp; c_reserved := c_reserved || res;

  UPDATE channels ch SET spent = x.sp, reserved = x.res
    FROM unnest(c_id, c_spent, c_reserved) x(id, sp, res) WHERE ch.channel_id = x.id;
  INSERT INTO usage (id, channel_id, model, stream, prompt_tokens, completion_tokens, cost, status, latency_ms, ttft_ms)
    SELECT * FROM unnest(u_id, u_channel, u_model, u_stream, u_pt, u_ct, u_cost, u_status, u_lat, u_ttft);
END $$;
ALTER FUNCTION tollway_channel_finish_many(jsonb) SET plan_cache_mode = force_generic_plan;

-- Channel admissions, many in one statement, the same way: the channels locked at once (in id
-- order), the items run in order on each channel's reservation total held in a variable, and
-- the channels and the reservations written once each. 0004's version called
-- tollway_channel_admit per item (four statements an item, 0.6 ms of PostgreSQL on the
-- development box). The outcome is the one tollway_channel_admit gives item by item; the
-- gateway sends a lone admission here too, so this is the one implementation in use.
CREATE OR REPLACE FUNCTION tollway_channel_admit_many(p_items jsonb) RETURNS TABLE (
  idx                 int,
  status              text,
  held                numeric,
  available           numeric,
  accepted_cumulative numeric,
  deposit             numeric,
  spent               numeric,
  other_request       uuid
) LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
  e record;
  cur bytea;  -- the channel whose reservation total and active stream are below
  res numeric; active uuid; dirty boolean := false;
  free numeric; amount numeric; idem record; ikey text;
  c_id bytea[] := '{}'; c_reserved numeric[] := '{}'; c_active uuid[] := '{}';
  r_id uuid[] := '{}'; r_channel bytea[] := '{}'; r_model text[] := '{}'; r_stream boolean[] := '{}';
  r_held numeric[] := '{}'; r_idem text[] := '{}'; r_exp timestamptz[] := '{}';
  ts timestamptz := clock_timestamp();
BEGIN
  PERFORM 1 FROM channels
    WHERE channel_id IN (SELECT decode(i.value->>'channelId', 'hex') FROM jsonb_array_elements(p_items) i)
    ORDER BY channel_id FOR UPDATE;
  FOR e IN
    SELECT (i.ordinality - 1)::int AS n, i.value AS v, decode(i.value->>'channelId', 'hex') AS id,
      ch.channel_id AS found, ch.accepted_cumulative AS acc, ch.deposit AS dep, ch.spent AS sp,
      ch.reserved AS reserved0, ch.active_stream AS active0, ch.finalized,
      ch.close_requested_at IS NOT NULL AS closing
    FROM jsonb_array_elements(p_items) WITH ORDINALITY i
      LEFT JOIN channels ch ON ch.channel_id = decode(i.value->>'channelId', 'hex')
    ORDER BY decode(i.value->>'channelId', 'hex'), i.ordinality
  LOOP
    idx := e.n; held := NULL; available := NULL; other_request := NULL;
    accepted_cumulative := e.acc; deposit := e.dep; spent := e.sp;
    IF e.found IS NULL THEN
      status := 'not_found'; accepted_cumulative := NULL; deposit := NULL; spent := NULL;
      RETURN NEXT;
      CONTINUE;
    END IF;
    IF cur IS DISTINCT FROM e.id THEN
      IF dirty THEN
        c_id := c_id || cur; c_reserved := c_reserved || res; c_active := c_active || active;
      END IF;
      cur := e.id; res := e.reserved0; active := e.active0; dirty := false;
    END IF;
    IF e.finalized OR e.closing THEN
      status := CASE WHEN e.finalized THEN 'finalized' ELSE 'close_requested' END;
      RETURN NEXT;
      CONTINUE;
    END IF;
    ikey := e.v->>'idempotencyKey';
    IF ikey IS NOT NULL THEN
      SELECT * INTO idem FROM channel_idempotency_keys ik WHERE ik.channel_id = e.id AND ik.key = ikey;
      IF FOUND THEN
        status := CASE WHEN idem.fingerprint <> decode(e.v->>'fingerprint', 'hex') THEN 'idempotency_mismatch'
                       WHEN idem.state = 'in_progress' THEN 'idempotency_in_progress'
                       ELSE 'idempotency_completed' END;
        other_request := idem.request_id;
        RETURN NEXT;
        CONTINUE;
      END IF;
    END IF;
    free := e.acc - e.sp - res;
    IF free < (e.v->>'need')::numeric THEN
      status := 'insufficient'; available := free;
      RETURN NEXT;
      CONTINUE;
    END IF;
    amount := least((e.v->>'want')::numeric, free);
    res := res + amount; dirty := true;
    IF (e.v->>'stream')::boolean THEN active := (e.v->>'requestId')::uuid; END IF;
    r_id := r_id || (e.v->>'requestId')::uuid; r_channel := r_channel || e.id;
    r_model := r_model || (e.v->>'model'); r_stream := r_stream || (e.v->>'stream')::boolean;
    r_held := r_held || amount; r_idem := r_idem || ikey;
    r_exp := r_exp || (ts + make_interval(secs => (e.v->>'leaseSeconds')::int));
    IF ikey IS NOT NULL THEN
      INSERT INTO channel_idempotency_keys (channel_id, key, fingerprint, request_id, state)
        VALUES (e.id, ikey, decode(e.v->>'fingerprint', 'hex'), (e.v->>'requestId')::uuid, 'in_progress');
    END IF;
    status := 'ok'; held := amount; available := free - amount;
    RETURN NEXT;
  END LOOP;
  IF dirty THEN
    c_id := c_id || cur; c_reserved := c_reserved || res; c_active := c_active || active;
  END IF;
  IF cardinality(c_id) > 0 THEN
    UPDATE channels ch SET reserved = x.res, active_stream = x.active
      FROM unnest(c_id, c_reserved, c_active) x(id, res, active) WHERE ch.channel_id = x.id;
    INSERT INTO reservations (id, channel_id, model, stream, held, idem_key, expires_at)
      SELECT * FROM unnest(r_id, r_channel, r_model, r_stream, r_held, r_idem, r_exp);
  END IF;
END $$;
ALTER FUNCTION tollway_channel_admit_many(jsonb) SET plan_cache_mode = force_generic_plan;
