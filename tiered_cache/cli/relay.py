"""The relay worker command: applies the change outbox to Redis in the foreground until SIGTERM/SIGINT."""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Callable
from typing import Any

from ._common import CommandError, add_namespace, need_servers, positive_int, redact, stop_on_signals


def add_commands(sub: Any, servers: argparse.ArgumentParser) -> None:
    """Register relay."""
    relay = sub.add_parser("relay", parents=[servers], help="apply the change outbox to Redis until interrupted")
    relay.add_argument("--name", default="default", help="this relay's name in biz.ai_cache_relay_state")
    add_namespace(relay)
    relay.add_argument("--poll-interval", type=float, default=0.5, help="seconds between outbox reads without NOTIFY")
    relay.add_argument("--redis-timeout", type=float, default=0.05, help="seconds per Redis call")
    relay.add_argument("--metrics-port", type=positive_int, metavar="N",
                       help="serve Prometheus metrics on port N (needs the metrics extra: tiered_cache[metrics])")
    relay.set_defaults(run=relay_command)


def metrics_server() -> Callable[..., Any]:
    """The metrics hook, found before any connection is made so a missing extra fails the command at once.

    MERGE HOOK: tiered_cache/metrics.py (another change) is to provide serve_relay_metrics(relay, port=N),
    which starts prometheus-client's HTTP server and registers the relay's collector.
    """
    try:
        importlib.import_module("prometheus_client")
    except ImportError:
        raise CommandError(
            "--metrics-port needs prometheus-client, which is not installed: pip install 'tiered_cache[metrics]'"
        ) from None
    try:
        module = importlib.import_module("tiered_cache.metrics")
    except ImportError as exc:
        raise CommandError(f"--metrics-port: tiered_cache.metrics cannot be imported ({exc})") from None
    serve = getattr(module, "serve_relay_metrics", None)
    if not callable(serve):
        raise CommandError("--metrics-port: this version of tiered_cache.metrics has no serve_relay_metrics")
    return serve  # type: ignore[no-any-return]


def relay_command(args: argparse.Namespace) -> int:
    """`tiered-cache relay`: run one Relay until a signal; its stats are the last line printed."""
    from ..facade import redis_client
    from ..policy.keys import KeySpace
    from ..relay import Relay
    from ..tiers.redis import RedisTier

    serve_metrics = metrics_server() if args.metrics_port is not None else None
    dsn, url = need_servers(args)
    keys = KeySpace(args.namespace)
    client = redis_client(url, timeout=args.redis_timeout)
    tier = RedisTier(client, keys)
    relay = Relay(dsn, tier, name=args.name, poll_interval=args.poll_interval)
    try:
        with stop_on_signals() as stop:
            if serve_metrics is not None:
                serve_metrics(relay, port=args.metrics_port)
                print(f"relay {args.name}: metrics on port {args.metrics_port}", flush=True)
            relay.start()
            print(f"relay {args.name}: applying biz.ai_cache_changes to {redact(url)} (namespace "
                  f"{args.namespace!r}); SIGTERM or Ctrl-C stops", flush=True)
            while not stop.wait(0.5):  # a timed wait: the signal handler runs within half a second
                pass
    finally:
        relay.stop()
        tier.close()
        client.close()
    print(f"relay {args.name}: {relay.stats}")
    return 0
