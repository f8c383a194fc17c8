"""The GPU check: stages on one GPU, both transports, no host sync on the hot path; one JSON + markdown report.

    bash launch/gpu_check.sh [OUT]          # installs what is missing, then runs this (OUT: docs/results/gpu/DATE)
    python launch/gpu_check.py --out OUT    # the same, where everything is installed

Within --budget-s (default 450 s) on one GPU, in this order:
  1. the CUDA tests (pytest -m cuda): the transport conformance suite against cuda-ipc, the staged sends under
     torch.cuda.set_sync_debug_mode("error"), 3-stage dni and backprop over both transports, gpipe/1f1b;
  2. one-way time of a 64 B and a 64 MiB message between two processes on cuda:0, over zmq (page-locked
     staging) and over cuda-ipc, device to device (the echo's tensor back on the GPU counts);
  3. 2- and then 4-stage jobs, all stages on cuda:0, the MLP 4 x 4096, batch 1024: dni, cdni, backprop over zmq
     and cuda-ipc under --sync-check (delayed and local over cuda-ipc at 2 stages), gpipe and 1f1b (torch's
     schedules, through the host: NCCL cannot put two ranks on one GPU).
With one GPU the stages share it: what this shows is correctness, what a message costs, and that no stage waits
on a host copy, not a speed-up across stages. Jobs left when the budget is spent are reported as not run.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
import xml.etree.ElementTree as ElementTree
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from dni_async.benchmark import BenchmarkSpec, environment, run_job  # noqa: E402
from dni_async.data.mnist import SUBSET_DIR  # noqa: E402
from dni_async.link_probe import measure_link  # noqa: E402
from dni_async.metrics import write_json_atomic  # noqa: E402

MiB = 1 << 20
MODEL = ["--task", "mnist-fcn", "--num-layers", "4", "--hidden-size", "4096", "--batch-size", "1024"]
CUDA_TESTS = ["tests/test_transport.py", "tests/test_device_sender.py", "tests/test_gpu.py"]
"""The test files with ``cuda`` tests (only these are collected: the others may import what the GPU machine lacks)."""
TARGET_RATIO = 10.0
"""cuda-ipc must move a 64 MiB message at least this many times faster than zmq."""


def jobs() -> list[tuple[int, str, str]]:
    """(stages, mode, transport) of every job, most important first."""
    out = []
    for stages in (2, 4):
        for mode in ("dni", "cdni", "backprop"):
            out += [(stages, mode, "cuda-ipc"), (stages, mode, "zmq")]
        if stages == 2:
            out += [(2, "delayed", "cuda-ipc"), (2, "local", "cuda-ipc")]
        out += [(stages, "gpipe", "torch"), (stages, "1f1b", "torch")]
    return out


def run_tests(out: Path, timeout: float) -> dict[str, Any]:
    """pytest -m cuda; its counts and the tail of its output."""
    xml = out / "pytest-cuda.xml"
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "cuda", "-rs", "-p", "no:cacheprovider", f"--junitxml={xml}",
           *CUDA_TESTS]
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
        tail, code = (proc.stdout + proc.stderr)[-3000:], proc.returncode
    except subprocess.TimeoutExpired as err:
        tail, code = f"timed out after {timeout:g} s\n{(err.stdout or b'')[-2000:]!r}", None
    counts: dict[str, Any] = {"exit_code": code, "tail": tail}
    if xml.exists():
        suite = ElementTree.parse(xml).getroot()
        suite = suite.find("testsuite") if suite.tag == "testsuites" else suite
        assert suite is not None
        counts.update({k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")})
        counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    return counts


def measure_links() -> dict[str, Any]:
    """One-way time of 64 B and 64 MiB, zmq and cuda-ipc, two processes on cuda:0."""
    links: dict[str, Any] = {}
    for name in ("zmq", "cuda-ipc"):
        try:
            link = measure_link(name, round_trips=20, timeout=60.0, device="cuda:0", sizes=(64, 64 * MiB))
            links[name] = {**link.to_dict(), "one_way_64mib_s": link.latency_s + 64 * MiB / link.bandwidth_bps}
        except Exception as err:  # a failure is a finding of the check: reported, not raised
            links[name] = {"error": f"{type(err).__name__}: {err}"}
    times = [links[n].get("one_way_64mib_s") for n in ("zmq", "cuda-ipc")]
    links["ratio_64mib"] = times[0] / times[1] if None not in times else None
    return links


def run_one(runs: Path, stages: int, mode: str, transport: str, steps: int, data_dir: str) -> dict[str, Any]:
    """One job; what the report says of it."""
    flags = [*MODEL, "--steps", str(steps), "--log-every", "50", "--devices", ",".join(["0"] * stages),
             "--data-dir", data_dir]
    flags += ["--microbatches", "4"] if transport == "torch" else ["--transport", transport, "--sync-check"]
    spec = BenchmarkSpec(modes=[mode], stages=stages, out=runs, entry=ROOT / "launch" / "pipeline.py", flags=flags,
                         job_timeout=120.0)
    row: dict[str, Any] = {"stages": stages, "mode": mode, "transport": transport,
                           "sync_check": transport != "torch"}
    start = time.perf_counter()
    try:
        summary = run_job(spec, mode, runs / f"{mode}-{transport}-{stages}")
    except RuntimeError as err:
        return {**row, "status": "failed", "error": str(err)[-1500:], "job_s": round(time.perf_counter() - start, 1)}
    rate = summary["samples_per_s"]
    return {**row, "status": "done", "job_s": round(time.perf_counter() - start, 1), "samples_per_s": rate,
            "step_ms": round(1000 * summary["batch_size"] / rate, 3) if rate else None,
            "busy_fraction": [s.get("busy_fraction") for s in summary["per_stage"]],
            "accuracy": (summary["final_eval"] or {}).get("accuracy"), "transport_used": summary["transport"]}


def verdict(report: dict[str, Any]) -> dict[str, bool]:
    runs, tests, links = report["runs"], report["tests"], report["links"]
    done = [r for r in runs if r["status"] == "done"]
    return {
        "cuda tests pass": tests.get("exit_code") == 0 and tests.get("passed", 0) > 0,
        "every job ran": len(done) == len(runs) and bool(runs),
        "sync check passed (every stage-loop job)": all(r["status"] == "done" for r in runs if r["sync_check"]),
        "both transports ran every stage-loop mode": {r["mode"] for r in done if r["transport"] == "zmq"}
        <= {r["mode"] for r in done if r["transport"] == "cuda-ipc"} and any(r["transport"] == "zmq" for r in done),
        f"cuda-ipc moves 64 MiB >= {TARGET_RATIO:g}x faster than zmq": (links.get("ratio_64mib") or 0) >= TARGET_RATIO,
    }


def markdown(report: dict[str, Any]) -> str:
    env, tests, links = report["env"], report["tests"], report["links"]

    def ms(v: Any) -> str:
        return "n/a" if v is None else f"{1000 * v:.3f}"

    lines = [f"# GPU check, {env['date']}", "",
             f"{', '.join(env['gpus'])}; torch {env['torch']}, CUDA {report['cuda']}; python {env['python']}; "
             f"{env['cpu_count']} CPUs. Command: `{report['command']}` ({report['wall_s']:.0f} s).", "",
             "## CUDA tests (`pytest -m cuda`)", "",
             f"{tests.get('passed', 0)} passed, {tests.get('failures', 0)} failed, {tests.get('errors', 0)} errors, "
             f"{tests.get('skipped', 0)} skipped (exit {tests.get('exit_code')}).", "",
             "## One message between two processes on cuda:0 (one way, median of 20 round trips / 2)", "",
             "| transport | 64 B (ms) | 64 MiB (ms) | bandwidth (GB/s) |", "| --- | --- | --- | --- |"]
    for name in ("zmq", "cuda-ipc"):
        link = links[name]
        if "error" in link:
            lines.append(f"| {name} | failed: {link['error'][:200]} | | |")
        else:
            lines.append(f"| {name} | {ms(link['latency_s'])} | {ms(link['one_way_64mib_s'])} | "
                         f"{link['bandwidth_bps'] / 1e9:.1f} |")
    ratio = links.get("ratio_64mib")
    lines += ["", f"64 MiB: cuda-ipc is {ratio:.1f}x faster than zmq." if ratio else "64 MiB: no ratio.", "",
              f"## Jobs: all stages on cuda:0, {' '.join(MODEL)}, {report['steps']} steps", "",
              "| stages | mode | transport | sync check | status | samples/s | step (ms) | busy fraction per stage | "
              "accuracy | job (s) |", "|" + " --- |" * 10]
    for r in report["runs"]:
        busy = ", ".join(f"{b:.2f}" for b in r.get("busy_fraction", []) if b is not None)
        rate = f"{r['samples_per_s']:,.0f}" if r.get("samples_per_s") else "n/a"
        acc = f"{r['accuracy']:.4f}" if r.get("accuracy") is not None else "n/a"
        lines.append(f"| {r['stages']} | {r['mode']} | {r['transport']} | {'yes' if r['sync_check'] else 'n/a'} | "
                     f"{r['status']} | {rate} | {r.get('step_ms', 'n/a')} | {busy} | {acc} | {r.get('job_s', '')} |")
    failed = [r for r in report["runs"] if r["status"] == "failed"]
    for r in failed:
        lines += ["", f"{r['mode']} {r['transport']} {r['stages']} stages failed:", "```", r["error"], "```"]
    lines += ["", "## Verdict", ""]
    lines += [f"- {'PASS' if ok else 'FAIL'}: {what}" for what, ok in report["verdict"].items()]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="report folder (report.json, report.md)")
    parser.add_argument("--runs-dir", type=Path, default=None, help="the jobs' run folders (default: OUT/runs)")
    parser.add_argument("--budget-s", type=float, default=450.0, help="stop starting jobs after this (default 450)")
    parser.add_argument("--steps", type=int, default=200, help="training steps per job (default 200)")
    parser.add_argument("--data-dir", default=str(SUBSET_DIR),
                        help="MNIST folder (default: the bundled subset)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_check: CUDA is not available here", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    report: dict[str, Any] = {"env": environment(1, 0), "cuda": torch.version.cuda, "steps": args.steps,
                              "command": " ".join(["python", "launch/gpu_check.py", *(argv or sys.argv[1:])])}
    print("gpu_check: pytest -m cuda", flush=True)
    report["tests"] = run_tests(args.out, timeout=min(240.0, args.budget_s / 2))
    print(f"gpu_check: tests {report['tests'].get('passed')} passed; links", flush=True)
    report["links"] = measure_links()
    report["runs"] = []
    for stages, mode, transport in jobs():
        if time.perf_counter() - start > args.budget_s:
            report["runs"].append({"stages": stages, "mode": mode, "transport": transport,
                                   "sync_check": transport != "torch", "status": "not run (budget spent)"})
            continue
        row = run_one(args.runs_dir or args.out / "runs", stages, mode, transport, args.steps, args.data_dir)
        print(f"gpu_check: {stages} stages {mode} {transport}: {row['status']} {row.get('samples_per_s')}",
              flush=True)
        report["runs"].append(row)
    report["wall_s"] = time.perf_counter() - start
    report["verdict"] = verdict(report)
    write_json_atomic(args.out / "report.json", report)
    (args.out / "report.md").write_text(markdown(report))
    print(markdown(report))
    return 0 if all(report["verdict"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
