"""The workspace as DVC sees it: the one stage list (dvc.yaml, in its order), the stage environment, the dvc runner.

Standard library and PyYAML only: stage programs import this module on machines without Prefect or DVC.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

DVC_FILE = "dvc.yaml"


def _stage_specs(repo_dir: str | Path) -> dict[str, dict]:
    path = Path(repo_dir, DVC_FILE)
    if not path.exists():
        return {}
    return (yaml.safe_load(path.read_text()) or {}).get("stages", {}) or {}


def stage_names(repo_dir: str | Path = ".") -> list[str]:
    """Stage names in dvc.yaml order (a topological order of the DAG); [] where there is no dvc.yaml."""
    return list(_stage_specs(repo_dir))


def upstream_of(stage: str, repo_dir: str | Path = ".") -> list[str]:
    """The stages listed before ``stage`` in dvc.yaml (all stages if it is not listed)."""
    names = stage_names(repo_dir)
    return names[: names.index(stage)] if stage in names else names


def stage_metrics_files(repo_dir: str | Path, stage: str) -> list[Path]:
    """The JSON metrics files a stage declares in dvc.yaml."""
    files: list[str] = []
    for entry in _stage_specs(repo_dir)[stage].get("metrics", []):
        files += list(entry) if isinstance(entry, dict) else [entry]
    return [Path(repo_dir, name) for name in files]


def stage_outputs(repo_dir: str | Path, stage: str) -> list[str]:
    """The paths a stage writes as dvc.yaml's ``outs`` (metrics and plots files not included)."""
    return [
        next(iter(entry)) if isinstance(entry, dict) else entry
        for entry in _stage_specs(repo_dir)[stage].get("outs", [])
    ]


def heal_dvc_rwlock(repo_dir: str | Path = ".") -> str | None:
    """Remove DVC's ``.dvc/tmp/rwlock`` when it is not valid JSON; returns a line saying so, else None.

    DVC rewrites that file in place at the start of each command; on a full disk the write stops part way, and every
    later DVC command fails with "Unable to read RWLock-file … corrupted" (measured with DVC 3.67,
    docs/reliability.md "Disk full"). It only lists what running DVC commands read and write, and callers hold the
    workspace lock, so a damaged one is stale."""
    path = Path(repo_dir, ".dvc/tmp/rwlock")
    try:
        json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (ValueError, UnicodeDecodeError):
        path.unlink(missing_ok=True)
        return f"removed DVC's damaged lock record {path.relative_to(repo_dir)} (cut off, e.g. by a full disk)"
    return None


def uncached_outputs(repo_dir: str | Path = ".") -> set[str]:
    """Outputs dvc.yaml declares with ``cache: false`` (dvc.lock records their hash; the cache has no object)."""
    paths = set()
    for spec in _stage_specs(repo_dir).values():
        for kind in ("outs", "metrics", "plots"):
            for entry in spec.get(kind, []) or []:
                if isinstance(entry, dict):
                    paths |= {path for path, options in entry.items() if (options or {}).get("cache") is False}
    return paths


def stage_environment(unbuffered: bool = False) -> dict[str, str]:
    """The environment stage commands run in: `python` and `accelerate` resolve to this installation's interpreter.

    ``unbuffered``: stage output streams line by line (the Prefect task logs it as it comes).
    """
    env = dict(os.environ)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    env.setdefault("DVC_NO_ANALYTICS", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    if env.get("RLHF_VERBOSE", "") in ("", "0"):  # `--verbose` keeps the libraries' progress bars
        env.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # transformers' weight-loading and shard-writing bars
    if unbuffered:
        env["PYTHONUNBUFFERED"] = "1"
    return env


def dvc_command(*args: str) -> list[str]:
    """``dvc ARGS`` run by this interpreter (DVC is a dependency of this installation, not a separate tool)."""
    return [sys.executable, "-m", "dvc", *args]


def dvc(*args: str, repo_dir: str | Path = ".") -> int:
    """Run ``dvc ARGS`` in ``repo_dir`` with the stage environment, output to this terminal; returns its exit code."""
    return subprocess.call(dvc_command(*args), cwd=repo_dir, env=stage_environment())


def out_of_date_stages(repo_dir: str | Path = ".") -> list[str]:
    """Stages DVC considers out of date (changed deps, params or missing outputs), sorted; raises if dvc fails."""
    result = subprocess.run(
        dvc_command("status", "--json"),
        cwd=repo_dir,
        env=stage_environment(),
        capture_output=True,
        text=True,
        check=True,
    )
    return sorted(name.split(":")[-1] for name in json.loads(result.stdout or "{}"))


def changed_outputs(stage: str, repo_dir: str | Path = ".") -> dict[str, str]:
    """The outputs of ``stage`` whose files no longer match dvc.lock (``{path: "modified" | "deleted" | …}``), as DVC
    sees them (``dvc status --json STAGE``: it hashes the files again); raises if dvc fails."""
    result = subprocess.run(
        dvc_command("status", "--json", stage),
        cwd=repo_dir,
        env=stage_environment(),
        capture_output=True,
        text=True,
        check=True,
    )
    changed: dict[str, str] = {}
    for entries in json.loads(result.stdout or "{}").values():
        for entry in entries:
            if isinstance(entry, dict):
                changed.update(entry.get("changed outs", {}))
    return changed
