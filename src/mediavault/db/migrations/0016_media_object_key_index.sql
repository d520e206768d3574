-- mediavault: no-transaction
-- The orphan sweep asks, for every object it lists, whether a media row not yet purged names it
-- (domain/cleanup.py, _OWNED): without an index, each key read all of media. The predicate is the
-- query's own, so that the planner can use the index. Built concurrently, as media takes writes
-- all along; a build cut short leaves an INVALID index of this name, which the DROP takes away
-- when the migration runs again.
DROP INDEX CONCURRENTLY IF EXISTS media_object_key;
CREATE INDEX CONCURRENTLY media_object_key ON media (object_key) WHERE purged_at IS NULL;
