"""Command line tools: ``python -m dni_async export RUN_DIR OUT.pt``, ``keys DIR --stages N``, ``plot RUN_DIR``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

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
    args = parser.parse_args(argv)
    try:
        if args.command == "export":
            from .checkpoint import export_model

            step, count = export_model(args.run_dir, args.out)
            print(f"wrote {args.out}: {count} tensors of the set at step {step}")
        elif args.command == "plot":
            from .plots import plot_run

            for path in plot_run(Path(args.run_dir)):
                print(f"wrote {path}")
        else:
            from .curve import generate_keys

            paths = generate_keys(args.directory, args.stages)
            print(f"wrote {len(paths)} key files to {args.directory}")
    except (ValueError, FileNotFoundError, ImportError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
