-- A top-up cancels a payer's forced close: the escrow resets closeRequestedAt on topUp (the
-- draft's MUST), but the gateway's close_requested_at stayed (sticky), so a channel the payer
-- had topped up to keep using refused every voucher until its close went through after all.
-- The gateway now clears the mark after a top-up it saw confirmed, when the chain (read
-- after it) shows no close requested; but never for its own cooperative close, which marks
-- the channel before the chain shows anything. That close is told apart by this column.
ALTER TABLE channels ADD COLUMN cooperative_close boolean NOT NULL DEFAULT false;
