"""Schema and housekeeping commands, migrate and sweep; sweep --every is the sidecar loop that replaces cron."""

from __future__ import annotations

import argparse
import threading
import time
from collections.abc import Callable
from dataclasses import asdict
from datetime import datetime, timezone
from typing import Any

import psycopg

from ..errors import TieredCacheError
from ._common import CommandError, need_dsn, positive_float, positive_int, stop_on_signals


def add_commands(sub: Any, servers: argparse.ArgumentParser) -> None:
    """Register migrate and sweep."""
    migrate = sub.add_parser("migrate", parents=[servers], help="bring the schema to the newest version")
    migrate.set_defaults(run=migrate_command)
    sweep = sub.add_parser("sweep", parents=[servers], help="expire rows, reclaim abandoned placeholders, apply retention")
    sweep.add_argument("--retention", type=int, default=20_000, help="rows kept per (cache_type, site_id)")
    when = sweep.add_mutually_exclusive_group()
    when.add_argument("--once", action="store_true", help="one pass, then exit (the default)")
    when.add_argument("--every", type=positive_float, metavar="SECONDS",
                      help="a pass every SECONDS until SIGTERM/SIGINT (a sidecar instead of cron)")
    sweep.add_argument("--iterations", type=positive_int, metavar="N", help="with --every: stop after N passes")
    sweep.set_defaults(run=sweep_command)


def migrate_command(args: argparse.Namespace) -> int:
    """`tiered-cache migrate`."""
    from ..migrate import migrate

    applied = migrate(need_dsn(args))
    print(f"applied: {', '.join(applied)}" if applied else "schema already current")
    return 0


def sweep_command(args: argparse.Namespace) -> int:
    """`tiered-cache sweep [--once | --every S [--iterations N]]`."""
    from ..tiers.postgres import PostgresStore

    if args.iterations is not None and args.every is None:
        raise CommandError("--iterations needs --every")
    dsn = need_dsn(args)
    with PostgresStore(dsn, retention=args.retention) as store:
        if args.every is None:
            print(store.sweep())
            return 0
        print(f"sweep: a pass every {args.every:g} s; SIGTERM or SIGINT stops", flush=True)
        with stop_on_signals() as stop:
            return sweep_every(store.sweep, args.every, stop=stop, iterations=args.iterations)


def _say(line: str) -> None:
    """Print and flush: a sidecar's stdout is a pipe, and each pass must reach the log at once."""
    print(line, flush=True)


def sweep_every(
    sweep: Callable[[], Any],
    every: float,
    *,
    stop: threading.Event,
    iterations: int | None = None,
    say: Callable[[str], None] = _say,
    clock: Callable[[], float] = time.monotonic,
) -> int:
    """Run sweep() every `every` seconds (measured from the end of a pass), one line per pass.

    A failed pass (PostgreSQL down or refusing) is reported and the next one runs on schedule, so the
    sidecar outlives an outage; 0 if the last pass succeeded.
    """
    passes = 0
    ok = True
    while not stop.is_set():
        passes += 1
        started = clock()
        stamp = datetime.now(timezone.utc).isoformat(timespec="seconds")
        try:
            report = sweep()
        except (TieredCacheError, psycopg.Error, OSError) as exc:
            ok = False
            say(f"{stamp} sweep pass {passes}: FAILED after {clock() - started:.2f} s: {type(exc).__name__}: {exc}; "
                f"next pass in {every:g} s")
        else:
            ok = True
            figures = " ".join(f"{name}={value}" for name, value in asdict(report).items())
            say(f"{stamp} sweep pass {passes}: {figures} in {1000 * (clock() - started):.0f} ms")
        if iterations is not None and passes >= iterations:
            break
        stop.wait(every)
    say(f"sweep: stopped after {passes} passes")
    return 0 if ok else 1
