"""Benchmarks (not part of the test run); installed as tiered_cache.bench for `tiered-cache bench`.

Importing this package is cheap: the benchmark and its dependencies load only when main() runs.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark (see `tiered-cache bench --help`); returns the exit status."""
    from .run import main as run_main

    return run_main(argv)
