"""Entry point: ``python launch/pipeline.py --stages N [flags]``.

Started this way it checks the input once, then starts the N stage processes
itself through torchrun's own launcher. ``torchrun --standalone
--nproc-per-node N launch/pipeline.py --stages N`` works too (then rank 0
checks the input, inside the run).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import NoReturn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: `tasks` lives there

from dni_async.config import PipelineConfig, add_arguments, config_from_args  # noqa: E402
from dni_async.divergence import Diverged  # noqa: E402
from dni_async.lifecycle import validate  # noqa: E402
from dni_async.metrics import write_json_atomic  # noqa: E402
from dni_async.pipeline import run_pipeline  # noqa: E402
from dni_async.rundir import lock_run_dir  # noqa: E402
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
            lock_run_dir(config.run_dir)  # held until this process ends: the launcher, or rank 0 under torchrun
    except (ValueError, FileNotFoundError) as err:
        parser.error(str(err))
    if launcher:
        return _launch(config, argv)
    try:
        if config.method.pipelining:  # imported only here: torch.distributed.pipelining takes ~1.5 s to import
            from dni_async.pipelining import run_pipelining

            run_pipelining(task, config)
        else:
            run_pipeline(task, config)
    except (ValueError, LaunchError) as err:  # bad input or launch, found before training
        print(f"error: {err}", file=sys.stderr)
        return 2
    except Diverged:  # said already, by the stage's log ("failed: Diverged: diverged at step ...")
        return 1
    return 0


def _launch(config: PipelineConfig, argv: list[str]) -> int:
    """Start the stages through torchrun's launcher; a run that did not finish ends with one line saying why
    instead of torchrun's report: exit 2 for a refusal inside the run (it leaves the run folder as it was), 1 for
    a failure, 128 + the signal for a stop."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun

    os.environ[VALIDATED] = "1"
    os.environ.setdefault("OMP_NUM_THREADS", str(config.threads_per_stage))  # each stage sets its own threads
    launched = time.time()
    try:
        torchrun(["--standalone", "--nproc-per-node", str(config.stages), __file__, *argv])
    except ChildFailedError as err:
        if any(f.exitcode == 2 for f in err.failures.values()):  # refused: the stage said why ("error: ...")
            return 2
        rank, failure = err.get_first_failure()
        _say_ending(config, launched, f"stage {rank} exited with code {failure.exitcode}")
        return 1
    except SignalException as err:  # SIGTERM, SIGHUP, SIGINT: torchrun has stopped the stages
        _say_ending(config, launched, f"the launcher was stopped by {err.sigval.name}")
        return 128 + int(err.sigval)
    return 0


def _say_ending(config: PipelineConfig, launched: float, cause: str) -> None:
    """One line on a run that did not finish, from the summary.json rank 0 writes on every ending it sees. Where
    rank 0 began (its stage file is this run's) but was killed before it wrote one, the launcher writes it; a run
    that ended before it began leaves the folder alone."""
    run_dir = Path(config.run_dir)
    summary, stage_file = run_dir / "summary.json", run_dir / "stages" / "stage-0.json"
    if not stage_file.exists() or stage_file.stat().st_mtime < launched:
        print(f"error: {cause}", file=sys.stderr)
        return
    if summary.exists():
        ending = json.loads(summary.read_text())
    else:
        ending = {"status": "failed", "reason": cause, "mode": config.mode, "stages": config.stages,
                  "config": config.to_dict()}
        with contextlib.suppress(OSError):  # a full disk: the line below is all there is
            write_json_atomic(summary, ending)
    if ending.get("status") == "done":  # rank 0 finished; another stage failed after it
        print(f"error: {cause}", file=sys.stderr)
    else:
        print(f"error: run {ending['status']}: {ending['reason']} (outputs in {config.run_dir})", file=sys.stderr)


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
