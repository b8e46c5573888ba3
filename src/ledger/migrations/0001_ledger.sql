-- The ledger: accounts, keys, credits, reservations, usage and plan limits.
-- Money is numeric(78,0) base units. Invariants live here as CHECK constraints and in the
-- functions here and in 0002/0004, the only writers of balances: each runs as one statement.
--
-- Durability of the per-request functions (admit, finish: 0004; extend: 0002): they commit with
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

-- Admission (tollway_admit) and the end of a request (tollway_account_finish) are defined in
-- 0004_batches.sql, as batches of one of tollway_ledger_many: one implementation.

-- tollway_extend (adds to a reservation) is defined in 0002_channels.sql, for both payers.

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
