"""Shipping the run's tree: workers in empty folders run the controller's own files.

Each test writes its project in its own pytester folder (its own rootdir, so the tree is that
project alone) and starts workers in an empty folder with a private cache.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import jsonschema
import pytest

# Imported here, not in a test: pytester puts sys.modules back after each test, and
# cryptography's classes imported again would no longer be its native module's.
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from pytest_celery_dispatch.embedded import EMBEDDED
from pytest_celery_dispatch.names import ENV_SHIP_UNSIGNED
from tests.conftest import SCHEMA
from tests.helpers import BROKER

TRANSPORTS = pytest.mark.parametrize("broker", [BROKER, EMBEDDED], ids=["rabbitmq", "embedded"])

PROJECT = {
    # pytester writes the controller's stdout and stderr here while it runs: not inputs
    "pytest.ini": (
        "[pytest]\npythonpath = helpers\nconsole_output_style = classic\n"
        "celery_dispatch_ship_exclude =\n    stdout\n    stderr\n    runpytest-*\n"
    ),
    "conftest.py": "import pytest\n\n@pytest.fixture\ndef answer():\n    return 42\n",
    "helpers/mathhelp.py": "def double(x):\n    return 2 * x\n",
    "data/input.txt": "hello\n",
    "tests/test_shipped.py": (
        "from pathlib import Path\n"
        "from mathhelp import double\n"
        "VERSION = 1\n\n"
        "def test_fixture(answer):\n    assert answer == 42\n\n"
        "def test_helper():\n    assert double(21) == 42\n\n"
        "def test_data():\n"
        "    here = Path(__file__).parent\n"
        "    assert (here.parent / 'data' / 'input.txt').read_text() == 'hello\\n'\n\n"
        "def test_version():\n    assert VERSION == 1\n"
    ),
}


def write(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


@pytest.fixture
def outside():
    """A private folder outside the shared workspace (the base temp folder, which other
    tests' runs hash as their tree): caches, empty benches, keys. Removed after the test."""
    import shutil
    import tempfile

    made: list[Path] = []

    def make(name: str) -> Path:
        made.append(Path(tempfile.mkdtemp(prefix=f"cdship-{name}-")))
        return made[-1]

    yield make
    for folder in made:
        subprocess.run(["chmod", "-R", "u+rwX", str(folder)], check=False)  # read-only trees
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def bench(outside, monkeypatch, worker_factory):
    """Start a worker in an empty folder (no checkout, no DISPATCH_WORKSPACE) with its own
    cache; on the embedded broker, controller and worker share a private broker folder."""

    def start(broker: str, concurrency: int = 1, allow: str | None = "allow", **env: str):
        empty = outside("empty-bench")
        extra = {"DISPATCH_CACHE_DIR": str(outside("cache")), **env}
        if allow is not None:
            extra[ENV_SHIP_UNSIGNED] = allow
        if broker == EMBEDDED:
            monkeypatch.setenv("DISPATCH_EMBEDDED_DIR", str(outside("broker")))
        worker = worker_factory(root=empty, concurrency=concurrency, broker=broker, extra_env=extra)
        assert not any(empty.iterdir())
        return worker

    return start


def dispatch_args(queue: str, broker: str, root: Path, report: Path) -> list[str]:
    """A dispatched run of the project in ``root`` (its own rootdir) to ``queue``."""
    options = [f"--celery-broker={broker}", f"--celery-default-queue={queue}"]
    options += [f"--rootdir={root}", f"--celery-json-report={report}"]
    return ["--celery-dispatch", *options, "-p", "no:cacheprovider", "-p", "no:randomly"]


def run(pytester: pytest.Pytester, queue: str, broker: str, *args: str, name: str = "report"):
    report = pytester.path / f"dispatch_results_{name}.json"  # never shipped by default
    result = pytester.runpytest_subprocess(
        *dispatch_args(queue, broker, pytester.path, report), *args, timeout=120
    )
    data = json.loads(report.read_text())
    jsonschema.validate(data, SCHEMA)
    return result, data


def outcomes(report: dict) -> dict[str, str]:
    return {t["nodeid"]: t["outcome"] for t in report["tests"]}


@TRANSPORTS
def test_a_worker_in_an_empty_folder_runs_the_suite_as_locally(pytester, bench, broker):
    write(pytester.path, PROJECT)
    local = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    local.assert_outcomes(passed=4)
    worker = bench(broker)
    result, report = run(pytester, worker.queue, broker)
    result.assert_outcomes(passed=4)
    assert set(outcomes(report).values()) == {"passed"}
    ship = report["dispatch"]["ship"]
    assert ship["files"] == len(PROJECT)
    w = ship["workers"][worker.worker_id]
    assert w["state"] == "shipped"
    assert w["blobs_sent"] == len(PROJECT)
    result.stdout.fnmatch_lines([f"celery-dispatch: {worker.worker_id}: 5 files, * sent in *"])

    # An edited test: the next run runs the edited version, with one blob sent.
    (pytester.path / "tests" / "test_shipped.py").write_text(
        PROJECT["tests/test_shipped.py"].replace("VERSION = 1", "VERSION = 2")
    )
    result, report = run(pytester, worker.queue, broker, name="edited")
    result.assert_outcomes(passed=3, failed=1)
    assert outcomes(report)["tests/test_shipped.py::test_version"] == "failed"
    assert report["dispatch"]["ship"]["blobs_sent"] == 1

    # Nothing changed: no blob is sent, the tree is up to date.
    result, report = run(pytester, worker.queue, broker, name="unchanged")
    result.assert_outcomes(passed=3, failed=1)
    assert report["dispatch"]["ship"]["blobs_sent"] == 0
    assert report["dispatch"]["ship"]["workers"][worker.worker_id]["state"] == "up to date"
    result.stdout.fnmatch_lines([f"celery-dispatch: {worker.worker_id}: up to date"])


def test_a_worker_refuses_an_unsigned_shipped_run_by_default(pytester, bench):
    write(pytester.path, PROJECT)
    marker = pytester.path / "ran"
    write(
        pytester.path, {"tests/test_side.py": f"def test_side():\n    open({str(marker)!r}, 'w')\n"}
    )
    worker = bench(BROKER, allow=None)
    cache = Path(worker.env["DISPATCH_CACHE_DIR"])
    result, report = run(pytester, worker.queue, BROKER, "--celery-ship=always")
    result.assert_outcomes(failed=5)
    result.stdout.fnmatch_lines([f"*{worker.worker_id} does not run shipped trees of unsigned*"])
    assert ENV_SHIP_UNSIGNED in result.stdout.str()
    assert not marker.exists()
    assert not list((cache / "blobs").rglob("*")), "nothing of the run is written"
    assert report["dispatch"]["ship"]["workers"][worker.worker_id]["state"] == "refused"


def test_an_escaping_symlink_and_an_over_limit_file_are_refused_before_any_test(pytester, bench):
    write(pytester.path, PROJECT)
    marker = pytester.path.parent / f"{pytester.path.name}-ran"
    write(
        pytester.path, {"tests/test_side.py": f"def test_side():\n    open({str(marker)!r}, 'w')\n"}
    )
    outside = pytester.path.parent / f"{pytester.path.name}-secret.txt"
    outside.write_text("secret")
    (pytester.path / "data" / "leak.txt").symlink_to(outside)
    worker = bench(BROKER)
    result, _ = run(pytester, worker.queue, BROKER, "--celery-ship=always")
    result.assert_outcomes(failed=5)
    result.stdout.fnmatch_lines(["*cannot ship the run's tree: symlink(s) escaping*data/leak.txt*"])
    assert not marker.exists()
    # auto: the run goes on in the worker's own (here empty) workspace, as before shipping
    result, report = run(pytester, worker.queue, BROKER, name="auto")
    result.stdout.fnmatch_lines(["*not shipping the run's tree: symlink(s) escaping*leak.txt*"])
    assert "data/leak.txt" in report["dispatch"]["ship"]["error"]
    assert not marker.exists()

    (pytester.path / "data" / "leak.txt").unlink()
    (pytester.path / "data" / "big.bin").write_bytes(b"x" * 4096)
    limit = ("-o", "celery_dispatch_ship_max_file=1k", "--celery-ship=always")
    result, _ = run(pytester, worker.queue, BROKER, *limit, name="limit")
    result.assert_outcomes(failed=5)
    result.stdout.fnmatch_lines(["*data/big.bin (4.0 kB)*celery_dispatch_ship_max_file*"])
    assert not marker.exists()


def test_a_test_file_missing_from_the_tree_fails_the_run_before_any_test(pytester, bench):
    """A git-ignored test file (then an excluded conftest.py) is named with its setting before
    anything is sent; the include glob ships it and the same run passes."""
    write(pytester.path, PROJECT)
    marker = pytester.path.parent / f"{pytester.path.name}-ran"
    write(
        pytester.path,
        {
            ".gitignore": "tests/test_generated.py\n",
            "tests/test_generated.py": f"def test_gen():\n    open({str(marker)!r}, 'w')\n",
        },
    )
    subprocess.run(["git", "init", "-q", str(pytester.path)], check=True)
    worker = bench(BROKER)
    for mode in ("auto", "always"):
        result, report = run(pytester, worker.queue, BROKER, f"--celery-ship={mode}", name=mode)
        result.assert_outcomes(failed=5)
        result.stdout.fnmatch_lines(
            [
                "*cannot ship the run's tree: 1 file(s) the dispatched tests need are not in it: "
                "tests/test_generated.py (test file: git ignores it (.gitignore:1:*"
                "ini celery_dispatch_ship_include*--celery-ship off*"
            ]
        )
        assert not marker.exists()
        ship = report["dispatch"]["ship"]
        assert "tests/test_generated.py" in ship["error"]
        assert ship["workers"] == {}, "no slot was started"
        assert ship["manifests_sent"] == 0

    include = ("-o", "celery_dispatch_ship_include=tests/test_generated.py")
    result, report = run(pytester, worker.queue, BROKER, *include, name="included")
    result.assert_outcomes(passed=5)
    assert marker.exists()

    ini = PROJECT["pytest.ini"] + "    conftest.py\n"
    write(pytester.path, {"pytest.ini": ini})
    result, report = run(pytester, worker.queue, BROKER, *include, name="excluded")
    result.assert_outcomes(failed=5)
    result.stdout.fnmatch_lines(
        ["*conftest.py (conftest.py: excluded by ini celery_dispatch_ship_exclude (conftest.py))*"]
    )


def test_a_50_mb_file_travels_in_bounded_messages(pytester, bench):
    write(pytester.path, PROJECT)
    data = os.urandom(50 * 1024 * 1024)
    (pytester.path / "data" / "big.bin").write_bytes(data)
    import hashlib

    digest = hashlib.sha256(data).hexdigest()
    write(
        pytester.path,
        {
            "tests/test_big.py": (
                "import hashlib, pathlib\n"
                "def test_big():\n"
                "    p = pathlib.Path(__file__).parent.parent / 'data' / 'big.bin'\n"
                f"    assert hashlib.sha256(p.read_bytes()).hexdigest() == {digest!r}\n"
            )
        },
    )
    worker = bench(BROKER)
    try:
        result, report = run(pytester, worker.queue, BROKER, "-k", "big")
    finally:
        (pytester.path / "data" / "big.bin").unlink()  # later runs hash the base temp folder
    result.assert_outcomes(passed=1)
    assert report["dispatch"]["ship"]["workers"][worker.worker_id]["state"] == "shipped"


RENDEZVOUS = (
    "import pathlib, time\n"
    "VERSION = {version}\n\n"
    "def test_version():\n"
    "    meet = pathlib.Path({meet!r})\n"
    "    (meet / '{me}').touch()\n"
    "    deadline = time.monotonic() + {wait}\n"
    "    while not (meet / '{other}').exists():  # both runs are on the worker at once\n"
    "        assert time.monotonic() < deadline, 'the other run never ran beside this one'\n"
    "        time.sleep(0.05)\n"
    "    assert VERSION == 1\n"
)


@TRANSPORTS
def test_two_controllers_with_two_versions_of_a_file_on_one_worker_each_get_their_own(
    pytester, bench, broker
):
    import subprocess
    import sys

    from pytest_celery_dispatch.settings import DEFAULT_TIMEOUT

    worker = bench(broker, concurrency=2)
    meet = pytester.path / "meet"
    meet.mkdir()
    runs = {}
    for me, other, version in (("one", "two", 1), ("two", "one", 2)):
        root = pytester.path / me
        write(root, {"pytest.ini": "[pytest]\n"})
        source = RENDEZVOUS.format(
            version=version, meet=str(meet), me=me, other=other, wait=DEFAULT_TIMEOUT / 5
        )
        write(root, {"tests/test_same_name.py": source})
        report = root.parent / f"{me}.json"
        command = [
            sys.executable,
            "-m",
            "pytest",
            *dispatch_args(worker.queue, broker, root, report),
        ]
        proc = subprocess.Popen(command, cwd=root, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        runs[me] = (proc, report)
    for me, (proc, report) in runs.items():
        out = proc.communicate(timeout=DEFAULT_TIMEOUT)[0].decode()
        assert proc.returncode == (0 if me == "one" else 1), out
        tests = json.loads(report.read_text())["tests"]
        expected = "passed" if me == "one" else "failed"
        assert [(t["nodeid"], t["outcome"]) for t in tests] == [
            ("tests/test_same_name.py::test_version", expected)
        ], out
    assert (meet / "one").exists()
    assert (meet / "two").exists()


def test_a_worker_with_an_older_pytest_is_named_in_the_header(pytester, bench, outside):
    """The worker's metadata says pytest 8.0.0 (a dist-info ahead on its path)."""
    fake = outside("older")
    info = fake / "pytest-8.0.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: pytest\nVersion: 8.0.0\n")
    write(pytester.path, PROJECT)
    worker = bench(BROKER, PYTHONPATH=str(fake))
    result, report = run(pytester, worker.queue, BROKER)
    result.assert_outcomes(passed=4)
    difference = f"pytest 8.0.0 (here {pytest.__version__})"
    result.stdout.fnmatch_lines([f"celery-dispatch: {worker.worker_id} differs from here: *"])
    assert difference in result.stdout.str()
    assert difference in report["dispatch"]["ship"]["workers"][worker.worker_id]["drift"]


@pytest.fixture
def keys(outside):
    """Make a key pair by name in a folder outside the project (never in its tree): the
    private key's path and PEM text, and the public key's path."""
    folder = outside("keys")

    def make(name: str) -> tuple[Path, str, Path]:
        key = ed25519.Ed25519PrivateKey.generate()
        private = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        (folder / f"{name}.pem").write_bytes(private)
        (folder / f"{name}.pub").write_bytes(
            key.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        )
        return folder / f"{name}.pem", private.decode(), folder / f"{name}.pub"

    return make


def test_a_signed_run_runs_and_a_wrongly_signed_one_is_refused(pytester, bench, keys, monkeypatch):
    _, lab_text, lab_public = keys("lab")
    stranger_key, _, _ = keys("stranger")
    write(pytester.path, PROJECT)
    worker = bench(BROKER, allow=None, DISPATCH_SHIP_TRUST=str(lab_public))
    cache = Path(worker.env["DISPATCH_CACHE_DIR"])

    result, report = run(pytester, worker.queue, BROKER, f"--celery-ship-key={stranger_key}")
    result.assert_outcomes(failed=4)
    result.stdout.fnmatch_lines(["*not among the keys it trusts (DISPATCH_SHIP_TRUST)*"])
    assert not list((cache / "blobs").rglob("*")), "nothing of the refused run is written"

    monkeypatch.setenv("CELERY_DISPATCH_SHIP_KEY", lab_text)  # a CI secret
    result, report = run(pytester, worker.queue, BROKER, name="signed")
    result.assert_outcomes(passed=4)
    assert report["dispatch"]["ship"]["workers"][worker.worker_id]["state"] == "shipped"
    body = lab_text.splitlines()[1]
    assert body not in result.stdout.str()
    assert body not in json.dumps(report)
    assert body not in worker.log_path.read_text()


def test_a_signature_older_than_the_workers_maximum_age_is_refused(pytester, bench, keys):
    lab_key, _, lab_public = keys("lab")
    write(pytester.path, PROJECT)
    # No slot reaches a worker within a microsecond of being signed: every signature is too old.
    worker = bench(
        BROKER, allow=None, DISPATCH_SHIP_TRUST=str(lab_public), DISPATCH_SHIP_MAX_AGE="1e-6"
    )
    cache = Path(worker.env["DISPATCH_CACHE_DIR"])
    result, report = run(
        pytester, worker.queue, BROKER, f"--celery-ship-key={lab_key}", "--celery-ship=always"
    )
    result.assert_outcomes(failed=4)
    result.stdout.fnmatch_lines(["*longer ago than this worker takes (DISPATCH_SHIP_MAX_AGE, *"])
    assert report["dispatch"]["ship"]["workers"][worker.worker_id]["state"] == "refused"
    assert report["dispatch"]["ship"]["manifests_sent"] == 0, "refused before anything is fetched"
    assert not [p for p in cache.rglob("*") if p.is_file()], "nothing of the refused run is written"


SIDE_BY_SIDE = (
    "import os, pathlib, time\n"
    "import pytest\n\n"
    "@pytest.mark.parametrize('n', range(9))\n"
    "def test_slot(n):\n"
    "    meet = pathlib.Path({meet!r})\n"
    "    (meet / f'ran-{{os.getpid()}}').touch()\n"
    "    deadline = time.monotonic() + {wait}\n"
    "    while len(list(meet.glob('ran-*'))) < 2:  # held until a second runner has run one\n"
    "        if (meet / 'gave-up').exists():\n"
    "            return\n"
    "        if time.monotonic() > deadline:\n"
    "            (meet / 'gave-up').touch()\n"
    "            pytest.fail('no other slot of the worker ran a test beside this one')\n"
    "        time.sleep(0.05)\n"
)


def test_the_slots_of_a_worker_run_side_by_side_in_one_shipped_tree(pytester, bench, outside):
    """Every slot of a ``-c 3`` worker holds the run's tree while it runs; the slots that
    start beside the first one take the same tree at once (they once waited for the first
    slot's whole session to end, so one slot ran everything)."""
    from pytest_celery_dispatch.settings import DEFAULT_TIMEOUT

    worker = bench(BROKER, concurrency=3)
    meet = outside("meet")
    write(pytester.path, {"pytest.ini": PROJECT["pytest.ini"]})
    write(
        pytester.path,
        {"tests/test_slots.py": SIDE_BY_SIDE.format(meet=str(meet), wait=DEFAULT_TIMEOUT / 5)},
    )
    result, report = run(pytester, worker.queue, BROKER)
    result.assert_outcomes(passed=9)
    assert not (meet / "gave-up").exists()
    runners = {p.name for p in meet.glob("ran-*")}
    assert len(runners) >= 2, runners
    assert report["dispatch"]["ship"]["workers"][worker.worker_id]["state"] == "shipped"
