"""The worker image's entrypoint, command and healthcheck, and the compose healthchecks, run for
real as local processes against real workers, without a Docker engine.

Everything is read from workers/Dockerfile and docker-compose.yml, never restated here: the
scripts the image COPYs onto its PATH are put in a local bin directory, the environment is the
Dockerfile's ENV (compose's ``environment``) with host.docker.internal read as 127.0.0.1 and
/workspace as this checkout, and HOSTNAME set as Docker sets it. Every check runs within the
healthcheck's own ``--timeout``. The image's worker gets a unique queue and worker name; the
compose workers keep their queue_a / queue_b in a private vhost.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest
from celery import Celery

from pytest_celery_dispatch.celeryconf import celery_config
from tests.helpers import (
    BROKER,
    WorkerProcess,
    check_examples_passed,
    consumer_count,
    delete_queues,
    dispatch_examples,
)

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))
import compose_workers  # noqa: E402

IMAGE = compose_workers.WorkerImage()
HOST = socket.gethostname()
DEAD_BROKER = "amqp://guest:guest@127.0.0.1:1//"


@pytest.fixture(scope="module")
def bin_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return IMAGE.install_commands(tmp_path_factory.mktemp("image-bin"))


def local_argv(argv: list[str], bin_dir: Path) -> list[str]:
    """An image command as run here: its scripts from ``bin_dir``, anything else from PATH."""
    name = Path(argv[0]).name
    if (bin_dir / name).exists():
        return [str(bin_dir / name), *argv[1:]]
    return list(argv)


def run_bounded(
    argv: list[str], env: Mapping[str, str], timeout: float, cwd: Path = ROOT
) -> tuple[int, str, float]:
    """Run to completion within ``timeout`` (else fail); its process group never outlives it."""
    started = time.monotonic()
    proc = subprocess.Popen(
        argv,
        env=dict(env),
        cwd=str(cwd),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"{argv} still running after {timeout}s (its --timeout):\n{out}")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return proc.returncode, out, time.monotonic() - started


def compose_environ(broker: str) -> dict[str, str]:
    """This environment with compose's ``BROKER_URL`` (.env / the shell) set to ``broker``."""
    env = dict(os.environ, BROKER_URL=broker)
    env.pop("CELERY_BROKER_URL", None)
    return env


class ImageWorker(WorkerProcess):
    """The image's ENTRYPOINT and CMD as a local process, started and stopped like the others."""

    def __init__(self, queue: str, worker_id: str, log_dir: Path, bin_dir: Path) -> None:
        super().__init__(queue, worker_id, ROOT, log_dir, broker=BROKER)
        self.env = IMAGE.environment(
            ROOT, bin_dir, {"QUEUE": queue, "WORKER_ID": worker_id, "BROKER_URL": BROKER}
        )

    def command(self) -> list[str]:
        return [*IMAGE.entrypoint, *IMAGE.cmd]  # found on the PATH of self.env, as in the image


@pytest.fixture
def image_worker(tmp_path: Path, bin_dir: Path) -> Iterator[ImageWorker]:
    tag = uuid.uuid4().hex[:8]
    worker = ImageWorker(f"cdtest-{tag}-image", f"bench-{tag}", tmp_path, bin_dir)
    try:
        worker.start()
        yield worker
    finally:
        worker.stop()
        delete_queues(worker.queue)


def test_image_worker_runs_its_command_and_its_healthcheck_tells_the_truth(image_worker):
    worker = image_worker
    timeout = IMAGE.healthcheck_timeout()
    node = f"{worker.worker_id}@{HOST}"

    def healthcheck(**env: str) -> tuple[int, str]:
        code, out, _ = run_bounded(IMAGE.healthcheck, {**worker.env, **env}, timeout)
        return code, out

    # The CMD, through the ENTRYPOINT, started the worker the environment describes.
    app = Celery("probe")
    app.conf.update(celery_config(BROKER, "rpc://"))
    try:
        answer = app.send_task("pytest_celery_dispatch.ping", queue=worker.queue).get(timeout=30)
    finally:
        app.close()
    assert answer["worker"] == worker.worker_id
    assert answer["hostname"] == node
    assert answer["queue"] == worker.queue
    assert answer["workspace"] == str(ROOT.resolve())

    code, out = healthcheck()
    assert code == 0, out
    assert f"healthy: {node} answers" in out
    assert "guest:guest" not in out

    code, out = healthcheck(QUEUE=f"{worker.queue}-other")
    assert code != 0, out
    assert "does not consume" in out

    # Frozen: the process exists and its consumer is still registered, but nothing answers.
    worker.signal(signal.SIGSTOP)
    try:
        code, out = healthcheck()
        assert worker.proc is not None
        assert worker.proc.poll() is None
        assert consumer_count(worker.queue) == 1
    finally:
        worker.signal(signal.SIGCONT)
    assert code != 0, out
    assert f"{node} did not answer" in out

    code, out = healthcheck()
    assert code == 0, out

    worker.stop()
    code, out = healthcheck()
    assert code != 0, out
    assert f"{node} did not answer" in out


def test_healthcheck_fails_within_its_timeout_when_the_broker_is_unreachable(bin_dir, tmp_path):
    env = IMAGE.environment(ROOT, bin_dir, {"BROKER_URL": DEAD_BROKER})
    code, out, elapsed = run_bounded(IMAGE.healthcheck, env, IMAGE.healthcheck_timeout())
    assert code != 0, out
    assert "unhealthy: cannot reach the broker amqp://guest:**@127.0.0.1:1//" in out
    assert elapsed < IMAGE.healthcheck_timeout()


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("no workspace", "is not a directory: unset it (runs ship their tree) or mount a checkout"),
        ("cache not a folder", "is not a directory and uid 0 cannot make it: mount a volume"),
        ("no WORKER_ID", "WORKER_ID is empty"),
        ("no QUEUE", "QUEUE is empty"),
    ],
)
def test_entrypoint_refuses_to_start_a_worker_that_cannot_work(bin_dir, tmp_path, case, message):
    overrides = {
        "BROKER_URL": DEAD_BROKER,  # had it started anyway, it would reach no broker
        "QUEUE": f"cdtest-{uuid.uuid4().hex[:8]}-refused",
        "WORKER_ID": "refused",
        "DISPATCH_WORKSPACE": str(ROOT),
        "DISPATCH_CACHE_DIR": str(tmp_path / "cache"),
    }
    if case == "no workspace":
        overrides["DISPATCH_WORKSPACE"] = str(tmp_path / "not-mounted")
    elif case == "cache not a folder":
        (tmp_path / "a-file").write_text("")
        overrides["DISPATCH_CACHE_DIR"] = str(tmp_path / "a-file")
        message = message.replace("uid 0", f"uid {os.getuid()}")
    elif case == "no WORKER_ID":
        overrides["WORKER_ID"] = ""
    else:
        overrides["QUEUE"] = ""
    env = IMAGE.environment(ROOT, bin_dir, overrides)
    code, out, _ = run_bounded([*IMAGE.entrypoint, *IMAGE.cmd], env, 10, cwd=tmp_path)
    assert code == 78, out  # EX_CONFIG, before any celery starts
    assert out.startswith("worker-entrypoint: "), out
    assert message in out


@pytest.mark.parametrize("unsigned", ["allow", ""])
def test_entrypoint_starts_a_worker_in_an_empty_workspace_and_says_what_it_takes(
    bin_dir, tmp_path, unsigned
):
    """No checkout mounted: each run ships its tree into the cache, which the entrypoint makes."""
    empty = tmp_path / "workspace"
    empty.mkdir()
    cache = tmp_path / "volume" / "cache"
    overrides = {
        "QUEUE": "queue_a",
        "WORKER_ID": "worker-a",
        "DISPATCH_WORKSPACE": str(empty),
        "DISPATCH_CACHE_DIR": str(cache),
        "DISPATCH_SHIP_UNSIGNED": unsigned,
    }
    env = IMAGE.environment(ROOT, bin_dir, overrides)
    # Any command with the word `worker` is checked as a worker's; this one only says it started.
    argv = [*IMAGE.entrypoint, "python", "-c", "print('started')", "worker"]
    code, out, _ = run_bounded(argv, env, 10, cwd=empty)
    assert code == 0, out
    assert out.splitlines()[-1] == "started", out
    assert f"no checkout in {empty}: each run ships its test tree into {cache}" in out
    if unsigned:
        assert "takes signed and unsigned runs (DISPATCH_SHIP_UNSIGNED=allow)" in out
    else:
        assert "takes runs signed by a key of DISPATCH_SHIP_TRUST" in out
    assert cache.is_dir()


def test_entrypoint_runs_other_commands_unchecked(bin_dir, tmp_path):
    env = IMAGE.environment(ROOT, bin_dir, {"DISPATCH_WORKSPACE": str(tmp_path / "none")})
    code, out, _ = run_bounded(
        [*IMAGE.entrypoint, "python", "-c", "print('a debugging shell')"], env, 10
    )
    assert code == 0, out
    assert out.strip() == "a debugging shell"


def test_compose_healthchecks_against_the_compose_workers(vhost_broker, bin_dir, tmp_path):
    compose = compose_workers.load()
    specs = compose_workers.worker_services(compose)
    env = compose_environ(vhost_broker)
    entrypoint = local_argv(IMAGE.entrypoint, bin_dir)  # the compose command behind the image's

    def healthcheck(service: compose_workers.LocalService) -> tuple[int, str]:
        check = specs[service.name]["healthcheck"]
        test = check["test"]
        argv = list(test[1:]) if test[0] == "CMD" else ["/bin/sh", "-c", test[-1]]
        timeout = compose_workers.duration_seconds(check["timeout"])
        check_env = {
            **service.env,
            "HOSTNAME": HOST,
            "PATH": os.pathsep.join([str(bin_dir), str(Path(sys.executable).parent), os.defpath]),
        }
        code, out, _ = run_bounded(argv, check_env, timeout)
        return code, out

    with compose_workers.running(environ=env, log_dir=tmp_path, entrypoint=entrypoint) as services:
        by_name = {s.name: s for s in services}
        assert sorted(by_name) == ["worker-a", "worker-b"]
        for name, service in by_name.items():
            code, out = healthcheck(service)
            assert code == 0, out
            queue = service.env["QUEUE"]
            assert f"healthy: {name}@{HOST} answers" in out
            assert out.rstrip().endswith(f"consumes {queue}")

        by_name["worker-b"].stop()
        code, out = healthcheck(by_name["worker-b"])
        assert code != 0, out
        assert f"worker-b@{HOST} did not answer" in out
        code, out = healthcheck(by_name["worker-a"])  # the other one's reply does not count
        assert code == 0, out


READ_ONLY_MOUNT = 'mount --bind "$1" "$2" && mount -o remount,bind,ro "$2" && cd "$2" && shift 2'


@pytest.fixture
def read_only_checkout(tmp_path: Path) -> list[str]:
    """A command prefix that runs its command with this checkout mounted read-only, as compose's
    ``./:/workspace:ro`` does, at another path (a private mount namespace: needs root)."""
    target = tmp_path / "workspace"
    target.mkdir()
    unshare = shutil.which("unshare")
    prefix = [
        *([unshare] if unshare else ["unshare"]),
        "--mount",
        "--propagation",
        "private",
        "sh",
        "-c",
        READ_ONLY_MOUNT + ' && exec "$@"',
        "sh",
        str(ROOT),
        str(target),
    ]
    probe = subprocess.run(
        [*prefix, "test", "-f", "pyproject.toml"],
        capture_output=True,
        text=True,
        timeout=10,
    )
    if unshare is None or probe.returncode != 0:
        pytest.skip(f"cannot mount the checkout read-only here (needs root, unshare): {probe}")
    return prefix


def test_examples_pass_on_compose_workers_with_a_read_only_workspace(
    vhost_broker, bin_dir, tmp_path, read_only_checkout
):
    workspace = Path(read_only_checkout[-1])  # empty out here, the checkout in the workers' view
    env = compose_environ(vhost_broker)
    entrypoint = [*read_only_checkout, *local_argv(IMAGE.entrypoint, bin_dir)]
    report = tmp_path / "report.json"
    with compose_workers.running(
        workspace=workspace, environ=env, log_dir=tmp_path, entrypoint=entrypoint
    ) as services:
        for service in services:
            assert service.env["DISPATCH_WORKSPACE"] == str(workspace)
            assert service.proc is not None
            mountinfo = Path(f"/proc/{service.proc.pid}/mountinfo").read_text().splitlines()
            options = [line.split()[5] for line in mountinfo if line.split()[4] == str(workspace)]
            assert options, mountinfo
            assert "ro" in options[-1].split(","), options  # the worker sees it read-only
        proc, tests = dispatch_examples(ROOT, vhost_broker, report)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    check_examples_passed(tests)
    for name in ("worker-a", "worker-b"):
        assert f"celery-dispatch: {name}: in place" in proc.stdout, proc.stdout  # zero-copy


def test_examples_pass_on_compose_workers_with_no_checkout(vhost_broker, bin_dir, tmp_path):
    """The compose file as it is: an empty workspace, each run's tree shipped into the cache
    volume (a folder here), unsigned runs taken as the compose file says."""
    empty = tmp_path / "workspace"
    empty.mkdir()
    env = compose_environ(vhost_broker)
    entrypoint = local_argv(IMAGE.entrypoint, bin_dir)
    report = tmp_path / "report.json"
    with compose_workers.running(
        workspace=empty, environ=env, log_dir=tmp_path, entrypoint=entrypoint
    ) as services:
        for service in services:
            assert service.env["DISPATCH_WORKSPACE"] == str(empty)
            assert service.env["DISPATCH_CACHE_DIR"] == str(service.volumes["/cache"])
            assert service.env["DISPATCH_SHIP_UNSIGNED"] == "allow"
        proc, tests = dispatch_examples(ROOT, vhost_broker, report)
        logs = {s.name: s.log_path.read_text() for s in services}
        caches = {s.name: s.volumes["/cache"] for s in services}
    assert proc.returncode == 0, proc.stdout + proc.stderr
    check_examples_passed(tests)
    assert list(empty.iterdir()) == []  # nothing written into the workspace
    ship = json.loads(report.read_text())["dispatch"]["ship"]
    for name in ("worker-a", "worker-b"):
        assert ship["workers"][name]["state"] == "shipped", ship
        assert f"celery-dispatch: {name}: {ship['files']:,} files, " in proc.stdout, proc.stdout
        assert "worker-entrypoint: no checkout in" in logs[name], logs[name][-2000:]
        trees = list((caches[name] / "trees").iterdir())
        assert any((tree / "example_tests" / "test_bench_a.py").is_file() for tree in trees)
