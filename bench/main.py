"""``python -m bench``: local pytest vs pytest-xdist vs ``pytest --celery-dispatch``.

One command, local processes only: it generates the workloads, creates a private RabbitMQ
vhost, starts worker-a (queue_a) and worker-b (queue_b) once per worker concurrency, times
every mode in alternating rounds (local, xdist, dispatch, local, xdist, dispatch, ...), times
the task_a / task_b run, then stops the workers, deletes the vhost, prints a table of medians,
ratios and targets, writes a results JSON and draws the ratios. It reports; a missed target
does not make it fail. It exits 1 when the outcomes differ between modes (or a run broke).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from . import infra, procs, report, w4
from .workloads import Workload, foreign_plugins, full_workloads, quick_workloads, write_root

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
ALL_KEYS = ("W1", "W2", "W3", "W4", "W5", "W6")
WORKERS = {"queue_a": "worker-a", "queue_b": "worker-b"}


def say(text: str) -> None:
    print(f"[bench] {text}", flush=True)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="Time local pytest, pytest-xdist and pytest --celery-dispatch on generated "
        "workloads, with real workers on a private RabbitMQ vhost.",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="W1 at 40 tests, one round, no warm-up, W4 once (a smoke test, not a measurement)",
    )
    parser.add_argument("--rounds", type=int, default=None, help="rounds per workload (3)")
    parser.add_argument(
        "--w3-rounds", type=int, default=None, help="rounds for W3 (default: min(rounds, 3))"
    )
    parser.add_argument("--only", default="", help="comma-separated subset of W1,W2,W3,W4,W5,W6")
    parser.add_argument(
        "--warmup", type=int, default=None, help="untimed runs of each mode first (1; quick 0)"
    )
    parser.add_argument("--w4-repeats", type=int, default=None, help="W4 repeats (7; quick 1)")
    parser.add_argument("--work-dir", type=Path, default=None, help="workload root (bench/work)")
    parser.add_argument("--results", type=Path, default=None, help="results JSON path")
    parser.add_argument("--chart", type=Path, default=None, help="PNG chart path")
    parser.add_argument(
        "--broker",
        default=os.environ.get("BENCH_BROKER", "amqp://guest:guest@127.0.0.1:5672"),
        help="broker without vhost; the bench adds its private vhost (env BENCH_BROKER)",
    )
    parser.add_argument(
        "--all-plugins",
        action="store_true",
        help="keep every installed pytest plugin (default: only celery_dispatch, timeout and "
        "xdist; the others are blocked with -p no:NAME in the workloads' pytest.ini)",
    )
    parser.add_argument("--vhost", default=None, help="name of the private vhost to create")
    parser.add_argument(
        "--ship-empty",
        action="store_true",
        help="start the workers in an empty folder with an empty cache: every run's tree is "
        "shipped to them (unsigned, allowed on the bench's private vhost)",
    )
    parser.add_argument(
        "--timeout", type=float, default=600.0, help="deadline of one pytest run (s)"
    )
    parser.add_argument(
        "--profile",
        type=Path,
        default=None,
        help="run the workers and the dispatch controllers under cProfile, profiles in this "
        "folder (emptied first); `python -m bench.split DIR` prints the per-test CPU split",
    )
    args = parser.parse_args(argv)
    quick = args.quick
    args.rounds = args.rounds if args.rounds is not None else (1 if quick else 3)
    args.w3_rounds = args.w3_rounds if args.w3_rounds is not None else min(args.rounds, 3)
    args.warmup = args.warmup if args.warmup is not None else (0 if quick else 1)
    args.w4_repeats = args.w4_repeats if args.w4_repeats is not None else (1 if quick else 7)
    if args.rounds < 1 or args.w3_rounds < 1 or args.w4_repeats < 1 or args.warmup < 0:
        parser.error("--rounds, --w3-rounds and --w4-repeats must be >= 1, --warmup >= 0")
    default_keys = ("W1", "W4") if quick else ALL_KEYS
    keys = [k.strip().upper() for k in args.only.split(",") if k.strip()] or list(default_keys)
    unknown = [k for k in keys if k not in ALL_KEYS]
    if unknown:
        parser.error(f"--only: unknown workload(s) {', '.join(unknown)}; choose from W1..W6")
    available = quick_workloads() if quick else full_workloads()
    missing = [k for k in keys if k != "W4" and k not in available]
    if missing:
        parser.error(f"--quick has only W1 and W4, not {', '.join(missing)}")
    args.keys = [k for k in ALL_KEYS if k in keys]
    args.workloads = [available[k] for k in args.keys if k in available]
    work = args.work_dir or (BENCH_DIR / "work" / "quick" if quick else BENCH_DIR / "work")
    args.work_dir = work.resolve()
    args.results = args.results or (work / "results.json" if quick else BENCH_DIR / "results.json")
    args.chart = args.chart or (work / "ratios.png" if quick else BENCH_DIR / "ratios.png")
    return args


# ---------------------------------------------------------------------------- one timed run


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.root: Path = args.work_dir
        self.logs = self.root / "logs"
        self.vhost: infra.Vhost | None = None
        self.workers: list[infra.Worker] = []
        self.control_app: Any = None
        self.broker_pid = procs.find_broker_pid()
        self.runs: list[dict[str, Any]] = []
        self.w4: dict[str, Any] | None = None
        self.worker_starts: list[dict[str, Any]] = []
        self.blocked: list[str] = []

    @property
    def broker_url(self) -> str:
        assert self.vhost is not None
        return self.vhost.url

    def controller_env(self, mode: str = "local") -> dict[str, str]:
        env = dict(os.environ)
        for key in ("PYTEST_ADDOPTS", "BROKER_URL", "CELERY_RESULT_BACKEND"):
            env.pop(key, None)
        env["CELERY_BROKER_URL"] = self.broker_url
        if mode in ("dispatch", "history"):
            env.update(self.profile_env())
        return env

    def profile_env(self) -> dict[str, str]:
        """``--profile``: the environment that runs a process under cProfile (bench/profiling)."""
        if self.args.profile is None:
            return {}
        folder = BENCH_DIR / "profiling"
        path = os.pathsep.join(p for p in (str(folder), os.environ.get("PYTHONPATH")) if p)
        return {"PYTHONPATH": path, "CDBENCH_PROFILE_DIR": str(self.args.profile.resolve())}

    def command(self, workload: Workload, mode: str, tag: str) -> tuple[list[str], Path | None]:
        base = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"]
        if mode == "local":
            return [*base, workload.directory], None
        if mode == "xdist":
            return [*base, "-n", str(workload.xdist), workload.directory], None
        json_report = self.root / "reports" / f"{tag}.json"
        json_report.parent.mkdir(parents=True, exist_ok=True)
        if mode == "history":  # pytest's cache on (its own folder): recorded durations
            base = [*base[:-2], "-o", f"cache_dir={self.history_cache(workload)}"]
        return [
            *base,
            "--celery-dispatch",
            f"--celery-broker={self.broker_url}",
            f"--celery-json-report={json_report}",
            "--celery-wait-workers",
            "30",
            workload.directory,
        ], json_report

    def history_cache(self, workload: Workload) -> Path:
        return self.root / f"{workload.directory}-cache"

    def timed(self, workload: Workload, mode: str, round_no: int) -> dict[str, Any]:
        tag = f"{workload.key}-{mode}-{'warmup' if round_no == 0 else f'r{round_no}'}"
        command, json_report = self.command(workload, mode, tag)
        if json_report is not None and json_report.exists():
            json_report.unlink()
        worker_pids = [w.pid for w in self.workers if w.pid is not None]
        procs.wait_quiet(worker_pids)
        cpu_before = procs.tree_cpu(worker_pids)
        busy_before, total_before = procs.machine_ticks()
        broker_before = procs.process_cpu(self.broker_pid)
        result = procs.run_timed(
            command,
            self.root,
            self.controller_env(mode),
            self.logs / f"{tag}.out",
            self.args.timeout,
        )
        cpu_after = procs.tree_cpu(worker_pids)
        busy_after, total_after = procs.machine_ticks()
        broker_after = procs.process_cpu(self.broker_pid)
        output = result.output()
        ncpu = os.cpu_count() or 1
        total_ticks = max(1, total_after - total_before)
        run: dict[str, Any] = {
            "workload": workload.key,
            "mode": mode,
            "round": round_no,
            "warmup": round_no == 0,
            "wall": result.wall,
            "cpu_user": result.cpu_user,
            "cpu_sys": result.cpu_sys,
            "cpu": result.cpu,
            "maxrss_mb": result.maxrss_mb,
            "returncode": result.returncode,
            "timed_out": result.timed_out,
            "counts": procs.parse_counts(output),
            "workers_cpu": {
                w.name: cpu_after.get(w.pid or -1, 0.0) - cpu_before.get(w.pid or -1, 0.0)
                for w in self.workers
            },
            "broker_cpu": broker_after - broker_before if self.broker_pid else None,
            "machine_busy_cores": ncpu * (busy_after - busy_before) / total_ticks,
            "internal_error": "INTERNAL ERROR" in output,
            "output": str(result.output_path),
        }
        if json_report is not None:
            run["json_report"] = str(json_report)
            run.update(check_dispatch_report(json_report, result.started_at, result.wall))
        for worker in self.workers:
            worker.check_alive()
        counts = run["counts"] or {}
        shown = ", ".join(f"{v} {k}" for k, v in counts.items()) or "no summary line"
        extra = f", ctl CPU {result.cpu:.2f}s" if mode == "dispatch" else ""
        say(
            f"{tag:<22} {result.wall:7.2f}s  ({shown}; exit {result.returncode}{extra})"
            + ("  TIMED OUT" if result.timed_out else "")
        )
        return run

    # ------------------------------------------------------------------------ workers

    def empty_bench(self) -> tuple[Path, dict[str, str]]:
        """An empty folder and an empty cache beside the root (--ship-empty)."""
        empty = self.root.parent / f"{self.root.name}-empty-bench"
        cache = self.root.parent / f"{self.root.name}-ship-cache"
        for folder in (empty, cache):
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir(parents=True)
        return empty, {"DISPATCH_CACHE_DIR": str(cache), "DISPATCH_SHIP_UNSIGNED": "allow"}

    def ensure_workers(self, concurrency: int) -> None:
        if self.workers and all(w.concurrency == concurrency for w in self.workers):
            return
        self.stop_workers()
        started = time.monotonic()
        workspace, env = self.root, self.profile_env()
        if self.args.ship_empty:
            workspace, shipped = self.empty_bench()
            env.update(shipped)
        self.workers = [
            infra.Worker(name, queue, concurrency, workspace, self.broker_url, self.logs, env)
            for queue, name in WORKERS.items()
        ]
        for worker in self.workers:
            worker.spawn()
        infra.write_pid_file(self.root / "pids.json", self.workers, self.vhost)
        seen = infra.wait_ready(self.control_app, self.workers)
        took = time.monotonic() - started
        self.worker_starts.append(
            {"concurrency": concurrency, "seconds": took, "pids": [w.pid for w in self.workers]}
        )
        say(
            f"workers up in {took:.1f}s: "
            + ", ".join(
                f"{w.name} (pid {w.pid}, -Q {w.queue}, -c {seen[w.name]})" for w in self.workers
            )
        )

    def stop_workers(self) -> None:
        for worker in self.workers:
            worker.stop()
        self.workers = []

    # ------------------------------------------------------------------------ the run

    def run(self) -> None:
        args = self.args
        infra.rabbitmqctl()
        orphans = infra.remove_orphan_vhosts()
        if orphans:
            say(f"removed vhosts left by killed bench runs: {', '.join(orphans)}")
        if args.profile is not None:
            shutil.rmtree(args.profile, ignore_errors=True)
            args.profile.mkdir(parents=True)
        self.blocked = [] if args.all_plugins else foreign_plugins()
        write_root(self.root, args.workloads, self.blocked)
        compiled = byte_compile_plugin()
        if compiled:
            say(f"byte-compiled {compiled} (as an installed package is)")
        if self.blocked:
            say(f"other pytest plugins blocked in every mode: {', '.join(self.blocked)}")
        say(
            f"workloads in {self.root}: "
            + ", ".join(f"{w.key} ({w.tests} tests)" for w in args.workloads)
        )
        self.vhost = infra.Vhost(args.broker, args.vhost).create()
        infra.write_pid_file(self.root / "pids.json", [], self.vhost)
        say(f"private vhost {self.vhost.name} ({self.vhost.masked_url})")
        infra.check_broker(self.broker_url)
        from pytest_celery_dispatch.transport import make_app

        self.control_app = make_app(self.broker_url, "rpc://", name="bench-control")
        for concurrency, group, with_w4 in self.groups():
            self.ensure_workers(concurrency)
            for workload in group:
                self.run_workload(workload)
            if with_w4:
                say(f"W4: task_a + task_b, {args.w4_repeats} repeat(s) per path")
                self.w4 = w4.run(self.broker_url, args.w4_repeats)
                for path, stats in self.w4["paths"].items():
                    say(
                        f"W4 {path:<10} median wall {stats['median_wall']:.3f}s, overhead "
                        f"{stats['median_overhead_ms']:.0f} ms"
                    )

    def groups(self) -> list[tuple[int, list[Workload], bool]]:
        """Workloads grouped by worker concurrency (one worker start each); W4 with the first."""
        order: dict[int, list[Workload]] = {}
        for workload in self.args.workloads:
            order.setdefault(workload.concurrency, []).append(workload)
        groups = [(c, ws, False) for c, ws in order.items()]
        if "W4" in self.args.keys:
            if groups:
                c, ws, _ = groups[0]
                groups[0] = (c, ws, True)
            else:
                groups.append((1, [], True))
        return groups

    def run_workload(self, workload: Workload) -> None:
        rounds = self.args.w3_rounds if workload.key == "W3" else self.args.rounds
        say(f"{workload.key}: {workload.description}; {rounds} round(s)")
        if "history" in workload.modes:
            # A fresh cache, then one untimed run that records the durations (collection order).
            shutil.rmtree(self.history_cache(workload), ignore_errors=True)
            self.runs.append(self.timed(workload, "history", 0))
        for _ in range(self.args.warmup):
            for mode in workload.modes:
                self.runs.append(self.timed(workload, mode, 0))
        for round_no in range(1, rounds + 1):
            for mode in workload.modes:
                self.runs.append(self.timed(workload, mode, round_no))

    def cleanup(self) -> None:
        try:
            self.stop_workers()
        finally:
            if self.control_app is not None:
                try:
                    self.control_app.close()
                except Exception as exc:
                    say(f"closing the control app: {exc}")
            if self.vhost is not None:
                self.vhost.delete()
                say(f"deleted vhost {self.vhost.name}")
            procs.kill_all_tracked()
            pid_file = self.root / "pids.json"
            if pid_file.exists():
                pid_file.unlink()


def byte_compile_plugin() -> str | None:
    """Byte-compile the plugin's package, as ``pip install`` does for a regular install.

    The development checkout is installed in editable mode, and a machine with
    ``PYTHONDONTWRITEBYTECODE=1`` (this one) never writes its ``.pyc`` files: every pytest
    process of every mode would compile the plugin's modules from source (about 40 ms in a
    controller). Python still checks each ``.pyc`` against its source, so an edited module is
    compiled afresh, never run stale.
    """
    import compileall

    import pytest_celery_dispatch

    package = Path(pytest_celery_dispatch.__file__).parent
    try:
        ok = compileall.compile_dir(str(package), quiet=1, workers=1)
    except OSError:
        return None
    return str(package) if ok else None


def check_dispatch_report(path: Path, spawned: float, wall: float) -> dict[str, Any]:
    """Routing, outcomes and the phases of a dispatch run, from its JSON report.

    Phases (seconds, from the per-test ``sent`` / ``started`` / ``finished`` timestamps):
    ``to_first_send`` (controller start-up, collection, broker and worker checks),
    ``to_first_test`` (first chunk sent to first test started: the workers' runner start-up),
    ``tests`` (first test started to last test finished on a worker) and ``tail`` (last test
    finished on a worker to the controller's exit: its backlog, the reports, the exit).
    """
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        return {"routing_ok": False, "report_error": str(exc)}
    wrong = []
    outcomes: dict[str, int] = {}
    sent, started, finished = [], [], []
    for test in data.get("tests", []):
        outcomes[test["outcome"]] = outcomes.get(test["outcome"], 0) + 1
        info = test.get("dispatch") or {}
        expected = WORKERS.get(str(info.get("queue")))
        if expected is None or info.get("worker") != expected:
            wrong.append(test["nodeid"])
        for key, values in (("sent", sent), ("started", started), ("finished", finished)):
            if isinstance(info.get(key), int | float):
                values.append(float(info[key]))
    dispatch = data.get("dispatch") or {}
    phases = None
    if sent and started and finished:
        phases = {
            "to_first_send": min(sent) - spawned,
            "to_first_test": min(started) - min(sent),
            "tests": max(finished) - min(started),
            "tail": spawned + wall - max(finished),
        }
    return {
        "routing_ok": not wrong,
        "misrouted": wrong[:10],
        "report_outcomes": outcomes,
        "slots": dispatch.get("slots"),
        "sessions": dispatch.get("sessions"),
        "report_wall_time": dispatch.get("wall_time"),
        "phases": phases,
    }


# ---------------------------------------------------------------------------- results


def summarize(bench: Bench) -> dict[str, Any]:
    args = bench.args
    workloads: dict[str, Any] = {}
    for workload in args.workloads:
        runs = [r for r in bench.runs if r["workload"] == workload.key]
        timed = [r for r in runs if not r["warmup"]]
        modes: dict[str, Any] = {}
        for mode in workload.modes:
            rows = [r for r in timed if r["mode"] == mode]
            if not rows:
                continue
            walls = [r["wall"] for r in rows]
            modes[mode] = {
                "walls": walls,
                "median_wall": statistics.median(walls),
                "min_wall": min(walls),
                "max_wall": max(walls),
                "median_cpu": statistics.median(r["cpu"] for r in rows),
                "max_rss_mb": max(r["maxrss_mb"] for r in rows),
                "median_workers_cpu": statistics.median(
                    sum(r["workers_cpu"].values()) for r in rows
                ),
                "median_broker_cpu": (
                    statistics.median(r["broker_cpu"] for r in rows)
                    if all(r["broker_cpu"] is not None for r in rows)
                    else None
                ),
                "median_machine_busy_cores": statistics.median(
                    r["machine_busy_cores"] for r in rows
                ),
                "counts": rows[0]["counts"],
                "slots": rows[-1].get("slots"),
            }
            phases = [r["phases"] for r in rows if r.get("phases")]
            if phases:
                modes[mode]["median_phases"] = {
                    key: statistics.median(p[key] for p in phases) for key in phases[0]
                }
        med = {m: s["median_wall"] for m, s in modes.items()}
        ratios: dict[str, float] = {}
        for mode in ("dispatch", "history"):  # history: the same with pytest's cache on
            if mode in med and "xdist" in med:
                ratios[f"{mode}/xdist"] = med[mode] / med["xdist"]
            if mode in med and "local" in med:
                ratios[f"{mode}/local"] = med[mode] / med["local"]
            if workload.physical_limit and mode in med:
                ratios[f"{mode}/physical_limit"] = med[mode] / workload.physical_limit
        if "xdist" in med and "local" in med:
            ratios["xdist/local"] = med["xdist"] / med["local"]
        tests_phase = {
            m: s["median_phases"]["tests"] for m, s in modes.items() if "median_phases" in s
        }
        if "history" in tests_phase and "dispatch" in tests_phase:
            ratios["history/dispatch (tests phase)"] = (
                tests_phase["history"] / tests_phase["dispatch"]
            )
        workloads[workload.key] = {
            "description": workload.description,
            "tests": workload.tests,
            "modules": workload.modules,
            "tests_per_queue": workload.tests_per_queue(),
            "worker_concurrency": workload.concurrency,
            "xdist_n": workload.xdist,
            "physical_limit": workload.physical_limit,
            "rounds": len({r["round"] for r in timed}),
            "modes": modes,
            "ratios": ratios,
            "parity": parity(workload, runs),
            "runs": runs,
        }
    if "W3" in workloads and "dispatch" in workloads["W3"]["modes"]:
        workloads["W3"]["controller"] = controller_figures(workloads)
    result: dict[str, Any] = {
        "meta": meta(bench),
        "workloads": workloads,
        "w4": bench.w4,
    }
    result["targets"] = targets(result)
    parity_ok = all(w["parity"]["ok"] for w in workloads.values())
    if bench.w4 is not None:
        parity_ok = parity_ok and bool(bench.w4["ok"])
    result["parity"] = {
        "ok": parity_ok,
        "by_workload": {k: w["parity"] for k, w in workloads.items()},
        "w4_ok": bench.w4["ok"] if bench.w4 is not None else None,
    }
    return result


def parity(workload: Workload, runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Every run of every mode ends with the same outcome counts as the local run."""
    expected = {"passed": workload.tests}
    local = [r for r in runs if r["mode"] == "local" and not r["warmup"]]
    reference = local[0]["counts"] if local else expected
    problems = []
    by_mode: dict[str, list[Any]] = {}
    for run in runs:
        tag = f"{run['mode']} {'warm-up' if run['warmup'] else 'round ' + str(run['round'])}"
        by_mode.setdefault(run["mode"], [])
        if run["counts"] not in by_mode[run["mode"]]:
            by_mode[run["mode"]].append(run["counts"])
        if run["counts"] != reference:
            problems.append(f"{tag}: {run['counts']} != local {reference}")
        if run["returncode"] != 0:
            problems.append(f"{tag}: exit code {run['returncode']}")
        if run.get("internal_error"):
            problems.append(f"{tag}: celery-dispatch INTERNAL ERROR in the output")
        if run["mode"] in ("dispatch", "history"):
            if not run.get("routing_ok"):
                problems.append(f"{tag}: tests ran on the wrong worker {run.get('misrouted')}")
            if run.get("report_outcomes") != run["counts"]:
                problems.append(
                    f"{tag}: JSON report outcomes {run.get('report_outcomes')} != terminal"
                )
    if reference != expected:
        problems.append(f"local run: {reference}, expected {expected}")
    return {
        "ok": not problems,
        "reference": reference,
        "expected": expected,
        "by_mode": by_mode,
        "problems": problems,
    }


def controller_figures(workloads: dict[str, Any]) -> dict[str, Any]:
    w3 = workloads["W3"]
    dispatch = w3["modes"]["dispatch"]
    figures: dict[str, Any] = {
        "cpu_seconds": dispatch["median_cpu"],
        "cpu_ms_per_test": 1000.0 * dispatch["median_cpu"] / w3["tests"],
        "peak_rss_mb": dispatch["max_rss_mb"],
        "local_cpu_ms_per_test": (
            1000.0 * w3["modes"]["local"]["median_cpu"] / w3["tests"]
            if "local" in w3["modes"]
            else None
        ),
        "wall_ratio_w3_w1": None,
        "marginal_cpu_ms_per_test": None,
    }
    w1 = workloads.get("W1")
    if w1 is not None and "dispatch" in w1["modes"]:
        d1 = w1["modes"]["dispatch"]
        figures["wall_ratio_w3_w1"] = dispatch["median_wall"] / d1["median_wall"]
        extra_tests = w3["tests"] - w1["tests"]
        if extra_tests > 0:
            figures["marginal_cpu_ms_per_test"] = (
                1000.0 * (dispatch["median_cpu"] - d1["median_cpu"]) / extra_tests
            )
    return figures


def targets(result: dict[str, Any]) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    workloads = result["workloads"]

    def add(key: str, label: str, value: float | None, limit: float, unit: str) -> None:
        rows.append(
            {
                "id": key,
                "label": label,
                "measured": value,
                "limit": limit,
                "unit": unit,
                "met": None if value is None else bool(value <= limit),
            }
        )

    if "W1" in workloads:
        r = workloads["W1"]["ratios"]
        add("W1.dispatch_vs_xdist", "W1 dispatch / xdist -n 2", r.get("dispatch/xdist"), 0.6, "x")
        add("W1.dispatch_vs_local", "W1 dispatch / local", r.get("dispatch/local"), 1.3, "x")
    if "W2" in workloads:
        w2 = workloads["W2"]
        med = w2["modes"].get("dispatch", {}).get("median_wall")
        limit = 1.15 * (w2["physical_limit"] or 0.0)
        add("W2.dispatch_wall", "W2 dispatch wall (1.15 x 2.5 s)", med, limit, "s")
        add(
            "W2.dispatch_vs_xdist",
            "W2 dispatch / xdist -n 8 (approx.)",
            w2["ratios"].get("dispatch/xdist"),
            0.6,
            "x",
        )
    if "W6" in workloads:
        r = workloads["W6"]["ratios"]
        add("W6.dispatch_vs_xdist", "W6 dispatch / xdist -n 2", r.get("dispatch/xdist"), 0.8, "x")
        add("W6.dispatch_vs_local", "W6 dispatch / local", r.get("dispatch/local"), 1.2, "x")
    if "W3" in workloads and "controller" in workloads["W3"]:
        c = workloads["W3"]["controller"]
        add("W3.cpu_per_test", "W3 controller CPU per test", c["cpu_ms_per_test"], 1.0, "ms")
        add("W3.peak_rss", "W3 controller peak RSS", c["peak_rss_mb"], 300.0, "MB")
        if c["wall_ratio_w3_w1"] is not None:
            add("W3.wall_ratio", "wall(W3) / wall(W1), dispatch", c["wall_ratio_w3_w1"], 11.0, "x")
    w4_result = result.get("w4")
    if w4_result is not None:
        for path, stats in w4_result["paths"].items():
            add(
                f"W4.overhead_{path}",
                f"W4 wall - slower task ({path})",
                stats["median_overhead_ms"],
                50.0,
                "ms",
            )
    return rows


def meta(bench: Bench) -> dict[str, Any]:
    args = bench.args
    versions = {}
    for name in ("pytest", "celery", "kombu", "xdist"):
        try:
            module = __import__(name)
            versions[name] = getattr(module, "__version__", "?")
        except ImportError:
            versions[name] = None
    commit = None
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        commit = (
            subprocess.run(
                ["git", "rev-parse", "--short", "HEAD"],
                cwd=ROOT,
                capture_output=True,
                text=True,
                timeout=10,
                check=False,
            ).stdout.strip()
            or None
        )
    return {
        "command": " ".join(["python -m bench", *sys.argv[1:]]),
        "quick": args.quick,
        "workloads": args.keys,
        "rounds": args.rounds,
        "w3_rounds": args.w3_rounds,
        "warmup": args.warmup,
        "w4_repeats": args.w4_repeats,
        "host": socket.gethostname(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "versions": versions,
        "commit": commit,
        "work_dir": str(args.work_dir),
        "vhost": bench.vhost.name if bench.vhost is not None else None,
        "broker": bench.vhost.masked_url if bench.vhost is not None else None,
        "worker_starts": bench.worker_starts,
        "blocked_plugins": bench.blocked,
    }


# ---------------------------------------------------------------------------- entry point


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    bench = Bench(args)
    started = time.time()
    error: BaseException | None = None
    with procs.signals_unwind():
        try:
            bench.run()
        except (infra.BenchError, procs.Terminated, KeyboardInterrupt) as exc:
            error = exc
        finally:
            bench.cleanup()
    if isinstance(error, infra.BenchError):
        say(f"error: {error}")
        return 2
    if error is not None:
        say(f"interrupted ({error or type(error).__name__}); workers stopped, vhost deleted")
        return 130
    result = summarize(bench)
    result["meta"]["seconds"] = time.time() - started
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(result, indent=2) + "\n")
    try:
        chart = report.draw_chart(result, args.chart)
    except Exception as exc:  # a chart problem never costs the measurements
        say(f"could not draw the chart: {type(exc).__name__}: {exc}")
        chart = None
    result["meta"]["chart"] = str(chart) if chart else None
    args.results.write_text(json.dumps(result, indent=2) + "\n")
    print()
    print(report.table(result, args.results, chart))
    return 0 if result["parity"]["ok"] else 1
