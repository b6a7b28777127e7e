"""The reading room's login throttle (medd.throttling) on a Twisted Clock: exponential waits per
(user, address), per address and per user, what a success resets, and the bound on its memory."""
from __future__ import annotations

from twisted.internet.task import Clock

from medd.throttling import LoginThrottle


def _fail_until_throttled(throttle: LoginThrottle, user: str, address: str) -> int:
    """Wrong passwords until one is refused; the number that were let through."""
    tried = 0
    while not throttle.attempt(user, address):
        tried += 1
    return tried


def test_waits_double_after_five_failures_up_to_the_cap():
    """One user from one address: five attempts go through, then each wait after a failure doubles
    (1, 2, 4 … s), never beyond 15 minutes; an attempt refused while waiting does not lengthen the wait."""
    clock = Clock()
    throttle = LoginThrottle(clock)
    assert _fail_until_throttled(throttle, "alice", "10.0.0.1") == 5
    waits = []
    for _ in range(14):
        wait = throttle.attempt("alice", "10.0.0.1")
        assert wait and throttle.attempt("alice", "10.0.0.1") == wait
        waits.append(wait)
        clock.advance(wait)
        assert throttle.attempt("alice", "10.0.0.1") == 0  # one more wrong guess, let through and counted
    assert waits[:6] == [1, 2, 4, 8, 16, 32]
    assert max(waits) == 900 and waits[-1] == 900


def test_a_success_resets_the_user_and_another_address_is_not_held_by_the_pair():
    """The right password clears the user's counters (five more tries before a wait); the (user, address)
    wait does not hold the same user at another address."""
    clock = Clock()
    throttle = LoginThrottle(clock)
    _fail_until_throttled(throttle, "alice", "10.0.0.1")
    assert throttle.retry_after("alice", "10.0.0.1") > 0
    assert throttle.attempt("alice", "10.0.0.2") == 0
    throttle.succeeded("alice", "10.0.0.2")
    clock.advance(throttle.retry_after("alice", "10.0.0.1"))
    assert throttle.attempt("alice", "10.0.0.1") == 0
    throttle.succeeded("alice", "10.0.0.1")
    assert _fail_until_throttled(throttle, "alice", "10.0.0.1") == 5


def test_one_address_spraying_many_users_is_throttled():
    """Twenty wrong passwords from one address, each for a different user, and that address waits for any user;
    other addresses do not."""
    throttle = LoginThrottle(Clock())
    for i in range(20):
        assert throttle.attempt(f"user{i}", "10.0.0.9") == 0
    assert throttle.attempt("someone-else", "10.0.0.9") > 0
    assert throttle.attempt("someone-else", "10.0.0.10") == 0


def test_one_user_from_many_addresses_waits_at_most_a_minute():
    """Twenty wrong passwords for one user from twenty addresses throttle that user from everywhere (the lockout
    an attacker can cause), but never for more than 60 s after the last failure; a success clears it."""
    clock = Clock()
    throttle = LoginThrottle(clock)
    for i in range(20):
        assert throttle.attempt("alice", f"10.1.0.{i}") == 0
    waits = []
    for i in range(20, 40):
        wait = throttle.attempt("alice", f"10.1.0.{i}")
        assert wait
        waits.append(wait)
        clock.advance(wait)
        assert throttle.attempt("alice", f"10.1.0.{i}") == 0
    assert max(waits) == 60
    clock.advance(60)
    assert throttle.attempt("alice", "10.2.0.1") == 0
    throttle.succeeded("alice", "10.2.0.1")
    assert throttle.retry_after("alice", "10.3.0.1") == 0


def test_failures_are_forgotten_after_an_hour_without_one():
    """A key with no failure for an hour starts again from zero."""
    clock = Clock()
    throttle = LoginThrottle(clock)
    _fail_until_throttled(throttle, "alice", "10.0.0.1")
    clock.advance(3601)
    assert _fail_until_throttled(throttle, "alice", "10.0.0.1") == 5


def test_memory_is_bounded_by_max_keys():
    """However many users and addresses are tried, at most max_keys keys are kept; the oldest go first and the
    most recently failing stay throttled."""
    throttle = LoginThrottle(Clock(), max_keys=100)
    for i in range(10_000):
        throttle.attempt(f"user{i}", f"10.{i // 256 % 256}.{i % 256}.1")
        assert len(throttle) <= 100
    _fail_until_throttled(throttle, "alice", "10.9.9.9")
    assert throttle.retry_after("alice", "10.9.9.9") > 0


def test_a_very_long_user_name_is_kept_short():
    """Names are counted by their first 128 characters, so a megabyte-long name costs no megabyte."""
    throttle = LoginThrottle(Clock())
    throttle.attempt("x" * 1_000_000, "10.0.0.1")
    assert throttle._records  # the attempt was counted
    assert all(len(part) <= 128 for key in throttle._records for part in key)
