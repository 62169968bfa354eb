"""AI results generated once per key, however many chat turns ask at once: get_or_generate.

Run it: `python examples/ai_worker.py` (throwaway PostgreSQL and Redis unless TIERED_CACHE_DSN and
TIERED_CACHE_REDIS_URL are set). 100 concurrent chat turns ask for the same member's summary: one LLM
call runs, everyone gets its result. Then the result expires; 100 more turns get the previous summary at
once while one of them regenerates it (stale-while-regenerating).
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

from tiered_cache import AsyncTieredCache, migrate

CT, SITE, MEMBER = "app3_clue", 101, "m-1001"
llm_calls = 0


async def summarize_member() -> tuple[dict[str, Any], int]:
    """Stands in for an LLM call: slow and costly, so it must run once per key."""
    global llm_calls
    llm_calls += 1
    await asyncio.sleep(1.0)
    return {"summary": f"visited 3 times this month (generation {llm_calls})"}, 91


async def chat_turn(cache: AsyncTieredCache) -> tuple[str, float]:
    start = time.perf_counter()
    row = await cache.get_or_generate(CT, SITE, MEMBER, summarize_member, triggered_by="chat",
                                      wait=10.0, lease_ttl=15.0)
    return row["result_json"]["summary"], time.perf_counter() - start


async def run(dsn: str, url: str) -> None:
    await asyncio.to_thread(migrate, dsn)
    async with await AsyncTieredCache.connect(dsn, url, relay=True) as cache:
        turns = await asyncio.gather(*(chat_turn(cache) for _ in range(100)))
        print(f"cold key: 100 turns, {llm_calls} LLM call(s), answers {sorted({t for t, _ in turns})}, "
              f"slowest {max(s for _, s in turns):.2f} s")
        # Let the result expire (an ETL-style update, as if its time had come), then ask again.
        import psycopg

        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
            await conn.execute("UPDATE biz.ai_cache SET expires_at = now() - interval '1 second' WHERE status = 'valid'")
        await asyncio.sleep(0.5)  # the relay drops the cached entry (the change came from outside the cache)
        turns = await asyncio.gather(*(chat_turn(cache) for _ in range(100)))
        fast = sum(1 for _, s in turns if s < 0.5)
        print(f"expired key: 100 turns, {llm_calls} LLM call(s) in all, {fast} answered at once with the previous "
              f"summary, stats {cache.stats()['generations']}")


def main() -> None:
    dsn, url = os.environ.get("TIERED_CACHE_DSN"), os.environ.get("TIERED_CACHE_REDIS_URL")
    if dsn and url:
        asyncio.run(run(dsn, url))
        return
    from tiered_cache.testing import embedded_servers

    with embedded_servers() as (dsn, url):
        asyncio.run(run(dsn, url))


if __name__ == "__main__":
    main()
