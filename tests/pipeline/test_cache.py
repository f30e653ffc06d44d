"""Corrupted data at rest in the DVC cache: `rlhf verify` finds it before it is used, `--repair` mends it
(pipeline/cache.py). A real git + DVC repository whose prepare and sft stages are recorded in dvc.lock; the faults
are real bytes changed in the cache: one bit flipped with the file's size and mtime kept (bit rot, which DVC's state
database does not notice), and a truncated object that `dvc checkout` then copies into the workspace.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from support import git_env, make_tiny_repo_with_stages_done

from pipeline.cache import file_md5, object_path

pytestmark = pytest.mark.slow
WEIGHTS = "models/sft/model.safetensors"


@pytest.fixture
def repo(pipeline_workspace: Path, tmp_path: Path) -> Path:
    return make_tiny_repo_with_stages_done(tmp_path / "repo", pipeline_workspace, ["prepare", "sft"])


def rlhf(repo: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pipeline.cli", *args], cwd=repo, env=git_env(), capture_output=True, text=True
    )


def dvc(repo: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dvc", *args], cwd=repo, env=git_env(), capture_output=True, text=True)


def weights_object(repo: Path) -> Path:
    """The cache object of models/sft/model.safetensors (the md5 the workspace file has: dvc.lock's)."""
    return object_path(repo / ".dvc/cache", file_md5(repo / WEIGHTS))


def flip_one_bit(path: Path, offset: int) -> None:
    """Bit rot: one bit changed, the size and the modification time as they were."""
    stat = path.stat()
    os.chmod(path, 0o644)
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))
    os.chmod(path, stat.st_mode)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))


def test_bit_rot_in_the_cache_is_found_and_restored_from_the_workspace(repo: Path) -> None:
    cached = weights_object(repo)
    good = cached.read_bytes()
    assert rlhf(repo, "verify").returncode == 0
    flip_one_bit(cached, len(good) // 2)
    assert "up to date" in dvc(repo, "status", "sft").stdout, "DVC does not see it"

    found = rlhf(repo, "verify")
    assert found.returncode == 1
    errors = found.stderr.strip().splitlines()
    assert len(errors) == 1 and errors[0].startswith(f"error: {WEIGHTS} (stage sft): its cache object .dvc/cache/")
    assert f"dvc.lock says {file_md5(repo / WEIGHTS)}); run `rlhf verify --repair`" in errors[0]
    assert "1 corrupted, 0 missing" in found.stdout

    repaired = rlhf(repo, "verify", "--repair")
    assert repaired.returncode == 0
    assert f"repaired: {WEIGHTS}: cache object restored from the workspace file" in repaired.stdout
    assert cached.read_bytes() == good and cached.stat().st_mode & 0o777 == 0o444  # read-only, as DVC keeps them
    assert rlhf(repo, "verify").returncode == 0


def test_a_truncated_object_checked_out_is_found_removed_and_rebuilt(repo: Path) -> None:
    cached = weights_object(repo)
    locked_md5 = file_md5(repo / WEIGHTS)
    os.chmod(cached, 0o644)
    cached.write_bytes(cached.read_bytes()[:1000])
    (repo / WEIGHTS).unlink()
    checkout = dvc(repo, "checkout", "sft")
    assert checkout.returncode == 0 and (repo / WEIGHTS).stat().st_size == 1000, "DVC copies the damaged object"

    found = rlhf(repo, "verify")
    assert found.returncode == 1 and f"error: {WEIGHTS} (stage sft): its cache object" in found.stderr
    repaired = rlhf(repo, "verify", "--repair")
    assert f"repaired: {WEIGHTS}: corrupted cache object removed; `rlhf run` rebuilds stage sft" in repaired.stdout
    assert not cached.exists()

    rebuilt = dvc(repo, "repro", "sft")  # what `rlhf run` runs for the stage
    assert rebuilt.returncode == 0, rebuilt.stderr[-2000:]
    assert "Running stage 'sft'" in rebuilt.stdout
    assert rlhf(repo, "verify").returncode == 0
    assert (repo / WEIGHTS).stat().st_size > 1000
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    assert {out["path"] for out in lock["stages"]["sft"]["outs"]} >= {"models/sft"}
    print(f"sft rebuilt; weights md5 {file_md5(repo / WEIGHTS)} (before: {locked_md5})")
