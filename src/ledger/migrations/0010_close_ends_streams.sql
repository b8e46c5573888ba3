-- A cooperative close no longer leaves a stream running unpaid. The close marked the channel
-- (close_requested_at) and settled what was spent then, while a stream that had reserved its
-- whole answer went on delivering it: 646 base units spent after the channel had closed with
-- 0 settled. Now the close ends the channel's stream (Settlements.markCloseRequested clears
-- active_stream, and 0008's trigger announces it to the instance serving it) and waits for
-- the channel's requests under way to be charged before it picks the final voucher. Here,
-- for an instance without LISTEN: a channel stream's next extension on a channel being closed
-- (or closed) ends it, where it used to ask for a voucher the gateway would then refuse, and
-- a stream whose channel has no active stream any more (cleared by the close) is one another
-- replaced. Everything else is 0002's tollway_extend, unchanged.
CREATE OR REPLACE FUNCTION tollway_extend(p_id uuid, p_amount numeric, p_lease_seconds int, p_delivered numeric DEFAULT NULL)
RETURNS numeric LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
  r record;
BEGIN
  SELECT * INTO r FROM reservations WHERE id = p_id FOR UPDATE;
  IF NOT FOUND THEN RETURN NULL; END IF;
  IF p_delivered IS NOT NULL AND p_delivered > r.delivered THEN
    UPDATE reservations SET delivered = least(p_delivered, held) WHERE id = p_id;
  END IF;
  IF r.account_id IS NOT NULL THEN
    PERFORM set_config('synchronous_commit', 'off', true); -- see 0001_ledger.sql
    IF p_amount > 0 THEN
      UPDATE accounts SET reserved = reserved + p_amount
        WHERE id = r.account_id AND balance - reserved >= p_amount;
      IF NOT FOUND THEN RETURN NULL; END IF;
    END IF;
  ELSE
    -- A stream another replaced, or on a channel being closed, ends (as superseded): its
    -- payer will sign no more vouchers here, and the close waits for what it delivered.
    IF r.stream AND EXISTS (SELECT 1 FROM channels WHERE channel_id = r.channel_id
        AND (active_stream IS DISTINCT FROM p_id OR close_requested_at IS NOT NULL OR finalized)) THEN
      RETURN -1;
    END IF;
    IF p_amount > 0 THEN
      UPDATE channels SET reserved = reserved + p_amount
        WHERE channel_id = r.channel_id AND accepted_cumulative - spent - reserved >= p_amount
          AND NOT finalized AND close_requested_at IS NULL;
      IF NOT FOUND THEN RETURN NULL; END IF;
    END IF;
  END IF;
  UPDATE reservations SET held = held + p_amount,
    expires_at = clock_timestamp() + make_interval(secs => p_lease_seconds)
    WHERE id = p_id;
  RETURN r.held + p_amount;
END $$;
