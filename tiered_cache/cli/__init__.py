"""The `tiered-cache` command: this module only parses and dispatches; each verb family has its own module."""

from __future__ import annotations

import argparse
import logging
import sys

from ..errors import ConfigurationError, InvalidInput, StoreUnavailable
from . import demo_bench, maintenance, ops, relay, verify
from ._common import ENV_DSN, ENV_REDIS_URL, CommandError, fail, server_flags

__all__ = ["main"]

_DESCRIPTION = """\
demo, bench, migrate, sweep, relay, verify, inspect, invalidate, stats. Operator commands take
--dsn / --redis-url (before or after the verb) or $TIERED_CACHE_DSN / $TIERED_CACHE_REDIS_URL and
never start servers of their own; demo and bench start throwaway ones when none is named."""


def build_parser() -> argparse.ArgumentParser:
    """The whole command line; each module registers its verbs."""
    parser = argparse.ArgumentParser(prog="tiered-cache", description=_DESCRIPTION)
    parser.add_argument("--dsn", help=f"PostgreSQL DSN (default: ${ENV_DSN})")
    parser.add_argument("--redis-url", help=f"Redis URL (default: ${ENV_REDIS_URL})")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO")
    sub = parser.add_subparsers(dest="command", required=True)
    servers = server_flags()
    for module in (demo_bench, maintenance, ops, relay, verify):
        module.add_commands(sub, servers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script: 0 done, 1 a check failed or a server did not answer, 2 bad usage."""
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.command == "bench":
        return demo_bench.bench_command(args, rest)
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    try:
        return int(args.run(args))
    except (InvalidInput, ConfigurationError, CommandError) as exc:
        fail(args.command, exc)
        return 2
    except StoreUnavailable as exc:
        fail(args.command, exc)
        return 1


if __name__ == "__main__":
    sys.exit(main())
