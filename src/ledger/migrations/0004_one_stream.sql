-- One active stream per channel: a new stream on a channel ends the one before it, on
-- whichever instance it runs (the old stream's next reservation extension is refused).
ALTER TABLE channels ADD COLUMN active_stream uuid;

CREATE OR REPLACE FUNCTION tollway_channel_admit(
  p_channel bytea,
  p_model text,
  p_stream boolean,
  p_want numeric,
  p_need numeric,
  p_request_id uuid,
  p_lease_seconds int
) RETURNS TABLE (status text, held numeric, available numeric, accepted_cumulative numeric, deposit numeric, spent numeric)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
  c record;
  free numeric;
  amount numeric;
BEGIN
  SELECT * INTO c FROM channels WHERE channel_id = p_channel FOR UPDATE;
  IF NOT FOUND THEN
    RETURN QUERY SELECT 'not_found', NULL::numeric, NULL::numeric, NULL::numeric, NULL::numeric, NULL::numeric;
    RETURN;
  END IF;
  IF c.finalized OR c.close_requested_at IS NOT NULL THEN
    RETURN QUERY SELECT CASE WHEN c.finalized THEN 'finalized' ELSE 'close_requested' END,
      NULL::numeric, NULL::numeric, c.accepted_cumulative, c.deposit, c.spent;
    RETURN;
  END IF;
  free := c.accepted_cumulative - c.spent - c.reserved;
  IF free < p_need THEN
    RETURN QUERY SELECT 'insufficient', NULL::numeric, free, c.accepted_cumulative, c.deposit, c.spent;
    RETURN;
  END IF;
  amount := least(p_want, free);
  UPDATE channels SET reserved = reserved + amount,
    active_stream = CASE WHEN p_stream THEN p_request_id ELSE active_stream END
    WHERE channel_id = p_channel;
  INSERT INTO reservations (id, channel_id, model, stream, held, expires_at)
    VALUES (p_request_id, p_channel, p_model, p_stream, amount, clock_timestamp() + make_interval(secs => p_lease_seconds));
  RETURN QUERY SELECT 'ok', amount, free - amount, c.accepted_cumulative, c.deposit, c.spent;
END $$;

-- As 0002's, and a superseded stream (another stream took the channel) gets -1.
CREATE OR REPLACE FUNCTION tollway_extend(p_id uuid, p_amount numeric, p_lease_seconds int)
RETURNS numeric LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
  r record;
BEGIN
  SELECT * INTO r FROM reservations WHERE id = p_id FOR UPDATE;
  IF NOT FOUND THEN RETURN NULL; END IF;
  IF r.account_id IS NOT NULL THEN
    PERFORM set_config('synchronous_commit', 'off', true); -- see 0001_ledger.sql
    IF p_amount > 0 THEN
      UPDATE accounts SET reserved = reserved + p_amount
        WHERE id = r.account_id AND balance - reserved >= p_amount;
      IF NOT FOUND THEN RETURN NULL; END IF;
    END IF;
  ELSE
    IF r.stream AND EXISTS (SELECT 1 FROM channels WHERE channel_id = r.channel_id AND active_stream <> p_id) THEN
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
