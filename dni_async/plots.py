"""Plots (PNG, matplotlib): the benchmark's (throughput per mode, accuracy against time, a per-stage timeline) and
one run's (``python -m dni_async plot RUN_DIR``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

__all__ = ["SPANS", "TRAINING", "stage_intervals", "plot_results", "plot_run"]

COLORS = {"forward": "tab:blue", "backward": "tab:orange", "sg": "tab:green", "wait": "0.85"}


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError as err:
        raise ImportError("plots need matplotlib: pip install 'dni_async[plot]'") from err
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(plt: Any, fig: Any, path: Path) -> Path:
    """Lay ``fig`` out, write it to ``path`` and close it."""
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


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
    paths.append(_save(plt, fig, out / "throughput.png"))

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
    paths.append(_save(plt, fig, out / "accuracy_vs_time.png"))

    shown = [r for r in runs if r["mode"] in ("backprop", "dni", "delayed")] or runs[:1]
    if shown:
        fig, axes = plt.subplots(len(shown), 1, figsize=(9, 1.2 + 1.1 * results["config"]["stages"] * len(shown)),
                                 squeeze=False)
        for ax, r in zip(axes[:, 0], shown):
            _timeline(ax, Path(r["run_dir"]), f"{r['mode']}: what each stage computes (a window mid-run)")
        paths.append(_save(plt, fig, out / "timeline.png"))
    return paths


TRAINING = ("loss", "sg_loss", "sg_cosine", "local_loss", "samples_per_s")
"""The training figures of metrics.jsonl that :func:`plot_run` draws against the step, a line per stage."""


def _metrics_lines(run_dir: Path) -> list[dict[str, Any]]:
    """A run's metrics.jsonl lines."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise ValueError(f"{run_dir} is not a run directory: it has no metrics.jsonl")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _per_stage(lines: list[dict[str, Any]], key: str) -> dict[int, tuple[list[int], list[float]]]:
    """Per stage, the steps and values of ``key`` in the lines that have it (not None)."""
    out: dict[int, tuple[list[int], list[float]]] = {}
    for line in lines:
        if line.get(key) is not None:
            steps, values = out.setdefault(int(line["stage"]), ([], []))
            steps.append(int(line["step"]))
            values.append(float(line[key]))
    return out


def _column(plt: Any, rows: int, xlabel: str, title: str) -> tuple[Any, list[Any]]:
    """A figure of ``rows`` plots above one another on one x axis, and their axes."""
    fig, axes = plt.subplots(rows, 1, figsize=(7, 0.6 + 1.8 * rows), sharex=True, squeeze=False)
    axes[-1, 0].set_xlabel(xlabel)
    axes[0, 0].set_title(title)
    return fig, list(axes[:, 0])


def plot_run(run_dir: Path) -> list[Path]:
    """Draw one run's figures into ``run_dir/plots``; return the paths written.

    ``curves.png``: the :data:`TRAINING` figures and the evaluations' (``eval_accuracy``, ...) of metrics.jsonl
    against the step, a line per stage; ``eval_vs_time.png``: summary.json's ``curve`` (the snapshots'
    evaluations against wall-clock seconds), where the run has one; ``timeline.png``: what each stage computes
    in a window mid-run (forward, backward, SG, waiting), from the event logs, where the run has them.

    Raises:
        ValueError: ``run_dir`` is not a run directory (no metrics.jsonl).
        ImportError: matplotlib is missing.
    """
    run_dir = Path(run_dir)
    lines = _metrics_lines(run_dir)
    plt = _pyplot()
    out = run_dir / "plots"
    out.mkdir(exist_ok=True)
    paths = []
    figures = [key for key in TRAINING if any(line.get(key) is not None for line in lines)]
    figures += sorted({k for line in lines for k, v in line.items() if k.startswith("eval_") and isinstance(v, float)})
    if figures:
        fig, axes = _column(plt, len(figures), "step", f"{run_dir.name}: metrics.jsonl")
        for ax, key in zip(axes, figures):
            for stage, (steps, values) in sorted(_per_stage(lines, key).items()):
                ax.plot(steps, values, marker=".", label=f"stage {stage}")
            ax.set_ylabel(key)
            ax.legend(fontsize="small")
        paths.append(_save(plt, fig, out / "curves.png"))
    summary = run_dir / "summary.json"
    curve = (json.loads(summary.read_text()).get("curve") or []) if summary.is_file() else []
    shown = [k for k, v in curve[0].items() if isinstance(v, float) and k != "ready_s"] if curve else []
    if shown:
        fig, axes = _column(plt, len(shown), "wall-clock seconds since training started",
                            f"{run_dir.name}: the snapshots' evaluations against time")
        for ax, key in zip(axes, shown):
            ax.plot([p["ready_s"] for p in curve], [p.get(key) for p in curve], marker=".")
            ax.set_ylabel(f"test {key}")
        paths.append(_save(plt, fig, out / "eval_vs_time.png"))
    stages = len(list((run_dir / "events").glob("stage-*.jsonl")))
    if stages:
        fig, ax = plt.subplots(figsize=(9, 1.2 + 1.1 * stages))
        _timeline(ax, run_dir, f"{run_dir.name}: what each stage computes (a window mid-run)")
        paths.append(_save(plt, fig, out / "timeline.png"))
    return paths
