"""Discovery's hold on a sudden drop to nothing, pure (the real agent restart is in test_consul_outage.py and the
soak): after a Consul agent restart runtimes register again one by one, and each model version keeps its last
passing instances until it has a passing one of its own."""

from __future__ import annotations

import asyncio
from typing import Any

from contract.service import RuntimeService
from controlplane.consul.discovery import Discovery
from tests.helpers.translation import instance


def seen(discovery: Discovery, *instances: RuntimeService) -> list[str]:
    """What the agent says now -> what discovery publishes (ids, with a mark for each passing one)."""
    discovery.by_service = {}
    for i in instances:
        discovery.by_service.setdefault(i.model, {})[i.service_id] = i
    discovery._publish()
    return [f"{i.service_id}{'+' if i.passing else ''}" for i in discovery.instances()]


async def test_each_version_is_held_until_it_passes_again_not_until_the_first_runtime_is_back() -> None:
    changes: list[int] = []
    discovery = Discovery(client=Any, on_change=lambda: changes.append(1), empty_grace=30)  # type: ignore[arg-type]
    tokenize, count, count_v2 = instance("tokenize", "v1", 1), instance("count", "v1", 2), instance("count", "v2", 3)
    assert seen(discovery, tokenize, count, count_v2) == ["count-v1-2+", "count-v2-3+", "tokenize-v1-1+"]

    # The agent restarted: nothing registered. All held.
    assert seen(discovery) == ["count-v1-2+", "count-v2-3+", "tokenize-v1-1+"]
    assert discovery.holding_since is not None and discovery.held_drops == 1
    # tokenize is back and passing, count v1 registered but not passing yet, count v2 not back: both counts held.
    back = [tokenize, instance("count", "v1", 2, passing=False)]
    assert seen(discovery, *back) == ["count-v1-2+", "count-v2-3+", "tokenize-v1-1+"]
    assert discovery.holding_since is not None
    # A new replica of count v1 passes: v1 is covered; its old id (not passing any more) is what the agent says.
    assert seen(discovery, *back, instance("count", "v1", 4)) == [
        "count-v1-2",
        "count-v1-4+",
        "count-v2-3+",
        "tokenize-v1-1+",
    ]
    # count v2 passes again: the hold ends, and what is published is what the agent says.
    assert seen(discovery, *back, instance("count", "v1", 4), count_v2) == [
        "count-v1-2",
        "count-v1-4+",
        "count-v2-3+",
        "tokenize-v1-1+",
    ]
    assert discovery.holding_since is None and discovery.health().holding_since is None
    # A version that really went away (undeployed) while others stay is let through at once: no hold.
    assert seen(discovery, tokenize) == ["tokenize-v1-1+"]
    assert discovery.holding_since is None and discovery.held_drops == 1


async def test_a_version_that_never_comes_back_is_let_go_after_the_grace() -> None:
    discovery = Discovery(client=Any, on_change=lambda: None, empty_grace=0.2)  # type: ignore[arg-type]
    tokenize, count = instance("tokenize", "v1", 1), instance("count", "v1", 2)
    seen(discovery, tokenize, count)
    seen(discovery)
    assert seen(discovery, tokenize) == ["count-v1-2+", "tokenize-v1-1+"]  # count still held
    deadline = asyncio.get_running_loop().time() + 10
    while discovery.holding_since is not None:  # the grace's timer lets the drop through
        assert asyncio.get_running_loop().time() < deadline, "the hold never lapsed"
        await asyncio.sleep(0.05)
    assert [i.service_id for i in discovery.instances()] == ["tokenize-v1-1"]
    assert discovery.holding_since is None


def test_a_store_read_empty_after_pipelines_is_held_for_the_grace_and_anything_in_it_ends_the_hold() -> None:
    from controlplane.pipeline.store import EmptyHold, StoreView

    hold, empty, one = EmptyHold(8), StoreView(5, {}, {}), StoreView(6, {}, {}, {"p": "broken"})
    assert not hold.held(empty, had_pipelines=False, now=0)  # a fresh store: nothing to hold
    assert hold.held(empty, had_pipelines=True, now=10) and hold.held(empty, True, now=17.9)
    assert not hold.held(empty, True, now=18)  # the grace is over: believed
    assert not hold.held(empty, True, now=30)  # and stays believed while it lasts
    assert not hold.held(one, True, now=31) and hold.since is None  # anything under the prefix ends it
    assert hold.held(empty, True, now=40)  # the next wipe is held again, from its own start
    assert not EmptyHold(0).held(empty, True, now=0)  # --empty-grace 0: believed at once
