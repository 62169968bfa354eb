"""The main job for a first look: a short scene from the product, played through TieredCache."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from .facade import TieredCache


def _show(row: Any) -> str:
    """A row in one line: id, status, result."""
    if row is None:
        return "None (nothing servable)"
    return f"id={row['id']} status={row['status']} result={json.dumps(row['result_json'], ensure_ascii=False)}"


def play(cache: TieredCache, say: Callable[[str], None] = print) -> None:
    """AI worker writes, a board page reads, a result is regenerated, one is invalidated."""
    venues = {101: ["m-1001", "m-1002", "m-1003"], 202: ["m-1001", "m-2001"]}
    say("1. An AI worker writes app3_clue results for members of two venues (101 and 202).")
    for site_id, members in venues.items():
        for n, member in enumerate(members):
            cache.write_cache(
                "app3_clue", site_id, member,
                {"summary": f"会员 {member} 最近到店 {n + 2} 次", "tags": ["高价值", "周末"], "venue": site_id},
                triggered_by="demo-worker", score=70 + n,
            )
            say(f"   wrote site={site_id} target={member}")

    say("2. A board page of venue 101 reads its members in one call (the first view fills Redis).")
    page = ["m-1001", "m-1002", "m-1003", "m-9999"]
    for target, row in cache.get_many("app3_clue", 101, page).items():
        say(f"   {target}: {_show(row)}")
    before = cache.redis.stats.hits
    cache.get_many("app3_clue", 101, page)
    say(f"   second view: {cache.redis.stats.hits - before} of {len(page)} cells served by Redis (the empty cell too)")

    say("3. Venue 202 reads the same member id and sees only its own row (tenant isolation).")
    say(f"   202/m-1001: {_show(cache.get_latest('app3_clue', 202, 'm-1001'))}")

    say("4. The result for 101/m-1001 is regenerated: set_generating, then finalize_cache.")
    placeholder = cache.set_generating("app3_clue", 101, "m-1001", triggered_by="demo-regenerate")
    say(f"   placeholder id={placeholder}; readers still get: {_show(cache.get_latest('app3_clue', 101, 'm-1001'))}")
    done = cache.finalize_cache(placeholder, {"summary": "会员 m-1001 已流失风险降低", "tags": ["回流"]}, score=91)
    say(f"   finalized={done}; readers now get: {_show(cache.get_latest('app3_clue', 101, 'm-1001'))}")
    say(f"   finalizing it again changes nothing: finalized={cache.finalize_cache(placeholder, {'late': True})}")
    history = cache.get_history("app3_clue", 101, "m-1001", limit=2)
    say(f"   history for prompts: ids {[r['id'] for r in history]}")

    say("5. An operator invalidates 101/m-1002.")
    say(f"   rows invalidated: {cache.invalidate('app3_clue', 101, 'm-1002')}")
    say(f"   101/m-1002 now: {_show(cache.get_latest('app3_clue', 101, 'm-1002'))}")

    s = cache.redis.stats
    say(f"Redis tier: hits={s.hits} misses={s.misses} fills={s.fills} writes_through={s.writes_through} kills={s.kills}")
