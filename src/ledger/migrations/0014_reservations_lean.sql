-- Reservations without an index on their lease's end. Only the lease sweep read it (every 30 s
-- an instance, and before a channel's close), over a table that holds the requests under way
-- and no more: a scan of it is as cheap. Every admission wrote the index, and every lease
-- renewal (each block a stream extends, each wait for a voucher) moved the reservation's entry
-- in it: an update of an indexed column, so PostgreSQL could never update the row in place
-- (HOT) and wrote new entries in both its indexes. Rows also leave room on their page for
-- such updates.
DROP INDEX IF EXISTS reservations_expiry;
ALTER TABLE reservations SET (fillfactor = 70);
