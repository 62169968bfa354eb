"""`uvicorn` whose --workers listener is bound as IPPROTO_TCP, so accepted connections keep TCP_NODELAY.

uvicorn's Config.bind_socket() leaves the socket's proto at 0; accepted sockets inherit it, and asyncio only sets
TCP_NODELAY when proto is IPPROTO_TCP (Kludex/uvicorn#3149). With Nagle on, a reply written as headers then body
waits for the client's delayed ACK: ~43 ms on every keep-alive request on Linux, whatever the app does.
`--workers 1` is unaffected (asyncio binds from getaddrinfo there). Same flags as `python -m uvicorn`.
"""

from __future__ import annotations

import socket
import sys

import uvicorn.config
from uvicorn.main import main as uvicorn_main

_bind_socket = uvicorn.config.Config.bind_socket


def bind_socket(self: uvicorn.config.Config) -> socket.socket:
    """uvicorn's listener, re-wrapped with proto=IPPROTO_TCP (same file descriptor, nothing else changes)."""
    sock = _bind_socket(self)
    if sock.family in (socket.AF_INET, socket.AF_INET6) and sock.proto == 0:
        sock = socket.socket(sock.family, sock.type, socket.IPPROTO_TCP, fileno=sock.detach())
        sock.set_inheritable(True)
    return sock


uvicorn.config.Config.bind_socket = bind_socket  # type: ignore[method-assign]

if __name__ == "__main__":
    sys.exit(uvicorn_main())
