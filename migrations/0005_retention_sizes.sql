-- sweep()'s retention, amortized: what each (cache_type, site_id) group held at its last pass, so a pass
-- counts only the rows written since and walks a group's newest rows (up to `retention` index entries, the
-- cost that grew with group size) only once the group may hold 10% more than `retention`, or once its
-- last exact count is an hour old (rows the estimate cannot see: ids or created_at set by an ETL job, a
-- transaction that committed after a later id was counted, a TRUNCATE no trigger saw).
CREATE TABLE IF NOT EXISTS biz.ai_cache_group_sizes (
    cache_type text        NOT NULL,
    site_id    bigint      NOT NULL,
    rows       bigint      NOT NULL,  -- rows counted at the last exact pass (at most `retention`) plus those since
    max_id     bigint      NOT NULL,  -- the newest id counted
    counted_at timestamptz NOT NULL,
    exact_at   timestamptz NOT NULL,  -- when rows was last counted exactly
    PRIMARY KEY (cache_type, site_id)
);

-- A TRUNCATE of the table (RESTART IDENTITY reuses ids) makes every count meaningless: start again.
CREATE OR REPLACE FUNCTION biz.ai_cache_forget_sizes() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    DELETE FROM biz.ai_cache_group_sizes;
    RETURN NULL;
END;
$$;

DROP TRIGGER IF EXISTS ai_cache_forget_sizes ON biz.ai_cache;
CREATE TRIGGER ai_cache_forget_sizes AFTER TRUNCATE ON biz.ai_cache
    FOR EACH STATEMENT EXECUTE FUNCTION biz.ai_cache_forget_sizes();
