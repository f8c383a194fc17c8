"""Benchmark: every method (DNI, delayed, local, ...), locked backprop and torch.distributed.pipelining, side by side.

    python launch/benchmark.py --stages 2 --modes dni,cdni,cdni:softmax,delayed,local,backprop,1f1b --out DIR

Each mode runs as its own torchrun job of launch/pipeline.py on the same model,
stages, data, batch size, threads and devices; repeats are interleaved and
reported as medians. Flags this script does not know (--num-layers,
--hidden-size, --lr, --data-dir, ...) go to every job as they are.

Writes DIR/results.json (env, runs, ratios), DIR/throughput.png,
DIR/accuracy_vs_time.png, DIR/timeline.png, and each job's run folder under
DIR/runs/. Modes: dni, cdni, delayed, local, backprop, gpipe, 1f1b, and single
(the whole model in one process using stages x threads-per-stage threads); an
entry MODE:SG runs MODE with --sg SG (cdni:softmax), so one benchmark can
compare SG kinds. A flag given to every job that a mode does not use (--sg for
backprop, say) is ignored by that mode.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the repository root: `tasks` lives there

from dni_async.benchmark import BENCH_MODES, BenchmarkSpec, run_benchmark  # noqa: E402
from dni_async.config import config_from_args  # noqa: E402
from dni_async.plots import plot_results  # noqa: E402
from tasks import get_pipeline_task  # noqa: E402

QUICK = {"steps": 40, "repeats": 1, "snapshot_every": 10, "isolation_repeats": 5}


def _table(results: dict) -> str:
    rows = ["| mode | samples/s (median) | ideal | efficiency | time to target (s) | final accuracy | "
            "x backprop (samples/s) | x backprop (time to target) |", "|" + " --- |" * 8]
    def f(v: object, fmt: str) -> str:
        return "n/a" if v is None else format(v, fmt)

    ratios = results["ratios"]
    for r in results["runs"]:
        rows.append(f"| {r['mode']} | {r['samples_per_s']:,.0f} | {f(r['ideal_samples_per_s'], ',.0f')} | "
                    f"{f(r['efficiency'], '.2f')} | {f(r['time_to_target_s'], '.1f')} | "
                    f"{f(r['final_accuracy'], '.4f')} | {f(ratios['samples_per_s'].get(r['mode']), '.2f')} | "
                    f"{f(ratios['time_to_target_s'].get(r['mode']), '.2f')} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stages", type=int, default=2, help="stages (processes) per job (default: 2)")
    parser.add_argument("--task", default="mnist-fcn", help="task (default: mnist-fcn)")
    parser.add_argument("--modes", default="dni,cdni,delayed,local,backprop,gpipe,1f1b",
                        help=f"comma list from {','.join(BENCH_MODES)}, each optionally MODE:SG (default: "
                             f"%(default)s)")
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument("--steps", type=int, default=None, help="training steps per job (default: 1000; --quick 40)")
    parser.add_argument("--time-budget", type=float, default=None, metavar="SECONDS",
                        help="stop each job's training after this many seconds (default: none)")
    parser.add_argument("--batch-size", type=int, default=256, help="batch size (default: 256)")
    parser.add_argument("--microbatches", type=int, default=4, help="gpipe, 1f1b: microbatches (default: 4)")
    parser.add_argument("--threads-per-stage", type=int, default=1, help="CPU threads per stage (default: 1)")
    parser.add_argument("--repeats", type=int, default=None, help="runs of each mode, interleaved (default: 3)")
    parser.add_argument("--target-accuracy", type=float, default=0.97,
                        help="test accuracy for time-to-accuracy (default: %(default)s)")
    parser.add_argument("--snapshot-every", type=int, default=None,
                        help="steps between the weight snapshots evaluated for accuracy against time "
                             "(default: steps / 10; with only --time-budget: 50)")
    parser.add_argument("--job-timeout", type=float, default=1800.0, help="seconds before a job is killed")
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run (40 steps, 1 repeat, snapshots every 10 steps): files, not figures")
    args, passthrough = parser.parse_known_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    steps = args.steps if args.steps is not None else (QUICK["steps"] if args.quick else 1000)
    repeats = args.repeats if args.repeats is not None else (QUICK["repeats"] if args.quick else 3)
    snapshot_every = args.snapshot_every
    if snapshot_every is None:
        snapshot_every = QUICK["snapshot_every"] if args.quick else (
            50 if args.time_budget and args.steps is None else max(1, steps // 10))
    if min(steps, repeats, snapshot_every, args.stages) < 1:
        parser.error("--steps, --repeats, --snapshot-every and --stages must be >= 1")
    if not 0 < args.target_accuracy <= 1:
        parser.error("--target-accuracy must be in (0, 1]")
    flags = ["--task", args.task, "--batch-size", str(args.batch_size), "--microbatches", str(args.microbatches),
             "--threads-per-stage", str(args.threads_per_stage), "--snapshot-every", str(snapshot_every),
             "--steps", str(steps if args.steps is not None or not args.time_budget else 10**9), *passthrough]
    if args.time_budget:
        flags += ["--time-budget", str(args.time_budget)]
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    try:
        config_from_args(["--stages", str(args.stages), *flags])  # bad flags fail here, before any job
        spec = BenchmarkSpec(modes=modes, stages=args.stages, out=args.out, entry=ROOT / "launch" / "pipeline.py",
                             flags=flags, repeats=repeats, target_accuracy=args.target_accuracy,
                             job_timeout=args.job_timeout,
                             isolation_repeats=QUICK["isolation_repeats"] if args.quick else 20)
        results = run_benchmark(spec, get_pipeline_task)
    except (ValueError, FileNotFoundError) as err:
        parser.error(str(err))
    except RuntimeError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    for path in plot_results(results, args.out):
        print(f"wrote {path}")
    print(f"wrote {args.out / 'results.json'}\n\n{_table(results)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
