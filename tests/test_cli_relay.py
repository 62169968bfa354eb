"""`tiered-cache relay --metrics-port`: the optional extra's checks, and the hook a metrics module plugs into."""

from __future__ import annotations

import os
import signal
import sys
import threading
import types
from typing import Any

import psycopg
import pytest
import redis

from tiered_cache import TieredCache
from tiered_cache.cli import main
from tiered_cache.relay import Relay

from _util import wait_until


def test_metrics_port_without_prometheus_client_exits_2(capsys, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    """Without prometheus-client the flag fails at once, naming the extra to install, before any connection."""
    monkeypatch.setitem(sys.modules, "prometheus_client", None)  # import now raises ImportError
    code = main(["--dsn", "postgresql://nowhere.invalid/x", "--redis-url", "redis://nowhere.invalid", "relay",
                 "--metrics-port", "9464"])
    assert code == 2
    err = capsys.readouterr().err
    assert "prometheus-client" in err and "tiered_cache[metrics]" in err


def test_metrics_port_without_the_hook_exits_2(capsys, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    """A tiered_cache.metrics without serve_relay_metrics is reported as such, not as a traceback."""
    monkeypatch.setitem(sys.modules, "prometheus_client", types.ModuleType("prometheus_client"))
    monkeypatch.setitem(sys.modules, "tiered_cache.metrics", types.ModuleType("tiered_cache.metrics"))
    code = main(["--dsn", "postgresql://nowhere.invalid/x", "--redis-url", "redis://nowhere.invalid", "relay",
                 "--metrics-port", "9464"])
    assert code == 2
    assert "has no serve_relay_metrics" in capsys.readouterr().err


def test_metrics_hook_gets_a_working_relay_and_sigterm_stops_it(
    dsn: str, redis_url: str, cache: TieredCache, capsys, monkeypatch: pytest.MonkeyPatch  # type: ignore[no-untyped-def]
) -> None:
    """serve_relay_metrics(relay, port=N) gets the running relay; it applies a raw-SQL change; SIGTERM ends it."""
    cache.write_cache("app3_clue", 4, "x", {"v": 1})
    entry = cache.keyset("app3_clue", 4, "x").entry
    client = redis.Redis.from_url(redis_url)
    assert client.exists(entry)
    calls: list[tuple[Any, int]] = []
    failures: list[BaseException] = []

    def drive(relay: Relay) -> None:
        try:
            with psycopg.connect(dsn, autocommit=True) as conn:
                conn.execute("UPDATE biz.ai_cache SET score = 5 WHERE target_id = 'x'")
            wait_until(lambda: not client.exists(entry), timeout=30, what="relay drops the changed entry")
        except BaseException as exc:  # reported by the test thread below
            failures.append(exc)
        finally:
            os.kill(os.getpid(), signal.SIGTERM)  # the command's handler turns it into a clean stop

    def serve_relay_metrics(relay: Relay, *, port: int) -> None:
        calls.append((relay, port))
        threading.Thread(target=drive, args=(relay,), daemon=True).start()

    metrics = types.ModuleType("tiered_cache.metrics")
    metrics.serve_relay_metrics = serve_relay_metrics  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "prometheus_client", types.ModuleType("prometheus_client"))
    monkeypatch.setitem(sys.modules, "tiered_cache.metrics", metrics)
    previous = signal.getsignal(signal.SIGTERM)

    code = main(["--dsn", dsn, "--redis-url", redis_url, "relay", "--metrics-port", "9464", "--name", "cli-test"])

    assert not failures, failures
    assert code == 0
    assert len(calls) == 1 and isinstance(calls[0][0], Relay) and calls[0][1] == 9464
    assert calls[0][0].stats.changes >= 1
    out = capsys.readouterr().out
    assert "metrics on port 9464" in out and "RelayStats(" in out
    assert signal.getsignal(signal.SIGTERM) is previous  # the command gave the handler back
    assert cache.get_latest("app3_clue", 4, "x")["score"] == 5  # type: ignore[index]
