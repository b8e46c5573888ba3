-- version: 1
-- tollway_channel_finish_many: charges of requests paid from channels, many in one statement (see
-- Reservations.ts, chargeChannels). Its current definition lives here, not in a migration (0006
-- is its history): Db.migrate applies this file after the migrations when its version (the first
-- line) is above the one applied, so a change to the function is an edit of this file with its
-- version raised. Same name, arguments and result as 0006's, so an instance of the release
-- before, still taking load during a rolling deploy, calls it as it did.
--
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
CREATE OR REPLACE FUNCTION tollway_channel_finish_many(p_items jsonb) RETURNS TABLE (
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
    WITH ids AS (
      -- The reservations to finish, by their items' positions.
      SELECT array_agg((i.v->>'id')::uuid ORDER BY i.n) AS ids
      FROM jsonb_array_elements(p_items) WITH ORDINALITY i(v, n)
    ), gone AS (
      -- By id = ANY, not a join of the items: see the note at the end of this file.
      DELETE FROM reservations r
      WHERE r.id = ANY ((SELECT ids FROM ids)::uuid[]) AND r.channel_id IS NOT NULL
      RETURNING (array_position((SELECT ids FROM ids), r.id) - 1)::int AS n,
        r.id, r.channel_id, r.model, r.stream, r.held, r.idem_key
    )
    -- An item by its position (p_items -> n), not a join back to the items.
    SELECT gone.n, p_items -> gone.n AS v, gone.id, gone.channel_id, gone.model, gone.stream,
      gone.held, gone.idem_key
    FROM gone ORDER BY gone.channel_id, gone.n
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
-- Every table it reads has the index its lookups need. 0006 deleted the batch's reservations by
-- a join of the items, which its generic plan (the items counted as 100 rows) made a hash join
-- over a sequential scan of reservations at every call, whatever the statistics: the whole table
-- read and hashed for each batch (all the live reservations of every instance, and the dead ones
-- not yet vacuumed), 0.7 ms a batch with 3,000 live (auto_explain). With id = ANY and no
-- sequential scan, the batch's rows are found by the primary key.
ALTER FUNCTION tollway_channel_finish_many(jsonb) SET enable_seqscan = off;
