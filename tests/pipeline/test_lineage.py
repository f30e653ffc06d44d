"""The one dvc.lock reader (per-stage md5s for the model card, the release md5 for the Hub tag) and the git commit."""

from __future__ import annotations

import subprocess
from pathlib import Path

import yaml
from support import git_env

from pipeline.lineage import git_commit, read_lock, release_md5, stage_lineage
from rlhf.files import path_digest

LOCK = {
    "schema": "2.0",
    "stages": {
        "ppo": {
            "cmd": "accelerate launch -m tasks.ppo",
            "deps": [
                {"path": "models/sft", "md5": "aaa.dir", "size": 1, "nfiles": 3},
                {"path": "tasks/ppo.py", "md5": "bbb", "size": 2},
            ],
            "outs": [{"path": "models/policy", "md5": "ccc.dir", "size": 3, "nfiles": 3}],
        },
        "release": {
            "cmd": "python -m tasks.release",
            "deps": [{"path": "models/policy", "md5": "ccc.dir"}],
            "outs": [{"path": "models/release", "md5": "0123456789abcdef.dir"}],
        },
    },
}


def write_lock(folder: Path) -> Path:
    path = folder / "dvc.lock"
    path.write_text(yaml.safe_dump(LOCK))
    return path


def test_lineage_records_the_hash_of_every_dep_and_out(tmp_path: Path) -> None:
    lineage = stage_lineage(write_lock(tmp_path), ["ppo", "missing"])
    assert list(lineage) == ["ppo", "missing"]  # in the order asked (dvc.yaml's)
    assert lineage["ppo"] == {
        "deps": {"models/sft": "aaa.dir", "tasks/ppo.py": "bbb"},
        "outs": {"models/policy": "ccc.dir"},
    }
    assert lineage["missing"] == {"deps": {}, "outs": {}}
    assert stage_lineage(tmp_path / "absent.lock", ["ppo"]) == {}
    assert read_lock(tmp_path / "absent.lock") == {}


def test_release_md5_is_the_release_out_without_the_dir_suffix(tmp_path: Path) -> None:
    lock = write_lock(tmp_path)
    assert release_md5(lock) == "0123456789abcdef"
    assert release_md5(lock, stage="ppo", out="models/policy") == "ccc"
    assert release_md5(lock, stage="ppo") is None and release_md5(tmp_path / "absent.lock") is None


def test_release_tag_falls_back_to_the_folder_digest(tmp_path: Path) -> None:
    from pipeline.hub import release_tag

    release = tmp_path / "models/release"
    release.mkdir(parents=True)
    (release / "config.json").write_text("{}")
    assert release_tag(release) == f"run-{path_digest(release)[:12]}"  # no dvc.lock beside models/
    write_lock(tmp_path)
    assert release_tag(release) == "run-0123456789ab"


def test_git_commit_is_head_or_unknown(tmp_path: Path) -> None:
    assert git_commit(tmp_path) == "unknown"  # not a repository
    for command in (["git", "init", "-q"], ["git", "commit", "-q", "--allow-empty", "-m", "empty"]):
        subprocess.run(command, cwd=tmp_path, env=git_env(), check=True, capture_output=True)
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=tmp_path, capture_output=True, text=True).stdout.strip()
    assert git_commit(tmp_path) == head and len(head) == 40
