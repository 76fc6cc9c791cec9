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


# ---------------------------------------------------------------------------------------
# The package's import graph, built with ast (imports inside functions included).

PACKAGE = "coin_ray"
# The demo world is reached only through these doors (and from inside itself).
WORLD_IMPORTERS = {"coin_ray.demo", "coin_ray.serve"}
MAX_LAZY = 6


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in ROOT.rglob("*.py")}


def _targets(node: ast.AST, modules: dict[str, Path]) -> list[str]:
    """The coin_ray modules an import statement loads (``from pkg import mod`` names mod)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name.split(".")[0] == PACKAGE]
    if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").split(".")[0] == PACKAGE:
        subs = [f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in modules]
        return subs or [node.module]
    return []


def _imports() -> list[tuple[str, str, bool, int]]:
    """(importer, imported, inside a function, line) for every coin_ray import in the package."""
    modules = _modules()
    found = []
    for name, path in modules.items():
        tree = ast.parse(path.read_text())
        in_function = {id(n) for fn in ast.walk(tree) if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef))
                       for n in ast.walk(fn)}
        for node in ast.walk(tree):
            for target in _targets(node, modules):
                if target != PACKAGE:
                    found.append((name, target, id(node) in in_function, node.lineno))
    return found


def test_the_import_graph_has_no_cycles():
    graph: dict[str, set[str]] = {}
    for importer, imported, _, _ in _imports():
        graph.setdefault(importer, set()).add(imported)
    state: dict[str, int] = {}  # 1: on the current path, 2: finished

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path + [node, nxt]
            if nxt not in state and (cycle := visit(nxt, path + [node])):
                return cycle
        state[node] = 2
        return None

    for module in sorted(graph):
        if module not in state:
            cycle = visit(module, [])
            assert cycle is None, "import cycle: " + " -> ".join(cycle[cycle.index(cycle[-1]):])


def test_function_level_imports_are_few_and_each_has_its_reason():
    ours = [(importer, imported, line) for importer, imported, inside, line in _imports() if inside]
    assert len(ours) <= MAX_LAZY, f"function-level coin_ray imports: {ours}"
    modules = _modules()
    for importer, imported, line in ours:
        lines = modules[importer].read_text().splitlines()
        above = lines[line - 2].strip()
        assert above.startswith("#"), f"{importer}:{line} imports {imported} in a function without a reason"


def test_the_demo_world_is_imported_only_through_its_doors():
    offenders = sorted({f"{importer} -> {imported}" for importer, imported, _, _ in _imports()
                        if imported.startswith("coin_ray.world") and not importer.startswith("coin_ray.world")
                        and importer not in WORLD_IMPORTERS})
    assert offenders == []


# ---------------------------------------------------------------------------------------
# Run artefacts are named in coin_ray/run.py only.


def _artefacts() -> list[tuple[str, ...]]:
    """Each artefact ``RunDir`` names, as path parts under the run root."""
    from coin_ray.run import RunDir

    run = RunDir("ROOT")
    uris = [getattr(run, name) for name, value in vars(RunDir).items() if isinstance(value, property)]
    uris += [run.model(s) for s in ("disseminate", "distill")] + [run.metrics(s) for s in ("disseminate", "distill")]
    uris += [run.eval("coin")]
    return sorted({tuple(Path(run.relative(uri)).parts) for uri in uris if "/" in run.relative(uri)})


def _docstrings(tree: ast.AST) -> set[int]:
    return {id(node.body[0].value) for node in ast.walk(tree)
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
            and node.body and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)}


def _artefact_strings(tree: ast.AST, artefacts: list[tuple[str, ...]]) -> list[str]:
    docs = _docstrings(tree)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docs:
            found += ["/".join(a) for a in artefacts if "/".join(a) in node.value]
        if isinstance(node, ast.Call):
            args = tuple(a.value for a in node.args if isinstance(a, ast.Constant) and isinstance(a.value, str))
            found += ["/".join(a) for a in artefacts
                      if any(args[i:i + len(a)] == a for i in range(len(args)))]
    return found


def test_run_artefact_paths_are_spelled_only_in_run_py():
    artefacts = _artefacts()
    assert ("disseminate", "model.pt") in artefacts and ("collect", "cloud.parquet") in artefacts
    sample = ast.parse('x = run.path("disseminate", "model.pt")\ny = "collect/cloud.parquet"')
    assert sorted(_artefact_strings(sample, artefacts)) == ["collect/cloud.parquet", "disseminate/model.pt"]
    offenders = []
    for folder in ("coin_ray", "jobs", "benchmarks"):
        for path in (ROOT.parent / folder).rglob("*.py"):
            if path == ROOT / "run.py":
                continue
            offenders += [f"{path.relative_to(ROOT.parent)}: {s}"
                          for s in _artefact_strings(ast.parse(path.read_text()), artefacts)]
    assert offenders == []
