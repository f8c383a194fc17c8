"""Entry point: ``torchrun --standalone --nproc-per-node N launch/pipeline.py --stages N [flags]``.

Started without torchrun (``python launch/pipeline.py --stages N``) it starts
the N stage processes itself through torchrun's own launcher.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: `tasks` lives there

from dni_async.config import add_arguments, config_from_args  # noqa: E402
from dni_async.lifecycle import setup_logging, validate  # noqa: E402
from dni_async.pipeline import run_pipeline  # noqa: E402
from dni_async.pipelining import run_pipelining  # noqa: E402
from dni_async.runtime import LaunchError  # noqa: E402
from tasks import get_pipeline_task  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        config = config_from_args(args)
        task = get_pipeline_task(config)
        validate(task, config)
    except (ValueError, FileNotFoundError) as err:
        parser.error(str(err))
    if "RANK" not in os.environ:
        from torch.distributed.run import main as torchrun

        setup_logging("launcher")
        torchrun(["--standalone", "--nproc-per-node", str(config.stages), __file__, *argv])
        return 0
    try:
        (run_pipelining if config.method.pipelining else run_pipeline)(task, config)
    except (ValueError, LaunchError) as err:  # bad input or launch, found before training
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
