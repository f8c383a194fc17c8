"""Command line tools: ``python -m dni_async export RUN_DIR OUT.pt``, ``keys DIR --stages N``, ``plot RUN_DIR``,
``model ...``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dni_async", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    export = commands.add_parser("export", help="assemble a run's newest complete checkpoint set into one plain "
                                                "state dict (loads with torch alone)")
    export.add_argument("run_dir", metavar="RUN_DIR", help="run folder with a checkpoints/ subfolder")
    export.add_argument("out", metavar="OUT.pt", help="file to write")
    keys = commands.add_parser("keys", help="make CURVE key pairs for the stages of a run (--curve-keys DIR)")
    keys.add_argument("directory", metavar="DIR", help="folder to write the keys to (created)")
    keys.add_argument("--stages", type=int, required=True, help="number of stages")
    plot = commands.add_parser("plot", help="draw a run's curves (metrics.jsonl, summary.json) and a per-stage "
                                            "timeline (event logs) into RUN_DIR/plots (needs matplotlib)")
    plot.add_argument("run_dir", metavar="RUN_DIR", help="run folder with a metrics.jsonl")
    model = commands.add_parser(
        "model", help="MODEL OUTPUT: predict samples/s and per-stage busy fractions of a mode from stage costs "
                      "(a discrete-event model of the stage loops); launch/pipeline.py flags after the options "
                      "describe the run (--mode, --stages, --batch-size, --max-in-flight, --microbatches, ...)")
    use = model.add_mutually_exclusive_group(required=True)
    use.add_argument("--results", type=Path, metavar="RESULTS.json",
                     help="a benchmark's results.json: every mode predicted from the stage costs, link and cores "
                          "it measured, beside the measured samples/s")
    use.add_argument("--costs", type=Path, metavar="COSTS.json",
                     help="a JSON list, per stage, of forward_s, backward_s, sg_predict_s, sg_update_s, optimizer_s, "
                          "act_bytes, grad_bytes, input_s (per microbatch for gpipe/1f1b): predict one run")
    use.add_argument("--what-if", action="store_true",
                     help="every mode on 4 to 64 equal stages, a device each, over NVLink, InfiniBand and a WAN")
    model.add_argument("--latency-us", type=float, default=200.0, help="--costs: link latency (default: 200)")
    model.add_argument("--bandwidth-gbps", type=float, default=2.5,
                       help="--costs: link bandwidth, GB/s (default: 2.5)")
    model.add_argument("--cores", type=float, default=None,
                       help="--costs: cores the stages share (default: one per stage)")
    model.add_argument("--sharing-cost", type=float, default=1.0,
                       help="--costs: where the stages have more threads than --cores, the CPU time of a step "
                            "over its time alone (the benchmark measures it: results.json's model.sharing_cost; "
                            "default: 1.0)")
    model.add_argument("--out", type=Path, default=None,
                       help="write the predictions as JSON here (--what-if: a folder for what_if.json and "
                            "what_if.png)")
    args, rest = parser.parse_known_args(argv)
    if rest and args.command != "model":
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    try:
        if args.command == "export":
            from .checkpoint import export_model

            step, count = export_model(args.run_dir, args.out)
            print(f"wrote {args.out}: {count} tensors of the set at step {step}")
        elif args.command == "plot":
            from .plots import plot_run

            for path in plot_run(Path(args.run_dir)):
                print(f"wrote {path}")
        elif args.command == "model":
            _model(args, rest)
        else:
            from .curve import generate_keys

            paths = generate_keys(args.directory, args.stages)
            print(f"wrote {len(paths)} key files to {args.directory}")
    except (ValueError, FileNotFoundError, ImportError, json.JSONDecodeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


def _model(args: argparse.Namespace, flags: list[str]) -> None:
    """``python -m dni_async model``: print the model's table (and write it with ``--out``)."""
    from .config import config_from_args
    from .link_probe import Link
    from .schedule_model import predict
    from .schedule_report import bubble_check, markdown, plot_what_if, validate_results, what_if

    print("MODEL OUTPUT (dni_async.schedule_model), not a measurement")
    out: Any
    if args.results is not None:
        if flags:
            raise ValueError(f"--results takes its runs' flags from the file; unexpected {' '.join(flags)}")
        out = validate_results(json.loads(args.results.read_text()))
        print(markdown(out, ["mode", "stages", "measured", "predicted", "error", "within_target", "busy_measured",
                             "busy_predicted"]))
    elif args.costs is not None:
        config = config_from_args(flags)
        link = Link(args.latency_us * 1e-6, args.bandwidth_gbps * 1e9)
        prediction = predict(config, json.loads(args.costs.read_text()), link, cores=args.cores,
                             sharing_cost=args.sharing_cost)
        out = {"mode": config.mode, "stages": config.stages, **prediction.to_dict()}
        print(markdown([out], ["mode", "stages", "samples_per_s", "step_s", "bubble", "busy"]))
    else:
        if flags:
            raise ValueError(f"--what-if takes no run flags; unexpected {' '.join(flags)}")
        out = what_if()
        rows = [r for r in out["rows"] if r["link"] == "InfiniBand"]
        print(markdown(rows, ["stages", "mode", "sg_fraction", "samples_per_s", "vs_backprop", "bubble"]))
        out["bubble_1f1b"] = [dict(zip(("stages", "microbatches", "model", "formula"), (p, m, *bubble_check(p, m))))
                              for p in (4, 8, 16, 32, 64) for m in (p, 4 * p)]
        print(markdown(out["bubble_1f1b"], ["stages", "microbatches", "model", "formula"]))
    if args.out is not None:
        from .metrics import write_json_atomic

        path = args.out / "what_if.json" if args.what_if else args.out
        if args.what_if:
            args.out.mkdir(parents=True, exist_ok=True)
        write_json_atomic(path, out)
        print(f"wrote {path}")
        if args.what_if:
            print(f"wrote {plot_what_if(out, args.out / 'what_if.png')}")


if __name__ == "__main__":
    raise SystemExit(main())
