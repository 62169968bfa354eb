"""Errors: one base class, a few precise subclasses, so callers catch what they can act on."""

from __future__ import annotations


class TieredCacheError(Exception):
    """Base of every error this library raises on purpose."""


class InvalidInput(TieredCacheError, ValueError):
    """A call's argument is unusable; raised before any I/O so nothing is written."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field
        self.problem = problem


class ConfigurationError(TieredCacheError, ValueError):
    """An option given to the library cannot work."""


class StoreUnavailable(TieredCacheError):
    """PostgreSQL, the system of record, could not be reached or failed the statement."""

    def __init__(self, message: str, *, maybe_committed: bool = False) -> None:
        super().__init__(message)
        #: False when the statement certainly never reached the server (no connection could be had).
        self.maybe_committed = maybe_committed


class MigrationError(TieredCacheError):
    """The schema could not be brought to the version this library needs."""


class Closed(TieredCacheError, RuntimeError):
    """The object was closed: the call was refused before any I/O, so nothing was sent or written."""


class GenerationTimeout(TieredCacheError, TimeoutError):
    """get_or_generate waited `wait` seconds for another caller's generation of this key, and none finished."""

    def __init__(self, key: tuple[str, int, str], waited: float) -> None:
        super().__init__(f"get_or_generate{key!r}: no result after waiting {waited:.3f} s for another caller's generation")
        self.key = key
        self.waited = waited


class GenerationFailed(TieredCacheError):
    """The generation this caller waited for raised in the caller that ran it (its error text is kept here)."""

    def __init__(self, key: tuple[str, int, str], error: str) -> None:
        super().__init__(f"get_or_generate{key!r}: the generation this call waited for failed: {error}")
        self.key = key
        self.error = error
