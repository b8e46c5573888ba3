-- version: 1
-- tollway_channel_admit_many: admissions of requests paid from channels (see Channels.ts), its
-- current definition (migration 0006 is its history: this file adds the public-voucher check).
-- Each item may name the voucher that pays for its request (`voucher`, its cumulative amount):
-- one at or below what the gateway made public in a settle or close transaction is refused
-- ('public_voucher'). Items without it (an instance of an earlier version) are not checked here.
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
      ch.close_requested_at IS NOT NULL AS closing,
      -- The highest voucher the gateway put in a transaction (settle or close): recorded before
      -- the transaction is sent, so public from then on (its calldata), settled or not yet.
      greatest(ch.settled, (SELECT max(ct.cumulative_amount) FROM chain_transactions ct
        WHERE ct.channel_id = ch.channel_id AND ct.kind IN ('settle', 'close'))) AS published
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
    -- A request paid with a voucher anyone can read (at or below one the gateway published)
    -- proves nothing about who sends it: it is not served (the payer's own carry a higher one).
    IF e.v->>'voucher' IS NOT NULL AND e.published > 0 AND (e.v->>'voucher')::numeric <= e.published THEN
      status := 'public_voucher';
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
