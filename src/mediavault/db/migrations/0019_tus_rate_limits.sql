-- The requests on a tus upload URL are limited against the owner the URL is signed for, as
-- tus/HEAD, tus/PATCH and tus/DELETE. A client sends one PATCH per chunk of its own choosing, back
-- to back, and tus-js-client does not retry a 429: with small chunks on a fast link an honest
-- upload outruns the default row's 50 a second, so PATCH gets a row of its own. HEAD and DELETE
-- keep the default row. An operator's own rows are kept.
INSERT INTO rate_limit_config (method, scope, per_hour, burst_per_second) VALUES
    ('tus/PATCH', 'user', 100000, 500)
ON CONFLICT (method, scope) DO NOTHING;
