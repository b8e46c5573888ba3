-- version: 10
-- tollway_ledger_batch: the API-key ledger's batch statement (admissions and finishes, see
-- Reservations.ts). Its current definition lives here, not in a migration: Db.migrate applies
-- this file after the migrations when its version (the first line) is above the one applied, so
-- a change to the function is an edit of this file with its version raised.
-- Tables and columns it needs still come from migrations.
--
-- It succeeds tollway_ledger_many (migrations 0004, 0007, 0009 and 0012, then version 1 of
-- functions/tollway_ledger_many.sql), which took objects and answered a 14-column row per item.
-- A new name, not a new version, because the answer changed type: an instance of the release
-- before, still taking load during a rolling deploy, calls tollway_ledger_many as it was, and it
-- stays in the database for such instances (as do tollway_admit and tollway_account_finish of
-- 0004, which call it). The two lock in the same order (account rows by id, each reservation by
-- the one instance that finishes it) and write the same rows.
--
-- Its items are a JSON array of arrays, fields by position (objects' keys were most of what
-- PostgreSQL parsed), numbers of credits as strings of digits:
--   ["admit", keyHash (hex), model, stream, minTier, promptTokens, want, need, idempotencyKey,
--     fingerprint (hex), requestId, leaseSeconds]
--   ["finish", id, cost, promptTokens, completionTokens, status, latencyMs, ttftMs]
-- Each field is read once, typed, by the query of the loop (not by a ->> in each expression).
-- Its answer is one text, a JSON array with an entry per item in the items' order (a 14-column
-- row per item, most columns NULL, cost the gateway more to decode than the rest of its work on
-- the batch). An entry is null for a finish whose reservation was gone (finished already), else
-- an array whose first element is the status; money is a string of digits (exact in
-- JavaScript), other numbers are JSON numbers:
--   ["ok", account, key, held, available, concurrency_room, quota_room, rate_limit, rate_remaining]
--   ["finished", charged, balance]
--   ["unauthorized"]
--   ["tier", account, key]
--   ["idempotency_mismatch" | "idempotency_in_progress" | "idempotency_completed", account, key, other_request]
--   ["concurrency" | "rate" | "quota" | "wallet", account, key, retry_after_ms, rate_limit, rate_remaining,
--     tokens_per_month]
--   ["tier", account, key, tokens_per_month, "prompt_over_quota"]: a prompt with more tokens
--     than the plan's whole monthly quota (the gateway's 400: no wait lets it in).
-- An instance of an earlier release, still taking load during a rolling deploy, calls this
-- function as it is (same name, same answer type) and reads each entry by its status and
-- positions: a new refusal is a new shape of a status it knows, its fields past those it
-- reads. Version 7 answered a prompt over the whole quota ["prompt_over_quota", ...], a status
-- the instances of version 6 did not know: their route made no error of it (undefined) and
-- threw that, which no handler renders, so the server answered a 500. Versions 8 and 9 made
-- it a quota refusal marked by a trailing true: version 7's instances then remembered the key
-- as out of quota (routes/Chat.ts, limitedUntil) and refused its other long prompts for a
-- minute with the month's end as their wait. As a plan refusal (version 10), every earlier
-- release answers the 403 it gives a model above the plan (upgrade the plan: what this prompt
-- needs too) and remembers nothing; the trailing mark is for the releases that know it. A
-- limit refusal's tokens_per_month (null: no quota; version 9) is for the
-- gateway's memory of refused keys (routes/Chat.ts, limitedUntil): a long prompt of such a key
-- is refused again without the ledger unless it may be over the whole quota, which the ledger
-- answers first.
--   ["insufficient", account, key, available, rate_limit, rate_remaining]
CREATE OR REPLACE FUNCTION tollway_ledger_batch(p_items jsonb) RETURNS text LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
  ts timestamptz := clock_timestamp();
  this_month date := date_trunc('month', ts AT TIME ZONE 'UTC')::date;
  e record;   -- an item, its fields typed, with acct, kid, and for finishes the reservation
  a record;   -- the account row, locked, with its plan's limits
  cur uuid;   -- the account whose row is in the variables below
  bal numeric; res numeric; act int; tat timestamptz; mstart date; mtok bigint;
  wtok double precision; wat timestamptz; dirty boolean := false;
  period interval; span interval; new_tat timestamptz; remaining int; wallet double precision;
  amount numeric; tokens bigint; month_used bigint; idem record;
  -- The answers, by item.
  answers text[] := array_fill(NULL::text, ARRAY[jsonb_array_length(p_items)]);
  -- Rows to write once the loop is done. NULL until the first (an append makes the array, and
  -- the cardinality checks below take NULL as none): an initial value is an expression that
  -- PL/pgSQL sets up again in each transaction, and these 36 cost a call about 25 us.
  a_id uuid[]; a_bal numeric[]; a_res numeric[]; a_act int[];
  a_tat timestamptz[]; a_mstart date[]; a_mtok bigint[];
  a_wtok double precision[]; a_wat timestamptz[];
  r_id uuid[]; r_acct uuid[]; r_key uuid[]; r_model text[];
  r_stream boolean[]; r_held numeric[]; r_idem text[]; r_exp timestamptz[];
  u_id uuid[]; u_acct uuid[]; u_key uuid[]; u_model text[];
  u_stream boolean[]; u_pt int[]; u_ct int[]; u_cost numeric[];
  u_status text[]; u_lat int[]; u_ttft int[];
  c_acct uuid[]; c_amount numeric[]; c_req uuid[];
BEGIN
  PERFORM set_config('synchronous_commit', 'off', true); -- see the note at the top of 0001

  FOR e IN
    WITH items AS (
      -- The keys of the lookups below, typed once here.
      SELECT (i.n - 1)::int AS n, i.v->>0 AS op, i.v,
        CASE WHEN i.v->>0 = 'admit' THEN decode(i.v->>1, 'hex') END AS key_hash,
        CASE WHEN i.v->>0 = 'finish' THEN (i.v->>1)::uuid END AS id
      FROM jsonb_array_elements(p_items) WITH ORDINALITY i(v, n)
    ), ids AS (
      -- The reservations to finish, by their items' positions (NULL for an admission).
      SELECT array_agg(items.id ORDER BY items.n) AS ids FROM items
    ), finished AS (
      -- No join here: PostgreSQL would copy each item row it joined, for a recheck should a
      -- concurrent writer have changed the row; an item is found by its position instead.
      DELETE FROM reservations r WHERE r.id = ANY ((SELECT ids FROM ids)::uuid[])
      RETURNING array_position((SELECT ids FROM ids), r.id) - 1 AS n, r.*
    )
    -- An admission: [op, keyHash, model, stream, minTier, promptTokens, want, need,
    -- idempotencyKey, fingerprint, requestId, leaseSeconds].
    SELECT items.n, items.op, (items.v->>2) AS model, (items.v->>3)::boolean AS stream,
      (items.v->>4)::int AS min_tier, (items.v->>5)::bigint AS prompt_tokens,
      (items.v->>6)::numeric AS want, (items.v->>7)::numeric AS need, (items.v->>8) AS ikey,
      (items.v->>9) AS fingerprint, (items.v->>10)::uuid AS request_id,
      (items.v->>11)::int AS lease_seconds, NULL::uuid AS id, NULL::numeric AS cost,
      NULL::bigint AS completion_tokens, NULL::text AS status, NULL::int AS latency_ms,
      NULL::int AS ttft_ms,
      ak.account_id AS acct, ak.id AS kid, NULL::bytea AS r_channel,
      NULL::numeric AS r_held, NULL::text AS r_model, NULL::boolean AS r_stream, NULL::text AS r_idem
    FROM items LEFT JOIN api_keys ak ON ak.hash = items.key_hash AND ak.revoked_at IS NULL
    WHERE items.op = 'admit'
    UNION ALL
    -- A finish: [op, id, cost, promptTokens, completionTokens, status, latencyMs, ttftMs]. One
    -- whose reservation is gone (finished already) has no row, so no answer.
    SELECT f.n, 'finish', NULL, NULL, NULL, (p_items->f.n->>3)::bigint, NULL, NULL, NULL, NULL,
      NULL, NULL, f.id, (p_items->f.n->>2)::numeric, (p_items->f.n->>4)::bigint, p_items->f.n->>5,
      (p_items->f.n->>6)::int, (p_items->f.n->>7)::int,
      f.account_id, f.key_id, f.channel_id, f.held, f.model, f.stream, f.idem_key
    FROM finished f
    ORDER BY acct NULLS FIRST, n
  LOOP
    IF e.acct IS NULL THEN
      IF e.op = 'finish' THEN
        RAISE EXCEPTION 'reservation % is paid by channel %: its charge belongs to tollway_channel_finish_many',
          e.id, encode(e.r_channel, 'hex') USING ERRCODE = 'invalid_parameter_value';
      END IF;
      -- An admission whose key is unknown or revoked.
      answers[e.n + 1] := '["unauthorized"]';
      CONTINUE;
    END IF;
    IF cur IS DISTINCT FROM e.acct THEN
      IF dirty THEN
        a_id := a_id || cur; a_bal := a_bal || bal; a_res := a_res || res; a_act := a_act || act;
        a_tat := a_tat || tat; a_mstart := a_mstart || mstart; a_mtok := a_mtok || mtok;
        a_wtok := a_wtok || wtok; a_wat := a_wat || wat;
      END IF;
      -- A plan changed while this waited for the row fails the join's recheck: no row. Read
      -- again (a statement of its own, so a fresh snapshot: the row as it is now, held).
      FOR attempt IN 1..10 LOOP
        SELECT ac.*, pl.tier, pl.requests_per_minute, pl.max_concurrent, pl.tokens_per_month,
            pl.wallet_floor, pl.wallet_refill_per_day, pl.wallet_cap
          INTO a FROM accounts ac JOIN plans pl ON pl.name = ac.plan
          WHERE ac.id = e.acct FOR UPDATE OF ac;
        EXIT WHEN FOUND;
      END LOOP;
      IF a.id IS NULL THEN
        RAISE EXCEPTION 'account % could not be read with its plan', e.acct
          USING ERRCODE = 'serialization_failure';
      END IF;
      cur := e.acct; dirty := false;
      bal := a.balance; res := a.reserved; act := a.active_requests; tat := a.rate_tat;
      mstart := a.month_start; mtok := a.month_tokens; wtok := a.wallet_tokens; wat := a.wallet_at;
    END IF;

    IF e.op = 'finish' THEN
      -- Charge the cost, never more than the account can pay (its free balance plus this
      -- reservation); release the rest; count the tokens against the plan. Only a request
      -- charged for (its cost, before that cap), answered, or that delivered tokens (a model
      -- priced at nothing, cut short) counts them: one answered free having delivered nothing
      -- (an upstream failing before its first token, a client gone before any upstream was
      -- asked) uses up no quota or wallet.
      amount := greatest(0, least(e.cost, bal - res + e.r_held));
      tokens := CASE WHEN e.cost > 0 OR e.status = 'ok' OR e.completion_tokens > 0
        THEN e.prompt_tokens + e.completion_tokens ELSE 0 END;
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
      dirty := true;
      IF amount > 0 THEN
        c_acct := c_acct || cur; c_amount := c_amount || -amount; c_req := c_req || e.id;
      END IF;
      u_id := u_id || e.id; u_acct := u_acct || cur; u_key := u_key || e.kid;
      u_model := u_model || e.r_model; u_stream := u_stream || e.r_stream;
      u_pt := u_pt || e.prompt_tokens::int; u_ct := u_ct || e.completion_tokens::int;
      u_cost := u_cost || amount; u_status := u_status || e.status;
      u_lat := u_lat || e.latency_ms; u_ttft := u_ttft || e.ttft_ms;
      IF e.r_idem IS NOT NULL THEN
        IF amount > 0 OR e.status = 'ok' THEN
          UPDATE idempotency_keys SET state = 'completed' WHERE account_id = cur AND key = e.r_idem;
        ELSE
          -- Nothing was charged: the key may be used again.
          DELETE FROM idempotency_keys WHERE account_id = cur AND key = e.r_idem;
        END IF;
      END IF;
      answers[e.n + 1] := '["finished","' || amount || '","' || bal || '"]';
      CONTINUE;
    END IF;

    -- An admission: tier, a prompt over the whole monthly quota, Idempotency-Key,
    -- concurrency, request rate (GCRA), monthly tokens, token wallet, then between need and
    -- want of the free balance.
    IF a.tier < e.min_tier THEN
      answers[e.n + 1] := '["tier","' || cur || '","' || e.kid || '"]';
      CONTINUE;
    END IF;
    -- A prompt that alone is more than the plan's whole month: no reset lets it in, so it is
    -- not told to wait for one (version 7; before, a 429 with the month's end as its wait).
    -- Answered as a plan refusal marked by its trailing "prompt_over_quota" (version 10, see
    -- the top).
    IF a.tokens_per_month IS NOT NULL AND e.prompt_tokens > a.tokens_per_month THEN
      answers[e.n + 1] := '["tier","' || cur || '","' || e.kid || '",' || a.tokens_per_month
        || ',"prompt_over_quota"]';
      CONTINUE;
    END IF;
    IF e.ikey IS NOT NULL THEN
      SELECT * INTO idem FROM idempotency_keys ik WHERE ik.account_id = cur AND ik.key = e.ikey;
      IF FOUND THEN
        answers[e.n + 1] := '["' || CASE WHEN idem.fingerprint <> decode(e.fingerprint, 'hex') THEN 'idempotency_mismatch'
                       WHEN idem.state = 'in_progress' THEN 'idempotency_in_progress'
                       ELSE 'idempotency_completed' END
          || '","' || cur || '","' || e.kid || '","' || idem.request_id || '"]';
        CONTINUE;
      END IF;
    END IF;
    IF a.max_concurrent IS NOT NULL AND act >= a.max_concurrent THEN
      answers[e.n + 1] := '["concurrency","' || cur || '","' || e.kid || '",1000,' || a.max_concurrent || ',0,'
        || coalesce(a.tokens_per_month::text, 'null') || ']';
      CONTINUE;
    END IF;
    new_tat := NULL; remaining := NULL;
    IF a.requests_per_minute IS NOT NULL THEN
      -- Allowed while the theoretical arrival time stays within the limit's periods (`span`).
      -- The period is a minute over the limit rounded down to a microsecond (a timestamp's
      -- precision), so that the limit's requests fit in the minute: an interval's division
      -- rounds to the nearest, and 7 periods of 60 s / 7 (8.571429 s) passed the minute, so a
      -- plan of 7 a minute allowed 6 at once and said one fewer remained. The span is the
      -- limit's periods, not the minute: rounded down, one more period may fit the minute
      -- (7,769 of 7,723 us for a plan of 7,768), which admitted one over the limit.
      period := interval '1 microsecond' * (60000000 / a.requests_per_minute);
      span := period * a.requests_per_minute;
      new_tat := greatest(coalesce(tat, ts), ts) + period;
      IF new_tat - ts > span THEN
        answers[e.n + 1] := '["rate","' || cur || '","' || e.kid || '",'
          || ceil(extract(epoch FROM (new_tat - span - ts)) * 1000)::bigint
          || ',' || a.requests_per_minute || ',0,' || coalesce(a.tokens_per_month::text, 'null') || ']';
        CONTINUE;
      END IF;
      remaining := floor(extract(epoch FROM (span - (new_tat - ts))) / extract(epoch FROM period))::int;
    END IF;
    -- `remaining` is what remains once this request is counted: an admission's answer. A
    -- refusal below counts nothing against the rate (tat stays), so it states one more, this
    -- request's own, or the client would be told of one request fewer than it has.
    month_used := CASE WHEN mstart < this_month THEN 0 ELSE mtok END;
    IF a.tokens_per_month IS NOT NULL AND month_used + e.prompt_tokens > a.tokens_per_month THEN
      answers[e.n + 1] := '["quota","' || cur || '","' || e.kid || '",'
        || ceil(extract(epoch FROM ((this_month + interval '1 month') AT TIME ZONE 'UTC' - ts)) * 1000)::bigint
        || ',' || coalesce(a.requests_per_minute::text, 'null') || ',' || coalesce((remaining + 1)::text, 'null')
        || ',' || a.tokens_per_month || ']';
      CONTINUE;
    END IF;
    IF a.wallet_floor IS NOT NULL THEN
      wallet := least(a.wallet_cap::double precision,
        coalesce(wtok, a.wallet_cap) + coalesce(extract(epoch FROM ts - wat), 0) / 86400.0 * a.wallet_refill_per_day);
      IF wallet < a.wallet_floor THEN
        answers[e.n + 1] := '["wallet","' || cur || '","' || e.kid || '",'
          || ceil((a.wallet_floor - wallet) / a.wallet_refill_per_day * 86400000.0)::bigint
          || ',' || coalesce(a.requests_per_minute::text, 'null') || ',' || coalesce((remaining + 1)::text, 'null')
          || ',' || coalesce(a.tokens_per_month::text, 'null') || ']';
        CONTINUE;
      END IF;
    END IF;
    IF bal - res < e.need THEN
      answers[e.n + 1] := '["insufficient","' || cur || '","' || e.kid || '","' || (bal - res) || '",'
        || coalesce(a.requests_per_minute::text, 'null') || ',' || coalesce((remaining + 1)::text, 'null') || ']';
      CONTINUE;
    END IF;
    amount := least(e.want, bal - res);
    res := res + amount; act := act + 1; tat := coalesce(new_tat, tat); dirty := true;
    r_id := r_id || e.request_id; r_acct := r_acct || cur; r_key := r_key || e.kid;
    r_model := r_model || e.model; r_stream := r_stream || e.stream;
    r_held := r_held || amount; r_idem := r_idem || e.ikey;
    r_exp := r_exp || (ts + make_interval(secs => e.lease_seconds));
    IF e.ikey IS NOT NULL THEN
      INSERT INTO idempotency_keys (account_id, key, fingerprint, request_id, state)
        VALUES (cur, e.ikey, decode(e.fingerprint, 'hex'), e.request_id, 'in_progress');
    END IF;
    answers[e.n + 1] := '["ok","' || cur || '","' || e.kid || '","' || amount || '","' || (bal - res) || '",'
      || coalesce((a.max_concurrent - act)::text, 'null') || ','
      || coalesce((a.tokens_per_month - month_used - e.prompt_tokens)::text, 'null') || ','
      || coalesce(a.requests_per_minute::text, 'null') || ',' || coalesce(remaining::text, 'null') || ']';
  END LOOP;
  IF dirty THEN
    a_id := a_id || cur; a_bal := a_bal || bal; a_res := a_res || res; a_act := a_act || act;
    a_tat := a_tat || tat; a_mstart := a_mstart || mstart; a_mtok := a_mtok || mtok;
    a_wtok := a_wtok || wtok; a_wat := a_wat || wat;
  END IF;
  -- Only tables with rows to write are touched (an empty INSERT still takes the table's lock).
  -- One statement for all four measured slower: it starts all four every time.
  IF cardinality(a_id) > 0 THEN
    UPDATE accounts ac SET balance = x.bal, reserved = x.res, active_requests = x.act,
      rate_tat = x.tat, month_start = x.mstart, month_tokens = x.mtok, wallet_tokens = x.wtok,
      wallet_at = x.wat
    FROM unnest(a_id, a_bal, a_res, a_act, a_tat, a_mstart, a_mtok, a_wtok, a_wat)
      x(id, bal, res, act, tat, mstart, mtok, wtok, wat)
    WHERE ac.id = x.id;
  END IF;
  IF cardinality(r_id) > 0 THEN
    INSERT INTO reservations (id, account_id, key_id, model, stream, held, idem_key, expires_at)
      SELECT * FROM unnest(r_id, r_acct, r_key, r_model, r_stream, r_held, r_idem, r_exp);
  END IF;
  IF cardinality(c_acct) > 0 THEN
    INSERT INTO credit_transactions (account_id, amount, kind, request_id)
      SELECT x.acct, x.amt, 'usage', x.req FROM unnest(c_acct, c_amount, c_req) x(acct, amt, req);
  END IF;
  IF cardinality(u_id) > 0 THEN
    INSERT INTO usage (id, account_id, key_id, model, stream, prompt_tokens, completion_tokens, cost, status, latency_ms, ttft_ms)
      SELECT * FROM unnest(u_id, u_acct, u_key, u_model, u_stream, u_pt, u_ct, u_cost, u_status, u_lat, u_ttft);
  END IF;
  RETURN '[' || array_to_string(answers, ',', 'null') || ']';
END $$;
-- Its statements take a JSON parameter whose size does not change their plans: planning them
-- on every call (a custom plan) cost more than running them.
ALTER FUNCTION tollway_ledger_batch(jsonb) SET plan_cache_mode = force_generic_plan;
-- Every table it reads has the index its lookups need. Reservations, vacuumed when none was
-- under way (between bursts), looked empty to the planner, which then deleted a batch's finished
-- reservations by a nested loop over the table with the items rescanned for each row: each
-- reservation compared with each item, quadratic in the batch (61 against 37 us an item at 50
-- items per statement, when the DELETE still joined the items).
ALTER FUNCTION tollway_ledger_batch(jsonb) SET enable_seqscan = off;
