-- Settlement: every transaction the gateway submits, with its outcome.
--
-- One row per intent (channel, kind, cumulative amount): a retry after a network or RPC
-- failure reuses the row (attempts + 1, next_attempt_at pushed back), a higher amount is a
-- new row. `reverted` is definitive (the call would revert again: never retried for that
-- amount); `failed` means it is unknown whether anything reached the chain and a retry
-- may help; `pending` rows are being worked on until next_attempt_at (a lease: a worker
-- that died mid-send leaves a row another one retries once it runs out). Errors keep the
-- error's name and message only: no keys, no URLs with credentials (see Settlement.ts).

CREATE TABLE chain_transactions (
  id                bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
  channel_id        bytea NOT NULL REFERENCES channels (channel_id),
  kind              text NOT NULL CHECK (kind IN ('settle', 'close', 'open', 'topUp')),
  cumulative_amount numeric(78, 0) NOT NULL CHECK (cumulative_amount >= 0),
  tx_hash           bytea CHECK (octet_length(tx_hash) = 32),
  status            text NOT NULL CHECK (status IN ('pending', 'confirmed', 'reverted', 'failed')),
  error_name        text,
  error_message     text,
  attempts          int NOT NULL DEFAULT 1 CHECK (attempts >= 1),
  next_attempt_at   timestamptz NOT NULL DEFAULT now(),
  created_at        timestamptz NOT NULL DEFAULT now(),
  updated_at        timestamptz NOT NULL DEFAULT now(),
  CONSTRAINT chain_transaction_error CHECK ((status IN ('reverted', 'failed')) = (error_name IS NOT NULL))
);
CREATE UNIQUE INDEX chain_transactions_intent ON chain_transactions (channel_id, kind, cumulative_amount);
CREATE INDEX chain_transactions_recent ON chain_transactions (created_at DESC, id DESC);

-- The channels the settlement worker looks at: open ones with spending not yet settled.
CREATE INDEX channels_unsettled ON channels (chain_id, escrow, payee) WHERE NOT finalized AND spent > settled;
