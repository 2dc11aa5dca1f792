"""A runner's collection of the test files it is given: each folder is listed once."""

from __future__ import annotations

from collections import Counter

from pytest_celery_dispatch.runner import FolderListings


def test_a_runner_lists_each_folder_once_however_many_of_its_files_it_is_given(pytester):
    log = pytester.path / "listed.log"
    pytester.makeconftest(
        f"""
        def pytest_collect_file(file_path, parent):
            with open({str(log)!r}, "a") as fh:
                fh.write(file_path.relative_to({str(pytester.path)!r}).as_posix() + "\\n")
        """
    )
    test = "def test_one():\n    pass\n\ndef test_two():\n    pass\n"
    files = [f"test_m{n}.py" for n in range(6)]
    files += ["pkg/__init__.py", "pkg/test_p0.py", "pkg/test_p1.py", "pkg/sub/test_s0.py"]
    for name in files:
        path = pytester.path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("" if name.endswith("__init__.py") else test)
    given = ["test_m4.py", "test_m0.py", "test_m2.py", "pkg/test_p1.py", "pkg/sub/test_s0.py"]

    result = pytester.inline_run(
        "--collect-only", "-p", "no:cacheprovider", *given, plugins=[FolderListings()]
    )

    items = [item.nodeid for item in result.getcalls("pytest_collection_finish")[0].session.items]
    assert items == [f"{name}::{test}" for name in given for test in ("test_one", "test_two")]
    listed = Counter(log.read_text().splitlines())
    assert set(listed.values()) == {1}, listed  # pytest alone: test_m0.py 3 times, ...
    assert set(given) <= set(listed)
