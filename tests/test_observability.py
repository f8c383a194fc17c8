"""What users look at: ``--tensorboard`` event files and ``python -m dni_async plot``; the pieces without processes,
then one real 2-stage run that feeds both."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from helpers import ROOT, SUBSET, ok, stages

from dni_async.__main__ import main
from dni_async.config import PipelineConfig
from dni_async.metrics import JsonLines, Tee, tee
from dni_async.tensorboard import INSTALL_HINT, StageBoard, require_tensorboard, scalars, stage_board

PNG = b"\x89PNG\r\n\x1a\n"
LINE = {"stage": 0, "step": 9, "time": 1000.5, "samples_per_s": 2500.0, "queue_depth": {"forward": 1, "backward": 0},
        "rss_mb": 300.1, "sg_loss": 0.25, "sg_cosine": None, "stash": 3, "staleness": 2}


def _scalars_read_back(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar tag of a board's event files: its (step, value) points."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


# ------------------------------------------------------------------ no processes


def test_scalars_are_the_lines_numbers_under_its_names() -> None:
    assert scalars(LINE) == {"samples_per_s": 2500.0, "queue_depth/forward": 1.0, "queue_depth/backward": 0.0,
                             "rss_mb": 300.1, "sg_loss": 0.25, "stash": 3.0, "staleness": 2.0}
    assert scalars({"stage": 1, "step": 30, "time": 1.0, "eval_accuracy": 0.9, "eval_split": "test",
                    "eval_done": True}) == {"eval_accuracy": 0.9}


def test_board_writes_each_line_at_its_step(tmp_path: Path) -> None:
    with StageBoard(tmp_path, stage=0, stages=2) as board:
        board.write({"stage": 0, "step": 4, "time": 1000.0})  # nothing to show: no event file yet
        assert not (tmp_path / "stage-0").exists()
        board.write(LINE)
        board.write({**LINE, "step": 19, "sg_loss": 0.125})
    points = _scalars_read_back(tmp_path / "stage-0")
    assert set(points) == set(scalars(LINE))
    assert points["sg_loss"] == [(9, 0.25), (19, 0.125)]
    assert points["queue_depth/forward"] == [(9, 1.0), (19, 1.0)]


def test_a_fresh_board_removes_earlier_event_files(tmp_path: Path) -> None:
    for name in ("stage-0", "stage-1", "stage-3"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "events.out.tfevents.old").write_bytes(b"")
    StageBoard(tmp_path, stage=1, stages=4, resumed=True).close()  # a resumed run keeps them
    assert sorted(p.name for p in tmp_path.iterdir()) == ["stage-0", "stage-1", "stage-3"]
    StageBoard(tmp_path, stage=1, stages=2).close()  # its own folder
    assert sorted(p.name for p in tmp_path.iterdir()) == ["stage-0", "stage-3"]
    StageBoard(tmp_path, stage=0, stages=2).close()  # stage 0 also those of stages this run does not have
    assert list(tmp_path.iterdir()) == []


def test_stage_board_is_none_without_the_flag(tmp_path: Path) -> None:
    with stage_board(PipelineConfig(run_dir=str(tmp_path)), 0) as board:
        assert board is None
    with stage_board(PipelineConfig(run_dir=str(tmp_path), tensorboard=True, stages=2), 1) as board:
        assert isinstance(board, StageBoard) and board.log_dir == tmp_path / "tensorboard" / "stage-1"


def test_tee_writes_to_every_writer_and_is_nothing_alone(tmp_path: Path) -> None:
    seen: list[dict[str, Any]] = []

    class Recorder:
        def write(self, obj: dict[str, Any]) -> None:
            seen.append(obj)

    lines = JsonLines(tmp_path / "metrics.jsonl")
    assert tee(lines, None) is lines
    both = tee(lines, Recorder())
    assert isinstance(both, Tee)
    both.write(LINE)
    lines.close()
    assert seen == [LINE] and json.loads((tmp_path / "metrics.jsonl").read_text()) == LINE


def test_missing_tensorboard_is_a_clear_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # `import tensorboard` raises ImportError
    assert INSTALL_HINT == "--tensorboard needs the tensorboard package: pip install 'dni_async[tensorboard]'"
    with pytest.raises(ValueError, match=re.escape(INSTALL_HINT)):
        require_tensorboard()
    with pytest.raises(ValueError, match=re.escape(INSTALL_HINT)):
        stage_board(PipelineConfig(run_dir=str(tmp_path), tensorboard=True), 0)
    with stage_board(PipelineConfig(run_dir=str(tmp_path)), 0) as board:  # not asked for: not needed
        assert board is None


def test_plot_refuses_a_folder_that_is_not_a_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plot", str(tmp_path)]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err == f"error: {tmp_path} is not a run directory: it has no metrics.jsonl\n"
    assert not (tmp_path / "plots").exists()


def test_plot_without_matplotlib_says_what_to_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "metrics.jsonl").write_text(json.dumps(LINE) + "\n")
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert main(["plot", str(tmp_path)]) == 2
    assert capsys.readouterr().err == "error: plots need matplotlib: pip install 'dni_async[plot]'\n"


def test_plot_draws_what_the_run_has(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    lines = [{**LINE, "step": s} for s in (4, 9)] + [{"stage": 1, "step": s, "time": 1.0, "loss": 2.0 - s / 10}
                                                     for s in (4, 9)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    assert main(["plot", str(tmp_path)]) == 0  # no summary.json, no event logs: the curves only
    assert capsys.readouterr().out == f"wrote {tmp_path / 'plots' / 'curves.png'}\n"
    assert (tmp_path / "plots" / "curves.png").read_bytes().startswith(PNG)


# ------------------------------------------------------------- one real run


@pytest.fixture(scope="module")
def tensorboard_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-stage dni run of 30 steps with --tensorboard, metrics every 5 steps, evaluations every 10."""
    run_dir = tmp_path_factory.mktemp("observability") / "run"
    ok(stages(2, ["--stages", "2", "--mode", "dni", "--hidden-size", "64", "--num-layers", "2", "--steps", "30",
                  "--log-every", "5", "--eval-every", "10", "--snapshot-every", "10", "--tensorboard",
                  "--no-progress", "--data-dir", str(SUBSET), "--run-dir", str(run_dir)], timeout=90))
    return run_dir


@pytest.mark.process
def test_tensorboard_shows_what_metrics_jsonl_holds(tensorboard_run: Path) -> None:
    boards = {s: _scalars_read_back(tensorboard_run / "tensorboard" / f"stage-{s}") for s in (0, 1)}
    train_steps = [4, 9, 14, 19, 24, 29]
    common = {"samples_per_s", "queue_depth/forward", "queue_depth/backward", "rss_mb"}
    assert set(boards[0]) == common | {"sg_loss", "sg_cosine", "stash", "staleness"}
    assert set(boards[1]) == common | {"loss", "eval_accuracy", "eval_examples"}
    assert [step for step, _ in boards[0]["sg_loss"]] == train_steps
    assert [step for step, _ in boards[0]["sg_cosine"]] == train_steps
    assert [step for step, _ in boards[1]["loss"]] == train_steps
    assert [step for step, _ in boards[1]["eval_accuracy"]] == [10, 20, 30]
    lines = [json.loads(line) for line in (tensorboard_run / "metrics.jsonl").read_text().splitlines()]
    for line in lines:  # every figure, at its step (float32 in the event files)
        for tag, value in scalars(line).items():
            shown = dict(boards[line["stage"]][tag])[line["step"]]
            assert math.isclose(shown, value, rel_tol=1e-6), (line["stage"], line["step"], tag, shown, value)
    assert sum(len(scalars(line)) for line in lines) == sum(len(p) for b in boards.values() for p in b.values())


@pytest.mark.process
def test_plot_command_draws_the_runs_curves_and_timeline(tensorboard_run: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "dni_async", "plot", str(tensorboard_run)], cwd=ROOT,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    names = ("curves.png", "eval_vs_time.png", "timeline.png")
    assert result.stdout.splitlines() == [f"wrote {tensorboard_run / 'plots' / name}" for name in names]
    for name in names:
        assert (tensorboard_run / "plots" / name).read_bytes().startswith(PNG), name
