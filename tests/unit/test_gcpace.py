"""gcpace: the controller and the runners space the garbage collector's passes out."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

from pytest_celery_dispatch import gcpace


@pytest.fixture
def thresholds() -> Iterator[None]:
    before = gc.get_threshold()
    yield
    gc.set_threshold(*before)


@pytest.mark.usefixtures("thresholds")
def test_relax_spaces_collections_out_and_restores_them() -> None:
    gc.set_threshold(700, 10, 10)
    restore = gcpace.relax()
    assert gc.get_threshold() == (gcpace.YOUNG_EVERY, 10, gcpace.FULL_EVERY)
    restore()
    assert gc.get_threshold() == (700, 10, 10)


@pytest.mark.usefixtures("thresholds")
def test_relax_never_brings_collections_closer_nor_turns_them_on() -> None:
    gc.set_threshold(50_000, 20, 500)
    gcpace.relax()
    assert gc.get_threshold() == (50_000, 20, 500)
    gc.set_threshold(0, 10, 10)  # automatic collection off (gc.set_threshold(0))
    gcpace.relax()
    assert gc.get_threshold() == (0, 10, 10)


@pytest.mark.usefixtures("thresholds")
def test_a_dispatching_controller_collects_relaxed_and_leaves_gc_as_it_was(
    pytester: pytest.Pytester,
) -> None:
    gc.set_threshold(700, 10, 10)
    pytester.makeconftest(
        """
        import gc

        def pytest_collection_finish(session):
            print("thresholds during collection", gc.get_threshold())
        """
    )
    pytester.makepyfile(test_one="def test_one():\n    pass\n")
    plain = pytester.runpytest_inprocess("--collect-only", "-s")
    plain.stdout.fnmatch_lines(["thresholds during collection (700, 10, 10)"])
    dispatched = pytester.runpytest_inprocess("--celery-dispatch", "--collect-only", "-s")
    dispatched.stdout.fnmatch_lines(
        [f"thresholds during collection ({gcpace.YOUNG_EVERY}, 10, {gcpace.FULL_EVERY})"]
    )
    assert gc.get_threshold() == (700, 10, 10)


def test_a_dispatching_controller_freezes_its_heap_at_exit_after_pytest_is_done(
    pytester: pytest.Pytester,
) -> None:
    # The conftest's atexit handler is registered first, so it runs last: after the plugin's.
    pytester.makeconftest(
        """
        import atexit
        import gc

        atexit.register(lambda: print("frozen at exit:", gc.get_freeze_count() > 0))
        """
    )
    pytester.makepyfile(test_one="def test_one():\n    pass\n")
    plain = pytester.runpytest_subprocess("--collect-only", "-q")
    plain.stdout.fnmatch_lines(["frozen at exit: False"])
    dispatched = pytester.runpytest_subprocess("--celery-dispatch", "--collect-only", "-q")
    dispatched.stdout.fnmatch_lines(["frozen at exit: True"])
