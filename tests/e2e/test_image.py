"""The worker image, built from workers/Dockerfile and run, without a Docker engine.

scripts/worker_image.py builds the image as ``docker compose build`` does (the compose file's
own context, Dockerfile and tag) with buildah, on a stand-in for ``python:3.11-slim`` made once
from Debian's packages and cached in buildah's storage; then starts worker-a and worker-b as
``docker compose up`` would: the image's ENTRYPOINT and USER, the compose file's command,
environment, hostname and read-only ``./:/workspace`` mount, ``host.docker.internal`` being
this machine (chroot isolation shares its network). The broker is a private vhost, given as
compose's ``BROKER_URL``, so the real queue_a / queue_b of other runs are not touched.

On a machine with Docker the same check is
``docker compose build && docker compose up -d && pytest --celery-dispatch example_tests``.
Run alone: ``make image-test``. The first run on a machine also builds the base (2-4 minutes).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from kombu.utils.url import maybe_sanitize_url

from tests.helpers import check_examples_passed, consumer_count, dispatch_examples

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))
import compose_workers  # noqa: E402
import worker_image  # noqa: E402

UID = 10001  # the Dockerfile's USER, the contract of docs/workers.md
READY_TIMEOUT = 60.0


@pytest.fixture(scope="module")
def image() -> dict:
    """The worker image, built now from this checkout (the base only when not cached)."""
    if os.geteuid() != 0:
        pytest.skip("building and running the image with buildah needs root: sudo make image-test")
    missing = worker_image.install_tools()
    if missing:
        pytest.skip(
            f"{', '.join(missing)} not installed: {worker_image.INSTALL_HINT}, then make image-test"
        )
    try:
        return worker_image.build_image()
    except RuntimeError as exc:
        pytest.fail(str(exc), pytrace=False)


Bench = dict[str, worker_image.Container]


@pytest.fixture
def start_bench(image: dict, vhost_broker: str, tmp_path: Path) -> Iterator[Callable[..., Bench]]:
    """Starts worker-a and worker-b in containers of the image, on a private vhost, from the
    compose file with ``overrides`` (``-f`` files) merged; every one stopped after."""
    environ = {"BROKER_URL": vhost_broker}  # what compose interpolates (.env / the shell)
    started: list[worker_image.Container] = []

    def start(*overrides: Path) -> Bench:
        compose = compose_workers.load(compose_workers.COMPOSE_FILE, *overrides)
        services = compose_workers.worker_services(compose)
        containers = {
            name: worker_image.Container(name, spec, image, environ, tmp_path)
            for name, spec in sorted(services.items())
        }
        started.extend(containers.values())
        for container in containers.values():
            container.start()
        for container in containers.values():
            wait_consuming(container, vhost_broker)
        return containers

    try:
        yield start
    finally:
        left = {c.name: c.stop() for c in started}
        assert not any(left.values()), f"processes left after stopping: {left}"


def wait_consuming(container: worker_image.Container, broker: str) -> None:
    """Until the container's worker consumes its queue on ``broker``; fail fast otherwise.

    A worker that announces another broker (Celery's banner, printed before it connects) is
    killed at once: on the shared ``/`` vhost it would take other runs' queue_a / queue_b work.
    """
    queue = container.env["QUEUE"]
    wanted = maybe_sanitize_url(broker)
    deadline = time.monotonic() + READY_TIMEOUT
    while consumer_count(queue, broker) < 1:
        banner = re.search(r"\.> transport:\s+(\S+)", container.log_text())
        problem = ""
        if banner and banner.group(1) != wanted:
            problem = f"uses the broker {banner.group(1)}, not compose's {wanted}"
        elif not container.running():
            problem = "exited"
        elif time.monotonic() > deadline:
            problem = f"does not consume {queue} on {wanted} after {READY_TIMEOUT}s"
        if problem:
            container.stop(grace=0)
            pytest.fail(
                f"{container.name} {problem}:\n{container.log_text()[-4000:]}", pytrace=False
            )
        time.sleep(0.1)


def test_the_image_is_the_dockerfiles(image):
    assert image["User"] == f"{UID}:{UID}"
    assert image["Entrypoint"] == ["worker-entrypoint"]
    assert image["WorkingDir"] == "/workspace"
    assert image["Healthcheck"]["Test"] == ["CMD", "worker-healthcheck"]  # kept: Docker's format
    env = dict(e.split("=", 1) for e in image["Env"])
    assert env["DISPATCH_WORKSPACE"] == "/workspace"
    assert env["DISPATCH_CACHE_DIR"] == "/cache"
    assert env["DISPATCH_LOG_FORMAT"] == "json"


def check_started(bench: Bench) -> None:
    """Each worker runs as the image's user, is ready under its node name and logs JSON."""
    for name, container in bench.items():
        assert container.uids() == {UID}, f"{name} runs as {container.uids()}"
        log = container.log_text()
        # Celery logs "ready." just after it starts consuming (what wait_consuming waited for).
        ready = f"{name}@{container.hostname} ready."
        deadline = time.monotonic() + READY_TIMEOUT
        while ready not in log and time.monotonic() < deadline and container.running():
            time.sleep(0.1)
            log = container.log_text()
        assert ready in log, log[-3000:]
        records = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
        assert records, f"no JSON log lines from {name}:\n{log[-3000:]}"


def run_examples(bench: Bench, broker: str, report: Path) -> tuple[str, dict]:
    """The examples dispatched from this checkout: all passed, each on its worker; the output
    and the JSON report's ``dispatch.ship``."""
    proc, tests = dispatch_examples(ROOT, broker, report)
    logs = "\n".join(c.log_text()[-2000:] for c in bench.values())
    assert proc.returncode == 0, proc.stdout + proc.stderr + logs
    check_examples_passed(tests)
    return proc.stdout, json.loads(report.read_text())["dispatch"]["ship"]


def check_healthy_and_stop(bench: Bench) -> None:
    for name, container in bench.items():
        # The image's own HEALTHCHECK, in the container, beside the worker.
        code, out = container.healthcheck()
        assert code == 0, out
        assert f"healthy: {name}@{container.hostname} answers" in out, out
        assert out.rstrip().endswith(f"consumes {container.env['QUEUE']}"), out
    for name, container in bench.items():
        left = container.stop()
        assert left == [], f"{name}: processes left after stopping: {left}"
        assert container.container not in worker_image.working_containers()


def test_examples_pass_on_image_workers_without_a_checkout(start_bench, vhost_broker, tmp_path):
    """docker-compose.yml as it is: no checkout in the containers, each run's tree shipped into
    the worker's cache volume."""
    bench = start_bench()
    check_started(bench)
    for container in bench.values():
        assert [v.split(":")[1] for v in container.volumes] == ["/cache"], container.volumes
        assert (
            "no checkout in /workspace: each run ships its test tree into /cache; takes signed "
            "and unsigned runs (DISPATCH_SHIP_UNSIGNED=allow)"
        ) in container.log_text()
        # The workspace is empty; the new volume has the image's /cache owner and mode.
        code, out = container.exec(["sh", "-c", "ls -A /workspace; stat -c %u:%a /cache"], 30)
        assert (code, out.split()) == (0, [f"{UID}:700"]), out

    out, ship = run_examples(bench, vhost_broker, tmp_path / "first.json")
    for name, container in bench.items():
        assert ship["workers"][name]["state"] == "shipped", ship
        assert f"celery-dispatch: {name}: {ship['files']:,} files, " in out, out
        # The tree is in the service's volume, owned by the image's user.
        trees = [t for t in (container.named["/cache"] / "trees").iterdir() if t.is_dir()]
        assert [t.name for t in trees] == [ship["digest"]], trees
        assert (trees[0] / "example_tests" / "test_bench_a.py").is_file()
        assert (container.named["/cache"] / "blobs").stat().st_uid == UID
    assert ship["blobs_sent"] > 0

    # Run again: the volume kept the tree, nothing is sent.
    out, ship = run_examples(bench, vhost_broker, tmp_path / "again.json")
    assert ship["blobs_sent"] == 0, ship
    for name in bench:
        assert ship["workers"][name]["state"] == "up to date", ship
        assert f"celery-dispatch: {name}: up to date" in out, out
    check_healthy_and_stop(bench)


@pytest.fixture
def enterable_checkout() -> Iterator[None]:
    """As with Docker, the image's user (uid 10001) must be able to enter the mounted checkout
    (docs/workers.md). A clone in a ``0700`` folder (``mktemp -d``) is not: the folders on the
    way get ``o+x`` (enter, not list), the checkout itself ``o+rx``, for the test, and their
    modes back after it."""
    wanted = {ROOT: 0o005, **{p: 0o001 for p in ROOT.parents}}
    modes = {p: p.stat().st_mode & 0o7777 for p, bits in wanted.items()}
    modes = {p: mode for p, mode in modes.items() if mode & wanted[p] != wanted[p]}
    for path, mode in modes.items():
        path.chmod(mode | wanted[path])
    try:
        yield
    finally:
        for path, mode in modes.items():
            path.chmod(mode)


def test_examples_run_in_place_on_image_workers_with_the_checkout_mounted(
    enterable_checkout, start_bench, vhost_broker, tmp_path
):
    """With workers/compose.checkout.yml: this checkout read-only as /workspace, zero-copy."""
    bench = start_bench(compose_workers.CHECKOUT_FILE)
    check_started(bench)
    out, ship = run_examples(bench, vhost_broker, tmp_path / "report.json")
    assert ship["blobs_sent"] == 0, ship
    for name, container in bench.items():
        assert ship["workers"][name]["state"] == "in place", ship
        assert f"celery-dispatch: {name}: in place" in out, out
        assert "no checkout in" not in container.log_text()
        # The image's user, and the override's ./:/workspace:ro.
        code, text = container.exec(["sh", "-c", "id -u; touch /workspace/.image-test"], 30)
        assert text.splitlines()[0] == str(UID), text
        assert code != 0, text
        assert "Read-only file system" in text, text
        assert not (ROOT / ".image-test").exists()
    check_healthy_and_stop(bench)


def test_the_entrypoint_gives_celery_broker_url_precedence(tmp_path):
    """The celery command prefers BROKER_URL (its --broker), which the image sets to its default;
    compose sets CELERY_BROKER_URL. The entrypoint makes the latter win, as in the healthcheck."""
    image = compose_workers.WorkerImage()
    bin_dir = image.install_commands(tmp_path / "bin")
    show = [*image.entrypoint, "sh", "-c", 'echo "$BROKER_URL"']
    env = image.environment(ROOT, bin_dir, {"CELERY_BROKER_URL": "amqp://compose//"})
    out = subprocess.run(show, env=env, capture_output=True, text=True, timeout=10).stdout
    assert out.strip() == "amqp://compose//"
    env = image.environment(ROOT, bin_dir, {"BROKER_URL": "amqp://given//"})
    out = subprocess.run(show, env=env, capture_output=True, text=True, timeout=10).stdout
    assert out.strip() == "amqp://given//"
