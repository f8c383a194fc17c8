"""The README and docs/: the README's two opening commands (the test command is the one CI runs, the main job
exists), the README stays short, every relative link resolves, every docs page links back, the DNI snippet runs."""

from __future__ import annotations

import re
from pathlib import Path

import torch
from helpers import ROOT

DOCS = sorted((ROOT / "docs").glob("*.md"))
README_MAX_LINES = 200
LINK = re.compile(r"!?\[([^\]]*)\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```.*?^```", re.S | re.M)


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


def test_readme_opens_with_the_commands_and_is_short() -> None:
    lines = (ROOT / "README.md").read_text().splitlines()
    assert lines[0] == "# dni_async" and lines[2] == "```bash", lines[:3]
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines; move detail to docs/"


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: markup dropped, lower case, punctuation removed, spaces -> hyphens."""
    text = re.sub(r"[`*\\]", "", heading).strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for line in FENCE.sub("", path.read_text()).splitlines():
        match = re.match(r"#{1,6} (.*)", line)
        if match:
            base = slug(match.group(1))
            count = seen.get(base, 0)
            seen[base] = count + 1
            out.add(base if count == 0 else f"{base}-{count}")
    return out


def relative_links(path: Path) -> list[tuple[str, Path, str]]:
    """``(link, target file, anchor)`` of every relative link outside code blocks."""
    out = []
    for _, target in LINK.findall(FENCE.sub("", path.read_text())):
        if re.match(r"[a-z]+:", target):  # https:, mailto:
            continue
        file, _, anchor = target.partition("#")
        out.append((target, (path.parent / file).resolve() if file else path, anchor))
    return out


def test_every_relative_link_resolves() -> None:
    pages = [ROOT / "README.md", *DOCS]
    broken = []
    for page in pages:
        for target, file, anchor in relative_links(page):
            if not file.exists():
                broken.append(f"{page.relative_to(ROOT)}: {target} (no such file)")
            elif anchor and file.suffix == ".md" and anchor not in anchors(file):
                broken.append(f"{page.relative_to(ROOT)}: {target} (no such heading)")
    assert not broken, "\n".join(broken)


def test_docs_pages_link_back_and_are_linked() -> None:
    assert DOCS, "docs/ holds the detail the README leaves out"
    readme_targets = {file for _, file, _ in relative_links(ROOT / "README.md")}
    for page in DOCS:
        lines = page.read_text().splitlines()
        assert lines[0].startswith("# "), f"{page.name}: starts with its title"
        assert "](../README.md)" in lines[2], f"{page.name}: a one-line summary and a link back to the README"
        assert page.resolve() in readme_targets, f"the README links to docs/{page.name}"


def test_readme_dni_snippet_runs() -> None:
    text = (ROOT / "README.md").read_text()
    snippet = next(b for b in re.findall(r"```python\n(.*?)```", text, re.S) if "from dni_async import DNI" in b)
    loader = [(torch.randn(16, 1, 28, 28), torch.randint(0, 10, (16,))) for _ in range(3)]
    scope: dict[str, object] = {"loader": loader}
    exec(compile(snippet, "README.md", "exec"), scope)
    net = scope["net"]
    assert isinstance(net, torch.nn.Module)
    assert net.state_dict()["network.1.weight"].abs().sum() > 0
