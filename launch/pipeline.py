"""Entry point: ``python launch/pipeline.py --stages N [flags]``.

Started this way it checks the input once, then starts the N stage processes
itself through torchrun's own launcher. ``torchrun --standalone
--nproc-per-node N launch/pipeline.py --stages N`` works too (then rank 0
checks the input, inside the run).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import NoReturn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: `tasks` lives there

from dni_async.config import add_arguments, config_from_args  # noqa: E402
from dni_async.lifecycle import validate  # noqa: E402
from dni_async.pipeline import run_pipeline  # noqa: E402
from dni_async.runtime import LaunchError  # noqa: E402
from tasks import get_pipeline_task  # noqa: E402

VALIDATED = "DNI_ASYNC_VALIDATED"
"""Set by the launcher for the stage processes it starts: the input was checked already."""


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line and exit 2, like every other refusal."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {message}\n")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = _Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    args = parser.parse_args(argv)
    launcher = "RANK" not in os.environ
    try:
        config = config_from_args(args)
        task = get_pipeline_task(config)
        if launcher or (VALIDATED not in os.environ and os.environ["RANK"] == "0"):
            validate(task, config)
    except (ValueError, FileNotFoundError) as err:
        parser.error(str(err))
    if launcher:
        from torch.distributed.run import main as torchrun

        os.environ[VALIDATED] = "1"
        os.environ.setdefault("OMP_NUM_THREADS", str(config.threads_per_stage))  # each stage sets its own threads
        torchrun(["--standalone", "--nproc-per-node", str(config.stages), __file__, *argv])
        return 0
    try:
        if config.method.pipelining:  # imported only here: torch.distributed.pipelining takes ~1.5 s to import
            from dni_async.pipelining import run_pipelining

            run_pipelining(task, config)
        else:
            run_pipeline(task, config)
    except (ValueError, LaunchError) as err:  # bad input or launch, found before training
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


def _exit_now(code: int) -> NoReturn:
    """End a stage process without the interpreter's teardown (about a second with torch loaded): the run has
    closed its files, sockets and process group by now; only the standard streams and logging need flushing."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    code = main()
    if "RANK" in os.environ:
        _exit_now(code)
    raise SystemExit(code)
