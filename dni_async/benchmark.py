"""The side-by-side benchmark: DNI, cDNI, locked backprop and torch.distributed.pipelining on the same stages.

Every mode runs as its own ``torchrun`` job of ``launch/pipeline.py`` with the
same task, model, stages, data, batch size, threads and devices; repeats are
interleaved (A B C A B C ...) and reported as medians. See ``launch/benchmark.py``
for the command line and the README for what the figures mean.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from .config import MODES, SG_KINDS, PipelineConfig, config_from_args
from .core_probe import measure_sharing
from .link_probe import Link, measure_link
from .metrics import write_json_atomic
from .schedule_cost import scale_microbatch_costs, schedule_batch_times
from .schedule_model import predict
from .stage_cost import stage_step_times
from .task import PipelineTask
from .transport import resolve_transport

__all__ = ["BENCH_MODES", "BenchmarkSpec", "environment", "job_config", "parse_label", "run_job", "time_to_target",
           "run_benchmark"]

log = logging.getLogger("dni_async.benchmark")
BENCH_MODES = (*MODES, "single")
"""Pipeline modes, plus ``single``: the whole model in one process with every core (stages x threads)."""


def parse_label(label: str) -> tuple[str, list[str]]:
    """A benchmark entry ``MODE`` or ``MODE:SG`` (``cdni:softmax``): the mode and the flags it adds to every job's.

    Raises:
        ValueError: for an unknown mode or SG kind.
    """
    mode, _, sg = label.partition(":")
    if mode not in BENCH_MODES:
        raise ValueError(f"unknown mode {mode!r} in {label!r}; choose from {BENCH_MODES}")
    if sg and mode == "single":
        raise ValueError(f"{label!r}: the single process has no SG")
    if sg and sg not in SG_KINDS:
        raise ValueError(f"unknown SG kind {sg!r} in {label!r}; choose from {SG_KINDS}")
    return mode, ["--sg", sg] if sg else []


@dataclass
class BenchmarkSpec:
    """What to run: the modes, how often, and the flags every job shares."""

    modes: list[str]
    """Entries ``MODE`` or ``MODE:SG`` (:func:`parse_label`)."""
    stages: int
    out: Path
    entry: Path
    """``launch/pipeline.py``: what each torchrun job runs."""
    flags: list[str] = field(default_factory=list)
    """``launch/pipeline.py`` flags every job gets (task, model, steps, batch size, threads, ...)."""
    repeats: int = 3
    target_accuracy: float = 0.97
    job_timeout: float = 1800.0
    isolation_repeats: int = 20


def environment(threads_per_stage: int, stages: int) -> dict[str, Any]:
    """The machine and software a benchmark ran on."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() \
        else []
    return {"torch": torch.__version__, "python": platform.python_version(), "platform": platform.platform(),
            "host": socket.gethostname(), "cpu_model": cpu, "cpu_count": os.cpu_count(), "gpus": gpus,
            "stages": stages, "threads_per_stage": threads_per_stage,
            "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}


def time_to_target(curve: list[dict[str, Any]], target: float, key: str = "accuracy") -> float | None:
    """Seconds until the first point of ``curve`` at or above ``target`` was ready; None if none is."""
    for point in curve:
        if point.get(key) is not None and point[key] >= target:
            return float(point["ready_s"])
    return None


def _median_or_none(values: list[float | None]) -> float | None:
    """Median with None counted as 'never' (above every number); None when the median is 'never'."""
    ordered = sorted(values, key=lambda v: float("inf") if v is None else v)
    if not ordered:
        return None
    middle = ordered[(len(ordered) - 1) // 2: len(ordered) // 2 + 1]
    numbers = [v for v in middle if v is not None]
    return float(statistics.mean(numbers)) if len(numbers) == len(middle) else None


def _job_args(spec: BenchmarkSpec, label: str) -> list[str]:
    mode, extra = parse_label(label)
    if mode == "single":
        config = config_from_args(["--stages", "1", *spec.flags])
        return ["--stages", "1", "--mode", "backprop", *spec.flags,
                "--threads-per-stage", str(spec.stages * config.threads_per_stage)]
    return ["--stages", str(spec.stages), "--mode", mode, *spec.flags, *extra]


def job_config(spec: BenchmarkSpec, label: str) -> PipelineConfig:
    """The config of an entry's job (not ``single``)."""
    return config_from_args(_job_args(spec, label))


def _cost_args(spec: BenchmarkSpec, label: str) -> list[str]:
    """The flags whose stage work an entry does: its own, or locked backprop's for the pipelining schedules (the
    same block work, split into microbatches)."""
    if parse_label(label)[0] == "single" or config_from_args(_job_args(spec, label)).method.pipelining:
        return _job_args(spec, "backprop")
    return _job_args(spec, label)


def _micro_args(spec: BenchmarkSpec, label: str) -> list[str] | None:
    """The pipelining schedules' stage work as the model needs it: locked backprop's on one microbatch; None for
    the other entries."""
    if parse_label(label)[0] == "single":
        return None
    config = config_from_args(_job_args(spec, label))
    if not config.method.pipelining:
        return None
    return [*_job_args(spec, "backprop"), "--batch-size", str(config.batch_size // config.microbatches)]


def run_job(spec: BenchmarkSpec, mode: str, run_dir: Path) -> dict[str, Any]:
    """One torchrun job of entry ``mode``; its summary.json. Raises RuntimeError (with the log's tail) if it fails."""
    args = _job_args(spec, mode)
    nproc = 1 if mode == "single" else spec.stages
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
           str(spec.entry), *args, "--run-dir", str(run_dir), "--no-progress"]
    run_dir.mkdir(parents=True, exist_ok=True)
    log_path = run_dir / "log.txt"
    with open(log_path, "w") as out:
        out.write(" ".join(cmd) + "\n")
        out.flush()
        try:
            rc = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, timeout=spec.job_timeout).returncode
        except subprocess.TimeoutExpired:
            rc = None
    if rc != 0 or not (run_dir / "summary.json").exists():
        tail = "".join(log_path.read_text().splitlines(keepends=True)[-15:])
        what = "timed out" if rc is None else f"exited {rc}"
        raise RuntimeError(f"benchmark job {mode} {what} (log: {log_path}):\n{tail}")
    return json.loads((run_dir / "summary.json").read_text())


def _stage_costs(spec: BenchmarkSpec, get_task: Callable[[PipelineConfig], PipelineTask]) -> dict[tuple, list[dict]]:
    """Each stage's isolated step time for every kind of stage work the entries need, keyed by their flags."""
    costs: dict[tuple, list[dict[str, Any]]] = {}
    kinds = {tuple(_cost_args(spec, m)) for m in spec.modes if m != "single"}
    kinds |= {tuple(micro) for m in spec.modes if (micro := _micro_args(spec, m)) is not None}
    for args in sorted(kinds):
        config = config_from_args(list(args))
        costs[args] = stage_step_times(get_task(config), config, repeats=spec.isolation_repeats)
        log.info("isolated step times, %s %s: %s", config.mode, config.sg if config.method.has_sg else "",
                 ", ".join(f"stage {c['stage']} {c['step_s'] * 1e3:.1f} ms" for c in costs[args]))
    for label in spec.modes:
        if _micro_args(spec, label) is not None:
            config = job_config(spec, label)
            batch_s = schedule_batch_times(get_task(config), config)
            costs["schedule", label] = [{"batch_s": s} for s in batch_s]
            log.info("isolated batch times under %s: %s", config.method.schedule,
                     ", ".join(f"stage {i} {s * 1e3:.1f} ms" for i, s in enumerate(batch_s)))
    return costs


def _medians(spec: BenchmarkSpec, rounds: list[dict[tuple, list[dict]]], kind: tuple) -> list[dict[str, Any]]:
    """Each stage's isolated figures of one kind of stage work, medians over the rounds."""
    keys = [k for k in rounds[0][kind][0] if k != "stage"]
    return [{key: statistics.median(r[kind][i][key] for r in rounds) for key in keys} | {"stage": i}
            for i in range(spec.stages)]


def _ideal(spec: BenchmarkSpec, rounds: list[dict[tuple, list[dict]]], link: Link | None,
           cores: int, sharing: float) -> dict[str, Any]:
    """Per mode: each stage's isolated step time (median over the rounds), ``batch / max`` of them, and the
    schedule model's prediction from them (``dni_async.schedule_model``) with ``link`` on ``cores`` cores, the
    cost of sharing them ``sharing``."""
    batch = config_from_args(["--stages", str(spec.stages), *spec.flags]).batch_size
    out: dict[str, Any] = {}
    for mode in spec.modes:
        kind = tuple(_cost_args(spec, mode))
        if mode == "single" or not rounds:
            out[mode] = {"stage_step_s": None, "ideal": None, "microbatch": None, "predicted": None}
            continue
        assert link is not None, "the link is measured whenever a mode has stages"
        stages = _medians(spec, rounds, kind)
        micro, config = _micro_args(spec, mode), job_config(spec, mode)
        micro_costs = None
        if micro is not None:
            batch_s = [s["batch_s"] for s in _medians(spec, rounds, ("schedule", mode))]
            micro_costs = scale_microbatch_costs(_medians(spec, rounds, tuple(micro)), batch_s, config.microbatches)
        predicted = predict(config, micro_costs or stages, link, cores=cores, sharing_cost=sharing)
        out[mode] = {"stage_step_s": stages, "ideal": batch / max(c["step_s"] for c in stages),
                     "microbatch": micro_costs, "predicted": predicted.samples_per_s}
    return out


def _say(line: str) -> None:
    print(line, flush=True)


def run_benchmark(spec: BenchmarkSpec, get_task: Callable[[PipelineConfig], PipelineTask],
                  on_job: Callable[[str], None] = _say) -> dict[str, Any]:
    """Run every mode ``spec.repeats`` times, interleaved; write and return ``results.json``'s content."""
    if not spec.modes:
        raise ValueError(f"no modes given; choose from {BENCH_MODES}")
    for label in spec.modes:
        parse_label(label)
    base = config_from_args(["--stages", str(spec.stages), *spec.flags])
    spec.out.mkdir(parents=True, exist_ok=True)
    env = environment(base.threads_per_stage, spec.stages)
    on_job(f"environment: {json.dumps(env)}")
    rounds = []
    link, cores, sharing = None, len(os.sched_getaffinity(0)), 1.0
    if any(m != "single" for m in spec.modes):
        transport = resolve_transport(base.transport, torch.device("cpu"))  # the model is of CPU stages
        link = measure_link(transport, keep_memory=not base.system_malloc)
        on_job(f"link between two stages ({transport}): {link.latency_s * 1e6:.0f} us latency, "
               f"{link.bandwidth_bps / 1e9:.2f} GB/s")
        sharing = measure_sharing(spec.stages, cores, base.threads_per_stage, keep_memory=not base.system_malloc)
        on_job(f"{spec.stages} stages on {cores} cores: a step costs {sharing:.2f}x its CPU time alone")
    summaries: dict[str, list[dict[str, Any]]] = {m: [] for m in spec.modes}
    dirs: dict[str, list[str]] = {m: [] for m in spec.modes}
    total, done = spec.repeats * len(spec.modes), 0
    for repeat in range(spec.repeats):
        if any(m != "single" for m in spec.modes):  # measured before every round: the machine drifts
            rounds.append(_stage_costs(spec, get_task))
        for mode in spec.modes:
            run_dir = spec.out / "runs" / f"{mode}-{repeat}"
            start = time.perf_counter()
            summary = run_job(spec, mode, run_dir)
            done += 1
            summaries[mode].append(summary)
            dirs[mode].append(str(run_dir))
            acc = (summary.get("final_eval") or {}).get("accuracy")
            on_job(f"[{done}/{total}] {mode} repeat {repeat}: {summary['samples_per_s'] or 0:,.0f} samples/s, "
                   f"final accuracy {acc}, {time.perf_counter() - start:.1f} s")
    ideal = _ideal(spec, rounds, link, cores, sharing)
    runs = []
    for mode in spec.modes:
        rates = [s["samples_per_s"] for s in summaries[mode]]
        ttt = [time_to_target(s.get("curve") or [], spec.target_accuracy) for s in summaries[mode]]
        finals = [(s.get("final_eval") or {}).get("accuracy") for s in summaries[mode]]
        rate = statistics.median(rates)
        busy = [statistics.median(s["per_stage"][i]["cpu_fraction"] for s in summaries[mode])
                for i in range(len(summaries[mode][0]["per_stage"]))]
        runs.append({
            "mode": mode, "stages": 1 if parse_label(mode)[0] == "single" else spec.stages,
            "samples_per_s": round(rate, 1), "samples_per_s_all": [round(r, 1) for r in rates],
            "ideal_samples_per_s": round(ideal[mode]["ideal"], 1) if ideal[mode]["ideal"] else None,
            "predicted_samples_per_s": round(ideal[mode]["predicted"], 1) if ideal[mode]["predicted"] else None,
            "efficiency": round(rate / ideal[mode]["ideal"], 3) if ideal[mode]["ideal"] else None,
            "time_to_target_s": _median_or_none(ttt), "time_to_target_s_all": ttt,
            "final_accuracy": statistics.median(a for a in finals if a is not None) if any(
                a is not None for a in finals) else None,
            "final_accuracy_all": finals, "per_stage_busy_fraction": [round(b, 4) for b in busy],
            "stage_step_s": ideal[mode]["stage_step_s"], "stage_microbatch_s": ideal[mode]["microbatch"],
            "steps": summaries[mode][0]["steps"],
            "run_dir": dirs[mode][0], "run_dirs": dirs[mode],
        })
    ratios: dict[str, dict[str, float | None]] = {"samples_per_s": {}, "time_to_target_s": {}}
    ref = next((r for r in runs if r["mode"] == "backprop"), None)
    for r in runs:
        if ref is None:
            break
        ratios["samples_per_s"][r["mode"]] = round(r["samples_per_s"] / ref["samples_per_s"], 3)
        both = r["time_to_target_s"] is not None and ref["time_to_target_s"] is not None
        ratios["time_to_target_s"][r["mode"]] = round(r["time_to_target_s"] / ref["time_to_target_s"], 3) if both \
            else None
    results = {"env": env, "config": {"modes": spec.modes, "stages": spec.stages, "flags": spec.flags,
                                      "repeats": spec.repeats, "target_accuracy": spec.target_accuracy,
                                      "batch_size": base.batch_size, "task": base.task},
               "runs": runs, "ratios": ratios,
               "model": {"link": link.to_dict() if link is not None else None, "cores": cores,
                         "sharing_cost": sharing}}
    write_json_atomic(spec.out / "results.json", results)
    return results
