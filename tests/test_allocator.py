"""The stage's malloc setting: freed memory stays in the process, so a training step stops faulting pages in."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import pytest

from dni_async.config import config_from_args

# A stage's pattern in small: a receiving thread hands the training thread a fresh 1 MiB tensor per step (as the
# transport does), which runs forward, backward and Adam on two 1024 x 1024 layers. Prints the minor page faults
# of each step once warm.
STEP_LOOP = """
import json, queue, resource, sys, threading
import torch
from dni_async.allocator import keep_freed_memory
torch.set_num_threads(1)
setting = keep_freed_memory() if sys.argv[1] == "keep" else sys.argv[1]
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
for _ in range(10):
    step()
faults = []
for _ in range(int(sys.argv[2])):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    step()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"setting": setting, "faults": faults}))
"""
STEPS = 60
FAULTING = 64
"""Page faults (256 KiB of fresh memory) that make a step one that faults."""

# glibc's starting thresholds (128 KiB), held: by default glibc raises them as the process frees large blocks, at a
# moment that depends on how the two threads interleave, so its count per step varies from run to run (measured:
# under 400 to over 5,000 on average). Held, every step faults all its megabyte tensors in, ~9,000 pages.
GLIBC_START = {"MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}


def _faults_per_step(setting: str, env: dict[str, str] | None = None) -> dict:
    result = subprocess.run([sys.executable, "-c", STEP_LOOP, setting, str(STEPS)],
                            capture_output=True, text=True, timeout=120, env={**os.environ, **(env or {})})
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the setting is glibc's (mallopt)")
def test_kept_memory_ends_the_page_faults_of_every_step() -> None:
    held, kept = _faults_per_step("glibc start", GLIBC_START), _faults_per_step("keep")
    assert kept["setting"].startswith("freed memory kept (glibc mmap threshold 256 MiB, trim threshold 512 MiB")
    faulting = {run["setting"]: sum(n >= FAULTING for n in run["faults"]) for run in (held, kept)}
    assert faulting["glibc start"] >= STEPS * 3 // 4, held
    # Kept, a step faults nothing; only the few steps where the process's peak still grows do (the receiving thread
    # running ahead: 0 to 4 of 60 steps measured here, 256 to 1,280 faults each).
    assert faulting[kept["setting"]] <= STEPS // 5, kept


def test_system_malloc_flag() -> None:
    assert config_from_args([]).system_malloc is False
    assert config_from_args(["--system-malloc"]).system_malloc is True
