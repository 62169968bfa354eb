"""Turning measurements into figures, and figures into a terminal table, Markdown, JSON and a chart."""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

# -- statistics -------------------------------------------------------------------------------------


def percentiles(lat_ns: Sequence[int], qs: Sequence[float] = (50, 99, 99.9)) -> list[float]:
    """Percentiles in microseconds (nearest-rank on the sorted sample)."""
    if not lat_ns:
        return [float("nan")] * len(qs)
    try:
        import numpy as np

        arr = np.asarray(lat_ns, dtype=np.int64)
        return [float(v) / 1000 for v in np.percentile(arr, list(qs), method="inverted_cdf")]
    except ImportError:
        s = sorted(lat_ns)
        n = len(s)
        return [s[min(n - 1, max(0, int(-(-q * n // 100)) - 1))] / 1000 for q in qs]


def ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0 or a != a or b != b:
        return None
    return a / b


# -- the machine ------------------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    """CPU model, cores, RAM, OS and Python, as stated at the top of every output."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    ram_gib = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                ram_gib = round(int(line.split()[1]) / (1 << 20), 1)
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "ram_gib": ram_gib,
        "os": platform.platform(),
        "python": f"{platform.python_implementation()} {platform.python_version()}",
    }


LIBRARIES = ("tiered_cache", "redis", "hiredis", "psycopg", "psycopg-binary", "psycopg-pool", "orjson", "cachetools",
             "dogpile.cache", "cashews", "matplotlib", "msgpack")


def library_versions() -> dict[str, str]:
    from importlib import metadata

    out = {}
    for name in LIBRARIES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


# -- formatting -------------------------------------------------------------------------------------


def _num(v: Any, digits: int = 3) -> str:
    """Three significant figures, thousands separated; '-' for nothing."""
    if v is None or (isinstance(v, float) and v != v):
        return "-"
    if isinstance(v, str):
        return v
    if abs(v) >= 1000:
        return f"{v:,.0f}"
    if abs(v) >= 100:
        return f"{v:.0f}"
    if abs(v) >= 10:
        return f"{v:.1f}"
    if abs(v) >= 1:
        return f"{v:.2f}"
    if v == 0:
        return "0"
    return f"{v:.{digits}f}"


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.1f}%"


def _times(v: float | None) -> str:
    return "-" if v is None else f"{_num(v)}x"


def _tier(row: dict[str, Any]) -> str:
    near, redis = row.get("near_hit_ratio"), row.get("redis_hit_ratio")
    if near is None and redis is None:
        return "-"
    return f"{_pct(near)} / {_pct(redis)}"


WORKLOAD_COLUMNS = [
    ("contender", lambda r: r["contender"]),
    ("ops", lambda r: f"{r['ops']:,}"),
    ("ops/s", lambda r: _num(r["ops_per_s"])),
    ("keys/s", lambda r: _num(r["keys_per_s"])),
    ("p50 µs", lambda r: _num(r["p50_us"])),
    ("p99 µs", lambda r: _num(r["p99_us"])),
    ("p99.9 µs", lambda r: _num(r["p999_us"])),
    ("PG q/1k ops", lambda r: _num(r["pg_queries_per_1k"])),
    ("cache hit", lambda r: _pct(r["hit_ratio"])),
    ("near / redis hit", _tier),
    ("CPU µs/op", lambda r: _num(r["cpu_us_per_op"])),
    ("vs old (ops/s)", lambda r: _times(r["vs_old"])),
    ("vs floor (time/op)", lambda r: _times(r["vs_floor"])),
]

SWEEP_HEADER = ["contender"]


def _table(header: list[str], rows: list[list[str]], markdown: bool) -> str:
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" if i == 0 else "---:" for i in range(len(header))) + "|"]
        lines += ["| " + " | ".join(r) + " |" for r in rows]
        return "\n".join(lines)
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    fmt = lambda cells: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))  # noqa: E731
    return "\n".join([fmt(header), "  ".join("-" * w for w in widths), *(fmt(r) for r in rows)])


def workload_table(result: dict[str, Any], name: str, markdown: bool) -> str:
    rows = [[f(r) for _, f in WORKLOAD_COLUMNS] for r in result["workloads"][name]["rows"]]
    return _table([h for h, _ in WORKLOAD_COLUMNS], rows, markdown)


def memory_table(result: dict[str, Any], markdown: bool) -> str:
    mem = result["memory"]
    rows = [[r["contender"], f"{r['ops']:,}", _num(r["peak_kib"]), _num(r["retained_kib"])] for r in mem["rows"]]
    return _table(["contender", "ops", "peak KiB", "retained KiB"], rows, markdown)


def sweep_table(result: dict[str, Any], markdown: bool) -> str:
    sweep = result["sweep"]
    header = ["contender"] + [f"{p} ops/s (p99 µs)" for p in sweep["points"]]
    rows = []
    for r in sweep["rows"]:
        cells = [r["contender"]]
        for p in sweep["points"]:
            pt = r["points"].get(p)
            cells.append("-" if pt is None else f"{_num(pt['ops_per_s'])} ({_num(pt['p99_us'])})")
        rows.append(cells)
    return _table(header, rows, markdown)


def header_lines(result: dict[str, Any]) -> list[str]:
    m, v, s, w = result["machine"], result["versions"], result["servers"], result["workload"]
    libs = ", ".join(f"{k} {val}" for k, val in v.items() if val != "not installed")
    load = m.get("load_average_1m")
    shared = f"; 1-min load average {load[0]} before, {load[1]} after" if load else ""
    return [
        f"machine: {m['cpu']}, {m['cores']} cores, {m['ram_gib']} GiB RAM; {m['os']}{shared}",
        f"python: {m['python']}; PostgreSQL {s['postgresql']}, Redis {s['redis']} "
        f"({'throwaway servers on loopback' if s['owned'] else 'given servers'})",
        f"libraries: {libs}",
        f"workload: size {w['size']}, seed {w['seed']}; {w['sites']} venues x {len(w['apps'])} apps x "
        f"{w['targets_per_site_app']} targets = {w['keys']:,} keys ({w['rows_loaded']:,} rows, "
        f"{w['avg_result_bytes']:,} B average result, loaded in {w['load_s']:.1f} s); Zipf s={w['zipf_s']} over targets, "
        f"s={w['site_zipf_s']} over venues; mixed write rate {w['write_rate']:.0%}",
        f"method: {result['method']['interleaving']}",
        f"CPU placement: {result['method'].get('placement', 'left to the scheduler')}",
        f"PostgreSQL queries counted by: {result['method']['pg_queries']}",
    ]


def render_text(result: dict[str, Any]) -> str:
    out = ["tiered_cache benchmark", *header_lines(result), ""]
    for name, wl in result["workloads"].items():
        out += [f"== {name}: {wl['description']} (single thread)", workload_table(result, name, False), ""]
    if result["memory"]["rows"]:
        out += [f"== memory: {result['method']['memory']}", memory_table(result, False), ""]
    if result["sweep"]["rows"]:
        out += [f"== concurrency sweep ({result['sweep']['workload']} workload; {result['sweep']['note']})",
                sweep_table(result, False), ""]
    out += ["notes:", *(f"- {n}" for n in result["notes"])]
    return "\n".join(out)


def render_markdown(result: dict[str, Any]) -> str:
    out = ["# tiered_cache benchmark", ""]
    out += [f"- {line}" for line in header_lines(result)]
    out.append("")
    for name, wl in result["workloads"].items():
        out += [f"## {name}: {wl['description']}", "", "Single thread, interleaved.", "", workload_table(result, name, True), ""]
    if result["memory"]["rows"]:
        out += ["## Memory", "", result["method"]["memory"] + ".", "", memory_table(result, True), ""]
    if result["sweep"]["rows"]:
        out += [f"## Concurrency sweep ({result['sweep']['workload']})", "", result["sweep"]["note"] + ".", "",
                sweep_table(result, True), ""]
    out += ["## Notes", "", *(f"- {n}" for n in result["notes"]), ""]
    return "\n".join(out)


def write_json(result: dict[str, Any], path: Path) -> None:
    path.write_text(json.dumps(result, indent=2, ensure_ascii=False, default=str) + "\n", encoding="utf-8")


def write_chart(result: dict[str, Any], path: Path) -> bool:
    """Throughput and latency per contender for each workload, and the sweep; False if matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    workloads = list(result["workloads"])
    has_sweep = bool(result["sweep"]["rows"])
    nrows = len(workloads) + (1 if has_sweep else 0)
    fig, axes = plt.subplots(nrows, 2, figsize=(16, 4.2 * nrows), squeeze=False)
    for i, name in enumerate(workloads):
        rows = result["workloads"][name]["rows"]
        names = [r["contender"] for r in rows]
        y = list(range(len(rows)))
        ax = axes[i][0]
        colors = [_color(r["role"]) for r in rows]
        ax.barh(y, [r["ops_per_s"] or 0 for r in rows], color=colors)
        ax.set_yticks(y, names, fontsize=8)
        ax.invert_yaxis()
        ax.set_xscale("log")
        ax.set_xlabel("ops/s (log)")
        ax.set_title(f"{name}: throughput, one thread")
        ax = axes[i][1]
        h = 0.27
        for j, (key, label) in enumerate((("p50_us", "p50"), ("p99_us", "p99"), ("p999_us", "p99.9"))):
            ax.barh([v + (j - 1) * h for v in y], [r[key] or 0 for r in rows], height=h, label=label)
        ax.set_yticks(y, names, fontsize=8)
        ax.invert_yaxis()
        ax.set_xscale("log")
        ax.set_xlabel("latency µs (log)")
        ax.set_title(f"{name}: latency")
        ax.legend(fontsize=8, loc="lower right")
    if has_sweep:
        gs = axes[-1][0].get_gridspec()
        for ax in axes[-1]:
            ax.remove()
        ax = fig.add_subplot(gs[-1, :])
        points = result["sweep"]["points"]
        for r in result["sweep"]["rows"]:
            ax.plot(points, [r["points"].get(p, {}).get("ops_per_s") for p in points], marker="o", label=r["contender"])
        ax.set_yscale("log")
        ax.set_ylabel("ops/s (log)")
        ax.set_title(f"concurrency sweep ({result['sweep']['workload']})")
        ax.legend(fontsize=8)
    m = result["machine"]
    fig.suptitle(f"tiered_cache benchmark, size {result['workload']['size']} — {m['cpu']}, {m['cores']} cores", fontsize=11)
    fig.tight_layout(rect=(0, 0, 1, 0.975))
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True


def _color(role: str) -> str:
    return {"old": "#c0392b", "library": "#2874a6", "peer": "#7d8c8d", "floor": "#b7c9a8"}.get(role, "#999999")


# -- progress ---------------------------------------------------------------------------------------


class Progress:
    """A hand-written progress bar on stderr, advanced by planned seconds; one line per phase when not a TTY."""

    def __init__(self, total_s: float, *, enabled: bool = True, stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.tty = enabled and self.stream.isatty()
        self.total = max(total_s, 1e-9)
        self.done = 0.0
        self.label = ""
        self.started = time.monotonic()
        self._last = 0.0

    def phase(self, label: str) -> None:
        self.label = label
        if self.enabled and not self.tty:
            print(f"[bench {100 * self.done / self.total:3.0f}%] {label}", file=self.stream, flush=True)
        self._draw(force=True)

    def add_total(self, seconds: float) -> None:
        self.total += seconds

    def advance(self, seconds: float, detail: str = "") -> None:
        self.done = min(self.total, self.done + seconds)
        self._draw(detail=detail)

    def _draw(self, detail: str = "", force: bool = False) -> None:
        if not self.tty:
            return
        now = time.monotonic()
        if not force and now - self._last < 0.1:
            return
        self._last = now
        frac = self.done / self.total
        width = 30
        bar = "#" * int(frac * width) + "." * (width - int(frac * width))
        elapsed = now - self.started
        left = elapsed / frac - elapsed if frac > 0.02 else float("nan")
        eta = "--:--" if left != left else f"{int(left // 60)}:{int(left % 60):02d}"
        text = f"\r[{bar}] {100 * frac:3.0f}%  {eta} left  {self.label}"
        if detail:
            text += f" · {detail}"
        self.stream.write(text[:119].ljust(119))
        self.stream.flush()

    def close(self) -> None:
        if self.tty:
            self.stream.write("\r" + " " * 119 + "\r")
            self.stream.flush()
        elif self.enabled:
            print(f"[bench 100%] done in {time.monotonic() - self.started:.0f} s", file=self.stream, flush=True)
