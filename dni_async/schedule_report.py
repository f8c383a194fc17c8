"""The schedule model's reports: predicted against measured for a benchmark's results; the what-if of many stages."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .benchmark import BenchmarkSpec, job_config, parse_label
from .link_probe import Link
from .methods import METHODS, MODES
from .schedule_model import StageCost, predict, simulate

__all__ = ["LINKS", "TARGETS", "bubble_check", "markdown", "plot_what_if", "validate_results", "what_if"]

TARGETS = {2: 0.10, 3: 0.20, 4: 0.20}
"""Largest relative error of a prediction the model is held to, by stages (issue 15); more stages: the 4-stage one."""
LINKS = {"NVLink": Link(5e-6, 150e9), "InfiniBand": Link(20e-6, 25e9), "WAN": Link(1e-3, 1.25e9)}
"""The what-if's links: the issue's latencies, with bandwidths assumed (NVLink 150 GB/s, InfiniBand HDR 200 Gb/s,
a 10 Gb/s WAN)."""
WHAT_IF_STAGES = (4, 8, 16, 32, 64)
SG_FRACTIONS = (0.0, 0.1, 0.4)


def validate_results(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Each stage-run mode of a benchmark's ``results.json``: measured samples/s and busy fractions beside the
    model's, predicted from the stage costs, link and cores the benchmark measured (model output).

    Raises:
        ValueError: for a results file without the model's inputs (written before the model existed).
    """
    model = results.get("model") or {}
    if not model.get("link"):
        raise ValueError("these results have no measured link (results.json's 'model'): rerun the benchmark")
    link, cores = Link(**model["link"]), model["cores"]
    config = results["config"]
    spec = BenchmarkSpec(modes=config["modes"], stages=config["stages"], out=Path("."), entry=Path("."),
                         flags=config["flags"])
    rows = []
    for run in results["runs"]:
        if parse_label(run["mode"])[0] == "single":
            continue
        prediction = predict(job_config(spec, run["mode"]), run["stage_microbatch_s"] or run["stage_step_s"], link,
                             cores=cores, sharing_cost=model.get("sharing_cost", 1.0))
        error = prediction.samples_per_s / run["samples_per_s"] - 1
        target = TARGETS.get(run["stages"], TARGETS[4])
        rows.append({"mode": run["mode"], "stages": run["stages"], "measured": run["samples_per_s"],
                     "predicted": round(prediction.samples_per_s, 1), "error": round(error, 4),
                     "within_target": abs(error) <= target, "target": target,
                     "busy_measured": run["per_stage_busy_fraction"],
                     "busy_predicted": [round(b, 2) for b in prediction.busy]})
    return rows


def _equal_stages(mode: str, stages: int, stage_s: float, message_bytes: int, sg_fraction: float,
                  microbatches: int) -> list[StageCost]:
    """Equal stages for the what-if: a third of the work forward, two thirds backward; the SG's cost is
    ``sg_fraction`` of the stage's, a third of it its prediction; the pipelining schedules' microbatches split
    the batch's work and messages evenly (no per-microbatch overhead)."""
    method = METHODS[mode]
    split = microbatches if method.pipelining else 1
    sg = sg_fraction * stage_s if method.has_sg else 0.0
    return [StageCost(forward_s=stage_s / 3 / split, backward_s=2 * stage_s / 3 / split, sg_predict_s=sg / 3,
                      sg_update_s=2 * sg / 3, act_bytes=message_bytes // split if i < stages - 1 else 0,
                      grad_bytes=message_bytes // split if i > 0 and method.sends_gradients else 0)
            for i in range(stages)]


def what_if(stage_s: float = 0.01, message_bytes: int = 1 << 20, batch_size: int = 256,
            microbatches_per_stage: int = 4) -> dict[str, Any]:
    """Model output, not measured: every mode on 4 to 64 equal stages, a device each, over each of :data:`LINKS`,
    with the SG (dni, cdni) at each of :data:`SG_FRACTIONS` of a stage's cost. Window, queue and stash at the
    modes' defaults; gpipe and 1f1b with ``microbatches_per_stage`` x stages microbatches.

    Returns:
        ``assumptions`` and ``rows``: ``link``, ``sg_fraction``, ``stages``, ``mode``, ``samples_per_s``,
        ``vs_backprop``, ``bubble``.
    """
    rows: list[dict[str, Any]] = []
    for link_name, link in LINKS.items():
        for fraction in SG_FRACTIONS:
            for stages in WHAT_IF_STAGES:
                found = {}
                for mode, method in METHODS.items():
                    if fraction and not method.has_sg:
                        continue  # the SG's cost changes nothing else
                    m = microbatches_per_stage * stages
                    costs = _equal_stages(mode, stages, stage_s, message_bytes, fraction, m)
                    found[mode] = simulate(mode, costs, batch_size=batch_size, link=link,
                                           max_in_flight=method.defaults.get("max_in_flight", 0), microbatches=m,
                                           steps=8 if method.pipelining else 40)
                    rows.append({"link": link_name, "sg_fraction": fraction, "stages": stages, "mode": mode,
                                 "samples_per_s": round(found[mode].samples_per_s, 1),
                                 "bubble": round(found[mode].bubble, 4)})
    backprop = {(r["link"], r["stages"]): r["samples_per_s"] for r in rows if r["mode"] == "backprop"}
    for r in rows:
        r["vs_backprop"] = round(r["samples_per_s"] / backprop[r["link"], r["stages"]], 3)
    return {"assumptions": {"stage_s": stage_s, "message_bytes": message_bytes, "batch_size": batch_size,
                            "microbatches_per_stage": microbatches_per_stage,
                            "links": {k: v.to_dict() for k, v in LINKS.items()},
                            "max_in_flight": {m: v.defaults.get("max_in_flight", 0) for m, v in METHODS.items()},
                            "note": "model output, not measured"}, "rows": rows}


def bubble_check(stages: int, microbatches: int, mode: str = "1f1b") -> tuple[float, float]:
    """The model's bubble of ``mode`` on equal stages with free links, and (p - 1) / (m + p - 1)."""
    costs = [StageCost(forward_s=1.0, backward_s=2.0) for _ in range(stages)]
    found = simulate(mode, costs, batch_size=1, link=Link(0.0, float("inf")), microbatches=microbatches, steps=6)
    return found.bubble, (stages - 1) / (microbatches + stages - 1)


def markdown(rows: list[dict[str, Any]], columns: list[str]) -> str:
    """A markdown table of ``rows``' ``columns``."""
    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:,.1f}" if abs(v) >= 100 else f"{v:.3g}"
        return str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
    lines += ["| " + " | ".join(cell(r[c]) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def plot_what_if(result: dict[str, Any], path: Path) -> Path:
    """Throughput relative to locked backprop against stages, a line per mode, a panel per link (needs matplotlib)."""
    from .plots import _pyplot, _save

    plt = _pyplot()
    fig, axes = plt.subplots(1, len(LINKS), figsize=(4.2 * len(LINKS), 4), sharey=True)
    rows = result["rows"]
    for ax, link in zip(axes, LINKS):
        for mode in MODES:
            for fraction in SG_FRACTIONS if mode == "dni" else (0.0,):
                if mode == "cdni":
                    continue  # the same as dni at the same SG cost
                points = [r for r in rows if r["link"] == link and r["mode"] == mode and r["sg_fraction"] == fraction]
                label = f"dni, cdni (SG {fraction:.0%} of a stage)" if mode == "dni" else mode
                ax.plot([r["stages"] for r in points], [r["vs_backprop"] for r in points], marker=".", label=label,
                        ls="--" if mode == "dni" and fraction else "-")
        lat = LINKS[link].latency_s
        ax.set_title(f"{link}: {lat * 1e6:.0f} us, {LINKS[link].bandwidth_bps / 1e9:g} GB/s")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log", base=2)
        ax.set_xlabel("stages (a device each)")
    axes[0].set_ylabel("samples/s relative to locked backprop")
    axes[-1].legend(fontsize="small", loc="center left", bbox_to_anchor=(1.02, 0.5))
    fig.suptitle(f"MODEL OUTPUT, not measured: equal stages of {result['assumptions']['stage_s'] * 1e3:g} ms, "
                 f"{result['assumptions']['message_bytes'] / 2**20:g} MiB messages")
    return _save(plt, fig, path)  # type: ignore[no-any-return]
