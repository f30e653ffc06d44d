"""Typed configuration: one dataclass per stage, read from ``params.yaml``.

Each field has a one-line comment, and params.yaml lists every field with its default (tests/test_params.py).
:func:`rlhf.params.load_params` reads and checks params.yaml. Derived sizes are computed (and checked for exact
division) in one place: :meth:`PPOConfig.derived`.
Each stage's random stream is seeded with :meth:`Params.stage_seed` (frozen offsets, :data:`STAGE_SEED_OFFSETS`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any


class ConfigError(ValueError):
    """A problem in params.yaml; the message names the file and the key."""


@dataclass
class TinyModelConfig:
    """Shape of the embedded GPT-2-style model built from scratch (0.85 M parameters at the defaults)."""

    n_layer: int = 4  # transformer blocks
    n_head: int = 4  # attention heads per block
    n_embd: int = 128  # hidden size
    n_positions: int = 64  # longest prompt + response the model accepts


@dataclass
class PrepareConfig:
    """Stage `prepare`: corpus, prompts, tokenizer and base model."""

    base_model: str = "embedded"  # "embedded" (tiny GPT-2 built here) or a Hub id / local path, e.g. "gpt2"
    dataset: str = "embedded"  # "embedded" (generated review corpus) or a Hub id / local path of demonstrations
    dataset_split: str = "train"  # split read from `dataset`
    prompts_dataset: str = ""  # optional separate prompt source for PPO/evaluation ("" = prompts of `dataset`)
    eval_fraction: float = 0.05  # held-out share of a real dataset (embedded: sizes below)
    max_rows: int = 0  # cap on rows read from a real dataset (0 = all)
    n_demonstrations: int = 20000  # embedded: SFT demonstrations generated
    n_train_prompts: int = 2048  # embedded: prompts for pair sampling and PPO
    n_eval_prompts: int = 256  # embedded: held-out prompts for evaluation
    vocab_size: int = 512  # embedded: byte-level BPE vocabulary cap (every grammar word becomes one token)
    max_prompt_tokens: int = 24  # longer prompts are an error (named with file and row), not silently cut
    model: TinyModelConfig = field(default_factory=TinyModelConfig)  # embedded model shape


@dataclass
class SFTConfig:
    """Stage `sft`: supervised fine-tuning on demonstrations (loss on response tokens only)."""

    steps: int = 1000  # optimiser steps
    batch_size: int = 64  # demonstrations per step
    learning_rate: float = 3e-3  # peak AdamW learning rate
    warmup_steps: int = 100  # linear warm-up, then cosine decay to 10 %
    weight_decay: float = 0.0  # AdamW weight decay
    max_grad_norm: float = 1.0  # gradient-norm clipping
    eval_every: int = 500  # steps between held-out loss evaluations
    gradient_accumulation_steps: int = 1  # micro-batches per step on each process (batch_size / processes / this)
    gradient_checkpointing: bool = False  # recompute activations in backward: less memory, slower
    lora_rank: int = 0  # 0 = train all weights; > 0 = LoRA adapters (peft), merged into the saved model
    lora_alpha: int = 32  # LoRA scaling numerator (update scaled by alpha / rank)
    lora_target_modules: str = "all-linear"  # peft target_modules: "all-linear" or comma-separated module names
    resume_every: int = 200  # steps between resume checkpoints in .rlhf/checkpoints/sft (0 = none); not a DVC output


@dataclass
class SamplePairsConfig:
    """Stage `sample_pairs`: K responses per prompt sampled from the SFT policy."""

    n_prompts: int = 2048  # training prompts used (0 = all)
    samples_per_prompt: int = 4  # K; the labeller compares all K·(K−1)/2 pairs
    temperature: float = 1.0  # sampling temperature
    max_new_tokens: int = 24  # response length cap
    batch_size: int = 256  # prompts per generation batch (on each process)
    # "per_rank": global RNG seeded per process; "per_episode": same samples for any process count (rlhf/generation.py)
    sampling_seeds: str = "per_rank"


@dataclass
class LabelConfig:
    """Stage `label`: preference labels for the sampled pairs (or imported preference data)."""

    annotator: str = "simulated"  # simulated | dataset | human
    gold: str = "rlhf.embedded:gold_score"  # simulated: `module:callable` (prompt, response) -> float
    temperature: float = 1.0  # simulated: Bradley–Terry noise, P(a≻b) = σ((g_a − g_b)/temperature); 0 = noiseless
    flip_prob: float = 0.0  # simulated: extra uniform label-flip probability
    dataset: str = ""  # dataset: Hub id or local path of preference data (hh-rlhf, prompt/chosen/rejected, messages)
    dataset_split: str = "train"  # dataset: split to read
    labels_file: str = "data/human_labels/labels.jsonl"  # human: labels appended by the labelling flow
    eval_fraction: float = 0.1  # held-out share of the preference pairs (reward-model accuracy)
    max_rows: int = 0  # dataset: cap on imported rows (0 = all)


@dataclass
class RewardConfig:
    """Stage `reward`: Bradley–Terry reward model initialised from the SFT model."""

    epochs: int = 2  # passes over the preference pairs
    batch_size: int = 64  # pairs per step
    learning_rate: float = 1e-3  # peak AdamW learning rate (linear decay)
    warmup_steps: int = 50  # linear warm-up
    max_grad_norm: float = 1.0  # gradient-norm clipping
    max_length: int = 64  # prompt + response + EOS tokens; longer pairs are an error
    gradient_accumulation_steps: int = 1  # micro-batches per step on each process (batch_size / processes / this)
    gradient_checkpointing: bool = False  # recompute activations in backward: less memory, slower
    lora_rank: int = 0  # 0 = train all weights; > 0 = LoRA adapters (peft), merged into the saved model
    lora_alpha: int = 32  # LoRA scaling numerator (update scaled by alpha / rank)
    lora_target_modules: str = "all-linear"  # peft target_modules: "all-linear" or comma-separated module names
    resume_every: int = 100  # steps between resume checkpoints in .rlhf/checkpoints/reward (0 = none); not a DVC output


@dataclass
class PPOConfig:
    """Stage `ppo`: PPO with a per-token KL penalty to the frozen SFT reference (docs/design.md §4)."""

    iterations: int = 60  # rollout → optimise cycles (× 128 episodes = 7,680 episodes)
    rollout_batch_size: int = 128  # episodes per iteration, over all processes
    num_minibatches: int = 4  # minibatches per PPO epoch (global)
    gradient_accumulation_steps: int = 1  # micro-batches per minibatch on each process
    ppo_epochs: int = 4  # K epochs over each rollout batch, reshuffled every epoch
    learning_rate: float = 3e-4  # peak AdamW learning rate
    anneal_lr: bool = True  # linear decay to 0 over the iterations
    max_grad_norm: float = 1.0  # gradient-norm clipping
    response_length: int = 24  # tokens generated per episode
    temperature: float = 1.0  # sampling temperature; logprobs use logits / temperature
    clip_range: float = 0.2  # ε of the clipped surrogate
    clip_range_value: float = 0.2  # ε_v of the clipped value loss
    vf_coef: float = 0.1  # c1, value-loss coefficient
    ent_coef: float = 0.0  # c2, entropy-bonus coefficient
    gamma: float = 1.0  # GAE discount
    lam: float = 0.95  # GAE λ
    whiten_rewards: bool = False  # whiten per-token rewards before GAE
    kl_coef: float = 0.1  # β (initial value when adaptive)
    kl_estimator: str = "k1"  # k1 = logp − logp_ref (unbiased), k3 = (r − 1) − log r (low variance, ≥ 0)
    adaptive_kl: bool = True  # Ziegler et al. 2019 proportional controller
    kl_target: float = 4.0  # adaptive: target sequence KL in nats
    kl_horizon: int = 10000  # adaptive: horizon in episodes
    missing_eos_score: float = -3.0  # EOS trick: score given to responses that never emit EOS (normalised RM units)
    value_init: str = "reward"  # value head initialised from the reward model's head ("reward") or zero ("zero")
    # --- the algorithm and its options (docs/design.md §4b) ---
    algorithm: str = "ppo"  # ppo | grpo | rloo | reinforce_pp (critic-free: no value model) | dpo (offline, `dpo:`)
    group_size: int = 1  # K samples per prompt: rollout_batch_size / K prompts per iteration (grpo, rloo: ≥ 2)
    group_std_normalise: bool = True  # grpo: divide by the group's std; false (+ seq-mean-token-sum-norm) = Dr. GRPO
    kl_penalty: str = "reward"  # "reward": −β·KL_t in the reward (kl_estimator) | "loss": β·k3 in the policy loss
    reward: str = "model"  # "model": the reward model | `module:callable` (prompt, response) -> float, a rule
    clip_range_high: float | None = None  # ε_high of the surrogate's upper clip (DAPO clip-higher); null = clip_range
    dual_clip: float = 0.0  # c > 1: a negative advantage's loss is bounded by −c·A (Ye et al. 2020); 0 = off
    # token-mean | seq-mean-token-sum | seq-mean-token-mean | seq-mean-token-sum-norm (÷ response_length: Dr. GRPO)
    loss_aggregation: str = "token-mean"
    lam_critic: float | None = None  # GAE λ of the value targets (VAPO: 1.0); null = lam (the actor's λ)
    critic_warmup_iterations: int = 0  # first N iterations train the critic only, the policy frozen (VC-PPO)
    filter_uniform_groups: bool = False  # drop prompt groups whose K samples all score alike (DAPO); group_size ≥ 2
    # How this stage was launched: not keys of the ppo section but params.yaml's `launch`, resolved for ppo by
    # rlhf.params.load_params (LaunchConfig.for_stage("ppo")); kept here because the PPO engine reads them throughout.
    config_file: str = field(default="configs/cpu-1proc.yaml", metadata={"from": "launch"})
    num_processes: int = field(default=1, metadata={"from": "launch"})
    mixed_precision: str = field(default="no", metadata={"from": "launch"})
    # "per_rank": sampling seeded seed·1000 + rank; "per_episode": the same episodes for any process count
    sampling_seeds: str = "per_rank"
    value_model: str = "critic"  # "critic": separate critic (a second trunk); "head": value head on the policy trunk
    lora_rank: int = 0  # 0 = train all policy weights; > 0 = LoRA adapters (peft), reference = adapter disabled
    lora_alpha: int = 32  # LoRA scaling numerator (update scaled by alpha / rank)
    lora_target_modules: str = "all-linear"  # peft target_modules: "all-linear" or comma-separated module names
    gradient_checkpointing: bool = False  # recompute activations in backward (policy and critic): less memory, slower
    # "sampler": old log-probs recorded while sampling (lean GPT-2 path); "recompute": one more policy forward
    rollout_logprobs: str = "sampler"
    snapshot_every: int = 15  # policy snapshot every N iterations: models/policy_checkpoints/step-N (0 = the last only)
    resume_every: int = 5  # resume checkpoint every N iterations in .rlhf/checkpoints/ppo (0 = none); not a DVC output

    def __post_init__(self) -> None:
        choices = {
            "algorithm": set(ALGORITHMS),
            "kl_penalty": {"reward", "loss"},
            "loss_aggregation": set(LOSS_AGGREGATIONS),
            "value_model": {"critic", "head"},
            "sampling_seeds": {"per_rank", "per_episode"},
            "mixed_precision": {"no", "bf16"},
            "rollout_logprobs": {"sampler", "recompute"},
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ConfigError(
                    f"params.yaml: ppo.{name} must be one of {sorted(allowed)}, got {getattr(self, name)!r}"
                )
        if self.num_processes < 1 or self.lora_rank < 0 or self.snapshot_every < 0:
            raise ConfigError(
                "params.yaml: ppo.num_processes must be ≥ 1, ppo.lora_rank ≥ 0 and ppo.snapshot_every ≥ 0"
            )

    @property
    def critic_free(self) -> bool:
        """No value model: the baseline comes from the group (grpo, rloo) or the batch (reinforce_pp)."""
        return self.algorithm in CRITIC_FREE_ALGORITHMS

    def derived(self, world_size: int) -> dict[str, int]:
        """Per-process sizes; every division must be exact.

        e.g. 128 episodes / 1 process = 128 local; / 4 minibatches = 32 per minibatch; / 1 accumulation = 32 micro.
        """
        local_batch = _exact_div(
            self.rollout_batch_size, world_size, "ppo.rollout_batch_size", "the number of processes"
        )
        per_process = (
            "ppo.rollout_batch_size" if world_size == 1 else f"ppo.rollout_batch_size / {world_size} processes"
        )
        minibatch = _exact_div(local_batch, self.num_minibatches, per_process, "ppo.num_minibatches")
        micro_batch = _exact_div(
            minibatch,
            self.gradient_accumulation_steps,
            f"the minibatch ({per_process} / ppo.num_minibatches)",
            "ppo.gradient_accumulation_steps",
        )
        return {"local_batch_size": local_batch, "local_minibatch_size": minibatch, "micro_batch_size": micro_batch}


ALGORITHMS = ("ppo", "grpo", "rloo", "reinforce_pp", "dpo")  # ppo.algorithm (docs/design.md §4b)
CRITIC_FREE_ALGORITHMS = ("grpo", "rloo", "reinforce_pp")
GROUP_ALGORITHMS = ("grpo", "rloo")  # their baseline is the other samples of the same prompt: group_size ≥ 2
LOSS_AGGREGATIONS = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")


@dataclass
class DPOConfig:
    """The `ppo` stage with ``ppo.algorithm: dpo``: offline DPO from the SFT model on data/preferences (§4b)."""

    loss: str = "sigmoid"  # sigmoid (DPO, Rafailov et al. 2023) | ipo (Azar et al. 2023)
    # β: strength of the implicit KL to the SFT reference (IPO: the margin target is 1/(2β)); tuned on the embedded
    # default with the learning rate (docs/algorithms.md)
    beta: float = 0.25
    label_smoothing: float = 0.0  # conservative DPO (cDPO): the share of labels assumed flipped, in [0, 0.5)
    epochs: int = 1  # passes over the preference pairs
    batch_size: int = 64  # pairs per step, over all processes
    learning_rate: float = 3e-4  # peak AdamW learning rate (linear warm-up, linear decay)
    warmup_steps: int = 20  # linear warm-up
    max_grad_norm: float = 1.0  # gradient-norm clipping
    gradient_accumulation_steps: int = 1  # micro-batches per step on each process
    snapshot_every: int = 50  # policy snapshot every N steps (models/policy_checkpoints/step-N; 0 = the last only)


MODEL_STAGES = ("sft", "sample_pairs", "reward", "ppo", "evaluate")  # the stages `accelerate launch` starts
MIXED_PRECISIONS = ("no", "bf16")
SAMPLING_SEEDS = ("per_rank", "per_episode")  # sample_pairs / evaluate: where sampling draws (rlhf/generation.py)


@dataclass
class Launch:
    """How `accelerate launch` starts one stage (resolved: no field left to a default)."""

    config_file: str  # accelerate launch profile under configs/ (docs/design.md §6)
    num_processes: int  # processes over all machines; the stage refuses a world of another size
    mixed_precision: str  # "no" | "bf16" (bf16 compute, fp32 master weights)


@dataclass
class LaunchOverride:
    """One stage's departures from the shared launch settings (None = the shared value)."""

    config_file: str | None = None
    num_processes: int | None = None
    mixed_precision: str | None = None


@dataclass
class LaunchConfig:
    """How `accelerate launch` starts every model stage: shared settings, overridable per stage (docs/design.md §6)."""

    config_file: str = "configs/cpu-1proc.yaml"  # accelerate launch profile (configs/)
    num_processes: int = 1  # processes `accelerate launch` starts, all machines together; each stage checks it
    # "no" | "bf16": bf16 compute, fp32 master weights (GPUs; CPUs with AVX512-BF16/AMX)
    mixed_precision: str = "no"
    # seconds a launched stage may go without writing an event (a step, a checkpoint …) before the launcher stops it
    # and reports where each rank was (tasks/stall.py); 0 = never. Loading an 8 B model and its first step fit in it.
    stall_timeout_s: float = 1800.0
    sft: LaunchOverride = field(default_factory=LaunchOverride)
    sample_pairs: LaunchOverride = field(default_factory=LaunchOverride)
    reward: LaunchOverride = field(default_factory=LaunchOverride)
    ppo: LaunchOverride = field(default_factory=LaunchOverride)
    evaluate: LaunchOverride = field(default_factory=LaunchOverride)

    def for_stage(self, stage: str) -> Launch:
        """The launch of ``stage``: its override where set, else the shared value."""
        if stage not in MODEL_STAGES:
            raise KeyError(f"no launch settings for stage {stage!r}; model stages: {', '.join(MODEL_STAGES)}")
        override: LaunchOverride = getattr(self, stage)
        return Launch(
            config_file=self.config_file if override.config_file is None else override.config_file,
            num_processes=self.num_processes if override.num_processes is None else override.num_processes,
            mixed_precision=self.mixed_precision if override.mixed_precision is None else override.mixed_precision,
        )


@dataclass
class EvaluateConfig:
    """Stage `evaluate`: SFT vs PPO policy on held-out prompts."""

    n_prompts: int = 256  # held-out prompts (0 = all)
    samples_per_prompt: int = 2  # sampled responses per prompt and policy
    temperature: float = 1.0  # sampling temperature (as in training)
    max_new_tokens: int = 24  # response length cap
    gold: str = "rlhf.embedded:gold_score"  # `module:callable` gold judge ("" = no gold metrics)
    validity: str = (
        "rlhf.embedded:is_valid"  # `module:callable` (prompt, response) -> bool ("" = only "ended with EOS")
    )
    n_samples_table: int = 12  # rows in the sample table
    snapshot_prompts: int = 64  # held-out prompts (the first N) each PPO policy snapshot is scored on (curve)
    bootstrap_resamples: int = 1000  # percentile-bootstrap resamples for the win-rate intervals (95 %)
    batch_size: int = 256  # sampled responses per generation batch on each process (whole prompts: 128 × 2 samples)
    # "per_rank": global RNG seeded per process; "per_episode": same samples for any process count (rlhf/generation.py)
    sampling_seeds: str = "per_rank"


@dataclass
class ReleaseConfig:
    """Stage `release`: Hub-ready folder with weights, tokenizer and model card."""

    model_name: str = "rlhf-pipeline-embedded-ppo"  # name used in the model card
    license: str = "apache-2.0"  # card metadata
    language: str = "en"  # card metadata


# The seed of each stage's random stream is ``params.seed + STAGE_SEED_OFFSETS[stream]`` (:meth:`Params.stage_seed`).
# Different offsets give the stages independent streams from the one `seed` (sampling pairs does not replay the draws
# that initialised SFT, nor PPO those of the reward model). The values are FROZEN: changing one changes that stage's
# results and everything downstream. prepare and sft share offset 0, and so does the label stage's train/eval split
# (its annotator noise uses 2): historical values, kept so results stay identical.
STAGE_SEED_OFFSETS: dict[str, int] = {
    "prepare": 0,  # the embedded corpus, the real dataset's train/eval split, the embedded base model's initialisation
    "sft": 0,  # the global RNG and the batch-order generator of SFT
    "sample_pairs": 1,  # sampling the K responses per prompt
    "label.annotator": 2,  # the simulated annotator's Bradley–Terry draws and label flips
    "label.split": 0,  # the by-prompt train/eval split of the preference pairs
    "reward": 3,  # the global RNG (score-head initialisation) and the batch-order generator of reward training
    "ppo": 4,  # PPO: global RNG, and the base of its prompt, shuffle and sampling generators (seed·1000 + …)
    "evaluate": 5,  # sampling the SFT and PPO policies, bootstrap intervals
}


@dataclass
class Params:
    """All of params.yaml."""

    seed: int = 0  # global seed; each stage derives its own streams from it (STAGE_SEED_OFFSETS)
    launch: LaunchConfig = field(default_factory=LaunchConfig)
    prepare: PrepareConfig = field(default_factory=PrepareConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    sample_pairs: SamplePairsConfig = field(default_factory=SamplePairsConfig)
    label: LabelConfig = field(default_factory=LabelConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    ppo: PPOConfig = field(default_factory=PPOConfig)
    dpo: DPOConfig = field(default_factory=DPOConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    release: ReleaseConfig = field(default_factory=ReleaseConfig)

    def stage_seed(self, stream: str) -> int:
        """The seed of one stage's random stream, e.g. ``params.stage_seed("ppo")`` = seed + 4 (STAGE_SEED_OFFSETS)."""
        if stream not in STAGE_SEED_OFFSETS:
            raise KeyError(f"no seed stream {stream!r}; known: {sorted(STAGE_SEED_OFFSETS)}")
        return self.seed + STAGE_SEED_OFFSETS[stream]


def _exact_div(numerator: int, denominator: int, what: str, by: str) -> int:
    if denominator <= 0 or numerator % denominator:
        hint = ""
        if (
            denominator > 0 and numerator >= denominator and " " not in what
        ):  # a plain key: name the nearest valid values
            lower = numerator - numerator % denominator
            hint = f" (e.g. {what} = {lower} or {lower + denominator})"
        raise ConfigError(
            f"params.yaml: {what} ({numerator}) must be divisible by {by} ({denominator}): "
            f"change one of them so it divides exactly{hint}"
        )
    return numerator // denominator


def as_dict(obj: Any) -> dict[str, Any]:
    """A config (or Params) as plain data, e.g. for model cards and metrics files."""
    return dataclasses.asdict(obj)
