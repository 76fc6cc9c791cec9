"""The README's and docs/'s code blocks, as tests read them: ```bash commands and ```yaml configs."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"


def documents() -> list[Path]:
    """Every page whose commands and configs the tests hold to: the README, then docs/*.md."""
    return [README, *sorted((ROOT / "docs").glob("*.md"))]


def doc_name(path: Path) -> str:
    """A page as a test id names it: its path from the repository root."""
    return path.relative_to(ROOT).as_posix()


def doc_blocks(path: Path, lang: str) -> list[str]:
    """The bodies of the page's fenced blocks in ``lang``, in order."""
    return re.findall(rf"```{lang}\n(.*?)```", path.read_text(), flags=re.S)


def doc_commands(path: Path) -> list[tuple[str, str]]:
    """(command, trailing comment) for every line of every bash block, continuations joined."""
    found = []
    for block in doc_blocks(path, "bash"):
        for line in block.replace("\\\n", " ").splitlines():
            code, _, comment = line.partition("#")
            if code.strip():
                found.append((" ".join(code.split()), comment.strip()))
    return found


def readme_commands() -> list[tuple[str, str]]:
    """(command, trailing comment) for every line of every README bash block."""
    return doc_commands(README)
