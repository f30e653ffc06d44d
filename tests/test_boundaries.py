"""The boundary between the ML library and everything else, checked on the source (ast, nothing imported).

    rlhf/      the ML library: never imports prefect, dvc, flows, tasks or pipeline; never runs a subprocess; never
               exits the process (sys.exit, SystemExit, os._exit); never tunes it (ctypes, mallopt, malloc_trim)
    tasks/     stage programs (they run on GPU machines without Prefect or DVC): never import prefect, dvc or flows;
               from pipeline only its light modules (workspace, lineage)
    pipeline/  workspace, lineage: the standard library and PyYAML only
    all four   no import cycle between their modules (imports inside functions included)

Each rule is a function over source text, so the tests below also plant a violation and watch the rule catch it.
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from support import REPO

PACKAGES = ("rlhf", "tasks", "flows", "pipeline")
LIBRARY_FORBIDDEN_IMPORTS = {"prefect", "dvc", "flows", "tasks", "pipeline", "subprocess", "ctypes"}
TASKS_FORBIDDEN_IMPORTS = {"prefect", "dvc", "flows"}
LIGHT_PIPELINE_MODULES = {"pipeline.workspace", "pipeline.lineage"}  # importable by stage programs
LIGHT_ALLOWED_THIRD_PARTY = {"yaml"}
EXITS = {("sys", "exit"), ("os", "_exit"), ("os", "abort")}
PROCESS_CALLS = {("os", "system"), ("os", "popen"), ("os", "fork"), ("os", "execv"), ("os", "execvp"), ("os", "spawnv")}
MALLOC_NAMES = {"mallopt", "malloc_trim"}


def source_files(package: str, root: Path = REPO) -> list[Path]:
    return sorted(path for path in (root / package).rglob("*.py") if "__pycache__" not in path.parts)


def module_name(path: Path, root: Path = REPO) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(tree: ast.AST, module: str) -> Iterator[tuple[int, str]]:
    """(line, absolute dotted name) of every import, at any depth (lazy imports inside functions count).

    ``from a import b`` gives both ``a`` and ``a.b`` (b may be a module); ``module`` resolves relative imports.
    """
    package = module.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1])
                name = f"{base}.{node.module}" if node.module else base
            else:
                name = node.module or ""
            yield node.lineno, name
            for alias in node.names:  # `from rlhf import data` imports the module rlhf.data
                yield node.lineno, f"{name}.{alias.name}"
        elif (
            isinstance(node, ast.Call)
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
            and _call_name(node.func) in {"__import__", "import_module"}
        ):
            yield node.lineno, node.args[0].value


def _call_name(func: ast.expr) -> str:
    return func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else ""


def _top(name: str) -> str:
    return name.split(".", 1)[0]


def _first_per_line(found: list[tuple[int, str]]) -> list[tuple[int, str]]:
    """One finding per line and top-level package (``from a import b`` yields a and a.b)."""
    seen: set[tuple[int, str]] = set()
    return [(line, name) for line, name in found if (line, _top(name)) not in seen and not seen.add((line, _top(name)))]


def library_violations(source: str, filename: str = "<source>", module: str = "rlhf.module") -> list[str]:
    """What in ``source`` (a module of rlhf/) crosses the library's boundary; [] when nothing does."""
    tree = ast.parse(source, filename)
    imports = [(line, name) for line, name in imported_modules(tree, module) if _top(name) in LIBRARY_FORBIDDEN_IMPORTS]
    found = [f"{filename}:{line}: imports {name}" for line, name in _first_per_line(imports)]
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
            pair = (node.value.id, node.attr)
            if pair in EXITS:
                found.append(f"{filename}:{node.lineno}: exits the process ({node.value.id}.{node.attr})")
            if pair in PROCESS_CALLS:
                found.append(f"{filename}:{node.lineno}: starts a process ({node.value.id}.{node.attr})")
        if isinstance(node, ast.ImportFrom) and node.module in {"sys", "os"}:
            for alias in node.names:
                if (node.module, alias.name) in EXITS | PROCESS_CALLS:
                    found.append(f"{filename}:{node.lineno}: imports {node.module}.{alias.name}")
        if isinstance(node, ast.Name) and node.id == "SystemExit":
            found.append(f"{filename}:{node.lineno}: exits the process (SystemExit)")
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in {"exit", "quit"}:
            found.append(f"{filename}:{node.lineno}: exits the process ({node.func.id}())")
        name = node.attr if isinstance(node, ast.Attribute) else node.id if isinstance(node, ast.Name) else None
        if name in MALLOC_NAMES:
            found.append(f"{filename}:{node.lineno}: tunes the process's malloc ({name})")
    return found


def tasks_violations(source: str, filename: str = "<source>", module: str = "tasks.module") -> list[str]:
    """Stage programs: no Prefect, DVC or flows; of pipeline, only its light modules."""
    found = []
    for line, name in imported_modules(ast.parse(source, filename), module):
        if _top(name) in TASKS_FORBIDDEN_IMPORTS:
            found.append((line, name))
        elif _top(name) == "pipeline" and name != "pipeline" and not _is_light(name):
            found.append((line, name))
    return [f"{filename}:{line}: imports {name}" for line, name in _first_per_line(found)]


def _is_light(name: str) -> bool:
    return any(name == light or name.startswith(light + ".") for light in LIGHT_PIPELINE_MODULES)


def light_module_violations(source: str, filename: str = "<source>", module: str = "pipeline.module") -> list[str]:
    """pipeline's light modules: the standard library, PyYAML and each other only."""
    allowed = set(sys.stdlib_module_names) | LIGHT_ALLOWED_THIRD_PARTY | {"__future__"}
    found = [
        (line, name)
        for line, name in imported_modules(ast.parse(source, filename), module)
        if _top(name) not in allowed and name != "pipeline" and not _is_light(name)
    ]
    return [f"{filename}:{line}: imports {name}" for line, name in _first_per_line(found)]


def import_graph(root: Path = REPO, packages: tuple[str, ...] = PACKAGES) -> dict[str, set[str]]:
    """module → the modules of ``packages`` it imports (a package's __init__ stands for the package)."""
    files = {module_name(path, root): path for package in packages for path in source_files(package, root)}
    graph: dict[str, set[str]] = {}
    for module, path in files.items():
        edges = set()
        for _, name in imported_modules(ast.parse(path.read_text(), str(path)), module):
            while name and name not in files:  # `from rlhf.data import DataError` → rlhf.data
                name = name.rpartition(".")[0]
            if name and name != module and name not in packages:
                edges.add(name)
        graph[module] = edges
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, …, a], or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == 1:
                return path[path.index(target) :] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        state[node] = 2
        path.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


# ----------------------------------------------------------------------------------------------- the rules hold


def check_package(package: str, rule) -> list[str]:
    """``rule`` applied to every module of ``package``: the violations, each naming file and line."""
    return [
        violation
        for path in source_files(package)
        for violation in rule(path.read_text(), str(path.relative_to(REPO)), module_name(path))
    ]


def test_the_library_stays_inside_its_boundary() -> None:
    assert len(source_files("rlhf")) > 10
    assert check_package("rlhf", library_violations) == []


def test_stage_programs_need_neither_prefect_nor_dvc() -> None:
    assert check_package("tasks", tasks_violations) == []


def test_the_light_pipeline_modules_import_only_the_standard_library_and_yaml() -> None:
    found = []
    for name in sorted(LIGHT_PIPELINE_MODULES):
        path = REPO / (name.replace(".", "/") + ".py")
        found += light_module_violations(path.read_text(), str(path.relative_to(REPO)), name)
    assert found == []


def test_no_import_cycle_between_modules() -> None:
    graph = import_graph()
    assert {"pipeline.cli", "flows.stages", "rlhf.data", "tasks.release"} <= set(graph)
    assert "flows.lifecycle" in graph["pipeline.cli"]  # the lazy imports are in the graph too
    assert find_cycle(graph) is None


# ----------------------------------------------------------------------------------------------- the rules can fail

PLANTED = """
import subprocess
import prefect
from flows.stages import run_stage
from pipeline import lock
import tasks.stage_io
import ctypes, os, sys

def leave():
    sys.exit(1)

def crash():
    os._exit(3)

def stop():
    raise SystemExit(2)

def tune(libc):
    libc.mallopt(-3, 1 << 20)

def shell():
    subprocess.run(["dvc", "repro"])
    os.system("git rev-parse HEAD")

def sneaky():
    __import__("dvc.repo")
"""


def test_each_library_rule_catches_a_planted_violation(tmp_path: Path) -> None:
    planted = tmp_path / "rlhf" / "planted.py"
    planted.parent.mkdir()
    planted.write_text(PLANTED)
    found = "\n".join(library_violations(planted.read_text(), "planted.py", "rlhf.planted"))
    for expected in (
        "2: imports subprocess",
        "3: imports prefect",
        "4: imports flows.stages",
        "5: imports pipeline",
        "6: imports tasks.stage_io",
        "7: imports ctypes",
        "10: exits the process (sys.exit)",
        "13: exits the process (os._exit)",
        "16: exits the process (SystemExit)",
        "19: tunes the process's malloc (mallopt)",
        "23: starts a process (os.system)",
        "26: imports dvc.repo",
    ):
        assert f"planted.py:{expected}" in found, expected
    assert library_violations("import json\nfrom rlhf.files import write_json\n") == []


def test_the_stage_and_light_module_rules_catch_planted_violations() -> None:
    source = (
        "from prefect import flow\nimport dvc.api\nfrom pipeline.hub import publish_release\n"
        "from pipeline.lineage import git_commit\n"
    )
    assert [v.split(": ", 1)[0] for v in tasks_violations(source)] == ["<source>:1", "<source>:2", "<source>:3"]
    light = (
        "import json\nimport yaml\nimport torch\nfrom pipeline.workspace import stage_names\n"
        "from rlhf.files import path_digest\n"
    )
    assert light_module_violations(light) == ["<source>:3: imports torch", "<source>:5: imports rlhf.files"]
    assert tasks_violations("from pipeline import hub\n") == ["<source>:1: imports pipeline.hub"]


def test_a_planted_import_cycle_is_found(tmp_path: Path) -> None:
    for package in ("flows", "pipeline"):
        (tmp_path / package).mkdir()
        (tmp_path / package / "__init__.py").write_text("")
    (tmp_path / "flows/run.py").write_text("from pipeline.cli import main\n")
    (tmp_path / "pipeline/cli.py").write_text("def main():\n    from flows.run import go\n")  # lazy, still a cycle
    (tmp_path / "pipeline/workspace.py").write_text("import yaml\n")
    graph = import_graph(tmp_path, ("flows", "pipeline"))
    assert graph == {
        "flows": set(),
        "flows.run": {"pipeline.cli"},
        "pipeline": set(),
        "pipeline.cli": {"flows.run"},
        "pipeline.workspace": set(),
    }
    assert find_cycle(graph) == ["flows.run", "pipeline.cli", "flows.run"]
    (tmp_path / "pipeline/cli.py").write_text("def main():\n    from pipeline.workspace import stage_names\n")
    assert find_cycle(import_graph(tmp_path, ("flows", "pipeline"))) is None


@pytest.mark.parametrize("package", PACKAGES)
def test_every_package_parses(package: str) -> None:
    for path in source_files(package):
        ast.parse(path.read_text(), str(path))
