-- The last block whose escrow events the settlement worker has read, per chain and escrow.
-- The worker's event watch starts at the chain's head: a payer's forced close (or withdrawal)
-- made while no gateway was watching (down, restarting, its RPC filter dropped) was never seen,
-- so its vouchers were still accepted and nothing under the threshold was settled before the
-- payer could withdraw. Each settlement pass now reads the events from the block after this
-- one (chain/Settlement.ts, `catchUp`).
CREATE TABLE IF NOT EXISTS chain_cursors (
  chain_id   bigint NOT NULL,
  escrow     bytea NOT NULL CHECK (octet_length(escrow) = 20),
  block      numeric(78, 0) NOT NULL CHECK (block >= 0),
  updated_at timestamptz NOT NULL DEFAULT now(),
  PRIMARY KEY (chain_id, escrow)
);
