"""Build workers/Dockerfile for real and run its containers here, with buildah and no Docker engine.

What ``docker compose build`` and ``docker compose up`` do for the worker services, on a machine
without a Docker engine (and where ``podman run`` cannot start containers):

* **the base image**: a stand-in for the Dockerfile's ``FROM python:3.11-slim``, made once from
  Debian's packages (``debootstrap --variant=minbase`` of the release whose python3 is 3.11, with
  ``/usr/local/bin/python3``, ``python`` and ``pip`` as in the real image) and kept in buildah's
  storage under the real name. It is built only when missing (or when its recipe changed);
  a real ``python:3.11-slim`` already in the storage is used as it is.
* **the image**: ``buildah bud`` of the compose file's own ``build`` (context, dockerfile,
  args), tagged with its ``image`` name, in Docker's format (which keeps ``HEALTHCHECK``).
* **the containers**: one working container per compose worker service, run with chroot
  isolation (the host's network, so compose's ``extra_hosts`` ``host-gateway`` is 127.0.0.1),
  the service's ``hostname``, ``environment`` (interpolated as compose does), ``volumes`` (a
  named volume is a new folder under the log folder with the owner, mode and files of the
  image's folder it is mounted on, as Docker fills a new volume) and ``command`` behind the
  image's own ENTRYPOINT, as the image's USER. Stopping one stops every
  process it started (SIGTERM, then SIGKILL) and removes the working container.

Not emulated: ``init: true`` (no PID namespace: the worker's processes are the host's),
``restart`` and the healthcheck's schedule (run :meth:`Container.healthcheck` to check).

Command line (``make image`` runs ``build``)::

    python scripts/worker_image.py tools   # install buildah and debootstrap when missing (root)
    python scripts/worker_image.py base    # the stand-in base image, unless present
    python scripts/worker_image.py build   # base, then the worker image as compose builds it
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import compose_workers

ROOT = compose_workers.ROOT
TOOLS = ("buildah", "debootstrap")
INSTALL_HINT = "apt-get install -y buildah debootstrap (Debian/Ubuntu, as root)"
#: Serializes base and image builds of every checkout on this machine (one buildah storage).
LOCK = Path("/var/tmp/pytest-celery-dispatch-image.lock")
#: Marks the base image as our stand-in; its value is the recipe's digest.
STAND_IN_LABEL = "org.pytest-celery-dispatch.stand-in"
#: The Debian release whose python3 is the version of the ``python:X.Y-slim`` tag.
DEBIAN_RELEASE = {"3.11": "bookworm"}
PACKAGES = ("python3", "python3-pip", "python3-venv", "passwd", "procps")
CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
ISOLATION = ("--isolation", "chroot")
PIP_URL_KEYS = ("index-url", "extra-index-url", "trusted-host")


def log(message: str) -> None:
    print(f"worker-image: {message}", file=sys.stderr, flush=True)


def missing_tools() -> list[str]:
    return [tool for tool in TOOLS if shutil.which(tool) is None]


def install_tools() -> list[str]:
    """apt-get install buildah and debootstrap when missing (as root); what is still missing."""
    missing = missing_tools()
    if not missing or os.geteuid() != 0 or shutil.which("apt-get") is None:
        return missing
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    install = ["apt-get", "install", "-y", "-q", *missing]
    log(f"installing {' '.join(missing)} with apt-get")
    if subprocess.run(install, env=env, capture_output=True).returncode != 0:
        subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True)
        subprocess.run(install, env=env, capture_output=True)
    return missing_tools()


def buildah(*args: str, check: bool = True, timeout: float = 600) -> str:
    proc = subprocess.run(
        ["buildah", *args], capture_output=True, text=True, timeout=timeout, check=False
    )
    if check and proc.returncode != 0:
        raise RuntimeError(f"buildah {shlex.join(args)} failed ({proc.returncode}):\n{proc.stderr}")
    return proc.stdout.strip()


@contextlib.contextmanager
def storage_lock() -> Iterator[None]:
    """One build at a time on this machine: parallel runs share buildah's storage and tags."""
    with open(LOCK, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def image_config(name: str) -> dict[str, Any] | None:
    """The Docker config of an image in the storage (``Env``, ``User``, ``Entrypoint`` ...)."""
    out = buildah("inspect", "--type", "image", name, check=False)
    if not out:
        return None
    info = json.loads(out)
    config = (info.get("Docker") or {}).get("config") or {}
    return dict(config, Id=info.get("FromImageID", ""))


def qualified(name: str) -> str:
    """A short image name as Docker reads it: ``python:3.11-slim`` is Docker Hub's library one."""
    first = name.split("/", 1)[0]
    if "/" in name and ("." in first or ":" in first or first == "localhost"):
        return name
    return f"docker.io/{name if '/' in name else 'library/' + name}"


# ---------------------------------------------------------------------------- the base image


def debian_mirror() -> str:
    """The Debian mirror apt already uses here (deb822 ``.sources`` or ``sources.list``)."""
    texts = [p.read_text() for p in sorted(Path("/etc/apt/sources.list.d").glob("*.sources"))]
    for text in texts:
        for stanza in re.split(r"\n\s*\n", text):
            fields = dict(re.findall(r"^([A-Za-z-]+):\s*(.+)$", stanza, re.M))
            suites = fields.get("Suites", "").split()
            if "deb" in fields.get("Types", "").split() and any("-" not in s for s in suites):
                return str(fields.get("URIs", "").split()[0])
    sources = Path("/etc/apt/sources.list")
    if sources.exists():
        for line in sources.read_text().splitlines():
            words = [w for w in line.split() if not w.startswith("[")]
            if len(words) >= 3 and words[0] == "deb" and "-" not in words[2]:
                return words[1]
    return "http://deb.debian.org/debian"


def pip_settings() -> dict[str, str]:
    """This machine's pip index settings that a build can use too (http(s) URLs, not files)."""
    settings: dict[str, str] = {}
    out = subprocess.run(
        [sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True
    ).stdout
    for line in out.splitlines():
        key, _, value = line.partition("=")
        name = key.rsplit(".", 1)[-1]
        if name in PIP_URL_KEYS:
            settings[name] = value.strip().strip("'\"")
    for name in PIP_URL_KEYS:
        env = os.environ.get("PIP_" + name.upper().replace("-", "_"))
        if env:
            settings[name] = env
    kept = {}
    for name, value in settings.items():
        words = [w for w in value.split() if name == "trusted-host" or w.startswith("http")]
        if words:
            kept[name] = " ".join(words)
    return kept


def pip_conf() -> str:
    lines = ["[global]", f"cert = {CA_BUNDLE}"]
    lines += [f"{name} = {value}" for name, value in sorted(pip_settings().items())]
    return "\n".join(lines) + "\n"


def base_recipe(base: str) -> tuple[str, str, str]:
    """(Debian release, mirror, recipe digest) of the stand-in for ``base``."""
    match = re.fullmatch(r"(?:docker\.io/library/)?python:(\d+\.\d+)-slim", base)
    if not match or match.group(1) not in DEBIAN_RELEASE:
        known = ", ".join(f"python:{v}-slim" for v in DEBIAN_RELEASE)
        raise RuntimeError(f"no stand-in recipe for FROM {base} (known: {known})")
    release = DEBIAN_RELEASE[match.group(1)]
    mirror = debian_mirror()
    recipe = json.dumps([release, PACKAGES, pip_conf(), Path(__file__).name, 1])
    return release, mirror, hashlib.sha256(recipe.encode()).hexdigest()[:16]


def ensure_base(base: str, rebuild: bool = False) -> tuple[str, bool]:
    """The base image ``base``: (its name, whether it was built now). Call under storage_lock."""
    name = qualified(base)
    release, mirror, digest = base_recipe(name)
    config = image_config(name)
    if config is not None and not rebuild:
        label = (config.get("Labels") or {}).get(STAND_IN_LABEL)
        if label is None or label == digest:
            return name, False  # a real image, or our stand-in of this recipe
        log(f"{name} is a stand-in of another recipe ({label}): building it again")
    log(f"building a stand-in for {name}: debootstrap {release} from {mirror} (about 2 minutes)")
    container = buildah("from", "--name", f"stand-in-{uuid.uuid4().hex[:8]}", "scratch")
    try:
        rootfs = Path(buildah("mount", container))
        subprocess.run(
            [
                "debootstrap",
                "--variant=minbase",
                f"--include={','.join(PACKAGES)}",
                release,
                str(rootfs),
                mirror,
            ],
            check=True,
            capture_output=True,
            timeout=1800,
        )
        for link in ("python3", "python"):
            (rootfs / "usr/local/bin" / link).symlink_to("/usr/bin/python3")
        (rootfs / "usr/local/bin/pip").symlink_to("/usr/bin/pip3")
        for marker in rootfs.glob("usr/lib/python3*/EXTERNALLY-MANAGED"):
            marker.unlink()  # as in the real image: pip installs into the system's Python
        shutil.copyfile(CA_BUNDLE, rootfs / "etc/ssl/certs/ca-certificates.crt")
        (rootfs / "etc/pip.conf").write_text(pip_conf())
        for cache in ("var/cache/apt/archives", "var/lib/apt/lists"):
            for entry in (rootfs / cache).glob("*"):
                if entry.is_file():
                    entry.unlink()
        buildah("umount", container)
        buildah(
            "config",
            "--env",
            "PATH=/usr/local/bin:/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin",
            "--env",
            "LANG=C.UTF-8",
            "--cmd",
            '["python3"]',
            "--label",
            f"{STAND_IN_LABEL}={digest}",
            container,
        )
        buildah("commit", "--format", "docker", "--rm", "-q", container, name)
    except BaseException:
        buildah("rm", container, check=False)
        raise
    return name, True


# ---------------------------------------------------------------------------- the worker image


def compose_build(compose: Mapping[str, Any]) -> dict[str, object]:
    """The one ``build`` and ``image`` the compose worker services share."""
    services = compose_workers.worker_services(compose)
    builds = {
        json.dumps([s.get("build"), s.get("image")], sort_keys=True) for s in services.values()
    }
    if len(builds) != 1:
        raise RuntimeError(f"the worker services do not share one build and image: {builds}")
    spec = next(iter(services.values()))
    build = spec["build"]
    if isinstance(build, str):
        build = {"context": build}
    context = (compose_workers.COMPOSE_FILE.parent / build.get("context", ".")).resolve()
    args = build.get("args") or {}
    if isinstance(args, list):
        args = dict(a.split("=", 1) for a in args)
    return {
        "context": context,
        "dockerfile": context / build.get("dockerfile", "Dockerfile"),
        "args": {k: str(v) for k, v in args.items()},
        "image": spec.get("image") or f"{ROOT.name}-worker",
    }


def build_image(
    compose: Mapping[str, Any] | None = None, rebuild_base: bool = False
) -> dict[str, Any]:
    """``docker compose build`` of the worker services; the built image's config (with Id)."""
    build = compose_build(compose or compose_workers.load())
    dockerfile = Path(str(build["dockerfile"]))
    base = compose_workers.WorkerImage(dockerfile, Path(str(build["context"]))).base
    with storage_lock():
        started = time.monotonic()
        _, built = ensure_base(base, rebuild=rebuild_base)
        if built:
            log(f"stand-in base built in {time.monotonic() - started:.0f}s")
        tag = str(build["image"])
        before = image_config(tag)
        with tempfile.TemporaryDirectory() as tmp:
            iidfile = Path(tmp) / "iid"
            argv = [
                "bud",
                *ISOLATION,
                "--pull=never",
                "--format",
                "docker",
                "--iidfile",
                str(iidfile),
                "-f",
                str(dockerfile),
                "-t",
                tag,
            ]
            for key, value in dict(build["args"]).items():  # type: ignore[call-overload]
                argv += ["--build-arg", f"{key}={value}"]
            proc = subprocess.run(
                ["buildah", *argv, str(build["context"])],
                capture_output=True,
                text=True,
                timeout=1200,
            )
            if proc.returncode != 0:
                raise RuntimeError(
                    f"buildah bud -f {dockerfile} failed ({proc.returncode}):\n"
                    + (proc.stdout + proc.stderr)[-6000:]
                )
            image_id = iidfile.read_text().strip().removeprefix("sha256:")
        if before and before["Id"] and before["Id"] != image_id:
            buildah("rmi", before["Id"], check=False)  # the previous build, now untagged
    config = image_config(image_id)
    if config is None:
        raise RuntimeError(f"the image {image_id} just built is not in the storage")
    return dict(config, Id=image_id, Tag=tag)


# ---------------------------------------------------------------------------- the containers


def _root_of(pid: int) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/root")
    except OSError:
        return None


def _pids() -> list[int]:
    return [int(p) for p in os.listdir("/proc") if p.isdigit()]


class Container:
    """One compose worker service as a buildah working container of the image."""

    def __init__(
        self,
        name: str,
        spec: Mapping[str, Any],
        image: Mapping[str, Any],
        environ: Mapping[str, str] | None = None,
        log_dir: Path | None = None,
        context: Path = ROOT,
    ) -> None:
        env_in = dict(os.environ if environ is None else environ)
        self.name = name
        self.image = image
        self.hostname = str(spec.get("hostname") or name)
        command = spec.get("command")
        if command is None:
            argv = list(image.get("Cmd") or [])
        elif isinstance(command, str):
            argv = shlex.split(command)
        else:
            argv = list(command)
        self.command = [compose_workers.interpolate(a, env_in) for a in argv]
        self.entrypoint = list(image.get("Entrypoint") or [])
        self.env = {
            str(k): compose_workers.interpolate(str(v), env_in)
            for k, v in (spec.get("environment") or {}).items()
        }
        self.hosts = []
        for entry in spec.get("extra_hosts") or []:
            host, _, address = str(entry).partition(":")
            # host-gateway is the host; chroot isolation shares its network: 127.0.0.1.
            self.hosts.append(f"{host}:{'127.0.0.1' if address == 'host-gateway' else address}")
        self.volumes = []
        #: named volume -> its folder here (``<log_dir>/volumes/<name>``), new and empty
        self.named: dict[str, Path] = {}
        volume_root = (log_dir or Path(tempfile.gettempdir())) / "volumes"
        for volume in spec.get("volumes") or []:
            source, target, *mode = str(volume).split(":")
            if source.startswith("."):
                source = str((context / source).resolve())
            elif compose_workers.is_named(source):
                self.named[target] = volume_root / source
                source = str(self.named[target])
            self.volumes.append(":".join([source, target, *mode]))
        self.container = f"{spec.get('container_name') or name}-{uuid.uuid4().hex[:8]}"
        self.log_path = (log_dir or Path(tempfile.gettempdir())) / f"{self.container}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.rootfs: str | None = None
        self.created = False

    def create(self) -> None:
        adds = [a for host in self.hosts for a in ("--add-host", host)]
        buildah("from", "--pull=never", "--name", self.container, *adds, str(self.image["Id"]))
        self.created = True
        if self.named:
            self._populate_volumes()

    def _populate_volumes(self) -> None:
        """A new named volume takes the owner, mode and files of the image's folder it is
        mounted on (Docker's copy-up), so the image's user can write its cache there."""
        rootfs = Path(buildah("mount", self.container))
        try:
            for target, folder in self.named.items():
                inside = rootfs / target.lstrip("/")
                if folder.exists():
                    continue  # a volume keeps what it holds, as compose's do across `up`s
                if inside.is_dir():
                    shutil.copytree(inside, folder, symlinks=True)
                    shutil.copystat(inside, folder)
                    info = inside.stat()
                    os.chown(folder, info.st_uid, info.st_gid)
                else:
                    folder.mkdir(parents=True)
        finally:
            buildah("umount", self.container, check=False)

    def run_argv(self, argv: Sequence[str], user: str | None = None) -> list[str]:
        """``buildah run`` of ``argv`` in this container as compose would set it up."""
        options = [*ISOLATION, "--uts", "private", "--hostname", self.hostname]
        for volume in self.volumes:
            options += ["-v", volume]
        for key, value in self.env.items():
            options += ["-e", f"{key}={value}"]
        if user:
            options += ["--user", user]
        return ["buildah", "run", *options, self.container, "--", *argv]

    def start(self) -> None:
        """The service's command behind the image's ENTRYPOINT, as ``docker compose up`` runs it."""
        if not self.created:
            self.create()
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as out:
            self.proc = subprocess.Popen(
                self.run_argv([*self.entrypoint, *self.command]),
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )

    def exec(self, argv: Sequence[str], timeout: float, user: str | None = None) -> tuple[int, str]:
        """``docker compose exec``: ``argv`` beside the service's command, within ``timeout``."""
        proc = subprocess.Popen(
            self.run_argv(argv, user),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            text=True,
            start_new_session=True,
        )
        try:
            out, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self._kill_group(proc.pid)
            out, _ = proc.communicate()
            return -1, out + f"\n(still running after {timeout}s: killed)"
        return proc.returncode, out

    def healthcheck(self) -> tuple[int, str]:
        """The image's HEALTHCHECK command once, within its own timeout."""
        check = self.image.get("Healthcheck") or {}
        test = list(check.get("Test") or [])
        if not test or test[0] not in ("CMD", "CMD-SHELL"):
            raise RuntimeError(f"the image has no HEALTHCHECK command: {check}")
        argv = test[1:] if test[0] == "CMD" else ["/bin/sh", "-c", test[1]]
        return self.exec(argv, timeout=(check.get("Timeout") or 30e9) / 1e9)

    def _rootfs_now(self) -> str | None:
        """Where this container's processes are chrooted (``/proc/PID/root``), once running."""
        if self.proc is None:
            return None
        for pid in _pids():
            with contextlib.suppress(OSError):
                if os.getsid(pid) == self.proc.pid:
                    root = _root_of(pid)
                    if root and root != "/":
                        return root
        return None

    def processes(self) -> list[int]:
        """Every process of this container: the command's session and all chrooted in its rootfs."""
        if self.proc is None:
            return []
        self.rootfs = self.rootfs or self._rootfs_now()
        found = []
        for pid in _pids():
            with contextlib.suppress(OSError):
                if os.getsid(pid) == self.proc.pid or (
                    self.rootfs is not None and _root_of(pid) == self.rootfs
                ):
                    found.append(pid)
        return found

    def uids(self) -> set[int]:
        """The real uids of the container's processes (not ``buildah run`` itself, root)."""
        uids = set()
        for pid in self.processes():
            if self.rootfs is not None and _root_of(pid) == self.rootfs:
                with contextlib.suppress(OSError):
                    status = Path(f"/proc/{pid}/status").read_text()
                    uids.add(int(re.search(r"^Uid:\s+(\d+)", status, re.M).group(1)))  # type: ignore[union-attr]
        return uids

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    @staticmethod
    def _kill_group(pgid: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGKILL)

    def stop(self, grace: float = 15.0) -> list[int]:
        """Warm shutdown (SIGTERM), SIGKILL after ``grace``, then remove the working container.

        Returns the processes still there after all that (none, unless something is wrong).
        """
        if self.proc is not None:
            self.rootfs = self.rootfs or self._rootfs_now()
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            deadline = time.monotonic() + grace
            while self.proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.1)
            deadline = time.monotonic() + 10
            while (left := self.processes()) and time.monotonic() < deadline:
                self._kill_group(self.proc.pid)
                for pid in left:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                time.sleep(0.1)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(5)
        if self.created:
            buildah("rm", self.container, check=False)
            self.created = False
        return self.processes()


def working_containers() -> list[str]:
    out = buildah("containers", "--json", check=False)
    return [c.get("containername", "") for c in json.loads(out or "[]") or []]


@contextlib.contextmanager
def running(
    image: Mapping[str, Any],
    environ: Mapping[str, str] | None = None,
    log_dir: Path | None = None,
    names: list[str] | None = None,
) -> Iterator[list[Container]]:
    """``docker compose up`` of the worker services from ``image``; every one stopped after."""
    services = compose_workers.worker_services(compose_workers.load())
    started = [
        Container(n, services[n], image, environ, log_dir) for n in (names or sorted(services))
    ]
    try:
        for container in started:
            container.start()
        yield started
    finally:
        for container in started:
            container.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="worker_image.py", description=__doc__.split("\n")[0])
    parser.add_argument("step", choices=["tools", "base", "build"])
    parser.add_argument("--rebuild-base", action="store_true", help="build the stand-in again")
    args = parser.parse_args(argv)
    missing = install_tools()
    if missing:
        log(f"{', '.join(missing)} missing: {INSTALL_HINT}")
        return 1
    if args.step == "tools":
        return 0
    if args.step == "base":
        base = compose_workers.WorkerImage().base
        with storage_lock():
            name, built = ensure_base(base, rebuild=args.rebuild_base)
        log(f"{name}: {'built' if built else 'already there'}")
        return 0
    started = time.monotonic()
    image = build_image(rebuild_base=args.rebuild_base)
    log(f"{image['Tag']} ({image['Id'][:12]}) built in {time.monotonic() - started:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
