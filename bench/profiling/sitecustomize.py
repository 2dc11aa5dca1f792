"""``python -m bench --profile DIR``: every Python process started with this folder on
``PYTHONPATH`` and ``CDBENCH_PROFILE_DIR`` set runs under cProfile and leaves its profile in
that folder (``bench/split.py`` reads them).

* cProfile's own clock (wall time: a CPU clock read per call slowed the profiled slots so much
  that they took themselves for cut off from the broker); ``bench.split`` takes the waits out;
* a process started fresh (controller, celery worker, spare runner, zygote) profiles its main
  thread from here, and every thread it starts later; each is written at exit;
* a forked child (a celery pool process, a runner forked from the zygote) drops what it
  inherited and starts a profile of its own;
* a celery pool process never reaches ``atexit`` (billiard ends it with ``os._exit``): it writes
  its profile after each task instead.
"""

from __future__ import annotations

import os

_DIR = os.environ.get("CDBENCH_PROFILE_DIR")


def _install(folder: str) -> None:
    import atexit
    import cProfile
    import sys
    import threading

    state: dict[str, object] = {"main": None, "threads": []}
    inherited: list[object] = []  # a parent's profilers, never destroyed in a child

    def dump(profile: cProfile.Profile, tag: str) -> None:
        profile.disable()  # the stats so far (cumulative: a later dump replaces the file)
        profile.dump_stats(os.path.join(folder, f"{os.getpid()}-{tag}.prof"))

    def start_main() -> None:
        inherited.append(state["main"])
        inherited.append(state["threads"])
        profile = cProfile.Profile()
        state["main"] = profile
        state["threads"] = []
        profile.enable()

    def thread_boot(frame: object, event: str, arg: object) -> None:
        sys.setprofile(None)
        profile = cProfile.Profile()
        state["threads"].append(profile)  # type: ignore[attr-defined]
        profile.enable()

    def at_exit() -> None:
        main = state["main"]
        if isinstance(main, cProfile.Profile):
            dump(main, "main")
        for number, profile in enumerate(list(state["threads"])):  # type: ignore[call-overload]
            dump(profile, f"thread{number}")

    def after_fork() -> None:
        start_main()
        if "celery" in sys.modules:  # a pool process: written after each task
            try:
                from celery import signals

                def after_task(**kwargs: object) -> None:
                    main = state["main"]
                    if isinstance(main, cProfile.Profile):
                        dump(main, "task")
                        main.enable()

                signals.task_postrun.connect(after_task, weak=False)
            except Exception:
                pass

    threading.setprofile(thread_boot)
    os.register_at_fork(after_in_child=after_fork)
    atexit.register(at_exit)
    start_main()


if _DIR:
    os.makedirs(_DIR, exist_ok=True)
    _install(_DIR)
