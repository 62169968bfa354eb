"""Operator commands on a running deployment: inspect a key in every tier, invalidate, stats."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

import psycopg
from redis.exceptions import RedisError

from ..errors import StoreUnavailable
from ..policy.entries import NEGATIVE, decode
from ._common import add_namespace, connect, need_dsn, parse_key, positive_int, print_json

if TYPE_CHECKING:
    import redis

    from ..facade import TieredCache
    from ..policy.keys import KeySet

_ROWS = """
SELECT id, status, created_at, expires_at, score, triggered_by,
       (status = 'valid' OR status IS NULL) AND (expires_at IS NULL OR expires_at > now()) AS servable
FROM biz.ai_cache
WHERE cache_type = %(cache_type)s AND site_id = %(site_id)s AND target_id = %(target_id)s
ORDER BY created_at DESC, id DESC LIMIT %(limit)s
"""
_COUNT = "SELECT count(*) FROM biz.ai_cache WHERE cache_type = %(cache_type)s AND site_id = %(site_id)s AND target_id = %(target_id)s"
_OUTBOX = """
SELECT count(*), COALESCE(EXTRACT(EPOCH FROM clock_timestamp() - min(changed_at)), 0)::float8
FROM biz.ai_cache_changes
"""
_RELAYS = """
SELECT relay, last_seq, applied, EXTRACT(EPOCH FROM clock_timestamp() - updated_at)::float8
FROM biz.ai_cache_relay_state ORDER BY relay
"""
_KINDS = ("e", "h", "l", "lh", "w", "g")  # entry, history, fill/writer lease, history lease, writer txid, regenerating (policy/keys.py)


def add_commands(sub: Any, servers: argparse.ArgumentParser) -> None:
    """Register inspect, invalidate and stats."""
    inspect = sub.add_parser("inspect", parents=[servers], help="what every tier holds for one key")
    inspect.add_argument("cache_type", metavar="TYPE")
    inspect.add_argument("site", metavar="SITE")
    inspect.add_argument("target", metavar="TARGET")
    inspect.add_argument("--limit", type=positive_int, default=20, help="PostgreSQL rows shown, newest first")
    inspect.set_defaults(run=inspect_command)
    invalidate = sub.add_parser("invalidate", parents=[servers], help="invalidate a key, or a site's keys of a type")
    invalidate.add_argument("cache_type", metavar="TYPE")
    invalidate.add_argument("site", metavar="SITE")
    invalidate.add_argument("target", metavar="TARGET", nargs="?")
    invalidate.set_defaults(run=invalidate_command)
    stats = sub.add_parser("stats", parents=[servers], help="tier counters, Redis memory and keys, outbox backlog")
    stats.add_argument("--scan-cap", type=positive_int, default=100_000, help="most namespace keys counted by SCAN")
    stats.set_defaults(run=stats_command)
    for parser in (inspect, invalidate, stats):
        add_namespace(parser)
        parser.add_argument("--redis-timeout", type=float, default=0.5, help="seconds per Redis call")
    for parser in (inspect, stats):
        parser.add_argument("--json", action="store_true", help="machine-readable output")


# -- inspect ----------------------------------------------------------------------------------


def inspect_command(args: argparse.Namespace) -> int:
    """`tiered-cache inspect TYPE SITE TARGET`: 0 when both Redis and PostgreSQL answered."""
    ct, site, target = parse_key(args.cache_type, args.site, args.target)
    with connect(args) as cache:
        found = inspect_key(cache, (ct, site, target), limit=args.limit)  # type: ignore[arg-type]
    if args.json:
        print_json(found)
    else:
        print("\n".join(render_inspect(found)))
    return 1 if "error" in found["redis"] or "error" in found["postgres"] else 0


def inspect_key(cache: TieredCache, key: tuple[str, int, str], *, limit: int = 20) -> dict[str, Any]:
    """Each tier's view of one key, as plain data (the --json output)."""
    ks = cache.keyset(*key)
    out: dict[str, Any] = {"key": {"cache_type": key[0], "site_id": key[1], "target_id": key[2]},
                           "namespace": cache.keys.namespace}
    try:
        out["redis"] = _redis_view(cache.redis.client, ks)
    except RedisError as exc:
        out["redis"] = {"error": f"{type(exc).__name__}: {exc}"}
    try:
        out["postgres"] = _postgres_view(cache, key, limit)
    except (StoreUnavailable, psycopg.Error) as exc:
        out["postgres"] = {"error": f"{type(exc).__name__}: {exc}"}
    entry, pg = out["redis"].get("entry"), out["postgres"]
    if entry is not None and "serves" in pg and entry["state"] in ("row", "negative"):
        out["redis_agrees"] = entry.get("id") == pg["serves"]
    return out


def _redis_view(client: redis.Redis, ks: KeySet) -> dict[str, Any]:
    """One round trip: the server clock, every key of the key set with its value and time to live."""
    pipe = client.pipeline(transaction=False)
    pipe.time()
    for name in ks.all:
        pipe.pttl(name)
    pipe.get(ks.entry).hgetall(ks.history).get(ks.lease).get(ks.history_lease).get(ks.writer).get(ks.regenerating)
    pipe.execute_command("PEXPIRETIME", ks.entry)  # Redis 7 only: an error answer there is ignored
    answers = pipe.execute(raise_on_error=False)
    for answer in answers[:-1]:
        if isinstance(answer, Exception):
            raise answer
    now_s, now_us = answers[0]
    now_ms = int(now_s) * 1000 + int(now_us) // 1000
    answers = answers[1:]
    names = ("entry", "history", "lease", "history_lease", "writer", "regenerating")
    ttl = dict(zip(names, answers[: len(names)]))
    raw_entry, history, lease, history_lease, writer, marker, expire_time = answers[len(names):]
    entry: dict[str, Any] = {"key": ks.entry, **_ttl(ttl["entry"], now_ms)}
    if isinstance(expire_time, int) and expire_time > 0:
        entry["expires_at_ms"] = expire_time
    if raw_entry is None:
        entry["state"] = "none"
    elif raw_entry == NEGATIVE:
        entry["state"] = "negative"
    else:
        try:
            row = decode(raw_entry)
            entry.update(state="row", id=row.get("id"), status=row.get("status"), expires_at=row.get("expires_at"))
        except (ValueError, AttributeError):
            entry.update(state="undecodable", bytes=len(raw_entry))
    fields = []
    for field, value in sorted(history.items(), key=lambda item: int(item[0]) if item[0].isdigit() else 0):
        try:
            ids = [r.get("id") for r in decode(value)]
        except (ValueError, AttributeError, TypeError):
            ids = None
        fields.append({"limit": field.decode(errors="replace"), "ids": ids})
    return {
        "entry": entry,
        "history": {"key": ks.history, "fields": fields, **_ttl(ttl["history"], now_ms)},
        "lease": {"key": ks.lease, **_holder(lease), **_ttl(ttl["lease"], now_ms)},
        "history_lease": {"key": ks.history_lease, **_holder(history_lease), **_ttl(ttl["history_lease"], now_ms)},
        "writer_txid": {"key": ks.writer, "txid": writer.decode() if writer else None, **_ttl(ttl["writer"], now_ms)},
        "regenerating": {"key": ks.regenerating, "previous_id": _row_id(marker), **_ttl(ttl["regenerating"], now_ms)},
    }


def _row_id(raw: bytes | None) -> Any:
    """The id of the row a regeneration marker serves (None: no marker)."""
    try:
        return None if raw is None else decode(raw).get("id")
    except (ValueError, AttributeError):
        return None


def _ttl(pttl: int, now_ms: int) -> dict[str, Any]:
    """PTTL as seconds left and an absolute Unix time in ms (-1: no expiry, -2: no such key)."""
    if pttl == -2:
        return {"exists": False}
    if pttl == -1:
        return {"exists": True, "ttl_s": None}
    return {"exists": True, "ttl_s": pttl / 1000, "expires_at_ms": now_ms + pttl}


def _holder(token: bytes | None) -> dict[str, Any]:
    """Who holds a lease: writer tokens start with 'w'; the part before '.' names the holding process."""
    if token is None:
        return {"holder": None}
    text = token.decode(errors="replace")
    kind = "writer" if text.startswith("w") else "reader"
    return {"holder": text, "kind": kind, "process": text.lstrip("w").split(".", 1)[0]}


def _postgres_view(cache: TieredCache, key: tuple[str, int, str], limit: int) -> dict[str, Any]:
    """The key's rows, newest first, and the one get_latest serves (asked through the store itself)."""
    params = {"cache_type": key[0], "site_id": key[1], "target_id": key[2], "limit": limit}
    with psycopg.connect(cache.store.dsn, autocommit=True, connect_timeout=5) as conn:
        # Timestamps in the venues' zone, as the store renders them (a DSN's own options stay untouched).
        conn.execute("SELECT set_config('TimeZone', %s, false)", [str(cache.store.policy.zone)])
        rows = conn.execute(_ROWS, params).fetchall()
        (total,) = conn.execute(_COUNT, params).fetchone()  # type: ignore[misc]
    latest = cache.store.get_latest(*key)
    columns = ("id", "status", "created_at", "expires_at", "score", "triggered_by", "servable")
    shown = [{c: (v.isoformat() if hasattr(v, "isoformat") else v) for c, v in zip(columns, r)} for r in rows]
    return {"rows": shown, "total": total, "serves": None if latest is None else latest["id"]}


def render_inspect(found: dict[str, Any]) -> list[str]:
    """The inspect report for a terminal."""
    k = found["key"]
    lines = [f"key {k['cache_type']} / {k['site_id']} / {k['target_id']}  (namespace {found['namespace']!r})"]
    redis_view = found["redis"]
    if "error" in redis_view:
        lines.append(f"redis: unreachable: {redis_view['error']}")
    else:
        e = redis_view["entry"]
        what = {"none": "nothing cached", "negative": "negative entry (cached 'no row')",
                "undecodable": f"undecodable value ({e.get('bytes')} bytes)"}.get(
            e["state"], f"row id={e.get('id')} status={e.get('status')} row expires_at={e.get('expires_at')}")
        lines.append(f"redis entry      {e['key']}: {what}{_ttl_text(e)}")
        h = redis_view["history"]
        fields = ", ".join(f"limit {f['limit']}: ids {f['ids']}" for f in h["fields"]) or "none"
        lines.append(f"redis history    {h['key']}: {fields}{_ttl_text(h)}")
        for label, name in (("fill lease", "lease"), ("history lease", "history_lease")):
            lease = redis_view[name]
            held = "free" if lease["holder"] is None else f"held by {lease['kind']} {lease['holder']}"
            lines.append(f"{label:<16} {lease['key']}: {held}{_ttl_text(lease)}")
        w = redis_view["writer_txid"]
        lines.append(f"writer txid      {w['key']}: {w['txid'] or 'none'}{_ttl_text(w)}")
    pg = found["postgres"]
    if "error" in pg:
        lines.append(f"postgres: unreachable: {pg['error']}")
        return lines
    lines.append(f"postgres rows    {len(pg['rows'])} of {pg['total']}, newest first; get_latest serves "
                 f"{'nothing' if pg['serves'] is None else 'id=' + str(pg['serves'])}")
    for r in pg["rows"]:
        mark = "*" if r["id"] == pg["serves"] else " "
        lines.append(f"  {mark} id={r['id']} status={r['status']} created_at={r['created_at']} "
                     f"expires_at={r['expires_at']} score={r['score']} triggered_by={r['triggered_by']}")
    if "redis_agrees" in found:
        lines.append("redis agrees with get_latest" if found["redis_agrees"] else "REDIS DISAGREES with get_latest")
    return lines


def _ttl_text(view: dict[str, Any]) -> str:
    """A key's time to live for the terminal report."""
    if not view.get("exists"):
        return ""
    return "; no expiry" if view.get("ttl_s") is None else f"; ttl {view['ttl_s']:.3f} s"


# -- invalidate -------------------------------------------------------------------------------


def invalidate_command(args: argparse.Namespace) -> int:
    """`tiered-cache invalidate TYPE SITE [TARGET]`, through the library so every tier drops the key."""
    ct, site, target = parse_key(args.cache_type, args.site, args.target)
    with connect(args) as cache:
        if target is None:
            count = cache.invalidate_site(site, cache_type=ct)
            print(f"invalidated {count} rows of {ct} at site {site}")
        else:
            count = cache.invalidate(ct, site, target)
            print(f"invalidated {count} rows of {ct} / {site} / {target}")
    return 0


# -- stats ------------------------------------------------------------------------------------


def stats_command(args: argparse.Namespace) -> int:
    """`tiered-cache stats`: 0 when Redis and PostgreSQL both answered."""
    dsn = need_dsn(args)
    with connect(args) as cache:
        out: dict[str, Any] = {"namespace": cache.keys.namespace, "cache": cache.stats()}
        try:
            out["redis"] = redis_figures(cache.redis.client, cache.keys.namespace, cap=args.scan_cap)
        except RedisError as exc:
            out["redis"] = {"error": f"{type(exc).__name__}: {exc}"}
    try:
        out["outbox"] = outbox_backlog(dsn)
    except psycopg.Error as exc:
        out["outbox"] = {"error": f"{type(exc).__name__}: {exc}"}
    if args.json:
        print_json(out)
    else:
        print("\n".join(render_stats(out)))
    return 1 if "error" in out["redis"] or "error" in out["outbox"] else 0


def redis_figures(client: redis.Redis, namespace: str, *, cap: int) -> dict[str, Any]:
    """INFO memory/stats/keyspace figures and this namespace's keys by kind, counted by SCAN up to `cap`."""
    memory, stats, keyspace = client.info("memory"), client.info("stats"), client.info("keyspace")
    kinds = dict.fromkeys(_KINDS, 0)
    other = scanned = 0
    prefix = namespace + ":"
    for key in client.scan_iter(match=prefix + "*", count=1000):
        scanned += 1
        kind = key.decode(errors="replace")[len(prefix):].split(":", 1)[0]
        if kind in kinds:
            kinds[kind] += 1
        else:
            other += 1
        if scanned >= cap:
            break
    return {
        "memory": {k: memory.get(k) for k in ("used_memory", "used_memory_human", "used_memory_peak_human",
                                              "maxmemory", "maxmemory_policy", "mem_fragmentation_ratio")},
        "stats": {k: stats.get(k) for k in ("keyspace_hits", "keyspace_misses", "evicted_keys", "expired_keys")},
        "keyspace": keyspace,
        "namespace_keys": {**kinds, "other": other, "scanned": scanned, "capped": scanned >= cap},
    }


def outbox_backlog(dsn: str) -> dict[str, Any]:
    """Rows waiting in biz.ai_cache_changes, the age of the oldest, and where each relay got to."""
    with psycopg.connect(dsn, autocommit=True, connect_timeout=5) as conn:
        rows, age = conn.execute(_OUTBOX).fetchone()  # type: ignore[misc]
        relays = [{"relay": r, "last_seq": s, "applied": a, "updated_s_ago": round(u, 3)}
                  for r, s, a, u in conn.execute(_RELAYS).fetchall()]
    return {"rows": int(rows), "oldest_age_s": round(float(age), 3), "relays": relays}


def render_stats(out: dict[str, Any]) -> list[str]:
    """The stats report for a terminal."""
    lines = [f"namespace {out['namespace']!r}"]
    for tier, counters in out["cache"].items():
        lines.append(f"this process, {tier}: " + " ".join(f"{k}={v}" for k, v in counters.items()))
    r = out["redis"]
    if "error" in r:
        lines.append(f"redis: unreachable: {r['error']}")
    else:
        m, s, n = r["memory"], r["stats"], r["namespace_keys"]
        lines.append(f"redis memory: used {m['used_memory_human']} (peak {m['used_memory_peak_human']}), maxmemory "
                     f"{m['maxmemory']} policy {m['maxmemory_policy']}, fragmentation {m['mem_fragmentation_ratio']}")
        lines.append("redis stats: " + " ".join(f"{k}={v}" for k, v in s.items()))
        lines.append("redis keyspace: " + (" ".join(f"{db}={v}" for db, v in r["keyspace"].items()) or "empty"))
        capped = f" (stopped at the cap of {n['scanned']})" if n["capped"] else ""
        lines.append(f"namespace keys{capped}: entries={n['e']} histories={n['h']} leases={n['l']} "
                     f"history_leases={n['lh']} writer_txids={n['w']} regenerating={n['g']} other={n['other']}")
    o = out["outbox"]
    if "error" in o:
        lines.append(f"outbox: unreachable: {o['error']}")
    else:
        lines.append(f"outbox backlog: {o['rows']} rows, oldest {o['oldest_age_s']:.3f} s old")
        for relay in o["relays"]:
            lines.append(f"  relay {relay['relay']}: last_seq={relay['last_seq']} applied={relay['applied']} "
                         f"updated {relay['updated_s_ago']:.1f} s ago")
    return lines
