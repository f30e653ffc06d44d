"""DVC sees what the code sees: every project module a stage program imports (transitively) is a dep of that stage,
and every params section it reads is in its `params`.

The import closure is computed with ast from the module after `-m` in the stage's cmd, over the project packages
(imports inside functions count; `if TYPE_CHECKING:` blocks do not run and do not count). Package __init__ files run
on import and count. `module:callable` params (label.gold, evaluate.gold, evaluate.validity) are imported at run
time: their default modules count for the stages that read them.
"""

from __future__ import annotations

import ast
import re
from functools import cache
from pathlib import Path

import pytest
import yaml

from rlhf.params import load_params

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("rlhf", "tasks", "pipeline", "flows")
DVC_YAML = yaml.safe_load((REPO / "dvc.yaml").read_text())
STAGES = DVC_YAML["stages"]
PARAMS = load_params(REPO / "params.yaml")
CALLABLE_PARAMS = {"label": [PARAMS.label.gold], "evaluate": [PARAMS.evaluate.gold, PARAMS.evaluate.validity]}


def module_file(name: str) -> Path | None:
    """The file of a project module (``a.b`` → a/b.py or a/b/__init__.py), None outside the project packages."""
    if name.split(".")[0] not in PACKAGES:
        return None
    base = REPO.joinpath(*name.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _import_nodes(tree: ast.AST):
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and _is_type_checking(node):
            stack.extend(node.orelse)
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        stack.extend(ast.iter_child_nodes(node))


def _package_of(name: str, path: Path) -> str:
    return name if path.name == "__init__.py" else name.rpartition(".")[0]


@cache
def imported_modules(name: str) -> frozenset[str]:
    """Project modules ``name`` imports directly (``from pkg import mod`` names the submodule when it is one)."""
    path = module_file(name)
    found: set[str] = set()
    for node in _import_nodes(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
            continue
        if node.level:  # relative: from .x import y
            package = _package_of(name, path)
            for _ in range(node.level - 1):
                package = package.rpartition(".")[0]
            base = f"{package}.{node.module}" if node.module else package
        else:
            base = node.module
        found.add(base)
        found.update(f"{base}.{alias.name}" for alias in node.names)
    return frozenset(module for module in found if module_file(module) is not None)


def with_parents(name: str) -> set[str]:
    """A module and the packages above it: importing a.b.c runs a/__init__.py and a/b/__init__.py first."""
    parts = name.split(".")
    return {".".join(parts[:i]) for i in range(1, len(parts) + 1) if module_file(".".join(parts[:i])) is not None}


def closure(roots: list[str]) -> set[str]:
    seen: set[str] = set()
    todo = [module for root in roots for module in with_parents(root)]
    while todo:
        module = todo.pop()
        if module in seen:
            continue
        seen.add(module)
        for imported in imported_modules(module):
            todo.extend(with_parents(imported) - seen)
    return seen


def stage_programs(stage: str) -> list[str]:
    """The modules the cmd runs: ``-m tasks.<stage>``, after ``-m tasks.launch`` for a launched model stage."""
    modules = re.findall(r"(?:^|\s)-m\s+([\w.]+)", " ".join(str(STAGES[stage]["cmd"]).split()))
    assert modules, f"dvc.yaml: stage {stage}'s cmd runs no `-m module`"
    return modules


def stage_program(stage: str) -> str:
    """The stage's own program (the last ``-m module``)."""
    return stage_programs(stage)[-1]


def stage_closure(stage: str) -> set[str]:
    """Project modules the stage's programs run (and the modules its `module:callable` params name)."""
    roots = stage_programs(stage) + [spec.partition(":")[0] for spec in CALLABLE_PARAMS.get(stage, []) if spec]
    return closure(roots)


def stage_files(stage: str) -> set[str]:
    return {module_file(module).relative_to(REPO).as_posix() for module in stage_closure(stage)}


def covered(path: str, deps: list[str]) -> bool:
    return any(path == dep or path.startswith(dep.rstrip("/") + "/") for dep in deps)


@pytest.mark.parametrize("stage", list(STAGES))
def test_every_module_a_stage_imports_is_a_dep(stage: str) -> None:
    deps = [dep for dep in STAGES[stage]["deps"] if "${" not in dep]
    missing = sorted(path for path in stage_files(stage) if not covered(path, deps))
    assert missing == [], f"dvc.yaml: stage {stage} imports these project files but does not depend on them"
    for module in ("rlhf/config.py", "rlhf/params.py"):
        assert covered(module, deps), f"dvc.yaml: stage {stage} must depend on {module} (reads params)"


@pytest.mark.parametrize("stage", list(STAGES))
def test_a_stage_depends_on_no_project_module_it_does_not_import(stage: str) -> None:
    # a stale dep would rerun the stage for edits that cannot change its result
    files = stage_files(stage)
    extra = sorted(dep for dep in STAGES[stage]["deps"] if dep.endswith(".py") and dep not in files)
    assert extra == [], f"dvc.yaml: stage {stage} depends on modules it never imports"


def dvc_params(stage: str) -> set[str]:
    """The params a stage lists: keys, sections, or "params.yaml" for the whole file."""
    names: set[str] = set()
    for item in STAGES[stage].get("params", []):
        if isinstance(item, str):
            names.add(item)
        else:
            for file, keys in item.items():
                names.update(keys or [file])
    return names


def params_read(stage: str) -> set[str]:
    """Params keys a stage program reads, from the AST of tasks/<stage>.py: ``params.section[.key]``, ``stage_seed``
    (→ seed), and "params.yaml" when the whole params object leaves the module (e.g. ``as_dict(params)``)."""
    path = module_file(stage_program(stage))
    tree = ast.parse(path.read_text(), str(path))
    local_functions = {node.name for node in ast.walk(tree) if isinstance(node, ast.FunctionDef)}
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    reads: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "params":
            parent = parents.get(node)
            if node.attr == "stage_seed":
                reads.add("seed")
            elif node.attr == "launch":  # params.launch.for_stage(stage): the shared keys and the stage's override
                shared = {"launch.config_file", "launch.num_processes", "launch.mixed_precision"}
                reads.update(shared | {f"launch.{stage}"})
            elif isinstance(parent, ast.Attribute) and parent.value is node:
                reads.add(f"{node.attr}.{parent.attr}")  # params.section.key
            else:
                reads.add(node.attr)  # params.seed, or a whole section (config = params.ppo)
        if isinstance(node, ast.Call) and any(isinstance(arg, ast.Name) and arg.id == "params" for arg in node.args):
            name = node.func.id if isinstance(node.func, ast.Name) else None
            if name not in local_functions:
                reads.add("params.yaml")
    return reads


@pytest.mark.parametrize("stage", list(STAGES))
def test_every_param_a_stage_reads_is_in_its_params(stage: str) -> None:
    listed = dvc_params(stage)
    assert listed, f"dvc.yaml: stage {stage} lists no params"
    if "params.yaml" in listed:
        return
    reads = params_read(stage)
    assert "params.yaml" not in reads, f"dvc.yaml: stage {stage} hands all params on: list `- params.yaml:`"
    missing = sorted(key for key in reads if key not in listed and key.split(".")[0] not in listed)
    assert missing == [], f"dvc.yaml: stage {stage} reads these params but does not list them"


@pytest.mark.parametrize("stage", [stage for stage in STAGES if "tasks.launch" in stage_programs(stage)])
def test_a_launched_stage_lists_its_launch_params_and_the_profiles(stage: str) -> None:
    # tasks/launch.py reads the shared launch keys and the stage's override, and starts the profile under configs/
    launch_keys = {"launch.config_file", "launch.num_processes", "launch.mixed_precision", f"launch.{stage}"}
    assert launch_keys <= dvc_params(stage), f"dvc.yaml: stage {stage} must list {sorted(launch_keys)}"
    assert "configs" in STAGES[stage]["deps"], f"dvc.yaml: stage {stage} must depend on configs (the profiles)"
    assert stage_program(stage) == f"tasks.{stage}"


def test_the_stage_seed_streams_name_stages() -> None:
    from rlhf.config import STAGE_SEED_OFFSETS

    assert {stream.split(".")[0] for stream in STAGE_SEED_OFFSETS} <= set(STAGES)


def sampler_module() -> str:
    """A project file imported by sample_pairs, ppo and evaluate and no other stage (the sampler; the e2e test)."""
    users = {"sample_pairs", "ppo", "evaluate"}
    candidates = set.intersection(*(stage_files(stage) for stage in users))
    candidates -= set.union(*(stage_files(stage) for stage in STAGES if stage not in users))
    assert candidates, "no module is shared by exactly sample_pairs, ppo and evaluate"
    return "rlhf/sampling.py" if "rlhf/sampling.py" in candidates else sorted(candidates)[0]


def test_a_sampler_module_exists() -> None:
    assert sampler_module().endswith(".py")
