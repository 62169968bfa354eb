"""migrate(): applies the packaged SQL files once each, in order, safely from many processes at once."""

from __future__ import annotations

import hashlib
import multiprocessing
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from importlib import resources
from typing import Any

import psycopg
import pytest

from tiered_cache import MigrationError, StoreUnavailable, TieredCacheError, migrate
from tiered_cache.migrate import load_migrations
from tiered_cache.testing import PostgresServer


def q(dsn: str, sql: str, params: Any = None) -> list[tuple[Any, ...]]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        cur = conn.execute(sql, params)
        return cur.fetchall() if cur.description else []


def expected_names() -> list[str]:
    """The migration files shipped in the package, as migrate() reports them."""
    files = sorted(
        f.name for f in resources.files("tiered_cache.migrations").iterdir() if f.name.endswith(".sql")
    )
    return [name.removesuffix(".sql") for name in files]


@pytest.fixture
def fresh_dsn(pg_server: PostgresServer) -> Iterator[str]:
    """A brand-new empty database (no schema at all), dropped afterwards."""
    if not pg_server.running:
        pg_server.start()
    name = "mig_" + uuid.uuid4().hex[:12]
    dsn = pg_server.create_database(name)
    yield dsn
    if pg_server.running:
        with psycopg.connect(pg_server.dsn, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def recorded(dsn: str) -> list[tuple[Any, ...]]:
    return q(dsn, "SELECT version, name, checksum, applied_at FROM biz.tiered_cache_migrations ORDER BY version")


def test_packaged_migrations_are_found_through_importlib_resources() -> None:
    """load_migrations() reads every NNNN_name.sql of the tiered_cache.migrations package, in order, 0001 first."""
    found = load_migrations()
    assert [f"{m.version:04d}_{m.name}" for m in found] == expected_names()
    assert found[0].version == 1 and found[0].name == "ai_cache"
    folder = resources.files("tiered_cache.migrations")
    for m in found:
        text = (folder / f"{m.version:04d}_{m.name}.sql").read_text(encoding="utf-8")
        assert m.sql == text
        assert m.checksum == hashlib.sha256(text.encode()).hexdigest()
    assert "CREATE TABLE IF NOT EXISTS biz.ai_cache" in found[0].sql


def test_migrations_do_not_depend_on_the_working_directory(tmp_path: Any) -> None:
    """From another cwd (no migrations/ folder beside it) the same files are found: package data, not a path."""
    code = "from tiered_cache.migrate import load_migrations; print([f'{m.version:04d}_{m.name}' for m in load_migrations()])"
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == repr(expected_names())


def test_migrate_on_a_fresh_database_applies_and_records_0001(fresh_dsn: str) -> None:
    """On an empty database migrate() applies 0001 (and the rest) in order, records each with its checksum."""
    applied = migrate(fresh_dsn)
    assert applied == expected_names()
    assert applied[0] == "0001_ai_cache"
    rows = recorded(fresh_dsn)
    assert [(v, n, c) for v, n, c, _ in rows] == [(m.version, m.name, m.checksum) for m in load_migrations()]
    # the schema is really there: the table, its key index and the retention trigger
    assert q(fresh_dsn, "SELECT to_regclass('biz.ai_cache') IS NOT NULL")[0][0]
    assert q(fresh_dsn, "SELECT count(*) FROM pg_indexes WHERE indexname = 'ai_cache_key_newest'")[0][0] == 1
    q(fresh_dsn, "INSERT INTO biz.ai_cache (cache_type, site_id, target_id) VALUES ('app3_clue', 1, 't')")
    assert q(fresh_dsn, "SELECT cache_type, site_id FROM biz.ai_cache_retention_dirty") == [("app3_clue", 1)]


def test_second_migrate_applies_nothing(fresh_dsn: str) -> None:
    """Running migrate() again applies nothing and leaves the records (and applied_at) unchanged."""
    migrate(fresh_dsn)
    before = recorded(fresh_dsn)
    q(fresh_dsn, "INSERT INTO biz.ai_cache (cache_type, site_id, target_id) VALUES ('app3_clue', 1, 't')")
    assert migrate(fresh_dsn) == []
    assert migrate(fresh_dsn) == []
    assert recorded(fresh_dsn) == before
    assert q(fresh_dsn, "SELECT count(*) FROM biz.ai_cache")[0][0] == 1  # data survives a re-run


def _migrate_in_child(dsn: str, barrier: Any, out: Any) -> None:
    """Child process: wait for the others, then migrate; report what it applied or the error."""
    from tiered_cache import migrate as child_migrate

    barrier.wait(timeout=60)
    try:
        out.put(("ok", child_migrate(dsn)))
    except BaseException as exc:  # noqa: BLE001 - the parent asserts on it
        out.put(("error", repr(exc)))


def test_four_processes_migrating_at_once_all_succeed_and_apply_once(fresh_dsn: str) -> None:
    """4 spawned processes migrate one fresh database together: all succeed, each migration is applied once."""
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(4)
    out = ctx.Queue()
    procs = [ctx.Process(target=_migrate_in_child, args=(fresh_dsn, barrier, out)) for _ in range(4)]
    for p in procs:
        p.start()
    try:
        results = [out.get(timeout=90) for _ in procs]
    finally:
        for p in procs:
            p.join(timeout=30)
    assert [p.exitcode for p in procs] == [0, 0, 0, 0]
    errors = [r for r in results if r[0] != "ok"]
    assert not errors, errors
    applied = [name for _, names in results for name in names]
    assert sorted(applied) == sorted(expected_names())  # each applied by exactly one process
    assert [r[:2] for r in recorded(fresh_dsn)] == [(m.version, m.name) for m in load_migrations()]


def test_edited_migration_raises_migration_error(fresh_dsn: str) -> None:
    """If an applied file's recorded checksum differs, migrate() raises MigrationError naming it, and frees its lock."""
    migrate(fresh_dsn)
    q(fresh_dsn, "UPDATE biz.tiered_cache_migrations SET checksum = 'deadbeef' WHERE version = 1")
    with pytest.raises(MigrationError) as info:
        migrate(fresh_dsn)
    assert isinstance(info.value, TieredCacheError)
    assert "0001_ai_cache" in str(info.value)
    # the advisory lock was released: a second attempt fails the same way at once instead of waiting forever
    t0 = time.monotonic()
    with pytest.raises(MigrationError):
        migrate(fresh_dsn)
    assert time.monotonic() - t0 < 5
    assert q(fresh_dsn, "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'"
             " AND database = (SELECT oid FROM pg_database WHERE datname = current_database())")[0][0] == 0


def test_migrate_an_unreachable_server_raises_store_unavailable() -> None:
    """No server at the DSN: StoreUnavailable (a TieredCacheError), not a raw driver error."""
    with pytest.raises(StoreUnavailable):
        migrate("postgresql://postgres@127.0.0.1:1/none", connect_timeout=1)
