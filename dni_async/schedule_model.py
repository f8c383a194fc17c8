"""A discrete-event model of the stage loops: throughput and per-stage utilisation of every mode, from stage costs.

Model output, not a measurement: each stage is a program that follows its mode's
loop as the code runs it (``stage.py`` with its gradient source, or
``torch.distributed.pipelining``'s GPipe and 1F1B); the engine gives the programs
processor time, carries their messages over links and applies the queue bounds.
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Generator, Sequence

from .config import PipelineConfig
from .link_probe import Link
from .methods import METHODS
from .stage import POLL_S

__all__ = ["Prediction", "StageCost", "predict", "simulate"]

# [Note: the schedule model]
#
# A stage program yields operations to the engine (`_Engine`):
#
#   ("compute", s)           s seconds of work on one core (threads_per_stage cores)
#   ("send", dst, dir, n)    a message of n bytes into stage dst's `dir` queue; blocks while that queue and
#                            what is on its way to it hold queue_size + ZMQ_HWM messages (backpressure)
#   ("recv", dirs, wait[, poll])  the next message from the first of `dirs` that has one (None if none, not
#                            `wait`); with `poll` > 0 a wait notices a message of any but the first of `dirs`
#                            only every `poll` seconds from its start (stage.py's POLL_S)
#   ("step",)                the stage finished a training step (throughput is the last stage's, as measured)
#
# Cores are shared: while n stages compute on c cores, each gets min(1, c / (n x threads)) of a core per
# thread (processor sharing, the kernel's scheduler idealised). Where the run has more stage threads than
# cores, every compute runs at its share / sharing_cost: the processes take turns on the cores, and each
# compute starts on a core that another process used meanwhile (its caches refilled), whether the others
# compute at that moment (preempted every time slice) or wait (switched at each message).
# dni_async.core_probe measures sharing_cost.
# The last stage runs `steps` steps, the others run on until it has: the whole run is the steady state
# but for its start. A link carries one message at a time:
# n bytes occupy it n / bandwidth seconds, and arrive latency_s after that. A stage blocked on a
# receive or a send uses no core.
#
# What the stage-loop programs follow (stage.py, sources/): stage i > 0 waits for act(t), taking the
# gradients still owed to it meanwhile; dni/cdni and delayed wait before the forward while
# --max-in-flight steps await their gradient; forward, send act(t); then the source's update
# (backprop: wait for grad(t); dni: SG prediction, backward; delayed: none until grad(t) comes back;
# local: head and backward; last stage: loss and backward), send the input's gradient back; then every
# gradient that has arrived (dni: an SG update each; delayed: the backward pass of its step). A stage that
# waits for act(t) while gradients are owed to it takes them every POLL_S (2 ms), as stage.py does. Not
# modelled: the absorbing of gradients by a blocked send (every 0.1 s), the I/O thread's CPU, evaluation
# and shutdown.
#
# The pipelining programs follow torch's ScheduleGPipe and Schedule1F1B._step_microbatches order, with
# sends that complete on their own (isend), then one optimizer step per batch.

_TICK = "tick"
"""An arrival that is a waiting stage's poll tick, not a message."""

ZMQ_HWM = 2
"""Messages zmq buffers between two stages beyond the receiver's queue (SNDHWM 1 + RCVHWM 1)."""

Program = Generator[tuple[Any, ...], Any, None]


@dataclass(frozen=True)
class StageCost:
    """One stage's work (seconds on one device) and messages (bytes), as ``stage_cost.stage_step_times`` measures
    them: for one batch in the stage-loop modes, for one microbatch in ``gpipe`` / ``1f1b``."""

    forward_s: float
    """Up to and including the send of the activation."""
    backward_s: float
    """The rest of a step but the SG's work: loss, backward passes, optimizer, the input's gradient sent."""
    sg_predict_s: float = 0.0
    """dni, cdni: the SG's forward pass."""
    sg_update_s: float = 0.0
    """dni, cdni: one SG update on a returned target."""
    optimizer_s: float = 0.0
    """One optimizer step, inside ``backward_s``; pipelining steps it once per batch, not per microbatch."""
    act_bytes: int = 0
    """The activation message sent forward."""
    grad_bytes: int = 0
    """The gradient message sent back."""
    input_s: float = 0.0
    """Stage 0: reading a batch of the data (once a batch; under pipelining the last stage reads it too)."""

    def __post_init__(self) -> None:
        for name in ("forward_s", "backward_s", "sg_predict_s", "sg_update_s", "optimizer_s", "act_bytes",
                     "grad_bytes", "input_s"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ValueError(f"stage cost {name} must be a finite number >= 0, got {value!r}")

    @staticmethod
    def from_dict(d: dict[str, Any]) -> StageCost:
        """From a ``stage_step_times`` entry (``results.json``'s ``stage_step_s``); unknown keys are ignored."""
        return StageCost(**{k: d[k] for k in StageCost.__dataclass_fields__ if k in d})


@dataclass
class Prediction:
    """What the model predicts for one run (model output, not measured)."""

    samples_per_s: float
    """The last stage's steady throughput (the first ``warmup`` fraction of steps excluded, as measured)."""
    busy: list[float]
    """Per stage: CPU seconds over wall seconds in the steady state (the benchmark's
    ``per_stage_busy_fraction``)."""
    bubble: float
    """The idle share of the cores the stages could use: 1 - work / (wall x min(stages x threads, cores))."""
    step_s: float
    """Seconds per training step in the steady state."""

    def to_dict(self) -> dict[str, Any]:
        return {"samples_per_s": round(self.samples_per_s, 1), "busy": [round(b, 4) for b in self.busy],
                "bubble": round(self.bubble, 4), "step_s": self.step_s}


@dataclass
class _Stage:
    program: Program
    inbox: dict[str, deque[int]] = field(default_factory=lambda: {"forward": deque(), "backward": deque()})
    since: float | None = None        # the work clock when its current compute began (None: not computing)
    cpu_since: float = 0.0            # the CPU clock then
    waiting: tuple[str, ...] = ()     # directions a blocked receive waits on
    poll: float = 0.0                 # its poll interval for all but waiting[0] (0: notices at once)
    wait_from: float = 0.0            # when it began
    tick: float | None = None         # the poll tick at which it will take what has come meanwhile
    blocked_send: tuple[Any, ...] | None = None
    work: float = 0.0                 # CPU seconds of the computes it has finished


class _Engine:
    """Runs the stage programs until the last stage's ends (see [Note: the schedule model]).

    Processor sharing runs on a work clock: every computing stage progresses at the same rate, so the clock
    advances by that rate and a compute of w seconds ends when the clock has moved w past its start. The CPU
    clock advances by each computing thread's share of a core: what a stage's process is charged.
    """

    def __init__(self, programs: list[Program], link: Link, cores: float, threads: int, capacity: int,
                 sharing_cost: float = 1.0) -> None:
        self.stages = [_Stage(p) for p in programs]
        self.link, self.cores, self.threads, self.capacity = link, cores, threads, capacity
        self.sharing_cost = sharing_cost
        self.oversubscribed = len(programs) * threads > cores
        self.now = self.clock = self.cpu_clock = 0.0
        self.ends: list[tuple[float, int]] = []  # computes in progress: (work clock at their end, stage)
        self.arrivals: list[tuple[float, int, int, str, int]] = []  # (time, seq, dst, direction or _TICK, payload)
        self.link_free: dict[tuple[int, int], float] = {}
        self.on_way: dict[tuple[int, str], int] = {}
        self.seq = 0
        self.finished = False
        self.marks: list[tuple[float, list[float]]] = []  # at each step of the last stage: time, every stage's work

    def run(self) -> None:
        ready: deque[tuple[int, Any]] = deque((i, None) for i in range(len(self.stages)))
        while True:
            while ready:
                self._resume(*ready.popleft(), ready)
            if self.finished:
                return
            if not self.ends and not self.arrivals:
                raise RuntimeError("the schedule model deadlocked: every stage waits (a bug in a stage program)")
            share = min(1.0, self.cores / max(1, len(self.ends) * self.threads))
            rate = share / self.sharing_cost if self.oversubscribed else share
            t_next = self.now + (self.ends[0][0] - self.clock) / rate if self.ends else math.inf
            t_next = min(t_next, self.arrivals[0][0] if self.arrivals else math.inf)
            self.clock += (t_next - self.now) * rate
            self.cpu_clock += (t_next - self.now) * share
            self.now = t_next
            while self.ends and self.ends[0][0] <= self.clock + 1e-12:
                _, i = heapq.heappop(self.ends)
                stage = self.stages[i]
                assert stage.since is not None
                stage.work += (self.cpu_clock - stage.cpu_since) * self.threads
                stage.since = None
                ready.append((i, None))
            while self.arrivals and self.arrivals[0][0] <= self.now:
                at, _, dst, direction, payload = heapq.heappop(self.arrivals)
                stage = self.stages[dst]
                if direction == _TICK:
                    if stage.waiting and stage.tick == at:
                        ready.append((dst, self._take(dst, stage.waiting, ready)))
                        stage.waiting, stage.tick = (), None
                    continue
                self.on_way[dst, direction] -= 1
                stage.inbox[direction].append(payload)
                if direction not in stage.waiting:
                    continue
                if stage.poll > 0 and direction != stage.waiting[0]:
                    if stage.tick is None:
                        stage.tick = stage.wait_from + math.ceil((self.now - stage.wait_from) / stage.poll - 1e-9) \
                            * stage.poll
                        self.seq += 1
                        heapq.heappush(self.arrivals, (stage.tick, self.seq, dst, _TICK, -1))
                    continue
                stage.waiting, stage.tick = (), None
                ready.append((dst, self._take(dst, (direction,), ready)))

    def _work(self, stage: _Stage) -> float:
        """CPU seconds ``stage`` has used so far."""
        return stage.work + (0.0 if stage.since is None else (self.cpu_clock - stage.cpu_since) * self.threads)

    def _resume(self, i: int, value: Any, ready: deque[tuple[int, Any]]) -> None:
        """Run stage ``i``'s program from ``value`` until it computes or blocks."""
        stage = self.stages[i]
        while True:
            try:
                op = stage.program.send(value)
            except StopIteration:
                self.finished = i == len(self.stages) - 1
                return
            value = None
            if op[0] == "compute":
                if op[1] > 0:
                    stage.since, stage.cpu_since = self.clock, self.cpu_clock
                    heapq.heappush(self.ends, (self.clock + op[1], i))
                    return
            elif op[0] == "send":
                if not self._try_send(i, *op[1:]):
                    stage.blocked_send = op[1:]
                    return
            elif op[0] == "recv":
                value = self._take(i, op[1], ready)
                if value is None and op[2]:
                    stage.waiting, stage.poll, stage.wait_from = op[1], op[3] if len(op) > 3 else 0.0, self.now
                    return
            elif i == len(self.stages) - 1:
                self.marks.append((self.now, [self._work(s) for s in self.stages]))

    def _try_send(self, src: int, dst: int, direction: str, nbytes: int, payload: int) -> bool:
        """Put a message on the link to ``dst`` if its queue has room; whether it had."""
        if len(self.stages[dst].inbox[direction]) + self.on_way.get((dst, direction), 0) >= self.capacity:
            return False
        start = max(self.now, self.link_free.get((src, dst), 0.0))
        self.link_free[src, dst] = start + nbytes / self.link.bandwidth_bps
        self.on_way[dst, direction] = self.on_way.get((dst, direction), 0) + 1
        self.seq += 1
        heapq.heappush(self.arrivals, (self.link_free[src, dst] + self.link.latency_s, self.seq, dst, direction,
                                       payload))
        return True

    def _take(self, i: int, directions: tuple[str, ...], ready: deque[tuple[int, Any]]) -> tuple[str, int] | None:
        """The next message of the first direction that has one; a sender blocked on that queue goes on."""
        for direction in directions:
            if self.stages[i].inbox[direction]:
                payload = self.stages[i].inbox[direction].popleft()
                sender = i - 1 if direction == "forward" else i + 1
                blocked = self.stages[sender].blocked_send
                if blocked is not None and blocked[:2] == (i, direction) and self._try_send(sender, *blocked):
                    self.stages[sender].blocked_send = None
                    ready.append((sender, None))
                return direction, payload
        return None


def _stage_loop(i: int, n: int, cost: StageCost, mode: str, steps: int, limit: int, stash: int) -> Program:
    """Stage ``i`` of the stage loop (stage.py) with ``mode``'s gradient source (the loss on the last stage)."""
    method = METHODS[mode]
    first, last = i == 0, i == n - 1
    source = "loss" if last else method.source
    sends_back = method.sends_gradients and not first
    pending: deque[int] = deque()  # steps whose gradient this stage awaits (the SG's stash, delayed's graphs)

    def on_gradient(step: int) -> Program:
        if step not in pending:  # dni: its activation was dropped from the stash
            return
        pending.remove(step)
        if source == "synthetic":
            yield ("compute", cost.sg_update_s)
        else:  # delayed: the backward pass of that step, its input's gradient sent back
            yield ("compute", cost.backward_s)
            if sends_back:
                yield ("send", i - 1, "backward", cost.grad_bytes, step)

    for t in range(steps) if last else itertools.count():
        yield ("compute", cost.input_s)
        if not first:
            while (got := (yield ("recv", ("forward", "backward") if pending else ("forward",), True,
                                  POLL_S)))[0] != "forward":
                yield from on_gradient(got[1])
        while source in ("synthetic", "delayed") and limit and len(pending) >= limit:
            yield from on_gradient((yield ("recv", ("backward",), True))[1])
        yield ("compute", cost.forward_s)
        if not last:
            yield ("send", i + 1, "forward", cost.act_bytes, t)
        if source == "locked":
            yield ("recv", ("backward",), True)
        if source == "synthetic":
            yield ("compute", cost.sg_predict_s)
        if source != "delayed":
            yield ("compute", cost.backward_s)
            if sends_back:
                yield ("send", i - 1, "backward", cost.grad_bytes, t)
        if source in ("synthetic", "delayed"):
            pending.append(t)
            if len(pending) > stash and source == "synthetic":
                pending.popleft()
            while (got := (yield ("recv", ("backward",), False))) is not None:
                yield from on_gradient(got[1])
        yield ("step",)


def _pipelined(i: int, n: int, cost: StageCost, one_f_one_b: bool, steps: int, m: int, input_s: float) -> Program:
    """Stage ``i`` under ``torch.distributed.pipelining``'s GPipe or 1F1B, ``m`` microbatches a step (the first and
    the last stage read each batch: ``input_s``)."""
    first, last = i == 0, i == n - 1
    backward_s = max(0.0, cost.backward_s - cost.optimizer_s)

    def forward(k: int) -> Program:
        if not first:
            yield ("recv", ("forward",), True)
        yield ("compute", cost.forward_s)
        if not last:
            yield ("send", i + 1, "forward", cost.act_bytes, k)

    def backward(k: int) -> Program:
        if not last:
            yield ("recv", ("backward",), True)
        yield ("compute", backward_s)
        if not first:
            yield ("send", i - 1, "backward", cost.grad_bytes, k)

    # 1F1B: stage i runs min(m, n - i) forwards, then alternates backward and forward, then the backwards left
    warmup = min(m, n - i) if one_f_one_b else m
    order = [("F", k) for k in range(warmup)]
    for k in range(m - warmup):
        order += [("B", k), ("F", warmup + k)]
    order += [("B", k) for k in range(m - warmup, m)]
    for _ in range(steps) if last else itertools.count():
        yield ("compute", input_s if first or last else 0.0)
        for kind, k in order:
            yield from (forward(k) if kind == "F" else backward(k))
        yield ("compute", cost.optimizer_s)
        yield ("step",)


def simulate(mode: str, costs: Sequence[StageCost], *, batch_size: int, link: Link, cores: float | None = None,
             threads: int = 1, max_in_flight: int = 0, microbatches: int = 1, queue_size: int = 8,
             stash_size: int = 64, steps: int = 60, warmup: float = 0.25, sharing_cost: float = 1.0) -> Prediction:
    """Predict a run of ``mode`` on stages of ``costs`` (model output, not a measurement).

    Args:
        mode: a ``--mode`` (``dni_async.methods.METHODS``): its gradient source or pipelining schedule is modelled.
        costs: per stage, for one batch; in ``gpipe`` / ``1f1b``, for one microbatch (``optimizer_s`` once a batch).
        batch_size: samples per step.
        link: every link between neighbours.
        cores: cores the stages share; None: as many as they use (a device each).
        threads: cores one computing stage uses (``--threads-per-stage``).
        max_in_flight: ``--max-in-flight`` as the mode resolves it (dni, cdni: 0 is no bound; delayed: >= 1).
        microbatches: gpipe, 1f1b: microbatches per batch.
        queue_size: ``--queue-size``, each stage's inbound queue per direction.
        stash_size: ``--stash-size`` (dni, cdni).
        steps: steps of the last stage simulated (the others run on until it is done).
        warmup: fraction of the steps left out of the throughput.
        sharing_cost: where the stages have more threads than ``cores``: the CPU time of a compute over its time
            alone (``dni_async.core_probe.measure_sharing``); 1.0: sharing is free.

    Raises:
        ValueError: for an unknown mode, a mode with no model, or bad numbers.
    """
    if mode not in METHODS:
        raise ValueError(f"unknown mode {mode!r}; choose one of {tuple(METHODS)}")
    method = METHODS[mode]
    n = len(costs)
    if n < 1:
        raise ValueError("the model needs the cost of at least one stage")
    for name, value, low in (("batch_size", batch_size, 1), ("threads", threads, 1), ("microbatches", microbatches, 1),
                             ("queue_size", queue_size, 1), ("stash_size", stash_size, 1), ("steps", steps, 4),
                             ("max_in_flight", max_in_flight, 0)):
        if not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    if cores is not None and not (math.isfinite(cores) and cores > 0):
        raise ValueError(f"cores must be > 0, got {cores!r}")
    if not (math.isfinite(sharing_cost) and sharing_cost > 0):
        raise ValueError(f"sharing_cost must be > 0, got {sharing_cost!r}")
    if not 0 <= warmup < 1:
        raise ValueError(f"warmup must be in [0, 1), got {warmup!r}")
    if method.pipelining:
        if method.schedule not in ("ScheduleGPipe", "Schedule1F1B"):
            raise ValueError(f"no model of the {method.schedule} schedule (--mode {mode})")
        one_f_one_b = method.schedule == "Schedule1F1B"
        programs = [_pipelined(i, n, c, one_f_one_b, steps, microbatches, costs[0].input_s)
                    for i, c in enumerate(costs)]
    else:
        if method.source == "delayed" and max_in_flight < 1:
            raise ValueError(f"--mode {mode} needs max_in_flight >= 1, got {max_in_flight}")
        programs = [_stage_loop(i, n, c, mode, steps, max_in_flight, stash_size) for i, c in enumerate(costs)]
    usable = float(n * threads) if cores is None else min(float(n * threads), cores)
    engine = _Engine(programs, link, usable, threads, queue_size + ZMQ_HWM, sharing_cost)
    engine.run()
    marks = engine.marks
    (t0, work0), (t1, work1) = marks[min(int(len(marks) * warmup), len(marks) - 2)], marks[-1]
    if t1 <= t0:
        raise ValueError("the stages cost no time: give them some work")
    step_s = (t1 - t0) / (len(marks) - 1 - min(int(len(marks) * warmup), len(marks) - 2))
    busy = [(b - a) / (t1 - t0) for a, b in zip(work0, work1)]
    return Prediction(samples_per_s=batch_size / step_s, busy=busy, bubble=1 - sum(busy) / usable, step_s=step_s)


def predict(config: PipelineConfig, costs: Sequence[dict[str, Any]], link: Link,
            cores: float | None = None, sharing_cost: float = 1.0) -> Prediction:
    """:func:`simulate` a run of ``config`` (its mode, batch, threads, window, microbatches and queues) on stages of
    ``costs`` (``stage_cost.stage_step_times`` entries: per batch, or per microbatch for gpipe / 1f1b).

    Raises:
        ValueError: as :func:`simulate`, or for a cost list that does not have one entry per stage.
    """
    if len(costs) != config.stages:
        raise ValueError(f"{len(costs)} stage costs for {config.stages} stages")
    return simulate(config.mode, [StageCost.from_dict(c) for c in costs], batch_size=config.batch_size, link=link,
                    cores=cores, threads=config.threads_per_stage, max_in_flight=config.max_in_flight,
                    microbatches=config.microbatches if config.method.pipelining else 1,
                    queue_size=config.queue_size, stash_size=config.stash_size, sharing_cost=sharing_cost)
