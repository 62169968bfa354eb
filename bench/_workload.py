"""Seeded, product-shaped data and operation streams: venues, the seed's apps, Zipf-popular targets."""

from __future__ import annotations

import bisect
import heapq
import itertools
import random
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any

import orjson

#: The old service's apps (CACHE_EXPIRY_DAYS) and how often the product reads each (chat and boards).
APP_WEIGHTS: dict[str, float] = {
    "app2_finance": 0.10,
    "app3_clue": 0.24,
    "app4_analysis": 0.18,
    "app5_tactics": 0.14,
    "app6_note_analysis": 0.10,
    "app7_customer_analysis": 0.14,
    "app8_clue_consolidated": 0.10,
}
#: The kind of target each app writes about, as the id prefix shows it.
TARGET_PREFIX = {
    "app2_finance": "area",
    "app3_clue": "member",
    "app4_analysis": "member",
    "app5_tactics": "member",
    "app6_note_analysis": "note",
    "app7_customer_analysis": "customer",
    "app8_clue_consolidated": "member",
}
#: Bench venues live far above real ones, so a bench run on a shared database touches only its own rows.
SITE_BASE = 9_000_000


@dataclass(frozen=True)
class Size:
    """How big a run is: data, op streams, and the time each contender gets."""

    sites: int
    targets: int  # per (site, app)
    stream_ops: int  # length of the chat and mixed op streams (board: a twentieth, in pages); contenders wrap around
    budget_s: float  # measured seconds per contender per workload
    warmup_s: float  # unmeasured seconds per contender before each workload (after the prewarm)
    slice_s: float  # one interleaving turn
    sweep_threads: tuple[int, ...]
    sweep_processes: int
    sweep_s: float  # measured seconds per contender per sweep point
    memory_ops: int  # ops run under tracemalloc per contender


SIZES: dict[str, Size] = {
    "tiny": Size(4, 40, 400, 0.1, 0.03, 0.02, (1, 4), 2, 0.2, 50),
    "quick": Size(30, 120, 2_000, 1.0, 0.2, 0.05, (1, 4, 16), 2, 0.5, 500),
    "full": Size(80, 250, 12_000, 8.0, 1.0, 0.1, (1, 4, 16), 2, 4.0, 3_000),
}


@dataclass(frozen=True)
class WorkloadSpec:
    """Everything that decides the data and the op streams; the same spec always gives the same bytes."""

    size: str = "quick"
    seed: int = 20240601
    zipf_s: float = 1.1  # popularity of targets within a venue's app
    site_zipf_s: float = 0.6  # venues differ in traffic, less steeply
    coverage: float = 0.9  # share of keys that have a result at all (the rest read as None)
    history_share: float = 0.35  # share of keys with older rows behind the newest
    generating_share: float = 0.03  # keys with a newer 'generating' placeholder above their result
    board_min: int = 20
    board_max: int = 50
    write_rate: float = 0.05  # mixed profile: share of ops that are writes
    history_limit: int = 2

    @property
    def dims(self) -> Size:
        return SIZES[self.size]

    def describe(self) -> dict[str, Any]:
        """The workload as stated at the top of every output."""
        d = self.dims
        return {
            **asdict(self),
            "sites": d.sites,
            "apps": list(APP_WEIGHTS),
            "targets_per_site_app": d.targets,
            "keys": d.sites * d.targets * len(APP_WEIGHTS),
            "stream_ops": d.stream_ops,
            "budget_s": d.budget_s,
            "warmup_s": d.warmup_s,
            "slice_s": d.slice_s,
        }


# -- documents --------------------------------------------------------------------------------------

_SUBJECTS = ["会员", "顾客", "该客户", "这位会员", "本场馆", "近期到店客户", "老客户", "新会员"]
_VERBS = ["最近到店", "持续关注", "明显偏好", "多次咨询", "近期减少", "集中在周末", "愿意尝试", "反馈满意"]
_OBJECTS = [
    "私教课程", "团体操课", "游泳训练", "储值卡套餐", "晚间时段", "亲子活动", "体测服务", "会员续费",
    "新品饮料", "场地预约", "器械区", "瑜伽课程", "积分兑换", "节假日优惠", "停车服务", "储物柜",
]
_TAILS = [
    "建议安排专属顾问跟进。", "可推送限时优惠提升到店频次。", "需关注流失风险。", "适合邀请参加会员日活动。",
    "可在下次到店时进行满意度回访。", "建议调整课程推荐顺序。", "消费潜力较高。", "近三十天活跃度稳定。",
]
_TAGS = ["高价值", "潜在流失", "价格敏感", "周末活跃", "课程爱好者", "新客", "沉睡唤醒", "家庭客群", "夜间客群"]
_TITLES = ["消费习惯", "到店规律", "课程偏好", "风险提示", "跟进建议", "营销机会", "服务体验"]


def _sentence(rng: random.Random) -> str:
    return f"{rng.choice(_SUBJECTS)}{rng.choice(_VERBS)}{rng.choice(_OBJECTS)},{rng.choice(_TAILS)}"


def make_document(rng: random.Random, app: str) -> dict[str, Any]:
    """One AI result: 1-2 KB of JSON, mostly Chinese text, shaped like the apps' outputs."""
    doc: dict[str, Any] = {
        "app": app,
        "summary": "".join(_sentence(rng) for _ in range(rng.randint(2, 3))),
        "insights": [
            {"title": rng.choice(_TITLES), "detail": _sentence(rng), "confidence": round(rng.random(), 2)}
            for _ in range(rng.randint(2, 4))
        ],
        "suggestions": [_sentence(rng) for _ in range(rng.randint(1, 3))],
        "tags": rng.sample(_TAGS, rng.randint(2, 5)),
        "metrics": {
            "visits_30d": rng.randint(0, 30),
            "spend_30d": round(rng.uniform(0, 5000), 2),
            "churn_risk": round(rng.random(), 3),
        },
        "model": rng.choice(["qwen-max", "deepseek-v3", "glm-4"]),
        "prompt_version": "p14." + str(rng.randint(1, 9)),
    }
    # Keep every document within 1-2 KB encoded, like the product's results.
    while len(orjson.dumps(doc)) < 1000:
        doc["suggestions"].append(_sentence(rng))
    while len(orjson.dumps(doc)) > 2000 and len(doc["insights"]) > 1:
        doc["insights"].pop()
    return doc


def document_pool(seed: int, n: int = 256) -> list[dict[str, Any]]:
    """A fixed pool of documents; rows and writes pick from it (generation is not what is measured)."""
    rng = random.Random(seed ^ 0xD0C)
    apps = list(APP_WEIGHTS)
    return [make_document(rng, apps[i % len(apps)]) for i in range(n)]


# -- popularity -------------------------------------------------------------------------------------


class Zipf:
    """Ranks 0..n-1 drawn with P(k) proportional to 1/(k+1)^s, by bisecting the cumulative weights."""

    def __init__(self, n: int, s: float) -> None:
        self.n = n
        self.cdf = list(itertools.accumulate(1.0 / (k + 1) ** s for k in range(n)))

    def draw(self, rng: random.Random) -> int:
        return min(bisect.bisect_left(self.cdf, rng.random() * self.cdf[-1]), self.n - 1)


def target_id(app: str, site_index: int, rank_slot: int) -> str:
    return f"{TARGET_PREFIX[app]}-{site_index:04d}-{rank_slot:05d}"


@dataclass
class Keyspace:
    """Which (app, site, target) keys exist, and which target is how popular in each venue."""

    spec: WorkloadSpec
    sites: list[int] = field(init=False)
    apps: list[str] = field(init=False)
    # per site: a permutation of target slots, so each venue has its own popular members
    order: list[list[int]] = field(init=False)

    def __post_init__(self) -> None:
        d = self.spec.dims
        rng = random.Random(self.spec.seed ^ 0x5173)
        self.sites = [SITE_BASE + i for i in range(d.sites)]
        self.apps = list(APP_WEIGHTS)
        self.order = []
        for _ in self.sites:
            slots = list(range(d.targets))
            rng.shuffle(slots)
            self.order.append(slots)
        self.site_zipf = Zipf(d.sites, self.spec.site_zipf_s)
        self.target_zipf = Zipf(d.targets, self.spec.zipf_s)
        self.app_cum = list(itertools.accumulate(APP_WEIGHTS.values()))

    def app(self, rng: random.Random) -> str:
        return self.apps[min(bisect.bisect_left(self.app_cum, rng.random() * self.app_cum[-1]), len(self.apps) - 1)]

    def key(self, rng: random.Random) -> tuple[str, int, str]:
        si = self.site_zipf.draw(rng)
        app = self.app(rng)
        return app, self.sites[si], target_id(app, si, self.order[si][self.target_zipf.draw(rng)])

    def board(self, rng: random.Random, lo: int, hi: int) -> tuple[str, int, list[str]]:
        """A board page: one venue, one app, 20-50 distinct targets, the popular ones most often."""
        si = self.site_zipf.draw(rng)
        app = self.app(rng)
        want = min(rng.randint(lo, hi), self.spec.dims.targets)
        seen: dict[int, None] = {}
        while len(seen) < want:
            seen[self.order[si][self.target_zipf.draw(rng)]] = None
        return app, self.sites[si], [target_id(app, si, slot) for slot in seen]

    def all_keys(self) -> Iterator[tuple[str, int, int, str]]:
        """(app, site_id, site_index, target_id) for every key of the keyspace."""
        for si, site in enumerate(self.sites):
            for app in self.apps:
                for slot in range(self.spec.dims.targets):
                    yield app, site, si, target_id(app, si, slot)


# -- rows to load -----------------------------------------------------------------------------------

COPY_COLUMNS = ("cache_type", "site_id", "target_id", "result_json", "score", "triggered_by", "created_at",
                "expires_at", "status")


def rows_to_load(spec: WorkloadSpec, keyspace: Keyspace, now: datetime, expires_at: Any) -> Iterator[tuple[Any, ...]]:
    """The initial table: a servable newest row for most keys, older rows behind some, placeholders above a few.

    `expires_at(cache_type, created_at)` is the library's policy, so rows expire as the product's do.
    """
    rng = random.Random(spec.seed ^ 0x10AD)
    docs = [orjson.dumps(d).decode() for d in document_pool(spec.seed)]
    local_midnight_age = _seconds_since_local_midnight(now)
    for app, site, _si, target in keyspace.all_keys():
        if rng.random() >= spec.coverage:
            continue
        if app == "app2_finance":  # valid until local midnight: written today
            created = now - timedelta(seconds=rng.uniform(0, max(1.0, min(7200.0, local_midnight_age - 1))))
        else:
            created = now - timedelta(hours=rng.uniform(0.1, 72))
        if rng.random() < spec.history_share:
            for back in range(rng.randint(1, 3), 0, -1):
                old = created - timedelta(days=back, minutes=rng.uniform(0, 600))
                yield (app, site, target, rng.choice(docs), rng.randint(0, 100), "etl", old,
                       expires_at(app, old), rng.choice(("valid", "expired", None)))
        yield (app, site, target, rng.choice(docs), rng.randint(0, 100), rng.choice(("chat", "board", "etl")),
               created, expires_at(app, created), "valid")
        if rng.random() < spec.generating_share:
            yield (app, site, target, "{}", None, "worker", created + timedelta(seconds=1), None, "generating")


def _seconds_since_local_midnight(now: datetime) -> float:
    local = now.astimezone(timezone(timedelta(hours=8)))  # Asia/Shanghai has no DST
    return local.hour * 3600 + local.minute * 60 + local.second


# -- operation streams ------------------------------------------------------------------------------
# An op is a tuple: (kind, cache_type, site_id, target_or_targets, arg)
#   "L" get_latest, "H" get_history(arg=limit), "M" get_many(targets)
#   "W" write_cache(arg=doc index), "G" set_generating, "F" finalize_cache(arg=stream index of its "G"),
#   "I" invalidate
READS = frozenset("LHM")
Op = tuple[str, str, int, Any, Any]


def chat_stream(spec: WorkloadSpec, keyspace: Keyspace, seed_offset: int = 0) -> list[Op]:
    """Chat turns: the target's latest result, and (for the prompt) its short history."""
    rng = random.Random(spec.seed + 1 + seed_offset)
    ops: list[Op] = []
    while len(ops) < spec.dims.stream_ops:
        app, site, target = keyspace.key(rng)
        ops.append(("L", app, site, target, None))
        if rng.random() < 0.5:  # half the turns also feed the history into the prompt
            ops.append(("H", app, site, target, spec.history_limit))
    return ops


def board_stream(spec: WorkloadSpec, keyspace: Keyspace, seed_offset: int = 0) -> list[Op]:
    """Board pages: the latest result of each of 20-50 targets of one venue and app."""
    rng = random.Random(spec.seed + 2 + seed_offset)
    n = max(1, spec.dims.stream_ops // 20)
    return [("M", *keyspace.board(rng, spec.board_min, spec.board_max), None) for _ in range(n)]


def mixed_stream(spec: WorkloadSpec, keyspace: Keyspace, seed_offset: int = 0) -> list[Op]:
    """Chat and board reads while AI workers write, regenerate (set_generating, later finalize) and invalidate."""
    rng = random.Random(spec.seed + 3 + seed_offset)
    ops: list[Op] = []
    pending: list[tuple[int, int]] = []  # heap of (due op index, index of the "G" op)
    n_docs = 256
    while len(ops) < spec.dims.stream_ops:
        if pending and pending[0][0] <= len(ops):
            _, g = heapq.heappop(pending)
            _k, app, site, target, _ = ops[g]
            ops.append(("F", app, site, target, (g, rng.randrange(n_docs))))
            continue
        r = rng.random()
        if r < spec.write_rate:
            app, site, target = keyspace.key(rng)
            w = rng.random()
            if w < 0.5:
                ops.append(("W", app, site, target, rng.randrange(n_docs)))
            elif w < 0.85:  # a regeneration: placeholder now, result a few ops later
                heapq.heappush(pending, (len(ops) + rng.randint(3, 30), len(ops)))
                ops.append(("G", app, site, target, None))
            else:
                ops.append(("I", app, site, target, None))
        elif r < spec.write_rate + (1 - spec.write_rate) * 0.15:
            ops.append(("M", *keyspace.board(rng, spec.board_min, spec.board_max), None))
        else:
            app, site, target = keyspace.key(rng)
            ops.append(("L", app, site, target, None))
            if rng.random() < 0.3:
                ops.append(("H", app, site, target, spec.history_limit))
    # A "G" whose finalize fell past the end is finalized at the end, so no placeholder is left forever.
    for _, g in sorted(pending):
        _k, app, site, target, _ = ops[g]
        ops.append(("F", app, site, target, (g, rng.randrange(n_docs))))
    return ops


STREAMS = {"chat": chat_stream, "board": board_stream, "mixed": mixed_stream}
WORKLOAD_TEXT = {
    "chat": "chat turns: get_latest, and get_history(limit=2) on half of them",
    "board": "board pages: get_many of 20-50 targets of one venue and app",
    "mixed": "chat + board reads; AI workers write, regenerate (set_generating, then finalize) and invalidate",
}


def keys_of(op: Op) -> int:
    """How many cache keys an op reads or writes."""
    return len(op[3]) if op[0] == "M" else 1


def prewarm_keys(ops: Sequence[Op]) -> tuple[dict[tuple[str, int], list[str]], list[tuple[str, int, str, int]]]:
    """What a long-running service would hold for this stream: its latest entries by (app, venue), its histories."""
    groups: dict[tuple[str, int], dict[str, None]] = {}
    history: dict[tuple[str, int, str, int], None] = {}
    for kind, app, site, target, arg in ops:
        if kind == "L":
            groups.setdefault((app, site), {})[target] = None
        elif kind == "M":
            groups.setdefault((app, site), {}).update(dict.fromkeys(target))
        elif kind == "H":
            history[(app, site, target, arg)] = None
    return {k: list(v) for k, v in sorted(groups.items())}, sorted(history)


def touched(streams: Sequence[Sequence[Op]]) -> set[tuple[str, int, str]]:
    """Every key any read of these streams asks for (the floors are prefilled with exactly these)."""
    out: set[tuple[str, int, str]] = set()
    for ops in streams:
        for kind, app, site, target, _ in ops:
            if kind == "M":
                out.update((app, site, t) for t in target)
            elif kind in READS:
                out.add((app, site, target))
    return out
