"""The README's code blocks, as tests read them: ```bash commands and ```yaml configs."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_blocks(lang: str) -> list[str]:
    """The bodies of the README's fenced blocks in ``lang``, in order."""
    return re.findall(rf"```{lang}\n(.*?)```", README.read_text(), flags=re.S)


def readme_commands() -> list[tuple[str, str]]:
    """(command, trailing comment) for every line of every bash block, continuations joined."""
    found = []
    for block in readme_blocks("bash"):
        for line in block.replace("\\\n", " ").splitlines():
            code, _, comment = line.partition("#")
            if code.strip():
                found.append((" ".join(code.split()), comment.strip()))
    return found
