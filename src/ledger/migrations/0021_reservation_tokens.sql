-- The tokens a reservation's `delivered` was the cost of (its prompt's, and the completion's sent
-- by then), recorded with it by tollway_extend (version 3). A reservation the sweep releases (its
-- instance dead, or its lease out) is charged `delivered`, and counts these against its plan's
-- month and token wallet as a finish counts its tokens: it counted none, so a request whose
-- instance died was free of the monthly quota and the wallet whatever it had delivered.
-- Defaults, not rewrites: rows of requests under way during the deploy record nothing more until
-- their next extension, and count as before.
ALTER TABLE reservations ADD COLUMN delivered_prompt_tokens integer NOT NULL DEFAULT 0,
  ADD COLUMN delivered_completion_tokens integer NOT NULL DEFAULT 0;
