"""Per-stage atomic checkpoints, a manifest per complete set, resume from the newest set, export of a plain model.

Layout of ``RUN_DIR/checkpoints``::

    step-00000200/stage-0.pt ... stage-<S-1>.pt   one file per stage, each written atomically
    step-00000200/manifest.json                   written last, only once every stage's file is in place

A set is *complete* when its manifest exists, is consistent and every file
agrees with it. Consistent: the manifest's ``step`` is the one its folder is
named for, and ``files`` holds exactly one entry per stage (as many as
``config["stages"]`` and ``blocks_per_stage``), entry i naming ``stage-i.pt``.
Agrees: every file has the size and SHA-256 the manifest records and, loaded,
its own ``format``, ``step`` and ``stage`` are the manifest's, and its block
count (``blocks``, recorded when saved) is ``blocks_per_stage[i]``, every key of
its ``block`` state dict (``"<block index>.<rest>"``) naming a block below that
count. The quick check (``hashes=False``) leaves out hashing and loading the
files. A set that is not complete is skipped with a warning saying why, and
the next older set is tried. The manifest is written by whichever
stage finishes its file last (the stages count finished files in the torchrun
store), so a kill at any moment leaves either no manifest or a complete set:
a half-written file is a temporary file never renamed, and a stage that died
before writing never counted. Files are loaded with ``weights_only=True``.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import pickle
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from .metrics import write_atomic, write_json_atomic

__all__ = ["FORMAT", "MODEL_FIELDS", "Checkpointer", "check_compatible", "export_model", "load_stage",
           "newest_complete", "save_atomic"]

log = logging.getLogger("dni_async")

FORMAT = 2
"""2: the gradient source's state under ``source`` (1 had the SG's at the top level)."""
KEEP = 3
"""Complete sets kept; older sets are removed when a new one completes."""
MODEL_FIELDS = ("task", "mode", "stages", "hidden_size", "num_layers", "sg", "sg_hidden")
"""Config fields that shape the stages' modules and optimizers: a resumed run must match them."""
_STORE_KEY = "dni_async/checkpoint"


def _set_dir(root: Path, step: int) -> Path:
    return root / f"step-{step:08d}"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_atomic(obj: Any, path: Path) -> tuple[int, str]:
    """``torch.save`` to a temporary file in the same folder, flush, fsync, rename over ``path``; on any failure
    (a full disk) the temporary file is removed and the error raised.

    Returns:
        The file's size and SHA-256 (hashed from the bytes written, not read back).
    """
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    data = buffer.getbuffer()
    write_atomic(path, data)
    _fsync_dir(path.parent)
    return len(data), hashlib.sha256(data).hexdigest()


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _folder_step(set_dir: Path) -> int:
    """The step a set's folder is named for (``step-%08d``).

    Raises:
        ValueError: the folder is not named so.
    """
    digits = set_dir.name.removeprefix("step-")
    if not digits.isdecimal() or set_dir.name != _set_dir(set_dir.parent, int(digits)).name:
        raise ValueError(f"folder name {set_dir.name!r} is not step-<step, 8 digits>")
    return int(digits)


def _check_manifest(manifest: Any, set_dir: Path) -> None:
    """Raise ValueError unless ``manifest`` is a consistent manifest of ``set_dir`` (see the module docstring)."""
    if not isinstance(manifest, dict):
        raise ValueError("manifest is not a JSON object")
    if manifest.get("format") != FORMAT:
        raise ValueError(f"format {manifest.get('format')!r}, expected {FORMAT}")
    step, files, config, blocks = (manifest.get(k) for k in ("step", "files", "config", "blocks_per_stage"))
    if not _is_int(step) or step != _folder_step(set_dir):
        raise ValueError(f"manifest step {step!r} is not the step of its folder {set_dir.name}")
    if not isinstance(config, dict) or not _is_int(config.get("stages")):
        raise ValueError("manifest has no config with an integer stages")
    if not isinstance(blocks, list) or not all(_is_int(count) and count > 0 for count in blocks):
        raise ValueError(f"manifest blocks_per_stage {blocks!r} is not a list of positive integers")
    if not isinstance(files, list) or not len(files) == config["stages"] == len(blocks):
        count = len(files) if isinstance(files, list) else repr(files)
        raise ValueError(f"manifest lists {count} files and {len(blocks)} blocks_per_stage for "
                         f"{config['stages']} stages")
    for i, entry in enumerate(files):
        if not (isinstance(entry, dict) and entry.get("stage") == i and entry.get("file") == f"stage-{i}.pt"
                and _is_int(entry.get("bytes")) and isinstance(entry.get("sha256"), str)):
            raise ValueError(f"manifest files[{i}] is not an entry of stage-{i}.pt: {entry!r}")


def _check_file(state: Any, stage: int, step: int, blocks: int | None) -> None:
    """Raise ValueError unless ``state`` is stage ``stage``'s file of the set at ``step`` holding ``blocks`` blocks
    (None: the count the file records, if any).

    A file records its block count under ``blocks`` (taken from the live modules when saved) and every key of its
    ``block`` state dict (``"<block index>.<rest>"``) must have an index below that count. Format 2 files written
    before ``blocks`` was recorded are checked by that index rule alone, against ``blocks``.
    """
    if not isinstance(state, dict) or not isinstance(state.get("block"), dict):
        raise ValueError("not a stage checkpoint (no block state dict)")
    found = {key: state.get(key) for key in ("format", "step", "stage")}
    expected = {"format": FORMAT, "step": step, "stage": stage}
    if found != expected:
        raise ValueError(f"holds {found}, expected {expected}")
    count = state.get("blocks", blocks)
    if blocks is not None and count != blocks:
        raise ValueError(f"holds {count!r} blocks, the manifest says {blocks}")
    if count is None:
        return
    if not _is_int(count):
        raise ValueError(f"holds {count!r} blocks")
    for key in state["block"]:
        index = key.partition(".")[0] if isinstance(key, str) else ""
        if not (index.isdecimal() and int(index) < count):
            raise ValueError(f"block key {key!r} is not one of its {count} blocks")


def _verify(set_dir: Path, hashes: bool = True) -> dict[str, Any]:
    """The manifest of a complete set (see the module docstring); ``hashes=False`` checks the manifest and that
    every file has the size it records, without hashing or loading the files.

    Raises:
        ValueError: why the set is not complete.
    """
    try:
        manifest = json.loads((set_dir / "manifest.json").read_text())
        _check_manifest(manifest, set_dir)
        for stage, entry in enumerate(manifest["files"]):
            path = set_dir / entry["file"]
            if path.stat().st_size != entry["bytes"]:
                raise ValueError(f"{path.name} has {path.stat().st_size} bytes, the manifest says {entry['bytes']}")
            if hashes:
                if _sha256(path) != entry["sha256"]:
                    raise ValueError(f"{path.name} does not match the manifest's SHA-256")
                state = torch.load(path, map_location="cpu", weights_only=True)
                try:
                    _check_file(state, stage, manifest["step"], manifest["blocks_per_stage"][stage])
                except ValueError as err:
                    raise ValueError(f"{path.name} {err}") from err
        return manifest  # type: ignore[no-any-return]
    except (OSError, KeyError, TypeError, RuntimeError, EOFError, pickle.UnpicklingError) as err:
        raise ValueError(f"{type(err).__name__}: {err}") from err


def newest_complete(run_dir: str | Path, hashes: bool = True) -> tuple[Path, dict[str, Any]]:
    """The newest complete set under ``run_dir/checkpoints``: its folder and manifest. A set that is not complete
    is skipped with a warning that says why.

    ``hashes=False`` leaves out reading and hashing every file (the launcher's quick check; rank 0 verifies
    the set it resumes from, and export the set it exports).

    Raises:
        FileNotFoundError: when there is none.
    """
    root = Path(run_dir) / "checkpoints"
    sets = sorted(root.glob("step-*"), reverse=True) if root.is_dir() else []
    for set_dir in sets:
        try:
            return set_dir, _verify(set_dir, hashes)
        except ValueError as err:
            log.warning("skipping checkpoint set %s: %s", set_dir, err)
    raise FileNotFoundError(f"no complete checkpoint set in {root} (looked at {len(sets)})")


def check_compatible(manifest: dict[str, Any], config: dict[str, Any]) -> None:
    """Refuse to resume a set with a config whose model-shaping fields differ.

    Raises:
        ValueError: naming every field that differs.
    """
    diff = [f"--{k.replace('_', '-')} {manifest['config'][k]!r} (checkpoint) vs {config[k]!r}"
            for k in MODEL_FIELDS if manifest["config"].get(k) != config.get(k)]
    if diff:
        raise ValueError("cannot resume: " + "; ".join(diff))


def load_stage(set_dir: Path, stage: int, blocks: int | None = None) -> dict[str, Any]:
    """One stage's state from a set (``weights_only=True``: tensors and plain containers only), checked as the
    full check of the set checks it: format, stage, the step of the set's folder, ``blocks`` blocks (None: the
    count the file records) and its block keys (see ``_check_file``).

    Raises:
        ValueError: the file is not that.
    """
    path = set_dir / f"stage-{stage}.pt"
    state = torch.load(path, map_location="cpu", weights_only=True)
    try:
        _check_file(state, stage, _folder_step(set_dir), blocks)
    except ValueError as err:
        raise ValueError(f"{path} is not stage {stage}'s checkpoint of format {FORMAT}: {err}") from err
    return state  # type: ignore[no-any-return]


class Checkpointer:
    """Writes this stage's file of a set every ``every`` steps; the last stage to finish writes the manifest.

    Args:
        run_dir: the run folder (sets go to ``run_dir/checkpoints``).
        stage, num_stages: this stage and the stage count.
        every: steps between sets (0: never).
        store: the torchrun store (counts finished files across stages).
        meta: what the manifest records besides the files (config, blocks per stage).
    """

    def __init__(self, run_dir: str | Path, stage: int, num_stages: int, every: int, store: Any,
                 meta: dict[str, Any]) -> None:
        self.root = Path(run_dir) / "checkpoints"
        self.stage, self.num_stages, self.every = stage, num_stages, every
        self.store, self.meta = store, meta
        self.saved = 0
        self.seconds = 0.0

    def due(self, steps_done: int) -> bool:
        return bool(self.every) and steps_done % self.every == 0

    def save(self, steps_done: int, state: dict[str, Any]) -> None:
        """Write this stage's file of the set at ``steps_done``; the last stage in writes the manifest."""
        start = time.perf_counter()
        set_dir = _set_dir(self.root, steps_done)
        name = f"stage-{self.stage}.pt"
        blocks = self.meta["blocks_per_stage"][self.stage]
        size, digest = save_atomic({"format": FORMAT, "stage": self.stage, "step": steps_done, "blocks": blocks,
                                    **state}, set_dir / name)
        entry = {"stage": self.stage, "file": name, "bytes": size, "sha256": digest}
        key = f"{_STORE_KEY}/{steps_done}"
        self.store.set(f"{key}/{self.stage}", json.dumps(entry))
        if self.store.add(f"{key}/count", 1) == self.num_stages:
            files = [json.loads(self.store.get(f"{key}/{i}").decode()) for i in range(self.num_stages)]
            write_json_atomic(set_dir / "manifest.json", {"format": FORMAT, "step": steps_done,
                                                          "time": time.time(), "files": files, **self.meta})
            _fsync_dir(set_dir)
            self._prune(steps_done)
        self.saved += 1
        self.seconds += time.perf_counter() - start

    def _prune(self, newest: int) -> None:
        """Keep the ``KEEP`` newest complete sets (the one just written included); remove older sets."""
        complete = [d for d in sorted(self.root.glob("step-*"), reverse=True) if (d / "manifest.json").exists()]
        if len(complete) < KEEP:
            return
        oldest_kept = complete[KEEP - 1].name
        for old in self.root.glob("step-*"):
            if old.name < oldest_kept:
                shutil.rmtree(old, ignore_errors=True)


def export_model(run_dir: str | Path, out: str | Path) -> tuple[int, int]:
    """Assemble the newest complete set's stage blocks into one plain state dict, saved to ``out``.

    The keys are those of ``nn.Sequential(*task.blocks)`` (the whole model, as
    the task built it): stage i's block ``k`` becomes block ``first_i + k``.
    The file holds only tensors, so ``torch.load(out, weights_only=True)``
    works without ``dni_async`` installed.

    Returns:
        The set's step and the number of tensors written.

    Raises:
        FileNotFoundError: no complete set (sets that are not are skipped, with a warning saying why).
    """
    set_dir, manifest = newest_complete(run_dir)
    state: dict[str, torch.Tensor] = {}
    first = 0
    for stage, count in enumerate(manifest["blocks_per_stage"]):
        block = load_stage(set_dir, stage, count)["block"]
        for key, value in block.items():
            index, _, rest = key.partition(".")
            state[f"{first + int(index)}.{rest}"] = value
        first += count
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    save_atomic(state, Path(out))
    return int(manifest["step"]), len(state)
