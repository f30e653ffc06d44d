"""A full disk (ENOSPC) while a stage writes its model, its dataset or a resume checkpoint, and while DVC records a
stage: each on a real tmpfs mount made full by a filler file, as root (the tests skip, saying why, where mounting is
not permitted).

A stage stops with one line, ``error: <stage>: no space left on device writing <path> (needed ≈ N MiB, M MiB free on
<mount>); free space and rerun — <what is kept>``, exit 4 (tasks/stage_io.py EXIT_NO_SPACE); its partial files are
removed, every earlier output stays byte-identical, the last good resume checkpoint stays the one latest.json points
to, and once the filler is deleted a rerun succeeds (PPO resumes from the kept checkpoint).

DVC itself (3.67, the pinned version) on a full disk, as :func:`test_dvc_on_a_full_disk` finds it:
1. only DVC's copy of the outputs into its cache fails: DVC logs ``ERROR: failed to transfer … No space left on
   device``, records the new hashes in dvc.lock anyway and exits 0; the cache lacks those files (and keeps DVC's temp
   files) until the stage runs again with space free;
2. the disk is full when DVC starts: DVC's in-place write of its read/write lock fails (``ERROR: failed to reproduce
   'STAGE': [Errno 28] No space left on device``, exit 255) before the stage runs, and leaves .dvc/tmp/rwlock cut
   off, so every later DVC command fails (``Unable to read RWLock-file``) until that file is removed;
3. the stage program finds the disk full: its one line and ``exited with 4`` are in DVC's output, dvc.lock as it was.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from support import git_env, make_tiny_repo_with_stages_done, run_stage, set_params

import tasks.stage_io
from flows.stages import dvc_no_space
from pipeline.workspace import heal_dvc_rwlock
from rlhf.files import path_digest, tree_size
from tasks.stage_io import EXIT_NO_SPACE, read_events, reports_full_disk

OUTPUT_FOLDERS = ("data", "models", "metrics", "plots")  # every stage output but DVCLive's curves and the events


# --------------------------------------------------------------------------------------------------------- helpers


@contextlib.contextmanager
def tmpfs(folder: Path, size_mib: int) -> Iterator[Path]:
    """A ``size_mib`` MiB tmpfs mounted on ``folder`` (created) for the block; skips the test where mounting is not
    permitted (not root, no mount(8), a container without CAP_SYS_ADMIN)."""
    folder.mkdir(parents=True, exist_ok=True)
    try:
        mounted = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size_mib}m", "tmpfs", str(folder)], capture_output=True, text=True
        )
    except FileNotFoundError:
        pytest.skip("no mount(8) here: a full disk is tested on a tmpfs mount")
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({mounted.stderr.strip()}): a full disk is tested on one, as root")
    try:
        yield folder
    finally:
        if subprocess.run(["umount", str(folder)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(folder)], capture_output=True)  # still busy: detach it now


def fill(mount: Path, leave: int = 0) -> Path:
    """Write a filler file into ``mount`` so that about ``leave`` bytes stay free (tmpfs counts whole pages)."""
    filler = mount / "filler"
    with open(filler, "wb") as handle:
        handle.write(bytes(max(0, shutil.disk_usage(mount).free - leave)))
    return filler


def output_digests(workspace: Path) -> dict[str, str]:
    """path_digest of every file the stages wrote (data/, models/, metrics/, plots/)."""
    files = [p for folder in OUTPUT_FOLDERS for p in sorted((workspace / folder).rglob("*")) if p.is_file()]
    return {p.relative_to(workspace).as_posix(): path_digest(p) for p in files}


def leftovers(folder: Path) -> list[str]:
    """Partial files and folders a failed write could leave (rlhf.files: ``*.partial``, ``.*.tmp``; checkpoints:
    ``tmp-step-N``), outside the .git and .dvc folders."""
    names = ("*.partial", "*.tmp", "tmp-step-*")
    found = (p.relative_to(folder).as_posix() for name in names for p in folder.rglob(name))
    return sorted(path for path in found if not path.startswith((".git/", ".dvc/")))


def one_error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, stderr[-3000:]
    print(lines[0])  # in the test log: the message as a person sees it
    return lines[0]


def assert_needed(line: str, expected_bytes: int) -> None:
    """The message's "needed ≈ N MiB" is within 25 % of ``expected_bytes`` (it is an estimate)."""
    match = re.search(r"\(needed ≈ ([0-9.e+-]+) MiB, ([0-9.e+-]+) MiB free on ", line)
    assert match, line
    needed = float(match.group(1)) * 2**20
    assert abs(needed - expected_bytes) <= 0.25 * expected_bytes, (line, expected_bytes)


@pytest.fixture
def workspace_on_tmpfs(pipeline_workspace: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A copy of the pipeline workspace (2.2 MiB) on an 8 MiB tmpfs of its own, as cwd."""
    with tmpfs(tmp_path / "disk", 8) as disk:
        workspace = disk / "workspace"
        shutil.copytree(pipeline_workspace, workspace)
        monkeypatch.chdir(workspace)
        yield workspace
        monkeypatch.chdir(tmp_path)  # before the unmount: a cwd inside keeps the mount busy


# ------------------------------------------------------------------------------------------------- stage outputs


def test_sft_finding_the_disk_full_as_it_writes_its_model_keeps_the_previous_model_and_reruns_once_space_is_freed(
    workspace_on_tmpfs: Path, capsys: pytest.CaptureFixture
) -> None:
    workspace = workspace_on_tmpfs
    before = output_digests(workspace)
    weights = tree_size(workspace / "models/sft/model.safetensors")
    filler = fill(workspace.parent, leave=weights // 2)  # training fits; the new model beside the old does not
    with pytest.raises(SystemExit) as stopped:
        run_stage("sft")
    assert stopped.value.code == EXIT_NO_SPACE
    line = one_error_line(capsys.readouterr().err)
    assert line.startswith("error: sft: no space left on device writing models/sft (needed ≈ "), line
    assert_needed(line, tree_size(workspace / "models/sft"))  # the new model, as large as the one it replaces
    assert f"MiB free on {workspace.parent}); free space and rerun — previous models/sft untouched; " in line, line
    assert line.endswith("no resume checkpoint in .rlhf/checkpoints/sft"), line
    assert output_digests(workspace) == before, "every earlier output is byte-identical"
    assert leftovers(workspace) == []

    filler.unlink()
    run_stage("sft")
    assert read_events("sft", workspace, "metrics"), "the rerun finished"
    assert leftovers(workspace) == []


def test_sample_pairs_finding_the_disk_full_as_it_writes_its_dataset_keeps_the_previous_one(
    workspace_on_tmpfs: Path, capsys: pytest.CaptureFixture
) -> None:
    workspace = workspace_on_tmpfs
    samples = workspace / "data/pairs/samples.jsonl"
    before = output_digests(workspace)
    filler = fill(workspace.parent, leave=tree_size(samples) // 3)
    with pytest.raises(SystemExit) as stopped:
        run_stage("sample_pairs")
    assert stopped.value.code == EXIT_NO_SPACE
    line = one_error_line(capsys.readouterr().err)
    assert line.startswith("error: sample_pairs: no space left on device writing data/pairs/samples.jsonl "), line
    assert_needed(line, tree_size(samples))  # the same rows again
    assert "previous data/pairs/samples.jsonl untouched" in line, line
    assert output_digests(workspace) == before
    assert leftovers(workspace) == []

    filler.unlink()
    run_stage("sample_pairs")
    assert output_digests(workspace) == before, "the same rows, now written"


def test_a_full_disk_met_by_a_writer_outside_rlhf_files_is_one_line_too(
    pipeline_workspace: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """Writers other than rlhf.files' (the events file's appends, DVCLive, a Rust tokenizer saving itself) raise what
    they raise (an OSError naming no file; tokenizers' "No space left on device (os error 28)"): still one line, exit
    4, saying the file may be incomplete, since no one removed it."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(pipeline_workspace / "models/base")
    with tmpfs(tmp_path / "disk", 1) as disk:
        monkeypatch.chdir(disk)
        fill(disk)

        @reports_full_disk("label")
        def append_an_event() -> None:
            with open(disk / "events.jsonl", "a") as events:
                events.write("x" * 10_000)

        @reports_full_disk("prepare")
        def save_the_tokenizer() -> None:
            tokenizer.backend_tokenizer.save(str(disk / "tokenizer.json"))

        for program in (append_an_event, save_the_tokenizer):
            with pytest.raises(SystemExit) as stopped:
                program()
            assert stopped.value.code == EXIT_NO_SPACE
            line = one_error_line(capsys.readouterr().err)
            assert line.endswith(
                f"no space left on device writing a file the error does not name (needed more than is free, 0 MiB "
                f"free on {disk}); free space and rerun — the file being written may be incomplete"
            ), line
        monkeypatch.chdir(tmp_path)


# ------------------------------------------------------------------------------------------- resume checkpoints


def test_ppo_finding_the_disk_full_at_a_checkpoint_keeps_the_last_good_one_and_resumes_from_it(
    in_copy_of_workspace: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """The checkpoint folder on a tmpfs of its own; a filler fills it right after the checkpoint of iteration 2, so
    the policy snapshot of iteration 3 fits and the checkpoint of iteration 4 does not."""
    workspace = in_copy_of_workspace
    set_params(workspace, ppo={"iterations": 6, "resume_every": 2, "snapshot_every": 3})
    folder = workspace / ".rlhf/checkpoints/ppo"
    before = output_digests(workspace)
    with tmpfs(workspace / ".rlhf/checkpoints", 16) as disk:
        kept: dict[str, object] = {}
        real_emit = tasks.stage_io.emit

        def emit_then_fill(stage: str, event: str, **fields: object) -> None:  # the moment after checkpoint 2
            real_emit(stage, event, **fields)
            if event == "checkpoint" and fields["step"] == 2:
                kept.update(digest=path_digest(folder / "step-2"), size=tree_size(folder / "step-2"))
                kept["filler"] = fill(disk, leave=int(kept["size"]) // 2)  # half of the next checkpoint fits

        with monkeypatch.context() as patch, pytest.raises(SystemExit) as stopped:  # not undo(): that undoes chdir
            patch.setattr(tasks.stage_io, "emit", emit_then_fill)
            run_stage("ppo")
        assert stopped.value.code == EXIT_NO_SPACE
        line = one_error_line(capsys.readouterr().err)
        assert line.startswith(
            "error: ppo: no space left on device writing .rlhf/checkpoints/ppo/tmp-step-4/state.pt"
        ), line
        assert_needed(line, int(kept["size"]))  # a checkpoint as large as the last
        assert f"MiB free on {disk}); " in line, line
        assert line.endswith(
            "free space and rerun — half-written checkpoint removed; resume checkpoint of iteration 2 kept in "
            ".rlhf/checkpoints/ppo, a rerun with the same params resumes from it"
        ), line
        assert json.loads((folder / "latest.json").read_text())["step"] == 2
        assert sorted(p.name for p in folder.iterdir()) == ["latest.json", "policy_checkpoints", "step-2"]
        assert not any((folder / "policy_checkpoints").iterdir()), "the snapshot of iteration 3 is made again"
        assert path_digest(folder / "step-2") == kept["digest"], "the last good checkpoint is intact"
        assert [e["step"] for e in read_events("ppo", workspace, "progress")] == [1, 2, 3, 4]
        assert output_digests(workspace) == before
        assert leftovers(workspace) == []

        Path(kept["filler"]).unlink()
        run_stage("ppo")
        assert [e["step"] for e in read_events("ppo", workspace, "resumed")] == [2]
        assert [e["step"] for e in read_events("ppo", workspace, "progress")] == [3, 4, 5, 6]
        assert json.loads((workspace / "metrics/ppo.json").read_text())["resumed_from_iteration"] == 2
        assert sorted(p.name for p in (workspace / "models/policy_checkpoints").iterdir()) == ["step-3", "step-6"]
        assert not folder.exists(), "checkpoints are cleared once the outputs are in place"


# ---------------------------------------------------------------------------------------------------------- DVC


def dvc(repo: Path, *arguments: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "dvc", *arguments], cwd=repo, env=git_env(), capture_output=True, text=True, timeout=600
    )


def in_cache(repo: Path, file: Path) -> bool:
    """Whether DVC's cache holds ``file``'s content (DVC 3 layout: files/md5/ab/cdef…)."""
    md5 = hashlib.md5(file.read_bytes()).hexdigest()
    return (repo / ".dvc/cache/files/md5" / md5[:2] / md5[2:]).is_file()


@pytest.mark.slow
def test_dvc_on_a_full_disk(pipeline_workspace: Path, tmp_path: Path) -> None:
    """`dvc repro --single-item STAGE` (what the flows run) in a git + DVC repository on a 32 MiB tmpfs."""
    with tmpfs(tmp_path / "disk", 32) as disk:
        repo = make_tiny_repo_with_stages_done(
            disk / "repo", pipeline_workspace, ["prepare", "sft", "sample_pairs", "label"]
        )
        lock = (repo / "dvc.lock").read_bytes()

        # 1. the program fits, DVC's copy into its cache does not: DVC logs it, records the hashes, exits 0
        set_params(repo, label={"flip_prob": 0.1})  # new labels, as many bytes
        train = repo / "data/preferences/train.jsonl"
        filler = fill(disk, leave=tree_size(train) // 2)  # the outputs DVC deletes first make room for the new ones
        cached = dvc(repo, "repro", "--single-item", "label")
        output = cached.stdout + cached.stderr
        assert cached.returncode == 0, output  # DVC 3.67: a failed transfer into the cache is only logged
        assert "ERROR: failed to transfer" in output and "No space left on device" in output, output
        assert (repo / "dvc.lock").read_bytes() != lock, "dvc.lock records the new outputs"
        assert not in_cache(repo, train), "… whose content the cache lacks"
        assert dvc_no_space(output), "the flow's task turns that exit 0 into a failure (exit 4)"
        dvc_temp = sorted(p.name for p in (repo / ".dvc/cache").rglob("*.tmp"))
        print(f"DVC's temp files left in its cache after the failed transfer: {dvc_temp}")
        filler.unlink()
        rerun = dvc(repo, "repro", "--single-item", "label")
        assert rerun.returncode == 0 and "Running stage 'label'" in rerun.stdout, rerun.stdout + rerun.stderr
        assert in_cache(repo, train) and dvc(repo, "status", "label").stdout.strip().endswith("up to date.")
        print(f"… and after the rerun: {sorted(p.name for p in (repo / '.dvc/cache').rglob('*.tmp'))}")
        yaml.safe_load((repo / "dvc.lock").read_text())  # still a valid lock file
        lock = (repo / "dvc.lock").read_bytes()

        # 2. the disk full before DVC starts: DVC fails writing its read/write lock (in place) before running anything,
        # and leaves .dvc/tmp/rwlock cut off at a page, so every later DVC command fails until that file is removed
        set_params(repo, sample_pairs={"samples_per_prompt": 12})  # 4 × the rows: more than DVC frees before the run
        before = output_digests(repo)
        filler = fill(disk)
        full = dvc(repo, "repro", "--single-item", "sample_pairs")
        assert full.returncode == 255, full.stdout + full.stderr
        assert "ERROR: failed to reproduce 'sample_pairs': [Errno 28] No space left on device" in full.stderr
        assert "Running stage" not in full.stdout and output_digests(repo) == before
        assert (repo / "dvc.lock").read_bytes() == lock
        filler.unlink()
        status = dvc(repo, "status")
        assert status.returncode != 0 and "Unable to read RWLock-file '.dvc/tmp/rwlock'" in status.stderr, status.stderr
        healed = heal_dvc_rwlock(repo)  # what the flow's task does before each stage
        assert healed == "removed DVC's damaged lock record .dvc/tmp/rwlock (cut off, e.g. by a full disk)"
        assert dvc(repo, "status", "label").returncode == 0
        assert heal_dvc_rwlock(repo) is None, "DVC's own, valid rwlock is left alone"

        # 3. the stage program fills the disk: its one line and exit code reach DVC's output; dvc.lock stays as it was
        kept = {k: v for k, v in before.items() if not k.startswith(("data/pairs/", "metrics/sample_pairs"))}
        filler = fill(disk, leave=3 * 4096)  # room for DVC's lock files, not for the new rows
        failed = dvc(repo, "repro", "--single-item", "sample_pairs")
        output = failed.stdout + failed.stderr
        assert failed.returncode == 255, output
        line = one_error_line(failed.stderr)
        assert line.startswith("error: sample_pairs: no space left on device writing data/pairs/samples.jsonl "), line
        assert "no partial data/pairs/samples.jsonl left" in line, line  # DVC removed the stage's outputs first
        assert "ERROR: failed to reproduce 'sample_pairs': failed to run: " in output and "exited with 4" in output
        assert (repo / "dvc.lock").read_bytes() == lock
        assert {k: v for k, v in output_digests(repo).items() if k in kept} == kept
        assert leftovers(repo) == []
        filler.unlink()
        assert dvc(repo, "repro", "--single-item", "sample_pairs").returncode == 0
        assert dvc(repo, "status", "sample_pairs").stdout.strip().endswith("up to date.")
        assert_needed(line, tree_size(repo / "data/pairs/samples.jsonl"))  # the estimate, against what was written
