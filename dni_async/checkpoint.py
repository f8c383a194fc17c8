"""Per-stage atomic checkpoints, a manifest per complete set, resume from the newest set, export of a plain model.

Layout of ``RUN_DIR/checkpoints``::

    step-00000200/stage-0.pt ... stage-<S-1>.pt   one file per stage, each written atomically
    step-00000200/manifest.json                   written last, only once every stage's file is in place

A set is *complete* when its manifest exists and every file it names has the
size and SHA-256 the manifest records. The manifest is written by whichever
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
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from .metrics import write_json_atomic

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
    """``torch.save`` to a temporary file in the same folder, flush, fsync, rename over ``path``.

    Returns:
        The file's size and SHA-256 (hashed from the bytes written, not read back).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    data = buffer.getbuffer()
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)
    return len(data), hashlib.sha256(data).hexdigest()


def _verify(set_dir: Path, hashes: bool = True) -> dict[str, Any] | None:
    """The manifest of a complete set, or None (why is logged at debug level); ``hashes=False`` checks only that
    every file has the size the manifest records."""
    try:
        manifest = json.loads((set_dir / "manifest.json").read_text())
        if manifest.get("format") != FORMAT:
            raise ValueError(f"format {manifest.get('format')!r}, expected {FORMAT}")
        for entry in manifest["files"]:
            path = set_dir / entry["file"]
            if path.stat().st_size != entry["bytes"] or hashes and _sha256(path) != entry["sha256"]:
                raise ValueError(f"{entry['file']} does not match the manifest")
        return manifest  # type: ignore[no-any-return]
    except (OSError, ValueError, KeyError, TypeError) as err:
        log.debug("checkpoint set %s is not complete: %s", set_dir, err)
        return None


def newest_complete(run_dir: str | Path, hashes: bool = True) -> tuple[Path, dict[str, Any]]:
    """The newest complete set under ``run_dir/checkpoints``: its folder and manifest.

    ``hashes=False`` leaves out reading and hashing every file (the launcher's quick check; rank 0 verifies
    the set it resumes from).

    Raises:
        FileNotFoundError: when there is none.
    """
    root = Path(run_dir) / "checkpoints"
    sets = sorted(root.glob("step-*"), reverse=True) if root.is_dir() else []
    for set_dir in sets:
        manifest = _verify(set_dir, hashes)
        if manifest is not None:
            return set_dir, manifest
        log.warning("skipping incomplete checkpoint set %s", set_dir)
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


def load_stage(set_dir: Path, stage: int) -> dict[str, Any]:
    """One stage's state from a set (``weights_only=True``: tensors and plain containers only)."""
    state = torch.load(set_dir / f"stage-{stage}.pt", map_location="cpu", weights_only=True)
    if state.get("format") != FORMAT or state.get("stage") != stage:
        raise ValueError(f"{set_dir / f'stage-{stage}.pt'} is not stage {stage}'s checkpoint of format {FORMAT}")
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
        size, digest = save_atomic({"format": FORMAT, "stage": self.stage, "step": steps_done, **state},
                                   set_dir / name)
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
    """
    set_dir, manifest = newest_complete(run_dir)
    state: dict[str, torch.Tensor] = {}
    first = 0
    for stage, count in enumerate(manifest["blocks_per_stage"]):
        block = load_stage(set_dir, stage)["block"]
        for key, value in block.items():
            index, _, rest = key.partition(".")
            state[f"{first + int(index)}.{rest}"] = value
        first += count
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    save_atomic(state, Path(out))
    return int(manifest["step"]), len(state)
