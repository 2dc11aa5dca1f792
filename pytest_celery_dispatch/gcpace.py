"""The garbage collector's pace in a dispatching controller and in a worker's runners.

A controller replaying 30,000 tests keeps every report (pytest's terminal stats, the JSON
report) and a zygote keeps every item it collected: their heaps only grow. CPython starts a
full collection whenever the objects that survived the young generations since the last full
one reach a quarter of those it kept, so a growing heap is walked again and again: W6's
controller made 10 full passes while it collected (1.3 s) and 13 while it replayed (3.9 s of
its 16 s of CPU), though ``gc.freeze()`` after collection keeps the items out of the later ones.

:func:`relax` spaces the collections out: a full pass after ``FULL_EVERY`` middle-generation
passes instead of 10, a young pass after ``YOUNG_EVERY`` allocations instead of 700. Cycles are
still collected, young ones as often as before and old ones later; CPython's rule on the heap's
growth still applies on top. W6's controller: 0.4-0.8 s of collections while it replays.

:func:`freeze_at_exit` spares a controller the collections of the interpreter's finalization:
they walked W6's heap (440 MB) for 1.1-1.3 s after the run had ended.
"""

from __future__ import annotations

import atexit
import gc
from collections.abc import Callable

#: Allocations (less deallocations) of tracked objects between two young collections.
YOUNG_EVERY = 2000
#: Middle-generation collections between two full ones (CPython's default: 10).
FULL_EVERY = 100


def relax() -> Callable[[], None]:
    """Space the collections out (never closer than they are); return what restores them."""
    before = gc.get_threshold()
    young, middle, full = before
    if young > 0:  # 0: automatic collection is off, and stays off
        gc.set_threshold(max(young, YOUNG_EVERY), middle, max(full, FULL_EVERY))

    def restore() -> None:
        gc.set_threshold(*before)

    return restore


def freeze_at_exit() -> None:
    """Freeze the heap at the interpreter's exit, so that its finalization does not walk it.

    ``atexit`` runs after pytest's own last collections (its cleanup collects to report the
    unraisable exceptions of the session's garbage), so nothing the session left is skipped;
    the objects are freed as usual, by their reference counts, as the modules go. Registered
    once however many sessions a process runs (pytester)."""
    atexit.unregister(gc.freeze)
    atexit.register(gc.freeze)
