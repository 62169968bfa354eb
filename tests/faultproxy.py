"""A small TCP fault proxy for tests: put it between the library and Redis or PostgreSQL.

    proxy = FaultProxy(redis_port).start()
    client = redis.Redis(port=proxy.port)
    proxy.latency(0.2)   # every chunk going to the target waits 200 ms: +200 ms per round trip
    proxy.blackhole()    # connections are accepted and read, nothing is forwarded, nothing answered
    proxy.reset()        # every connection is closed with RST; new ones are reset on accept until heal()
    proxy.heal()         # pass-through again (connections that lost bytes to the blackhole are dropped)
    proxy.close()

Listens on 127.0.0.1 only, on a free port. One thread does everything (accept, connect, pump,
delays) with a selector and non-blocking sockets, so the proxy's thread count is 1 whatever the
number of connections or the fault; `close()` stops and joins it. Connecting to the target is
a short blocking connect on loopback (0.5 s bound); if the target is down the client is reset.
"""

from __future__ import annotations

import collections
import selectors
import socket
import struct
import threading
import time
from typing import Any

__all__ = ["FaultProxy"]

PASS, LATENCY, BLACKHOLE, RESET = "pass", "latency", "blackhole", "reset"
_CHUNK = 65536
_CONNECT_TIMEOUT = 0.5
# Stop reading a side while this much is queued for its peer (a slow or delayed peer).
_MAX_QUEUED = 8 << 20


def _rst_close(sock: socket.socket) -> None:
    """Close with RST (SO_LINGER 0) rather than FIN, as a crashed peer or a firewall reset would."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    try:
        sock.close()
    except OSError:
        pass


class _Link:
    """One proxied connection: the client's socket, the target's socket (None while blackholed)."""

    __slots__ = ("client", "upstream", "queues", "queued", "dirty", "closed")

    def __init__(self, client: socket.socket, upstream: socket.socket | None) -> None:
        self.client = client
        self.upstream = upstream
        # Bytes waiting to be written TO a socket: deque of [due_monotonic, memoryview].
        self.queues: dict[socket.socket, collections.deque[list[Any]]] = {client: collections.deque()}
        if upstream is not None:
            self.queues[upstream] = collections.deque()
        self.queued = 0
        self.dirty = upstream is None  # lost bytes (or never connected): unusable after heal
        self.closed = False

    def peer(self, sock: socket.socket) -> socket.socket | None:
        return self.upstream if sock is self.client else self.client


class FaultProxy:
    """Threaded TCP proxy to 127.0.0.1:target_port with runtime faults: latency, blackhole, reset."""

    def __init__(self, target_port: int, target_host: str = "127.0.0.1") -> None:
        self.target = (target_host, target_port)
        self.port = 0
        self.mode = PASS
        self.delay = 0.0
        self.accepted = 0  # connections accepted, ever
        self.refused = 0  # connections reset on accept (reset mode or target down)
        self.max_active = 0  # most simultaneous proxied connections seen
        self._links: set[_Link] = set()
        self._lock = threading.Lock()
        self._commands: collections.deque[tuple[str, float, threading.Event]] = collections.deque()
        self._sel = selectors.DefaultSelector()
        self._listener: socket.socket | None = None
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._thread: threading.Thread | None = None
        self._stop = False

    # -- control (any thread) -------------------------------------------------------------------

    def start(self) -> FaultProxy:
        """Bind 127.0.0.1:0 and start the pump thread; returns self (see .port)."""
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", 0))
        listener.listen(512)
        listener.setblocking(False)
        self._listener = listener
        self.port = listener.getsockname()[1]
        self._sel.register(listener, selectors.EVENT_READ, "accept")
        self._sel.register(self._wake_r, selectors.EVENT_READ, "wake")
        self._thread = threading.Thread(target=self._loop, name=f"faultproxy-{self.port}", daemon=True)
        self._thread.start()
        return self

    def latency(self, seconds: float) -> None:
        """Delay every chunk going to the target by `seconds` (so each request/response round trip)."""
        self._command(LATENCY, seconds)

    def blackhole(self) -> None:
        """Accept and read, forward nothing, answer nothing (a dead peer that never resets)."""
        self._command(BLACKHOLE)

    def reset(self) -> None:
        """RST every current connection; reset new ones on accept until heal()."""
        self._command(RESET)

    def heal(self) -> None:
        """Back to pass-through without delay; connections that dropped bytes are closed."""
        self._command(PASS)

    def close(self) -> None:
        """Stop the thread and close every socket; idempotent."""
        if self._thread is None:
            return
        self._stop = True
        self._wakeup()
        self._thread.join(5)
        self._thread = None

    @property
    def active(self) -> int:
        """Proxied connections open right now."""
        return len(self._links)

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _command(self, mode: str, seconds: float = 0.0) -> None:
        """Hand a mode change to the pump thread and wait until it took effect."""
        if seconds < 0:
            raise ValueError("latency must be >= 0")
        if self._thread is None or not self._thread.is_alive():
            raise RuntimeError("fault proxy is not running")
        done = threading.Event()
        with self._lock:
            self._commands.append((mode, seconds, done))
        self._wakeup()
        if not done.wait(5):
            raise RuntimeError("fault proxy thread did not take the command")

    def _wakeup(self) -> None:
        try:
            self._wake_w.send(b"x")
        except (BlockingIOError, OSError):
            pass

    # -- the pump thread ------------------------------------------------------------------------

    def _loop(self) -> None:
        try:
            while not self._stop:
                self._sel_cycle()
        finally:
            for link in list(self._links):
                self._drop(link, rst=False)
            for sock in (self._listener, self._wake_r, self._wake_w):
                if sock is not None:
                    try:
                        sock.close()
                    except OSError:
                        pass
            self._sel.close()

    def _sel_cycle(self) -> None:
        now = time.monotonic()
        timeout = 0.5
        for link in self._links:
            for q in link.queues.values():
                if q:
                    timeout = min(timeout, max(0.0, q[0][0] - now))
        for key, mask in self._sel.select(timeout):
            what = key.data
            if what == "accept":
                self._accept()
            elif what == "wake":
                try:
                    while self._wake_r.recv(4096):
                        pass
                except (BlockingIOError, OSError):
                    pass
                self._apply_commands()
            else:
                link: _Link = what
                if link.closed:
                    continue
                sock = key.fileobj
                if mask & selectors.EVENT_WRITE:
                    self._flush(link, sock)  # type: ignore[arg-type]
                if mask & selectors.EVENT_READ and not link.closed:
                    self._read(link, sock)  # type: ignore[arg-type]
        for link in list(self._links):
            for sock in list(link.queues):
                if not link.closed:
                    self._flush(link, sock)

    def _apply_commands(self) -> None:
        while True:
            with self._lock:
                if not self._commands:
                    return
                mode, seconds, done = self._commands.popleft()
            if mode == RESET:
                for link in list(self._links):
                    self._drop(link, rst=True)
            elif mode == PASS:
                for link in list(self._links):
                    if link.dirty:
                        self._drop(link, rst=True)
            self.mode = mode
            self.delay = seconds if mode == LATENCY else 0.0
            done.set()

    def _accept(self) -> None:
        assert self._listener is not None
        while True:
            try:
                client, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return
            self.accepted += 1
            if self.mode == RESET:
                self.refused += 1
                _rst_close(client)
                continue
            upstream = None
            if self.mode != BLACKHOLE:
                try:
                    upstream = socket.create_connection(self.target, timeout=_CONNECT_TIMEOUT)
                except OSError:
                    self.refused += 1
                    _rst_close(client)
                    continue
                upstream.setblocking(False)
                upstream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            client.setblocking(False)
            client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            link = _Link(client, upstream)
            self._links.add(link)
            self.max_active = max(self.max_active, len(self._links))
            self._sel.register(client, selectors.EVENT_READ, link)
            if upstream is not None:
                self._sel.register(upstream, selectors.EVENT_READ, link)

    def _read(self, link: _Link, sock: socket.socket) -> None:
        try:
            data = sock.recv(_CHUNK)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self._drop(link, rst=False)
            return
        peer = link.peer(sock)
        if self.mode == BLACKHOLE or peer is None:
            link.dirty = True  # bytes lost: this connection's protocol state is broken for good
            return
        due = time.monotonic() + (self.delay if sock is link.client else 0.0)
        q = link.queues[peer]
        if q and q[-1][0] > due:
            due = q[-1][0]  # keep the byte order if the delay was shortened meanwhile
        q.append([due, memoryview(data)])
        link.queued += len(data)
        self._flush(link, peer)
        self._update_interest(link)

    def _flush(self, link: _Link, sock: socket.socket) -> None:
        q = link.queues.get(sock)
        if not q:
            self._update_interest(link)
            return
        now = time.monotonic()
        while q and q[0][0] <= now:
            view = q[0][1]
            try:
                n = sock.send(view)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                self._drop(link, rst=False)
                return
            link.queued -= n
            if n < len(view):
                q[0][1] = view[n:]
                break
            q.popleft()
        self._update_interest(link)

    def _update_interest(self, link: _Link) -> None:
        """Write interest while a due chunk waits; read interest unless the peer is backed up."""
        if link.closed:
            return
        now = time.monotonic()
        for sock, q in link.queues.items():
            peer = link.peer(sock)
            events = 0
            peer_q = link.queues.get(peer) if peer is not None else None
            if not (peer_q and link.queued > _MAX_QUEUED):
                events |= selectors.EVENT_READ
            if q and q[0][0] <= now:
                events |= selectors.EVENT_WRITE
            if not events:
                events = selectors.EVENT_READ  # a selector key needs some interest; reads are then throttled late
            try:
                if self._sel.get_key(sock).events != events:
                    self._sel.modify(sock, events, link)
            except (KeyError, ValueError):
                pass

    def _drop(self, link: _Link, *, rst: bool) -> None:
        if link.closed:
            return
        link.closed = True
        self._links.discard(link)
        for sock in (link.client, link.upstream):
            if sock is None:
                continue
            try:
                self._sel.unregister(sock)
            except (KeyError, ValueError):
                pass
            if rst:
                _rst_close(sock)
            else:
                try:
                    sock.close()
                except OSError:
                    pass
