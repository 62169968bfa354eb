"""Redis key layout: an injective, cluster-safe encoding of (namespace, cache_type, site_id, target_id)."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import ConfigurationError

# '%' first so escapes never collide; ':' separates fields; braces would end the hash tag early.
_ESCAPES = str.maketrans({"%": "%25", ":": "%3A", "{": "%7B", "}": "%7D"})
_SPECIAL = frozenset("%:{}")


def escape(part: str) -> str:
    """Percent-escape the four characters that carry meaning in a key."""
    if _SPECIAL.isdisjoint(part):
        return part
    return part.translate(_ESCAPES)


# Redis's glob reads a backslash-escaped character as itself, whatever it is.
_GLOB = str.maketrans({c: "\\" + c for c in "\\*?[]"})


def glob_escape(literal: str) -> str:
    """A SCAN MATCH / KEYS pattern that matches `literal` and nothing else (Redis's glob takes backslash escapes)."""
    return literal.translate(_GLOB)


def namespace_pattern(namespace: str) -> str:
    """The pattern of every key of a namespace; `tc[prod]` or `a*b` must not match other namespaces, or none."""
    return glob_escape(namespace) + ":*"


def validate_namespace(namespace: str) -> str:
    """A namespace may not contain braces (they would move the hash tag) or be empty."""
    if not isinstance(namespace, str) or not namespace:
        raise ConfigurationError("namespace: expected a non-empty str")
    if "{" in namespace or "}" in namespace or any(c.isspace() for c in namespace) or "\x00" in namespace:
        raise ConfigurationError(f"namespace: {namespace!r} may not contain braces, spaces or NUL")
    if len(namespace) > 64:
        raise ConfigurationError("namespace: longer than 64 characters")
    return namespace


@dataclass(frozen=True, slots=True)
class KeySet:
    """The Redis keys of one cache key; all share one hash tag, so one cluster slot."""

    entry: str
    history: str
    lease: str
    history_lease: str
    writer: str  # the transaction id of the write-through that stored the entry
    regenerating: str  # get_or_generate's previous result while one generation runs (filled under `lease`)

    @property
    def all(self) -> tuple[str, str, str, str, str, str]:
        """Every key a change must remove."""
        return (self.entry, self.history, self.lease, self.history_lease, self.writer, self.regenerating)


class KeySpace:
    """Builds keys under one namespace; pure and cheap, called on every read."""

    __slots__ = ("namespace", "_prefix", "channel", "probe", "pattern")

    def __init__(self, namespace: str = "tc") -> None:
        self.namespace = validate_namespace(namespace)
        self._prefix = namespace + ":"
        self.channel = namespace + ":changes"
        self.probe = namespace + ":probe"  # never holds a value: only DEL'd, to learn whether writes are accepted
        self.pattern = namespace_pattern(namespace)

    def tag(self, cache_type: str, site_id: int, target_id: str) -> str:
        """The hash-tag body; injective because no escaped part contains ':' and site_id is an int."""
        return f"{{{escape(cache_type)}:{site_id}:{escape(target_id)}}}"

    def entry(self, cache_type: str, site_id: int, target_id: str) -> str:
        """Key of the latest-result entry (or negative entry)."""
        return self._prefix + "e:" + self.tag(cache_type, site_id, target_id)

    def keyset(self, cache_type: str, site_id: int, target_id: str) -> KeySet:
        """All keys of one cache key."""
        tag = self.tag(cache_type, site_id, target_id)
        p = self._prefix
        return KeySet(p + "e:" + tag, p + "h:" + tag, p + "l:" + tag, p + "lh:" + tag, p + "w:" + tag, p + "g:" + tag)

    def parse_entry(self, key: str) -> tuple[str, int, str]:
        """Inverse of entry(); used by verify and tests to prove injectivity."""
        from urllib.parse import unquote

        prefix = self._prefix + "e:{"
        if not key.startswith(prefix) or not key.endswith("}"):
            raise ValueError(f"not an entry key of namespace {self.namespace!r}: {key!r}")
        cache_type, site, target = key[len(prefix) : -1].split(":")
        return unquote(cache_type), int(site), unquote(target)
