"""Crash-safe SFT and reward-model training: a killed stage resumes from its last checkpoint and ends with the same
weights as an uninterrupted run (bitwise: CPU, same thread count); a non-finite loss stops the stage, keeps the last
good checkpoint and leaves the previous outputs untouched."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from support import REPO, run_stage, set_params, stage_command, stage_pids, tiny_params, write_params

import rlhf.checkpoint
import rlhf.training
from rlhf.files import path_digest
from tasks.stage_io import events_file, read_events

SFT_STEPS, SFT_EVERY = 200, 20  # ≈ 12 ms a step with the tiny model: the kill lands well before the end
RESULT_KEYS_IGNORED = {"seconds", "resumed_from_step"}


def events(workspace: Path, stage: str) -> list[dict]:
    """The events the stage's latest run recorded, in order (tasks/stage_io.py)."""
    return read_events(stage, workspace)


def assert_same_weights(a: Path, b: Path) -> None:
    first, second = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert first.keys() == second.keys()
    different = [name for name in first if not torch.equal(first[name], second[name])]
    assert not different, f"tensors differ after resume: {different[:5]}"


def results(metrics: dict) -> dict:
    return {key: value for key, value in metrics.items() if key not in RESULT_KEYS_IGNORED}


# ----------------------------------------------------------------------------------------------- SFT, SIGKILLed


def sft_workspace(source: Path, folder: Path) -> Path:
    """A workspace holding only what the sft stage reads, with more steps and frequent checkpoints."""
    for name in ("data/sft", "models/base", "configs"):
        shutil.copytree(source / name, folder / name)
    params = tiny_params()
    params["sft"].update(steps=SFT_STEPS, resume_every=SFT_EVERY, eval_every=50)
    write_params(folder, params)
    return folder


def stage_env() -> dict[str, str]:
    # one thread: bitwise-comparable runs (same reduction order) and gentle on a shared machine
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def run_sft(workspace: Path) -> subprocess.CompletedProcess:
    result = subprocess.run(
        stage_command("sft"), cwd=workspace, env=stage_env(), capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def run_sft_and_kill_after_first_checkpoint(workspace: Path, delay: float) -> tuple[int, str]:
    """Start the stage, SIGKILL it ``delay`` s after its first checkpoint event; returns (exit status, stdout)."""
    events_file("sft", workspace).unlink(missing_ok=True)
    process = subprocess.Popen(
        stage_command("sft"),
        cwd=workspace,
        env=stage_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        while process.poll() is None:
            if any(record["event"] == "checkpoint" for record in events(workspace, "sft")):
                time.sleep(delay)
                for pid in stage_pids(workspace.resolve(), "sft"):  # the launcher and its worker
                    os.kill(pid, signal.SIGKILL)
                break
            time.sleep(0.005)
        return process.wait(timeout=60), process.stdout.read()
    finally:
        if process.poll() is None:
            process.kill()


def test_sft_killed_after_a_checkpoint_resumes_and_ends_bitwise_equal_to_an_uninterrupted_run(
    pipeline_workspace: Path, tmp_path: Path
) -> None:
    reference = sft_workspace(pipeline_workspace, tmp_path / "reference")
    run_sft(reference)
    assert [e["step"] for e in events(reference, "sft") if e["event"] == "checkpoint"] == list(
        range(SFT_EVERY, SFT_STEPS, SFT_EVERY)
    )
    assert not (reference / ".rlhf/checkpoints/sft").exists(), "checkpoints are cleared once the final model is written"

    crashed = sft_workspace(pipeline_workspace, tmp_path / "crashed")
    delay = random.Random(7).uniform(0.0, 0.3)  # a few steps past the first checkpoint, not on a checkpoint boundary
    status, _ = run_sft_and_kill_after_first_checkpoint(crashed, delay)
    assert status == -signal.SIGKILL and not (crashed / "models/sft").exists(), "killed mid-run, no final model"
    saved_step = json.loads((crashed / ".rlhf/checkpoints/sft/latest.json").read_text())["step"]
    assert SFT_EVERY <= saved_step < SFT_STEPS

    run_sft(crashed)
    rerun_events = events(crashed, "sft")
    assert [e["step"] for e in rerun_events if e["event"] == "resumed"] == [saved_step]
    progress_steps = [e["step"] for e in rerun_events if e["event"] == "progress"]
    assert progress_steps and min(progress_steps) > saved_step, "the rerun did only the remaining steps"
    assert_same_weights(reference / "models/sft", crashed / "models/sft")
    metrics, expected = (json.loads((w / "metrics/sft.json").read_text()) for w in (crashed, reference))
    assert metrics["resumed_from_step"] == saved_step and expected["resumed_from_step"] == 0
    assert results(metrics) == results(expected)  # losses equal exactly, the initial held-out loss included
    assert not (crashed / ".rlhf/checkpoints/sft").exists()


# ------------------------------------------------------------------------ reward model, crashed in-process


class Crash(BaseException):
    """Stands in for the process dying (nothing in the stage may catch it)."""


def test_reward_model_crashed_mid_epoch_resumes_and_ends_bitwise_equal(
    in_copy_of_workspace: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    workspace = in_copy_of_workspace
    set_params(workspace, reward={"epochs": 3, "resume_every": 5})
    run_stage("reward")
    reference = workspace / "reference"
    shutil.copytree(workspace / "models/reward", reference)
    expected = json.loads((workspace / "metrics/reward.json").read_text())
    steps_per_epoch = expected["steps"] // 3
    assert steps_per_epoch % 5, "the checkpoint falls mid-epoch (the shuffle order must be restored too)"
    assert not (workspace / ".rlhf/checkpoints/reward").exists()
    capsys.readouterr()

    real_save, saves = rlhf.checkpoint.save_checkpoint, []

    def dies_before_the_third_save(*args, **kwargs):
        if len(saves) == 2:
            raise Crash()
        saves.append(args[1])
        return real_save(*args, **kwargs)

    with monkeypatch.context() as patch, pytest.raises(Crash):  # not monkeypatch.undo(): that would undo the chdir too
        patch.setattr(rlhf.checkpoint, "save_checkpoint", dies_before_the_third_save)
        run_stage("reward")
    assert saves == [5, 10]
    capsys.readouterr()

    run_stage("reward")
    rerun_events = events(workspace, "reward")
    assert [e["step"] for e in rerun_events if e["event"] == "resumed"] == [10]
    assert all(e["step"] > 10 for e in rerun_events if e["event"] == "progress")
    assert_same_weights(reference, workspace / "models/reward")
    assert (reference / "reward_normalization.json").read_text() == (
        workspace / "models/reward/reward_normalization.json"
    ).read_text()
    metrics = json.loads((workspace / "metrics/reward.json").read_text())
    assert metrics["resumed_from_step"] == 10 and results(metrics) == results(expected)
    assert not (workspace / ".rlhf/checkpoints/reward").exists()


def test_a_checkpoint_made_with_other_params_is_discarded(
    in_copy_of_workspace: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    set_params(in_copy_of_workspace, reward={"resume_every": 3})
    real_save = rlhf.checkpoint.save_checkpoint

    def dies_after_the_first_save(*args, **kwargs):
        real_save(*args, **kwargs)
        raise Crash()

    with monkeypatch.context() as patch, pytest.raises(Crash):
        patch.setattr(rlhf.checkpoint, "save_checkpoint", dies_after_the_first_save)
        run_stage("reward")
    assert (in_copy_of_workspace / ".rlhf/checkpoints/reward/step-3").is_dir()
    set_params(in_copy_of_workspace, reward={"learning_rate": 0.002})
    capsys.readouterr()
    run_stage("reward")
    stage_events = events(in_copy_of_workspace, "reward")
    discarded = [e for e in stage_events if e["event"] == "checkpoint_discarded"]
    assert len(discarded) == 1 and "other params or inputs" in discarded[0]["reason"]
    assert not [e for e in stage_events if e["event"] == "resumed"]
    assert json.loads((in_copy_of_workspace / "metrics/reward.json").read_text())["resumed_from_step"] == 0


# ---------------------------------------------------------------------------------------------- non-finite guard


def nan_on_training_call(function, call: int):
    """Wrap ``function`` so its ``call``-th call with gradients on (a training step) returns NaN/inf."""
    calls = []

    def wrapped(*args, **kwargs):
        out = function(*args, **kwargs)
        if torch.is_grad_enabled():
            calls.append(1)
            if len(calls) == call:
                return out * float("nan") if isinstance(out, torch.Tensor) else tuple(o + float("inf") for o in out)
        return out

    return wrapped


def diverged_stage_stderr(workspace: Path, stage: str, capsys: pytest.CaptureFixture) -> str:
    """Run ``stage``, which must stop with exit 3 (diverged) and leave its previous model and metrics as they were."""
    outputs = lambda: (path_digest(workspace / f"models/{stage}"), (workspace / f"metrics/{stage}.json").read_text())  # noqa: E731
    before = outputs()
    with pytest.raises(SystemExit) as stopped:
        run_stage(stage)
    assert stopped.value.code == 3
    assert outputs() == before
    return capsys.readouterr().err


def test_a_nan_sft_loss_stops_the_stage_keeps_the_checkpoint_and_the_previous_model(
    in_copy_of_workspace: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    workspace = in_copy_of_workspace
    set_params(workspace, sft={"resume_every": 5})
    monkeypatch.setattr(rlhf.training, "sft_loss", nan_on_training_call(rlhf.training.sft_loss, call=8))
    error = diverged_stage_stderr(workspace, "sft", capsys)
    assert "sft: non-finite loss (nan) at step 8" in error and "sft.learning_rate" in error
    assert "last good checkpoint (step 5)" in error
    assert json.loads((workspace / ".rlhf/checkpoints/sft/latest.json").read_text())["step"] == 5


def test_non_finite_reward_scores_stop_the_stage_and_leave_the_previous_reward_model(
    in_copy_of_workspace: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.setattr(rlhf.training, "pair_scores", nan_on_training_call(rlhf.training.pair_scores, call=2))
    error = diverged_stage_stderr(in_copy_of_workspace, "reward", capsys)
    assert "reward: non-finite chosen_scores (inf) at step 2" in error and "reward.learning_rate" in error
    assert "no checkpoint was saved" in error
