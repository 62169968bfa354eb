"""Schema migrations: plain SQL files applied once each, in order, under an advisory lock."""

from __future__ import annotations

import hashlib
import logging
import re
from dataclasses import dataclass
from importlib import resources

import psycopg

from .errors import MigrationError, StoreUnavailable

logger = logging.getLogger(__name__)

# Any constant works; it only has to be the same in every process that migrates this database.
_LOCK_KEY = 0x7443_6D69_6772  # "tCmigr"
_FILE = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")


@dataclass(frozen=True)
class Migration:
    """One SQL file: its version, name, text and checksum."""

    version: int
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        """Detects an applied file edited afterwards."""
        return hashlib.sha256(self.sql.encode()).hexdigest()


def load_migrations() -> list[Migration]:
    """The SQL files shipped with the package (the top-level migrations/ folder), in order."""
    folder = resources.files("tiered_cache.migrations")
    found = []
    for item in folder.iterdir():
        match = _FILE.match(item.name)
        if match:
            found.append(Migration(int(match.group(1)), match.group(2), item.read_text(encoding="utf-8")))
    found.sort(key=lambda m: m.version)
    versions = [m.version for m in found]
    if len(set(versions)) != len(versions):
        raise MigrationError(f"two migration files share a version: {versions}")
    return found


def migrate(dsn: str, *, connect_timeout: float = 10.0) -> list[str]:
    """Bring the database to the newest schema; returns the migrations applied now (empty if none)."""
    migrations = load_migrations()
    try:
        conn = psycopg.connect(dsn, autocommit=True, connect_timeout=max(1, int(connect_timeout)))
    except psycopg.OperationalError as exc:
        raise StoreUnavailable(f"could not connect to PostgreSQL to migrate: {exc}") from exc
    applied_now: list[str] = []
    with conn:
        # Session lock: concurrent starters wait here, then find the work done.
        conn.execute("SELECT pg_advisory_lock(%s)", (_LOCK_KEY,))
        try:
            conn.execute("CREATE SCHEMA IF NOT EXISTS biz")
            conn.execute(
                """
                CREATE TABLE IF NOT EXISTS biz.tiered_cache_migrations (
                    version    integer PRIMARY KEY,
                    name       text NOT NULL,
                    checksum   text NOT NULL,
                    applied_at timestamptz NOT NULL DEFAULT now()
                )
                """
            )
            done = {
                version: (name, checksum)
                for version, name, checksum in conn.execute(
                    "SELECT version, name, checksum FROM biz.tiered_cache_migrations"
                )
            }
            for m in migrations:
                if m.version in done:
                    if done[m.version][1] != m.checksum:
                        raise MigrationError(
                            f"migration {m.version:04d}_{m.name} was edited after it was applied "
                            f"(checksum {done[m.version][1][:12]} in the database, {m.checksum[:12]} on disk)"
                        )
                    continue
                with conn.transaction():
                    conn.execute(m.sql)
                    conn.execute(
                        "INSERT INTO biz.tiered_cache_migrations (version, name, checksum) VALUES (%s, %s, %s)",
                        (m.version, m.name, m.checksum),
                    )
                applied_now.append(f"{m.version:04d}_{m.name}")
                logger.info("applied migration %04d_%s", m.version, m.name)
        except psycopg.Error as exc:
            raise MigrationError(f"migration failed: {exc}") from exc
        finally:
            if not conn.closed:
                conn.execute("SELECT pg_advisory_unlock(%s)", (_LOCK_KEY,))
    return applied_now
