"""The layout holds: no import circle among the project's modules, no sys.path plumbing outside
the step containers' entry points, and step containers that never import the orchestration.

Imports are read from the source (ast), at any depth: a function-local import is as much a
dependency as a top-level one, it only runs later.
"""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("pipeline", "steps")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_modules() -> dict[str, Path]:
    return {module_name(p): p for package in PACKAGES for p in sorted((ROOT / package).rglob("*.py"))}


def imports_of(path: Path, modules: dict[str, Path]) -> set[str]:
    """The project modules `path` imports, anywhere in the file."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from pipeline.cli import local` imports the submodule pipeline.cli.local;
            # `from pipeline.cli import main` imports pipeline.cli itself
            names = [f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in modules
                     else node.module for alias in node.names]
        else:
            continue
        for name in names:
            while name and name not in modules:
                name = name.rpartition(".")[0]
            if name:
                found.add(name)
    found.discard(module_name(path))
    return found


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_no_import_circle():
    modules = project_modules()
    graph = {name: imports_of(path, modules) for name, path in modules.items()}
    assert cycles(graph) == []


def test_the_checker_sees_a_circle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def sys_path_edits(path: Path) -> list[int]:
    lines = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) \
                and node.func.attr in ("insert", "append", "extend") \
                and ast.unparse(node.func.value) == "sys.path":
            lines.append(node.lineno)
        if isinstance(node, ast.Assign) and any(ast.unparse(t) == "sys.path" for t in node.targets):
            lines.append(node.lineno)
    return lines


def entry_points() -> set[Path]:
    """The scripts the step containers run (steps/ declares them), the only places allowed to
    put their sibling folders on sys.path."""
    import steps
    from steps.base import ProcessingStep, RegisterStep, TrainingStep, TuningStep

    points = set()
    for step in steps.DAG.steps:
        code = step.training.code if isinstance(step, TuningStep) else getattr(step, "code", None)
        if isinstance(step, (ProcessingStep, TrainingStep, TuningStep, RegisterStep)) and code:
            points.add((code.path / code.entry_point).resolve())
    return points


# Beyond the entry points: the local endpoint loads a model artifact's own code/ (inference.py and
# what sits beside it) the way the serving container does, with code/ on the path.
ARTIFACT_LOADER = ROOT / "pipeline" / "serving" / "endpoint.py"


def test_sys_path_is_edited_only_by_step_entry_points():
    allowed = entry_points() | {ARTIFACT_LOADER}
    offenders = {}
    for folder in ("pipeline", "steps", "scripts", "tests", "benchmarks"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            if path.resolve() in allowed or path.resolve() == Path(__file__).resolve():
                continue
            if lines := sys_path_edits(path):
                offenders[str(path.relative_to(ROOT))] = lines
    assert offenders == {}


def test_step_containers_never_import_the_orchestration():
    for path in sorted((ROOT / "scripts").rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                roots = {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                roots = {node.module.split(".")[0]}
            else:
                continue
            assert not roots & set(PACKAGES), f"{path.relative_to(ROOT)}:{node.lineno} imports {roots}"
