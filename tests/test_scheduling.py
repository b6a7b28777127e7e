"""The backoff and the coalescing pass every background loop uses."""
from __future__ import annotations

from twisted.internet.defer import Deferred

from medd.scheduling import Backoff, CoalescingPass


def test_backoff_doubles_up_to_the_cap():
    """The delay starts at base, multiplies per failure and never exceeds max_delay."""
    b = Backoff(base=5, max_delay=60)
    assert [b.delay(n) for n in (0, 1, 2, 3, 4, 5)] == [5, 5, 10, 20, 40, 60]
    assert Backoff(base=1, max_delay=100, multiplier=3).delay(3) == 9


def test_kicks_during_a_pass_make_exactly_one_more_pass():
    """Three kicks while a pass runs cause one further pass, and each kick hears the pass that began after it."""
    gates: list[Deferred] = []
    passes = []

    async def work():
        passes.append(len(passes) + 1)
        gate = Deferred()
        gates.append(gate)
        await gate
        return passes[-1]

    loop = CoalescingPass(work, "test")
    first = loop.kick()
    later = [loop.kick(), loop.kick(), loop.kick()]
    assert passes == [1] and loop.running
    gates[0].callback(None)
    assert first.result == 1
    assert passes == [1, 2]
    gates[1].callback(None)
    assert [d.result for d in later] == [2, 2, 2]
    assert passes == [1, 2] and not loop.running


def test_a_failing_pass_fires_its_waiters_and_runs_again_on_the_next_kick():
    """An exception in a pass is logged, not raised into the kicker; the loop stays usable."""
    calls = []

    async def work():
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("database down")
        return "ok"

    loop = CoalescingPass(work, "test")
    assert loop.kick().result is None
    assert loop.kick().result == "ok"
    assert len(calls) == 2


def test_idle_waits_for_the_pass_under_way_without_starting_another():
    """idle() fires at once when no pass runs, else when the pass under way ends; it never starts a pass."""
    gates: list[Deferred] = []

    async def work():
        gate = Deferred()
        gates.append(gate)
        await gate

    loop = CoalescingPass(work, "test")
    assert loop.idle().called and not gates
    loop.kick()
    idle = loop.idle()
    assert not idle.called
    gates[0].callback(None)
    assert idle.called and len(gates) == 1 and not loop.running


def test_schedule_kicks_on_the_clock_and_a_kick_or_a_new_schedule_replaces_it():
    """schedule(delay) runs a pass when the clock reaches it; a later schedule() replaces the earlier
    one, a kick() drops it, and unschedule() leaves nothing pending."""
    from twisted.internet.task import Clock

    clock = Clock()
    passes: list[float] = []

    async def work():
        passes.append(clock.seconds())

    loop = CoalescingPass(work, "test", clock)
    loop.schedule(5)
    loop.schedule(3)
    clock.advance(3)
    assert passes == [3] and not clock.getDelayedCalls()
    loop.schedule(10)
    loop.kick()
    clock.advance(20)
    assert passes == [3, 3]
    loop.schedule(1)
    loop.unschedule()
    assert not clock.getDelayedCalls()
