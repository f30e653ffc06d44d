"""Every model stage started as dvc.yaml starts it, `python -m tasks.launch -m tasks.<stage>` (accelerate launch with
params.yaml's `launch`): the same update on 1 and 2 processes (SFT, reward model), the same samples on 1 and 2
processes with per-episode seeds (sample_pairs, evaluate), gradient accumulation, bf16 and LoRA against fp32, two
machines on loopback, and the refusals.

Tolerance: the 1-vs-2-process and accumulation runs differ only in float summation order (all-reduce, batch shapes),
which Adam amplifies towards lr·Δg/ε where a gradient is zero in exact arithmetic (the reward model's final LayerNorm
bias: the chosen and rejected gradients cancel). So the runs must agree to 1 % of the update's norm (measured: SFT
2e-6 max |Δ| for a 1.9e-2 update; reward model 0.14 %).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from support import REPO, run_stage, set_params, stage_arguments, stage_command

pytestmark = pytest.mark.slow

TWO_PROCESSES = {"config_file": "configs/cpu-2proc.yaml", "num_processes": 2}
RELATIVE_TOLERANCE = 0.01  # ‖θ_a − θ_b‖ / ‖θ_a − θ_start‖ between equivalent runs (float summation order only)


def short_copy(pipeline_workspace: Path, folder: Path) -> Path:
    """A copy of the tiny pipeline's workspace with short SFT and reward trainings, no resume checkpoints."""
    shutil.copytree(pipeline_workspace, folder, ignore=shutil.ignore_patterns(".rlhf"))
    set_params(folder, sft={"steps": 10, "eval_every": 10, "resume_every": 0}, reward={"resume_every": 0})
    return folder


@pytest.fixture
def workspace(pipeline_workspace: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A copy of the tiny pipeline's workspace (cwd), with short SFT and reward trainings, no resume checkpoints."""
    copy = short_copy(pipeline_workspace, tmp_path / "workspace")
    monkeypatch.chdir(copy)
    return copy


@pytest.fixture(scope="module")
def one_process(pipeline_workspace: Path, tmp_path_factory: pytest.TempPathFactory):
    """``one_process(how, stage)``: a `workspace` copy in which the stage (sft or reward) ran on one process, ``how``
    "launched" (its dvc.yaml command, through tasks.launch) or "in_process" (run_stage). The reference the 1-vs-2-
    process and bf16 tests (launched), and the accumulation, LoRA and two-machine tests (in process) compare with:
    the same run each of them used to repeat first in its own workspace, now run once per module. Read only."""
    runs: dict[tuple[str, str], Path] = {}

    def run(how: str, stage: str) -> Path:
        if (how, stage) not in runs:
            folder = short_copy(pipeline_workspace, tmp_path_factory.mktemp(f"{how}-{stage}") / "workspace")
            if how == "launched":
                launch(stage, folder)
            else:
                previous = Path.cwd()
                os.chdir(folder)
                try:
                    run_stage(stage)
                finally:
                    os.chdir(previous)
            runs[how, stage] = folder
        return runs[how, stage]

    return run


def without_output(workspace: Path, stage: str) -> None:
    """Remove the stage's model folder copied from the pipeline: the run under test writes it afresh (as before, when
    it followed the 1-process run in the same workspace and that run's model was moved aside)."""
    shutil.rmtree(workspace / f"models/{stage}")


def launch(stage: str, workspace: Path, extra_env: dict | None = None) -> subprocess.CompletedProcess:
    """The stage's dvc.yaml command, run as DVC runs it (in the workspace, through tasks.launch)."""
    env = {**os.environ, **(extra_env or {})}
    result = subprocess.run(
        stage_command(stage, workspace), cwd=workspace, env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def relative_difference(
    a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], start: dict[str, torch.Tensor]
) -> float:
    """‖a − b‖ / ‖a − start‖ over the weights the runs share with their starting model."""
    assert a.keys() == b.keys()
    names = [name for name in a if name in start]
    difference = torch.cat([(a[name] - b[name]).flatten() for name in names]).norm()
    update = torch.cat([(a[name] - start[name]).flatten() for name in names]).norm()
    assert update > 0
    return float(difference / update)


def metrics(workspace: Path, stage: str) -> dict:
    return json.loads((workspace / f"metrics/{stage}.json").read_text())


# ----------------------------------------------------------------------------------------------- 1 vs 2 processes


@pytest.mark.parametrize(("stage", "model_in"), [("sft", "models/base"), ("reward", "models/sft")])
def test_two_processes_train_the_one_process_update(workspace: Path, one_process, stage: str, model_in: str) -> None:
    one = weights(one_process("launched", stage) / f"models/{stage}")
    without_output(workspace, stage)
    set_params(workspace, launch={stage: TWO_PROCESSES})
    result = launch(stage, workspace)
    assert "--num_processes 2" in result.stderr  # the launcher printed the accelerate command it ran
    assert metrics(workspace, stage)["world_size"] == 2
    two = weights(workspace / f"models/{stage}")
    assert relative_difference(one, two, weights(workspace / model_in)) < RELATIVE_TOLERANCE


def test_gradient_accumulation_makes_the_same_update(workspace: Path, one_process) -> None:
    # 32 demonstrations per step as one batch, or as 4 micro-batches of 8: the same mean-over-tokens gradient
    whole = weights(one_process("in_process", "sft") / "models/sft")
    without_output(workspace, "sft")
    set_params(workspace, sft={"gradient_accumulation_steps": 4})
    run_stage("sft")
    assert relative_difference(whole, weights(workspace / "models/sft"), weights(workspace / "models/base")) < 1e-3


@pytest.mark.parametrize("stage", ["sample_pairs", "evaluate"])
def test_per_episode_seeds_sample_the_same_on_one_and_two_processes(workspace: Path, stage: str) -> None:
    set_params(workspace, **{stage: {"sampling_seeds": "per_episode"}})
    outputs = {"sample_pairs": ["data/pairs/samples.jsonl"], "evaluate": ["metrics/samples.md"]}[stage]
    launch(stage, workspace)
    one = [(workspace / path).read_text() for path in outputs] + [metrics(workspace, stage)]
    set_params(workspace, launch={stage: TWO_PROCESSES})
    launch(stage, workspace)
    two = [(workspace / path).read_text() for path in outputs] + [metrics(workspace, stage)]
    assert one[:-1] == two[:-1]  # the same samples, in prompt order
    numbers = {key for key, value in one[-1].items() if isinstance(value, float)}
    assert numbers and all(one[-1][key] == pytest.approx(two[-1][key], abs=1e-6) for key in numbers)
    if stage == "sample_pairs":
        rows = [json.loads(line) for line in one[0].splitlines()]
        assert [row["prompt_id"] for row in rows] == list(range(len(rows)))
        assert one[-1]["world_size"] == 1 and two[-1]["world_size"] == 2


# ----------------------------------------------------------------------------------------------- bf16 and LoRA


def update(workspace: Path, stage: str, start: str) -> dict[str, torch.Tensor]:
    """Weights after − before of the stage's trained model."""
    after, before = weights(workspace / f"models/{stage}"), weights(workspace / start)
    return {name: after[name] - before[name] for name in after if name in before}


@pytest.mark.parametrize(("stage", "start"), [("sft", "models/base"), ("reward", "models/sft")])
def test_bf16_updates_the_model_as_fp32_does(workspace: Path, one_process, stage: str, start: str) -> None:
    # bf16 autocast, fp32 master weights: the update keeps fp32's direction (cosine > 0.99) and size (within 5 %)
    fp32 = update(one_process("launched", stage), stage, start)
    without_output(workspace, stage)
    set_params(workspace, launch={stage: {"mixed_precision": "bf16"}})
    result = launch(stage, workspace)
    assert "--mixed_precision bf16" in result.stderr
    bf16 = update(workspace, stage, start)
    assert all(tensor.dtype == torch.float32 for tensor in weights(workspace / f"models/{stage}").values())
    a = torch.cat([fp32[name].flatten() for name in fp32])
    b = torch.cat([bf16[name].flatten() for name in fp32])
    assert torch.nn.functional.cosine_similarity(a, b, dim=0) > 0.99
    assert abs(b.norm() / a.norm() - 1) < 0.05


@pytest.mark.parametrize(("stage", "start"), [("sft", "models/base"), ("reward", "models/sft")])
def test_lora_trains_low_rank_updates_saved_merged(workspace: Path, one_process, stage: str, start: str) -> None:
    rank = 2
    full = metrics(one_process("in_process", stage), stage)
    without_output(workspace, stage)
    set_params(workspace, **{stage: {"lora_rank": rank, "lora_alpha": 16, "learning_rate": 0.01}})
    run_stage(stage)
    lora = metrics(workspace, stage)
    saved = workspace / f"models/{stage}"
    assert not (saved / "adapter_config.json").exists()  # merged: a plain model every later stage loads
    delta = update(workspace, stage, start)
    matrices = {name: d for name, d in delta.items() if d.ndim == 2 and "wte" not in name and "wpe" not in name}
    changed = [name for name, d in matrices.items() if d.abs().max() > 0]
    assert changed  # the adapters were trained and merged in
    assert all(int(torch.linalg.matrix_rank(matrices[name])) <= rank for name in changed)
    assert delta["transformer.wte.weight"].abs().max() == 0  # embeddings are not LoRA targets: frozen
    if stage == "sft":  # a real fit, if smaller: the tiny model's full fine-tune gains most from its embeddings,
        # which LoRA leaves frozen (measured in 10 steps: 0.20 vs 0.96 nats off the held-out loss)
        drop = lambda m: m["eval_loss_initial"] - m["eval_loss"]  # noqa: E731
        assert 0.1 < drop(lora) < drop(full)
    else:
        assert lora["accuracy"] >= 0.5 and lora["steps"] == full["steps"]


def test_a_saved_lora_adapter_loads_as_its_merged_model(tmp_path: Path) -> None:
    from support import tiny_gpt2_config
    from transformers import GPT2LMHeadModel

    from rlhf.modeling import add_lora, load_policy

    torch.manual_seed(0)
    base = GPT2LMHeadModel(tiny_gpt2_config())
    base.save_pretrained(tmp_path / "base")
    adapted = add_lora(GPT2LMHeadModel.from_pretrained(tmp_path / "base"), 2, 16, "all-linear")
    for name, parameter in adapted.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(parameter, std=0.1)  # a trained-looking adapter (peft starts B at 0)
    adapted.save_pretrained(tmp_path / "adapter")
    assert (tmp_path / "adapter/adapter_config.json").exists()
    ids = torch.randint(3, 50, (2, 7))
    expected = adapted(ids).logits
    loaded = load_policy(tmp_path / "adapter")
    assert not hasattr(loaded, "peft_config")
    assert torch.allclose(loaded(ids).logits, expected, atol=1e-5)


# ----------------------------------------------------------------------------------------------- many machines


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_two_machines_on_loopback_train_the_one_process_update(workspace: Path, tmp_path: Path, one_process) -> None:
    # README "Many machines": machine 0 and machine 1 each run accelerate launch with --num_machines 2, one process
    # each; machine 1 works in its own checkout with the same inputs (its outputs are not kept)
    one = weights(one_process("in_process", "sft") / "models/sft")
    without_output(workspace, "sft")  # machine 1's checkout gets no models/sft: only machine 0 may write one
    set_params(workspace, launch={"sft": TWO_PROCESSES})
    other = tmp_path / "machine1"
    shutil.copytree(workspace, other)
    port = str(free_port())

    def machine(rank: int, folder: Path) -> subprocess.Popen:
        command = [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--config_file",
            "configs/cpu-2proc.yaml",
            "--num_processes",
            "2",
            "--num_machines",
            "2",
            "--machine_rank",
            str(rank),
            "--main_process_ip",
            "127.0.0.1",
            "--main_process_port",
            port,
            "--mixed_precision",
            "no",
            "-m",
            "tasks.sft",
            *stage_arguments("sft"),
        ]
        return subprocess.Popen(command, cwd=folder, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    machines = [machine(0, workspace), machine(1, other)]
    outputs = [m.communicate(timeout=600) for m in machines]
    assert [m.returncode for m in machines] == [0, 0], [err[-2000:] for _, err in outputs]
    assert metrics(workspace, "sft")["world_size"] == 2
    assert not (other / "models/sft").exists()  # only the main process (machine 0) writes the outputs
    start = weights(workspace / "models/base")
    assert relative_difference(one, weights(workspace / "models/sft"), start) < RELATIVE_TOLERANCE


# ----------------------------------------------------------------------------------------------- refusals


def test_a_stage_refuses_a_world_it_did_not_ask_for(workspace: Path, capsys: pytest.CaptureFixture) -> None:
    set_params(workspace, launch={"reward": {"num_processes": 2}})  # but run as one process
    with pytest.raises(SystemExit) as stopped:
        run_stage("reward")
    assert stopped.value.code == 2
    error = capsys.readouterr().err
    assert "reward runs with num_processes 2" in error and "world of 1" in error


def test_a_batch_that_does_not_split_over_the_processes_is_refused(
    workspace: Path, capsys: pytest.CaptureFixture
) -> None:
    set_params(workspace, sft={"batch_size": 30, "gradient_accumulation_steps": 4})
    with pytest.raises(SystemExit) as stopped:
        run_stage("sft")
    assert stopped.value.code == 2
    assert "sft.batch_size (30) must be divisible by the processes (1) × sft.gradient_accumulation_steps (4) = 4: " in (
        capsys.readouterr().err
    )


def test_the_launcher_refuses_a_missing_profile_before_starting_anything(workspace: Path) -> None:
    set_params(workspace, launch={"sft": {"config_file": "configs/nope.yaml"}})
    result = subprocess.run(stage_command("sft", workspace), cwd=workspace, capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[0].startswith("error: params.yaml: launch profile 'configs/nope.yaml'")
    assert "accelerate launch" not in result.stderr


def test_a_sharded_profile_that_would_run_unsharded_is_refused_with_one_line(workspace: Path) -> None:
    # on CPUs accelerate runs every profile as plain data parallel: an FSDP profile must not silently lose sharding
    import yaml

    profile = yaml.safe_load((workspace / "configs/fsdp.yaml").read_text())
    profile.update(use_cpu=True, num_processes=2, mixed_precision="no", main_process_port=0)
    (workspace / "configs/fsdp-cpu.yaml").write_text(yaml.safe_dump(profile))
    set_params(workspace, launch={"sft": {"config_file": "configs/fsdp-cpu.yaml", "num_processes": 2}})
    result = subprocess.run(stage_command("sft", workspace), cwd=workspace, capture_output=True, text=True)
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert errors == [
        "error: params.yaml: sft's launch profile 'configs/fsdp-cpu.yaml' asks for FSDP but this machine runs it as "
        "MULTI_CPU (CPU): FSDP shards over GPUs; use configs/cpu-2proc.yaml (data parallel) on CPUs"
    ]  # one line although both ranks refuse
    assert "Traceback" not in result.stderr


def test_every_model_stage_starts_through_the_launcher() -> None:
    import yaml

    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    launched = {name for name, stage in stages.items() if " -m tasks.launch -m " in " ".join(stage["cmd"].split())}
    assert launched == {"sft", "sample_pairs", "reward", "ppo", "evaluate"}
