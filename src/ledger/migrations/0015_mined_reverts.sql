-- Whether a transaction is known mined: confirmed, or reverted as its receipt says. A settle or
-- close recorded reverted whose receipt was read is final: Settlement.follow asks the node for
-- its receipt no more (it read it again on every pass that followed the channel, for ever). One
-- reverted in a simulation only may still have been mined (an earlier send of the same intent):
-- it is followed until its receipt is read. Reverted rows from before this migration are read
-- once more, then marked.
ALTER TABLE chain_transactions ADD COLUMN mined boolean NOT NULL DEFAULT false;
UPDATE chain_transactions SET mined = true WHERE status = 'confirmed';
