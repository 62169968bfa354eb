"""The verify command: a sampled Redis-against-PostgreSQL comparison, or continuous probes reported in nines."""

from __future__ import annotations

import argparse
import math
from typing import TYPE_CHECKING, Any

from ..errors import ConfigurationError
from ._common import add_namespace, connect, parse_site, positive_float, positive_int, stop_on_signals

if TYPE_CHECKING:
    from ..verify import Tallies


def add_commands(sub: Any, servers: argparse.ArgumentParser) -> None:
    """Register verify."""
    verify = sub.add_parser(
        "verify", parents=[servers],
        help="compare sampled Redis entries with PostgreSQL (exit 1 on mismatch), or probe continuously",
    )
    verify.add_argument("--sample", type=int, default=1000, help="entries to compare")
    add_namespace(verify)
    verify.add_argument("--redis-timeout", type=float, default=0.05, help="seconds per Redis call (the library's default)")
    probe = verify.add_argument_group("continuous probing")
    probe.add_argument("--continuous", action="store_true",
                       help="write a probe row every --interval and read it back from every tier after each window")
    probe.add_argument("--interval", type=positive_float, default=1.0, help="seconds between probe writes")
    probe.add_argument("--duration", type=positive_float, default=60.0, help="seconds of probe writes")
    probe.add_argument("--windows", type=_windows, default=(0.1, 1.0, 10.0), metavar="S,S,...",
                       help="read-back delays in seconds (default 0.1,1,10)")
    probe.add_argument("--report-every", type=positive_float, default=10.0, help="seconds between report lines")
    probe.add_argument("--targets", type=positive_int, default=4, help="probe keys the writes rotate over")
    probe.add_argument("--probe-site", default="0", help="site id of the probe rows (cache type _tc_probe)")
    probe.add_argument("--no-near", action="store_true", help="no reader near tier (then only Redis and PostgreSQL)")
    probe.add_argument("--min-nines", type=float, help="exit 1 if any window and tier scores fewer nines")
    verify.set_defaults(run=verify_command)


def _windows(text: str) -> tuple[float, ...]:
    """argparse type: comma-separated positive seconds."""
    try:
        values = tuple(sorted(float(part) for part in text.split(",") if part.strip()))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds separated by commas, got {text!r}") from None
    if not values or values[0] <= 0 or not math.isfinite(values[-1]):
        raise argparse.ArgumentTypeError(f"expected positive seconds, got {text!r}")
    return values


def verify_command(args: argparse.Namespace) -> int:
    """`tiered-cache verify [--continuous ...]`."""
    if args.continuous:
        return _continuous(args)
    from ..verify import verify

    with connect(args) as cache:
        report = verify(cache, sample=args.sample)
    print(report.summary())
    for m in report.mismatches[:20]:
        print(f"  mismatch {m['key']}: redis id={_id(m['redis'])} postgres id={_id(m['postgres'])}")
    return 0 if not report.mismatches else 1


def _id(row: object) -> object:
    """A row's id for a mismatch line (a negative entry prints as None)."""
    return row.get("id") if isinstance(row, dict) else row


def _continuous(args: argparse.Namespace) -> int:
    """Probe for --duration seconds, a line per report period, then a summary; probe rows invalidated at the end."""
    import time

    from ..verify import ContinuousVerifier, ProbeSchedule, verify

    site = parse_site(args.probe_site)
    if args.min_nines is not None and not args.min_nines >= 0:
        raise ConfigurationError(f"--min-nines: expected a number >= 0, got {args.min_nines}")
    with connect(args) as writer, connect(args, near_max_entries=0 if args.no_near else 1000) as reader:
        schedule = ProbeSchedule(interval=args.interval, windows=args.windows, duration=args.duration,
                                 targets=args.targets, start=time.monotonic())
        prober = ContinuousVerifier(writer, reader, schedule, site=site)
        print(f"verify: a probe every {args.interval:g} s for {args.duration:g} s over {args.targets} keys, read back "
              f"after {', '.join(f'{w:g}' for w in args.windows)} s; namespace {writer.keys.namespace!r}", flush=True)
        try:
            with stop_on_signals() as stop:
                total = prober.run(report_every=args.report_every, stop=stop,
                                   report=lambda elapsed, period: print(report_line(elapsed, period), flush=True))
            sampled = verify(writer, sample=args.sample)  # before the cleanup, so probe entries are in the sample
        finally:
            cleaned = prober.cleanup()
    print("\n".join(summary_lines(total)))
    print(f"sampled comparison (Redis against PostgreSQL): {sampled.summary()}")
    print(f"probe rows invalidated: {cleaned}")
    if args.min_nines is not None and total.worst_nines() < args.min_nines:
        print(f"verify: below --min-nines {args.min_nines:g}: worst window scored {_nines(total.worst_nines())}")
        return 1
    return 0


def _nines(value: float) -> str:
    """Nines for a report: 'all' when no read-back was stale."""
    return "all" if math.isinf(value) else f"{value:.2f}"


def report_line(elapsed: float, period: Tallies) -> str:
    """One report period: per window, each tier's consistent/checked and nines."""
    parts = []
    for window in period.windows:
        cells = [f"{tier}={_nines(t.nines)}({t.consistent}/{t.checked})"
                 for (w, tier), t in period.by.items() if w == window and t.checked + t.unreachable]
        parts.append(f"{window:g}s " + " ".join(cells) if cells else f"{window:g}s -")
    failed = f", {period.failed_writes} writes failed" if period.failed_writes else ""
    return f"verify {elapsed:7.1f} s: {period.probes} probes{failed} | " + " | ".join(parts)


def summary_lines(total: Tallies) -> list[str]:
    """The whole run, a row per window and tier."""
    lines = [f"summary: {total.probes} probes written, {total.failed_writes} writes failed",
             f"  {'window':>7} {'tier':<11} {'consistent':>12} {'share':>9} {'nines':>6} {'misses':>7} {'down':>5}"]
    for (window, tier), t in total.by.items():
        if t.checked + t.unreachable == 0:
            continue
        lines.append(f"  {window:>6g}s {tier:<11} {f'{t.consistent}/{t.checked}':>12} {t.share:>9.6f} "
                     f"{_nines(t.nines):>6} {t.misses:>7} {t.unreachable:>5}")
    fewest = min((t.checked for t in total.by.values() if t.checked), default=0)
    if fewest:
        lines.append(f"  ('all': no stale read-back; {fewest} read-backs tell apart at most {math.log10(fewest):.1f} nines)")
    return lines
