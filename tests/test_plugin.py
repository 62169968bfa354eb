"""The pytest plugin as a user meets it: loaded by its entry point in a fresh pytest, fixtures on request only."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import pytest

pytest_plugins = ["pytester"]

#: The README's testing example, verbatim: proven here by running it as a user's test file.
README_EXAMPLE = '''\
"""Tests of an application's use of tiered_cache, on the plugin's fixtures."""

import pytest


def test_a_write_is_served_from_redis(tiered_cache):
    """A write goes through to Redis at once: the next read is a Redis hit, not a PostgreSQL query."""
    row_id = tiered_cache.write_cache("app3_clue", 101, "member-7", {"summary": "plays on Fridays"})
    row = tiered_cache.get_latest("app3_clue", 101, "member-7")
    assert row["id"] == row_id and row["result_json"] == {"summary": "plays on Fridays"}
    assert tiered_cache.stats()["redis"]["hits"] == 1


@pytest.mark.tiered_cache(near_max_entries=1000, near_max_age=60)
def test_a_repeated_read_is_answered_in_process(tiered_cache):
    """With the near tier on, the second read of a key does not leave the process."""
    tiered_cache.store.write_cache("app3_clue", 101, "member-8", {"summary": "new"})  # PostgreSQL only
    first = tiered_cache.get_latest("app3_clue", 101, "member-8")  # read through, kept in both tiers
    assert tiered_cache.get_latest("app3_clue", 101, "member-8") == first
    assert tiered_cache.stats()["near"]["hits"] == 1


def test_an_invalidated_key_reads_as_none(tiered_cache_fake):
    """The same API with fakeredis in place of Redis (PostgreSQL stays real): no Redis server needed."""
    tiered_cache_fake.write_cache("app3_clue", 101, "member-9", {"summary": "stale"})
    assert tiered_cache_fake.invalidate("app3_clue", 101, "member-9") == 1
    assert tiered_cache_fake.get_latest("app3_clue", 101, "member-9") is None
'''

#: A test that asks for nothing, then one that asks for Redis: the first must see no server, the second one.
NOTHING_STARTS = '''\
import os

from tiered_cache.testing import _server


def children():
    """PIDs of this process's child processes (a throwaway server is one)."""
    task_dir = f"/proc/{os.getpid()}/task"
    pids = []
    for task in os.listdir(task_dir):
        with open(f"{task_dir}/{task}/children") as f:
            pids += f.read().split()
    return pids


def test_1_asks_for_nothing(request):
    assert request.config.pluginmanager.get_plugin("tiered_cache") is not None, "the entry point loaded it"
    assert not _server._LIVE and children() == []


def test_2_asks_for_redis(tiered_cache_redis):
    assert len(_server._LIVE) == 1 and len(children()) == 1  # the check above can see a server
'''

#: Per-test emptiness and the marker's options, on both cache fixtures.
ISOLATION = '''\
import pytest

KEY = ("app3_clue", 101, "k")


@pytest.fixture(params=["tiered_cache", "tiered_cache_fake"])
def cache(request):
    return request.getfixturevalue(request.param)


def test_1_writes(cache):
    assert cache.write_cache(*KEY, {"v": 1}) == 1  # ids restart at 1 in every test
    assert cache.get_latest(*KEY)["id"] == 1


def test_2_starts_from_nothing(cache):
    assert cache.redis.client.dbsize() == 0
    assert cache.store.get_latest(*KEY) is None and cache.get_latest(*KEY) is None


@pytest.mark.tiered_cache(negative_ttl=2, namespace="mine", pool_timeout=7.0)
class TestMarkerOptions:
    def test_reach_the_cache_and_its_store(self, cache):
        assert cache.get_latest(*KEY) is None
        entry = cache.keyset(*KEY).entry
        assert entry.startswith("mine:") and 0 < cache.redis.client.pttl(entry) <= 2000
        assert cache.store.pool_timeout == 7.0

    @pytest.mark.tiered_cache(near_max_entries=10)
    def test_closest_marker_wins(self, cache):
        assert cache.near is None or cache.listener.subscribed.is_set()  # fake: the fixture errors first
        assert cache.keys.namespace == "tc"


@pytest.mark.tiered_cache("positional")
def test_positional_options_are_refused(tiered_cache_fake):
    pass
'''


def run(pytester: pytest.Pytester, **files: str) -> pytest.RunResult:
    """A fresh pytest in a subprocess: the plugin comes only from the installed entry point, servers are its own."""
    pytester.makepyfile(**files)
    return pytester.runpytest_subprocess("-rA", "-p", "no:cacheprovider", timeout=600)


def test_the_readme_example_passes_on_the_plugins_fixtures(pytester: pytest.Pytester,
                                                          figure: Callable[[str], None]) -> None:
    """The README's example test file passes as written: real servers, the near-tier marker, and fakeredis."""
    result = run(pytester, test_readme_example=README_EXAMPLE)
    result.assert_outcomes(passed=3)
    figure(f"plugin: the README example in a fresh pytest, both servers started: {result.duration:.1f} s")


def test_a_test_asking_for_nothing_starts_no_server(pytester: pytest.Pytester, figure: Callable[[str], None]) -> None:
    """With the plugin loaded, a test that requests none of its fixtures runs with no server and no child process."""
    result = run(pytester, test_nothing=NOTHING_STARTS)
    result.assert_outcomes(passed=2)
    figure(f"plugin: a fresh pytest with one test asking for nothing and one for Redis: {result.duration:.1f} s")


def test_each_test_starts_empty_and_the_marker_sets_options(pytester: pytest.Pytester) -> None:
    """Tables and Redis are empty in every test on both fixtures; marker options reach TieredCache and its store."""
    result = run(pytester, test_isolation=ISOLATION)
    lines = re.finditer(r"^(PASSED|FAILED|ERROR) test_isolation\.py::(\S+)", result.stdout.str(), re.M)
    outcomes = {m.group(2): m.group(1) for m in lines}
    assert outcomes == {
        "test_1_writes[tiered_cache]": "PASSED",
        "test_1_writes[tiered_cache_fake]": "PASSED",
        "test_2_starts_from_nothing[tiered_cache]": "PASSED",
        "test_2_starts_from_nothing[tiered_cache_fake]": "PASSED",
        "TestMarkerOptions::test_reach_the_cache_and_its_store[tiered_cache]": "PASSED",
        "TestMarkerOptions::test_reach_the_cache_and_its_store[tiered_cache_fake]": "PASSED",
        "TestMarkerOptions::test_closest_marker_wins[tiered_cache]": "PASSED",
        "TestMarkerOptions::test_closest_marker_wins[tiered_cache_fake]": "PASSED",
        "test_positional_options_are_refused": "ERROR",
    }, result.stdout.str()
    result.stdout.fnmatch_lines(["*takes keyword options only*"])


#: A conftest that hides lupa, as if fakeredis were installed without its lua extra, and counts PostgreSQL starts.
NO_LUPA_CONFTEST = '''\
import sys

sys.modules["lupa"] = None

from tiered_cache.testing import postgres

started = []
_start = postgres.PostgresServer.start


def start(self):
    started.append(self)
    return _start(self)


postgres.PostgresServer.start = start


def pytest_terminal_summary(terminalreporter):
    terminalreporter.write_line(f"postgres servers started: {len(started)}")
'''


def test_tiered_cache_fake_without_lupa_says_what_to_install(pytester: pytest.Pytester) -> None:
    """Without lupa, tiered_cache_fake errors at setup naming the extra, before any PostgreSQL is started."""
    pytester.makeconftest(NO_LUPA_CONFTEST)
    result = run(pytester, test_no_lua="def test_fake(tiered_cache_fake):\n    pass\n")
    result.assert_outcomes(errors=1)
    result.stdout.re_match_lines([r".*ConfigurationError: .*lupa is missing; pip install 'tiered_cache\[testing\]'.*"])
    result.stdout.fnmatch_lines(["postgres servers started: 0"])


def test_the_readme_shows_this_example(request: pytest.FixtureRequest) -> None:
    """Once the README has its testing example, it is exactly README_EXAMPLE (so the proven text is the shown one)."""
    readme = (Path(request.config.rootpath) / "README.md").read_text()
    assert README_EXAMPLE in readme
