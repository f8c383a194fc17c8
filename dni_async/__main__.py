"""Command line tools: ``python -m dni_async export RUN_DIR OUT.pt`` and ``python -m dni_async keys DIR --stages N``."""

from __future__ import annotations

import argparse
import sys


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
    args = parser.parse_args(argv)
    try:
        if args.command == "export":
            from .checkpoint import export_model

            step, count = export_model(args.run_dir, args.out)
            print(f"wrote {args.out}: {count} tensors of the set at step {step}")
        else:
            from .curve import generate_keys

            paths = generate_keys(args.directory, args.stages)
            print(f"wrote {len(paths)} key files to {args.directory}")
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
