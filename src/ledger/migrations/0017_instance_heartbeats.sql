-- Each instance's heartbeat (Instances.ts): its name (the application_name of its sessions,
-- which its reservations record, migration 0016) and when it last beat. An instance whose
-- heartbeat is older than a dead instance's threshold is dead: its reservations are released
-- without waiting for their lease. A heartbeat, not the presence of a session: a session can
-- close while its instance lives (a pooler or proxy restarting, a connection reset) and a dead
-- host's can linger until TCP keepalive gives up.
CREATE TABLE tollway_instances (
  name       text PRIMARY KEY,
  started_at timestamptz NOT NULL DEFAULT now(),
  seen_at    timestamptz NOT NULL DEFAULT now()
);
