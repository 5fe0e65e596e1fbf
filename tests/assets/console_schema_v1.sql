-- The console database schema before roles, token scopes and expiry, login addresses
-- and retention (console/db.py at c2f6da7), to test that init_db upgrades it in place.
CREATE TABLE IF NOT EXISTS users (
    id INTEGER PRIMARY KEY,
    username TEXT NOT NULL UNIQUE,
    password_hash TEXT NOT NULL,
    is_admin INTEGER NOT NULL DEFAULT 0,
    created_at REAL NOT NULL
);

CREATE TABLE IF NOT EXISTS api_tokens (
    id INTEGER PRIMARY KEY,
    user_id INTEGER NOT NULL REFERENCES users (id),
    name TEXT NOT NULL,
    token_sha256 TEXT NOT NULL UNIQUE,
    created_at REAL NOT NULL,
    last_used_at REAL,
    revoked_at REAL
);

CREATE TABLE IF NOT EXISTS studies (
    id INTEGER PRIMARY KEY,
    study_key TEXT NOT NULL UNIQUE,
    label TEXT NOT NULL,
    study_uid TEXT,
    series_uid TEXT,
    source TEXT NOT NULL,
    priority INTEGER NOT NULL,
    status TEXT NOT NULL DEFAULT 'queued' CHECK (status IN
        ('queued', 'processing', 'flagged', 'negative', 'failed', 'acknowledged')),
    score REAL,
    threshold REAL,
    key_slice_id INTEGER,
    model_name TEXT,
    model_version TEXT,
    received_at REAL NOT NULL,
    finished_at REAL,
    flagged_at REAL,
    acknowledged_at REAL,
    acknowledged_by TEXT,
    updated_at REAL NOT NULL
);

CREATE TABLE IF NOT EXISTS slices (
    id INTEGER PRIMARY KEY,
    study_id INTEGER NOT NULL REFERENCES studies (id),
    filename TEXT NOT NULL,
    stored_path TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    sop_uid TEXT,
    instance_number INTEGER,
    slice_position_mm REAL,
    status TEXT NOT NULL DEFAULT 'queued' CHECK (status IN
        ('queued', 'processing', 'classified', 'failed')),
    priority INTEGER NOT NULL,
    queued_at REAL NOT NULL,
    started_at REAL,
    finished_at REAL,
    attempts INTEGER NOT NULL DEFAULT 0,
    probability REAL,
    head_fraction REAL,
    error TEXT,
    ingest_ms REAL,
    decode_ms REAL,
    preprocess_ms REAL,
    queue_wait_ms REAL,
    inference_ms REAL,
    UNIQUE (study_id, sha256)
);

CREATE INDEX IF NOT EXISTS slices_queue ON slices (status, priority, queued_at, id);
CREATE INDEX IF NOT EXISTS slices_study ON slices (study_id);

CREATE TABLE IF NOT EXISTS audit_log (
    id INTEGER PRIMARY KEY,
    at REAL NOT NULL,
    username TEXT NOT NULL,
    action TEXT NOT NULL,
    study_id INTEGER REFERENCES studies (id),
    detail TEXT NOT NULL DEFAULT ''
);
