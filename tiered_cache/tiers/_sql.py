"""SQL text and row shaping for the PostgreSQL tier; pure, so a sync and an async store share it."""

from __future__ import annotations

from typing import Any

from ._pg_timestamps import INFINITY

LATEST_COLUMNS = (
    "id", "cache_type", "site_id", "target_id", "result_json",
    "score", "triggered_by", "created_at", "expires_at", "status",
)
HISTORY_COLUMNS = LATEST_COLUMNS[:-1]  # the old service's history rows carry no status

_COLS = ", ".join(LATEST_COLUMNS)
_A_COLS = ", ".join("a." + c for c in LATEST_COLUMNS)
_KEY = "cache_type = %(cache_type)s AND site_id = %(site_id)s AND target_id = %(target_id)s"
# 'infinity' expires_at is servable forever and '-infinity' never is: both compare as PostgreSQL orders them.
_SERVABLE = "(status = 'valid' OR status IS NULL) AND (expires_at IS NULL OR expires_at > now())"
_A_SERVABLE = "(a.status = 'valid' OR a.status IS NULL) AND (a.expires_at IS NULL OR a.expires_at > now())"
_NEWEST = "ORDER BY created_at DESC, id DESC"

GET_LATEST = f"SELECT {_COLS} FROM biz.ai_cache WHERE {_KEY} AND {_SERVABLE} {_NEWEST} LIMIT 1"

GET_HISTORY = (
    f"SELECT {', '.join(HISTORY_COLUMNS)} FROM biz.ai_cache WHERE {_KEY} {_NEWEST} LIMIT %(limit)s"
)

# One index probe per target, all in one statement.
GET_MANY = f"""
SELECT r.* FROM unnest(%(target_ids)s::text[]) AS t(tid)
CROSS JOIN LATERAL (
    SELECT {_A_COLS} FROM biz.ai_cache a
    WHERE a.cache_type = %(cache_type)s AND a.site_id = %(site_id)s AND a.target_id = t.tid
      AND {_A_SERVABLE}
    ORDER BY a.created_at DESC, a.id DESC LIMIT 1
) r
"""

# The new row plus the previous servable one, in one statement: the caller picks what get_latest now returns.
WRITE = f"""
WITH ins AS (
    INSERT INTO biz.ai_cache
        (cache_type, site_id, target_id, result_json, triggered_by, score, expires_at, status)
    VALUES (%(cache_type)s, %(site_id)s, %(target_id)s, %(result_json)s::jsonb,
            %(triggered_by)s, %(score)s, %(expires_at)s, 'valid')
    RETURNING {_COLS}, (expires_at IS NULL OR expires_at > now()) AS servable
)
SELECT {_COLS}, servable, pg_current_xact_id()::text FROM ins
UNION ALL
(SELECT {_COLS}, true, pg_current_xact_id()::text FROM biz.ai_cache WHERE {_KEY} AND {_SERVABLE} {_NEWEST} LIMIT 1)
"""

# PostgresStore.write_cache answers with the id only: nothing else comes back (TieredCache writes with WRITE).
WRITE_ID = """
INSERT INTO biz.ai_cache (cache_type, site_id, target_id, result_json, triggered_by, score, expires_at, status)
VALUES (%(cache_type)s, %(site_id)s, %(target_id)s, %(result_json)s::jsonb, %(triggered_by)s, %(score)s, %(expires_at)s,
        'valid')
RETURNING id
"""

SET_GENERATING = """
INSERT INTO biz.ai_cache (cache_type, site_id, target_id, result_json, status, triggered_by)
VALUES (%(cache_type)s, %(site_id)s, %(target_id)s, '{}'::jsonb, 'generating', %(triggered_by)s)
RETURNING id
"""

KEY_OF = "SELECT cache_type, site_id, target_id, status FROM biz.ai_cache WHERE id = %(id)s"

FINALIZE = f"""
WITH upd AS (
    UPDATE biz.ai_cache
    SET result_json = %(result_json)s::jsonb, score = %(score)s, status = 'valid', expires_at = %(expires_at)s
    WHERE id = %(id)s AND status = 'generating'
    RETURNING {_COLS}, (expires_at IS NULL OR expires_at > now()) AS servable
)
SELECT {_COLS}, servable, pg_current_xact_id()::text FROM upd
UNION ALL
(SELECT {_COLS}, true, pg_current_xact_id()::text FROM biz.ai_cache
 WHERE {_KEY} AND {_SERVABLE} AND id <> %(id)s AND EXISTS (SELECT 1 FROM upd) {_NEWEST} LIMIT 1)
"""

# Row locks are taken in id order (the `locked` CTEs here and in INVALIDATE_SITE and the sweeps), so two
# statements changing overlapping rows wait for each other instead of deadlocking.
INVALIDATE = f"""
WITH locked AS (
    SELECT id FROM biz.ai_cache WHERE {_KEY} AND (status = 'valid' OR status IS NULL) ORDER BY id FOR UPDATE
), upd AS (
    UPDATE biz.ai_cache SET status = 'invalidated'
    WHERE id IN (SELECT id FROM locked) AND (status = 'valid' OR status IS NULL)
    RETURNING 1
)
SELECT count(*), pg_current_xact_id()::text FROM upd
"""

# Every key of the site (and type) that has a row is returned, count 0 where nothing was valid: the caller
# drops them all. A key another writer invalidated just before us (committed, its kill still in flight)
# has no valid row left for us to see, yet Redis may still hold its old entry: after this returns, this
# process must not read that entry, so keys without a valid row are dropped too.
INVALIDATE_SITE = """
WITH before AS (
    SELECT DISTINCT cache_type, target_id FROM biz.ai_cache
    WHERE site_id = %(site_id)s AND (%(cache_type)s::text IS NULL OR cache_type = %(cache_type)s)
), locked AS (
    SELECT id FROM biz.ai_cache
    WHERE site_id = %(site_id)s AND (%(cache_type)s::text IS NULL OR cache_type = %(cache_type)s)
      AND (status = 'valid' OR status IS NULL)
    ORDER BY id FOR UPDATE
), upd AS (
    UPDATE biz.ai_cache SET status = 'invalidated'
    WHERE id IN (SELECT id FROM locked) AND (status = 'valid' OR status IS NULL)
    RETURNING cache_type, target_id
), changed AS (
    SELECT cache_type, target_id, count(*) AS n FROM upd GROUP BY cache_type, target_id
)
SELECT k.cache_type, k.target_id, COALESCE(c.n, 0)
FROM (SELECT cache_type, target_id FROM before UNION SELECT cache_type, target_id FROM changed) k
LEFT JOIN changed c USING (cache_type, target_id)
"""

SWEEP_EXPIRED = """
UPDATE biz.ai_cache SET status = 'expired'
WHERE id IN (
    SELECT id FROM biz.ai_cache
    WHERE expires_at IS NOT NULL AND expires_at <= now() AND (status = 'valid' OR status IS NULL)
    ORDER BY id LIMIT %(batch)s FOR UPDATE
)
"""

SWEEP_GENERATING = """
UPDATE biz.ai_cache SET status = 'expired'
WHERE id IN (
    SELECT id FROM biz.ai_cache
    WHERE status = 'generating' AND created_at < now() - %(timeout)s
    ORDER BY id LIMIT %(batch)s FOR UPDATE
)
"""

# An outbox nobody relays must not grow forever; a relay keeps it near empty anyway.
PRUNE_OUTBOX = """
DELETE FROM biz.ai_cache_changes
WHERE seq IN (SELECT seq FROM biz.ai_cache_changes WHERE changed_at < now() - %(age)s LIMIT %(batch)s)
"""

CLAIM_DIRTY_GROUPS = """
DELETE FROM biz.ai_cache_retention_dirty
WHERE (cache_type, site_id) IN (
    SELECT cache_type, site_id FROM biz.ai_cache_retention_dirty LIMIT %(groups)s FOR UPDATE SKIP LOCKED
)
RETURNING cache_type, site_id
"""

# Deletes the oldest rows beyond the newest `keep` of one (cache_type, site_id), sparing the row
# get_latest would serve for its key and live placeholders (those are kept on top of `keep`).
RETENTION = f"""
WITH cutoff AS (
    SELECT created_at, id FROM biz.ai_cache
    WHERE cache_type = %(cache_type)s AND site_id = %(site_id)s
    {_NEWEST} OFFSET %(keep)s LIMIT 1
), victims AS (
    SELECT a.id FROM biz.ai_cache a, cutoff c
    WHERE a.cache_type = %(cache_type)s AND a.site_id = %(site_id)s
      AND (a.created_at, a.id) <= (c.created_at, c.id)
      AND NOT (a.status IS NOT DISTINCT FROM 'generating' AND a.created_at > now() - %(generating_timeout)s)
      AND NOT ({_A_SERVABLE} AND NOT EXISTS (
            SELECT 1 FROM biz.ai_cache b
            WHERE b.cache_type = a.cache_type AND b.site_id = a.site_id AND b.target_id = a.target_id
              AND (b.status = 'valid' OR b.status IS NULL)
              AND (b.expires_at IS NULL OR b.expires_at > now())
              AND (b.created_at, b.id) > (a.created_at, a.id)))
    ORDER BY a.created_at DESC, a.id DESC
    LIMIT %(batch)s
)
DELETE FROM biz.ai_cache WHERE id IN (SELECT id FROM victims)
"""


# Retention's bookkeeping (migrations/0005): the group's size as last counted plus the rows written since
# (ids above the newest counted, created up to a minute before the count so a slow transaction is mostly
# not missed), stored back when at most `limit`; no row back means no size is known, or the last exact
# count is older than `recount`: count again. What the estimate misses (a row committed after a higher id
# was counted, ids or created_at an ETL job set) delays a trim until then, nothing else.
RETENTION_ESTIMATE = """
WITH prev AS (
    SELECT rows, max_id, counted_at FROM biz.ai_cache_group_sizes
    WHERE cache_type = %(cache_type)s AND site_id = %(site_id)s AND exact_at > now() - %(recount)s
), fresh AS (
    SELECT count(*) AS n, max(a.id) AS top FROM biz.ai_cache a, prev p
    WHERE a.cache_type = %(cache_type)s AND a.site_id = %(site_id)s
      AND a.created_at >= p.counted_at - interval '1 minute' AND a.id > p.max_id
), est AS (
    SELECT p.rows + f.n AS rows, greatest(p.max_id, coalesce(f.top, 0)) AS max_id FROM prev p, fresh f
), kept AS (
    UPDATE biz.ai_cache_group_sizes g SET rows = e.rows, max_id = e.max_id, counted_at = now()
    FROM est e
    WHERE g.cache_type = %(cache_type)s AND g.site_id = %(site_id)s AND e.rows <= %(limit)s
    RETURNING g.rows
)
SELECT rows FROM est
"""

# After a trim (or the first pass over a group): the exact count, capped at `keep` so the rows retention
# must spare (a served row of an old key, a live placeholder) do not make every later pass walk again.
RETENTION_COUNT = """
INSERT INTO biz.ai_cache_group_sizes (cache_type, site_id, rows, max_id, counted_at, exact_at)
SELECT %(cache_type)s, %(site_id)s, least(count(*), %(keep)s), coalesce(max(id), 0), now(), now()
FROM biz.ai_cache WHERE cache_type = %(cache_type)s AND site_id = %(site_id)s
ON CONFLICT (cache_type, site_id) DO UPDATE
    SET rows = excluded.rows, max_id = excluded.max_id, counted_at = excluded.counted_at, exact_at = excluded.exact_at
"""


def row_dict(columns: tuple[str, ...], row: tuple[Any, ...]) -> dict[str, Any]:
    """A row as the old service returned it: a dict of the columns, datetimes as ISO-8601 strings.

    An expires_at of 'infinity' (or past what datetime holds) is None, no expiry, as the tiers above know it.
    """
    out = dict(zip(columns, row))
    out["created_at"] = out["created_at"].isoformat()
    expires_at = out["expires_at"]
    if expires_at is not None:
        out["expires_at"] = None if expires_at is INFINITY else expires_at.isoformat()
    return out


def pick_servable(rows: list[tuple[Any, ...]]) -> dict[str, Any] | None:
    """From (columns..., servable, txid) rows of WRITE/FINALIZE, what get_latest returns now."""
    best = None
    for row in rows:
        if row[-2] and (best is None or (row[7], row[0]) > (best[7], best[0])):
            best = row
    return None if best is None else row_dict(LATEST_COLUMNS, best[:-2])

