-- Two partial indexes duplicated later ones with the same predicate and a better key:
-- uploads_pending_oldest (user_id, created_at) answers every per-user pending lookup that
-- uploads_pending_by_user (user_id) did, and media_stuck (updated_at) is the order the stuck
-- sweep reads in, which media_unfinished (processing_status, updated_at) was not. Every
-- upload and every media status change paid for maintaining both.

DROP INDEX uploads_pending_by_user;
DROP INDEX media_unfinished;
