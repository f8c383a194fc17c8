"""The stage's malloc setting: freed memory stays in the process, so a training step stops faulting pages in."""

from __future__ import annotations

import json
import platform
import subprocess
import sys

import pytest

from dni_async.config import config_from_args

# A stage's pattern in small: a receiving thread hands the training thread a fresh 1 MiB tensor per step (as the
# transport does), which runs forward, backward and Adam on two 1024 x 1024 layers. Prints the minor page faults
# per step once warm.
STEP_LOOP = """
import json, queue, resource, sys, threading
import torch
from dni_async.allocator import keep_freed_memory
torch.set_num_threads(1)
setting = keep_freed_memory() if sys.argv[1] == "keep" else "system"
model = torch.nn.Sequential(torch.nn.Linear(1024, 1024), torch.nn.ReLU(), torch.nn.Linear(1024, 1024))
opt = torch.optim.Adam(model.parameters())
inbox = queue.Queue(maxsize=2)
def receive():
    while True:
        inbox.put(torch.frombuffer(bytearray(256 * 1024 * 4), dtype=torch.float32).view(256, 1024))
threading.Thread(target=receive, daemon=True).start()
def step():
    model(inbox.get()).square().mean().backward()
    opt.step()
    opt.zero_grad()
for _ in range(5):
    step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    step()
print(json.dumps({"setting": setting, "faults": (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 20}))
"""


def _faults_per_step(setting: str) -> dict:
    result = subprocess.run([sys.executable, "-c", STEP_LOOP, setting], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the setting is glibc's (mallopt)")
def test_kept_memory_ends_the_page_faults_of_every_step() -> None:
    system, kept = _faults_per_step("system"), _faults_per_step("keep")
    assert kept["setting"].startswith("freed memory kept (glibc mmap threshold 256 MiB, trim threshold 512 MiB")
    # 1 MiB in, a few MiB of activations and gradients out: ~256 faults per fresh MiB. Measured here: ~5,000 a
    # step with glibc's defaults, ~5 kept.
    assert kept["faults"] < 100, kept
    assert system["faults"] > 10 * max(kept["faults"], 1), (system, kept)


def test_system_malloc_flag() -> None:
    assert config_from_args([]).system_malloc is False
    assert config_from_args(["--system-malloc"]).system_malloc is True
