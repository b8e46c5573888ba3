-- A settle or close recorded confirmed whose block a reorganization replaced by one without it
-- (a node that does not put a dropped block's transactions back in its pool) was taken for paid:
-- the channel's `settled` (and a closing channel's `spent`, raised to its cover) stayed where
-- the dropped transaction had put them, the chain's lower, and nothing sent it again (a payer
-- forcing the close withdrew what it no longer had to pay). Each settlement pass now looks up
-- again the receipts of those confirmed in the blocks it reads again (Settlement.ts,
-- `recheck`) and sends a dropped one again with the voucher it carried.
--   block:       the block its receipt was read in (confirmed rows written from here on).
--   signature:   the voucher's signature it was sent with (empty for a close at `settled`).
--   reorganized: dropped by a reorganization, and not yet confirmed again: tried again by the
--                passes, as its backoff allows.
ALTER TABLE chain_transactions ADD COLUMN block numeric(78, 0),
  ADD COLUMN signature bytea,
  ADD COLUMN reorganized boolean NOT NULL DEFAULT false;
-- The passes' look-up: the settles and closes confirmed in the last blocks.
CREATE INDEX chain_transactions_confirmed_block ON chain_transactions (block)
  WHERE status = 'confirmed' AND block IS NOT NULL;
CREATE INDEX chain_transactions_reorganized ON chain_transactions (next_attempt_at)
  WHERE reorganized;
