-- Which instance holds a reservation: the application_name of the session that wrote it (each
-- instance's pool names its connections `tollway/<random>`, Db.connect). A reservation whose
-- instance has had no session for a while is a dead instance's: the sweep releases it then
-- (Instances.ts), not after its lease (10 minutes), which kept a plan's concurrency taken that
-- long after an instance was killed. Rows of earlier releases' instances carry their default
-- name (`postgres.js`) and are left to their lease. Set as a default, after the column is
-- added: existing rows are not rewritten.
ALTER TABLE reservations ADD COLUMN instance text;
ALTER TABLE reservations ALTER COLUMN instance SET DEFAULT current_setting('application_name');
