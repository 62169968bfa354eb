"""SQL text of get_or_generate's generation leases (migrations/0004); pure, shared by the sync and async code."""

from __future__ import annotations

from ._sql import _COLS, _KEY, _NEWEST, _SERVABLE

ACQUIRE = """
SELECT outcome, token, placeholder, current_id, failed FROM biz.ai_cache_acquire(
    %(cache_type)s, %(site_id)s, %(target_id)s, %(seen)s, %(waited)s, %(holder)s, %(ttl)s, %(triggered_by)s)
"""

# Only while the caller still holds the lease it was granted: a takeover moved the token on.
HEARTBEAT = f"""
UPDATE biz.ai_cache_leases SET expires_at = clock_timestamp() + %(ttl)s
WHERE {_KEY} AND token = %(token)s AND holder = %(holder)s
RETURNING 1
"""

# generate() raised: retire the placeholder and release the lease, leaving the error for waiters.
RELEASE_FAILED = f"""
WITH lease AS (
    UPDATE biz.ai_cache_leases SET holder = NULL, expires_at = clock_timestamp(), failed = %(failed)s
    WHERE {_KEY} AND token = %(token)s AND holder = %(holder)s
    RETURNING placeholder
)
UPDATE biz.ai_cache SET status = 'expired'
WHERE id = (SELECT placeholder FROM lease) AND status = 'generating'
RETURNING 1
"""

# FINALIZE (tiers/_sql.py) fenced: the row changes only if the lease still carries this caller's token, which
# it releases in the same statement. A takeover's UPDATE of the lease row is seen here (the row is locked and
# re-checked), so an older holder can never overwrite a newer result.
FINALIZE_FENCED = f"""
WITH fence AS (
    UPDATE biz.ai_cache_leases SET holder = NULL, expires_at = clock_timestamp(), failed = NULL
    WHERE {_KEY} AND token = %(token)s AND holder = %(holder)s AND placeholder = %(id)s
    RETURNING 1
), upd AS (
    UPDATE biz.ai_cache
    SET result_json = %(result_json)s::jsonb, score = %(score)s, status = 'valid', expires_at = %(expires_at)s
    WHERE id = %(id)s AND status = 'generating' AND EXISTS (SELECT 1 FROM fence)
    RETURNING {_COLS}, (expires_at IS NULL OR expires_at > now()) AS servable
)
SELECT {_COLS}, servable, pg_current_xact_id()::text FROM upd
UNION ALL
(SELECT {_COLS}, true, pg_current_xact_id()::text FROM biz.ai_cache
 WHERE {_KEY} AND {_SERVABLE} AND id <> %(id)s AND EXISTS (SELECT 1 FROM upd) {_NEWEST} LIMIT 1)
"""

# Stale-while-regenerating: the newest row past its expiry that nothing invalidated and sweep() has not
# retired yet (a row an invalidate touched is 'invalidated', one sweep expired is 'expired': neither is served).
PREVIOUS = f"""
SELECT {_COLS} FROM biz.ai_cache
WHERE {_KEY} AND (status = 'valid' OR status IS NULL) AND expires_at IS NOT NULL AND expires_at <= now()
{_NEWEST} LIMIT 1
"""

# Before asking for the lease: is a live one held, and what is the previous result? One read, no lock, so
# the callers that join a generation under way cost PostgreSQL an index probe each.
PEEK = f"""
SELECT l.holder IS NOT NULL AND l.expires_at > clock_timestamp(), p.*
FROM (SELECT 1) one
LEFT JOIN biz.ai_cache_leases l ON l.cache_type = %(cache_type)s AND l.site_id = %(site_id)s AND l.target_id = %(target_id)s
LEFT JOIN LATERAL ({PREVIOUS}) p ON true
"""

__all__ = ["ACQUIRE", "HEARTBEAT", "RELEASE_FAILED", "FINALIZE_FENCED", "PREVIOUS", "PEEK"]
