"""`tiered-cache inspect`, `invalidate` and `stats` against the test-owned servers, run in-process."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from typing import Any

import psycopg
import pytest
import redis

from tiered_cache import TieredCache
from tiered_cache.cli import main
from tiered_cache.cli._common import redact


def _run(capsys: pytest.CaptureFixture[str], dsn: str, redis_url: str, *args: str) -> tuple[int, str, str]:
    code = main(["--dsn", dsn, "--redis-url", redis_url, *args])
    out, err = capsys.readouterr()
    return code, out, err


def _inspect(capsys: pytest.CaptureFixture[str], dsn: str, redis_url: str, *key: str) -> dict[str, Any]:
    code, out, err = _run(capsys, dsn, redis_url, "inspect", *key, "--json")
    assert code == 0, err
    return json.loads(out)  # type: ignore[no-any-return]


def test_inspect_shows_entry_ttl_leases_and_rows(dsn: str, redis_url: str, cache: TieredCache, capsys) -> None:  # type: ignore[no-untyped-def]
    """inspect decodes the entry, its expiry (the row's, to the ms), the history, a hand-taken lease and the rows."""
    expires = datetime.now(timezone.utc) + timedelta(hours=1)
    first = cache.write_cache("app3_clue", 7, "t1", {"v": 1}, triggered_by="worker-a", score=3, expires_at=expires)
    second = cache.write_cache("app3_clue", 7, "t1", {"v": 2}, triggered_by="worker-b", score=4, expires_at=expires)
    cache.get_history("app3_clue", 7, "t1", limit=2)  # fills the history hash under field "2"
    ks = cache.keyset("app3_clue", 7, "t1")
    client = redis.Redis.from_url(redis_url)
    client.set(ks.lease, "w0123456789ab.42", px=30_000)  # a writer's lease, as lease_for_write takes it
    client.set(ks.history_lease, "fedcba987654.7", px=20_000)

    found = _inspect(capsys, dsn, redis_url, "app3_clue", "7", "t1")

    entry = found["redis"]["entry"]
    assert entry["state"] == "row" and entry["id"] == second and entry["status"] == "valid"
    floor_ms = (expires - datetime(1970, 1, 1, tzinfo=timezone.utc)) // timedelta(milliseconds=1)
    assert entry["expires_at_ms"] == floor_ms  # PEXPIRETIME: the entry dies with its row
    assert 3000 < entry["ttl_s"] <= 3600
    assert found["redis"]["history"]["fields"] == [{"limit": "2", "ids": [second, first]}]
    lease = found["redis"]["lease"]
    assert (lease["holder"], lease["kind"], lease["process"]) == ("w0123456789ab.42", "writer", "0123456789ab")
    assert 0 < lease["ttl_s"] <= 30
    history_lease = found["redis"]["history_lease"]
    assert (history_lease["holder"], history_lease["kind"]) == ("fedcba987654.7", "reader")
    assert 0 < history_lease["ttl_s"] <= 20
    assert found["redis"]["writer_txid"]["txid"].isdigit()
    rows = found["postgres"]["rows"]
    assert [(r["id"], r["status"], r["score"], r["triggered_by"]) for r in rows] == [
        (second, "valid", 4, "worker-b"), (first, "valid", 3, "worker-a")]
    assert found["postgres"]["serves"] == second and found["postgres"]["total"] == 2
    assert found["redis_agrees"] is True

    code, text, _ = _run(capsys, dsn, redis_url, "inspect", "app3_clue", "7", "t1")
    assert code == 0
    assert f"row id={second} status=valid" in text
    assert "held by writer w0123456789ab.42" in text
    assert f"* id={second} status=valid" in text and f"  id={first} status=valid" in text
    assert "redis agrees with get_latest" in text


def test_inspect_after_invalidate_shows_negative_entry_and_statuses(dsn: str, redis_url: str, cache: TieredCache, capsys) -> None:  # type: ignore[no-untyped-def]
    """After `invalidate TYPE SITE TARGET`, Redis holds a negative entry and every row reads 'invalidated'."""
    ids = [cache.write_cache("app3_clue", 8, "t2", {"v": n}) for n in range(3)]
    cache.write_cache("app3_clue", 8, "other", {"v": 9})
    code, out, err = _run(capsys, dsn, redis_url, "invalidate", "app3_clue", "8", "t2")
    assert code == 0, err
    assert "invalidated 3 rows of app3_clue / 8 / t2" in out

    found = _inspect(capsys, dsn, redis_url, "app3_clue", "8", "t2")
    assert found["redis"]["entry"]["state"] == "negative"
    assert [(r["id"], r["status"], r["servable"]) for r in found["postgres"]["rows"]] == [
        (i, "invalidated", False) for i in reversed(ids)]
    assert found["postgres"]["serves"] is None and found["redis_agrees"] is True
    assert cache.get_latest("app3_clue", 8, "other") is not None  # the sibling key was left alone


def test_inspect_limits_rows_and_reports_a_disagreeing_entry(dsn: str, redis_url: str, cache: TieredCache, capsys) -> None:  # type: ignore[no-untyped-def]
    """--limit caps the rows shown; an entry Redis holds for an older row is flagged."""
    ids = [cache.write_cache("app3_clue", 9, "t3", {"v": n}) for n in range(4)]
    entry = cache.keyset("app3_clue", 9, "t3").entry
    client = redis.Redis.from_url(redis_url)
    client.set(entry, json.dumps({"id": ids[0], "status": "valid", "expires_at": None}), px=60_000)
    code, text, _ = _run(capsys, dsn, redis_url, "inspect", "app3_clue", "9", "t3", "--limit", "2")
    assert code == 0
    assert "postgres rows    2 of 4" in text
    assert f"row id={ids[0]}" in text and "REDIS DISAGREES with get_latest" in text


def test_inspect_rejects_bad_input_before_any_io(capsys, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    """A site that is not an integer, or an empty type, exits 2 with the InvalidInput message, servers unnamed."""
    monkeypatch.delenv("TIERED_CACHE_DSN", raising=False)
    monkeypatch.delenv("TIERED_CACHE_REDIS_URL", raising=False)
    assert main(["inspect", "app3_clue", "seven", "t1"]) == 2
    assert "site_id: expected an integer, got 'seven'" in capsys.readouterr().err
    assert main(["invalidate", "", "7"]) == 2
    assert "cache_type: must not be empty" in capsys.readouterr().err
    assert main(["inspect", "app3_clue", str(2**63), "t"]) == 2
    assert "does not fit a 64-bit integer" in capsys.readouterr().err
    assert main(["inspect", "app3_clue", "7", "t1"]) == 2
    assert "give --dsn or set TIERED_CACHE_DSN" in capsys.readouterr().err


def test_invalidate_site_of_one_type(dsn: str, redis_url: str, cache: TieredCache, capsys) -> None:  # type: ignore[no-untyped-def]
    """`invalidate TYPE SITE` invalidates that type's keys at that site only, and drops their entries."""
    for target in ("a", "b"):
        cache.write_cache("app3_clue", 5, target, {"v": 1})
    cache.write_cache("app3_board", 5, "a", {"v": 1})
    cache.write_cache("app3_clue", 6, "a", {"v": 1})
    code = main(["invalidate", "app3_clue", "5", "--dsn", dsn, "--redis-url", redis_url])  # flags after the verb
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "invalidated 2 rows of app3_clue at site 5" in out
    client = redis.Redis.from_url(redis_url)
    assert not client.exists(cache.keyset("app3_clue", 5, "a").entry, cache.keyset("app3_clue", 5, "b").entry)
    assert cache.get_latest("app3_clue", 5, "a") is None
    assert cache.get_latest("app3_board", 5, "a") is not None
    assert cache.get_latest("app3_clue", 6, "a") is not None


def test_stats_counts_namespace_keys_and_outbox_backlog(dsn: str, redis_url: str, cache: TieredCache, capsys) -> None:  # type: ignore[no-untyped-def]
    """stats counts this namespace's keys by kind (not another's), Redis memory, and the unrelayed outbox rows."""
    for target in ("a", "b", "c"):
        cache.write_cache("app3_clue", 1, target, {"v": 1})
    cache.get_history("app3_clue", 1, "a")
    client = redis.Redis.from_url(redis_url)
    client.set(cache.keyset("app3_clue", 1, "b").lease, "abc.1", px=60_000)
    client.set("elsewhere:e:{x:1:y}", b"null")
    with psycopg.connect(dsn) as conn:
        (backlog,) = conn.execute("SELECT count(*) FROM biz.ai_cache_changes").fetchone()  # type: ignore[misc]
    assert backlog >= 3  # no relay runs here: every write's change row is still waiting

    code, out, err = _run(capsys, dsn, redis_url, "stats", "--json")
    assert code == 0, err
    stats = json.loads(out)
    keys = stats["redis"]["namespace_keys"]
    assert (keys["e"], keys["w"], keys["h"], keys["l"], keys["lh"], keys["other"]) == (3, 3, 1, 1, 0, 0)
    assert keys["scanned"] == 8 and keys["capped"] is False
    assert stats["redis"]["memory"]["used_memory"] > 0
    assert stats["redis"]["keyspace"]["db0"]["keys"] == 9
    assert stats["outbox"]["rows"] == backlog and stats["outbox"]["oldest_age_s"] >= 0
    assert "hits" in stats["cache"]["redis"]

    code, text, _ = _run(capsys, dsn, redis_url, "stats", "--scan-cap", "2")
    assert code == 0
    assert "namespace keys (stopped at the cap of 2)" in text
    assert f"outbox backlog: {backlog} rows" in text


def test_stats_reports_redis_down_and_exits_1(dsn: str, capsys) -> None:  # type: ignore[no-untyped-def]
    """With Redis unreachable, stats still prints the outbox and exits 1."""
    code, out, _ = _run(capsys, dsn, "redis://127.0.0.1:1/0", "stats")
    assert code == 1
    assert "redis: unreachable" in out and "outbox backlog: 0 rows" in out


def test_redact_hides_passwords_in_urls_and_keyword_dsns() -> None:
    """Printed server names never carry a password, in URL or key=value form."""
    assert redact("postgresql://app:s3cr%40t@db:5432/x") == "postgresql://app:***@db:5432/x"
    assert redact("redis://:pw@cache:6379/0") == "redis://:***@cache:6379/0"
    assert redact("host=db password='a b' dbname=x") == "host=db password=*** dbname=x"
    assert redact("redis://cache:6379/0") == "redis://cache:6379/0"
