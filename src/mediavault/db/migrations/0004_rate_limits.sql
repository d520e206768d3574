-- Per-RPC rate limits, changed by operators at runtime; servers reload them every few seconds.
-- scope: 'user' (a caller with a user token), 'service' (roles service/admin; no row = exempt),
-- 'anonymous' (calls without a valid token, limited per client address). method '*' is the default.

CREATE TABLE rate_limit_config (
    method           text NOT NULL,
    scope            text NOT NULL CHECK (scope IN ('user', 'service', 'anonymous')),
    per_hour         integer NOT NULL CHECK (per_hour > 0),
    burst_per_second integer NOT NULL CHECK (burst_per_second > 0),
    updated_at       timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (method, scope)
);

INSERT INTO rate_limit_config (method, scope, per_hour, burst_per_second) VALUES
    ('StorageService/BeginUpload', 'user', 100, 10),
    ('StorageService/FinalizeUpload', 'user', 100, 10),
    ('StorageService/UploadContent', 'user', 100, 10),
    ('MediaService/ListFeed', 'user', 1000, 20),
    ('MediaService/ReprocessMedia', 'user', 50, 5),
    ('StorageService/GetStorageSummary', 'user', 100, 10),
    ('*', 'user', 10000, 50),
    ('*', 'anonymous', 600, 10);
