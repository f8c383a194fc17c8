"""The benchmark's plots (PNG, matplotlib): throughput per mode, accuracy against time, a per-stage timeline."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

__all__ = ["stage_intervals", "plot_results"]

COLORS = {"forward": "tab:blue", "backward": "tab:orange", "sg": "tab:green", "wait": "0.85"}


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError as err:
        raise ImportError("the benchmark's plots need matplotlib: pip install 'dni_async[plot]'") from err
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def stage_intervals(run_dir: Path) -> dict[int, dict[str, list[tuple[float, float]]]]:
    """From a run's event logs: per stage, ``(start, end)`` times of its forward, backward (incl. optimizer
    step), SG-update and waiting intervals (locked backprop: for the gradient; dni: at ``--max-in-flight``)."""
    out: dict[int, dict[str, list[tuple[float, float]]]] = {}
    for path in sorted((run_dir / "events").glob("stage-*.jsonl")):
        events = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        stage = int(path.stem.split("-")[1])
        spans: dict[str, list[tuple[float, float]]] = {k: [] for k in COLORS}
        open_at: dict[tuple[str, int], float] = {}
        for e in events:
            name, step, t = e["event"], e["step"], e["t"]
            if name == "window_wait":  # dni: at the --max-in-flight bound until a gradient comes back
                open_at[("window", step)] = t
            elif name == "step_start":
                if ("window", step) in open_at:
                    spans["wait"].append((open_at.pop(("window", step)), t))
                open_at[("forward", step)] = t
            elif name == "forward" and ("forward", step) in open_at:
                spans["forward"].append((open_at.pop(("forward", step)), t))
                open_at[("backward", step)] = t
            elif name == "act_sent" and ("backward", step) in open_at:
                open_at[("sent", step)] = t
            elif name == "grad_arrived" and ("sent", step) in open_at:  # locked backprop: waited since the send
                spans["wait"].append((open_at.pop(("sent", step)), t))
                open_at[("backward", step)] = t
            elif name == "update" and ("backward", step) in open_at:
                spans["backward"].append((open_at.pop(("backward", step)), t))
                open_at.pop(("sent", step), None)
            elif name == "sg_start":
                open_at[("sg", step)] = t
            elif name == "sg_update" and ("sg", step) in open_at:
                spans["sg"].append((open_at.pop(("sg", step)), t))
        out[stage] = spans
    return out


def _timeline(ax: Any, run_dir: Path, title: str, steps_shown: int = 12) -> None:
    intervals = stage_intervals(run_dir)
    if not intervals:
        ax.set_title(f"{title}: no event logs")
        return
    last = max(intervals)
    forwards = sorted(intervals[last]["forward"])
    if len(forwards) < 2:
        ax.set_title(f"{title}: too few steps")
        return
    middle = len(forwards) // 2
    t0 = forwards[middle][0]
    t1 = forwards[min(len(forwards) - 1, middle + steps_shown)][0]
    for stage, spans in intervals.items():
        for kind, color in COLORS.items():
            bars = [((a - t0) * 1e3, (b - a) * 1e3) for a, b in spans[kind] if b > t0 and a < t1]
            ax.broken_barh(bars, (stage - 0.4, 0.8), facecolors=color, label=kind)
    handles, labels = ax.get_legend_handles_labels()
    unique = dict(zip(labels, handles))
    ax.legend(unique.values(), unique.keys(), loc="upper right", fontsize="small", ncol=4)
    ax.set_xlim(0, (t1 - t0) * 1e3)
    ax.set_yticks(sorted(intervals))
    ax.set_yticklabels([f"stage {s}" for s in sorted(intervals)])
    ax.invert_yaxis()
    ax.set_xlabel("ms")
    ax.set_title(title)


def plot_results(results: dict[str, Any], out: Path) -> list[Path]:
    """Write ``throughput.png``, ``accuracy_vs_time.png`` and ``timeline.png`` into ``out``; return their paths."""
    plt = _pyplot()
    runs = results["runs"]
    paths = []

    fig, ax = plt.subplots(figsize=(7, 4))
    names = [r["mode"] for r in runs]
    ax.bar(names, [r["samples_per_s"] for r in runs], color="tab:blue", alpha=0.7, label="measured (median)")
    for i, r in enumerate(runs):
        ax.plot([i] * len(r["samples_per_s_all"]), r["samples_per_s_all"], "k.", markersize=4)
        if r["ideal_samples_per_s"]:
            ax.plot([i - 0.4, i + 0.4], [r["ideal_samples_per_s"]] * 2, color="tab:red", lw=2,
                    label="ideal (batch / slowest stage alone)" if i == 0 else None)
    ax.set_ylabel("samples / s")
    ax.set_title(f"{results['config']['task']}, {results['config']['stages']} stages, "
                 f"batch {results['config']['batch_size']}")
    ax.legend(fontsize="small")
    fig.tight_layout()
    paths.append(out / "throughput.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4))
    for r in runs:
        summary = json.loads((Path(r["run_dir"]) / "summary.json").read_text())
        curve = summary.get("curve") or []
        ax.plot([p["ready_s"] for p in curve], [p.get("accuracy") for p in curve], marker=".", label=r["mode"])
    ax.axhline(results["config"]["target_accuracy"], color="0.5", ls="--", lw=1, label="target")
    ax.set_xlabel("wall-clock seconds since training started")
    ax.set_ylabel("test accuracy")
    ax.set_title("test accuracy against time (first repeat of each mode)")
    ax.legend(fontsize="small")
    fig.tight_layout()
    paths.append(out / "accuracy_vs_time.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    shown = [r for r in runs if r["mode"] in ("dni", "backprop")] or [r for r in runs if r["mode"] == "cdni"]
    if shown:
        fig, axes = plt.subplots(len(shown), 1, figsize=(9, 1.2 + 1.1 * results["config"]["stages"] * len(shown)),
                                 squeeze=False)
        for ax, r in zip(axes[:, 0], shown):
            _timeline(ax, Path(r["run_dir"]), f"{r['mode']}: what each stage computes (a window mid-run)")
        fig.tight_layout()
        paths.append(out / "timeline.png")
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)
    return paths
