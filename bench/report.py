"""The printed table and the PNG chart of the ratios."""

from __future__ import annotations

from pathlib import Path
from typing import Any

MODE_LABELS = {
    "local": "local",
    "xdist": "xdist -n {n}",
    "dispatch": "dispatch",
    "history": "dispatch + cache",
}


def _mode_label(mode: str, workload: dict[str, Any]) -> str:
    return MODE_LABELS[mode].format(n=workload["xdist_n"])


def _counts(counts: dict[str, int] | None) -> str:
    if not counts:
        return "no summary"
    return ", ".join(f"{v} {k}" for k, v in counts.items())


def _value(value: float | None, unit: str) -> str:
    if value is None:
        return "n/a"
    if unit == "x":
        return f"{value:.2f}x"
    if unit == "s":
        return f"{value:.2f} s"
    if unit == "ms":
        return f"{value:.2f} ms" if value < 10 else f"{value:.0f} ms"
    return f"{value:.0f} {unit}"


def _grid(rows: list[list[str]], right: set[int], indent: str = "  ") -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = []
    for row in rows:
        cells = [
            cell.rjust(widths[i]) if i in right else cell.ljust(widths[i])
            for i, cell in enumerate(row)
        ]
        lines.append(indent + "  ".join(cells).rstrip())
    return lines


def table(result: dict[str, Any], results_path: Path, chart: Path | None) -> str:
    meta = result["meta"]
    out = [
        "=" * 100,
        f"pytest-celery-dispatch bench: {', '.join(meta['workloads'])}; {meta['rounds']} round(s)"
        f" (W3: {meta['w3_rounds']}), warm-up {meta['warmup']}, {meta['cpu_count']} cores, "
        f"Python {meta['python']}, commit {meta['commit'] or '?'}",
        f"broker {meta['broker']} (private vhost, deleted); workers started "
        + ", ".join(f"-c {s['concurrency']} in {s['seconds']:.1f}s" for s in meta["worker_starts"]),
    ]
    if meta.get("blocked_plugins"):
        out.append(
            "other installed pytest plugins blocked in every mode (-p no:): "
            + ", ".join(meta["blocked_plugins"])
        )
    out.append("=" * 100)
    for key, w in result["workloads"].items():
        out.append("")
        out.append(f"{key}: {w['description']} ({w['rounds']} timed round(s))")
        rows = [
            [
                "mode",
                "median",
                "min",
                "max",
                "pytest CPU",
                "peak RSS",
                "workers CPU",
                "broker CPU",
                "busy cores",
                "outcome",
            ]
        ]
        for mode, s in w["modes"].items():
            broker = s["median_broker_cpu"]
            rows.append(
                [
                    _mode_label(mode, w),
                    f"{s['median_wall']:.2f}s",
                    f"{s['min_wall']:.2f}s",
                    f"{s['max_wall']:.2f}s",
                    f"{s['median_cpu']:.2f}s",
                    f"{s['max_rss_mb']:.0f} MB",
                    f"{s['median_workers_cpu']:.2f}s",
                    "n/a" if broker is None else f"{broker:.2f}s",
                    f"{s['median_machine_busy_cores']:.2f}",
                    _counts(s["counts"]),
                ]
            )
        out += _grid(rows, right={1, 2, 3, 4, 5, 6, 7, 8})
        ratios = w["ratios"]
        if ratios:
            shown = []
            for name, value in ratios.items():
                if name == "dispatch/physical_limit":
                    shown.append(f"dispatch / {w['physical_limit']:g} s limit {value:.2f}x")
                else:
                    shown.append(
                        f"{name.replace('xdist', 'xdist -n ' + str(w['xdist_n']))} {value:.2f}x"
                    )
            out.append("  ratios of medians: " + "; ".join(shown))
        slots = (w["modes"].get("dispatch") or {}).get("slots")
        if slots:
            out.append(
                "  dispatch slots seen by the controller: "
                + ", ".join(f"{q} {n}" for q, n in sorted(slots.items()))
            )
        tests_phase = {
            m: (s.get("median_phases") or {}).get("tests") for m, s in w["modes"].items()
        }
        if tests_phase.get("dispatch") is not None and tests_phase.get("history") is not None:
            out.append(
                "  tests phase (first test started to last done, medians): collection order "
                f"{tests_phase['dispatch']:.2f}s, history (longest first) "
                f"{tests_phase['history']:.2f}s"
            )
        phases = (w["modes"].get("dispatch") or {}).get("median_phases")
        if phases:
            out.append(
                "  dispatch phases (medians): start-up to first chunk sent "
                f"{phases['to_first_send']:.2f}s, to first test started on a worker "
                f"{phases['to_first_test']:.2f}s, tests {phases['tests']:.2f}s, last test done "
                f"to exit {phases['tail']:.2f}s"
            )
        controller = w.get("controller")
        if controller:
            line = (
                f"  controller (dispatch): {controller['cpu_seconds']:.2f}s CPU = "
                f"{controller['cpu_ms_per_test']:.3f} ms/test"
            )
            if controller["marginal_cpu_ms_per_test"] is not None:
                line += f" (marginal over W1: {controller['marginal_cpu_ms_per_test']:.3f} ms/test)"
            if controller["local_cpu_ms_per_test"] is not None:
                line += f"; plain local pytest: {controller['local_cpu_ms_per_test']:.3f} ms/test"
            line += f"; peak RSS {controller['peak_rss_mb']:.0f} MB"
            if controller["wall_ratio_w3_w1"] is not None:
                line += f"; wall(W3)/wall(W1) {controller['wall_ratio_w3_w1']:.2f}"
            out.append(line)
    w4 = result.get("w4")
    if w4 is not None:
        out.append("")
        out.append(
            f"W4: task_a ({w4['durations'][0]:g} s) on queue_a + task_b ({w4['durations'][1]:g} s)"
            f" on queue_b, sent at once; {w4['repeats']} repeat(s) per path"
        )
        rows = [["path", "median wall", "slower task", "overhead med", "min", "max"]]
        for path, s in w4["paths"].items():
            rows.append(
                [
                    "dispatcher fixture" if path == "dispatcher" else "Celery app, get()",
                    f"{s['median_wall']:.3f}s",
                    f"{s['median_slower']:.3f}s",
                    f"{s['median_overhead_ms']:.1f} ms",
                    f"{s['min_overhead_ms']:.1f} ms",
                    f"{s['max_overhead_ms']:.1f} ms",
                ]
            )
        out += _grid(rows, right={1, 2, 3, 4, 5})
    out.append("")
    out.append("Targets (reported, not enforced)")
    rows = [["target", "measured", "limit", "status"]]
    for t in result["targets"]:
        status = "n/a" if t["met"] is None else ("met" if t["met"] else "MISSED")
        rows.append(
            [
                t["label"],
                _value(t["measured"], t["unit"]),
                "<= " + _value(t["limit"], t["unit"]),
                status,
            ]
        )
    parity = result["parity"]
    rows.append(
        [
            "outcomes identical to the local run",
            "yes" if parity["ok"] else "NO",
            "every mode, round",
            "met" if parity["ok"] else "MISSED",
        ]
    )
    out += _grid(rows, right={1, 2})
    out.append("")
    parts = []
    for key, p in parity["by_workload"].items():
        modes = ", ".join(
            f"{mode} {' / '.join(_counts(c) for c in counts)}"
            for mode, counts in p["by_mode"].items()
        )
        parts.append(f"{key}: {modes}")
    if parity["w4_ok"] is not None:
        parts.append(
            "W4: " + ("right message, queue and worker, overlapping" if parity["w4_ok"] else "NO")
        )
    out.append("Outcome parity: " + ("identical" if parity["ok"] else "DIFFERENT") + ".")
    out += [f"  {part}" for part in parts]
    for key, p in parity["by_workload"].items():
        for problem in p["problems"][:10]:
            out.append(f"  {key} problem: {problem}")
    if w4 is not None:
        for problem in w4["problems"][:10]:
            out.append(f"  W4 problem: {problem}")
    out.append("")
    out.append(
        "pytest CPU: user+sys of the timed pytest process (os.wait4; xdist: with its workers). "
        "workers CPU: worker-a + worker-b process trees (runners included). busy cores: the "
        "whole machine during the run."
    )
    out.append(f"results: {results_path}" + (f"   chart: {chart}" if chart else "   chart: none"))
    return "\n".join(out)


# ---------------------------------------------------------------------------- chart


def draw_chart(result: dict[str, Any], path: Path) -> Path | None:
    """bench/ratios.png: the ratios per workload with their targets, and each target's use of
    its budget. Needs matplotlib (the ``bench`` extra); without it, no chart."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("[bench] matplotlib is not installed (pip install -e '.[bench]'): no chart")
        return None

    limits = {
        ("W1", "dispatch/xdist"): 0.6,
        ("W1", "dispatch/local"): 1.5,
        ("W2", "dispatch/xdist"): 0.6,
        ("W2", "dispatch/physical_limit"): 1.2,
    }
    bars: list[tuple[str, float, float | None]] = []
    for key, w in result["workloads"].items():
        for name in ("dispatch/local", "dispatch/xdist", "xdist/local", "dispatch/physical_limit"):
            if name in w["ratios"]:
                label = name.replace("xdist", f"xdist -n {w['xdist_n']}")
                if name == "dispatch/physical_limit":
                    label = f"dispatch / {w['physical_limit']:g} s limit"
                bars.append((f"{key}: {label}", w["ratios"][name], limits.get((key, name))))
    budget = [t for t in result["targets"] if t["measured"] is not None and t["limit"]]

    fig, axes = plt.subplots(1, 2, figsize=(15, max(4.0, 0.45 * max(len(bars), len(budget)) + 2)))
    ax = axes[0]
    ys = list(range(len(bars)))[::-1]
    ax.barh(ys, [b[1] for b in bars], color="#4c72b0")
    for y, (_, value, limit) in zip(ys, bars, strict=True):
        ax.text(value, y, f" {value:.2f}x", va="center", fontsize=8)
        if limit is not None:
            ax.plot([limit, limit], [y - 0.4, y + 0.4], color="#c44e52", linewidth=2.5)
    ax.axvline(1.0, color="grey", linewidth=0.8, linestyle=":")
    ax.set_xlim(0, 1.2 * max([b[1] for b in bars] + [b[2] or 0 for b in bars] + [1.0]))
    ax.set_yticks(ys, [b[0] for b in bars], fontsize=8)
    ax.set_xlabel("ratio of median wall times (red tick: target)")
    ax.set_title("Wall-time ratios")

    ax = axes[1]
    ys = list(range(len(budget)))[::-1]
    fractions = [t["measured"] / t["limit"] for t in budget]
    colors = ["#55a868" if f <= 1.0 else "#c44e52" for f in fractions]
    ax.barh(ys, fractions, color=colors)
    units = {"x": "x", "s": " s", "ms": " ms", "MB": " MB"}
    for y, t, f in zip(ys, budget, fractions, strict=True):
        unit = units.get(t["unit"], t["unit"])
        ax.text(f, y, f" {t['measured']:.2f}{unit} / {t['limit']:g}{unit}", va="center", fontsize=8)
    ax.axvline(1.0, color="black", linewidth=1)
    ax.set_xlim(0, 1.35 * max([*fractions, 1.0]))
    ax.set_yticks(ys, [t["label"] for t in budget], fontsize=8)
    ax.set_xlabel("measured / target (<= 1 is met)")
    ax.set_title("Targets")
    meta = result["meta"]
    fig.suptitle(
        f"pytest-celery-dispatch bench ({meta['rounds']} rounds, {meta['cpu_count']} cores, "
        f"commit {meta['commit'] or '?'})"
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
