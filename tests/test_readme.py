"""The README's two opening commands: the test command is the one CI runs, the main job exists."""

from __future__ import annotations

import re

from conftest import ROOT


def readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    block = re.search(r"```bash\n(.*?)```", text, re.S)
    assert block, "the README must open with a bash block of commands"
    return [line for line in block.group(1).splitlines() if line and not line.startswith("#")]


def test_ci_runs_the_readme_test_command() -> None:
    commands = readme_commands()
    assert len(commands) == 2, commands
    ci_lines = (ROOT / ".ci" / "run").read_text().splitlines()
    assert commands[1] in ci_lines


def test_main_job_is_the_4_stage_pipeline() -> None:
    """Started by the launcher, which checks the input before it starts the stage processes; no data folder named:
    a fresh clone has none (the loader finds MNIST, or falls back to the bundled subset)."""
    main = readme_commands()[0]
    assert main.endswith("python launch/pipeline.py --stages 4"), main
    assert (ROOT / "launch" / "pipeline.py").is_file()
