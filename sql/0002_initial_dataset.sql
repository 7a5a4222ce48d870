-- The initial dataset from the original request, applied once ever: this migration is
-- recorded in kv_schema_migrations in the same transaction, so a later start never
-- re-creates a seeded key that a user deleted or changed.
INSERT INTO kv_changes (id, k, origin, changed_at) VALUES
  (1, 'Homer', 0, UTC_TIMESTAMP(6)),
  (2, 'Jeffrey', 0, UTC_TIMESTAMP(6)),
  (3, 'Stan', 0, UTC_TIMESTAMP(6));

INSERT INTO kv_entries (k, v, version, rev, created_at, updated_at, expires_at) VALUES
  ('Homer', '"Simpson"', 1, 1, UTC_TIMESTAMP(6), UTC_TIMESTAMP(6), NULL),
  ('Jeffrey', '"Lebowski"', 1, 2, UTC_TIMESTAMP(6), UTC_TIMESTAMP(6), NULL),
  ('Stan', '"Smith"', 1, 3, UTC_TIMESTAMP(6), UTC_TIMESTAMP(6), NULL);
