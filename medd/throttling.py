"""Login throttling (the reading room's login form, SMTP AUTH): after a few
wrong passwords for a user, from a client address, or for a user from one
address, further attempts are refused for an exponentially growing time,
taken from the injected clock. The state is bounded: at most ``max_keys``
keys are tracked.
"""
from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass

from medd.scheduling import Backoff

# Longer names are no user's; their first characters are enough to count by.
MAX_NAME_KEY = 128


@dataclass(frozen=True)
class ThrottleRule:
    """After ``threshold`` failures in a row (none forgiven by ``window`` seconds without one), each further
    attempt waits ``backoff.delay(n)`` seconds after the last failure, ``n`` counting from 1."""

    threshold: int
    backoff: Backoff
    window: float = 3600.0

    def blocked_until(self, failures: int, last: float) -> float:
        if failures < self.threshold:
            return last
        return last + self.backoff.delay(failures - self.threshold + 1)


# A guesser at one user from one address: five tries, then 1, 2, 4 … seconds, at most 15 minutes.
PAIR = ThrottleRule(threshold=5, backoff=Backoff(base=1.0, max_delay=900.0))
# One address trying many users (password spraying); it shuts out only that address.
ADDRESS = ThrottleRule(threshold=20, backoff=Backoff(base=1.0, max_delay=900.0))
# One user tried from many addresses. Anyone can push this one, so its cap is short: it is also how an
# attacker could keep the real user out, a minute at a time.
USER = ThrottleRule(threshold=20, backoff=Backoff(base=1.0, max_delay=60.0))


class _Record:
    __slots__ = ("failures", "last")

    def __init__(self, failures: int = 0, last: float = 0.0):
        self.failures = failures
        self.last = last


class LoginThrottle:
    """Counts login failures per user, per client address and per (user, address).

    An attempt is counted as a failure when it starts (:meth:`attempt`), so
    that many concurrent guesses cannot all pass before the first is known to
    be wrong; :meth:`succeeded` takes it back and clears the user's counters.
    An attempt refused while throttled is not counted: it checks no password.
    """

    def __init__(self, clock, *, max_keys: int = 10_000, pair: ThrottleRule = PAIR,
                 address: ThrottleRule = ADDRESS, user: ThrottleRule = USER):
        self.clock = clock
        self.max_keys = max_keys
        self.rules = {"pair": pair, "address": address, "user": user}
        self._records: OrderedDict[tuple, _Record] = OrderedDict()

    @staticmethod
    def _keys(user: str, address: str) -> dict[str, tuple]:
        name = user[:MAX_NAME_KEY]
        return {"pair": ("pair", name, address), "address": ("address", address), "user": ("user", name)}

    def _live(self, key: tuple, rule: ThrottleRule, now: float) -> _Record | None:
        record = self._records.get(key)
        if record is not None and now - record.last > rule.window:
            del self._records[key]
            return None
        return record

    def retry_after(self, user: str, address: str) -> int:
        """Whole seconds until ``user`` may try to log in from ``address`` again; 0 if they may now."""
        now = self.clock.seconds()
        until = now
        for kind, key in self._keys(user, address).items():
            record = self._live(key, self.rules[kind], now)
            if record is not None:
                until = max(until, self.rules[kind].blocked_until(record.failures, record.last))
        return max(math.ceil(until - now), 1) if until > now else 0

    def attempt(self, user: str, address: str) -> int:
        """Start an attempt: 0 if it may go on (it counts as a failure until :meth:`succeeded`), or the
        seconds to wait (the attempt is refused and not counted)."""
        wait = self.retry_after(user, address)
        if wait:
            return wait
        now = self.clock.seconds()
        for key in self._keys(user, address).values():
            record = self._records.pop(key, None) or _Record()
            record.failures += 1
            record.last = now
            self._records[key] = record  # the most recently failed key is the last evicted
        while len(self._records) > self.max_keys:
            self._records.popitem(last=False)
        return 0

    def succeeded(self, user: str, address: str) -> None:
        """The attempt had the right password: the user's counters start again; the address's forgets it."""
        keys = self._keys(user, address)
        self._records.pop(keys["pair"], None)
        self._records.pop(keys["user"], None)
        record = self._records.get(keys["address"])
        if record is not None:
            record.failures -= 1
            if record.failures <= 0:
                del self._records[keys["address"]]

    def __len__(self) -> int:
        return len(self._records)
