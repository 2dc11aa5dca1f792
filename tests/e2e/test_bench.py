"""`python -m bench --quick` completes and reports (untimed: no timing is asserted here).

The quick mode runs W1 at 40 tests for one round in each mode (local, xdist, dispatch) and the
task_a / task_b run once, with its own worker-a / worker-b in a private vhost. This checks that
the bench runs end to end, writes its results JSON, finds the outcomes identical in every mode,
and leaves no worker and no vhost behind, even when it fails or hangs.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from tests.conftest import broker_reachable

ROOT = Path(__file__).resolve().parents[2]
TIMEOUT = 120  # the quick bench takes ~15 s; this only bounds a hang


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    stat = Path(f"/proc/{pid}/stat")
    with contextlib.suppress(OSError):
        return stat.read_text().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie is gone
    return False


def _vhosts(rabbitmqctl: str) -> list[str]:
    proc = subprocess.run(
        [rabbitmqctl, "list_vhosts", "--quiet", "--no-table-headers"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    return [line.strip() for line in proc.stdout.splitlines() if line.strip()]


def _cleanup(pid_file: Path, vhost: str, rabbitmqctl: str) -> None:
    """Whatever the bench could not stop itself (it was killed): its workers, its vhost."""
    if pid_file.exists():
        with contextlib.suppress(ValueError, OSError):
            for pid in json.loads(pid_file.read_text()).get("workers", {}).values():
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(int(pid), signal.SIGKILL)
    if vhost in _vhosts(rabbitmqctl):
        subprocess.run([rabbitmqctl, "delete_vhost", vhost], capture_output=True, timeout=60)


def test_quick_bench_runs_and_reports(tmp_path: Path) -> None:
    rabbitmqctl = shutil.which("rabbitmqctl")
    if rabbitmqctl is None:
        pytest.skip("the bench needs rabbitmqctl for its private vhost")
    if not broker_reachable():
        pytest.fail("RabbitMQ is not reachable: start it (rabbitmq-server -detached)")
    work = tmp_path / "work"
    results = tmp_path / "results.json"
    chart = tmp_path / "ratios.png"
    vhost = f"cdbench-test-{uuid.uuid4().hex[:8]}"
    command = [
        sys.executable,
        "-m",
        "bench",
        "--quick",
        f"--work-dir={work}",
        f"--results={results}",
        f"--chart={chart}",
        f"--vhost={vhost}",
    ]
    env = dict(os.environ)
    env.pop("PYTEST_ADDOPTS", None)
    proc = subprocess.Popen(
        command,
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        try:
            output, _ = proc.communicate(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGTERM)  # the bench stops its workers, deletes its vhost
            try:
                output, _ = proc.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                output, _ = proc.communicate()
            pytest.fail(f"python -m bench --quick did not finish in {TIMEOUT}s:\n{output}")
        worker_pids = []
        if results.exists():
            starts = json.loads(results.read_text())["meta"]["worker_starts"]
            worker_pids = [int(pid) for start in starts for pid in start["pids"]]
    finally:
        _cleanup(work / "pids.json", vhost, rabbitmqctl)

    assert proc.returncode == 0, output
    assert "Targets (reported, not enforced)" in output
    assert "Outcome parity: identical." in output

    data = json.loads(results.read_text())
    assert {"meta", "workloads", "w4", "targets", "parity"} <= set(data)
    assert data["meta"]["quick"] is True
    assert data["meta"]["vhost"] == vhost
    w1 = data["workloads"]["W1"]
    assert w1["tests"] == 40
    assert set(w1["modes"]) == {"local", "xdist", "dispatch", "history"}
    for mode in w1["modes"].values():
        assert {"median_wall", "min_wall", "max_wall", "median_cpu", "max_rss_mb"} <= set(mode)
        assert mode["counts"] == {"passed": 40}
    assert {"dispatch/xdist", "dispatch/local", "history/local"} <= set(w1["ratios"])
    assert w1["modes"]["dispatch"]["slots"] == {"queue_a": 1, "queue_b": 1}
    for run in w1["runs"]:
        assert run["returncode"] == 0, run
        if run["mode"] in ("dispatch", "history"):
            assert run["routing_ok"], run  # queue_a tests on worker-a, queue_b on worker-b
    assert data["parity"]["ok"] is True
    assert data["parity"]["by_workload"]["W1"]["problems"] == []
    assert data["w4"]["ok"] is True, data["w4"]["problems"]
    assert {"dispatcher", "direct"} <= set(data["w4"]["paths"])
    target_ids = {t["id"] for t in data["targets"]}
    assert {"W1.dispatch_vs_xdist", "W1.dispatch_vs_local", "W4.overhead_dispatcher"} <= target_ids
    if data["meta"].get("chart"):
        assert chart.stat().st_size > 0

    # Nothing is left behind: the workers are gone, and so are the vhost and the pid file.
    assert len(worker_pids) == 2
    for pid in worker_pids:
        assert not _alive(pid), f"worker pid {pid} is still running"
    assert vhost not in _vhosts(rabbitmqctl)
    assert not (work / "pids.json").exists()
