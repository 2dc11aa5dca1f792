"""Is a run's controller still there? The rule a worker's slot uses to drop a dead run.

A controller consumes its run's reply queue (on the embedded broker it also keeps a presence
file that counts as that consumer). A slot asks for the reply queue's consumer count every
``CONTROLLER_CHECK_INTERVAL`` seconds (a passive declare) and feeds each answer to a
:class:`ControllerWatch`:

* one consumer or more: the controller is there;
* no answer (the broker is restarting, this worker is cut off): nothing can be concluded, and
  the count of zeros starts again once the broker answers, because the controller reconnects
  after the worker may have (every client was disconnected, the controller retries every
  ``CONTROLLER_RECONNECT_MAX`` seconds at most);
* zero, without a break, for ``CONTROLLER_GONE_GRACE`` seconds: the controller is gone (killed,
  its machine gone, its network cut): the slot drops the run.

The budget: a killed controller's last test on a bench starts at most ``BENCH_RELEASE_LIMIT``
seconds after it died. Zeros are seen at once on RabbitMQ when the controller's process dies
(its consumer goes with its socket), ``SILENT_CONTROLLER_DROPPED_AFTER`` later when its
machine or network goes silent, and after ``PRESENCE_STALE`` at most on the embedded broker
(a controller on another host; on the same host its dead pid is seen at once), then the grace
runs, then one more check. ``tests/unit/test_liveness.py`` holds the sum under the limit.

Light: imported by both sides, no third-party import.
"""

from __future__ import annotations

import time
from collections.abc import Callable

#: A dead controller's run starts no test on a bench later than this after the controller died.
BENCH_RELEASE_LIMIT = 10.0
#: How often a slot asks whether its controller is there (also how often it reads the
#: controller's stop / kill signals).
CONTROLLER_CHECK_INTERVAL = 0.2
#: The controller's reply consumer re-subscribes after a connection loss at least this often.
CONTROLLER_RECONNECT_MAX = 2.0
#: The AMQP heartbeat (seconds) of the controller's reply connection: when its machine vanishes
#: or its network is cut without a TCP reset, RabbitMQ closes that connection, and with it the
#: consumer, after about two and a half of these (without one it would hold them for many
#: minutes).
CONTROLLER_HEARTBEAT = 1
#: Measured on RabbitMQ 3.10: a silent (SIGSTOPped) client lost its consumer 4.9 s after it
#: went silent with a 2 s heartbeat, 2.2 s with 1 s (AMQP heartbeats are whole seconds).
SILENT_CONTROLLER_DROPPED_AFTER = 2.5 * CONTROLLER_HEARTBEAT
#: Zero consumers on the reply queue without a break for this long: the controller is gone.
#: Longer than the controller's reconnect after a broker restart (so a restart is not a death),
#: short enough that detection plus the embedded broker's staleness fits the release limit.
CONTROLLER_GONE_GRACE = 5.0
#: After interrupting a dead run's test (as Ctrl-C would), how long its fixtures have to tear
#: down before the runner is killed.
TEARDOWN_GRACE = 3.0


class ControllerWatch:
    """Decides from consumer counts whether a run's controller is gone (pure, injected clock).

    :meth:`observe` takes each answer: a count, or ``None`` when the broker could not be asked.
    """

    def __init__(
        self, grace: float = CONTROLLER_GONE_GRACE, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.grace = grace
        self.clock = clock
        self.absent_since: float | None = None  # zeros seen without a break since then
        self.gone = False

    def observe(self, consumers: int | None) -> bool:
        """Take one answer; True once the controller is gone (and from then on)."""
        if self.gone:
            return True
        if consumers is None or consumers > 0:
            # Present, or unknown: a broker outage disconnects everyone, the controller too.
            # Only an unbroken line of zeros, with the broker answering, counts.
            self.absent_since = None
            return False
        now = self.clock()
        if self.absent_since is None:
            self.absent_since = now
        self.gone = now - self.absent_since >= self.grace
        return self.gone

    @property
    def absent(self) -> bool:
        """Zeros seen, not yet long enough to decide: a slot about to start waits this out."""
        return self.absent_since is not None and not self.gone

    def absent_for(self) -> float:
        return 0.0 if self.absent_since is None else self.clock() - self.absent_since
