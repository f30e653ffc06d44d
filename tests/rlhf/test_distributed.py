"""Multi-process PPO: the same iterations on 2 processes and on 1 process give the same policy.

The test launches this file as a worker with ``accelerate launch`` and the shipped profiles (configs/cpu-2proc.yaml
and configs/cpu-1proc.yaml), as the `ppo` stage launches tasks.ppo, on the CPU over gloo, so it runs in CI.

Why the two runs can agree: ``sampling_seeds: per_episode`` makes every sampled token a function of the episode's
index in the global batch (one uniform per episode and token, inverse-CDF sampling), the global batch of prompts
and the minibatch cuts come from streams shared by all ranks, and each micro-batch loss is weighted so the gradient
is the mean over the global minibatch's tokens. Only float rounding differs (matmul shapes, all-reduce order),
which Adam's first steps amplify towards lr·Δg/ε: hence a tolerance rather than bitwise equality.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
TOLERANCE = 1e-5  # max |Δθ| allowed between the runs (measured 4e-7); the update itself moves parameters by ~2e-2
# 2 iterations × 2 epochs × 2 minibatches, 2 micro-batches each: exercises shuffles, accumulation, whitening of rewards
# and advantages, the adaptive KL controller (iteration 2 uses β updated from iteration 1's global KL) and LR annealing.
CONFIG = dict(
    iterations=2,
    rollout_batch_size=16,
    num_minibatches=2,
    gradient_accumulation_steps=2,
    ppo_epochs=2,
    response_length=8,
    learning_rate=3e-3,
    kl_horizon=200,
    whiten_rewards=True,
    sampling_seeds="per_episode",
)
SEED = 3


# ---------------------------------------------------------------------------------------------------------- worker


def record_gradient_syncs(module: torch.nn.Module, accelerator) -> list[int]:
    """Micro-batch counters (accelerator.step) at which DDP all-reduced a gradient bucket."""
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    steps: list[int] = []

    def counting_allreduce(state, bucket):
        steps.append(accelerator.step)
        return allreduce_hook(state, bucket)

    module.register_comm_hook(None, counting_allreduce)
    return steps


def worker(workdir: Path, profile: str, num_processes: int, out: Path, runs: dict[str, dict]) -> None:
    """Run train_ppo as the stage does, once per entry of ``runs`` (name → PPOConfig fields over CONFIG), one after
    the other in this launched process; every rank saves each run's trained weights, world size and gradient syncs
    under ``out/name``. A run does not depend on the runs before it: train_ppo seeds its RNG streams itself and the
    models are loaded afresh."""
    for name, overrides in runs.items():
        accelerator = train_and_save(workdir, profile, num_processes, out / name, overrides)
    accelerator.end_training()


def train_and_save(workdir: Path, profile: str, num_processes: int, out: Path, overrides: dict):
    from rlhf.config import PPOConfig
    from rlhf.ppo_trainer.loop import train_ppo
    from rlhf.ppo_trainer.models import load_ppo_models
    from rlhf.ppo_trainer.optimise import prepare_training
    from rlhf.ppo_trainer.processes import make_accelerator

    config = PPOConfig(**{**CONFIG, **overrides}, config_file=str(REPO / profile), num_processes=num_processes)
    accelerator = make_accelerator(config)  # refuses a world size other than num_processes
    models = load_ppo_models(config, workdir / "sft", workdir / "reward")
    prepared = prepare_training(models, config, accelerator)
    syncs = record_gradient_syncs(prepared.module, accelerator) if accelerator.num_processes > 1 else []
    prompts = json.loads((workdir / "prompts.json").read_text())
    history = train_ppo(models, prompts, config, SEED, accelerator, prepared=prepared)
    trained = accelerator.unwrap_model(prepared.module)
    torch.save(
        {
            "world_size": accelerator.num_processes,
            "distributed_type": accelerator.distributed_type.value,
            "parameters": {name: p.detach().cpu() for name, p in trained.named_parameters()},
            "history": history,
            "gradient_syncs": syncs,
            "mixed_precision": accelerator.mixed_precision,
            "bf16_weights": prepared.bf16_weights is not None,
            "optimizer_state_dtypes": sorted(
                {str(v.dtype) for state in prepared.optimizer.state.values() for v in state.values() if v.dim()}
            ),
        },
        out / f"rank{accelerator.process_index}.pt",
    )
    return accelerator


# ----------------------------------------------------------------------------------------------------------- tests


def build_workdir(folder: Path) -> Path:
    """A tiny SFT policy, a reward model/critic from it, and prompts from the embedded grammar."""
    from rlhf import embedded
    from rlhf.config import TinyModelConfig
    from rlhf.modeling import build_tiny_gpt2, load_scalar_model

    rng = random.Random(0)
    tokenizer = embedded.train_tokenizer([embedded.sample_review(rng) for _ in range(200)])
    policy = build_tiny_gpt2(TinyModelConfig(n_layer=2, n_head=2, n_embd=32, n_positions=64), tokenizer, seed=0)
    # Make EOS likely (the untrained model almost never ends): responses then differ in length, so the token
    # weighting of the loss across processes matters. Shifting ln_f's bias along EOS's (tied) embedding raises
    # its logit.
    eos_direction = policy.transformer.wte.weight[tokenizer.eos_token_id].detach()
    with torch.no_grad():
        policy.transformer.ln_f.bias += 40.0 * eos_direction / eos_direction.norm()
    policy.save_pretrained(folder / "sft")
    tokenizer.save_pretrained(folder / "sft")
    torch.manual_seed(0)
    load_scalar_model(folder / "sft", tokenizer.pad_token_id).save_pretrained(folder / "reward")
    prompts = [embedded.split_prompt(embedded.sample_review(rng), rng)[0] for _ in range(40)]
    (folder / "prompts.json").write_text(json.dumps(prompts))
    return folder


def launch(workdir: Path, profile: str, num_processes: int, out: Path, runs: dict[str, dict]) -> dict[str, list[dict]]:
    """`accelerate launch` this file's worker (``runs``: name → PPOConfig fields over CONFIG, trained one after the
    other in the launched processes); returns each run's result of each rank."""
    for name in runs:
        (out / name).mkdir(parents=True)
    env = {k: v for k, v in os.environ.items() if k != "ACCELERATE_USE_CPU"}  # the profile alone must select the CPU
    command = [
        str(Path(sys.executable).parent / "accelerate"),
        "launch",
        "--config_file",
        str(REPO / profile),
        "--num_processes",
        str(num_processes),
        "--mixed_precision",
        "no",
        __file__,
        str(workdir),
        profile,
        str(num_processes),
        str(out),
        json.dumps(runs),
    ]
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return {
        name: [torch.load(path, weights_only=False) for path in sorted((out / name).glob("rank*.pt"))] for name in runs
    }


def max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[name] - b[name]).abs().max()) for name in a)


GRPO = {
    "algorithm": "grpo",
    "group_size": 4,
    "loss_aggregation": "seq-mean-token-mean",
    "kl_penalty": "loss",
    "whiten_rewards": False,
}
SINGLE_STEP = {"gradient_accumulation_steps": 1}  # bf16 weights: one micro-batch per optimiser step


class Launched:
    """The data-parallel tests' runs, from one workdir: ``launched(processes)`` is {run: each rank's result} of PPO and
    GRPO on 2 (configs/cpu-2proc.yaml) or 1 process (configs/cpu-1proc.yaml), the latter with the bf16 test's fp32
    reference too. Each profile is launched once per module, its worker training the runs one after the other,
    rather than once per run: every launch costs several seconds of process start-up and imports."""

    RUNS = {2: {"ppo": {}, "grpo": GRPO}, 1: {"ppo": {}, "grpo": GRPO, "fp32_single_step": SINGLE_STEP}}
    PROFILES = {2: "configs/cpu-2proc.yaml", 1: "configs/cpu-1proc.yaml"}

    def __init__(self, folder: Path) -> None:
        self.folder, self.workdir = folder, build_workdir(folder / "models")
        self.results: dict[int, dict[str, list[dict]]] = {}

    def __call__(self, processes: int) -> dict[str, list[dict]]:
        if processes not in self.results:
            out = self.folder / f"{processes}proc"
            self.results[processes] = launch(
                self.workdir, self.PROFILES[processes], processes, out, self.RUNS[processes]
            )
        return self.results[processes]


@pytest.fixture(scope="module")
def launched(tmp_path_factory: pytest.TempPathFactory) -> Launched:
    return Launched(tmp_path_factory.mktemp("launched"))


def test_two_processes_train_the_same_policy_as_one(launched: Launched) -> None:
    workdir, two, one = launched.workdir, launched(2)["ppo"], launched(1)["ppo"]

    # the 2-process run really ran in a world of 2 (gloo on the CPU), with one result per rank
    assert [r["world_size"] for r in two] == [2, 2] and all(r["distributed_type"] == "MULTI_CPU" for r in two)
    assert [r["world_size"] for r in one] == [1]
    # DDP kept the replicas identical
    assert max_difference(two[0]["parameters"], two[1]["parameters"]) == 0.0
    # gradients were all-reduced only on the last micro-batch of each optimiser step (accumulation: 2 micro-batches)
    accumulation = CONFIG["gradient_accumulation_steps"]
    optimiser_steps = CONFIG["iterations"] * CONFIG["ppo_epochs"] * CONFIG["num_minibatches"]
    assert sorted(set(two[0]["gradient_syncs"])) == [accumulation * (k + 1) for k in range(optimiser_steps)]

    # the same policy and value model within the tolerance, after an update much larger than it
    initial = build_initial_parameters(workdir)
    update = max_difference(one[0]["parameters"], initial)
    difference = max_difference(one[0]["parameters"], two[0]["parameters"])
    print(f"max |θ(1 proc) − θ(2 procs)| = {difference:.2e}; max |update| = {update:.2e}; tolerance {TOLERANCE:.0e}")
    assert update > 50 * TOLERANCE
    assert difference <= TOLERANCE

    # the same global episodes and statistics: scores, KL, EOS counts, β after the controller's update
    for name in ("objective/scores", "objective/kl", "objective/kl_coef", "val/num_eos_tokens", "val/response_length"):
        for a, b in zip(one[0]["history"], two[0]["history"]):
            assert abs(a[name] - b[name]) <= 1e-4 * max(1.0, abs(a[name])), (name, a[name], b[name])
    assert 0 < one[0]["history"][0]["val/num_eos_tokens"] < CONFIG["rollout_batch_size"]  # lengths really differ


def test_two_processes_train_the_same_critic_free_grpo_policy_as_one(launched: Launched) -> None:
    """GRPO on the same engine: each prompt's group of 4 is split over the two ranks (episodes r, r+2, …), so the
    group baselines only match if they are computed on the gathered batch; sequence-mean aggregation and the KL loss
    term exercise the per-sequence micro-batch weights. No value model exists in either run."""
    workdir, two, one = launched.workdir, launched(2)["grpo"], launched(1)["grpo"]
    assert [r["world_size"] for r in two] == [2, 2]
    assert all(name.startswith("policy.") for name in one[0]["parameters"])  # no critic, no value head
    policy_before = {k: v for k, v in build_initial_parameters(workdir).items() if k.startswith("policy.")}
    update = max_difference(one[0]["parameters"], policy_before)
    difference = max_difference(one[0]["parameters"], two[0]["parameters"])
    print(f"GRPO: max |θ(1 proc) − θ(2 procs)| = {difference:.2e}; max |update| = {update:.2e}")
    assert update > 50 * TOLERANCE
    assert difference <= TOLERANCE
    for name in ("objective/scores", "objective/kl", "ppo/loss/kl", "rollout/group_distinct"):
        for a, b in zip(one[0]["history"], two[0]["history"]):
            assert abs(a[name] - b[name]) <= 1e-4 * max(1.0, abs(a[name])), (name, a[name], b[name])


def test_a_launched_bf16_stage_on_one_process_trains_bf16_weights_close_to_fp32(
    tmp_path: Path, launched: Launched
) -> None:
    """`launch.mixed_precision: bf16` through `accelerate launch` as the stage runs it (the launch flag says "no"; the
    precision comes from params): the bf16-weights path applies, weights and AdamW state stay fp32, and the update
    points where the fp32 run's does."""
    workdir, fp32 = launched.workdir, launched(1)["fp32_single_step"][0]
    bf16_run = {**SINGLE_STEP, "mixed_precision": "bf16"}
    bf16 = launch(workdir, "configs/cpu-1proc.yaml", 1, tmp_path / "bf16", {"bf16": bf16_run})["bf16"][0]
    assert (fp32["mixed_precision"], fp32["bf16_weights"]) == ("no", False)
    assert (bf16["mixed_precision"], bf16["bf16_weights"]) == ("bf16", True)
    assert all(p.dtype == torch.float32 for p in bf16["parameters"].values()) and bf16["optimizer_state_dtypes"] == [
        "torch.float32"
    ]
    initial = build_initial_parameters(workdir)
    update = lambda run: torch.cat([(run["parameters"][name] - initial[name]).flatten() for name in initial])  # noqa: E731
    cosine = float(torch.nn.functional.cosine_similarity(update(bf16), update(fp32), dim=0))
    print(f"cosine(bf16 update, fp32 update) = {cosine:.4f} over 2 iterations")
    assert update(fp32).norm() > 1e-2 and cosine > 0.95
    for a, b in zip(fp32["history"], bf16["history"]):
        assert abs(a["objective/scores"] - b["objective/scores"]) <= 0.05 * max(1.0, abs(a["objective/scores"]))


def build_initial_parameters(workdir: Path) -> dict[str, torch.Tensor]:
    """The trainable module's parameters before training, named as in the workers' results."""
    from rlhf.config import PPOConfig
    from rlhf.ppo_trainer.models import load_ppo_models, trainable_module

    models = load_ppo_models(PPOConfig(), workdir / "sft", workdir / "reward")
    return {name: p.detach() for name, p in trainable_module(models).named_parameters()}


# ----------------------------------------------------------------------------------------- pieces, fast, in-process


def test_inverse_cdf_sampling_picks_the_first_token_whose_cumulative_probability_exceeds_u() -> None:
    from rlhf.sampling import inverse_cdf_sample

    # probabilities 0.2, 0.5, 0.3, 0 → cumulative 0.2, 0.7, 1.0, 1.0
    logits = torch.tensor([0.2, 0.5, 0.3, 0.0]).log().expand(5, 4)
    uniforms = torch.tensor([0.1, 0.2, 0.69, 0.71, 0.999])
    assert inverse_cdf_sample(logits, uniforms, temperature=1.0).tolist() == [0, 1, 1, 2, 2]  # token 3 (p = 0) never
    # temperature 2 flattens: p ∝ √(0.2, 0.5, 0.3) → 0.263, 0.415, 0.322, cumulative 0.263, 0.678, 1.0
    assert inverse_cdf_sample(logits[:2], torch.tensor([0.25, 0.27]), temperature=2.0).tolist() == [0, 1]


def test_token_weight_makes_the_gradient_a_mean_over_the_global_minibatch_tokens() -> None:
    from rlhf.distributed import token_weight

    # 2 processes × 2 micro-batches holding 3, 9, 6, 6 of 24 tokens: each micro-batch mean m_i enters as
    # m_i · weight_i / (N·G) = (sum_i / n_i) · (4 · n_i / 24) / 4 = sum_i / 24
    assert [token_weight(n, 24, 2, 2) for n in (3, 9, 6, 6)] == [0.5, 1.5, 1.0, 1.0]
    assert token_weight(17, 17, 1, 1) == 1.0  # one process, no accumulation: the loss is unchanged


def test_gathered_episodes_return_to_global_order() -> None:
    from rlhf.distributed import shard_for_rank
    from rlhf.ppo_trainer.processes import global_episode_order

    episodes = list(range(6))
    gathered = shard_for_rank(episodes, 0, 2) + shard_for_rank(episodes, 1, 2)  # [0, 2, 4, 1, 3, 5]
    order = global_episode_order(local_batch_size=3, world_size=2)
    assert order.tolist() == [0, 3, 1, 4, 2, 5]
    assert [gathered[i] for i in order] == episodes


def test_a_launch_with_fewer_processes_than_ppo_num_processes_is_refused(tmp_path: Path) -> None:
    from rlhf.config import ConfigError, PPOConfig
    from rlhf.ppo_trainer.processes import make_accelerator

    with pytest.raises(ConfigError, match="ppo runs with num_processes 2 .* but this process runs in a world of 1"):
        make_accelerator(PPOConfig(num_processes=2, config_file=str(REPO / "configs/cpu-2proc.yaml")))


@pytest.mark.parametrize("has_bf16_gemm", [False, True])
def test_bf16_on_a_cpu_without_bf16_kernels_is_warned_about(has_bf16_gemm: bool, monkeypatch, capsys) -> None:
    from accelerate.state import AcceleratorState

    from rlhf import lean_gpt2
    from rlhf.config import Launch
    from rlhf.distributed import make_accelerator

    monkeypatch.setattr(lean_gpt2, "cpu_has_bf16_gemm", lambda: has_bf16_gemm)
    AcceleratorState._reset_state(reset_partial_state=True)
    try:
        precision = make_accelerator(Launch(str(REPO / "configs/cpu-1proc.yaml"), 1, "bf16"), "ppo").mixed_precision
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
    assert precision == "bf16"  # the parameter takes effect either way
    warning = capsys.readouterr().err
    if has_bf16_gemm:
        assert "warning" not in warning
    else:
        assert warning.startswith("warning: ppo: launch.mixed_precision bf16 on a CPU without bf16 GEMM kernels")
        assert "set launch.mixed_precision: no" in warning and warning.count("\n") == 1


# ------------------------------------------------------------------------------------ memory options, in-process


@pytest.fixture(scope="module")
def tiny_workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_workdir(tmp_path_factory.mktemp("models"))


def train_one_iteration(workdir: Path, **options):
    """One PPO iteration with the given memory options; returns (models, prepared, accelerator)."""
    from accelerate import Accelerator

    from rlhf.config import PPOConfig
    from rlhf.ppo_trainer.loop import train_ppo
    from rlhf.ppo_trainer.models import load_ppo_models
    from rlhf.ppo_trainer.optimise import prepare_training

    config = PPOConfig(
        iterations=1,
        rollout_batch_size=8,
        num_minibatches=2,
        ppo_epochs=1,
        response_length=6,
        learning_rate=1e-2,
        **options,
    )
    accelerator = Accelerator(cpu=True)
    models = load_ppo_models(config, workdir / "sft", workdir / "reward")
    prepared = prepare_training(models, config, accelerator)
    train_ppo(models, json.loads((workdir / "prompts.json").read_text()), config, 0, accelerator, prepared=prepared)
    return models, prepared, accelerator


def sft_and_policy_logprobs(workdir: Path, models) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Log-probs of fixed responses under the SFT model, the LoRA policy's reference (adapter off) and the policy."""
    from rlhf.modeling import encode_prompts, load_policy
    from rlhf.ppo_trainer.experience import reference_logprobs
    from rlhf.rollout import response_logprobs

    query_ids, query_mask = encode_prompts(models.tokenizer, ["the plot was", "the music was very"])
    responses = torch.tensor([[5, 9, 12], [7, 7, 3]])
    args = (query_ids, query_mask, responses, torch.ones_like(responses, dtype=torch.bool))
    with torch.no_grad():
        sft = response_logprobs(load_policy(workdir / "sft"), *args, 1.0)
        reference = reference_logprobs(models, models.policy, *args, 1.0)
        policy = response_logprobs(models.policy, *args, 1.0)
    return sft, reference, policy


def test_lora_policy_is_its_own_reference_and_exports_a_plain_merged_model(tiny_workdir: Path) -> None:
    from rlhf.ppo_trainer.processes import export_policy

    models, prepared, accelerator = train_one_iteration(tiny_workdir, lora_rank=4, lora_alpha=8)
    assert models.reference is None  # no second copy of the policy
    sft, reference, policy = sft_and_policy_logprobs(tiny_workdir, models)
    assert torch.allclose(reference, sft, atol=1e-6)  # adapter off = the untouched SFT weights, even after training
    assert not torch.allclose(policy, sft, atol=1e-4)  # the adapter learned something
    trained = {n for n, p in prepared.module.named_parameters() if p.requires_grad}
    assert all("lora_" in n for n in trained if n.startswith("policy."))
    exported = export_policy(accelerator, prepared.module)
    assert type(exported).__name__ == "GPT2LMHeadModel" and not any(
        "lora_" in n for n, _ in exported.named_parameters()
    )


def test_value_head_on_the_policy_trunk_replaces_the_critic(tiny_workdir: Path) -> None:
    from rlhf.config import PPOConfig
    from rlhf.modeling import load_scalar_model
    from rlhf.ppo_trainer.models import load_ppo_models

    reward_head = load_scalar_model(tiny_workdir / "reward").score.weight.detach().clone()
    initial = load_ppo_models(PPOConfig(value_model="head"), tiny_workdir / "sft", tiny_workdir / "reward").value_head
    assert torch.equal(initial.weight, reward_head)  # value_init "reward": the RM's head on the policy's trunk
    models, prepared, _ = train_one_iteration(tiny_workdir, value_model="head")
    assert models.critic is None and models.value_head is not None
    trunk = sum(p.numel() for p in models.policy.parameters())
    assert sum(p.numel() for p in prepared.module.parameters()) == trunk + reward_head.numel()  # one trunk only
    assert not torch.equal(models.value_head.weight, reward_head)  # trained


def test_gradient_checkpointing_does_not_change_the_update(tiny_workdir: Path) -> None:
    plain = train_one_iteration(tiny_workdir)[0].policy.state_dict()
    checkpointed = train_one_iteration(tiny_workdir, gradient_checkpointing=True)[0].policy.state_dict()
    assert max(float((plain[k] - checkpointed[k]).abs().max()) for k in plain) <= 1e-6


if __name__ == "__main__":
    worker(Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), Path(sys.argv[4]), json.loads(sys.argv[5]))
