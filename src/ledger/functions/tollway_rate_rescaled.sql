-- version: 1
-- tollway_rate_rescaled: an account's request-rate state (rate_tat, the GCRA's theoretical
-- arrival time) moved from a plan of p_from requests a minute to one of p_to, at p_ts. The
-- state counts requests in the old plan's periods (a minute over its limit): how far it runs
-- ahead of now is the requests the minute still holds against the account. Left as it was, that
-- time read in the new plan's periods counted them anew: an account moved from 10 a minute to
-- 60 with its 10 sent was held as if it had sent 60 (refused, then one a second), and one moved
-- from 60 to 10 with 10 sent was let 8 more at once (18 in the minute of a plan of 10). Rescaled,
-- the requests it stands for stay the same: p_tat - p_ts times the new period over the old,
-- at most the new plan's whole minute (a downgraded account that sent more than the new limit
-- waits one new period, not minutes for requests the old plan allowed). No limit before or
-- after (NULL): no requests counted, the state NULL (a plan without a limit does not keep it).
-- Called where an account's plan changes (Accounts.update) and where a plan's limit does
-- (Accounts.syncPlans), in the statement that changes it.
CREATE OR REPLACE FUNCTION tollway_rate_rescaled(p_tat timestamptz, p_from int, p_to int,
  p_ts timestamptz)
RETURNS timestamptz LANGUAGE sql IMMUTABLE AS $$
  SELECT CASE
    WHEN p_from IS NULL OR p_to IS NULL THEN NULL
    WHEN p_tat IS NULL OR p_tat <= p_ts OR p_from = p_to THEN p_tat
    -- The periods as admission takes them: a minute over the limit, rounded down to a
    -- microsecond (functions/tollway_ledger_batch.sql), and the new limit's periods its span.
    ELSE p_ts + least(
      (p_tat - p_ts) * ((60000000 / p_to)::double precision / (60000000 / p_from)),
      interval '1 microsecond' * (60000000 / p_to) * p_to)
  END
$$;
