"""MNIST in-process: an MLP trained by backprop, DNI (λ=0) or cDNI with the ``DNI`` wrapper.

Run ``python -m tasks.mnist --help``.
"""

from __future__ import annotations

import argparse
import logging
import time
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from dni_async import DNI
from dni_async.config import PipelineConfig
from dni_async.data import check_mnist_dir, load_mnist_with_source, local_split_size
from dni_async.metrics import dumps
from dni_async.task import Batch, PipelineTask

__all__ = ["mnist_fcn", "fcn_blocks", "cnn_blocks", "pipeline_task", "evaluate", "train", "main"]

log = logging.getLogger("tasks.mnist")
MODES = ("backprop", "dni", "cdni")
DATA_HELP = ("folder with the MNIST files (default: $DNI_ASYNC_DATA, else ~/.cache/dni_async/mnist, "
             "else a download into it, else the bundled 6,000/1,000-image subset)")
SG_TARGETS = ("batch", "raw")
MNIST_TRAIN = 60_000
"""Training images of the full MNIST (the bundled subset has 6,000)."""


def mnist_fcn(hidden_size: int = 256, num_layers: int = 3, batchnorm: bool = True) -> nn.Sequential:
    """The paper's MNIST MLP: ``num_layers`` x (Linear -> BatchNorm -> ReLU), then Linear -> 10."""
    layers: list[nn.Module] = [nn.Flatten()]
    width = 28 * 28
    for _ in range(num_layers):
        layers.append(nn.Linear(width, hidden_size))
        if batchnorm:
            layers.append(nn.BatchNorm1d(hidden_size))
        layers.append(nn.ReLU())
        width = hidden_size
    layers.append(nn.Linear(width, 10))
    return nn.Sequential(*layers)


def fcn_blocks(hidden_size: int = 256, num_layers: int = 3) -> list[nn.Module]:
    """The MLP as pipeline blocks: Flatten+Linear+BN+ReLU, (Linear+BN+ReLU) x (num_layers-1), Linear."""
    model = mnist_fcn(hidden_size, num_layers)
    layers = list(model.children())
    blocks: list[nn.Module] = [nn.Sequential(*layers[0:4])]
    blocks += [nn.Sequential(*layers[i:i + 3]) for i in range(4, len(layers) - 1, 3)]
    blocks.append(layers[-1])
    return blocks


def cnn_blocks(channels: int = 32) -> list[nn.Module]:
    """The MNIST CNN as pipeline blocks: 3 x (Conv -> BatchNorm -> ReLU [-> MaxPool]), then Linear -> 10.

    28x28 -> 14x14 -> 7x7 -> 7x7 feature maps; every block's output is a
    feature map, so its SG is a ``Conv2dDNI``.
    """
    def conv(c_in: int, c_out: int, pool: bool) -> nn.Sequential:
        layers = [nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU()]
        return nn.Sequential(*layers, nn.MaxPool2d(2)) if pool else nn.Sequential(*layers)

    return [conv(1, channels, True), conv(channels, 2 * channels, True), conv(2 * channels, 2 * channels, False),
            nn.Sequential(nn.Flatten(), nn.Linear(2 * channels * 7 * 7, 10))]


def _batches(x: torch.Tensor, y: torch.Tensor, batch_size: int, steps: int, seed: int) -> Iterator[Batch]:
    """``steps`` minibatches, reshuffled every epoch by a generator of its own.

    Raises:
        ValueError: at once, for a batch larger than the data (the iterator would never yield).
    """
    if batch_size > len(x):
        raise ValueError(f"--batch-size {batch_size} is larger than the {len(x):,} training examples")

    def batches() -> Iterator[Batch]:
        gen = torch.Generator().manual_seed(seed)
        done = 0
        while True:
            order = torch.randperm(len(x), generator=gen)
            for i in range(0, len(order) - batch_size + 1, batch_size):
                if done == steps:
                    return
                idx = order[i:i + batch_size]
                yield x[idx], y[idx]
                done += 1

    return batches()


def load_splits(data_dir: str | None) -> tuple[Batch, Batch, str]:
    """Train and test splits and the data set's name (``mnist``, or ``mnist-subset`` for the bundled fallback).

    With no folder named (``data_dir`` None, ``$DNI_ASYNC_DATA`` unset) the
    loader tries the user cache, then a download, then the bundled subset.
    """
    x_train, y_train, train_source = load_mnist_with_source(data_dir, "train")
    x_test, y_test, test_source = load_mnist_with_source(data_dir, "test")
    dataset = train_source if train_source == test_source else f"{train_source}+{test_source}"
    return (x_train, y_train), (x_test, y_test), dataset


def pipeline_task(config: PipelineConfig) -> PipelineTask:
    """``mnist-fcn`` or ``mnist-cnn`` for the multi-process runtime (blocks built from ``config.seed``).

    ``mnist-cnn`` uses ``--hidden-size`` as its first block's channel count.
    """
    torch.manual_seed(config.seed)
    if config.task == "mnist-cnn":
        blocks = cnn_blocks(config.hidden_size)
    else:
        blocks = fcn_blocks(config.hidden_size, config.num_layers)

    def data() -> tuple[Iterator[Batch], int, list[Batch], str]:
        (x_train, y_train), (x_test, y_test), dataset = load_splits(config.data_dir)
        per_epoch = len(x_train) // config.batch_size
        steps = config.steps if config.steps is not None else max(1, int((config.epochs or 1.0) * per_epoch))
        evals = [(x_test[i:i + 1000], y_test[i:i + 1000]) for i in range(0, len(x_test), 1000)]
        return _batches(x_train, y_train, config.batch_size, steps, config.seed), steps, evals, dataset

    def check_data() -> None:
        check_mnist_dir(config.data_dir)
        train = local_split_size(config.data_dir, "train")
        found = "the MNIST found" if train is not None else "MNIST"
        train = train if train is not None else MNIST_TRAIN  # to be downloaded, or the subset: at most that
        if config.batch_size > train:
            raise ValueError(f"--batch-size {config.batch_size} is larger than the {train:,} training examples of "
                             f"{found}")

    return PipelineTask(name=config.task, blocks=blocks, loss_fn=F.cross_entropy, input_shape=(1, 28, 28),
                        num_classes=10, data=data, check_data=check_data)


@torch.no_grad()
def evaluate(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 1000) -> float:
    """Accuracy of ``model`` on the given images, in eval mode."""
    was_training = model.training
    model.eval()
    correct = 0
    for i in range(0, len(images), batch_size):
        correct += int((model(images[i:i + batch_size]).argmax(-1) == labels[i:i + batch_size]).sum())
    model.train(was_training)
    return correct / len(images)


def train(mode: str, data_dir: str | None, epochs: int = 1, batch_size: int = 128, lr: float = 3e-4,
          sg_lr: float = 3e-3, sg_layers: int = 0, sg_hidden: int = 10, sg_targets: str = "batch",
          hidden_size: int = 256, num_layers: int = 3, seed: int = 0, model_kind: str = "fcn",
          progress: bool = True) -> dict[str, float]:
    """Train the MLP in one process and return ``{"accuracy", "wall_s", ...}``.

    Args:
        mode: ``backprop``, ``dni`` (λ=0: every leaf module but the output
            layer update-unlocked by a linear SG) or ``cdni`` (``dni`` with the one-hot label as SG context).
        data_dir: folder with the MNIST files (None: see ``load_splits``).
        epochs: passes over the training set.
        batch_size: minibatch size.
        lr: Adam learning rate of the network.
        sg_lr: Adam learning rate of the SG modules.
        sg_layers: hidden layers of the ``LinearDNI`` SGs (0: linear).
        sg_hidden: width of those hidden layers.
        sg_targets: ``batch`` (regress B * dL/dh) or ``raw`` (regress dL/dh).
        model_kind: ``fcn`` (the MLP) or ``cnn`` (``cnn_blocks``; ``hidden_size`` = first block's channels).
        hidden_size: width of the hidden layers.
        num_layers: number of hidden layers.
        seed: RNG seed (weights and data order).
        progress: show a progress bar.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if sg_targets not in SG_TARGETS:
        raise ValueError(f"sg_targets must be one of {SG_TARGETS}, got {sg_targets!r}")
    torch.manual_seed(seed)
    (x_train, y_train), (x_test, y_test), dataset = load_splits(data_dir)
    if model_kind not in ("fcn", "cnn"):
        raise ValueError(f"model_kind must be fcn or cnn, got {model_kind!r}")
    model = mnist_fcn(hidden_size, num_layers) if model_kind == "fcn" else nn.Sequential(*cnn_blocks(hidden_size))
    if mode == "backprop":
        net: nn.Module = model
        opt: torch.optim.Optimizer | None = torch.optim.Adam(model.parameters(), lr=lr)
    else:
        net = DNI(model, λ=0.0, grad_lr=sg_lr, hidden_size=sg_hidden, dni_params={"num_layers": sg_layers},
                  batch_scaled=sg_targets == "batch",
                  optim=lambda ps: torch.optim.Adam(ps, lr=lr),
                  context_size=10 if mode == "cdni" else 0)
        opt = None
    start = time.perf_counter()
    steps = epochs * ((len(x_train) + batch_size - 1) // batch_size)
    bar = tqdm(total=steps, disable=not progress, desc=f"mnist {mode}", unit="step")
    for _ in range(epochs):
        order = torch.randperm(len(x_train))
        for i in range(0, len(order), batch_size):
            idx = order[i:i + batch_size]
            x, y = x_train[idx], y_train[idx]
            if isinstance(net, DNI) and net.context_size:
                net.set_context(y)
            if opt is not None:
                opt.zero_grad()
            loss = F.cross_entropy(net(x), y)
            loss.backward()
            if opt is not None:
                opt.step()
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    bar.close()
    wall = time.perf_counter() - start
    return {"accuracy": evaluate(model, x_test, y_test), "wall_s": wall, "steps": steps, "dataset": dataset}


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: train one mode and print the test accuracy as JSON."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--mode", choices=MODES, default="dni", help="training method (default: dni)")
    parser.add_argument("--model", choices=("fcn", "cnn"), default="fcn",
                        help="fcn: the MLP; cnn: 3 conv blocks + linear, --hidden-size = channels (default: fcn)")
    parser.add_argument("--data-dir", default=None, help=DATA_HELP)
    parser.add_argument("--epochs", type=int, default=1, help="passes over the training set (default: 1)")
    parser.add_argument("--batch-size", type=int, default=128, help="minibatch size (default: 128)")
    parser.add_argument("--lr", type=float, default=3e-4, help="network learning rate, Adam (default: 3e-4)")
    parser.add_argument("--sg-lr", type=float, default=3e-3, help="SG learning rate, Adam (default: 3e-3)")
    parser.add_argument("--sg-layers", type=int, default=0,
                        help="hidden layers of the LinearDNI SGs; 0 = linear SG (default: 0)")
    parser.add_argument("--sg-hidden", type=int, default=10, help="width of the SG hidden layers (default: 10)")
    parser.add_argument("--sg-targets", choices=SG_TARGETS, default="batch",
                        help="SG regresses batch-scaled B*dL/dh or the raw gradient (default: batch)")
    parser.add_argument("--hidden-size", type=int, default=256, help="hidden layer width (default: 256)")
    parser.add_argument("--num-layers", type=int, default=3, help="hidden layers (default: 3)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = parser.parse_args(argv)
    for name in ("epochs", "batch_size", "hidden_size", "num_layers", "sg_hidden"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.sg_layers < 0:
        parser.error("--sg-layers must be >= 0")
    if args.threads is not None:
        if args.threads < 1:
            parser.error("--threads must be >= 1")
        torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    result = train(args.mode, args.data_dir, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                   sg_lr=args.sg_lr, sg_layers=args.sg_layers, sg_hidden=args.sg_hidden,
                   sg_targets=args.sg_targets, hidden_size=args.hidden_size,
                   num_layers=args.num_layers, seed=args.seed, model_kind=args.model)
    print(dumps({"mode": args.mode, "model": args.model, "epochs": args.epochs, "seed": args.seed, **result}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
