-- Single flight for get_or_generate: one generation lease per key, arbitrated by PostgreSQL (so it holds
-- with Redis down or failed over). The token grows by one per lease granted on a key and fences writers:
-- a finalize carrying an older token, or for a placeholder retired by a takeover or a sweep, changes nothing.
CREATE TABLE IF NOT EXISTS biz.ai_cache_leases (
    cache_type  text        NOT NULL,
    site_id     bigint      NOT NULL,
    target_id   text        NOT NULL,
    token       bigint      NOT NULL DEFAULT 0,
    holder      text,                               -- NULL: released
    expires_at  timestamptz NOT NULL DEFAULT '-infinity',  -- lapses here unless its holder heartbeats
    placeholder bigint,                             -- the 'generating' row of the current token
    failed      text,                               -- the last holder's generate() error, for its waiters
    PRIMARY KEY (cache_type, site_id, target_id)
);

-- The token of the lease a placeholder was made under (NULL: a plain set_generating, unfenced).
ALTER TABLE biz.ai_cache ADD COLUMN IF NOT EXISTS gen_token bigint;

-- One round trip, and each statement here sees what committed before it (READ COMMITTED takes a new
-- snapshot per statement in PL/pgSQL): after waiting for the key's lease row, a result finalized by the
-- holder we waited for is seen, so no second generation starts. Outcomes:
--   current  a servable row other than the one the caller saw exists (current_id): use it
--   busy     a live lease is held by another caller (token: the one to wait for)
--   failed   the lease the caller waited for (p_waited) ended with generate() raising (failed: its error)
--   won      the caller holds the lease now (token, placeholder); taken_over: it had lapsed unreleased
CREATE OR REPLACE FUNCTION biz.ai_cache_acquire(
    p_cache_type text, p_site_id bigint, p_target_id text, p_seen bigint, p_waited bigint,
    p_holder text, p_ttl interval, p_triggered_by text,
    OUT outcome text, OUT token bigint, OUT placeholder bigint, OUT current_id bigint, OUT failed text)
LANGUAGE plpgsql AS $$
DECLARE
    l biz.ai_cache_leases%ROWTYPE;
BEGIN
    INSERT INTO biz.ai_cache_leases (cache_type, site_id, target_id)
    VALUES (p_cache_type, p_site_id, p_target_id) ON CONFLICT DO NOTHING;
    SELECT * INTO l FROM biz.ai_cache_leases
    WHERE cache_type = p_cache_type AND site_id = p_site_id AND target_id = p_target_id FOR UPDATE;
    token := l.token;
    SELECT a.id INTO current_id FROM biz.ai_cache a
    WHERE a.cache_type = p_cache_type AND a.site_id = p_site_id AND a.target_id = p_target_id
      AND (a.status = 'valid' OR a.status IS NULL) AND (a.expires_at IS NULL OR a.expires_at > clock_timestamp())
    ORDER BY a.created_at DESC, a.id DESC LIMIT 1;
    IF current_id IS NOT NULL AND current_id IS DISTINCT FROM p_seen THEN
        outcome := 'current';
        RETURN;
    END IF;
    IF l.holder IS NOT NULL AND l.expires_at > clock_timestamp() THEN
        outcome := 'busy';
        RETURN;
    END IF;
    IF l.holder IS NULL AND l.failed IS NOT NULL AND l.token = p_waited THEN
        outcome := 'failed';
        failed := l.failed;
        RETURN;
    END IF;
    outcome := CASE WHEN l.holder IS NULL THEN 'won' ELSE 'taken_over' END;
    token := l.token + 1;
    -- Fencing: placeholders of earlier leases can no longer be finalized (finalize needs 'generating').
    UPDATE biz.ai_cache SET status = 'expired'
    WHERE cache_type = p_cache_type AND site_id = p_site_id AND target_id = p_target_id
      AND status = 'generating' AND gen_token IS NOT NULL;
    INSERT INTO biz.ai_cache (cache_type, site_id, target_id, result_json, status, triggered_by, gen_token)
    VALUES (p_cache_type, p_site_id, p_target_id, '{}'::jsonb, 'generating', p_triggered_by, token)
    RETURNING id INTO placeholder;
    UPDATE biz.ai_cache_leases AS u
    SET token = ai_cache_acquire.token, holder = p_holder, expires_at = clock_timestamp() + p_ttl,
        placeholder = ai_cache_acquire.placeholder, failed = NULL
    WHERE u.cache_type = p_cache_type AND u.site_id = p_site_id AND u.target_id = p_target_id;
END;
$$;
