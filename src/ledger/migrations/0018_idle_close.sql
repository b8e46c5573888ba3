-- A close the gateway started on its own for a channel idle too long (Settlement.ts,
-- `closeIdle`), told apart from a payer's cooperative close: a failed one of its own is tried
-- again by the gateway with the voucher it chose, while a payer's is left to the payer, whose
-- final voucher (often above any the gateway kept) a retry would not have.
ALTER TABLE channels ADD COLUMN idle_close boolean NOT NULL DEFAULT false;
