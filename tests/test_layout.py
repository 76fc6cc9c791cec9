"""The core runs without Ray: only coin_ray/ray/ may import it."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "coin_ray"


def test_core_never_imports_ray():
    offenders = []
    for path in ROOT.rglob("*.py"):
        if path.relative_to(ROOT).parts[0] == "ray":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or ""]
            if any(n == "ray" or n.startswith("ray.") for n in names):
                offenders.append(str(path.relative_to(ROOT)))
    assert offenders == [], f"core modules import ray: {offenders}"
