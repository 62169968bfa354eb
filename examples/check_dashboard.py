"""Run the fault workload under a real Prometheus, check every dashboard query, and draw examples/dashboard.png.

    .venv/bin/python examples/check_dashboard.py          # needs Debian's prometheus: apt-get install prometheus

Prometheus runs on 127.0.0.1 with a temp storage dir and a 1 s scrape interval, as our child, and is
stopped on exit. Every query of examples/grafana/tiered_cache_dashboard.json (panels, annotations,
the job variable) is run with `promtool query instant` at the end of the workload (it must parse)
and through /api/v1/query_range over the whole run (did it ever have data?). Exit 1 if a query
fails to parse or the scrape never worked; queries without data are listed, not failed.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from tiered_cache.testing._process import free_port, spawn, tail  # our child, killed with us (PDEATHSIG)

HERE = Path(__file__).resolve().parent
DASHBOARD = HERE / "grafana" / "tiered_cache_dashboard.json"
CONFIG = HERE / "prometheus" / "prometheus.yml"
RATE_WINDOW = "5s"  # Grafana's $__rate_interval at a 1 s scrape interval is 4 s (4 scrapes) for short ranges


def need_tools() -> None:
    """Both binaries on PATH, or say how to get them."""
    missing = [tool for tool in ("prometheus", "promtool") if shutil.which(tool) is None]
    if missing:
        sys.exit(f"check_dashboard: {', '.join(missing)} not on PATH; on Debian/Ubuntu: apt-get install prometheus")


def api(base: str, path: str, **params: Any) -> Any:
    """GET a Prometheus HTTP API endpoint; its `data`, or raise with its error."""
    url = f"{base}{path}?{urllib.parse.urlencode(params, doseq=True)}"
    with urllib.request.urlopen(url, timeout=30) as resp:
        body = json.load(resp)
    if body.get("status") != "success":
        raise RuntimeError(f"{path}: {body.get('error')}")
    return body["data"]


def wait_ready(base: str, proc: subprocess.Popen[bytes], log: Path) -> None:
    """Poll /-/ready for up to 60 s; fail with the log's tail if Prometheus exits."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"prometheus exited ({proc.returncode}):\n{tail(log)}")
        try:
            with urllib.request.urlopen(base + "/-/ready", timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    sys.exit(f"prometheus not ready after 60 s:\n{tail(log)}")


def dashboard_queries(dash: dict[str, Any]) -> list[tuple[str, str]]:
    """(where, expr) of every PromQL query in the dashboard: panel targets and annotations."""
    found = [(f"{p['title']} [{t['refId']}]", t["expr"]) for p in dash["panels"] for t in p.get("targets", [])]
    found += [(f"annotation {a['name']}", a["expr"]) for a in dash["annotations"]["list"] if "expr" in a]
    return found


def grafana_vars(expr: str, run_seconds: float) -> str:
    """Replace the Grafana variables the dashboard uses by what they mean for this run."""
    for var, value in (("$__rate_interval", RATE_WINDOW), ("$__range", f"{math.ceil(run_seconds)}s"), ("$job", ".+")):
        expr = expr.replace(var, value)
    return expr


Series = tuple[dict[str, str], list[float], list[float]]


def series_range(base: str, expr: str, start: float, end: float) -> list[Series]:
    """(labels, times, values) of a range query at a 1 s step; NaN where Prometheus says NaN."""
    data = api(base, "/api/v1/query_range", query=expr, start=start, end=end, step="1s")
    return [(r["metric"], [float(t) for t, _ in r["values"]], [float(v) for _, v in r["values"]])
            for r in data["result"]]


def back_to_zero(ts: list[float], vs: list[float], after: float) -> float | None:
    """Seconds from `after` to the first sample at 0 (1 s resolution), None if it never got there."""
    return next((round(t - after, 1) for t, v in zip(ts, vs) if t > after and v == 0), None)


def check_query(base: str, expr: str, start: float, end: float) -> tuple[bool, str, str]:
    """(parses, promtool's answer at the end of the run, 'data' / 'zero' / 'none' over the run)."""
    run = subprocess.run(["promtool", "query", "instant", f"--time={end:.3f}", base, expr],
                         capture_output=True, text=True, timeout=60)
    if run.returncode != 0:
        return False, (run.stderr or run.stdout).strip(), "none"
    values = [v for _, _, vs in series_range(base, expr, start, end) for v in vs if not math.isnan(v)]
    seen = "none" if not values else ("data" if any(values) else "zero")
    return True, f"{len(run.stdout.splitlines())} series", seen


def window(base: str, t_from: float, t_to: float) -> dict[str, float]:
    """Hit ratio per tier between two instants, from counter increases (not averaged rates); {} if no lookups."""
    span = f"{max(1, round(t_to - t_from))}s"

    def by_tier(selector: str) -> dict[str, float]:
        """Increase of a lookups selector per tier over the window."""
        answer = api(base, "/api/v1/query", query=f"sum by (tier) (increase({selector}[{span}]))", time=t_to)
        return {r["metric"].get("tier", ""): float(r["value"][1]) for r in answer["result"]}

    hits, looks = by_tier('tiered_cache_lookups_total{result="hit"}'), by_tier("tiered_cache_lookups_total")
    return {tier: round(hits.get(tier, 0) / n, 3) for tier, n in sorted(looks.items()) if n > 0}


def figures(base: str, tl: dict[str, float]) -> dict[str, Any]:
    """The numbers the README quotes: hit ratios around the fault, breaker open time, owed kills, relay lag."""
    s, f0, f1, e = tl["start"], tl["fault_start"], tl["fault_end"], tl["end"]
    out: dict[str, Any] = {
        "hit_ratio_before": window(base, s + 5, f0),
        "hit_ratio_during": window(base, f0, f1),
        "hit_ratio_first_10s_after": window(base, f1, f1 + 10),
        "hit_ratio_last_15s": window(base, e - 15, e),
    }

    def levels(expr: str) -> tuple[list[float], list[float]]:
        """Times and values of a one-series level over the run."""
        found = series_range(base, expr, s, e)
        return (found[0][1], found[0][2]) if found else ([], [])

    ts, state = levels("max(tiered_cache_redis_breaker_state)")
    out["breaker_not_closed_s"] = sum(1 for v in state if v >= 1)
    out["breaker_open_s"] = sum(1 for v in state if v >= 2)
    out["breaker_closed_again_s_after_restart"] = back_to_zero(ts, state, f1)
    for name, expr in (("owed_kills", "sum(tiered_cache_redis_owed_kills)"),
                       ("relay_backlog", "max(tiered_cache_relay_backlog)"),
                       ("relay_backlog_age_s", "max(tiered_cache_relay_backlog_age_seconds)")):
        ts, vs = levels(expr)
        finite = [v for v in vs if not math.isnan(v)]
        out[f"{name}_peak"] = round(max(finite), 3) if finite else None
        out[f"{name}_back_to_0_s_after_restart"] = back_to_zero(ts, vs, f1)
    totals = {"restarts_detected": "sum by (detector) (tiered_cache_redis_restarts_total)",
              "redis_errors": "sum(tiered_cache_redis_errors_total)",
              "redis_skipped_reads": "sum(tiered_cache_redis_skipped_total)",
              "breaker_trips": "sum(tiered_cache_redis_breaker_trips_total)",
              "relay_errors": "sum(tiered_cache_relay_errors_total)",
              "near_flushes": "sum(tiered_cache_near_flushes_total)"}
    for name, expr in totals.items():
        res = api(base, "/api/v1/query", query=expr, time=e)["result"]
        out[name] = {r["metric"].get("detector", "all"): float(r["value"][1]) for r in res}
    return out


def draw(base: str, dash: dict[str, Any], tl: dict[str, float], png: Path) -> None:
    """Three stacked plots from range queries (the dashboard's own expressions), the fault window shaded."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    exprs = {p["title"]: [grafana_vars(t["expr"], 0) for t in p.get("targets", [])] for p in dash["panels"]}
    s, e = tl["start"], tl["end"]
    fig, (ax1, ax2, ax3) = plt.subplots(3, 1, figsize=(8, 7), sharex=True)
    for labels, ts, vs in series_range(base, exprs["Hit ratio per tier"][0], s, e):
        ax1.plot([t - s for t in ts], vs, label=labels.get("tier", "?"))
    ax1.set_ylabel("hit ratio")
    ax1.set_ylim(0, 1.05)
    ax1.set_title(f"tiered_cache under a Redis kill (rates over {RATE_WINDOW}, 1 s scrapes)")
    panes = ((ax2, "Breaker state", "breaker state (2 = open)", "Owed kills", "owed kills"),
             (ax3, "Relay backlog", "relay backlog (changes)", "Relay backlog age", "oldest change (s)"))
    for ax, left, left_label, right, right_label in panes:
        for _, ts, vs in series_range(base, exprs[left][0], s, e):
            ax.step([t - s for t in ts], vs, where="post", color="tab:red", label=left_label)
        ax.set_ylabel(left_label, color="tab:red")
        twin = ax.twinx()
        for _, ts, vs in series_range(base, exprs[right][0], s, e):
            twin.plot([t - s for t in ts], vs, color="tab:blue", label=right_label)
        twin.set_ylabel(right_label, color="tab:blue")
    ax2.set_yticks([0, 1, 2])
    ax3.set_xlabel("seconds since the workload started")
    for ax in (ax1, ax2, ax3):
        ax.axvspan(tl["fault_start"] - s, tl["fault_end"] - s, color="grey", alpha=0.2)
        ax.grid(alpha=0.3)
    ax1.text(tl["fault_start"] - s + 0.5, 0.05, "Redis killed ... restarted", fontsize=9)
    ax1.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=72)
    plt.close(fig)


def main() -> int:
    """Prometheus up, workload run, queries checked, figures printed, PNG drawn, Prometheus stopped."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=75.0, help="workload length (observe_fault_run.py --seconds)")
    ap.add_argument("--png", type=Path, default=HERE / "dashboard.png")
    args = ap.parse_args()
    need_tools()
    dash = json.loads(DASHBOARD.read_text())
    ok = subprocess.run(["promtool", "check", "config", str(CONFIG)]).returncode == 0
    tmp = Path(tempfile.mkdtemp(prefix="tc-prometheus-"))
    metrics_port, prom_port = free_port(), free_port()
    config = tmp / "prometheus.yml"
    config.write_text(CONFIG.read_text().replace("127.0.0.1:9464", f"127.0.0.1:{metrics_port}"))
    ok = subprocess.run(["promtool", "check", "config", str(config)]).returncode == 0 and ok
    base = f"http://127.0.0.1:{prom_port}"
    work: subprocess.Popen[bytes] | None = None
    prom = spawn(["prometheus", f"--config.file={config}", f"--storage.tsdb.path={tmp / 'data'}",
                  f"--web.listen-address=127.0.0.1:{prom_port}", "--log.level=warn"],
                 log=tmp / "prometheus.log", cwd=tmp, user=None)
    try:
        wait_ready(base, prom, tmp / "prometheus.log")
        print(f"prometheus {base}, workload metrics on 127.0.0.1:{metrics_port}; running the fault workload...")
        timeline_file = tmp / "timeline.json"
        work = spawn([sys.executable, str(HERE / "observe_fault_run.py"), "--port", str(metrics_port),
                      "--seconds", str(args.seconds), "--timeline", str(timeline_file)],
                     log=tmp / "workload.log", cwd=tmp, user=None)
        if work.wait(timeout=args.seconds + 180) != 0:
            print(tail(tmp / "workload.log", 60))
            return 1
        print((tmp / "workload.log").read_text())
        tl = json.loads(timeline_file.read_text())
        s, e = tl["start"], tl["end"]
        up = series_range(base, 'up{job="tiered_cache"}', s, e)
        scraped = sum(v for _, _, vs in up for v in vs)
        print(f"scrapes that worked during the run: {scraped:.0f} of {e - s:.0f} s")
        ok = ok and scraped > 0
        jobs = api(base, "/api/v1/label/job/values", **{"match[]": "tiered_cache_lookups_total"}, start=s, end=e)
        print(f"variable job: label_values(tiered_cache_lookups_total, job) = {jobs}")
        no_data = []
        for where, expr in dashboard_queries(dash):
            parses, answer, seen = check_query(base, grafana_vars(expr, e - s), s, e)
            ok = ok and parses
            print(f"{'ok  ' if parses else 'FAIL'} {seen:4} {answer:>10}  {where}")
            if seen != "data":
                no_data.append(f"{where} ({seen})")
        print("queries without data over the run:\n  " + "\n  ".join(no_data) if no_data else "every query had data")
        print("figures: " + json.dumps(figures(base, tl), indent=1))
        draw(base, dash, tl, args.png)
        print(f"wrote {args.png} ({args.png.stat().st_size // 1024} KB)")
    finally:
        for proc in (work, prom):
            if proc is not None and proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        shutil.rmtree(tmp, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
