"""The load generator of `bench --http`: keep-alive HTTP/1.1 on raw asyncio streams, a seeded mix, a stale-read check.

Raw streams rather than httpx: the generator shares the 2-core machine with the server, so every
microsecond it spends is one the server does not get (its own CPU is measured and reported).
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import orjson

from ._workload import Keyspace, WorkloadSpec

ENDPOINTS = ("board", "chat", "write", "regenerate", "invalidate")
BOARD, CHAT, MUTATE = 0.70, 0.25, 0.05  # the mix; mutations split like the mixed profile's writes
MUTATION_SPLIT = (("write", 0.50), ("regenerate", 0.35), ("invalidate", 0.15))
REQUEST_TIMEOUT = 10.0
Key = tuple[str, int, str]


class HttpError(Exception):
    """A reply the generator cannot use: wrong status, framing or body."""


class Connection:
    """One keep-alive HTTP/1.1 connection (Content-Length framing only: the app never chunks)."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def open(self) -> None:
        self.reader, self.writer = await asyncio.open_connection(self.host, self.port)

    @property
    def local_port(self) -> int:
        assert self.writer is not None
        return int(self.writer.get_extra_info("sockname")[1])

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = self.reader = None

    async def request(self, method: str, target: str, body: bytes = b"") -> tuple[int, bytes]:
        """Send one request, read its reply: (status, body)."""
        if self.writer is None:
            await self.open()
        assert self.reader is not None and self.writer is not None
        head = f"{method} {target} HTTP/1.1\r\nHost: {self.host}\r\n"
        if body or method == "POST":
            head += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
        self.writer.write(head.encode() + b"\r\n" + body)
        raw = await self.reader.readuntil(b"\r\n\r\n")
        lines = raw.split(b"\r\n")
        status = int(lines[0].split(b" ", 2)[1])
        length, close = 0, False
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                length = int(value)
            elif name == b"connection" and value.strip().lower() == b"close":
                close = True
            elif name == b"transfer-encoding":
                raise HttpError(f"{method} {target}: transfer-encoding {value.strip().decode()} (expected Content-Length)")
        payload = await self.reader.readexactly(length)
        if close:
            self.close()
        return status, payload


# -- the stale-read check ---------------------------------------------------------------------------


@dataclass
class KeyLog:
    """What the generator did to one key: completed mutations in order, and when invalidations began."""

    events: list[tuple[float, str, int]] = field(default_factory=list)  # (done_at, "W" row id | "I" max id before)
    invalidations_started: list[float] = field(default_factory=list)
    max_written: int = 0


class StaleCheck:
    """A read that began after a mutation's reply arrived must show that state or a newer one.

    The generator runs one mutation per key at a time, so a key's states are totally ordered: after a write of row
    w, get_latest answers w or newer (ids only grow); after an invalidation, null or a row written after it (an id
    above every id that existed when it began: `floor_id`, the table's max id at the start, bounds the loaded rows).
    `bound` (the near tier's near_max_age) is the staleness the backend is allowed: a read that is stale against
    the state at its start but not against the state `bound` seconds earlier is counted apart, as within it.
    """

    def __init__(self, floor_id: int, bound: float) -> None:
        self.floor_id, self.bound = floor_id, bound
        self.logs: dict[Key, KeyLog] = {}
        self.checked = self.stale = self.stale_within_bound = 0
        self.examples: list[str] = []

    def wrote(self, key: Key, row_id: int, done_at: float) -> None:
        log = self.logs.setdefault(key, KeyLog())
        log.events.append((done_at, "W", row_id))
        log.max_written = max(log.max_written, row_id)

    def invalidating(self, key: Key, started_at: float) -> int:
        """Note that an invalidation begins; returns the id every row it retires is at most."""
        log = self.logs.setdefault(key, KeyLog())
        log.invalidations_started.append(started_at)
        return max(self.floor_id, log.max_written)

    def invalidated(self, key: Key, max_before: int, done_at: float) -> None:
        self.logs[key].events.append((done_at, "I", max_before))

    def read(self, key: Key, started_at: float, ended_at: float, got: int | None) -> None:
        log = self.logs.get(key)
        if log is None or not log.events or log.events[0][0] > started_at:
            return  # no mutation of ours had completed: nothing to hold the answer against
        self.checked += 1
        if self._legal(log, started_at, ended_at, got):
            return
        if self.bound and self._legal(log, started_at - self.bound, ended_at, got):
            self.stale_within_bound += 1
            return
        self.stale += 1
        if len(self.examples) < 5:
            self.examples.append(f"{key}: got {got}, after {log.events[-3:]}, read began at {started_at:.3f}")

    @staticmethod
    def _legal(log: KeyLog, at: float, ended_at: float, got: int | None) -> bool:
        ref = next((e for e in reversed(log.events) if e[0] <= at), None)
        if ref is None:
            return True
        done_at, kind, value = ref
        if got is None:
            return kind == "I" or any(done_at < s <= ended_at for s in log.invalidations_started)
        return got >= value if kind == "W" else got > value


# -- the driver -------------------------------------------------------------------------------------


@dataclass
class Tally:
    """Per endpoint: requests and latencies inside the measured window; errors over the whole run."""

    counted: dict[str, int] = field(default_factory=lambda: dict.fromkeys(ENDPOINTS, 0))
    latency_ns: dict[str, list[int]] = field(default_factory=lambda: {e: [] for e in ENDPOINTS})
    errors: dict[str, int] = field(default_factory=lambda: dict.fromkeys(ENDPOINTS, 0))
    error_examples: list[str] = field(default_factory=list)
    sent: int = 0
    window: tuple[float, float] = (0.0, 0.0)


class Mix:
    """One connection's seeded op stream: board pages, chat turns and mutations of Zipf-popular keys."""

    def __init__(self, spec: WorkloadSpec, keyspace: Keyspace, docs: list[bytes], stream: int) -> None:
        self.spec, self.keyspace, self.docs = spec, keyspace, docs
        self.rng = random.Random(spec.seed * 1009 + stream)

    def next(self) -> tuple[str, str, int, Any]:
        r = self.rng.random()
        if r < BOARD:
            return ("board", *self.keyspace.board(self.rng, self.spec.board_min, self.spec.board_max))
        app, site, target = self.keyspace.key(self.rng)
        if r < BOARD + CHAT:
            return "chat", app, site, target
        w, acc = self.rng.random(), 0.0
        for kind, share in MUTATION_SPLIT:
            acc += share
            if w < acc:
                return kind, app, site, target
        return MUTATION_SPLIT[-1][0], app, site, target


class Driver:
    """Runs the connections until the deadline; calls `snapshot` when the measured window opens and closes."""

    def __init__(self, conns: list[Connection], mixes: list[Mix], stale: StaleCheck) -> None:
        self.conns, self.mixes, self.stale = conns, mixes, stale
        self.tally = Tally()
        self.locks: dict[Key, asyncio.Lock] = {}

    async def run(self, warmup_s: float, seconds: float, snapshot: Callable[[], Any]) -> tuple[Any, Any]:
        t0 = time.perf_counter()
        deadline = t0 + warmup_s + seconds
        tasks = [asyncio.create_task(self._loop(c, m, deadline)) for c, m in zip(self.conns, self.mixes)]
        try:
            await asyncio.sleep(max(0.0, t0 + warmup_s - time.perf_counter()))
            start = time.perf_counter()
            before = snapshot()
            self.tally.window = (start, deadline)
            await asyncio.sleep(max(0.0, deadline - time.perf_counter()))
            after = snapshot()
            self.tally.window = (start, time.perf_counter())
            await asyncio.gather(*tasks)
        finally:
            for t in tasks:
                t.cancel()
        return before, after

    async def _loop(self, conn: Connection, mix: Mix, deadline: float) -> None:
        while time.perf_counter() < deadline:
            op = mix.next()
            try:
                await asyncio.wait_for(self._one(conn, mix, op), REQUEST_TIMEOUT)
            except (OSError, asyncio.IncompleteReadError, asyncio.TimeoutError, asyncio.LimitOverrunError,
                    HttpError, ValueError, KeyError, TypeError) as exc:
                self.tally.errors[op[0]] += 1
                if len(self.tally.error_examples) < 5:
                    self.tally.error_examples.append(f"{op[0]} {op[1]}/{op[2]}: {type(exc).__name__}: {exc}"[:300])
                conn.close()  # a broken exchange leaves the connection unusable: the next request reopens it

    def _count(self, endpoint: str, started: float, ended: float) -> None:
        start, end = self.tally.window
        if start and start <= started and ended <= end:
            self.tally.counted[endpoint] += 1
            self.tally.latency_ns[endpoint].append(int((ended - started) * 1e9))

    async def _one(self, conn: Connection, mix: Mix, op: tuple[str, str, int, Any]) -> None:
        kind, app, site, what = op
        self.tally.sent += 1
        if kind == "board":
            started = time.perf_counter()
            status, body = await conn.request("GET", f"/board/{site}?type={app}&targets={','.join(what)}")
            ended = time.perf_counter()
            page = _json(status, 200, body, kind)
            if set(page) != set(what):
                raise HttpError(f"board answered {len(page)} targets for {len(what)} asked")
            for t in what:
                row = page[t]
                self.stale.read((app, site, t), started, ended, None if row is None else row["id"])
        elif kind == "chat":
            started = time.perf_counter()
            status, body = await conn.request("GET", f"/chat/{site}/{what}?type={app}")
            ended = time.perf_counter()
            turn = _json(status, 200, body, kind)
            latest = turn["latest"]
            if not isinstance(turn["history"], list):
                raise HttpError("chat answered no history list")
            self.stale.read((app, site, what), started, ended, None if latest is None else latest["id"])
        else:
            key = (app, site, what)
            async with self.locks.setdefault(key, asyncio.Lock()):  # one mutation per key at a time (see StaleCheck)
                started = time.perf_counter()
                if kind == "invalidate":
                    max_before = self.stale.invalidating(key, started)
                    status, body = await conn.request("DELETE", f"/results/{site}/{what}?type={app}")
                    ended = time.perf_counter()
                    _json(status, 200, body, kind)["invalidated"]
                    self.stale.invalidated(key, max_before, ended)
                else:
                    doc = mix.docs[mix.rng.randrange(len(mix.docs))]
                    status, body = await conn.request(
                        "POST", f"/results/{site}/{what}?type={app}&triggered_by={kind}", doc)
                    ended = time.perf_counter()
                    self.stale.wrote(key, int(_json(status, 201, body, kind)["id"]), ended)
        self._count(kind, started, ended)


def _json(status: int, expected: int, body: bytes, endpoint: str) -> Any:
    if status != expected:
        raise HttpError(f"{endpoint}: HTTP {status} (expected {expected}): {body[:200]!r}")
    return orjson.loads(body)


def percentile_ms(values: list[int], q: float) -> float | None:
    """The q-quantile (nearest rank) of nanosecond latencies, in milliseconds."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] / 1e6
