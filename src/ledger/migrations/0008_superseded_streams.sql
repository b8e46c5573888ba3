-- One active stream per channel: a new stream takes the channel over (0002's active_stream)
-- and the one before it must end. It learned so only at its next extension, which a stream
-- holding a large reservation may not make for a thousand tokens. Now the change of
-- active_stream, while the stream it replaces still holds its reservation, is announced on
-- `tollway_superseded` with that stream's id: every instance LISTENs and ends it at once.
CREATE FUNCTION tollway_stream_superseded() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  IF EXISTS (SELECT 1 FROM reservations WHERE id = OLD.active_stream) THEN
    PERFORM pg_notify('tollway_superseded', OLD.active_stream::text);
  END IF;
  RETURN NULL;
END $$;
CREATE TRIGGER channels_stream_superseded AFTER UPDATE OF active_stream ON channels
  FOR EACH ROW
  WHEN (OLD.active_stream IS NOT NULL AND OLD.active_stream IS DISTINCT FROM NEW.active_stream)
  EXECUTE FUNCTION tollway_stream_superseded();
