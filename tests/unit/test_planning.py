"""planning.py: --celery-dist load / loadfile / loadscope / loadgroup cut a queue into chunks."""

from __future__ import annotations

import pytest

from pytest_celery_dispatch import planning as pl

# Two files; in b.py a class of three and two module functions (collection order).
NODEIDS = [
    "a.py::test_1",
    "a.py::test_2",
    "b.py::TestSeq::test_1",
    "b.py::TestSeq::test_2",
    "b.py::TestSeq::test_3",
    "b.py::test_free_1",
    "b.py::test_free_2",
]
SCOPES = {n: n.rsplit("::", 1)[0] for n in NODEIDS}  # what the session derives from the item


def test_load_is_exactly_plan_chunks_whatever_the_keys() -> None:
    for n in (0, 1, 5, 37, 300):
        for slots in (1, 2, 4):
            ids = [f"t{i}.py::test" for i in range(n)]
            keys = {i: "one" for i in ids}  # ignored by load
            assert pl.plan_work(ids, slots, "load", keys) == pl.plan_chunks(ids, slots)
            assert pl.plan_groups(ids, "load", keys) == ([], ids)


def test_loadfile_makes_one_chunk_per_file_biggest_first_in_collection_order() -> None:
    keys = {n: pl.file_key(n) for n in NODEIDS}
    assert pl.plan_work(NODEIDS, 2, "loadfile", keys) == [NODEIDS[2:], NODEIDS[:2]]
    groups, free = pl.plan_groups(NODEIDS, "loadfile", keys)
    assert [key for key, _ in groups] == ["b.py", "a.py"]
    assert free == []


def test_loadscope_groups_a_class_and_a_modules_functions_apart() -> None:
    chunks = pl.plan_work(NODEIDS, 2, "loadscope", SCOPES)
    assert chunks == [
        ["b.py::TestSeq::test_1", "b.py::TestSeq::test_2", "b.py::TestSeq::test_3"],
        ["a.py::test_1", "a.py::test_2"],  # ties keep the order of their first test
        ["b.py::test_free_1", "b.py::test_free_2"],
    ]


def test_loadgroup_keeps_a_group_in_one_chunk_and_shares_the_rest_as_load() -> None:
    ids = [f"t.py::test_{i}" for i in range(40)]
    flash = [ids[3], ids[17], ids[30]]  # scattered through the collection
    keys: dict[str, str | None] = {n: ("flash" if n in flash else None) for n in ids}
    chunks = pl.plan_work(ids, 2, "loadgroup", keys)
    assert flash in chunks  # one chunk, in collection order
    assert sum(1 for c in chunks if set(c) & set(flash)) == 1  # never split
    rest = [n for n in ids if n not in flash]
    free_chunks = [c for c in chunks if c != flash]
    assert free_chunks == pl.plan_chunks(rest, 2)  # the free tests: today's load chunks
    assert [len(c) for c in chunks] == sorted((len(c) for c in chunks), reverse=True)
    # 37 free tests on 2 slots: chunks of 4, 4, 3, 3, ...; the group goes before the free 3s.
    assert chunks.index(flash) == 2


def test_a_group_bigger_than_any_chunk_goes_first_and_is_never_cut() -> None:
    ids = [f"t.py::test_{i}" for i in range(1000)]
    keys = {n: "big" for n in ids[:500]}
    chunks = pl.plan_work(ids, 1, "loadgroup", keys)
    assert chunks[0] == ids[:500]  # bigger than plan_chunks' cap of 200, still one chunk
    assert [n for c in chunks[1:] for n in c] == ids[500:]


def test_a_test_without_a_key_is_free_in_every_grouping_mode() -> None:
    for mode in ("loadfile", "loadscope", "loadgroup"):
        groups, free = pl.plan_groups(["x", "y"], mode, {"x": "g"})
        assert (groups, free) == ([("g", ["x"])], ["y"]), mode


@pytest.mark.parametrize(
    ("markers", "expected"),
    [
        pytest.param([], None, id="no-marker"),
        pytest.param([(("flash",), {})], "flash", id="positional"),
        pytest.param([((), {"name": "flash"})], "flash", id="keyword"),
        pytest.param([((), {})], "default", id="no-name"),
        pytest.param([(("b",), {}), (("a",), {}), (("b",), {})], "a_b", id="several"),
        pytest.param([((7,), {})], "7", id="not-a-string"),
    ],
)
def test_group_name_follows_pytest_xdist(markers: list, expected: str | None) -> None:
    assert pl.group_name(markers) == expected


def test_file_key_is_the_file_part_even_with_colons_in_a_parameter_id() -> None:
    assert pl.file_key("d/t.py::TestC::test_m[a::b]") == "d/t.py"
    assert pl.file_key("d/t.py::test_f[queue_a]") == "d/t.py"


def test_the_modes_are_xdists() -> None:
    assert pl.DIST_MODES == ("load", "loadfile", "loadscope", "loadgroup")


# ----------------------------------------------------------------------------- longest first

#: Issue #15's long tail: 40 tests of 0.1 s collected before 3 tests of 4 s.
TAIL = [f"t.py::test_short_{i}" for i in range(40)] + [f"t.py::test_soak_{i}" for i in range(3)]
TAIL_SECONDS = {n: (4.0 if "soak" in n else 0.1) for n in TAIL}


def test_collection_order_makes_the_long_tests_the_tail() -> None:
    chunks = pl.plan_chunks(TAIL, 2)
    assert pl.predict_time(chunks, TAIL_SECONDS, 2) == pytest.approx(10.0)


def test_longest_first_sends_each_long_test_alone_first_and_reaches_the_optimum() -> None:
    chunks = pl.plan_work(TAIL, 2, "load", {}, TAIL_SECONDS)
    assert chunks[:3] == [[n] for n in TAIL[40:]]  # a long test is a chunk of its own, early
    assert sorted(n for c in chunks for n in c) == sorted(TAIL)  # the same tests, once each
    # A slot takes its next chunk while its long test runs: those chunks are single tests.
    assert chunks[3:6] == [[n] for n in TAIL[:3]]
    sizes = [len(c) for c in chunks[6:]]
    assert sizes[0] > 1
    assert sizes == sorted(sizes, reverse=True)
    assert sizes[-1] == 1
    # 16 s of work on 2 slots: 8 s is the optimum.
    assert pl.predict_time(chunks, TAIL_SECONDS, 2) == pytest.approx(8.0)


def test_equal_estimates_give_exactly_todays_chunks() -> None:
    for n in (1, 5, 37, 300):
        ids = [f"t{i}.py::test" for i in range(n)]
        for slots in (1, 2, 4):
            flat = {i: 0.5 for i in ids}
            zero = {i: 0.0 for i in ids}
            assert pl.plan_work(ids, slots, "load", {}, zero) == pl.plan_chunks(ids, slots)
            # Equal non-zero estimates: the same order, cut by count once time allows.
            assert [n for c in pl.plan_work(ids, slots, "load", {}, flat) for n in c] == ids


def test_unknown_order_is_kept_among_equals_and_longest_goes_first() -> None:
    ids = ["a", "b", "c", "d"]
    est = {"a": 1.0, "b": 3.0, "c": 1.0, "d": 2.0}
    assert pl.longest_first(ids, est) == ["b", "d", "a", "c"]


def test_groups_go_by_summed_duration_and_keep_their_order() -> None:
    keys = {n: pl.file_key(n) for n in NODEIDS}  # b.py: 5 tests, a.py: 2 tests
    est = {n: 0.1 for n in NODEIDS}
    est["a.py::test_2"] = 5.0  # the small file holds a soak test
    chunks = pl.plan_work(NODEIDS, 2, "loadfile", keys, est)
    assert chunks == [NODEIDS[:2], NODEIDS[2:]]  # a.py first, its tests in collection order
    # loadgroup: the free tests go longest first around the group.
    group = {n: ("g" if n.startswith("b.py::TestSeq") else None) for n in NODEIDS}
    chunks = pl.plan_work(NODEIDS, 1, "loadgroup", group, est)
    assert chunks[0] == ["a.py::test_2"]
    assert NODEIDS[2:5] in chunks


def test_predict_time_is_list_scheduling_on_the_slots() -> None:
    est = {"a": 3.0, "b": 2.0, "c": 2.0, "d": 1.0}
    assert pl.predict_time([["a"], ["b"], ["c"], ["d"]], est, 2) == pytest.approx(4.0)
    assert pl.predict_time([["a", "b"], ["c", "d"]], est, 2) == pytest.approx(5.0)
    assert pl.predict_time([["a"], ["b"]], est, 1) == pytest.approx(5.0)
    assert pl.predict_time([], est, 3) == 0.0


def test_remaining_time_spreads_the_work_but_not_below_the_longest_test() -> None:
    assert pl.remaining_time([], 2) == 0.0
    assert pl.remaining_time([1.0, 1.0, 1.0, 1.0], 2) == pytest.approx(2.0)
    assert pl.remaining_time([5.0, 0.5], 4) == pytest.approx(5.0)


def test_a_group_merges_in_by_weight_without_reordering_the_free_chunks() -> None:
    ids = [f"t.py::short_{i}" for i in range(20)] + ["t.py::soak", "g.py::a", "g.py::b"]
    est = {n: 0.1 for n in ids} | {"t.py::soak": 5.0, "g.py::a": 1.0, "g.py::b": 1.0}
    keys = {n: ("g" if n.startswith("g.py") else None) for n in ids}
    chunks = pl.plan_work(ids, 2, "loadgroup", keys, est)
    assert chunks[0] == ["t.py::soak"]
    assert chunks[1] == ["g.py::a", "g.py::b"]  # 2 s: before the short tests, in its order
    assert chunks[2] == ["t.py::short_0"]  # owed to the slot holding the soak test
    assert sorted(n for c in chunks for n in c) == sorted(ids)


def test_quick_tests_keep_their_collection_order_whatever_their_recorded_noise() -> None:
    """Tests far shorter than a tail are not reordered by the noise of their durations: their
    modules stay together in each chunk (W6: 13,000 module switches per slot otherwise)."""
    ids = [f"test_m{m}.py::test_{i}" for m in range(3) for i in range(4)]
    noise = {n: 0.00004 + 0.00001 * ((i * 7) % 5) for i, n in enumerate(ids)}
    assert pl.longest_first(ids, noise) == ids
    # A long test still goes first, and tests within a factor of 2 keep their order.
    est = {**noise, ids[5]: 2.0, ids[7]: 0.05, ids[9]: 0.06}
    assert pl.longest_first(ids, est) == [
        ids[5],
        ids[7],
        ids[9],
        *(n for n in ids if n not in (ids[5], ids[7], ids[9])),
    ]
