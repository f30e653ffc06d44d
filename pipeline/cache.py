"""A deep check of the DVC cache against dvc.lock: `rlhf verify [--repair]` (docs/reliability.md, "Corrupted data at
rest").

DVC names every cache object by the MD5 of its content (``files/md5/ab/cdef…``; a folder output is a ``….dir``
object, a JSON list of its files' ``relpath`` and ``md5``). DVC itself trusts an object's name: `dvc checkout`
copies a bit-flipped object into the workspace and exits 0, and `dvc status` hashes objects again only when their
size or mtime changed (its state database), so silent bit rot goes unseen until a stage or a user reads the damaged
file. Here every object dvc.lock names is hashed again from its bytes.

Repair: an object whose workspace file still matches dvc.lock is restored from that file; otherwise the object is
removed, so DVC sees it missing and `rlhf run` rebuilds the stage (or `dvc pull` fetches it again).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import yaml

from pipeline.workspace import dvc_command, stage_environment, uncached_outputs

LOCK_FILE = "dvc.lock"
CHUNK = 1 << 20


@dataclass(frozen=True)
class CacheEntry:
    """One cache object dvc.lock refers to: the file ``path`` (in the workspace) of ``stage``, by ``md5``."""

    stage: str
    path: str
    md5: str


@dataclass(frozen=True)
class CacheProblem:
    entry: CacheEntry
    object_path: Path
    found_md5: str | None  # None: the object is missing

    @property
    def corrupted(self) -> bool:
        return self.found_md5 is not None


def file_md5(path: Path) -> str:
    """MD5 of a file's bytes, as DVC 3 names its cache objects."""
    digest = hashlib.md5()
    with open(path, "rb") as handle:
        while chunk := handle.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def cache_dir(repo: Path) -> Path:
    """The repository's DVC cache folder (`dvc cache dir`: .dvc/cache unless configured elsewhere)."""
    found = subprocess.run(
        dvc_command("cache", "dir"), cwd=repo, env=stage_environment(), capture_output=True, text=True, check=True
    )
    return Path(repo, found.stdout.strip())


def object_path(cache: Path, md5: str) -> Path:
    return cache / "files" / "md5" / md5[:2] / md5[2:]


def locked_outputs(repo: Path) -> list[CacheEntry]:
    """Every cached output dvc.lock records, stage by stage (a folder's own ``.dir`` entry included)."""
    lock = yaml.safe_load(Path(repo, LOCK_FILE).read_text()) or {}
    skip = uncached_outputs(repo)
    return [
        CacheEntry(stage, out["path"], out["md5"])
        for stage, spec in (lock.get("stages") or {}).items()
        for out in spec.get("outs", []) or []
        if out.get("md5") and out["path"] not in skip
    ]


def verify_cache(repo: str | Path) -> tuple[list[CacheEntry], list[CacheProblem]]:
    """Hash every object dvc.lock refers to (a folder's files through its ``.dir`` object); returns the entries
    checked and the problems (corrupted or missing objects). An object shared by several outputs is hashed once."""
    repo = Path(repo)
    cache = cache_dir(repo)
    checked: list[CacheEntry] = []
    problems: list[CacheProblem] = []
    seen: dict[str, str | None] = {}  # md5 → md5 found (None: missing)

    def check(entry: CacheEntry) -> bool:
        path = object_path(cache, entry.md5)
        if entry.md5 not in seen:
            seen[entry.md5] = file_md5(path) if path.is_file() else None
        checked.append(entry)
        found = seen[entry.md5]
        if found != entry.md5.removesuffix(".dir"):
            problems.append(CacheProblem(entry, path, found))
            return False
        return True

    for entry in locked_outputs(repo):
        if check(entry) and entry.md5.endswith(".dir"):
            for item in json.loads(object_path(cache, entry.md5).read_text()):
                check(CacheEntry(entry.stage, f"{entry.path}/{item['relpath']}", item["md5"]))
    return checked, problems


def repair(repo: str | Path, problem: CacheProblem) -> str:
    """Mend one corrupted object: restore it from the workspace file when that still matches dvc.lock, else remove
    it. Returns what was done, for the user."""
    repo = Path(repo)
    entry, target = problem.entry, problem.object_path
    workspace_file = repo / entry.path
    if not entry.md5.endswith(".dir") and workspace_file.is_file() and file_md5(workspace_file) == entry.md5:
        temporary = target.with_name(f".{target.name}.repair")
        shutil.copyfile(workspace_file, temporary)
        os.chmod(temporary, 0o444)  # DVC keeps cache objects read-only
        os.replace(temporary, target)
        return f"{entry.path}: cache object restored from the workspace file (it matches dvc.lock)"
    target.unlink(missing_ok=True)
    return (
        f"{entry.path}: corrupted cache object removed; `rlhf run` rebuilds stage {entry.stage} "
        "(or `dvc pull` fetches it from a remote)"
    )
