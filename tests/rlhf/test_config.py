"""params.yaml loading: defaults, validation errors naming the file and key, derived sizes."""

from __future__ import annotations

from pathlib import Path

import pytest

from rlhf.config import STAGE_SEED_OFFSETS, ConfigError, Launch, Params, PPOConfig
from rlhf.params import RENAMED_KEYS, load_params

REPO = Path(__file__).resolve().parents[2]


def test_the_shipped_params_load() -> None:
    params = load_params(REPO / "params.yaml")
    assert params.label.annotator == "simulated" and params.ppo.kl_estimator in {"k1", "k3"}


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("ppo: {learning_rat: 0.1}", "ppo: unknown key(s) ['learning_rat']"),
        ("sft: {steps: many}", "sft.steps: expected int"),
        ("label: {annotator: oracle}", "label.annotator must be"),
        ("ppo: {algorithm: a2c}", "ppo.algorithm must be one of"),
        ("ppo: {algorithm: grpo}", "ppo.group_size must be ≥ 2 for ppo.algorithm: grpo"),
        ("ppo: {group_size: 3}", "ppo.rollout_batch_size (128) must be divisible by ppo.group_size (3)"),
        ("ppo: {filter_uniform_groups: true}", "ppo.filter_uniform_groups needs ppo.group_size ≥ 2"),
        ("ppo: {dual_clip: 0.5}", "ppo.dual_clip must be 0 (off) or > 1"),
        ("ppo: {loss_aggregation: sum}", "ppo.loss_aggregation must be one of"),
        ("ppo: {kl_penalty: both}", "ppo.kl_penalty must be one of"),
        ("ppo: {critic_warmup_iterations: 60}", "ppo.critic_warmup_iterations (60) must be below ppo.iterations"),
        ("ppo: {algorithm: dpo}\ndpo: {loss: hinge}", "dpo.loss must be sigmoid or ipo"),
        ("ppo: {algorithm: dpo}\ndpo: {label_smoothing: 0.5}", "dpo.label_smoothing must be in [0, 0.5)"),
        ("- a list", "expected a mapping"),
    ],
)
def test_bad_params_name_the_file_and_key(tmp_path: Path, text: str, problem: str) -> None:
    path = tmp_path / "params.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as error:
        load_params(path)
    assert str(path) in str(error.value) and problem in str(error.value)


def test_derived_sizes_divide_exactly() -> None:
    # 128 episodes over 2 processes = 64 each; 4 minibatches of 16; 2 micro-batches of 8
    config = PPOConfig(rollout_batch_size=128, num_minibatches=4, gradient_accumulation_steps=2)
    assert config.derived(2) == {"local_batch_size": 64, "local_minibatch_size": 16, "micro_batch_size": 8}
    with pytest.raises(ConfigError, match="divisible"):
        PPOConfig(rollout_batch_size=100, num_minibatches=3).derived(1)


def test_a_bare_no_is_a_string_as_dvc_writes_it(tmp_path: Path) -> None:
    # `dvc exp run -S` rewrites params.yaml as YAML 1.2 and drops the quotes of 'no'; YAML 1.1 would read False
    path = tmp_path / "params.yaml"
    path.write_text("launch: {mixed_precision: no}\nppo: {anneal_lr: false, snapshot_every: 15}\n")
    params = load_params(path)
    assert params.ppo.mixed_precision == "no" and params.ppo.anneal_lr is False and params.ppo.snapshot_every == 15


def test_params_are_read_with_yaml_1_2_booleans_as_dvc_writes_them(tmp_path: Path) -> None:
    # `dvc exp run -S` rewrites params.yaml with `mixed_precision: no` unquoted: a string in YAML 1.2
    path = tmp_path / "params.yaml"
    path.write_text("launch:\n  mixed_precision: no\nppo:\n  anneal_lr: false\n")
    params = load_params(path)
    assert params.ppo.mixed_precision == "no" and params.ppo.anneal_lr is False


@pytest.mark.parametrize(("old", "new"), sorted(RENAMED_KEYS.items()))
def test_a_renamed_key_fails_naming_the_new_one(tmp_path: Path, old: str, new: str) -> None:
    section, key = old.split(".")
    path = tmp_path / "params.yaml"
    path.write_text(f"{section}:\n  {key}: 3\n")
    with pytest.raises(ConfigError) as error:
        load_params(path)
    assert str(error.value) == f"{path}: {old} was renamed to {new}; rename it"


def test_renamed_keys_name_one_meaning_each() -> None:
    # resume_every: crash-safety checkpoints outside DVC's outs; snapshot_*: policies kept for the evaluation curve
    assert RENAMED_KEYS == {
        "sft.checkpoint_every": "sft.resume_every",
        "reward.checkpoint_every": "reward.resume_every",
        "ppo.checkpoint_every": "ppo.snapshot_every",
        "evaluate.checkpoint_prompts": "evaluate.snapshot_prompts",
        # one launch section for every model stage
        "ppo.config_file": "launch.config_file (or launch.ppo.config_file)",
        "ppo.num_processes": "launch.num_processes (or launch.ppo.num_processes)",
        "ppo.mixed_precision": "launch.mixed_precision (or launch.ppo.mixed_precision)",
    }


def test_each_stage_launch_is_the_shared_one_unless_overridden(tmp_path: Path) -> None:
    path = tmp_path / "params.yaml"
    path.write_text(
        "launch:\n  num_processes: 2\n  config_file: configs/cpu-2proc.yaml\n"
        "  ppo: {num_processes: 1, config_file: configs/cpu-1proc.yaml, mixed_precision: bf16}\n"
        "  sft: {mixed_precision: bf16}\nppo: {rollout_batch_size: 16, num_minibatches: 2}\n"
    )
    params = load_params(path)
    assert params.launch.for_stage("sft") == Launch("configs/cpu-2proc.yaml", 2, "bf16")
    assert params.launch.for_stage("reward") == Launch("configs/cpu-2proc.yaml", 2, "no")
    assert params.launch.for_stage("ppo") == Launch("configs/cpu-1proc.yaml", 1, "bf16")
    # the PPO engine reads its launch from its config
    assert (params.ppo.config_file, params.ppo.num_processes, params.ppo.mixed_precision) == (
        "configs/cpu-1proc.yaml",
        1,
        "bf16",
    )
    with pytest.raises(KeyError, match="no launch settings for stage 'label'"):
        params.launch.for_stage("label")


def test_stage_seeds_are_the_frozen_offsets() -> None:
    # frozen: a changed offset changes that stage's results (these are the values the stages always used)
    assert STAGE_SEED_OFFSETS == {
        "prepare": 0,
        "sft": 0,
        "sample_pairs": 1,
        "label.annotator": 2,
        "label.split": 0,
        "reward": 3,
        "ppo": 4,
        "evaluate": 5,
    }
    params = Params(seed=7)
    assert [params.stage_seed(stream) for stream in STAGE_SEED_OFFSETS] == [7, 7, 8, 9, 7, 10, 11, 12]
    with pytest.raises(KeyError, match="release"):
        params.stage_seed("release")


# A key changed from its default in a mode where its stage ignores it: (params.yaml text, the start of the message)
IDLE = [
    (
        "prepare: {prompts_dataset: org/prompts}",
        "prepare.prompts_dataset = 'org/prompts' has no effect: prepare.dataset is embedded (it applies to a real "
        "dataset only); set it back to '' or name a real prepare.dataset",
    ),
    ("prepare: {dataset_split: test}", "prepare.dataset_split = 'test' has no effect: prepare.dataset is embedded"),
    ("prepare: {eval_fraction: 0.2}", "prepare.eval_fraction = 0.2 has no effect: prepare.dataset is embedded"),
    ("prepare: {max_rows: 100}", "prepare.max_rows = 100 has no effect: prepare.dataset is embedded"),
    (
        "prepare: {dataset: org/demos, n_demonstrations: 10}",
        "prepare.n_demonstrations = 10 has no effect: prepare.dataset is 'org/demos' (it sizes the embedded corpus "
        "only); set it back to 20000 or set prepare.dataset: embedded",
    ),
    (
        "prepare: {dataset: org/demos, n_train_prompts: 10}",
        "prepare.n_train_prompts = 10 has no effect: prepare.dataset is 'org/demos'",
    ),
    (
        "prepare: {dataset: org/demos, n_eval_prompts: 10}",
        "prepare.n_eval_prompts = 10 has no effect: prepare.dataset is 'org/demos'",
    ),
    (
        "prepare: {base_model: gpt2, vocab_size: 1000}",
        "prepare.vocab_size = 1000 has no effect: prepare.base_model is 'gpt2' (a real model brings its own tokenizer "
        "and shape); set it back to 512 or set prepare.base_model: embedded",
    ),
    (
        "prepare: {base_model: gpt2, model: {n_layer: 2}}",
        "prepare.model.n_layer = 2 has no effect: prepare.base_model is 'gpt2'",
    ),
    (
        "prepare: {base_model: gpt2, model: {n_positions: 128}}",
        "prepare.model.n_positions = 128 has no effect: prepare.base_model is 'gpt2'",
    ),
    (
        "label: {annotator: human, gold: 'my.judge:score'}",
        "label.gold = 'my.judge:score' has no effect: label.annotator is 'human' (it applies to the simulated "
        "annotator only); set it back to 'rlhf.embedded:gold_score' or set label.annotator: simulated",
    ),
    (
        "label: {annotator: dataset, dataset: org/prefs, temperature: 0.5}",
        "label.temperature = 0.5 has no effect: label.annotator is 'dataset'",
    ),
    ("label: {annotator: human, flip_prob: 0.1}", "label.flip_prob = 0.1 has no effect: label.annotator is 'human'"),
    (
        "label: {dataset: org/prefs}",
        "label.dataset = 'org/prefs' has no effect: label.annotator is 'simulated' (it applies to imported preference "
        "data only); set it back to '' or set label.annotator: dataset",
    ),
    ("label: {dataset_split: test}", "label.dataset_split = 'test' has no effect: label.annotator is 'simulated'"),
    ("label: {annotator: human, max_rows: 5}", "label.max_rows = 5 has no effect: label.annotator is 'human'"),
    (
        "label: {labels_file: data/human_labels/other.jsonl}",
        "label.labels_file = 'data/human_labels/other.jsonl' has no effect: label.annotator is 'simulated' (it applies "
        "to human labels only); set it back to 'data/human_labels/labels.jsonl' or set label.annotator: human",
    ),
    (
        "ppo: {lora_alpha: 16}",
        "ppo.lora_alpha = 16 has no effect: ppo.lora_rank is 0 (LoRA is off); "
        "set it back to 32 or set ppo.lora_rank > 0",
    ),
    ("ppo: {lora_target_modules: c_attn}", "ppo.lora_target_modules = 'c_attn' has no effect: ppo.lora_rank is 0"),
    (
        "ppo: {adaptive_kl: false, kl_horizon: 500}",
        "ppo.kl_horizon = 500 has no effect: ppo.adaptive_kl is false (β stays ppo.kl_coef = 0.1); "
        "set it back to 10000 or set ppo.adaptive_kl: true",
    ),
    (
        "ppo: {algorithm: grpo, group_size: 4, vf_coef: 0.5}",
        "ppo.vf_coef = 0.5 has no effect: ppo.algorithm is 'grpo', which trains no value model; "
        "set it back to 0.1 or set ppo.algorithm: ppo",
    ),
    ("ppo: {algorithm: rloo, group_size: 2, lam_critic: 1.0}", "ppo.lam_critic = 1.0 has no effect"),
    ("ppo: {algorithm: rloo, group_size: 2, group_std_normalise: false}", "ppo.group_std_normalise = False has"),
    ("ppo: {algorithm: dpo, rollout_batch_size: 64}", "ppo.rollout_batch_size = 64 has no effect: ppo.algorithm"),
    ("dpo: {beta: 0.5}", "dpo.beta = 0.5 has no effect: ppo.algorithm is 'ppo' (the dpo section applies to"),
    (
        "label: {annotator: human, labels_file: elsewhere/labels.jsonl}",
        "label.labels_file 'elsewhere/labels.jsonl' lies outside data/human_labels/, the label stage's DVC dependency, "
        "so DVC would not see new labels; keep the file under data/human_labels/",
    ),
]


@pytest.mark.parametrize(("text", "message"), IDLE, ids=[message.split(" ")[0] for _, message in IDLE])
def test_a_key_its_stage_would_ignore_is_refused(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "params.yaml"
    path.write_text(text + "\n")
    with pytest.raises(ConfigError) as error:
        load_params(path)
    assert str(error.value).startswith(f"{path}: {message}") and "\n" not in str(error.value)


@pytest.mark.parametrize(
    "text",
    [
        # a real dataset
        "prepare: {dataset: org/demos, eval_fraction: 0.2, max_rows: 100, prompts_dataset: org/prompts}",
        "prepare: {base_model: gpt2}",  # the embedded-only keys at their defaults (as params.yaml lists them) are fine
        "label: {annotator: dataset, dataset: org/prefs, max_rows: 5}",
        "label: {annotator: human, labels_file: ./data/human_labels/batch2.jsonl}",
        "ppo: {lora_rank: 8, lora_alpha: 16, lora_target_modules: c_attn}",
        "ppo: {adaptive_kl: false, kl_target: 6.0}",  # kl_target still sets the band evaluate reports
        "ppo: {algorithm: grpo, group_size: 4, group_std_normalise: false, loss_aggregation: seq-mean-token-sum-norm}",
        "ppo: {algorithm: ppo, lam_critic: 1.0, critic_warmup_iterations: 5, clip_range_high: 0.28, dual_clip: 3}",
        "ppo: {algorithm: dpo}\ndpo: {loss: ipo, beta: 0.5}",
        "ppo: {reward: 'rlhf.embedded:gold_score', kl_penalty: loss}",
    ],
)
def test_keys_in_their_mode_or_at_their_default_load(tmp_path: Path, text: str) -> None:
    path = tmp_path / "params.yaml"
    path.write_text(text + "\n")
    load_params(path)
