"""Fork safety in one place: objects that own threads, locks or sockets reset them in a forked child."""

from __future__ import annotations

import os
import threading
import weakref
from typing import Protocol


class ForkAware(Protocol):
    """Something whose threads, locks or sockets a forked child must not inherit as they are."""

    def _after_fork_in_child(self) -> None: ...


_objects: weakref.WeakSet[ForkAware] = weakref.WeakSet()
_guard = threading.Lock()


def register(obj: ForkAware) -> None:
    """Call obj._after_fork_in_child() in every child forked after this (gunicorn --preload, multiprocessing fork)."""
    with _guard:
        _objects.add(obj)


def _run_in_child() -> None:
    """In the child: only this thread survived; locks other threads held are reset by their owners here."""
    global _guard
    _guard = threading.Lock()
    for obj in list(_objects):
        obj._after_fork_in_child()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_run_in_child)
