"""The `tiered-cache` command: demo, bench, migrate, sweep, relay, verify."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def _servers(args: argparse.Namespace) -> Iterator[tuple[str, str]]:
    """The DSN and Redis URL from flags or environment, else throwaway embedded servers."""
    if args.dsn:
        os.environ["TIERED_CACHE_DSN"] = args.dsn
    if args.redis_url:
        os.environ["TIERED_CACHE_REDIS_URL"] = args.redis_url
    from .testing import embedded_servers

    with embedded_servers() as (dsn, url):
        yield dsn, url


def _demo(args: argparse.Namespace) -> int:
    from . import TieredCache, migrate
    from .demo import play

    with _servers(args) as (dsn, url):
        print(f"PostgreSQL: {_redact(dsn)}\nRedis: {url}")
        applied = migrate(dsn)
        print(f"migrations applied: {applied or 'none (already current)'}")
        with TieredCache.connect(dsn, url) as cache:
            play(cache)
    return 0


def _dsn(args: argparse.Namespace, what: str) -> str | None:
    """The DSN from the flag or the environment; maintenance commands never start a throwaway server."""
    dsn = args.dsn or os.environ.get("TIERED_CACHE_DSN")
    if not dsn:
        print(f"tiered-cache {what}: give --dsn or set TIERED_CACHE_DSN", file=sys.stderr)
    return dsn


def _migrate(args: argparse.Namespace) -> int:
    from . import migrate

    dsn = _dsn(args, "migrate")
    if not dsn:
        return 2
    applied = migrate(dsn)
    print(f"applied: {', '.join(applied)}" if applied else "schema already current")
    return 0


def _sweep(args: argparse.Namespace) -> int:
    from . import PostgresStore

    dsn = _dsn(args, "sweep")
    if not dsn:
        return 2
    with PostgresStore(dsn, retention=args.retention) as store:
        print(store.sweep())
    return 0


def _need(args: argparse.Namespace, what: str) -> tuple[str, str] | None:
    """DSN and Redis URL from flags or environment; a deployed worker must name its servers."""
    dsn = _dsn(args, what)
    url = args.redis_url or os.environ.get("TIERED_CACHE_REDIS_URL")
    if not url:
        print(f"tiered-cache {what}: give --redis-url or set TIERED_CACHE_REDIS_URL", file=sys.stderr)
    return (dsn, url) if dsn and url else None


def _relay(args: argparse.Namespace) -> int:
    from .facade import redis_client
    from .policy.keys import KeySpace
    from .relay import Relay, run_forever
    from .tiers.redis import RedisTier

    servers = _need(args, "relay")
    if servers is None:
        return 2
    dsn, url = servers
    tier = RedisTier(redis_client(url, timeout=args.redis_timeout), KeySpace(args.namespace))
    relay = Relay(dsn, tier, name=args.name, poll_interval=args.poll_interval)
    print(f"relay {args.name}: applying biz.ai_cache_changes to {url} (namespace {args.namespace!r}); Ctrl-C stops")
    run_forever(relay)
    print(f"relay {args.name}: {relay.stats}")
    return 0


def _verify(args: argparse.Namespace) -> int:
    from .facade import TieredCache
    from .verify import verify

    servers = _need(args, "verify")
    if servers is None:
        return 2
    with TieredCache.connect(*servers, namespace=args.namespace) as cache:
        report = verify(cache, sample=args.sample)
    print(report.summary())
    for m in report.mismatches[:20]:
        print(f"  mismatch {m['key']}: redis id={_id(m['redis'])} postgres id={_id(m['postgres'])}")
    return 0 if not report.mismatches else 1


def _id(row: object) -> object:
    return row.get("id") if isinstance(row, dict) else row


def _bench(args: argparse.Namespace, rest: list[str]) -> int:
    from .bench import main as bench_main

    if args.dsn:
        os.environ["TIERED_CACHE_DSN"] = args.dsn
    if args.redis_url:
        os.environ["TIERED_CACHE_REDIS_URL"] = args.redis_url
    return bench_main(rest)


def _redact(dsn: str) -> str:
    """Hide a password in a DSN before printing it."""
    import re

    return re.sub(r"(://[^:/@]+:)[^@]+@", r"\1***@", dsn)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script."""
    parser = argparse.ArgumentParser(prog="tiered-cache", description=__doc__)
    parser.add_argument("--dsn", help="PostgreSQL DSN (default: $TIERED_CACHE_DSN, else an embedded server)")
    parser.add_argument("--redis-url", help="Redis URL (default: $TIERED_CACHE_REDIS_URL, else an embedded server)")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("demo", help="play a short product scene through TieredCache and print each step")
    sub.add_parser("migrate", help="bring the schema to the newest version")
    sweep = sub.add_parser("sweep", help="expire rows, reclaim abandoned placeholders, apply retention")
    sweep.add_argument("--retention", type=int, default=20_000, help="rows kept per (cache_type, site_id)")
    relay = sub.add_parser("relay", help="apply the change outbox to Redis until interrupted")
    relay.add_argument("--name", default="default", help="this relay's name in biz.ai_cache_relay_state")
    relay.add_argument("--namespace", default="tc", help="key namespace of the caches to keep fresh")
    relay.add_argument("--poll-interval", type=float, default=0.5, help="seconds between outbox reads without NOTIFY")
    relay.add_argument("--redis-timeout", type=float, default=0.05, help="seconds per Redis call")
    verify = sub.add_parser("verify", help="compare sampled Redis entries with PostgreSQL; exit 1 on mismatch")
    verify.add_argument("--sample", type=int, default=1000, help="entries to compare")
    verify.add_argument("--namespace", default="tc", help="key namespace")
    sub.add_parser("bench", help="the benchmark (its own flags follow; try: bench --help)", add_help=False)
    args, rest = parser.parse_known_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.command == "bench":
        return _bench(args, rest)
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    commands = {"demo": _demo, "migrate": _migrate, "sweep": _sweep, "relay": _relay, "verify": _verify}
    return commands[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
