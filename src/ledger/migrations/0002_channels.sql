-- Payment channels (MPP session, method evm): the server-side accounting of each channel,
-- metered through the same reservations, extend and finish as API-key credits.
--
-- Invariant (CHECKs below): settled <= spent, spent + reserved <= accepted_cumulative <= deposit.
-- deposit, accepted_cumulative, spent and settled only grow (trigger below). `spent` is what
-- delivered service cost; `reserved` is what in-flight requests hold, persisted before the
-- tokens it pays for are sent, and reconciled into `spent` at the end of each request.
-- Everything here commits synchronously: a voucher is durable before the balance it adds
-- is used.

CREATE TABLE channels (
  channel_id          bytea PRIMARY KEY CHECK (octet_length(channel_id) = 32),
  chain_id            bigint NOT NULL,
  escrow              bytea NOT NULL CHECK (octet_length(escrow) = 20),
  payer               bytea NOT NULL CHECK (octet_length(payer) = 20),
  payee               bytea NOT NULL CHECK (octet_length(payee) = 20),
  token               bytea NOT NULL CHECK (octet_length(token) = 20),
  -- authorizedSigner when set, else the payer: who signs vouchers.
  signer              bytea NOT NULL CHECK (octet_length(signer) = 20),
  deposit             numeric(78, 0) NOT NULL,
  accepted_cumulative numeric(78, 0) NOT NULL DEFAULT 0,
  -- The signature of the voucher for accepted_cumulative (what settlement submits).
  voucher_signature   bytea,
  spent               numeric(78, 0) NOT NULL DEFAULT 0,
  reserved            numeric(78, 0) NOT NULL DEFAULT 0,
  settled             numeric(78, 0) NOT NULL DEFAULT 0,
  close_requested_at  timestamptz,
  finalized           boolean NOT NULL DEFAULT false,
  -- One active stream per channel: a new stream ends the one before it, on whichever
  -- instance it runs (the old stream's next reservation extension is refused).
  active_stream       uuid,
  created_at          timestamptz NOT NULL DEFAULT now(),
  updated_at          timestamptz NOT NULL DEFAULT now(),
  CONSTRAINT channel_amounts_bounded CHECK (deposit < 2::numeric ^ 128),
  CONSTRAINT channel_settled_not_negative CHECK (settled >= 0),
  CONSTRAINT channel_reserved_not_negative CHECK (reserved >= 0),
  CONSTRAINT channel_settled_within_spent CHECK (settled <= spent),
  CONSTRAINT channel_spent_within_accepted CHECK (spent + reserved <= accepted_cumulative),
  CONSTRAINT channel_accepted_within_deposit CHECK (accepted_cumulative <= deposit)
);

CREATE FUNCTION tollway_channel_monotonic() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  IF NEW.deposit < OLD.deposit OR NEW.accepted_cumulative < OLD.accepted_cumulative
     OR NEW.spent < OLD.spent OR NEW.settled < OLD.settled OR (OLD.finalized AND NOT NEW.finalized) THEN
    RAISE EXCEPTION 'channel % amounts only grow', encode(OLD.channel_id, 'hex')
      USING ERRCODE = 'check_violation';
  END IF;
  NEW.updated_at := now();
  RETURN NEW;
END $$;
CREATE TRIGGER channels_monotonic BEFORE UPDATE ON channels
  FOR EACH ROW EXECUTE FUNCTION tollway_channel_monotonic();

-- Every accepted voucher, append-only: the audit trail behind accepted_cumulative.
CREATE TABLE vouchers (
  channel_id        bytea NOT NULL REFERENCES channels (channel_id),
  cumulative_amount numeric(78, 0) NOT NULL,
  signature         bytea NOT NULL,
  accepted_at       timestamptz NOT NULL DEFAULT now(),
  PRIMARY KEY (channel_id, cumulative_amount)
);
CREATE TRIGGER vouchers_append_only BEFORE UPDATE OR DELETE ON vouchers
  FOR EACH ROW EXECUTE FUNCTION tollway_append_only();

-- Reservations and usage rows belong to an account or to a channel.
ALTER TABLE reservations ALTER COLUMN account_id DROP NOT NULL;
ALTER TABLE reservations ADD COLUMN channel_id bytea REFERENCES channels (channel_id);
ALTER TABLE reservations ADD CONSTRAINT reservation_payer CHECK (num_nonnulls(account_id, channel_id) = 1);
-- What the request had delivered (the cost of what it sent) at its last extend. The sweep
-- charges it when the request's instance died: charging nothing there gave away everything a
-- dead instance had sent (a whole stream, for a channel: its payee was never paid for it).
-- What goes unpaid is at most the block in flight. Invariant: 0 <= delivered <= held.
ALTER TABLE reservations ADD COLUMN delivered numeric(78, 0) NOT NULL DEFAULT 0;
ALTER TABLE reservations ADD CONSTRAINT reservation_delivered_within_held
  CHECK (delivered >= 0 AND delivered <= held);
ALTER TABLE usage ALTER COLUMN account_id DROP NOT NULL;
ALTER TABLE usage ADD COLUMN channel_id bytea REFERENCES channels (channel_id);
ALTER TABLE usage ADD CONSTRAINT usage_payer CHECK (num_nonnulls(account_id, channel_id) = 1);
CREATE INDEX usage_channel ON usage (channel_id, created_at DESC, id DESC) WHERE channel_id IS NOT NULL;

-- Idempotency-Key on channel-paid requests: at most one charged request per (channel, key);
-- a duplicate never adds to spent (draft, Request Idempotency).
CREATE TABLE channel_idempotency_keys (
  channel_id  bytea NOT NULL REFERENCES channels (channel_id),
  key         text NOT NULL,
  fingerprint bytea NOT NULL,
  request_id  uuid NOT NULL,
  state       text NOT NULL CHECK (state IN ('in_progress', 'completed')),
  created_at  timestamptz NOT NULL DEFAULT now(),
  PRIMARY KEY (channel_id, key)
);

-- Records a voucher whose signature the caller has verified against the channel's signer.
-- Follows the draft's order after the signature check: a voucher at or below the accepted
-- amount is an idempotent replay (no change); else it must raise the accepted amount by at
-- least p_min_delta and stay within the deposit. Wakes paused streams (NOTIFY).
CREATE FUNCTION tollway_accept_voucher(p_channel bytea, p_amount numeric, p_signature bytea, p_min_delta numeric)
RETURNS TABLE (status text, accepted_cumulative numeric, deposit numeric, spent numeric, reserved numeric)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
  c record;
BEGIN
  SELECT * INTO c FROM channels WHERE channel_id = p_channel FOR UPDATE;
  IF NOT FOUND THEN
    RETURN QUERY SELECT 'not_found', NULL::numeric, NULL::numeric, NULL::numeric, NULL::numeric;
    RETURN;
  END IF;
  IF c.finalized THEN
    RETURN QUERY SELECT 'finalized', c.accepted_cumulative, c.deposit, c.spent, c.reserved;
    RETURN;
  END IF;
  IF c.close_requested_at IS NOT NULL THEN
    RETURN QUERY SELECT 'close_requested', c.accepted_cumulative, c.deposit, c.spent, c.reserved;
    RETURN;
  END IF;
  IF p_amount <= c.accepted_cumulative THEN
    RETURN QUERY SELECT 'replay', c.accepted_cumulative, c.deposit, c.spent, c.reserved;
    RETURN;
  END IF;
  IF p_amount - c.accepted_cumulative < p_min_delta THEN
    RETURN QUERY SELECT 'delta_too_small', c.accepted_cumulative, c.deposit, c.spent, c.reserved;
    RETURN;
  END IF;
  IF p_amount > c.deposit THEN
    RETURN QUERY SELECT 'exceeds_deposit', c.accepted_cumulative, c.deposit, c.spent, c.reserved;
    RETURN;
  END IF;
  UPDATE channels SET accepted_cumulative = p_amount, voucher_signature = p_signature WHERE channel_id = p_channel;
  INSERT INTO vouchers (channel_id, cumulative_amount, signature) VALUES (p_channel, p_amount, p_signature);
  PERFORM pg_notify('tollway_channel', encode(p_channel, 'hex'));
  RETURN QUERY SELECT 'accepted', p_amount, c.deposit, c.spent, c.reserved;
END $$;

-- Admission of a request paid from a channel: holds between p_need and p_want of the
-- channel's authorized balance (accepted_cumulative - spent - reserved).
CREATE FUNCTION tollway_channel_admit(
  p_channel bytea,
  p_model text,
  p_stream boolean,
  p_want numeric,
  p_need numeric,
  p_request_id uuid,
  p_lease_seconds int,
  p_idem_key text,
  p_fingerprint bytea
) RETURNS TABLE (status text, held numeric, available numeric, accepted_cumulative numeric, deposit numeric, spent numeric, other_request uuid)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
  c record;
  free numeric;
  amount numeric;
  idem record;
BEGIN
  SELECT * INTO c FROM channels WHERE channel_id = p_channel FOR UPDATE;
  IF NOT FOUND THEN
    RETURN QUERY SELECT 'not_found', NULL::numeric, NULL::numeric, NULL::numeric, NULL::numeric, NULL::numeric, NULL::uuid;
    RETURN;
  END IF;
  IF c.finalized OR c.close_requested_at IS NOT NULL THEN
    RETURN QUERY SELECT CASE WHEN c.finalized THEN 'finalized' ELSE 'close_requested' END,
      NULL::numeric, NULL::numeric, c.accepted_cumulative, c.deposit, c.spent, NULL::uuid;
    RETURN;
  END IF;
  IF p_idem_key IS NOT NULL THEN
    SELECT * INTO idem FROM channel_idempotency_keys ik WHERE ik.channel_id = p_channel AND ik.key = p_idem_key;
    IF FOUND THEN
      RETURN QUERY SELECT
        CASE WHEN idem.fingerprint <> p_fingerprint THEN 'idempotency_mismatch'
             WHEN idem.state = 'in_progress' THEN 'idempotency_in_progress'
             ELSE 'idempotency_completed' END,
        NULL::numeric, NULL::numeric, c.accepted_cumulative, c.deposit, c.spent, idem.request_id;
      RETURN;
    END IF;
  END IF;
  free := c.accepted_cumulative - c.spent - c.reserved;
  IF free < p_need THEN
    RETURN QUERY SELECT 'insufficient', NULL::numeric, free, c.accepted_cumulative, c.deposit, c.spent, NULL::uuid;
    RETURN;
  END IF;
  amount := least(p_want, free);
  UPDATE channels SET reserved = reserved + amount,
    active_stream = CASE WHEN p_stream THEN p_request_id ELSE active_stream END
    WHERE channel_id = p_channel;
  INSERT INTO reservations (id, channel_id, model, stream, held, idem_key, expires_at)
    VALUES (p_request_id, p_channel, p_model, p_stream, amount, p_idem_key, clock_timestamp() + make_interval(secs => p_lease_seconds));
  IF p_idem_key IS NOT NULL THEN
    INSERT INTO channel_idempotency_keys (channel_id, key, fingerprint, request_id, state)
      VALUES (p_channel, p_idem_key, p_fingerprint, p_request_id, 'in_progress');
  END IF;
  RETURN QUERY SELECT 'ok', amount, free - amount, c.accepted_cumulative, c.deposit, c.spent, NULL::uuid;
END $$;

-- Adds p_amount to a reservation if its payer's free balance covers it, and renews its
-- lease. Returns the new total held; NULL when the payer cannot cover it or the
-- reservation is gone; -1 for a channel stream another stream replaced. Lock order
-- (reservation, then payer) matches tollway_finish. Channel rows commit synchronously.
-- p_delivered, the cost of what the request has sent so far, is recorded whether or not the
-- payer covers p_amount (a stream pausing for a voucher records it as it pauses); it never
-- goes down and never above what is held.
CREATE FUNCTION tollway_extend(p_id uuid, p_amount numeric, p_lease_seconds int, p_delivered numeric DEFAULT NULL)
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

CREATE FUNCTION tollway_channel_finish(
  r reservations,
  p_cost numeric,
  p_prompt_tokens int,
  p_completion_tokens int,
  p_status text,
  p_latency_ms int,
  p_ttft_ms int
) RETURNS TABLE (charged numeric, balance numeric, accepted_cumulative numeric, spent numeric)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
  c record;
  amount numeric;
BEGIN
  SELECT * INTO c FROM channels WHERE channel_id = r.channel_id FOR UPDATE;
  amount := greatest(0, least(p_cost, c.accepted_cumulative - c.spent - c.reserved + r.held));
  UPDATE channels SET spent = spent + amount, reserved = reserved - r.held WHERE channel_id = r.channel_id;
  INSERT INTO usage (id, channel_id, model, stream, prompt_tokens, completion_tokens, cost, status, latency_ms, ttft_ms)
    VALUES (r.id, r.channel_id, r.model, r.stream, p_prompt_tokens, p_completion_tokens, amount, p_status, p_latency_ms, p_ttft_ms);
  IF r.idem_key IS NOT NULL THEN
    IF amount > 0 OR p_status = 'ok' THEN
      UPDATE channel_idempotency_keys SET state = 'completed' WHERE channel_id = r.channel_id AND key = r.idem_key;
    ELSE
      DELETE FROM channel_idempotency_keys WHERE channel_id = r.channel_id AND key = r.idem_key;
    END IF;
  END IF;
  -- The channel after the charge too, for the request's receipt.
  RETURN QUERY SELECT amount, c.accepted_cumulative - c.spent - amount, c.accepted_cumulative, c.spent + amount;
END $$;

-- Ends a request, whoever pays: dispatches on the reservation's payer (accounts:
-- tollway_account_finish, defined in 0004; channels: tollway_channel_finish above).
CREATE FUNCTION tollway_finish(
  p_id uuid,
  p_cost numeric,
  p_prompt_tokens int,
  p_completion_tokens int,
  p_status text,
  p_latency_ms int,
  p_ttft_ms int
) RETURNS TABLE (charged numeric, balance numeric, accepted_cumulative numeric, spent numeric)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
  r reservations;
BEGIN
  SELECT * INTO r FROM reservations WHERE id = p_id FOR UPDATE;
  IF NOT FOUND THEN RETURN; END IF;
  IF r.account_id IS NOT NULL THEN
    RETURN QUERY SELECT f.*, NULL::numeric, NULL::numeric FROM tollway_account_finish(p_id, p_cost, p_prompt_tokens, p_completion_tokens, p_status, p_latency_ms, p_ttft_ms) f;
    RETURN;
  END IF;
  DELETE FROM reservations WHERE id = p_id;
  RETURN QUERY SELECT * FROM tollway_channel_finish(r, p_cost, p_prompt_tokens, p_completion_tokens, p_status, p_latency_ms, p_ttft_ms);
END $$;
