"""First-look commands, demo and bench: unlike operator commands they start throwaway servers when none is named."""

from __future__ import annotations

import argparse
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from ._common import ENV_DSN, ENV_REDIS_URL, redact


def add_commands(sub: Any, servers: argparse.ArgumentParser) -> None:
    """Register demo and bench (bench parses its own flags)."""
    demo = sub.add_parser("demo", parents=[servers], help="play a short product scene through TieredCache and print each step")
    demo.set_defaults(run=demo_command)
    sub.add_parser("bench", help="the benchmark (its own flags follow; try: bench --help)", add_help=False)


@contextmanager
def _servers(args: argparse.Namespace) -> Iterator[tuple[str, str]]:
    """The DSN and Redis URL from flags or environment, else throwaway embedded servers."""
    _export(args)
    from ..testing import embedded_servers

    with embedded_servers() as (dsn, url):
        yield dsn, url


def _export(args: argparse.Namespace) -> None:
    """Flags win over the environment for code that reads only the environment (embedded_servers, bench)."""
    if getattr(args, "dsn", None):
        os.environ[ENV_DSN] = args.dsn
    if getattr(args, "redis_url", None):
        os.environ[ENV_REDIS_URL] = args.redis_url


def demo_command(args: argparse.Namespace) -> int:
    """`tiered-cache demo`: migrate, then play the scene."""
    from ..demo import play
    from ..facade import TieredCache
    from ..migrate import migrate

    with _servers(args) as (dsn, url):
        print(f"PostgreSQL: {redact(dsn)}\nRedis: {redact(url)}")
        applied = migrate(dsn)
        print(f"migrations applied: {applied or 'none (already current)'}")
        with TieredCache.connect(dsn, url) as cache:
            play(cache)
    return 0


def bench_command(args: argparse.Namespace, rest: list[str]) -> int:
    """`tiered-cache bench ...`: hand the remaining flags to the benchmark."""
    from ..bench import main as bench_main

    _export(args)
    return bench_main(rest)
