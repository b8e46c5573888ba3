-- The public keys completion receipts were signed with (metering/Receipt.ts), by key id. Each
-- instance keeps its receipt key in its own data dir unless RECEIPT_KEY is shared: instances
-- behind one address with a key each signed receipts that only the key of the instance that
-- answered verified, while GET /v1/receipts/key answered with the key of whichever instance
-- was asked. Each instance publishes its key here as it starts, and GET
-- /v1/receipts/key?key_id= finds any of them (a key rotated out stays, for the receipts it
-- signed). Public keys only: the private key never leaves the instance.
CREATE TABLE receipt_keys (
  key_id     text PRIMARY KEY CHECK (key_id ~ '^[0-9a-f]{16}$'),
  public_key text NOT NULL CHECK (public_key ~ '^[A-Za-z0-9_-]{43}$'),
  first_seen timestamptz NOT NULL DEFAULT now()
);
