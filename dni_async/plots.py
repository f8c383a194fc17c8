"""The benchmark's plots (PNG, matplotlib): throughput per mode, accuracy against time, a per-stage timeline."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

__all__ = ["SPANS", "stage_intervals", "plot_results"]

COLORS = {"forward": "tab:blue", "backward": "tab:orange", "sg": "tab:green", "wait": "0.85"}


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError as err:
        raise ImportError("the benchmark's plots need matplotlib: pip install 'dni_async[plot]'") from err
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


SPANS = {"forward": "forward", "update": "backward", "sg_predicted": "sg", "sg_update": "sg",
         "grad_arrived": "wait", "act_sent": "wait", "grad_sent": "wait"}
"""Which events' spans each colour shows (a span runs from the stage's previous event to the event: see
``dni_async.trace``). Waiting on a peer: a gradient's arrival spans the wait for it (long where a stage blocked
for it: locked backprop, a full window; short where it was only polled), a send the time it was blocked."""


def stage_intervals(run_dir: Path) -> dict[int, dict[str, list[tuple[float, float]]]]:
    """From a run's event logs: per stage, ``(start, end)`` times of its forward, backward (incl. optimizer
    step), SG and waiting-for-a-gradient intervals."""
    out: dict[int, dict[str, list[tuple[float, float]]]] = {}
    for path in sorted((run_dir / "events").glob("stage-*.jsonl")):
        events = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        spans: dict[str, list[tuple[float, float]]] = {k: [] for k in COLORS}
        for before, event in zip(events, events[1:]):
            if event["event"] in SPANS:
                spans[SPANS[event["event"]]].append((before["t"], event["t"]))
        out[int(path.stem.split("-")[1])] = spans
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

    shown = [r for r in runs if r["mode"] in ("backprop", "dni", "delayed")] or runs[:1]
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
