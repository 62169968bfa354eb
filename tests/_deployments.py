"""Fixtures for the local Redis Cluster and Sentinel deployments: started once per session, made whole before each test.

    redis_cluster / redis_sentinel          session: the deployment object (nodes, kill_primary, restart, ...)
    clean_cluster / clean_sentinel          per test: the same object, every node up and every primary flushed
    redis_cluster_url / redis_sentinel_url  per test: its redis+cluster:// or redis+sentinel:// URL, flushed

A test that uses any of them is marked `cluster` or `sentinel`, so `-m "not cluster and not sentinel"` skips them.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator

import pytest

from tiered_cache.testing.redis_cluster import RedisCluster
from tiered_cache.testing.redis_sentinel import RedisSentinel

_MARKS = {
    "cluster": {"redis_cluster", "clean_cluster", "redis_cluster_url"},
    "sentinel": {"redis_sentinel", "clean_sentinel", "redis_sentinel_url"},
}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark every test that asks for a deployment fixture, however indirectly."""
    for item in items:
        names = set(getattr(item, "fixturenames", ()))
        for mark, fixtures in _MARKS.items():
            if names & fixtures:
                item.add_marker(getattr(pytest.mark, mark))


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[RedisCluster]:
    """One local Redis Cluster (3 primaries, 3 replicas) for the session; SIGKILLed and removed at its end."""
    with RedisCluster() as cluster:
        yield cluster


@pytest.fixture(scope="session")
def redis_sentinel() -> Iterator[RedisSentinel]:
    """One local Sentinel deployment (1 primary, 1 replica, 3 sentinels) for the session."""
    with RedisSentinel() as deployment:
        yield deployment


def _made_whole(deployment: RedisCluster | RedisSentinel) -> None:
    """Restart what a test left down and flush every primary; rebuild (new ports) if it cannot be mended."""
    try:
        deployment.ensure_healthy()
    except RuntimeError as e:
        warnings.warn(f"{type(deployment).__name__} could not be mended, rebuilding it: {e}", stacklevel=2)
        deployment.stop()
        deployment.start()
    deployment.flushall()


@pytest.fixture
def clean_cluster(redis_cluster: RedisCluster) -> RedisCluster:
    """The session cluster with all 6 nodes up, each shard with a primary and a synced replica, all empty."""
    _made_whole(redis_cluster)
    return redis_cluster


@pytest.fixture
def clean_sentinel(redis_sentinel: RedisSentinel) -> RedisSentinel:
    """The session Sentinel deployment with every server up, the replica synced, the sentinels agreed, empty."""
    _made_whole(redis_sentinel)
    return redis_sentinel


@pytest.fixture
def redis_cluster_url(clean_cluster: RedisCluster) -> str:
    """redis+cluster:// URL of the cleaned session cluster."""
    return clean_cluster.url


@pytest.fixture
def redis_sentinel_url(clean_sentinel: RedisSentinel) -> str:
    """redis+sentinel:// URL of the cleaned session Sentinel deployment."""
    return clean_sentinel.url
