"""Deadlines and retries: when dispatched work counts as lost, and when to try again.

One :class:`RetryPolicy` answers every retry question of a run with :class:`Retry` (when, and
as which attempt) or :class:`GiveUp`. Pure: no clock of its own, times are passed in.
"""

from __future__ import annotations

import dataclasses
import math

#: Seconds added to the per-test timeout before an overdue test counts as lost.
LOST_GRACE = 10.0
#: A started chunk whose heartbeats (every 2 s) stop for this long is lost.
SILENCE_LIMIT = 10.0
#: A started chunk is lost once its queue has had no consumer at all for this long.
CONSUMER_GONE_GRACE = 2.0
#: First re-dispatch delay; doubles with each further attempt.
BACKOFF_BASE = 1.0
BACKOFF_MAX = 30.0
#: A chunk the broker refused to take is sent again this often (within the send deadline).
RESEND_INTERVAL = 1.0


def backoff(attempt: int, base: float = BACKOFF_BASE, cap: float = BACKOFF_MAX) -> float:
    """Delay before sending attempt ``attempt`` (2 -> base, 3 -> 2*base, ...)."""
    if attempt <= 1:
        return 0.0
    exponent = min(attempt - 2, 64)  # 2**64 seconds is past any cap; no float overflow
    return float(min(cap, base * math.pow(2, exponent)))


def grace_for(timeout: float) -> float:
    """Slack added to the per-test timeout before an overdue test means loss: 2 to 10 s."""
    return min(LOST_GRACE, max(2.0, timeout))


@dataclasses.dataclass(frozen=True)
class Retry:
    """Try again at ``at`` (monotonic) as attempt ``attempt``."""

    at: float
    attempt: int


@dataclasses.dataclass(frozen=True)
class GiveUp:
    why: str


@dataclasses.dataclass(frozen=True)
class RetryPolicy:
    """Every retry decision of a run.

    * :meth:`after_loss`: attempt ``n`` of some tests was lost (worker gone, nobody took the
      chunk): attempt ``n + 1`` after ``backoff(n + 1)``, while ``n <= retries``.
    * :meth:`after_send_failure`: the broker refused a publish (it may be restarting): the same
      attempt again every ``resend_interval`` seconds until ``send_limit`` seconds of failures.
    """

    retries: int
    base: float = BACKOFF_BASE
    cap: float = BACKOFF_MAX
    resend_interval: float = RESEND_INTERVAL
    send_limit: float = math.inf

    def after_loss(self, attempt: int, now: float, why: str) -> Retry | GiveUp:
        if attempt > self.retries:
            return GiveUp(why)
        return Retry(now + backoff(attempt + 1, self.base, self.cap), attempt + 1)

    def after_send_failure(
        self, attempt: int, failing_since: float, now: float, why: str
    ) -> Retry | GiveUp:
        if now - failing_since >= self.send_limit:
            return GiveUp(why)
        return Retry(now + self.resend_interval, attempt)


#: How long the controller waits for a broker it is cut off from (--celery-broker-timeout).
DEFAULT_BROKER_TIMEOUT = 300.0


@dataclasses.dataclass
class BrokerOutage:
    """The controller cut off from its broker: since when, and when to stop waiting.

    ``since`` is when the broker was last heard (the silence before it was noticed counts);
    past ``since + limit`` the run gives up on the broker. Pure: times are passed in.
    """

    limit: float = DEFAULT_BROKER_TIMEOUT
    since: float | None = None
    given_up: bool = False

    def begin(self, now: float, last_heard: float | None, broker: str) -> str:
        """The outage is noticed now: what to say (once)."""
        self.since = now if last_heard is None else min(now, last_heard)
        return (
            f"no word from the broker {broker} for {now - self.since:.0f} s; waiting up to "
            f"{self.limit:g} s (--celery-broker-timeout)"
        )

    def failure(self, nodeid: str, broker: str) -> str:
        """The infrastructure error of a test left without an outcome when the wait is over."""
        return (
            f"{nodeid} has no outcome: cut off from the broker {broker}: no word from it for "
            f"{self.limit:g}s (--celery-broker-timeout {self.limit:g})"
        )

    def end(self, now: float) -> float:
        """The broker answers again: how long the outage lasted."""
        lasted = now - (self.since if self.since is not None else now)
        self.since = None
        return lasted

    def over(self, now: float) -> bool:
        """True once, when the wait is over (the run gives up on the broker)."""
        if self.since is None or self.given_up or now - self.since < self.limit:
            return False
        self.given_up = True
        return True
