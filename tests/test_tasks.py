"""The copy / repeat-copy and language-model tasks: data, scoring, curriculum, short runs in-process and as
2-stage pipelines."""

from __future__ import annotations

import gzip
import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import ok, stages
from test_text_copy import write_corpus

from dni_async.config import PipelineConfig
from dni_async.data.make_subset import make_text_subset
from dni_async.data.text import TEXT_SUBSET_DIR, Corpus, split_file
from dni_async.recurrent import TruncatedLSTM
from dni_async.stage_cost import stage_step_times
from dni_async.task import unpack
from tasks import get_pipeline_task
from tasks.copy import BITS, Curriculum, bit_errors, bits_summary, copy_loss, sequence_items
from tasks.copy import pipeline_task as copy_pipeline_task
from tasks.copy import train as train_copy
from tasks.lm import nll_sums, perplexity, resolve_corpus_dir, stream_items
from tasks.lm import train as train_lm


def test_sequence_items_cut_a_batch_into_padded_chunks() -> None:
    items = [unpack(i) for i in sequence_items(5, 3, 2, 3, 4, torch.Generator().manual_seed(0), {"sequence": 7})]
    total = 3 + 1 + 3 * 2 + 1  # data, delimiter, two copies, end marker
    assert len(items) == math.ceil(total / 4)
    assert [m["reset"] for _, _, m in items] == [True, False, False]
    assert [m["last"] for _, _, m in items] == [False, False, True]
    assert all(m["length"] == 3 and m["sequence"] == 7 for _, _, m in items)
    x = torch.cat([i[0] for i in items], dim=1)
    y = torch.cat([i[1] for i in items], dim=1)
    assert x.shape == (5, 12, BITS + 2) and y.shape == (5, 12, BITS + 2)
    assert y[:, total:].abs().sum() == 0, "padding is unscored"
    assert torch.equal(y[:, 4:7, :BITS], x[:, :3, :BITS]) and torch.equal(y[:, 7:10, :BITS], x[:, :3, :BITS])
    assert x[0, 3, BITS + 1] == pytest.approx(2 / 3), "repeat count channel"


def test_copy_scoring_counts_wrong_bits_per_sequence() -> None:
    items = [unpack(i) for i in sequence_items(4, 2, 1, 1, 10, torch.Generator().manual_seed(0))]
    (_, y, _), = items
    targets = y[..., :-1]
    perfect = (targets * 2 - 1) * 10
    assert {k: float(v) for k, v in bit_errors(perfect, y).items()} == {"bit_errors": 0.0, "sequences": 4.0}
    wrong = perfect.clone()
    wrong[0, 3, 0] *= -1          # a scored position: one wrong bit
    wrong[1, 0, 0] = -wrong[1, 0, 0] if wrong[1, 0, 0] else 5.0  # an unscored input step: ignored
    assert bits_summary(bit_errors(wrong, y)) == {"bits_error": 0.25, "sequences": 4}
    assert copy_loss(perfect, y) < 1e-2 < copy_loss(torch.zeros_like(perfect), y)


def test_curriculum_moves_on_after_a_window_below_the_threshold() -> None:
    cur = Curriculum(threshold=0.15, window=3)
    for error in (0.1, 0.1):
        cur.record(1, error)
    assert cur.length == 1
    cur.record(2, 0.0)  # a stale report of another length is ignored
    cur.record(1, 0.3)
    assert cur.length == 1, "the window is full but its mean, 0.167, is not below 0.15"
    cur.record(1, 0.0)
    assert (cur.length, cur.longest_solved) == (2, 1), "the last three average 0.133"
    assert cur.errors == [] and cur.error is None
    for error in (0.5, 0.4, 0.6):
        cur.record(2, error)
    assert (cur.length, cur.longest_solved) == (2, 1)
    assert cur.error == pytest.approx(0.5)


def test_copy_pipeline_layers_take_the_sg_scale() -> None:
    task = copy_pipeline_task(PipelineConfig(task="copy", mode="dni", num_layers=2, hidden_size=8, sg_scale=0.25))
    layers = [m for block in task.blocks for m in block.modules() if isinstance(m, TruncatedLSTM)]
    assert len(layers) == 2 and all(layer.sg is not None and layer.sg_scale == 0.25 for layer in layers)
    with pytest.raises(ValueError, match="--sg-scale"):
        PipelineConfig(task="copy", sg_scale=-1)


def test_lm_stream_chunks_predict_the_next_word() -> None:
    ids = torch.arange(103)
    items = [unpack(i) for i in stream_items(ids, 4, 5, {"split": "valid"})]
    assert len(items) == (103 // 4 - 1) // 5
    x, y, meta = items[1]
    assert x.shape == y.shape == (4, 5) and torch.equal(y, x + 1)
    assert meta == {"reset": False, "last": False, "split": "valid"} and items[-1][2]["last"]
    uniform = perplexity(nll_sums(torch.zeros(2, 3, 50), torch.randint(0, 50, (2, 3))))
    assert uniform["perplexity"] == pytest.approx(50.0) and uniform["words"] == 6
    with pytest.raises(ValueError, match="no chunk"):
        stream_items(torch.arange(5), 4, 5)


def test_corpus_folder_is_found_or_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_corpus(tmp_path / "kjv", "a b\n")
    assert resolve_corpus_dir(str(tmp_path)) == (tmp_path / "kjv", "kjv")
    monkeypatch.setenv("DNI_ASYNC_DATA", str(tmp_path / "kjv"))
    assert resolve_corpus_dir(None) == (tmp_path / "kjv", "kjv")
    with pytest.raises(FileNotFoundError, match="empty"):
        resolve_corpus_dir(str(tmp_path / "empty"))
    monkeypatch.delenv("DNI_ASYNC_DATA")
    folder, dataset = resolve_corpus_dir(None)
    assert dataset == "kjv-subset" and Corpus(folder).train.numel() > 100_000, "the bundled subset, gzipped"


def test_bundled_text_subset_is_the_start_of_the_corpus(tmp_path: Path, full_kjv: Path) -> None:
    """``make_text_subset`` on the KJV folder reproduces the bundled files byte for byte."""
    sizes = make_text_subset(full_kjv, tmp_path)
    for name in sizes:
        assert (tmp_path / name).read_bytes() == (TEXT_SUBSET_DIR / name).read_bytes()
    assert sum(sizes.values()) < 300_000


def test_copy_in_process_solves_length_one_with_a_temporal_sg() -> None:
    """Length 1 with a truncation of 2: the input and its copy lie in different chunks."""
    result = train_copy("copy", "dni", steps=1500, bptt=2, batch_size=32, hidden_size=64, lr=1e-2, sg_lr=1e-2,
                        progress=False)
    assert result["longest_solved"] >= 1 and result["chunks"] >= 1500


def test_lm_in_process_learns_on_real_text(tmp_path: Path) -> None:
    path = split_file(TEXT_SUBSET_DIR, "train")  # the first verses of the KJV, bundled
    assert path is not None
    lines = gzip.decompress(path.read_bytes()).decode().splitlines()
    folder = write_corpus(tmp_path, "\n".join(lines[:600]) + "\n", "\n".join(lines[600:660]) + "\n",
                          "\n".join(lines[660:720]) + "\n")
    result = train_lm(str(folder), "dni", steps=60, batch_size=8, bptt=10, hidden_size=32, vocab_size=500,
                      progress=False)
    assert result["vocab"] == 500
    assert result["valid"]["perplexity"] < 0.5 * 500, "60 steps must beat a uniform guess by far"
    assert math.isfinite(result["test"]["perplexity"])


@pytest.mark.process
@pytest.mark.parametrize("task,mode", [("copy", "dni"), ("repeat-copy", "cdni"), ("lm", "cdni"), ("copy", "delayed"),
                                       ("lm", "delayed"), ("repeat-copy", "local")])
def test_pipeline_runs_the_task(tmp_path: Path, task: str, mode: str) -> None:
    run = tmp_path / "run"
    extra = ["--data-dir", str(TEXT_SUBSET_DIR), "--vocab-size", "2000", "--bptt", "8", "--batch-size", "64"]
    extra = extra if task == "lm" else []
    ok(stages(2, ["--stages", "2", "--task", task, "--mode", mode, "--steps", "20", "--hidden-size", "32",
                  "--no-progress", "--run-dir", str(run), *extra], timeout=180))
    summary = json.loads((run / "summary.json").read_text())
    assert summary["task"] == task and summary["steps"] == 20 and summary["mode"] == mode
    if task == "lm":
        assert set(summary["evals"]) == {"valid", "test"} and summary["dataset"] == TEXT_SUBSET_DIR.name
        assert 1 < summary["evals"]["test"]["perplexity"] < 2000
    else:
        assert summary["final_eval"]["sequences"] == 4 * 32 and summary["final_eval"]["bits_error"] >= 0
        assert summary["task_result"]["bptt"] == 3 and summary["task_result"]["curriculum_length"] >= 1
        metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        assert any("eval_bits_error" in m for m in metrics)


@pytest.mark.process
def test_pipeline_curriculum_moves_on_from_the_relayed_error(tmp_path: Path) -> None:
    """Stage 0 runs the curriculum on the training error the last stage relays back through the gradients."""
    run = tmp_path / "run"
    ok(stages(2, ["--stages", "2", "--task", "copy", "--mode", "backprop", "--steps", "400", "--bptt", "4",
                  "--num-layers", "2", "--hidden-size", "64", "--lr", "1e-2", "--sg-lr", "1e-2", "--no-progress",
                  "--run-dir", str(run)], timeout=180))
    summary = json.loads((run / "summary.json").read_text())
    assert summary["task_result"]["longest_solved"] >= 1, summary["task_result"]
    assert summary["final_eval"]["length"] == summary["task_result"]["curriculum_length"]


def test_copy_data_resumes_mid_sequence_with_its_curriculum() -> None:
    """data_state after some items, then resume_data on a fresh task: the same next items, curriculum included."""
    config = PipelineConfig(task="copy", mode="dni", hidden_size=8, batch_size=4, steps=200)

    def read(task: Any, count: int, start: int) -> list[Any]:
        items = []
        batches = task.data()[0]
        for k in range(count):
            # the last stage relays a tiny error for every finished sequence: the curriculum moves on every 10
            task.latest.update(train_sequence=start + k, train_length=task.result()["curriculum_length"],
                               train_bits_error=0.0)
            items.append(next(batches))
        return items

    first = copy_pipeline_task(config)
    batches = first.data()[0]
    for k in range(37):
        first.latest.update(train_sequence=k, train_length=first.result()["curriculum_length"], train_bits_error=0.0)
        next(batches)
    state = first.data_state()
    reference = []
    for k in range(37, 67):
        first.latest.update(train_sequence=k, train_length=first.result()["curriculum_length"], train_bits_error=0.0)
        reference.append(next(batches))
    assert first.result()["curriculum_length"] > 2, "the curriculum must move while the items are read"
    second = copy_pipeline_task(config)
    second.latest.update(train_sequence=36, train_length=state["curriculum"]["length"], train_bits_error=0.0)
    second.resume_data(state)
    resumed = read(second, 30, 37)
    for (x, y, meta), (x2, y2, meta2) in zip(reference, resumed):
        assert meta == meta2
        torch.testing.assert_close((x, y), (x2, y2), rtol=0, atol=0)


@pytest.mark.parametrize("mode", ["delayed", "local", "cdni"])
def test_every_cnn_stage_trains_in_the_new_modes(mnist_dir: Path, mode: str) -> None:
    """mnist-cnn's feature maps through each stage's real train_step (no processes): the weight stash on
    convolutions, the local heads on flattened maps, the softmax SG on flattened maps."""
    config = PipelineConfig(stages=3, task="mnist-cnn", mode=mode, hidden_size=4, batch_size=16,
                            data_dir=str(mnist_dir))
    costs = stage_step_times(get_pipeline_task(config), config, repeats=1, warmup=1)
    assert [c["stage"] for c in costs] == [0, 1, 2] and all(c["step_s"] > 0 for c in costs)
    assert (costs[0]["sg_s"] > 0) == (mode == "cdni")
