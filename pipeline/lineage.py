"""Where a release came from: the one reader of dvc.lock, and the git commit.

    stage_lineage(Path("dvc.lock"), upstream_of("release"))   # per stage {"deps": {path: md5}, "outs": {...}}
    release_md5(Path("dvc.lock"))                             # the md5 DVC recorded for models/release
    git_commit()                                              # HEAD, or "unknown"

Standard library and PyYAML only: the release stage program imports this on machines without Prefect or DVC.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import yaml

LOCK_FILE = "dvc.lock"
RELEASE_STAGE, RELEASE_OUT = "release", "models/release"

Lineage = dict[str, dict[str, dict[str, str]]]  # stage → "deps" | "outs" → path → md5


def read_lock(lock_path: str | Path) -> dict:
    """dvc.lock as a dict ({} when there is none: the outputs were not built by `dvc repro`)."""
    lock_path = Path(lock_path)
    if not lock_path.exists():
        return {}
    return yaml.safe_load(lock_path.read_text()) or {}


def stage_lineage(lock_path: str | Path, stages: list[str]) -> Lineage:
    """Per stage: ``{"deps": {path: md5}, "outs": {path: md5}}`` as recorded in dvc.lock ({} without a lock)."""
    if not Path(lock_path).exists():
        return {}
    lock = read_lock(lock_path)
    lineage: Lineage = {}
    for stage in stages:
        entry = lock.get("stages", {}).get(stage, {})
        lineage[stage] = {
            kind: {item["path"]: item.get("md5", "") for item in entry.get(kind, [])} for kind in ("deps", "outs")
        }
    return lineage


def release_md5(lock_path: str | Path, stage: str = RELEASE_STAGE, out: str = RELEASE_OUT) -> str | None:
    """The md5 DVC recorded for ``out`` of ``stage`` in dvc.lock, without the ``.dir`` suffix (None if absent)."""
    for item in read_lock(lock_path).get("stages", {}).get(stage, {}).get("outs", []):
        if item.get("path") == out and item.get("md5"):
            return str(item["md5"]).removesuffix(".dir")
    return None


def git_commit(repo_dir: str | Path = ".") -> str:
    """The commit checked out in ``repo_dir`` ("unknown" outside a git repository or without git)."""
    try:
        result = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo_dir, capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return result.stdout.strip() or "unknown"
