"""A runtime's admission without the network: priorities, fair shares, bounded waits, hung-up waiters."""

from __future__ import annotations

import asyncio

import pytest

from runtime_sdk.admission import KEY_CHARS, Admission, Refused, priority_of


async def started(admission: Admission, key: str, priority: int = 0, weight: int = 1) -> asyncio.Task[None]:
    task = asyncio.create_task(admission.enter(key, priority, weight))
    await settle()
    return task


async def settle() -> None:
    """Long enough for a waiter given a place to see it (a few turns of the loop)."""
    for _ in range(5):
        await asyncio.sleep(0)


async def test_a_sheddable_request_is_refused_at_once_when_full_and_a_critical_one_gets_the_next_place() -> None:
    admission = Admission(slots=1, queue=2)
    await admission.enter("a", 0)
    with pytest.raises(Refused) as shed:
        await admission.enter("b", priority_of("sheddable"))
    assert shed.value.status == 503 and not shed.value.retriable and "sheddable" in shed.value.reason
    standard = await started(admission, "c", 0)
    critical = await started(admission, "d", priority_of("critical"))
    admission.leave("a")
    await settle()
    assert critical.done() and not standard.done()  # the higher priority first, though it came later
    admission.leave("d")
    await asyncio.wait_for(standard, 1)
    admission.leave("c")
    assert (admission.in_flight, admission.n_waiting, dict(admission.places)) == (0, 0, {})


async def test_a_caller_over_its_share_gets_429_and_a_light_caller_goes_before_a_heavy_ones_waiter() -> None:
    admission = Admission(slots=1, queue=3)
    await admission.enter("heavy", 0)
    heavy = await started(admission, "heavy")
    light = await started(admission, "light")
    # two callers share 4 places: 2 each; heavy holds 2 (one in predict, one waiting)
    with pytest.raises(Refused) as over:
        await admission.enter("heavy", 0)
    assert over.value.status == 429 and "'heavy' holds 2 of the 4 places, its fair share is 2" in over.value.reason
    admission.leave("heavy")
    await settle()
    assert light.done() and not heavy.done()  # heavy was served lately, light not: light first, though later
    admission.leave("light")
    await asyncio.wait_for(heavy, 1)
    admission.leave("heavy")
    assert admission.places == {} and admission.served == {}


async def test_a_full_queue_makes_room_from_a_lower_priority_or_an_over_share_caller_else_refuses() -> None:
    admission = Admission(slots=1, queue=2)
    await admission.enter("a", 0)
    b, c = await started(admission, "b"), await started(admission, "c")
    with pytest.raises(Refused) as full:  # nobody of a lower priority waits, nobody is over its share
        await admission.enter("e", 0)
    assert full.value.status == 503 and full.value.retriable and "1 requests in predict (of 1)" in full.value.reason
    d = await started(admission, "d", 50)
    with pytest.raises(Refused) as gave_way:
        await b
    assert gave_way.value.status == 503 and "higher priority took the place" in gave_way.value.reason
    admission.leave("a")
    await asyncio.wait_for(d, 1)
    assert not c.done()
    admission.leave("d")
    await asyncio.wait_for(c, 1)
    admission.leave("c")
    assert (admission.in_flight, admission.n_waiting, admission.places) == (0, 0, {})


async def test_a_caller_over_its_share_gives_its_waiting_place_up_to_a_newcomer() -> None:
    admission = Admission(slots=1, queue=2)
    await admission.enter("heavy", 0)
    heavy = [await started(admission, "heavy") for _ in range(2)]  # alone: every place is its share
    assert all(not t.done() for t in heavy) and admission.places["heavy"] == 3
    newcomer = await started(admission, "new")  # two callers: a share of 1 each; heavy holds 3
    with pytest.raises(Refused) as over:
        await heavy[1]
    assert over.value.status == 429 and "'heavy' is over its fair share (3 places, its share is 1)" in over.value.reason
    admission.leave("heavy")
    await asyncio.wait_for(newcomer, 1)  # never served yet: before heavy's oldest
    admission.leave("new")
    await asyncio.wait_for(heavy[0], 1)
    admission.leave("heavy")
    assert admission.places == {}


async def test_a_wait_ends_after_max_wait_and_a_caller_that_hangs_up_leaves_nothing_behind() -> None:
    admission = Admission(slots=1, queue=4, max_wait=0.1)
    await admission.enter("a", 0)
    waiter = await started(admission, "b")
    gone = await started(admission, "c")
    gone.cancel()
    with pytest.raises(asyncio.CancelledError):
        await gone
    with pytest.raises(Refused) as waited:
        await waiter
    assert waited.value.status == 503 and waited.value.retriable and "waited 0.1 s" in waited.value.reason
    assert (admission.n_waiting, dict(admission.places)) == (0, {"a": 1})
    admission.leave("a")
    assert (admission.in_flight, admission.places) == (0, {})


async def test_with_no_queue_nothing_waits_and_ten_thousand_callers_keep_the_books_bounded() -> None:
    admission = Admission(slots=2, queue=0)
    await admission.enter("x" * 10_000, 0)  # a key is cut
    assert set(admission.places) == {"x" * KEY_CHARS}
    await admission.enter("y", 0)
    refused = []
    for n in range(10_000):
        try:
            await admission.enter(f"caller-{n}", n % 3 - 1)
        except Refused as err:
            refused.append(err.status)
    assert len(refused) == 10_000 and set(refused) == {503} and len(admission.places) == 2
    admission.leave("x" * 10_000)
    admission.leave("y")
    assert admission.places == {}


def test_a_priority_header_is_a_name_or_a_bounded_number_and_anything_else_is_standard() -> None:
    assert [priority_of(v) for v in ("critical", "sheddable", "standard", "-5", "99999", "nan", "", None)] == [
        100,
        -100,
        0,
        -5,
        1000,
        0,
        0,
        0,
    ]


async def test_two_thousand_random_arrivals_departures_and_hang_ups_keep_every_bound_and_the_books_exact() -> None:
    import random

    rng = random.Random(44)
    admission = Admission(slots=3, queue=4, max_wait=0.02)
    inside: list[str] = []
    pending: list[tuple[str, asyncio.Task[None]]] = []
    outcomes: dict[int, int] = {}
    for _ in range(2000):
        roll = rng.random()
        if roll < 0.5:
            key = rng.choice(["a", "b", "c", "d", "e"])
            weight = {"a": 3, "b": 2}.get(key, 1)  # a caller's weight comes with each of its requests
            pending.append((key, asyncio.create_task(admission.enter(key, rng.choice([-100, 0, 0, 100]), weight))))
        elif roll < 0.8 and inside:
            admission.leave(inside.pop(rng.randrange(len(inside))))
        elif roll < 0.9 and pending:
            pending[rng.randrange(len(pending))][1].cancel()
        await asyncio.sleep(rng.choice([0, 0, 0, 0.005]))
        for key, task in [p for p in pending if p[1].done()]:
            pending.remove((key, task))
            if task.cancelled():
                continue
            if task.exception() is None:
                inside.append(key)
            else:
                status = task.exception().status  # type: ignore[union-attr]
                outcomes[status] = outcomes.get(status, 0) + 1
        assert admission.in_flight <= 3 and admission.n_waiting <= 4
        assert sum(admission.places.values()) == admission.in_flight + admission.n_waiting
        assert len(admission.places) <= 7
        assert admission.weights.keys() == admission.places.keys()
        assert admission.total_weight == sum(admission.weights.values())
    assert outcomes.keys() == {429, 503} and len(inside) == admission.in_flight
    for task in [t for _, t in pending]:
        task.cancel()
    done = await asyncio.gather(*(t for _, t in pending), return_exceptions=True)
    inside += [k for (k, _), d in zip(pending, done, strict=True) if d is None]
    for key in inside:
        admission.leave(key)
    assert (admission.in_flight, admission.n_waiting, admission.places) == (0, 0, {})
    assert (admission.weights, admission.total_weight) == ({}, 0)


async def test_a_freed_place_goes_to_the_caller_holding_the_fewest_even_when_neither_has_one_in_predict() -> None:
    admission = Admission(slots=1, queue=4)
    await admission.enter("heavy", 0)
    heavy = [await started(admission, "heavy") for _ in range(2)]
    light = await started(admission, "light")
    admission.leave("heavy")  # now neither has a request in predict; heavy still holds two waiting places
    await settle()
    assert light.done() and not any(t.done() for t in heavy)
    admission.leave("light")
    await asyncio.wait_for(heavy[0], 1)
    admission.leave("heavy")
    await asyncio.wait_for(heavy[1], 1)
    admission.leave("heavy")
    assert admission.places == {}


async def test_a_weighted_caller_holds_places_by_its_weight_and_goes_first_for_its_weight() -> None:
    admission = Admission(slots=3, queue=9)  # twelve places
    for key, weight in (("gold", 2), ("plain", 1), ("other", 1)):
        await admission.enter(key, 0, weight)
    assert (admission.share("gold"), admission.share("plain"), admission.share("new", 4)) == (6, 3, 6)
    gold, plain = await started(admission, "gold", weight=2), await started(admission, "plain")
    admission.leave("other")  # a free place: gold has 1 in predict for weight 2, plain 1 for weight 1
    await settle()
    assert gold.done() and not plain.done()
    # without other, twelve places split 2:1; gold holds 2 and may hold 8
    waiting = [await started(admission, "gold", weight=2) for _ in range(6)]
    assert not any(t.done() for t in waiting) and admission.places["gold"] == 8
    with pytest.raises(Refused) as over:
        await admission.enter("gold", 0, 2)
    assert over.value.status == 429 and "holds 8 of the 12 places, its fair share is 8, weight 2" in over.value.reason
    for task in [plain, *waiting]:
        task.cancel()
    await asyncio.gather(plain, *waiting, return_exceptions=True)
    for key in ("gold", "gold", "plain"):
        admission.leave(key)
    assert (admission.places, admission.weights, admission.total_weight, admission.in_flight) == ({}, {}, 0, 0)
