"""Run docker-compose.yml's worker services, and the worker image's commands, as local processes.

The command and environment are the compose file's own. Only what points into a container is
rewritten: ``host.docker.internal`` becomes 127.0.0.1 (or the host of ``BROKER_URL``), the
``/workspace`` mount becomes this checkout and a named volume (the cache) a local folder.
``${VAR:-default}`` is interpolated as compose does.
Used by ``make demo`` and by the tests, so a wrong compose command fails there.

:class:`WorkerImage` reads workers/Dockerfile (ENV, COPY, ENTRYPOINT, CMD, HEALTHCHECK) so the
tests can run the image's own entrypoint, command and healthcheck here, without a Docker engine:
the scripts the image COPYs onto its PATH are put in a local bin directory, and its environment
is the Dockerfile's ENV with the same rewrites as above.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path, PurePosixPath

import yaml
from kombu import Connection

ROOT = Path(__file__).resolve().parents[1]
COMPOSE_FILE = ROOT / "docker-compose.yml"
#: The override that mounts this checkout as the workers' workspace (run in place, zero-copy).
CHECKOUT_FILE = ROOT / "workers" / "compose.checkout.yml"
DOCKERFILE = ROOT / "workers" / "Dockerfile"
CONTAINER_WORKSPACE = "/workspace"
_VAR = re.compile(r"\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?::-(?P<default>[^}]*))?\}")


def interpolate(text: str, environ: Mapping[str, str]) -> str:
    def sub(match: re.Match[str]) -> str:
        value = environ.get(match.group("name"))
        return value if value else (match.group("default") or "")

    return _VAR.sub(sub, text).replace("$$", "$")


def load(path: Path = COMPOSE_FILE, *overrides: Path) -> dict:
    """The compose file, with ``overrides`` merged as ``docker compose -f a -f b`` merges them:
    a service's ``volumes`` by their target, its other keys replaced."""
    compose = yaml.safe_load(path.read_text())
    for override in overrides:
        for name, spec in (yaml.safe_load(override.read_text()).get("services") or {}).items():
            service = compose["services"].setdefault(name, {})
            for key, value in spec.items():
                if key == "volumes":
                    by_target = {volume_parts(v)[1]: v for v in service.get("volumes") or []}
                    by_target.update({volume_parts(v)[1]: v for v in value})
                    service["volumes"] = list(by_target.values())
                else:
                    service[key] = value
    return compose


def volume_parts(volume: str | Mapping) -> tuple[str, str, bool]:
    """(source, target, read_only) of a service's volume, short or long syntax."""
    if isinstance(volume, str):
        source, target, *mode = volume.split(":")
        return source, target, bool(mode) and "ro" in mode[0].split(",")
    return str(volume["source"]), str(volume["target"]), bool(volume.get("read_only"))


def is_named(source: str) -> bool:
    """Whether a volume's source is a named volume (not a path of the host)."""
    return not source.startswith((".", "/", "~"))


def named_volumes(spec: Mapping) -> dict[str, str]:
    """A service's named volumes: target in the container -> volume name."""
    found = {}
    for volume in spec.get("volumes") or []:
        source, target, _ = volume_parts(volume)
        if is_named(source):
            found[target] = source
    return found


def localize(value: str, workspace: Path, mounts: Mapping[str, Path] | None = None) -> str:
    """A container's value as seen from here: the host is 127.0.0.1, /workspace the checkout,
    the target of a volume in ``mounts`` its local folder."""
    text = value.replace("host.docker.internal", "127.0.0.1")
    for inside, outside in {CONTAINER_WORKSPACE: workspace, **(mounts or {})}.items():
        if text == inside or text.startswith(inside + "/"):
            return str(outside) + text[len(inside) :]
    return text


def duration_seconds(text: str | int | float) -> float:
    """A Docker / compose duration (``30s``, ``1m30s``, ``500ms``) in seconds."""
    if isinstance(text, int | float):
        return float(text)
    units = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001, "us": 1e-6}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|us|h|m|s)", text)
    if not parts or "".join(n + u for n, u in parts) != text:
        raise ValueError(f"not a duration: {text!r}")
    return sum(float(n) * units[u] for n, u in parts)


class LocalService:
    """One compose worker service as a local process."""

    def __init__(
        self,
        name: str,
        spec: Mapping,
        workspace: Path = ROOT,
        environ: Mapping[str, str] | None = None,
        log_dir: Path | None = None,
        entrypoint: Sequence[str] = (),
    ) -> None:
        env_in = dict(os.environ if environ is None else environ)
        self.name = name
        command = spec["command"]
        argv = shlex.split(command) if isinstance(command, str) else list(command)
        argv = [interpolate(a, env_in) for a in argv]
        if argv[0] == "celery":  # the venv's celery, whatever is on PATH
            argv = [sys.executable, "-m", "celery", *argv[1:]]
        # The image's ENTRYPOINT (a local copy: WorkerImage) runs the command, as in a container.
        self.argv = [*entrypoint, *argv]
        env = dict(env_in)
        # A named volume is a folder of its own here (``<log_dir>/volumes/<name>``).
        volume_root = (log_dir or Path(tempfile.gettempdir())) / "volumes"
        self.volumes = {t: volume_root / n for t, n in named_volumes(spec).items()}
        for key, value in (spec.get("environment") or {}).items():
            env[key] = localize(interpolate(str(value), env_in), workspace, self.volumes)
        env.setdefault("PYTHONUNBUFFERED", "1")
        self.env = env
        self.workspace = workspace
        self.queues = self._queues()
        self.log_path = (log_dir or workspace) / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def display_command(self) -> str:
        """The command as the compose file writes it (``celery ...``)."""
        argv = self.argv
        if argv[1:3] == ["-m", "celery"]:
            argv = ["celery", *argv[3:]]
        return shlex.join(argv)

    def _queues(self) -> list[str]:
        argv = self.argv
        for flag in ("-Q", "--queues"):
            if flag in argv:
                return argv[argv.index(flag) + 1].split(",")
        return ["celery"]

    @property
    def broker(self) -> str:
        return self.env.get("CELERY_BROKER_URL") or self.env.get("BROKER_URL") or ""

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        for folder in self.volumes.values():
            folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                self.argv,
                env=self.env,
                cwd=str(self.workspace),
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def consumers(self) -> int:
        total = 0
        with Connection(self.broker, connect_timeout=3) as conn:
            for queue in self.queues:
                with contextlib.suppress(Exception):
                    total += conn.channel().queue_declare(queue=queue, passive=True).consumer_count
        return total

    def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while self.consumers() < len(self.queues):
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(
                    f"{self.name} exited with {self.proc.returncode}; see {self.log_path}:\n"
                    + self.log_path.read_text()[-2000:]
                )
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name} did not consume {self.queues} within {timeout}s")
            time.sleep(0.1)

    def stop(self, timeout: float = 15.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(5)


def worker_services(compose: Mapping) -> dict[str, Mapping]:
    """Services that run our worker and are on by default (no profile)."""
    return {
        name: spec
        for name, spec in compose["services"].items()
        if not spec.get("profiles") and "pytest_celery_dispatch.worker" in str(spec.get("command"))
    }


@contextlib.contextmanager
def running(
    names: list[str] | None = None,
    workspace: Path = ROOT,
    environ: Mapping[str, str] | None = None,
    log_dir: Path | None = None,
    timeout: float = 30.0,
    entrypoint: Sequence[str] = (),
) -> Iterator[list[LocalService]]:
    services = worker_services(load())
    chosen = names or sorted(services)
    started = [
        LocalService(n, services[n], workspace, environ, log_dir, entrypoint) for n in chosen
    ]
    try:
        for service in started:
            service.start()
        for service in started:
            service.wait_ready(timeout)
        yield started
    finally:
        for service in started:
            service.stop()


# ---------------------------------------------------------------------------- the worker image

_SHELL_VAR = re.compile(
    r"\$(?:\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)(?::-(?P<default>[^}]*))?\}"
    r"|(?P<bare>[A-Za-z_][A-Za-z0-9_]*))"
)


def _expand(text: str, variables: Mapping[str, str]) -> str:
    """Dockerfile variable substitution: ``$NAME``, ``${NAME}``, ``${NAME:-default}``."""

    def sub(match: re.Match[str]) -> str:
        name = match.group("braced") or match.group("bare")
        value = variables.get(name, "")
        return value if value else (match.group("default") or "")

    return _SHELL_VAR.sub(sub, text)


@dataclasses.dataclass(frozen=True)
class Instruction:
    keyword: str  # upper case: FROM, ENV, COPY ...
    args: str  # continuation lines joined with a space
    line: int  # where the instruction starts, 1-based


def dockerfile_instructions(path: Path = DOCKERFILE) -> list[Instruction]:
    """The instructions of a Dockerfile, continuation lines joined, comments dropped."""
    found: list[Instruction] = []
    parts: list[str] = []
    start = 0
    for number, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue  # comments (and parser directives) end no instruction
        if not parts:
            start = number
        if line.endswith("\\"):
            parts.append(line[:-1].strip())
            continue
        parts.append(line)
        keyword, _, args = " ".join(p for p in parts if p).partition(" ")
        found.append(Instruction(keyword.upper(), args.strip(), start))
        parts = []
    if parts:
        raise ValueError(f"{path}:{start}: the last instruction ends with a line continuation")
    return found


def command_argv(args: str) -> list[str]:
    """CMD / ENTRYPOINT / HEALTHCHECK CMD arguments: exec (JSON) form, or shell form."""
    if args.startswith("["):
        argv = json.loads(args)
        if not isinstance(argv, list) or not all(isinstance(a, str) for a in argv):
            raise ValueError(f"not a JSON list of strings: {args}")
        return argv
    return ["/bin/sh", "-c", args]


class WorkerImage:
    """What workers/Dockerfile puts in the image, read from its text (no engine needed)."""

    def __init__(
        self,
        path: Path = DOCKERFILE,
        context: Path = ROOT,
        build_args: Mapping[str, str] | None = None,
    ) -> None:
        self.path = path
        self.context = context
        self.instructions = dockerfile_instructions(path)
        self.base = ""
        self.args: dict[str, str] = {}
        self.env: dict[str, str] = {}
        self.user = ""
        self.workdir = "/"
        self.copies: dict[str, Path] = {}  # path in the image -> path in the build context
        self.entrypoint: list[str] = []
        self.cmd: list[str] = []
        self.healthcheck: list[str] = []
        self.healthcheck_options: dict[str, str] = {}
        overrides = dict(build_args or {})
        for ins in self.instructions:
            variables = {**self.args, **self.env}
            if ins.keyword == "FROM":
                self.base = ins.args
            elif ins.keyword == "ARG":
                name, has_default, default = ins.args.partition("=")
                value = _expand(default, variables) if has_default else ""
                self.args[name] = overrides.get(name, value)
            elif ins.keyword == "ENV":
                self.env.update(self._env_pairs(ins.args, variables))
            elif ins.keyword == "WORKDIR":
                workdir = _expand(ins.args, variables)
                self.workdir = str(PurePosixPath(self.workdir) / workdir)
            elif ins.keyword == "USER":
                self.user = _expand(ins.args, variables)
            elif ins.keyword in ("COPY", "ADD"):
                self._copy(ins, variables)
            elif ins.keyword == "ENTRYPOINT":
                self.entrypoint = command_argv(ins.args)
                self.cmd = []  # Docker resets CMD when ENTRYPOINT is set after it
            elif ins.keyword == "CMD":
                self.cmd = command_argv(ins.args)
            elif ins.keyword == "HEALTHCHECK":
                self._healthcheck(ins.args)

    @staticmethod
    def _env_pairs(args: str, variables: Mapping[str, str]) -> dict[str, str]:
        words = shlex.split(args)
        if words and "=" not in words[0]:  # legacy form: ENV NAME value with spaces
            return {words[0]: _expand(" ".join(words[1:]), variables)}
        pairs = {}
        for word in words:
            name, _, value = word.partition("=")
            pairs[name] = _expand(value, variables)  # values from before this instruction
        return pairs

    def _copy(self, ins: Instruction, variables: Mapping[str, str]) -> None:
        words = [w for w in shlex.split(ins.args) if not w.startswith("--")]
        *sources, dest = (_expand(w, variables) for w in words)
        target = PurePosixPath(self.workdir) / dest
        for source in sources:
            local = self.context / source
            into_dir = dest.endswith("/") or len(sources) > 1 or local.is_dir()
            if local.is_dir():
                self.copies[str(target)] = local
            else:
                self.copies[str(target / local.name if into_dir else target)] = local

    def _healthcheck(self, args: str) -> None:
        words = args.split()
        while words and words[0].startswith("--"):
            name, _, value = words.pop(0)[2:].partition("=")
            self.healthcheck_options[name] = value
        if not words or words[0].upper() != "CMD":
            raise ValueError(f"HEALTHCHECK without CMD: {args}")
        self.healthcheck = command_argv(args.split("CMD", 1)[1].strip())

    def healthcheck_timeout(self) -> float:
        return duration_seconds(self.healthcheck_options.get("timeout", "30s"))

    def local_path(self, image_path: str) -> Path:
        """The build-context file that the image has at ``image_path``."""
        for target, local in self.copies.items():
            if image_path == target:
                return local
            if local.is_dir() and image_path.startswith(target + "/"):
                return local / image_path[len(target) + 1 :]
        raise KeyError(f"{image_path} is not COPYed into the image by {self.path}")

    def install_commands(self, bin_dir: Path) -> Path:
        """Put the scripts the image COPYs onto its PATH into ``bin_dir``, executable."""
        image_path = self.env.get("PATH", "/usr/local/bin:/usr/bin:/bin").split(":")
        bin_dir.mkdir(parents=True, exist_ok=True)
        for target, local in self.copies.items():
            if str(PurePosixPath(target).parent) in image_path and local.is_file():
                shutil.copyfile(local, bin_dir / PurePosixPath(target).name)
                (bin_dir / PurePosixPath(target).name).chmod(0o755)
        return bin_dir

    def environment(
        self,
        workspace: Path,
        bin_dir: Path,
        overrides: Mapping[str, str] | None = None,
    ) -> dict[str, str]:
        """The container's environment, here: the Dockerfile's ENV (localized) and ``overrides``.

        Nothing of this process's environment leaks in but HOME and the locale; PATH is
        ``bin_dir`` (the image's scripts), then this interpreter's directory, then the system's.
        The image's cache folder (``DISPATCH_CACHE_DIR``) is ``cache`` beside ``bin_dir``.
        """
        cache = self.env.get("DISPATCH_CACHE_DIR")
        mounts = {cache: bin_dir.parent / "cache"} if cache else {}
        env = {k: v for k, v in os.environ.items() if k in ("HOME", "LANG", "LC_ALL", "TMPDIR")}
        env["HOSTNAME"] = socket.gethostname()  # Docker sets it to the container's host name
        env.update({k: localize(v, workspace, mounts) for k, v in self.env.items()})
        env.update(overrides or {})
        env["PATH"] = os.pathsep.join(
            [str(bin_dir), str(Path(sys.executable).parent), os.defpath.lstrip(os.pathsep)]
        )
        return env
