"""What every operator command shares: servers named by flags or environment, key parsing, redaction, signals."""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from ..errors import InvalidInput, TieredCacheError
from ..policy import validation as check
from ..policy.keys import validate_namespace

if TYPE_CHECKING:
    from ..facade import TieredCache

ENV_DSN = "TIERED_CACHE_DSN"
ENV_REDIS_URL = "TIERED_CACHE_REDIS_URL"
ENV_NAMESPACE = "TIERED_CACHE_NAMESPACE"


class CommandError(TieredCacheError):
    """A command line that cannot run as given (a server not named, an optional package missing); exit status 2."""


def server_flags() -> argparse.ArgumentParser:
    """--dsn / --redis-url accepted after the verb too; SUPPRESS keeps a value given before the verb."""
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument("--dsn", default=argparse.SUPPRESS, help=f"PostgreSQL DSN (default: ${ENV_DSN})")
    parent.add_argument("--redis-url", default=argparse.SUPPRESS, help=f"Redis URL (default: ${ENV_REDIS_URL})")
    return parent


def add_namespace(parser: argparse.ArgumentParser) -> None:
    """The key namespace flag of commands that touch Redis keys."""
    parser.add_argument(
        "--namespace", default=os.environ.get(ENV_NAMESPACE, "tc"),
        help=f"key namespace of the caches (default: ${ENV_NAMESPACE}, else 'tc')",
    )


def need_dsn(args: argparse.Namespace) -> str:
    """The DSN from the flag or the environment; an operator command never starts a throwaway server."""
    dsn = getattr(args, "dsn", None) or os.environ.get(ENV_DSN)
    if not dsn:
        raise CommandError(f"give --dsn or set {ENV_DSN}")
    return dsn


def need_servers(args: argparse.Namespace) -> tuple[str, str]:
    """DSN and Redis URL from flags or environment; a deployed worker must name its servers."""
    dsn = need_dsn(args)
    url = getattr(args, "redis_url", None) or os.environ.get(ENV_REDIS_URL)
    if not url:
        raise CommandError(f"give --redis-url or set {ENV_REDIS_URL}")
    return dsn, url


def connect(args: argparse.Namespace, **options: Any) -> TieredCache:
    """A TieredCache on the named servers and namespace (checked before any connection is made)."""
    from ..facade import TieredCache

    dsn, url = need_servers(args)
    namespace = validate_namespace(args.namespace)
    return TieredCache.connect(dsn, url, namespace=namespace, redis_timeout=args.redis_timeout, **options)


def parse_site(text: str) -> int:
    """A site id from the command line: an integer that fits bigint, else InvalidInput naming the field."""
    try:
        site = int(text, 10)
    except ValueError:
        raise InvalidInput("site_id", f"expected an integer, got {text!r}") from None
    return check.bigint("site_id", site)


def parse_key(cache_type: str, site: str, target_id: str | None) -> tuple[str, int, str | None]:
    """A key from positional arguments, checked with the library's limits before any I/O."""
    limits = check.DEFAULT_LIMITS
    ct = check.name("cache_type", cache_type, limits.max_name_length)
    site_id = parse_site(site)
    target = None if target_id is None else check.name("target_id", target_id, limits.max_target_id_length)
    return ct, site_id, target


def positive_float(text: str) -> float:
    """argparse type: seconds > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected seconds > 0, got {text!r}")
    return value


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text, 10)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return value


def redact(url: str) -> str:
    """Hide a password in a DSN or URL (URL form or key=value form) before printing it."""
    url = re.sub(r"(://[^:/@]*:)[^@/]*@", r"\1***@", url)
    return re.sub(r"(password\s*=\s*)('(?:[^'\\]|\\.)*'|\S+)", r"\1***", url, flags=re.IGNORECASE)


def print_json(value: Any) -> None:
    """Machine output: one JSON document, datetimes and other objects as strings."""
    print(json.dumps(value, indent=2, sort_keys=True, default=str))


@contextmanager
def stop_on_signals() -> Iterator[threading.Event]:
    """SIGTERM and SIGINT set an event, so a loop finishes its pass and exits cleanly; old handlers come back after."""
    stop = threading.Event()
    if threading.current_thread() is not threading.main_thread():  # signal handlers belong to the main thread
        yield stop
        return
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield stop
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def fail(command: str, exc: BaseException) -> None:
    """An error line an operator can act on, on stderr."""
    print(f"tiered-cache {command}: {exc}", file=sys.stderr)
