"""The house's layout, read from the source (ast, no imports run): cli -> flows -> tasks -> pneumo.

- no import circle among the modules of pneumo/, tasks/, flows/ and cli/ (imports inside functions
  count: a circle hidden in a function is still a circle for a reader);
- no import from a lower layer to a higher one: pneumo/ imports neither tasks, flows nor
  Prefect (nor a CLI library); tasks/ imports neither flows nor cli; flows/ does not import cli;
- no private name (a leading underscore, not a dunder) imported from, or read off, another
  module of the project, in pneumo/, tasks/, flows/ or benchmarks/;
- flows/full.py reads like the pipeline diagram: under 250 lines;
- the shell stays light (issue 22): flows/ plus cli/ within 1,500 lines, no module there over 400;
- the registry stores and does not climb into training: pneumo.registry reaches none of
  pneumo.train, pneumo.evaluate, pneumo.shards or pneumo.shard_files, directly or through
  another module.
"""

from __future__ import annotations

import ast
import functools
from graphlib import CycleError, TopologicalSorter
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
LAYERS = ("pneumo", "tasks", "flows", "cli")  # lowest first
FORBIDDEN = {
    "pneumo": {"tasks", "flows", "cli", "prefect", "prefect_aws", "prefect_dask", "cyclopts", "typer"},
    "tasks": {"flows", "cli"},
    "flows": {"cli"},  # `python flows/full.py` runs the CLI (runpy), it does not import it
}
REGISTRY_MUST_NOT_REACH = {"pneumo.train", "pneumo.evaluate", "pneumo.shards", "pneumo.shard_files"}
FULL_FLOW_MAX_LINES = 250
SHELL_MAX_LINES, SHELL_MODULE_MAX_LINES = 1500, 400  # flows/ + cli/


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_files(folders=LAYERS) -> dict[str, Path]:
    """{module name: file} of every module under ``folders``."""
    return {module_name(p): p for folder in folders for p in sorted((REPO / folder).rglob("*.py"))}


MODULES = project_files()


def imports_of(node: ast.Import | ast.ImportFrom, path: Path) -> list[tuple[str, list[str], int]]:
    """One import statement as (module, names taken from it, line) rows; relative ones resolved."""
    if isinstance(node, ast.Import):
        return [(alias.name, [], node.lineno) for alias in node.names]
    base = node.module or ""
    if node.level:  # relative: from .x import y
        name = module_name(path)
        package = (name if path.name == "__init__.py" else name.rpartition(".")[0]).split(".")
        anchor = package[: len(package) - node.level + 1]
        base = ".".join([*anchor, base] if base else anchor)
    return [(base, [alias.name for alias in node.names], node.lineno)]


@functools.cache  # the checks below read the same files: each parsed once
def parsed(path: Path) -> ast.Module:
    return ast.parse(path.read_text(), str(path))


def imports(path: Path) -> list[tuple[str, list[str], int]]:
    """Every import in a file, at any depth (inside functions too)."""
    tree = parsed(path)
    statements = [node for node in ast.walk(tree) if isinstance(node, (ast.Import, ast.ImportFrom))]
    return [row for node in statements for row in imports_of(node, path)]


def project_targets(module: str, names: list[str]) -> set[str]:
    """The project modules an import statement loads: ``from pneumo import train`` loads pneumo.train."""
    targets = {f"{module}.{n}" for n in names if f"{module}.{n}" in MODULES}
    if module in MODULES and (not names or len(targets) < len(names)):
        targets.add(module)
    return targets


def import_graph() -> dict[str, set[str]]:
    graph = {}
    for name, path in MODULES.items():
        edges = set()
        for module, names, _ in imports(path):
            edges |= project_targets(module, names)
        graph[name] = edges - {name}
    return graph


def circle(graph: dict[str, set[str]]) -> list[str]:
    """One import circle of the graph (its first module repeated at the end), or []."""
    try:
        TopologicalSorter(graph).prepare()
    except CycleError as error:
        return error.args[1]
    return []


def is_private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def bound_modules(tree: ast.Module, path: Path) -> dict[str, str]:
    """{local name: project module} for every name an import binds to a module of the project."""
    bound = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.asname and alias.name in MODULES:
                    bound[alias.asname] = alias.name
                elif not alias.asname and alias.name.split(".")[0] in MODULES:
                    bound[alias.name.split(".")[0]] = alias.name.split(".")[0]  # import a.b binds a
        elif isinstance(node, ast.ImportFrom):
            module = imports_of(node, path)[0][0]
            for alias in node.names:
                if f"{module}.{alias.name}" in MODULES:
                    bound[alias.asname or alias.name] = f"{module}.{alias.name}"
    return bound


def private_crossings(path: Path) -> list[str]:
    """Private names this file imports from, or reads off, another module of the project."""
    here = module_name(path)
    where = path.relative_to(REPO)
    found = [f"{where}:{line} imports {module}.{n}" for module, names, line in imports(path)
             if module.split(".")[0] in LAYERS and module != here for n in names if is_private(n)]
    tree = parsed(path)
    bound = bound_modules(tree, path)

    def resolve(node: ast.expr) -> str | None:  # the project module an expression names, if any
        if isinstance(node, ast.Name):
            return bound.get(node.id)
        if isinstance(node, ast.Attribute):
            parent = resolve(node.value)
            return f"{parent}.{node.attr}" if parent and f"{parent}.{node.attr}" in MODULES else None
        return None

    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and is_private(node.attr):
            target = resolve(node.value)
            if target and target != here:
                found.append(f"{where}:{node.lineno} uses {target}.{node.attr}")
    return found


def reachable(graph: dict[str, set[str]], start: str) -> dict[str, list[str]]:
    """Every module ``start`` reaches, with one import chain to it."""
    paths, todo = {start: [start]}, [start]
    while todo:
        node = todo.pop(0)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in paths:
                paths[nxt] = [*paths[node], nxt]
                todo.append(nxt)
    return paths


def test_the_checks_see_the_project():
    """The other checks pass trivially if they read nothing: they read every layer."""
    graph = import_graph()
    assert {"pneumo.registry", "pneumo.train", "flows.full"} <= set(graph) and len(graph) >= 30
    assert any(m.startswith("tasks.") for m in graph["flows.full"])
    assert any(m.startswith("pneumo.") for task in graph if task.startswith("tasks.") for m in graph[task])
    assert set(circle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}})) == {"a", "b", "c"}


def test_no_import_circle():
    found = circle(import_graph())
    assert not found, "an import circle: " + " -> ".join(found)


def test_no_import_from_a_lower_layer_to_a_higher_one():
    wrong = []
    for name, path in MODULES.items():
        banned = FORBIDDEN.get(name.split(".")[0], set())
        wrong += [f"{path.relative_to(REPO)}:{line} imports {module}"
                  for module, _, line in imports(path) if module.split(".")[0] in banned]
    assert not wrong, "imports from a higher layer:\n" + "\n".join(wrong)


def test_no_private_name_crosses_a_module():
    files = [*MODULES.values(), *sorted((REPO / "benchmarks").glob("*.py"))]
    found = [crossing for path in files for crossing in private_crossings(path)]
    assert not found, f"{len(found)} private names cross a module:\n" + "\n".join(found)


def test_the_flow_file_reads_like_the_diagram():
    lines = len((REPO / "flows" / "full.py").read_text().splitlines())
    assert lines < FULL_FLOW_MAX_LINES, f"flows/full.py has {lines} lines"


def test_the_shell_stays_light():
    sizes = {str(path.relative_to(REPO)): len(path.read_text().splitlines()) for path in project_files(("flows", "cli")).values()}
    assert len(sizes) >= 8, sizes  # it reads both folders
    too_long = {path: lines for path, lines in sizes.items() if lines > SHELL_MODULE_MAX_LINES}
    assert not too_long, f"modules over {SHELL_MODULE_MAX_LINES} lines: {too_long}"
    assert sum(sizes.values()) <= SHELL_MAX_LINES, f"flows/ + cli/ have {sum(sizes.values())} lines: {sizes}"


def test_the_registry_does_not_climb_into_training():
    reached = reachable(import_graph(), "pneumo.registry")
    climbs = [" -> ".join(reached[m]) for m in sorted(REGISTRY_MUST_NOT_REACH & set(reached))]
    assert not climbs, "the registry reaches training or evaluation:\n" + "\n".join(climbs)
