"""Crash-safe PPO: a SIGKILLed `ppo` stage resumes from its last resume checkpoint and ends bitwise equal to an
uninterrupted run (CPU, one thread per process; one process and, with configs/cpu-2proc.yaml, two; full weights, LoRA
adapters, a value head); NaN/inf stops the stage with the checkpoint kept and the previous outputs untouched; a Prefect
retry of the ppo task resumes instead of starting over.

Tolerance: none. The resumed run restores the trained weights, AdamW state, KL coefficient, metric history and every
RNG stream exactly, so the final policy, the policy snapshots and every non-timing number in plots/ppo.csv and
metrics/ppo.json are asserted equal, bit for bit.
"""

from __future__ import annotations

import asyncio
import csv
import json
import os
import random
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from support import (
    REPO,
    make_tiny_repo_with_stages_done,
    run_stage,
    set_params,
    stage_command,
    stage_pids,
    write_params,
)

import rlhf.ppo_trainer.experience
from rlhf.files import path_digest
from tasks.stage_io import events_file, read_events

ITERATIONS, RESUME_EVERY, SNAPSHOT_EVERY = 8, 2, 3  # resume checkpoints after 2, 4, 6; policy snapshots 3, 6, 8
TIMING = {"timing/rollout", "timing/optimise", "timing/iteration", "eps"}  # wall-clock columns of plots/ppo.csv
NOT_RESULTS = {"seconds", "episodes_per_second", "peak_rss_mib", "resumed_from_iteration"}  # metrics/ppo.json


def events(workspace: Path, event: str | None = None) -> list[dict]:
    """The ppo stage's events of its latest run in ``workspace`` (of one event, if given; tasks/stage_io.py)."""
    return read_events("ppo", workspace, event)


def set_ppo(workspace: Path, **values) -> None:
    params = yaml.safe_load((workspace / "params.yaml").read_text())
    params["ppo"].update(values)
    write_params(workspace, params)


def output_digests(workspace: Path) -> dict[str, str]:
    """Hashes of everything the ppo stage writes."""
    return {
        name: path_digest(workspace / name)
        for name in ("models/policy", "models/policy_checkpoints", "metrics/ppo.json", "plots/ppo.csv")
    }


def assert_same_weights(a: Path, b: Path) -> None:
    first, second = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert first.keys() == second.keys()
    different = [name for name in first if not torch.equal(first[name], second[name])]
    assert not different, f"{a} and {b} differ in {different[:5]}"


def history(workspace: Path) -> list[dict]:
    """plots/ppo.csv without the wall-clock columns."""
    with (workspace / "plots/ppo.csv").open() as handle:
        return [{k: v for k, v in row.items() if k not in TIMING} for row in csv.DictReader(handle)]


def results(workspace: Path) -> dict:
    return {k: v for k, v in json.loads((workspace / "metrics/ppo.json").read_text()).items() if k not in NOT_RESULTS}


# ------------------------------------------------------------------------------------------- SIGKILL and rerun


def stage_env() -> dict[str, str]:
    # one thread: bitwise-comparable runs (same reduction order), and gentle on a shared machine
    return {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",  # stderr keeps what a failure needs: the launcher's lines
    }


def launch() -> list[str]:
    """The stage's command as dvc.yaml runs it: tasks/launch.py, which starts `accelerate launch` with the shipped CPU
    profile and process count that params.yaml's `launch` gives ppo."""
    return stage_command("ppo")


def run_ppo(workspace: Path, processes: int = 1) -> str:
    """The stage as dvc.yaml runs it; returns its stdout. A run past the timeout fails with the last stage events
    it printed (which step and event it reached) and its stderr, so a hang says where it stopped."""
    try:
        done = subprocess.run(launch(), cwd=workspace, env=stage_env(), capture_output=True, text=True, timeout=300)
    except subprocess.TimeoutExpired as hung:
        stdout, stderr = (
            (stream or b"").decode(errors="replace") for stream in (hung.stdout, hung.stderr)
        )  # bytes even with text=True
        recorded = [json.dumps(record)[:300] for record in events(workspace)]
        pytest.fail(
            f"{processes}-process ppo stage still running after 300 s; last events:\n"
            + "\n".join(recorded[-6:])
            + f"\nstdout:\n{stdout[-1500:]}"
            + "\nstderr:\n"
            + stderr[-3000:]
        )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return done.stdout


def run_ppo_and_kill(workspace: Path, after_iteration: int, delay: float, processes: int = 1) -> tuple[int, str]:
    """Start the stage, SIGKILL all its processes ``delay`` s after the progress event of ``after_iteration``; returns
    (launcher's exit status, stdout so far). The workers are found by their working folder: torchrun (2 processes)
    starts them in sessions of their own, where a kill of the launcher's process group does not reach them."""
    events_file("ppo", workspace).unlink(missing_ok=True)
    process = subprocess.Popen(
        launch(),
        cwd=workspace,
        env=stage_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        start_new_session=True,
    )
    try:
        while process.poll() is None:
            if any(record["step"] == after_iteration for record in events(workspace, "progress")):
                time.sleep(delay)
                for pid in stage_pids(workspace.resolve(), "ppo"):
                    os.kill(pid, signal.SIGKILL)
                break
            time.sleep(0.005)
        stdout, _ = process.communicate(timeout=60)  # a process left holding the pipe fails here instead of hanging
        return process.returncode, stdout
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)


def test_ppo_killed_at_a_random_iteration_resumes_and_ends_bitwise_equal_to_an_uninterrupted_run(
    in_copy_of_workspace: Path,
) -> None:
    crashed = in_copy_of_workspace
    set_ppo(crashed, iterations=ITERATIONS, resume_every=RESUME_EVERY, snapshot_every=SNAPSHOT_EVERY)
    reference = crashed.parent / "reference"
    shutil.copytree(crashed, reference)
    run_ppo(reference)
    assert [e["step"] for e in events(reference, "checkpoint")] == [2, 4, 6]
    assert not (reference / ".rlhf/checkpoints/ppo").exists(), "resume checkpoints are cleared after the final outputs"

    # after the first resume checkpoint (iteration 2), at a reproducible random point: anywhere in iterations 4 … 7,
    # the saves after iterations 3 (snapshot), 4 (checkpoint) and 6 (both) included
    rng = random.Random(7)
    after_iteration = rng.randint(3, 6)
    delay = rng.uniform(0.0, 0.08)  # an iteration of the tiny model takes ≈ 0.1 s
    before = output_digests(crashed)  # the previous run's outputs (2 iterations)
    status, _ = run_ppo_and_kill(crashed, after_iteration, delay)
    assert status == -signal.SIGKILL
    assert output_digests(crashed) == before, "a killed run leaves the previous outputs as they were"
    saved = json.loads((crashed / ".rlhf/checkpoints/ppo/latest.json").read_text())["step"]
    assert saved in (2, 4, 6) and saved <= after_iteration + 1
    for out in ("models/policy", "models/policy_checkpoints"):  # as `dvc repro` does before it reruns the stage
        shutil.rmtree(crashed / out)

    run_ppo(crashed)
    assert [e["step"] for e in events(crashed, "resumed")] == [saved]
    assert [e["step"] for e in events(crashed, "progress")] == list(range(saved + 1, ITERATIONS + 1)), (
        "only the remaining iterations ran"
    )
    print(f"killed {delay:.3f} s after iteration {after_iteration}; resumed from iteration {saved}")

    assert_same_weights(reference / "models/policy", crashed / "models/policy")
    assert sorted(p.name for p in (crashed / "models/policy_checkpoints").iterdir()) == ["step-3", "step-6", "step-8"]
    for snapshot in ("step-3", "step-6", "step-8"):
        assert_same_weights(
            reference / "models/policy_checkpoints" / snapshot, crashed / "models/policy_checkpoints" / snapshot
        )
    assert [row["step"] for row in history(crashed)] == [str(i) for i in range(1, ITERATIONS + 1)]
    assert history(crashed) == history(reference)  # every iteration's KL, scores, β, losses …: equal as written
    assert results(crashed) == results(reference)
    assert json.loads((crashed / "metrics/ppo.json").read_text())["resumed_from_iteration"] == saved
    assert not (crashed / ".rlhf/checkpoints/ppo").exists()


def test_two_process_ppo_killed_mid_save_resumes_every_rank_and_ends_bitwise_equal(in_copy_of_workspace: Path) -> None:
    """configs/cpu-2proc.yaml: each rank restores its own RNG file; the main process the weights and optimiser."""
    crashed = in_copy_of_workspace
    set_ppo(
        crashed,
        iterations=6,
        resume_every=RESUME_EVERY,
        snapshot_every=SNAPSHOT_EVERY,
    )
    # a rank that stops making progress (this test hung twice beside a pipeline on 2 cores: docs/reliability.md) fails
    # the run within 2 min with where each rank was, in the stderr the failure shows (tasks/stall.py)
    set_params(
        crashed,
        launch={"stall_timeout_s": 120, "ppo": {"config_file": "configs/cpu-2proc.yaml", "num_processes": 2}},
    )
    reference = crashed.parent / "reference"
    shutil.copytree(crashed, reference)
    run_ppo(reference, processes=2)
    status, _ = run_ppo_and_kill(
        crashed, after_iteration=4, delay=0.0, processes=2
    )  # during (or just after) the save of iteration 4
    assert status != 0
    folder = crashed / ".rlhf/checkpoints/ppo"
    saved = json.loads((folder / "latest.json").read_text())["step"]
    assert saved in (2, 4) and {p.name for p in (folder / f"step-{saved}").iterdir()} == {
        "state.pt",
        "meta.json",
        "rng-rank0.pt",
        "rng-rank1.pt",
    }
    run_ppo(crashed, processes=2)
    assert [e["step"] for e in events(crashed, "resumed")] == [saved]
    assert [e["step"] for e in events(crashed, "progress")] == list(range(saved + 1, 7))
    assert_same_weights(reference / "models/policy", crashed / "models/policy")
    assert history(crashed) == history(reference) and results(crashed) == results(reference)


# ---------------------------------------------------------------------------------------------- non-finite guard


def nan_score_in_iteration(iteration: int):
    """collect_experience (called once per iteration) whose ``iteration``-th batch has one NaN reward-model score."""
    real, calls = rlhf.ppo_trainer.experience.collect_experience, []

    def collect(*args, **kwargs):
        experience = real(*args, **kwargs)
        calls.append(1)
        if len(calls) == iteration:
            experience.scores[0] = float("nan")
        return experience

    return collect


def test_a_nan_reward_stops_ppo_keeps_the_checkpoint_and_the_previous_outputs_then_a_rerun_resumes(
    in_copy_of_workspace: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    workspace = in_copy_of_workspace
    set_ppo(workspace, iterations=4, resume_every=2)
    before = output_digests(workspace)
    with (
        monkeypatch.context() as patch,
        pytest.raises(SystemExit) as stopped,
    ):  # not monkeypatch.undo(): that undoes the chdir
        patch.setattr(rlhf.ppo_trainer.experience, "collect_experience", nan_score_in_iteration(3))
        run_stage("ppo")
    assert stopped.value.code == 3  # rlhf.guards.EXIT_DIVERGED
    captured = capsys.readouterr()
    assert "ppo: non-finite scores (nan) at iteration 3, before the optimiser steps" in captured.err
    assert "models/reward" in captured.err and "last good resume checkpoint (iteration 2)" in captured.err
    assert [e["step"] for e in events(workspace, "progress")] == [1, 2], "the bad iteration is not logged"
    assert output_digests(workspace) == before
    assert json.loads((workspace / ".rlhf/checkpoints/ppo/latest.json").read_text())["step"] == 2

    run_stage("ppo")  # the cause gone, a rerun resumes from the kept checkpoint
    assert [e["step"] for e in events(workspace, "resumed")] == [2]
    assert json.loads((workspace / "metrics/ppo.json").read_text())["resumed_from_iteration"] == 2


def test_an_absurd_learning_rate_stops_ppo_after_the_update_and_writes_nothing(
    in_copy_of_workspace: Path, capsys: pytest.CaptureFixture
) -> None:
    workspace = in_copy_of_workspace
    set_ppo(workspace, learning_rate=1e38)
    before = output_digests(workspace)
    with pytest.raises(SystemExit) as stopped:
        run_stage("ppo")
    assert stopped.value.code == 3
    error = capsys.readouterr().err
    assert "ppo: non-finite" in error and "at iteration 1" in error and "ppo.learning_rate (now 1e+38)" in error
    assert "no resume checkpoint was saved" in error
    assert output_digests(workspace) == before


# ------------------------------------------------------------------------------------------------- Prefect retry


def test_the_retry_condition_retries_a_crash_but_not_a_deliberate_stop() -> None:
    from prefect.states import Failed

    from flows.lifecycle import STAGE_RETRIES, stage_task
    from flows.stages import StageFailed, retry_on_crash

    def retried(error: BaseException) -> bool:
        return retry_on_crash(None, None, Failed(data=error))

    assert retried(StageFailed("ppo", 255, "killed"))  # DVC's status after its command died
    assert not retried(StageFailed("ppo", 3, "diverged")) and not retried(StageFailed("ppo", 2, "bad input"))
    assert not retried(StageFailed("ppo", 4, "disk full")) and retried(StageFailed("ppo", 5, "stalled"))
    assert not retried(TimeoutError())  # a timed-out stage may still be running
    assert STAGE_RETRIES == {"ppo": 1}
    assert stage_task("ppo", STAGE_RETRIES, None).retries == 1 and stage_task("sft", STAGE_RETRIES, 60).retries == 0


class KillAfterFirstCheckpoint(threading.Thread):
    """Watches the workspace's PPO resume checkpoints; once one exists, SIGKILLs the stage's processes (once)."""

    def __init__(self, workspace: Path) -> None:
        super().__init__(daemon=True)
        self.workspace, self.killed, self.done = workspace, [], threading.Event()

    def run(self) -> None:
        latest = self.workspace / ".rlhf/checkpoints/ppo/latest.json"
        while not self.done.is_set() and not self.killed:
            for pid in stage_pids(self.workspace, "ppo") if latest.exists() else []:
                os.kill(pid, signal.SIGKILL)
                self.killed.append(pid)
            self.done.wait(0.02)


def flow_repo(pipeline_workspace: Path, folder: Path) -> Path:
    """A git + DVC repository whose stages before ppo are done and recorded (dvc.lock): the flow skips them."""
    params = yaml.safe_load((pipeline_workspace / "params.yaml").read_text())
    params["ppo"].update(iterations=ITERATIONS, resume_every=RESUME_EVERY)
    return make_tiny_repo_with_stages_done(
        folder, pipeline_workspace, ["prepare", "sft", "sample_pairs", "label", "reward"], params
    )


@pytest.mark.slow
def test_a_prefect_retry_of_a_killed_ppo_task_resumes_from_the_checkpoint(
    pipeline_workspace: Path, tmp_path: Path
) -> None:
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, LogFilter, LogFilterTaskRunId
    from prefect.testing.utilities import prefect_test_harness

    from flows.lifecycle import lifecycle

    repo = flow_repo(pipeline_workspace, tmp_path / "repo").resolve()
    killer = KillAfterFirstCheckpoint(repo)
    with prefect_test_harness(server_startup_timeout=120):
        killer.start()
        try:
            state = lifecycle(repo_dir=str(repo), return_state=True)
        finally:
            killer.done.set()
            killer.join(timeout=10)

        async def ppo_run_and_logs():
            async with get_client() as client:
                runs = await client.read_task_runs(
                    flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[state.state_details.flow_run_id]))
                )
                ppo_run = next(r for r in runs if r.name == "ppo")
                logs = await client.read_logs(log_filter=LogFilter(task_run_id=LogFilterTaskRunId(any_=[ppo_run.id])))
                return ppo_run, [log.message for log in logs]

        ppo_run, logs = asyncio.run(ppo_run_and_logs())
    assert killer.killed, "the first attempt was killed"
    assert state.is_completed(), state.message
    assert ppo_run.state.is_completed() and ppo_run.run_count == 2, "one failed attempt, one retry"
    resumed = events(repo, "resumed")  # the events of the latest attempt: the retry
    assert f"ppo: resumed from step {resumed[0]['step']}" in logs, "the stage's output streams into the task's log"
    assert resumed and resumed[0]["step"] >= RESUME_EVERY, "the retry resumed from a checkpoint, not from iteration 0"
    metrics = json.loads((repo / "metrics/ppo.json").read_text())
    assert metrics["resumed_from_iteration"] == resumed[0]["step"] and metrics["iterations"] == ITERATIONS
    assert [row["step"] for row in history(repo)] == [str(i) for i in range(1, ITERATIONS + 1)]
    assert state.result()["release"]["skipped"] is False  # the stages after ppo ran


# ------------------------------------------------------------------------- LoRA and value head, crashed in-process


class Crash(BaseException):
    """Stands in for the process dying (nothing in the loop may catch it)."""


@pytest.mark.parametrize(
    "options",
    [
        {"lora_rank": 4, "lora_alpha": 8},
        {"value_model": "head"},
        {"algorithm": "grpo", "group_size": 4, "kl_penalty": "loss", "filter_uniform_groups": True},
    ],
    ids=["lora", "value-head", "grpo"],
)
def test_lora_adapters_and_a_value_head_resume_bitwise(pipeline_workspace: Path, tmp_path: Path, options: dict) -> None:
    """The trained tensors saved are the LoRA adapters (+ critic), the policy + value head, or (critic-free GRPO) the
    policy alone; a resume continues exactly."""
    from accelerate import Accelerator

    from rlhf.checkpoint import ResumeCheckpoints
    from rlhf.config import PPOConfig
    from rlhf.ppo_trainer.loop import train_ppo
    from rlhf.ppo_trainer.models import load_ppo_models
    from rlhf.ppo_trainer.optimise import prepare_training

    config = PPOConfig(
        iterations=4,
        rollout_batch_size=8,
        num_minibatches=2,
        ppo_epochs=1,
        response_length=6,
        learning_rate=1e-2,
        **options,
    )
    prompts = [
        json.loads(line)["prompt"]
        for line in (pipeline_workspace / "data/prompts/train.jsonl").read_text().splitlines()
    ]

    def train(
        folder: Path, crash_after: int | None = None
    ) -> tuple[dict[str, torch.Tensor], list[dict], ResumeCheckpoints]:
        accelerator = Accelerator(cpu=True)
        torch.manual_seed(0)  # as the stage's set_seed: LoRA's initial adapters are random
        models = load_ppo_models(config, pipeline_workspace / "models/sft", pipeline_workspace / "models/reward")
        prepared = prepare_training(models, config, accelerator)
        resume = ResumeCheckpoints(folder, "fingerprint", every=2)

        def crash(step, accelerator, prepared):
            if step == crash_after:
                raise Crash()

        trained = train_ppo(
            models, prompts, config, 5, accelerator, prepared=prepared, on_iteration=crash, resume=resume
        )
        parameters = {
            n: p.detach().clone()
            for n, p in accelerator.unwrap_model(prepared.module).named_parameters()
            if p.requires_grad
        }
        return parameters, trained, resume

    expected, expected_history, _ = train(tmp_path / "uninterrupted")
    with pytest.raises(Crash):
        train(tmp_path / "crashed", crash_after=3)
    saved = torch.load(tmp_path / "crashed/step-2/state.pt", weights_only=True)
    if "lora_rank" in options:
        assert saved["policy"] and all(
            "lora_" in name for name in saved["policy"]
        )  # adapters only: the base is the SFT input
    elif options.get("algorithm") == "grpo":
        assert saved["value"] == {} and len(saved["policy"]) > 1  # critic-free: nothing but the policy
    else:
        assert list(saved["value"]) == ["value_head.weight"] and len(saved["policy"]) > 1
    parameters, history, resume = train(tmp_path / "crashed")
    assert resume.step == 2 and len(history) == 4
    assert parameters.keys() == expected.keys() and all(torch.equal(parameters[n], expected[n]) for n in expected)
    timing = lambda rows: [{k: v for k, v in row.items() if k not in TIMING} for row in rows]  # noqa: E731
    assert timing(history) == timing(expected_history)
