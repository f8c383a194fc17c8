"""Typed configuration of a pipeline run, validated on construction, and its command line."""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass, field, fields
from typing import Any, Sequence

import torch

from .methods import METHODS, MODES, Method
from .transport import TRANSPORT_CHOICES

__all__ = ["MIN_PEER_TIMEOUT", "MODES", "PIPELINING_TASKS", "SG_KINDS", "TASK_DEFAULTS", "PipelineConfig",
           "add_arguments", "config_from_args"]

PIPELINING_TASKS = ("mnist-fcn", "mnist-cnn")
"""Tasks whose batches are plain (inputs, labels), which is what the pipelining schedules take."""
MIN_PEER_TIMEOUT = 1.0
"""Seconds: the watchdog beats once a second (more often for a shorter timeout, down to this)."""
SG_KINDS = ("linear", "low-rank", "mlp", "linear-bn", "linear-sigmoid", "softmax")
_MNIST = {"steps": 600, "batch_size": 128, "lr": 3e-4, "sg_lr": 3e-3, "hidden_size": 256, "bptt": None, "sg_scale": 1.0}
_COPY = {"steps": 10_000, "batch_size": 32, "lr": 1e-3, "sg_lr": 1e-3, "hidden_size": 128, "bptt": 3,
         "sg_scale": 0.1, "sg": "linear"}
TASK_DEFAULTS: dict[str, dict[str, Any]] = {
    "mnist-fcn": _MNIST, "mnist-cnn": {**_MNIST, "hidden_size": 32}, "copy": _COPY, "repeat-copy": _COPY,
    "lm": {"steps": 600, "batch_size": 32, "lr": 3e-3, "sg_lr": 1e-3, "hidden_size": 256, "bptt": 35, "sg_scale": 1.0,
           "sg": "linear"},
}
"""Per-task values of the fields left None (the values the README's results use); they come before the mode's
(``METHODS``): the recurrent tasks keep the linear SG, since their loss is no softmax over classes per example."""


@dataclass(kw_only=True)
class PipelineConfig:
    """Everything a multi-process run needs; the CLI only overrides these fields."""

    stages: int = 4
    """Number of stages, one process each."""
    mode: str = "dni"
    """``dni`` (synthetic gradients), ``cdni`` (labels as SG context), ``delayed`` (true gradients applied when
    they arrive, with the weights of their step), ``local`` (a local head's loss per stage), ``backprop`` (locked
    baseline), or the ``torch.distributed.pipelining`` schedules ``gpipe`` and ``1f1b`` (see ``methods.py``)."""
    task: str = "mnist-fcn"
    """Task to train (see ``tasks``)."""
    steps: int | None = None
    """Training steps; overrides ``epochs``. None: ``epochs`` worth if given, else the task's (``TASK_DEFAULTS``:
    a fixed length in steps, whatever data set is found)."""
    epochs: float | None = None
    """Passes over the training set (of the data set found) when ``steps`` is not given."""
    time_budget: float | None = None
    """Stop training after this many seconds (stage 0's clock), or at ``steps``, whichever comes first."""
    microbatches: int = 4
    """``gpipe`` / ``1f1b``: microbatches each batch is split into."""
    snapshot_every: int = 0
    """Copy every stage's weights every N steps and evaluate the copies after training: summary.json's
    ``curve`` (accuracy against wall-clock time, no evaluation during training). 0: none."""
    batch_size: int = None  # type: ignore[assignment]
    """Minibatch size; None: the task's (``TASK_DEFAULTS``)."""
    lr: float = None  # type: ignore[assignment]
    """Adam learning rate of the stage blocks; None: the task's."""
    sg: str = None  # type: ignore[assignment]
    """SG kind: ``linear`` (W x W), ``low-rank`` (W -> sg_hidden -> W, linear), ``mlp`` (one hidden ReLU
    layer), ``linear-bn``, ``linear-sigmoid``, ``softmax`` (the gradient of a linear softmax head on the stage's
    output; classification tasks); None: the task's (copy, repeat-copy, lm: ``linear``), else the mode's
    (``METHODS``), else ``linear``."""
    sg_hidden: int = 256
    """Hidden width (rank) of the ``low-rank``, ``mlp`` and ``linear-bn`` SGs."""
    sg_lr: float = None  # type: ignore[assignment]
    """Adam learning rate of the SG modules; None: the task's."""
    hidden_size: int = None  # type: ignore[assignment]
    """Width of the task's hidden layers (channels of the CNN's first block); None: the task's."""
    num_layers: int = 3
    """Hidden layers of the task's model (LSTM layers for copy, repeat-copy, lm)."""
    bptt: int | None = None
    """Recurrent tasks: truncation length in time steps; None: the task's default (copy 3, lm 35)."""
    sg_scale: float = None  # type: ignore[assignment]
    """Recurrent tasks: factor on the temporal SG's gradient injected at each truncation boundary (dni, cdni);
    None: the task's (copy 0.1, lm 1)."""
    max_repeats: int = 3
    """repeat-copy: each batch's repeat count is drawn from 1..max_repeats."""
    vocab_size: int = 10000
    """lm: largest vocabulary (most frequent training words; the rest become <unk>)."""
    devices: list[str] | None = None
    """Device of each stage (``cpu`` or a GPU id); None: GPU ``LOCAL_RANK`` when CUDA is available, else cpu."""
    threads_per_stage: int = 1
    """CPU threads of each stage process."""
    system_malloc: bool = False
    """Leave glibc's malloc thresholds as they are (default: fixed so that freed memory stays in the process,
    ``dni_async.allocator``)."""
    transport: str = "auto"
    """Data-plane transport: ``auto`` is ``cuda-ipc`` for a stage on a GPU (a ring in GPU memory to a neighbour
    on a GPU of this host, zmq from page-locked memory to any other), ``zmq`` for a stage on the CPU."""
    sync_check: bool = False
    """Run the GPU stages under ``torch.cuda.set_sync_debug_mode("error")``: a wait for the device outside the
    stage loop's named ones (``dni_async.host_sync``) fails the run where it happens."""
    run_dir: str = "runs/latest"
    """Where metrics, summaries and stage files go."""
    eval_every: int = 0
    """Evaluate every N steps (0: only at the end)."""
    seed: int = 0
    """Seed of weights and data order."""
    data_dir: str | None = None
    """Data folder; None: ``$DNI_ASYNC_DATA``."""
    bind: str = "127.0.0.1"
    """Address the data-plane sockets bind to."""
    advertise: str | None = None
    """Address peers use to reach this host; None: ``bind``."""
    queue_size: int = 8
    """Bound of each inbound queue, in messages."""
    max_in_flight: int = None  # type: ignore[assignment]
    """dni, cdni: steps a stage may run ahead of the gradients it has received, at the bound it waits (0: no
    bound); delayed: steps whose true gradient has not been applied yet (>= 1; 1 is locked backprop). None: the
    mode's (``METHODS``), else 0."""
    stash_size: int = 64
    """Activations kept for SG training while their gradients are in flight; older ones are dropped and counted."""
    peer_timeout: float = 60.0
    """Seconds a peer may stay silent (no heartbeat) or leave a send blocked before the run aborts."""
    checkpoint_every: int = 0
    """Write a checkpoint set (every stage, atomically, with a manifest) every N steps; 0: none."""
    resume: str | None = None
    """Run folder whose newest complete checkpoint set this run continues from."""
    curve_keys: str | None = None
    """Folder of CURVE keys (``python -m dni_async keys DIR --stages N``): encrypt and authenticate the zmq
    data plane; None: plain tcp."""
    log_every: int = 10
    """Steps between metrics lines."""
    progress: bool = True
    """Progress bar on rank 0."""
    tensorboard: bool = False
    """Also write TensorBoard event files under ``run_dir/tensorboard`` (needs the ``tensorboard`` package)."""
    slow_stage: dict[int, float] = field(default_factory=dict)
    """Testing hook: extra seconds of sleep per step for some stages."""
    fail_stage: dict[int, float] = field(default_factory=dict)
    """Testing hook: stage I raises an error at step STEP."""
    save_grads_step: int | None = None
    """Testing hook: save each stage's parameter gradients of this step under ``run_dir/grads``."""

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"--mode must be one of {MODES}, got {self.mode!r}")
        for defaults in (TASK_DEFAULTS.get(self.task, _MNIST), self.method.defaults, {"sg": "linear",
                                                                                      "max_in_flight": 0}):
            for name, value in defaults.items():
                if name == "steps" and self.epochs is not None:
                    continue  # --epochs given: the task counts its steps from the data set it finds
                if getattr(self, name) is None:
                    setattr(self, name, value)
        for name in ("epochs", "time_budget", "lr", "sg_lr", "sg_scale", "peer_timeout"):
            value = getattr(self, name)
            if value is not None and not math.isfinite(value):
                raise ValueError(f"--{name.replace('_', '-')} must be a finite number, got {value}")
        if self.stages < 1:
            raise ValueError(f"--stages must be >= 1, got {self.stages}")
        if self.transport not in TRANSPORT_CHOICES:
            raise ValueError(f"--transport must be one of {TRANSPORT_CHOICES}, got {self.transport!r}")
        cpu_stage = "cpu" in self.devices if self.devices is not None else not torch.cuda.is_available()
        if self.transport == "cuda-ipc" and cpu_stage:
            raise ValueError("--transport cuda-ipc carries GPU stages' tensors; a stage here is on the CPU")
        if self.sync_check and cpu_stage:
            raise ValueError("--sync-check checks GPU stages; a stage here is on the CPU")
        if self.sync_check and self.method.pipelining:
            raise ValueError(f"--sync-check checks the stage loop; --mode {self.mode} runs torch's schedule")
        if self.sg not in SG_KINDS:
            raise ValueError(f"--sg must be one of {SG_KINDS}, got {self.sg!r}")
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"--steps must be >= 1, got {self.steps}")
        if self.epochs is not None and self.epochs <= 0:
            raise ValueError(f"--epochs must be > 0, got {self.epochs}")
        for name in ("batch_size", "sg_hidden", "hidden_size", "num_layers", "queue_size", "stash_size", "log_every",
                     "max_repeats"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.threads_per_stage < 1:
            raise ValueError(f"--threads-per-stage must be >= 1, got {self.threads_per_stage}")
        if self.lr <= 0 or self.sg_lr <= 0:
            raise ValueError("--lr and --sg-lr must be > 0")
        if self.sg_scale < 0:
            raise ValueError(f"--sg-scale must be >= 0, got {self.sg_scale}")
        if self.bptt is not None and self.bptt < 1:
            raise ValueError(f"--bptt must be >= 1, got {self.bptt}")
        if self.vocab_size < 3:
            raise ValueError(f"--vocab-size must be >= 3 (<unk>, <eos> and a word), got {self.vocab_size}")
        if self.max_in_flight < 0:
            raise ValueError(f"--max-in-flight must be >= 0, got {self.max_in_flight}")
        if self.method.source == "delayed" and self.max_in_flight < 1:
            raise ValueError(f"--mode {self.mode} needs --max-in-flight >= 1 (1 is locked backprop), "
                             f"got {self.max_in_flight}")
        if self.method.pipelining and self.task not in PIPELINING_TASKS:
            raise ValueError(f"--mode {self.mode} runs the tasks {PIPELINING_TASKS}, not {self.task!r}")
        if self.microbatches < 1 or self.batch_size % self.microbatches:
            raise ValueError(f"--microbatches must be >= 1 and divide --batch-size {self.batch_size}, "
                             f"got {self.microbatches}")
        if self.method.microbatches_per_stage and self.microbatches < self.stages:
            raise ValueError(f"--mode 1f1b needs --microbatches >= --stages ({self.stages}), got {self.microbatches}")
        if self.time_budget is not None and self.time_budget <= 0:
            raise ValueError(f"--time-budget must be > 0 seconds, got {self.time_budget}")
        if self.snapshot_every < 0:
            raise ValueError(f"--snapshot-every must be >= 0, got {self.snapshot_every}")
        if self.eval_every < 0:
            raise ValueError(f"--eval-every must be >= 0, got {self.eval_every}")
        if self.peer_timeout < MIN_PEER_TIMEOUT:
            raise ValueError(f"--peer-timeout must be >= {MIN_PEER_TIMEOUT:g} s (one heartbeat: a shorter one would "
                             f"blame healthy stages), got {self.peer_timeout:g}")
        if self.checkpoint_every < 0:
            raise ValueError(f"--checkpoint-every must be >= 0, got {self.checkpoint_every}")
        if (self.checkpoint_every or self.resume) and self.method.pipelining:
            stage_loop = [m for m in MODES if not METHODS[m].pipelining]
            raise ValueError(f"--checkpoint-every and --resume cover the modes {', '.join(stage_loop)}, not the "
                             f"--mode {self.mode} baseline")
        if self.curve_keys is not None and self.transport == "rpc":
            raise ValueError("--curve-keys secures the zmq channels (of zmq, shm, cuda-ipc); --transport rpc has no "
                             "CURVE")
        if self.devices is not None and len(self.devices) != self.stages:
            raise ValueError(f"--devices names {len(self.devices)} devices for {self.stages} stages")

    @property
    def method(self) -> Method:
        """What ``mode`` means (``dni_async.methods``)."""
        return METHODS[self.mode]

    def to_dict(self) -> dict[str, Any]:
        """The resolved config, for logs and summary.json."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


def _stage_values(text: str) -> dict[int, float]:
    out = {}
    for item in filter(None, text.split(",")):
        stage, _, seconds = item.partition(":")
        out[int(stage)] = float(seconds)
    return out


def _task_defaults(name: str) -> str:
    return ", ".join(f"{task} {values[name]}" for task, values in TASK_DEFAULTS.items() if values[name] is not None)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add one flag per config field (defaults from ``PipelineConfig``)."""
    d = PipelineConfig()
    a = parser.add_argument
    a("--stages", type=int, default=d.stages, help=f"number of stage processes (default: {d.stages})")
    a("--mode", choices=MODES, default=d.mode,
      help=f"training method: dni, cdni (synthetic gradients; cdni with the labels), delayed (true gradients "
           f"applied when they arrive, with their step's weights), local (a head and the task's loss on every "
           f"stage), backprop (locked), gpipe, 1f1b (torch.distributed.pipelining) (default: {d.mode})")
    a("--task", default=d.task, help=f"task to train (default: {d.task})")
    a("--steps", type=int, default=None,
      help=f"training steps (default: --epochs worth if given, else the task's: {_task_defaults('steps')})")
    a("--epochs", type=float, default=None,
      help="passes over the training set found, when --steps is not given (default: none: the task's steps)")
    a("--time-budget", type=float, default=None, metavar="SECONDS",
      help="stop training after this many seconds, or at --steps / --epochs if sooner (default: none)")
    a("--microbatches", type=int, default=d.microbatches,
      help=f"gpipe, 1f1b: microbatches per batch (default: {d.microbatches})")
    a("--snapshot-every", type=int, default=d.snapshot_every, metavar="N",
      help="copy the weights every N steps and evaluate the copies after training (summary.json 'curve': "
           "accuracy against wall-clock time); 0 = none (default: 0)")
    a("--batch-size", type=int, default=None,
      help=f"minibatch size (default: the task's: {_task_defaults('batch_size')})")
    a("--lr", type=float, default=None,
      help=f"Adam learning rate of the stages (default: the task's: {_task_defaults('lr')})")
    a("--sg", choices=SG_KINDS, default=None,
      help="dni, cdni: synthetic-gradient module kind; softmax = the gradient of a linear softmax head on the "
           "stage's output (classification tasks) (default: the mode's: "
           + ", ".join(f"{m} {v.defaults['sg']}" for m, v in METHODS.items() if "sg" in v.defaults)
           + "; the tasks copy, repeat-copy and lm: linear)")
    a("--sg-hidden", type=int, default=d.sg_hidden,
      help=f"hidden width (rank) of low-rank/mlp/linear-bn SGs (default: {d.sg_hidden})")
    a("--sg-lr", type=float, default=None,
      help=f"Adam learning rate of the SGs (default: the task's: {_task_defaults('sg_lr')})")
    a("--hidden-size", type=int, default=None,
      help=f"hidden layer width; channels of the CNN's first block (default: {_task_defaults('hidden_size')})")
    a("--num-layers", type=int, default=d.num_layers,
      help=f"hidden layers; LSTM layers for copy, repeat-copy, lm (default: {d.num_layers})")
    a("--bptt", type=int, default=None,
      help=f"copy, repeat-copy, lm: truncation length (default: {_task_defaults('bptt')})")
    a("--sg-scale", type=float, default=None,
      help=f"copy, repeat-copy, lm: factor on the temporal SG's gradient (default: {_task_defaults('sg_scale')})")
    a("--max-repeats", type=int, default=d.max_repeats,
      help=f"repeat-copy: repeat counts are drawn from 1..N (default: {d.max_repeats})")
    a("--vocab-size", type=int, default=d.vocab_size, help=f"lm: largest vocabulary (default: {d.vocab_size})")
    a("--devices", default=None,
      help="comma list, stage i -> item i: 'cpu' or a GPU id (default: GPU LOCAL_RANK if CUDA, else cpu)")
    a("--threads-per-stage", type=int, default=d.threads_per_stage,
      help=f"CPU threads per stage process (default: {d.threads_per_stage})")
    a("--system-malloc", action="store_true",
      help="leave glibc's malloc as it is: by default a stage keeps the memory it frees (up to 512 MiB) "
           "instead of returning it to the kernel and faulting it in again every step")
    a("--transport", choices=TRANSPORT_CHOICES, default=d.transport,
      help="data-plane transport: zmq (tcp), rpc, shm (CPU stages: shared memory to neighbours on this host), "
           "cuda-ipc (GPU stages: GPU memory to neighbours on this host's GPUs); auto: cuda-ipc on a GPU, else "
           f"zmq (default: {d.transport})")
    a("--sync-check", action="store_true",
      help="GPU stages: fail on any wait for the GPU outside the named ones (metrics line, checkpoint, ...)")
    a("--run-dir", default=d.run_dir,
      help=f"output folder, one run at a time (a second run into it is refused) (default: {d.run_dir})")
    a("--eval-every", type=int, default=d.eval_every, help="evaluate every N steps; 0 = at the end (default: 0)")
    a("--seed", type=int, default=d.seed, help=f"random seed (default: {d.seed})")
    a("--data-dir", default=None,
      help="data folder (default: $DNI_ASYNC_DATA; for MNIST then ~/.cache/dni_async/mnist, a download, "
           "the bundled subset)")
    a("--bind", default=d.bind, help=f"address data-plane sockets bind to (default: {d.bind})")
    a("--advertise", default=None, help="address peers use to reach this host (default: --bind)")
    a("--queue-size", type=int, default=d.queue_size, help=f"inbound queue bound, messages (default: {d.queue_size})")
    a("--max-in-flight", type=int, default=None,
      help="dni, cdni: steps a stage may run ahead of its gradients, 0 = no bound; delayed: steps awaiting their "
           "true gradient, >= 1 (default: the mode's: "
           + ", ".join(f"{m} {v.defaults['max_in_flight']}" for m, v in METHODS.items() if "max_in_flight" in
                       v.defaults) + ")")
    a("--stash-size", type=int, default=d.stash_size,
      help=f"activations kept awaiting their gradient (default: {d.stash_size})")
    a("--peer-timeout", type=float, default=d.peer_timeout,
      help=f"seconds a stage may go without a heartbeat (stopped, hung) or leave a send blocked before the "
           f"run aborts, >= {MIN_PEER_TIMEOUT:g} (default: {d.peer_timeout})")
    a("--checkpoint-every", type=int, default=d.checkpoint_every, metavar="N",
      help="write a checkpoint set to RUN_DIR/checkpoints every N steps; 0 = none (default: 0)")
    a("--resume", default=None, metavar="RUN_DIR",
      help="continue from the newest complete checkpoint set in RUN_DIR (same model flags; --steps counts "
           "from 0, so it must exceed the checkpoint's step)")
    a("--curve-keys", default=None, metavar="DIR",
      help="encrypt and authenticate the zmq data plane with the CURVE keys in DIR (make them with "
           "`python -m dni_async keys DIR --stages N`); peers with unknown keys are refused (default: off)")
    a("--log-every", type=int, default=d.log_every, help=f"steps between metrics lines (default: {d.log_every})")
    a("--no-progress", action="store_true", help="no progress bar")
    a("--tensorboard", action="store_true",
      help="also write TensorBoard event files to RUN_DIR/tensorboard (pip install 'dni_async[tensorboard]')")
    a("--fail-stage", type=_stage_values, default={}, metavar="I:STEP",
      help="testing hook: stage I raises an error at step STEP")
    a("--slow-stage", type=_stage_values, default={}, metavar="I:SECONDS[,...]",
      help="testing hook: sleep this long per step on stage I")
    a("--save-grads-step", type=int, default=None, metavar="STEP",
      help="testing hook: save every stage's parameter gradients of STEP to RUN_DIR/grads")


def config_from_args(args: argparse.Namespace | Sequence[str]) -> PipelineConfig:
    """Build the config from parsed flags (or an argv list)."""
    if not isinstance(args, argparse.Namespace):
        parser = argparse.ArgumentParser()
        add_arguments(parser)
        args = parser.parse_args(list(args))
    values = vars(args).copy()
    values["progress"] = not values.pop("no_progress")
    if values["devices"] is not None:
        values["devices"] = [d.strip() for d in values["devices"].split(",")]
    return PipelineConfig(**values)
