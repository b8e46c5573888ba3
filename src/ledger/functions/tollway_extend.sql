-- version: 3
-- tollway_extend: adds p_amount to a reservation's hold (when the payer can cover it), renews
-- its lease and records what was delivered: its cost, and (version 3) the prompt and completion
-- tokens that cost is of, which the sweep counts against the plan (migration 0021). Its current
-- definition lives here (migrations 0002 and 0010 are its history). p_from, the hold as the
-- caller knows it: an extension is applied to that hold only, so a retry of one whose answer
-- was lost (it committed, the connection dropped) finds it applied and answers as it left it,
-- rather than holding the amount twice, or refusing it for want of the balance to hold it
-- twice. Without p_from (an instance of an earlier version, calling with four arguments) it
-- applies as it always did, and without the token counts (one of version 2, with five) records
-- none: one function for all, the shorter ones dropped.
DROP FUNCTION IF EXISTS tollway_extend(uuid, numeric, int, numeric);
DROP FUNCTION IF EXISTS tollway_extend(uuid, numeric, int, numeric, numeric);
CREATE OR REPLACE FUNCTION tollway_extend(p_id uuid, p_amount numeric, p_lease_seconds int,
  p_delivered numeric DEFAULT NULL, p_from numeric DEFAULT NULL,
  p_prompt_tokens int DEFAULT NULL, p_completion_tokens int DEFAULT NULL)
RETURNS numeric LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
  r record;
BEGIN
  SELECT * INTO r FROM reservations WHERE id = p_id FOR UPDATE;
  IF NOT FOUND THEN RETURN NULL; END IF;
  -- The tokens with the cost (a model priced at nothing delivers tokens at no cost).
  IF p_delivered IS NOT NULL AND (p_delivered > r.delivered
      OR p_completion_tokens > r.delivered_completion_tokens) THEN
    UPDATE reservations SET delivered = greatest(delivered, least(p_delivered, held)),
      delivered_prompt_tokens = coalesce(p_prompt_tokens, delivered_prompt_tokens),
      delivered_completion_tokens = greatest(delivered_completion_tokens,
        coalesce(p_completion_tokens, 0))
      WHERE id = p_id;
  END IF;
  IF r.account_id IS NOT NULL THEN
    PERFORM set_config('synchronous_commit', 'off', true); -- see 0001_ledger.sql
  ELSIF r.stream AND EXISTS (SELECT 1 FROM channels WHERE channel_id = r.channel_id
      AND (active_stream IS DISTINCT FROM p_id OR close_requested_at IS NOT NULL OR finalized)) THEN
    -- A stream another replaced, or on a channel being closed, ends (as superseded): its
    -- payer will sign no more vouchers here, and the close waits for what it delivered.
    RETURN -1;
  END IF;
  IF p_from IS NOT NULL AND r.held <> p_from THEN
    -- Applied already, by the attempt whose answer was lost: renewed, and answered as is.
    UPDATE reservations SET expires_at = clock_timestamp() + make_interval(secs => p_lease_seconds)
      WHERE id = p_id;
    RETURN r.held;
  END IF;
  IF p_amount > 0 THEN
    IF r.account_id IS NOT NULL THEN
      UPDATE accounts SET reserved = reserved + p_amount
        WHERE id = r.account_id AND balance - reserved >= p_amount;
    ELSE
      UPDATE channels SET reserved = reserved + p_amount
        WHERE channel_id = r.channel_id AND accepted_cumulative - spent - reserved >= p_amount
          AND NOT finalized AND close_requested_at IS NULL;
    END IF;
    IF NOT FOUND THEN RETURN NULL; END IF;
  END IF;
  UPDATE reservations SET held = held + p_amount,
    expires_at = clock_timestamp() + make_interval(secs => p_lease_seconds)
    WHERE id = p_id;
  RETURN r.held + p_amount;
END $$;
