"""A sync client on the same Redis as any client, sync or redis.asyncio: for the threads both APIs share."""

from __future__ import annotations

from typing import Any

from ._deployment import is_cluster, single_connection, sync_client
from .policy.keys import KeySpace

sync_connection = single_connection  # the name older callers import


def relay_tier(tier: Any) -> Any:
    """The sync Redis tier a relay thread kills through: the cache's own if it is sync, else one on a sync client."""
    from ._sync.redis_tier import RedisTier
    from ._sync.runwatch import ClusterRunWatch, RunWatch

    if isinstance(tier, RedisTier):
        return tier
    watch = ClusterRunWatch() if is_cluster(tier.client) else RunWatch()
    return RedisTier(sync_client(tier.client, max_connections=4, connect_func=watch), KeySpace(tier.keys.namespace))
