"""`tiered-cache sweep --every`: the sidecar loop, against the test-owned PostgreSQL (which it must outlive)."""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
import time

import psycopg
import pytest

from tiered_cache.cli import main
from tiered_cache.testing import PostgresServer


def _expired_row(dsn: str) -> None:
    """A 'valid' row whose expiry has passed: the next sweep marks it 'expired'."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO biz.ai_cache (cache_type, site_id, target_id, status, expires_at) "
            "VALUES ('app3_clue', 1, 'old', 'valid', now() - interval '1 minute')"
        )


def _status(dsn: str) -> str:
    with psycopg.connect(dsn) as conn:
        return conn.execute("SELECT status FROM biz.ai_cache WHERE target_id = 'old'").fetchone()[0]  # type: ignore[index]


class _Lines:
    """A child's stdout read by a thread, so the test can wait for a line with a timeout."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.seen: list[str] = []
        self._queue: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._pump, args=(proc,), daemon=True).start()

    def _pump(self, proc: subprocess.Popen[str]) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            self._queue.put(line.rstrip("\n"))

    def wait_for(self, text: str, timeout: float = 60) -> str:
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self._queue.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"no line with {text!r} after {timeout} s; saw {self.seen}") from None
            self.seen.append(line)
            if text in line:
                return line


def _sweeper(dsn: str, *args: str) -> subprocess.Popen[str]:
    env = {**os.environ, "TIERED_CACHE_DSN": dsn}
    return subprocess.Popen([sys.executable, "-m", "tiered_cache.cli", "sweep", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_sweep_every_runs_the_given_passes(dsn: str, capsys) -> None:  # type: ignore[no-untyped-def]
    """--every with --iterations 2 runs two passes: the first expires the stale row, the second finds nothing."""
    _expired_row(dsn)
    assert main(["--dsn", dsn, "sweep", "--every", "0.05", "--iterations", "2"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if " sweep pass " in line]
    assert len(lines) == 2
    assert "sweep pass 1: expired=1 " in lines[0] and "sweep pass 2: expired=0 " in lines[1]
    assert _status(dsn) == "expired"


def test_sweep_iterations_needs_every(dsn: str, capsys) -> None:  # type: ignore[no-untyped-def]
    """--iterations without --every is a usage error (exit 2), and --once keeps the one-pass report."""
    assert main(["--dsn", dsn, "sweep", "--iterations", "2"]) == 2
    assert "--iterations needs --every" in capsys.readouterr().err
    assert main(["--dsn", dsn, "sweep", "--once"]) == 0
    assert "SweepReport(" in capsys.readouterr().out


@pytest.mark.fault
def test_sweep_every_survives_a_postgres_outage(dsn: str, pg_server: PostgresServer, figure) -> None:  # type: ignore[no-untyped-def]
    """A pass during an outage prints FAILED and the loop goes on: the pass after the restart does the work."""
    proc = _sweeper(dsn, "--every", "3", "--iterations", "3")
    lines = _Lines(proc)
    try:
        lines.wait_for("sweep pass 1: expired=0")
        pg_server.stop()  # the interval (3 s, counted from the end of pass 1) leaves time to stop it
        lines.wait_for("sweep pass 2: FAILED")
        pg_server.start()
        _expired_row(dsn)
        third = lines.wait_for("sweep pass 3:")
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        if not pg_server.running:
            pg_server.start()
    for line in lines.seen:
        if " sweep pass " in line:
            figure(f"sweep outage run: {line}")
    assert "expired=1" in third, lines.seen
    assert _status(dsn) == "expired"


def test_sweep_every_stops_cleanly_on_sigterm(dsn: str) -> None:
    """SIGTERM between passes ends the loop at once with status 0 (a sidecar being stopped)."""
    proc = _sweeper(dsn, "--every", "600")
    lines = _Lines(proc)
    try:
        lines.wait_for("sweep pass 1:")
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        assert time.monotonic() - started < 30
        lines.wait_for("sweep: stopped after 1 passes")
    finally:
        if proc.poll() is None:
            proc.kill()
