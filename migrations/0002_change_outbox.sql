-- Invalidations derived from PostgreSQL's own commits: every change to biz.ai_cache, by any writer
-- (TieredCache, ETL, psql), records its keys here in the writer's transaction. A rolled-back write
-- records nothing; NOTIFY is delivered only on commit and only wakes the relay: this table is the truth.
CREATE TABLE IF NOT EXISTS biz.ai_cache_changes (
    seq        bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    cache_type text,            -- NULL on all three: the table was truncated, drop everything
    site_id    bigint,
    target_id  text,
    changed_at timestamptz NOT NULL DEFAULT clock_timestamp()
);

-- Where each relay got to, for lag monitoring; a change row is deleted only once Redis confirmed it.
CREATE TABLE IF NOT EXISTS biz.ai_cache_relay_state (
    relay      text PRIMARY KEY,
    last_seq   bigint NOT NULL DEFAULT 0,
    applied    bigint NOT NULL DEFAULT 0,
    updated_at timestamptz NOT NULL DEFAULT now()
);

CREATE OR REPLACE FUNCTION biz.ai_cache_record_change() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        INSERT INTO biz.ai_cache_changes (cache_type, site_id, target_id)
        SELECT DISTINCT cache_type, site_id, target_id FROM new_rows;
    ELSIF TG_OP = 'DELETE' THEN
        INSERT INTO biz.ai_cache_changes (cache_type, site_id, target_id)
        SELECT DISTINCT cache_type, site_id, target_id FROM old_rows;
    ELSIF TG_OP = 'UPDATE' THEN
        INSERT INTO biz.ai_cache_changes (cache_type, site_id, target_id)
        SELECT cache_type, site_id, target_id FROM old_rows
        UNION
        SELECT cache_type, site_id, target_id FROM new_rows;
    ELSE  -- TRUNCATE
        INSERT INTO biz.ai_cache_changes (cache_type, site_id, target_id) VALUES (NULL, NULL, NULL);
    END IF;
    PERFORM pg_notify('tiered_cache_changes', '');
    RETURN NULL;
END;
$$;

-- Transition tables allow one event per trigger, hence three (and one for TRUNCATE).
DROP TRIGGER IF EXISTS ai_cache_changes_insert ON biz.ai_cache;
CREATE TRIGGER ai_cache_changes_insert AFTER INSERT ON biz.ai_cache
    REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION biz.ai_cache_record_change();
DROP TRIGGER IF EXISTS ai_cache_changes_update ON biz.ai_cache;
CREATE TRIGGER ai_cache_changes_update AFTER UPDATE ON biz.ai_cache
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION biz.ai_cache_record_change();
DROP TRIGGER IF EXISTS ai_cache_changes_delete ON biz.ai_cache;
CREATE TRIGGER ai_cache_changes_delete AFTER DELETE ON biz.ai_cache
    REFERENCING OLD TABLE AS old_rows FOR EACH STATEMENT EXECUTE FUNCTION biz.ai_cache_record_change();
DROP TRIGGER IF EXISTS ai_cache_changes_truncate ON biz.ai_cache;
CREATE TRIGGER ai_cache_changes_truncate AFTER TRUNCATE ON biz.ai_cache
    FOR EACH STATEMENT EXECUTE FUNCTION biz.ai_cache_record_change();
