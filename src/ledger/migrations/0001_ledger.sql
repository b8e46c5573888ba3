-- The ledger: accounts, keys, credits, reservations, usage and plan limits.
-- Money is numeric(78,0) base units. Invariants live here as CHECK constraints and in the
-- functions below, which are the only writers of balances: each runs as one statement.
--
-- Durability of the per-request functions (admit, finish, and 0002's extend): they commit with
-- synchronous_commit off, so a request does not wait for a WAL flush (about 0.2 ms here,
-- two per request). Consistency is unaffected: every invariant still holds after a crash.
-- What a crash of the PostgreSQL server itself (not of a gateway) can lose is the last few
-- hundred milliseconds of those commits: charges not recorded (the gateway's loss, never
-- an overdraft) and reservations that vanish with the requests they held for. Grants
-- (tollway_grant) and everything payment channels write stay fully synchronous.

CREATE TABLE plans (
  name                  text PRIMARY KEY,
  tier                  int NOT NULL CHECK (tier >= 0),
  requests_per_minute   int CHECK (requests_per_minute > 0),
  max_concurrent        int CHECK (max_concurrent > 0),
  tokens_per_month      bigint CHECK (tokens_per_month > 0),
  wallet_floor          bigint CHECK (wallet_floor >= 0),
  wallet_refill_per_day bigint CHECK (wallet_refill_per_day > 0),
  wallet_cap            bigint CHECK (wallet_cap > 0)
);

-- balance = sum of the account's credit_transactions (kept in step by tollway_* functions);
-- reserved = sum of the account's reservations.held; 0 <= reserved <= balance.
CREATE TABLE accounts (
  id              uuid PRIMARY KEY DEFAULT gen_random_uuid(),
  name            text NOT NULL,
  plan            text NOT NULL REFERENCES plans (name),
  balance         numeric(78, 0) NOT NULL DEFAULT 0,
  reserved        numeric(78, 0) NOT NULL DEFAULT 0,
  active_keys     int NOT NULL DEFAULT 0 CHECK (active_keys >= 0),
  active_requests int NOT NULL DEFAULT 0 CHECK (active_requests >= 0),
  -- GCRA: the theoretical arrival time of the next request.
  rate_tat        timestamptz,
  month_start     date NOT NULL DEFAULT date_trunc('month', now() AT TIME ZONE 'UTC'),
  month_tokens    bigint NOT NULL DEFAULT 0 CHECK (month_tokens >= 0),
  -- Token wallet: tokens held at wallet_at (refill is computed on read). Tokens, not money.
  wallet_tokens   double precision,
  wallet_at       timestamptz,
  created_at      timestamptz NOT NULL DEFAULT now(),
  CONSTRAINT reserved_not_negative CHECK (reserved >= 0),
  CONSTRAINT balance_covers_reserved CHECK (balance >= reserved)
);

-- Keys are stored only as SHA-256 of the raw key (keys are 256-bit random, so a fast hash
-- is the right one); lookup is one unique-index probe.
CREATE TABLE api_keys (
  id         uuid PRIMARY KEY DEFAULT gen_random_uuid(),
  account_id uuid NOT NULL REFERENCES accounts (id),
  name       text NOT NULL,
  prefix     text NOT NULL,
  hash       bytea NOT NULL UNIQUE,
  created_at timestamptz NOT NULL DEFAULT now(),
  revoked_at timestamptz
);
CREATE INDEX api_keys_account ON api_keys (account_id, created_at);

-- Append-only: a row is never updated or deleted (trigger below).
CREATE TABLE credit_transactions (
  id         bigserial PRIMARY KEY,
  account_id uuid NOT NULL REFERENCES accounts (id),
  amount     numeric(78, 0) NOT NULL CHECK (amount <> 0),
  kind       text NOT NULL CHECK (kind IN ('grant', 'usage')),
  note       text,
  request_id uuid,
  created_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX credit_transactions_account ON credit_transactions (account_id, id DESC);

CREATE FUNCTION tollway_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  RAISE EXCEPTION '% is append-only', TG_TABLE_NAME USING ERRCODE = 'restrict_violation';
END $$;
CREATE TRIGGER credit_transactions_append_only BEFORE UPDATE OR DELETE ON credit_transactions
  FOR EACH ROW EXECUTE FUNCTION tollway_append_only();

-- One row per request in flight: the credits held for it. A row whose lease ran out
-- belongs to a dead instance; tollway_sweep releases it.
CREATE TABLE reservations (
  id         uuid PRIMARY KEY,
  account_id uuid NOT NULL REFERENCES accounts (id),
  key_id     uuid,
  model      text NOT NULL,
  stream     boolean NOT NULL,
  held       numeric(78, 0) NOT NULL CHECK (held >= 0),
  idem_key   text,
  started_at timestamptz NOT NULL DEFAULT now(),
  expires_at timestamptz NOT NULL
);
CREATE INDEX reservations_expiry ON reservations (expires_at);

-- One row per admitted request. Token counts and money only: never prompt or completion text.
CREATE TABLE usage (
  id                uuid PRIMARY KEY,
  account_id        uuid NOT NULL REFERENCES accounts (id),
  key_id            uuid,
  model             text NOT NULL,
  stream            boolean NOT NULL,
  prompt_tokens     int NOT NULL CHECK (prompt_tokens >= 0),
  completion_tokens int NOT NULL CHECK (completion_tokens >= 0),
  cost              numeric(78, 0) NOT NULL CHECK (cost >= 0),
  status            text NOT NULL,
  latency_ms        int,
  ttft_ms           int,
  created_at        timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX usage_account ON usage (account_id, created_at DESC, id DESC);

-- Idempotency-Key: at most one charged request per (account, key).
CREATE TABLE idempotency_keys (
  account_id  uuid NOT NULL REFERENCES accounts (id),
  key         text NOT NULL,
  fingerprint bytea NOT NULL,
  request_id  uuid NOT NULL,
  state       text NOT NULL CHECK (state IN ('in_progress', 'completed')),
  created_at  timestamptz NOT NULL DEFAULT now(),
  PRIMARY KEY (account_id, key)
);

-- Admission of one completion request, in one round trip: authenticate the key, check the
-- plan (tier, concurrency, request rate by GCRA, monthly tokens, token wallet), honour
-- the Idempotency-Key, and reserve credits: between p_need and p_want base units, as many
-- as are available. Locks the account row, so admissions of one account are serialized
-- across every instance. Nothing is written unless the request is admitted.
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
  -- Admitted: how many more requests at once the plan allows besides this one (NULL: no limit).
  concurrency_room int
) LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
  k record;
  a record;
  p record;
  ts timestamptz := clock_timestamp();
  period interval;
  tat timestamptz;
  new_tat timestamptz;
  remaining int;
  month_used bigint;
  wallet double precision;
  amount numeric;
  idem record;
BEGIN
  PERFORM set_config('synchronous_commit', 'off', true); -- see the note at the top
  SELECT ak.id, ak.account_id INTO k FROM api_keys ak WHERE ak.hash = p_key_hash AND ak.revoked_at IS NULL;
  IF NOT FOUND THEN
    RETURN QUERY SELECT 'unauthorized', NULL::uuid, NULL::uuid, NULL::numeric, NULL::numeric, NULL::bigint, NULL::int, NULL::int, NULL::uuid, NULL::int;
    RETURN;
  END IF;
  SELECT * INTO a FROM accounts ac WHERE ac.id = k.account_id FOR UPDATE;
  SELECT * INTO p FROM plans pl WHERE pl.name = a.plan;

  IF p.tier < p_min_tier THEN
    RETURN QUERY SELECT 'tier', a.id, k.id, NULL::numeric, NULL::numeric, NULL::bigint, NULL::int, NULL::int, NULL::uuid, NULL::int;
    RETURN;
  END IF;

  IF p_idem_key IS NOT NULL THEN
    SELECT * INTO idem FROM idempotency_keys ik WHERE ik.account_id = a.id AND ik.key = p_idem_key;
    IF FOUND THEN
      RETURN QUERY SELECT
        CASE WHEN idem.fingerprint <> p_fingerprint THEN 'idempotency_mismatch'
             WHEN idem.state = 'in_progress' THEN 'idempotency_in_progress'
             ELSE 'idempotency_completed' END,
        a.id, k.id, NULL::numeric, NULL::numeric, NULL::bigint, NULL::int, NULL::int, idem.request_id, NULL::int;
      RETURN;
    END IF;
  END IF;

  IF p.max_concurrent IS NOT NULL AND a.active_requests >= p.max_concurrent THEN
    RETURN QUERY SELECT 'concurrency', a.id, k.id, NULL::numeric, NULL::numeric, 1000::bigint, p.max_concurrent, 0, NULL::uuid, NULL::int;
    RETURN;
  END IF;

  -- GCRA: a request is allowed while the theoretical arrival time stays within one minute.
  IF p.requests_per_minute IS NOT NULL THEN
    period := interval '60 seconds' / p.requests_per_minute;
    tat := greatest(coalesce(a.rate_tat, ts), ts);
    new_tat := tat + period;
    IF new_tat - ts > interval '60 seconds' THEN
      RETURN QUERY SELECT 'rate', a.id, k.id, NULL::numeric, NULL::numeric,
        ceil(extract(epoch FROM (new_tat - interval '60 seconds' - ts)) * 1000)::bigint,
        p.requests_per_minute, 0, NULL::uuid, NULL::int;
      RETURN;
    END IF;
    remaining := floor(extract(epoch FROM (interval '60 seconds' - (new_tat - ts))) / extract(epoch FROM period))::int;
  END IF;

  IF p.tokens_per_month IS NOT NULL THEN
    month_used := CASE WHEN a.month_start < date_trunc('month', ts AT TIME ZONE 'UTC') THEN 0 ELSE a.month_tokens END;
    IF month_used + p_prompt_tokens > p.tokens_per_month THEN
      RETURN QUERY SELECT 'quota', a.id, k.id, NULL::numeric, NULL::numeric,
        ceil(extract(epoch FROM ((date_trunc('month', ts AT TIME ZONE 'UTC') + interval '1 month') AT TIME ZONE 'UTC' - ts)) * 1000)::bigint,
        p.requests_per_minute, remaining, NULL::uuid, NULL::int;
      RETURN;
    END IF;
  END IF;

  IF p.wallet_floor IS NOT NULL THEN
    wallet := least(p.wallet_cap::double precision,
      coalesce(a.wallet_tokens, p.wallet_cap) + coalesce(extract(epoch FROM ts - a.wallet_at), 0) / 86400.0 * p.wallet_refill_per_day);
    IF wallet < p.wallet_floor THEN
      RETURN QUERY SELECT 'wallet', a.id, k.id, NULL::numeric, NULL::numeric,
        ceil((p.wallet_floor - wallet) / p.wallet_refill_per_day * 86400000.0)::bigint,
        p.requests_per_minute, remaining, NULL::uuid, NULL::int;
      RETURN;
    END IF;
  END IF;

  IF a.balance - a.reserved < p_need THEN
    RETURN QUERY SELECT 'insufficient', a.id, k.id, NULL::numeric, a.balance - a.reserved, NULL::bigint,
      p.requests_per_minute, remaining, NULL::uuid, NULL::int;
    RETURN;
  END IF;
  amount := least(p_want, a.balance - a.reserved);

  UPDATE accounts SET
    reserved = reserved + amount,
    active_requests = active_requests + 1,
    rate_tat = coalesce(new_tat, rate_tat)
  WHERE id = a.id;
  INSERT INTO reservations (id, account_id, key_id, model, stream, held, idem_key, expires_at)
    VALUES (p_request_id, a.id, k.id, p_model, p_stream, amount, p_idem_key, ts + make_interval(secs => p_lease_seconds));
  IF p_idem_key IS NOT NULL THEN
    INSERT INTO idempotency_keys (account_id, key, fingerprint, request_id, state)
      VALUES (a.id, p_idem_key, p_fingerprint, p_request_id, 'in_progress');
  END IF;
  RETURN QUERY SELECT 'ok', a.id, k.id, amount, a.balance - a.reserved - amount, NULL::bigint,
    p.requests_per_minute, remaining, NULL::uuid, p.max_concurrent - a.active_requests - 1;
END $$;

-- tollway_extend (adds to a reservation) is defined in 0002_channels.sql, for both payers.

-- Ends a request: charges p_cost (never more than the account can pay: the reservation
-- plus its free balance), releases the rest of the reservation, counts the tokens against
-- the plan, writes the usage row and settles the Idempotency-Key. Returns the amount
-- charged and the new balance, or no row if the reservation was already finished.
-- Called through tollway_finish (0002_channels.sql), which dispatches on the payer.
CREATE FUNCTION tollway_account_finish(
  p_id uuid,
  p_cost numeric,
  p_prompt_tokens int,
  p_completion_tokens int,
  p_status text,
  p_latency_ms int,
  p_ttft_ms int
) RETURNS TABLE (charged numeric, balance numeric) LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
  r record;
  a record;
  p record;
  ts timestamptz := clock_timestamp();
  amount numeric;
  tokens bigint := p_prompt_tokens + p_completion_tokens;
BEGIN
  PERFORM set_config('synchronous_commit', 'off', true); -- see the note at the top
  DELETE FROM reservations WHERE id = p_id RETURNING * INTO r;
  IF NOT FOUND THEN RETURN; END IF;
  SELECT * INTO a FROM accounts WHERE id = r.account_id FOR UPDATE;
  SELECT * INTO p FROM plans WHERE name = a.plan;
  amount := greatest(0, least(p_cost, a.balance - a.reserved + r.held));

  UPDATE accounts SET
    balance = accounts.balance - amount,
    reserved = reserved - r.held,
    active_requests = active_requests - 1,
    month_start = date_trunc('month', ts AT TIME ZONE 'UTC'),
    month_tokens = CASE WHEN a.month_start < date_trunc('month', ts AT TIME ZONE 'UTC') THEN 0 ELSE month_tokens END + tokens,
    wallet_tokens = CASE WHEN p.wallet_floor IS NULL THEN NULL ELSE greatest(0,
      least(p.wallet_cap::double precision,
        coalesce(a.wallet_tokens, p.wallet_cap) + coalesce(extract(epoch FROM ts - a.wallet_at), 0) / 86400.0 * p.wallet_refill_per_day)
      - tokens) END,
    wallet_at = CASE WHEN p.wallet_floor IS NULL THEN NULL ELSE ts END
  WHERE id = a.id;
  IF amount > 0 THEN
    INSERT INTO credit_transactions (account_id, amount, kind, request_id) VALUES (a.id, -amount, 'usage', p_id);
  END IF;
  INSERT INTO usage (id, account_id, key_id, model, stream, prompt_tokens, completion_tokens, cost, status, latency_ms, ttft_ms)
    VALUES (p_id, a.id, r.key_id, r.model, r.stream, p_prompt_tokens, p_completion_tokens, amount, p_status, p_latency_ms, p_ttft_ms);
  IF r.idem_key IS NOT NULL THEN
    IF amount > 0 OR p_status = 'ok' THEN
      UPDATE idempotency_keys SET state = 'completed' WHERE account_id = a.id AND key = r.idem_key;
    ELSE
      -- Nothing was charged: the key may be used again.
      DELETE FROM idempotency_keys WHERE account_id = a.id AND key = r.idem_key;
    END IF;
  END IF;
  RETURN QUERY SELECT amount, a.balance - amount;
END $$;

-- Credits or debits an account (admin). A debit may not touch reserved credits.
CREATE FUNCTION tollway_grant(p_account uuid, p_amount numeric, p_note text)
RETURNS numeric LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
  new_balance numeric;
BEGIN
  UPDATE accounts SET balance = balance + p_amount
    WHERE id = p_account AND balance + p_amount >= reserved
    RETURNING balance INTO new_balance;
  IF NOT FOUND THEN RETURN NULL; END IF;
  INSERT INTO credit_transactions (account_id, amount, kind, note) VALUES (p_account, p_amount, 'grant', p_note);
  RETURN new_balance;
END $$;
