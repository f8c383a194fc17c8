"""Per-stage counters and the files a run leaves: metrics.jsonl, events, stage files, summary.json."""

from __future__ import annotations

import json
import math
import os
import resource
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

__all__ = ["StageStats", "LineWriter", "JsonLines", "Tee", "tee", "strict_json", "dumps", "write_atomic",
           "write_json_atomic", "rss_mb", "steady_samples_per_s"]


def strict_json(obj: Any) -> Any:
    """``obj`` with every float that JSON cannot hold (NaN, +-Infinity) replaced by None (``null``): what the
    project writes parses with any strict JSON parser. A run that produced such a number stops as diverged
    (see :mod:`dni_async.divergence`), so a ``null`` figure never goes unexplained."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: strict_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [strict_json(v) for v in obj]
    return obj


def dumps(obj: Any, indent: int | None = None) -> str:
    """Strict JSON text of ``obj`` (:func:`strict_json`)."""
    return json.dumps(strict_json(obj), indent=indent, allow_nan=False)


def write_atomic(path: Path, data: bytes | memoryview) -> None:
    """Write ``data`` to a temporary file beside ``path`` (``.<name>.<pid>.tmp``), flush, fsync and rename over
    ``path``; on any failure (a full disk) the temporary file is removed and the error raised."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_json_atomic(path: Path, obj: Any) -> None:
    """Strict JSON (:func:`dumps`) to ``path``, atomically (:func:`write_atomic`)."""
    write_atomic(path, dumps(obj, indent=2).encode())


def rss_mb() -> float:
    """Resident memory of this process, MiB (current, from /proc where available)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class LineWriter(Protocol):
    """Takes a stage's metrics lines: :class:`JsonLines` (metrics.jsonl), a TensorBoard board, a :class:`Tee`."""

    def write(self, obj: dict[str, Any]) -> None: ...


class JsonLines:
    """Append-only JSON-lines file shared by all stages: one ``os.write`` per line (O_APPEND keeps lines whole)."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)

    def write(self, obj: dict[str, Any]) -> None:
        os.write(self._fd, (dumps(obj) + "\n").encode())

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class Tee:
    """Each line to every one of ``writers``, in order."""

    def __init__(self, *writers: LineWriter) -> None:
        self.writers = writers

    def write(self, obj: dict[str, Any]) -> None:
        for writer in self.writers:
            writer.write(obj)


def tee(*writers: LineWriter | None) -> LineWriter:
    """One writer for the ``writers`` that are not None: that one itself where it is alone, else a :class:`Tee`."""
    present = [w for w in writers if w is not None]
    return present[0] if len(present) == 1 else Tee(*present)


@dataclass
class StageStats:
    """What one stage counts while it trains (the ``per_stage`` entries of summary.json)."""

    stage: int
    pid: int = field(default_factory=os.getpid)
    device: str = "cpu"
    steps: int = 0
    busy_s: float = 0.0
    cpu_s: float = 0.0
    sg_loss_last: float | None = None
    loss_last: float | None = None
    max_staleness: int = 0
    dropped_targets: int = 0
    rejected_steps: int = 0
    step_times: list[float] = field(default_factory=list)

    def summary(self, transport_stats: Any, wall_s: float, threads: int = 1) -> dict[str, Any]:
        """The stage's figures; ``cpu_fraction``: the process's CPU time over ``wall_s x threads``."""
        stats = asdict(transport_stats)
        return {
            "stage": self.stage,
            "pid": self.pid,
            "device": self.device,
            "steps": self.steps,
            "busy_fraction": round(self.busy_s / wall_s, 4) if wall_s > 0 else 0.0,
            "cpu_fraction": round(self.cpu_s / (wall_s * threads), 4) if wall_s > 0 else 0.0,
            "sg_loss_last": self.sg_loss_last,
            "loss_last": self.loss_last,
            "messages_sent": stats["messages_sent"],
            "messages_received": stats["messages_received"],
            "bytes_sent": stats["bytes_sent"],
            "rejected_messages": stats["rejected"],
            "max_staleness": self.max_staleness,
            "dropped_targets": self.dropped_targets,
            "rejected_steps": self.rejected_steps,
        }


def steady_samples_per_s(step_times: list[float], batch_size: int, warmup_fraction: float = 0.1) -> float | None:
    """Throughput from step completion times, excluding the first ``warmup_fraction`` of steps (at least 2)."""
    if len(step_times) < 4:
        return None
    skip = max(2, int(len(step_times) * warmup_fraction))
    span = step_times[-1] - step_times[skip - 1]
    return (len(step_times) - skip) * batch_size / span if span > 0 else None
