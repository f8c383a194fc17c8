"""The per-process stage loop: ``dni`` / ``cdni`` (update-unlocked by an SG) and locked ``backprop``."""

from __future__ import annotations

import logging
import random
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from .checkpoint import Checkpointer
from .config import PipelineConfig
from .metrics import JsonLines, StageStats, rss_mb
from .optim import fast_adam
from .recurrent import carried_states, load_carried_states, reset_states
from .snapshots import Snapshots
from .synthetic import DNINetwork, synthetic_gradient
from .task import EvalData, Item, PipelineTask, unpack
from .transport import Message, Transport

__all__ = ["StageWorker"]

log = logging.getLogger("dni_async")

# [Note: the stage loop]
#
# dni / cdni, stage i at step t (DESIGN.md, "The stage loop"):
#
#     x_t <- data (i = 0) or act(t) from i-1      h_t <- block(x_t)
#     send act(t, h_t, y) to i+1                  (not on the last stage)
#     g <- dLoss/dh_t (last) | SG(h_t, ctx)/B     h_t.backward(g); opt.step()   <- no waiting
#     send grad(t, x_t.grad) to i-1               stash[t] <- (h_t, ctx)
#     for every grad(s) already queued: SG loss = mse(SG(stash.pop(s)), B * target)
#
# backprop: the same, but a non-last stage blocks on grad(t) from i+1 and uses
# it in place of the SG before it may start step t+1 (locked backprop).
#
# Shutdown: stage 0 sends `stop` after its last step; each stage passes it on;
# the last stage answers with `stop` backward, and each stage passes that back
# once it has drained every gradient queued before it (channels keep order), so
# no gradient is lost. `eval` batches travel forward like activations, in order.
# An item's meta (PipelineTask) travels with its act/eval message: `reset`
# restarts recurrent state on every stage, `last` closes a scored group.
#
# Hazard: sends may be zero-copy, so a tensor handed to `send` is never written
# again: h_t.detach() shares storage with h_t, which nothing modifies in place.


class StageWorker:
    """One stage: its block, optimizer, SG (not on the last stage) and the loop of its mode.

    Args:
        stage: this stage's index.
        num_stages: number of stages.
        block: the stage's module, already on ``device``.
        transport: connected channels to the neighbours.
        config: the run's config.
        device: where the block lives.
        task: the task (loss, cDNI context, metrics; ``task.latest`` receives the relayed figures).
        sg: this stage's SG module (None on the last stage and in backprop mode).
        metrics: the shared metrics.jsonl writer.
        events: this stage's event log.
        checkpoints: writes this stage's checkpoint files (``--checkpoint-every``); None: none.
    """

    def __init__(self, stage: int, num_stages: int, block: nn.Module, transport: Transport, config: PipelineConfig,
                 device: torch.device, task: PipelineTask, sg: DNINetwork | None, metrics: JsonLines,
                 events: JsonLines, checkpoints: Checkpointer | None = None) -> None:
        self.stage, self.num_stages = stage, num_stages
        self.first, self.last = stage == 0, stage == num_stages - 1
        self.block, self.transport, self.config, self.device = block, transport, config, device
        self.task, self.sg = task, sg
        self.opt = fast_adam(block.parameters(), config.lr)
        self.sg_opt = fast_adam(sg.parameters(), config.sg_lr) if sg is not None else None
        self.metrics, self.events = metrics, events
        self.stats = StageStats(stage=stage, device=str(device))
        self.stash: OrderedDict[int, tuple[torch.Tensor, torch.Tensor | None]] = OrderedDict()
        self.delay = config.slow_stage.get(stage, 0.0)
        self.latest = task.latest                  # loss / eval / train figures relayed back from the last stage
        self.final_eval: dict[str, Any] | None = None
        self.evals: dict[str, dict[str, Any]] = {}   # latest eval summary of each split
        self._sums: dict[str, dict[str, float]] = {"eval": {}, "train": {}}
        self._window: list[int] = []               # staleness values since the last metrics line
        self._window_start = time.perf_counter()
        self._event_buffer: list[dict[str, Any]] = []
        self._loss: torch.Tensor | None = None       # latest loss (last stage) / SG loss, as tensors
        self._sg_loss: torch.Tensor | None = None
        self.snapshots = Snapshots(block, config.snapshot_every)
        self.curve_evals: dict[int, dict[str, Any]] = {}  # last stage: eval summary of each snapshot step
        self._last_act = -1                           # step of the last activation received
        self.checkpoints = checkpoints
        self.start_step = 0                           # > 0 when resumed from a checkpoint
        self._skip_items = 0                          # training items stage 0 skips when resumed

    # ------------------------------------------------------------ entry points

    def run_first(self, batches: Iterator[Item], steps: int, eval_data: EvalData,
                  on_step: Callable[[int, dict[str, Any]], None] | None = None) -> None:
        """Stage 0: read the data, train ``steps`` steps (or until ``--time-budget``), evaluate, stop."""
        deadline = time.perf_counter() + self.config.time_budget if self.config.time_budget else None
        if self.start_step >= steps:
            raise ValueError(f"the checkpoint is at step {self.start_step}: --steps must be above it, got {steps}")
        for _ in range(self._skip_items):  # the data position: the same items the uninterrupted run would read
            next(batches)
        for t in range(self.start_step, steps):
            if deadline is not None and time.perf_counter() >= deadline:
                log.info("time budget of %.1f s spent after %d steps", self.config.time_budget, t)
                break
            if self.config.eval_every and t and t % self.config.eval_every == 0:
                self._send_eval(eval_data, final=False)
            x, y, meta = unpack(next(batches))
            self._train_step(t, x, y, meta)
            if on_step is not None:
                on_step(t, self.latest)
        self._send_eval(eval_data, final=True)
        for step in self.snapshots.steps():  # after training, so evaluating them costs it nothing
            self._send_eval(eval_data, final=False, extra={"snapshot": step})
        self._finish()

    def run_next(self) -> None:
        """Stages 1..S-1: follow the forward queue until ``stop``."""
        while True:
            msg = self._recv("forward")
            if msg.kind == "act" and msg.step <= self._last_act:
                self._reject_step(msg, f"activations must come in step order (last was step {self._last_act})")
            elif msg.kind == "act":
                self._last_act = msg.step
                x, y = msg.tensors
                self._train_step(msg.step, x, y, msg.meta)
            elif msg.kind == "eval":
                self._eval_step(msg)
            elif msg.kind == "stop":
                break
            else:
                raise RuntimeError(f"[stage {self.stage}] unexpected {msg.kind!r} message from stage {msg.src}")
        self._finish()

    # --------------------------------------------------------------- the loop

    def _train_step(self, t: int, x: torch.Tensor, y: torch.Tensor, meta: dict[str, Any]) -> None:
        start = time.perf_counter()
        if self.delay:
            time.sleep(self.delay)
        if self.config.fail_stage.get(self.stage) == t:
            raise RuntimeError(f"injected failure at step {t} (--fail-stage)")
        x, y = x.to(self.device), y.to(self.device)
        if not self.first:
            x.requires_grad_(True)
        comm = self._wait_for_window(t)
        self._event("step_start", t)
        self.block.train()
        if meta.get("reset"):
            reset_states(self.block, training=True)
        h = self.block(x)
        self._event("forward", t)
        if self.last:
            loss = self.task.loss_fn(h, y)
            loss.backward()
            self._loss = loss.detach()  # read out at log time: float() here would sync a GPU every step
            if self.task.train_metrics:
                self._score("train", h.detach(), y, meta)
        else:
            comm += self._send(self.stage + 1, Message("act", t, self.stage, [h.detach(), y], meta))
            ctx = self.task.context(y) if self.config.mode == "cdni" else None
            if self.config.mode == "backprop":
                waited = time.perf_counter()
                g = self._wait_grad(t)
                comm += time.perf_counter() - waited
            else:
                assert self.sg is not None
                with torch.no_grad():
                    g = self._sg_forward(h.detach(), ctx) / h.shape[0]
                self._stash(t, h.detach(), ctx)
            h.backward(g)
        self._save_grads(t)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self._event("update", t)
        if not self.first:
            assert x.grad is not None
            comm += self._send(self.stage - 1, Message("grad", t, self.stage, [x.grad], dict(self.latest)))
        self.stats.busy_s += time.perf_counter() - start - comm  # time blocked on peers is not busy
        if self.config.mode != "backprop":
            self._drain_grads(t)
        self.stats.steps += 1
        self.stats.step_times.append(time.perf_counter())
        self.snapshots.maybe_take(t + 1)
        if self.checkpoints is not None and self.checkpoints.due(t + 1):
            self.checkpoints.save(t + 1, self.checkpoint_state())
        if (t + 1) % self.config.log_every == 0:
            self._log_metrics(t)

    def _wait_for_window(self, t: int) -> float:
        """DNI: block while ``max_in_flight`` steps await their gradients; return the seconds waited.

        Socket and kernel buffers let a fast stage run far ahead of its
        gradients; the lag (staleness) this bounds is what destabilised 4-stage
        runs without it (see the README).
        """
        limit = self.config.max_in_flight
        if not limit or self.last or self.config.mode == "backprop" or len(self.stash) < limit:
            return 0.0
        start = time.perf_counter()
        self._event("window_wait", t)
        while len(self.stash) >= limit:
            self._on_backward(self._recv("backward"), t)
        return time.perf_counter() - start

    def _sg_forward(self, h: torch.Tensor, ctx: torch.Tensor | None) -> torch.Tensor:
        assert self.sg is not None
        return synthetic_gradient(self.sg, h, ctx)

    def _stash(self, t: int, h: torch.Tensor, ctx: torch.Tensor | None) -> None:
        self.stash[t] = (h, ctx)
        while len(self.stash) > self.config.stash_size:
            self.stash.popitem(last=False)
            self.stats.dropped_targets += 1

    def _drain_grads(self, t: int) -> None:
        """Train the SG on every gradient that has arrived; never waits."""
        while (msg := self.transport.recv("backward", timeout=0)) is not None:
            self._on_backward(msg, t)

    def _on_backward(self, msg: Message, t: int) -> None:
        if msg.kind != "grad":
            raise RuntimeError(f"[stage {self.stage}] unexpected {msg.kind!r} from stage {msg.src} while training")
        if msg.step > t:
            self._reject_step(msg, f"a gradient from the future (this stage is at step {t})")
            return
        self.latest.update(msg.meta)
        self._event("grad_arrived", msg.step)
        staleness = t - msg.step
        self.stats.max_staleness = max(self.stats.max_staleness, staleness)
        self._window.append(staleness)
        entry = self.stash.pop(msg.step, None)
        if entry is None:
            self.stats.dropped_targets += 1
            return
        start = time.perf_counter()
        self._event("sg_start", msg.step)
        h, ctx = entry
        target = msg.tensors[0].to(self.device)
        if target.shape != h.shape:
            raise RuntimeError(f"[stage {self.stage}] gradient for step {msg.step} from stage {msg.src} has shape "
                               f"{tuple(target.shape)}, the activation has {tuple(h.shape)}")
        assert self.sg_opt is not None
        loss = F.mse_loss(self._sg_forward(h, ctx), target * h.shape[0])
        self.sg_opt.zero_grad(set_to_none=True)
        loss.backward()
        self.sg_opt.step()
        self._sg_loss = loss.detach()
        self.stats.busy_s += time.perf_counter() - start
        self._event("sg_update", msg.step)

    def _reject_step(self, msg: Message, why: str) -> None:
        """Drop a message whose step cannot be right, log it (the first few) and count it."""
        self.stats.rejected_steps += 1
        if self.stats.rejected_steps <= 10:
            log.warning("[stage %d] rejected %s for step %d from stage %d: %s", self.stage, msg.kind, msg.step,
                        msg.src, why)

    def _wait_grad(self, t: int) -> torch.Tensor:
        """Locked backprop: block until grad(t) arrives from the next stage (others are rejected and counted)."""
        while True:
            msg = self._recv("backward")
            if msg.kind != "grad":
                raise RuntimeError(f"[stage {self.stage}] expected grad for step {t}, got {msg.kind!r} from stage "
                                   f"{msg.src}")
            if msg.step == t:
                break
            self._reject_step(msg, f"waiting for the gradient of step {t}")
        self.latest.update(msg.meta)
        self._event("grad_arrived", t)
        return msg.tensors[0].to(self.device)

    # ----------------------------------------------------------- checkpoints

    def checkpoint_state(self) -> dict[str, Any]:
        """What resuming this stage needs (between steps): block, SG, both optimizers, RNG states, the data
        position, what recurrent layers carry, the metric sums of the open groups."""
        return {
            "block": self.block.state_dict(), "sg": self.sg.state_dict() if self.sg is not None else None,
            "opt": self.opt.state_dict(), "sg_opt": self.sg_opt.state_dict() if self.sg_opt is not None else None,
            "rng": {"torch": torch.get_rng_state(), "python": random.getstate(),
                    "cuda": torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None},
            "data_position": self.stats.steps,
            "data": self.task.data_state() if self.first and self.task.data_state is not None else None,
            "recurrent": carried_states(self.block),
            "sums": {group: dict(sums) for group, sums in self._sums.items()},
            "latest": {k: v for k, v in self.latest.items() if isinstance(v, (bool, int, float, str))},
        }

    def restore(self, state: dict[str, Any]) -> None:
        """Continue from a :meth:`checkpoint_state` (loaded with ``weights_only=True``) taken after its ``step``.

        The learning rates are this run's (``--lr``, ``--sg-lr``), not the checkpoint's.
        """
        self.block.load_state_dict(state["block"])
        self.opt.load_state_dict(state["opt"])
        for group in self.opt.param_groups:
            group["lr"] = self.config.lr
        if self.sg is not None and self.sg_opt is not None:
            self.sg.load_state_dict(state["sg"])
            self.sg_opt.load_state_dict(state["sg_opt"])
            for group in self.sg_opt.param_groups:
                group["lr"] = self.config.sg_lr
        torch.set_rng_state(state["rng"]["torch"])
        random.setstate(state["rng"]["python"])
        if state["rng"]["cuda"] is not None and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["rng"]["cuda"], self.device)
        self.latest.update(state["latest"])
        load_carried_states(self.block, state["recurrent"])
        self._sums = {group: dict(sums) for group, sums in state["sums"].items()}
        self._skip_items = int(state["data_position"])
        if state["data"] is not None and self.task.resume_data is not None:
            self.task.resume_data(state["data"])
            self._skip_items = 0
        self.start_step = self.stats.steps = int(state["step"])
        self._last_act = self.start_step - 1

    # ------------------------------------------------------------------ eval

    @torch.no_grad()
    def _eval_forward(self, x: torch.Tensor, meta: dict[str, Any]) -> torch.Tensor:
        self.snapshots.select(meta.get("snapshot"))
        self.block.eval()
        if meta.get("reset"):
            reset_states(self.block, training=False)
        out = self.block(x.to(self.device))
        self.block.train()
        return out

    def _send_eval(self, eval_data: EvalData, final: bool, extra: dict[str, Any] | None = None) -> None:
        items = eval_data(final) if callable(eval_data) else eval_data
        for k, item in enumerate(items):
            x, y, meta = unpack(item)
            meta.update(extra or {})
            if k == len(items) - 1:
                meta["last"] = True
            self._eval_step(Message("eval", k, self.stage, [x, y], meta))

    def _eval_step(self, msg: Message) -> None:
        start = time.perf_counter()
        x, y = msg.tensors
        h = self._eval_forward(x, msg.meta)
        if not self.last:
            self.stats.busy_s += time.perf_counter() - start
            self._send(self.stage + 1, Message("eval", msg.step, self.stage, [h, y], msg.meta))
            return
        summary = self._score("eval", h, y.to(self.device), msg.meta)
        if summary is not None and "snapshot" in summary:
            self.curve_evals[int(summary["snapshot"])] = summary
        elif summary is not None:
            self.final_eval = summary
            if "split" in summary:
                self.evals[str(summary["split"])] = summary
            self.metrics.write({"stage": self.stage, "step": self.stats.steps, "time": time.time(),
                                **{f"eval_{k}": v for k, v in summary.items()}})
        self.stats.busy_s += time.perf_counter() - start

    def _score(self, group: str, output: torch.Tensor, labels: torch.Tensor,
               meta: dict[str, Any]) -> dict[str, Any] | None:
        """Add a batch's metric sums to ``group``; at a ``last`` item, return the group's summary (and relay it)."""
        sums = self._sums[group]
        self.task.add_metrics(sums, output, labels)
        if not meta.get("last"):
            return None
        summary: dict[str, Any] = {**self.task.summarize(sums),
                                   **{k: v for k, v in meta.items() if k not in ("last", "reset")}}
        sums.clear()
        self.latest.update({f"{group}_{k}": v for k, v in summary.items()})
        return summary

    # ------------------------------------------------------------- shutdown

    def _finish(self) -> None:
        """Pass `stop` on and drain the gradients still in flight (see [Note: the stage loop])."""
        if not self.last:
            self._send(self.stage + 1, Message("stop", self.stats.steps, self.stage))
            while True:
                msg = self._recv("backward")
                if msg.kind == "stop":
                    break
                self._on_backward(msg, self.stats.steps)
        if not self.first:
            self._send(self.stage - 1, Message("stop", self.stats.steps, self.stage))
        self.snapshots.select(None)
        self._read_losses()
        self._flush_events()

    # -------------------------------------------------------------- helpers

    def _send(self, dst: int, msg: Message) -> float:
        """Send and return the seconds spent (blocked by backpressure included).

        Blocked sending forward, a DNI stage keeps training its SG on the
        gradients that come back: the next stage may itself be blocked sending
        them, and only this keeps the two from waiting on each other forever.
        (In backprop no gradient can be in flight while a forward send waits.)
        """
        start = time.perf_counter()
        unblock = None
        if dst > self.stage and self.config.mode != "backprop":
            unblock = lambda: self._drain_grads(self.stats.steps)  # noqa: E731
        self.transport.send(dst, msg, unblock)
        if msg.kind == "act":
            self._event("act_sent", msg.step)
        return time.perf_counter() - start

    def _recv(self, direction: str) -> Message:
        msg = self.transport.recv(direction, timeout=None)
        assert msg is not None
        return msg

    def _save_grads(self, t: int) -> None:
        if self.config.save_grads_step != t:
            return
        grads = {n: p.grad.detach().cpu().clone() for n, p in self.block.named_parameters() if p.grad is not None}
        path = Path(self.config.run_dir) / "grads" / f"stage-{self.stage}.pt"
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(grads, path)

    def _event(self, name: str, step: int) -> None:
        self._event_buffer.append({"t": time.time(), "stage": self.stage, "event": name, "step": step})

    def _flush_events(self) -> None:
        for event in self._event_buffer:
            self.events.write(event)
        self._event_buffer.clear()

    def _read_losses(self) -> None:
        """Turn the latest loss tensors into floats (a CPU-GPU sync point: only at log time and at the end)."""
        if self._loss is not None:
            self.stats.loss_last = self.latest["loss"] = float(self._loss)
        if self._sg_loss is not None:
            self.stats.sg_loss_last = float(self._sg_loss)

    def _log_metrics(self, t: int) -> None:
        self._read_losses()
        now = time.perf_counter()
        line: dict[str, Any] = {
            "stage": self.stage, "step": t, "time": time.time(),
            "samples_per_s": round(self.config.log_every * self.config.batch_size / (now - self._window_start), 2),
            "queue_depth": {d: self.transport.queue_depth(d) for d in ("forward", "backward")},
            "rss_mb": round(rss_mb(), 1),
        }
        if self.last:
            line["loss"] = self.stats.loss_last
        elif self.config.mode != "backprop":
            line["sg_loss"] = self.stats.sg_loss_last
            line["staleness"] = max(self._window) if self._window else None
            line["stash"] = len(self.stash)
        self.metrics.write(line)
        self._window.clear()
        self._window_start = now
        self._flush_events()
