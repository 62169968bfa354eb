#!/usr/bin/env python3
"""Generate tiered_cache/_sync/ from the hand-written tiered_cache/_async/ (psycopg's and unasync's idea).

Token rules, not an AST rewrite: `async` and `await` go, names in NAMES are renamed (in code and in
strings/comments as whole words), lines in LINES are replaced whole. Every output starts with a header
naming its source. `--check` regenerates in memory and exits 1 if a committed file differs (CI runs it).
"""

from __future__ import annotations

import argparse
import difflib
import io
import re
import sys
import tokenize
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SRC = ROOT / "tiered_cache" / "_async"
DST = ROOT / "tiered_cache" / "_sync"

#: async name -> sync name, for NAME tokens and whole words in strings and comments.
NAMES = {
    "AsyncIterator": "Iterator",
    "AsyncIterable": "Iterable",
    "AsyncGenerator": "Generator",
    "asynccontextmanager": "contextmanager",
    "StopAsyncIteration": "StopIteration",
    "__aenter__": "__enter__",
    "__aexit__": "__exit__",
    "__aiter__": "__iter__",
    "__anext__": "__next__",
    "aclose": "close",
    "aioredis": "redis",
    "_async": "_sync",
    "async_redis_client": "redis_client",
    "aconnect": "connect",
    # tiered_cache/_acompat.py: the primitives that differ
    "asleep": "sleep",
    "AEvent": "Event",
    "AWorker": "Worker",
    "await_event": "wait_event",
    "arun_blocking": "run_blocking",
    "ahealth": "health",
    "ALock": "Lock",
    "aopen_pool": "open_pool",
    # tiered_cache/tiers/_store_shared.py: callables the async store awaits
    "AWork": "Work",
    "ABeforeCommit": "BeforeCommit",
    # the Redis tier (issue 10): a lock held across awaits; redis.asyncio awaits a marked redis_connect_func
    "acallback": "callback",
    # tiered_cache/_wakeups.py (issue 12): a waiter woken by another thread
    "await_wait": "wait",
    # tiers/_redis_cluster.py (issue 13): redis-py's cluster clients differ in how they take a connect callback
    "acluster_client": "cluster_client",
    # tiered_cache/_lean.py: the async pool's checkout fast path; the sync pool is redis-py's own, marked
    "ALeanPool": "LeanPool",
}

#: Whole import lines whose sync form is not a token-for-token rename.
LINES = {
    "import redis.asyncio as aioredis": "import redis",
    "from redis.asyncio.client import Pipeline": "from redis.client import Pipeline",
    # the Redis tier (issue 10): redis.asyncio's Retry awaits, redis-py's calls
    "from redis.asyncio.retry import Retry": "from redis.retry import Retry",
}

HEADER = "# Generated from {src} by tools/async_to_sync.py: do not edit; edit the source and run it again.\n"

_ASYNC_CLASS = re.compile(r"\bAsync(?=[A-Z])")


def rename(name: str) -> str:
    """The sync name: the map first, else an `AsyncX` class becomes `X` (AsyncConnectionPool, AsyncRedisTier)."""
    return NAMES.get(name) or _ASYNC_CLASS.sub("", name)


_WORDS = re.compile(r"\b(" + "|".join(re.escape(k) for k in sorted(NAMES, key=len, reverse=True)) + r")\b")


def _words(text: str) -> str:
    """Rename whole words inside a string or comment (docstrings name the sync classes in the twin)."""
    return _ASYNC_CLASS.sub("", _WORDS.sub(lambda m: NAMES[m.group(1)], text))


def unasync(source: str) -> str:
    """The sync twin of one async module's text."""
    lines = [LINES.get(line.strip(), None) for line in source.splitlines()]
    source = "".join(
        (line[: len(line) - len(line.lstrip())] + new + "\n") if new is not None else line + "\n"
        for line, new in zip(source.splitlines(), lines)
    )
    out: list[str] = []
    tokens = list(tokenize.generate_tokens(io.StringIO(source).readline))
    row, col = 1, 0
    src_lines = source.splitlines(keepends=True) + [""]
    skip_space = False

    def gap(to_row: int, to_col: int) -> str:
        """The source text between the previous token's end and this token's start (whitespace, continuations)."""
        if (row, col) == (to_row, to_col):
            return ""
        if row == to_row:
            return src_lines[row - 1][col:to_col]
        parts = [src_lines[row - 1][col:]]
        parts += src_lines[row : to_row - 1]
        parts.append(src_lines[to_row - 1][:to_col])
        return "".join(parts)

    for tok in tokens:
        text = gap(*tok.start)
        if skip_space and tok.start[0] == row:
            text = ""
        skip_space = False
        if tok.type == tokenize.NAME and tok.string in ("async", "await"):
            out.append(text)
            skip_space = True
        elif tok.type == tokenize.NAME:
            out.append(text + rename(tok.string))
        elif tok.type in (tokenize.STRING, tokenize.COMMENT):
            out.append(text + _words(tok.string))
        else:
            out.append(text + tok.string)
        row, col = tok.end
    return "".join(out)


def outputs() -> dict[Path, str]:
    """Every generated file and its text."""
    result = {}
    for path in sorted(SRC.rglob("*.py")):
        rel = path.relative_to(SRC)
        header = HEADER.format(src=path.relative_to(ROOT).as_posix())
        result[DST / rel] = header + unasync(path.read_text())
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if a committed sync file is out of date")
    args = parser.parse_args(argv)
    wanted = outputs()
    stale = [p for p in sorted(DST.rglob("*.py")) if p not in wanted]
    if args.check:
        bad = 0
        for path, text in wanted.items():
            have = path.read_text() if path.exists() else ""
            if have != text:
                bad += 1
                sys.stdout.writelines(difflib.unified_diff(
                    have.splitlines(keepends=True), text.splitlines(keepends=True),
                    str(path.relative_to(ROOT)), "generated"))
        for path in stale:
            bad += 1
            print(f"{path.relative_to(ROOT)}: no async source generates it")
        if bad:
            print(f"async_to_sync --check: {bad} generated file(s) out of date; run tools/async_to_sync.py", file=sys.stderr)
            return 1
        print(f"async_to_sync --check: {len(wanted)} generated file(s) up to date")
        return 0
    for path, text in wanted.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.exists() or path.read_text() != text:
            path.write_text(text)
            print(f"wrote {path.relative_to(ROOT)}")
    for path in stale:
        path.unlink()
        print(f"removed {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
