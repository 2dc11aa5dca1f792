"""collection.group_key: each test's --celery-dist key, taken from the collected item."""

from __future__ import annotations

import pytest

from pytest_celery_dispatch.collection import group_key

SOURCE = """
import pytest

@pytest.mark.queue("qa", "qb")
@pytest.mark.xdist_group("flash")
class TestBench:
    @pytest.mark.parametrize("v", ["a::b", "x@y"])
    def test_m(self, v):
        pass

@pytest.mark.parametrize("v", ["c::d"])
def test_f(v):
    pass
"""


def test_keys_come_from_the_item_so_ids_with_colons_and_fanout_queues_stay_out(
    pytester: pytest.Pytester,
) -> None:
    items = pytester.getitems(SOURCE)
    module = items[0].nodeid.split("::")[0]
    ids = [i.nodeid.split("::", 1)[1] for i in items]
    assert ids == [
        "TestBench::test_m[a::b-qa]",
        "TestBench::test_m[a::b-qb]",
        "TestBench::test_m[x@y-qa]",
        "TestBench::test_m[x@y-qb]",
        "test_f[c::d]",
    ]
    keys = {mode: [group_key(i, mode) for i in items] for mode in ("loadscope", "loadgroup")}
    assert keys["loadscope"] == [f"{module}::TestBench"] * 4 + [module]
    assert keys["loadgroup"] == ["flash"] * 4 + [None]
    assert {group_key(i, "loadfile") for i in items} == {module}
    assert {group_key(i, "load") for i in items} == {None}


def test_several_group_markers_join_like_xdist(pytester: pytest.Pytester) -> None:
    (item,) = pytester.getitems(
        """
        import pytest

        pytestmark = pytest.mark.xdist_group(name="power")

        @pytest.mark.xdist_group("flash")
        def test_x():
            pass
        """
    )
    assert group_key(item, "loadgroup") == "flash_power"
