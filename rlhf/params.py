"""Reading params.yaml into :class:`rlhf.config.Params`, refusing what a stage could not use.

Unknown keys and wrong types fail with an error naming the file and the key, before any stage does work; so do
renamed keys (:data:`RENAMED_KEYS`, naming the new key), out-of-range values, sizes that do not divide, and keys
changed in a mode where their stage would ignore them (:data:`MODE_KEYS`). YAML is read with 1.2 rules, as DVC
writes it.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import posixpath
import re
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from rlhf.config import (
    GROUP_ALGORITHMS,
    MIXED_PRECISIONS,
    MODEL_STAGES,
    SAMPLING_SEEDS,
    ConfigError,
    DPOConfig,
    LaunchConfig,
    LaunchOverride,
    Params,
)


def _coerce(value: Any, annotation: Any, file: str, key: str) -> Any:
    """Check ``value`` of ``key`` (a dotted path) against a field annotation (ints are accepted for floats)."""
    if dataclasses.is_dataclass(annotation):
        if not isinstance(value, dict):
            raise ConfigError(f"{file}: {key}: expected a mapping, got {value!r}")
        return _build(annotation, value, file, key)
    if isinstance(annotation, types.UnionType):  # `T | None`: an override left to the shared value
        if value is None:
            return None
        (annotation,) = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if annotation is bool:
        ok = isinstance(value, bool)
    elif annotation is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    else:
        ok = isinstance(value, annotation)
    if not ok:
        raise ConfigError(f"{file}: {key}: expected {annotation.__name__}, got {value!r}")
    return value


def _build(cls: type, raw: dict[str, Any], file: str, prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - names)
    if unknown:
        guesses = {key: difflib.get_close_matches(key, names, n=1) for key in unknown}
        if all(guesses.values()):  # typos: name the intended keys rather than list every known one
            known = (
                "did you mean "
                + ", ".join(
                    f"{match[0]!r} (for {key!r})" if len(unknown) > 1 else f"{match[0]!r}"
                    for key, match in guesses.items()
                )
                + "?"
            )
        else:
            known = f"known: {sorted(names)}"
        raise ConfigError(f"{file}: {prefix or 'top level'}: unknown key(s) {unknown}; {known}")
    kwargs = {key: _coerce(value, hints[key], file, f"{prefix}.{key}" if prefix else key) for key, value in raw.items()}
    try:
        return cls(**kwargs)
    except ConfigError as error:  # a config's own checks (__post_init__) name params.yaml: name the file read
        raise ConfigError(f"{file}: {str(error).removeprefix('params.yaml: ')}") from None


class _Yaml12Loader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2 booleans (only true/false), as DVC reads and writes params.yaml (ruamel).

    `dvc exp run -S` rewrites params.yaml and drops the quotes of ``mixed_precision: 'no'``; YAML 1.1 would read
    the bare ``no`` as False.
    """


_Yaml12Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Yaml12Loader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)


def load_params(path: str | Path = "params.yaml") -> Params:
    """Read and validate params.yaml (missing keys take the documented defaults)."""
    path = Path(path)
    try:
        raw = yaml.load(path.read_text(), Loader=_Yaml12Loader) or {}
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: invalid YAML: {error}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    for old, new in RENAMED_KEYS.items():
        section, key = old.split(".")
        if isinstance(raw.get(section), dict) and key in raw[section]:
            raise ConfigError(f"{path}: {old} was renamed to {new}; rename it")
    params = _build(Params, raw, str(path))
    _validate(params, str(path))
    # the PPO engine reads its launch from its own config: fill it from `launch` (LaunchConfig.for_stage)
    launch = params.launch.for_stage("ppo")
    params.ppo.config_file, params.ppo.num_processes = launch.config_file, launch.num_processes
    params.ppo.mixed_precision = launch.mixed_precision
    _validate_ppo_sizes(params, str(path))
    return params


# Keys renamed for one name per meaning: "resume" = crash-safety checkpoints outside DVC's outs, "snapshot" = the
# policies saved for the evaluation's over-optimisation curve. An old key fails naming the new one.
RENAMED_KEYS = {
    "sft.checkpoint_every": "sft.resume_every",
    "reward.checkpoint_every": "reward.resume_every",
    "ppo.checkpoint_every": "ppo.snapshot_every",
    "evaluate.checkpoint_prompts": "evaluate.snapshot_prompts",
    # one launch for every model stage: the shared value, or launch.ppo.* for ppo alone
    "ppo.config_file": "launch.config_file (or launch.ppo.config_file)",
    "ppo.num_processes": "launch.num_processes (or launch.ppo.num_processes)",
    "ppo.mixed_precision": "launch.mixed_precision (or launch.ppo.mixed_precision)",
}

# Range rules checked by load_params, so a bad value stops `dvc repro` at the first stage, before any training.
POSITIVE = (  # must be > 0
    "prepare.vocab_size",
    "prepare.max_prompt_tokens",
    "prepare.n_demonstrations",
    "prepare.n_train_prompts",
    "prepare.n_eval_prompts",
    "prepare.model.n_layer",
    "prepare.model.n_head",
    "prepare.model.n_embd",
    "prepare.model.n_positions",
    "sft.steps",
    "sft.batch_size",
    "sft.learning_rate",
    "sft.max_grad_norm",
    "sft.eval_every",
    "sample_pairs.temperature",
    "sample_pairs.max_new_tokens",
    "sample_pairs.batch_size",
    "sft.gradient_accumulation_steps",
    "reward.gradient_accumulation_steps",
    "sft.lora_alpha",
    "reward.lora_alpha",
    "reward.epochs",
    "reward.batch_size",
    "reward.learning_rate",
    "reward.max_grad_norm",
    "reward.max_length",
    "ppo.iterations",
    "ppo.rollout_batch_size",
    "ppo.num_minibatches",
    "ppo.gradient_accumulation_steps",
    "ppo.ppo_epochs",
    "ppo.learning_rate",
    "ppo.max_grad_norm",
    "ppo.response_length",
    "ppo.temperature",
    "ppo.clip_range",
    "ppo.clip_range_value",
    "ppo.gamma",
    "ppo.kl_target",
    "ppo.kl_horizon",
    "ppo.lora_alpha",
    "ppo.group_size",
    "dpo.beta",
    "dpo.epochs",
    "dpo.batch_size",
    "dpo.learning_rate",
    "dpo.max_grad_norm",
    "dpo.gradient_accumulation_steps",
    "evaluate.samples_per_prompt",
    "evaluate.temperature",
    "evaluate.max_new_tokens",
    "evaluate.batch_size",
)
NON_NEGATIVE = (  # must be ≥ 0 (0 often means "all" or "off")
    "prepare.max_rows",
    "sft.warmup_steps",
    "sft.weight_decay",
    "sample_pairs.n_prompts",
    "label.temperature",
    "label.max_rows",
    "reward.warmup_steps",
    "ppo.vf_coef",
    "ppo.kl_coef",
    "evaluate.n_prompts",
    "evaluate.n_samples_table",
    "evaluate.snapshot_prompts",
    "evaluate.bootstrap_resamples",
    "sft.resume_every",
    "reward.resume_every",
    "sft.lora_rank",
    "reward.lora_rank",
    "ppo.resume_every",
    "ppo.dual_clip",
    "ppo.critic_warmup_iterations",
    "dpo.warmup_steps",
    "dpo.snapshot_every",
)
OPEN_FRACTIONS = ("prepare.eval_fraction", "label.eval_fraction")  # in (0, 1)
CLOSED_FRACTIONS = (
    "label.flip_prob",
    "ppo.lam",
)  # ppo.lam_critic and dpo.label_smoothing: _algorithm_problems  # in [0, 1]
AT_MOST_ONE = ("ppo.gamma",)  # a discount


def _value(params: Params, key: str) -> Any:
    value: Any = params
    for name in key.split("."):
        value = getattr(value, name)
    return value


def _float_keys(obj: Any, prefix: str = "") -> list[str]:
    """Dotted keys of every float field (nested configs included)."""
    keys = []
    for item in dataclasses.fields(obj):
        value, key = getattr(obj, item.name), f"{prefix}{item.name}"
        if dataclasses.is_dataclass(value):
            keys += _float_keys(value, key + ".")
        elif isinstance(value, float):
            keys.append(key)
    return keys


def range_problems(params: Params) -> list[str]:
    """Every out-of-range value, as "key must be …, got value" (empty when all are valid)."""
    problems = [
        f"{key} must be a finite number, got {_value(params, key)}"
        for key in _float_keys(params)
        if not math.isfinite(_value(params, key))
    ]
    problems += [f"{key} must be > 0, got {_value(params, key)}" for key in POSITIVE if not _value(params, key) > 0]
    problems += [
        f"{key} must be ≥ 0, got {_value(params, key)}" for key in NON_NEGATIVE if not _value(params, key) >= 0
    ]
    problems += [
        f"{key} must be between 0 and 1 (exclusive), got {_value(params, key)}"
        for key in OPEN_FRACTIONS
        if not 0 < _value(params, key) < 1
    ]
    problems += [
        f"{key} must be between 0 and 1, got {_value(params, key)}"
        for key in CLOSED_FRACTIONS
        if not 0 <= _value(params, key) <= 1
    ]
    problems += [f"{key} must be ≤ 1, got {_value(params, key)}" for key in AT_MOST_ONE if not _value(params, key) <= 1]
    return problems


# ppo keys of the value model: idle under a critic-free algorithm (and DPO)
CRITIC_KEYS = (
    "ppo.vf_coef",
    "ppo.clip_range_value",
    "ppo.value_init",
    "ppo.value_model",
    "ppo.lam",
    "ppo.lam_critic",
    "ppo.critic_warmup_iterations",
    "ppo.whiten_rewards",
)
# ppo keys of the RL loop (rollouts, surrogate, KL controller): idle under ppo.algorithm: dpo
RL_KEYS = (
    "ppo.iterations",
    "ppo.rollout_batch_size",
    "ppo.num_minibatches",
    "ppo.ppo_epochs",
    "ppo.learning_rate",
    "ppo.anneal_lr",
    "ppo.response_length",
    "ppo.temperature",
    "ppo.clip_range",
    "ppo.ent_coef",
    "ppo.kl_coef",
    "ppo.kl_estimator",
    "ppo.adaptive_kl",
    "ppo.kl_target",
    "ppo.missing_eos_score",
    "ppo.group_size",
    "ppo.kl_penalty",
    "ppo.reward",
    "ppo.clip_range_high",
    "ppo.dual_clip",
    "ppo.loss_aggregation",
    "ppo.filter_uniform_groups",
    "ppo.sampling_seeds",
    "ppo.rollout_logprobs",
    "ppo.snapshot_every",
    "ppo.gradient_accumulation_steps",
    "ppo.lora_rank",
    "ppo.gradient_checkpointing",
    "ppo.resume_every",
)


def _algorithm_problems(params: Params) -> list[tuple[bool, str]]:
    """(ok, problem) for the algorithm's options that only make sense together (docs/design.md §4b)."""
    ppo, dpo = params.ppo, params.dpo
    high = ppo.clip_range if ppo.clip_range_high is None else ppo.clip_range_high
    return [
        (
            ppo.algorithm not in GROUP_ALGORITHMS or ppo.group_size >= 2,
            f"ppo.group_size must be ≥ 2 for ppo.algorithm: {ppo.algorithm} (its baseline is the prompt's other "
            f"samples), got {ppo.group_size}",
        ),
        (
            ppo.rollout_batch_size % max(ppo.group_size, 1) == 0,
            f"ppo.rollout_batch_size ({ppo.rollout_batch_size}) must be divisible by ppo.group_size "
            f"({ppo.group_size}): each prompt is sampled group_size times",
        ),
        (
            not ppo.filter_uniform_groups or ppo.group_size >= 2,
            "ppo.filter_uniform_groups needs ppo.group_size ≥ 2 (a group of one always scores alike)",
        ),
        (high > 0, f"ppo.clip_range_high must be > 0 or null, got {ppo.clip_range_high}"),
        (
            ppo.dual_clip == 0 or ppo.dual_clip > 1,
            f"ppo.dual_clip must be 0 (off) or > 1 (bounds a negative advantage's loss at −c·A), got {ppo.dual_clip}",
        ),
        (
            ppo.lam_critic is None or 0 <= ppo.lam_critic <= 1,
            f"ppo.lam_critic must be between 0 and 1 or null, got {ppo.lam_critic}",
        ),
        (
            ppo.critic_warmup_iterations < ppo.iterations or ppo.algorithm == "dpo",
            f"ppo.critic_warmup_iterations ({ppo.critic_warmup_iterations}) must be below ppo.iterations "
            f"({ppo.iterations}), or the policy never trains",
        ),
        (dpo.loss in ("sigmoid", "ipo"), f"dpo.loss must be sigmoid or ipo, got {dpo.loss!r}"),
        (
            0 <= dpo.label_smoothing < 0.5,
            f"dpo.label_smoothing must be in [0, 0.5) (the share of labels assumed flipped), got {dpo.label_smoothing}",
        ),
        (
            dpo.loss == "sigmoid" or dpo.label_smoothing == 0,
            "dpo.label_smoothing applies to dpo.loss: sigmoid only (conservative DPO); set it to 0 for ipo",
        ),
    ]


# Keys that apply in one mode only: (keys, in effect?, the mode that makes them idle, how to make them count).
# A key changed from its default while idle is refused, since the stage would ignore it without a word; at its
# default it is fine (params.yaml lists every key).
MODE_KEYS: tuple[tuple[tuple[str, ...], Callable[[Params], bool], Callable[[Params], str], str], ...] = (
    (
        ("prepare.dataset_split", "prepare.prompts_dataset", "prepare.eval_fraction", "prepare.max_rows"),
        lambda p: p.prepare.dataset != "embedded",
        lambda p: "prepare.dataset is embedded (it applies to a real dataset only)",
        "name a real prepare.dataset",
    ),
    (
        ("prepare.n_demonstrations", "prepare.n_train_prompts", "prepare.n_eval_prompts"),
        lambda p: p.prepare.dataset == "embedded",
        lambda p: f"prepare.dataset is {p.prepare.dataset!r} (it sizes the embedded corpus only)",
        "set prepare.dataset: embedded",
    ),
    (
        (
            "prepare.vocab_size",
            "prepare.model.n_layer",
            "prepare.model.n_head",
            "prepare.model.n_embd",
            "prepare.model.n_positions",
        ),
        lambda p: p.prepare.base_model == "embedded",
        lambda p: f"prepare.base_model is {p.prepare.base_model!r} (a real model brings its own tokenizer and shape)",
        "set prepare.base_model: embedded",
    ),
    (
        ("label.gold", "label.temperature", "label.flip_prob"),
        lambda p: p.label.annotator == "simulated",
        lambda p: f"label.annotator is {p.label.annotator!r} (it applies to the simulated annotator only)",
        "set label.annotator: simulated",
    ),
    (
        ("label.dataset", "label.dataset_split", "label.max_rows"),
        lambda p: p.label.annotator == "dataset",
        lambda p: f"label.annotator is {p.label.annotator!r} (it applies to imported preference data only)",
        "set label.annotator: dataset",
    ),
    (
        ("label.labels_file",),
        lambda p: p.label.annotator == "human",
        lambda p: f"label.annotator is {p.label.annotator!r} (it applies to human labels only)",
        "set label.annotator: human",
    ),
    *(
        (
            (f"{stage}.lora_alpha", f"{stage}.lora_target_modules"),
            lambda p, stage=stage: getattr(p, stage).lora_rank > 0,
            lambda p, stage=stage: f"{stage}.lora_rank is 0 (LoRA is off)",
            f"set {stage}.lora_rank > 0",
        )
        for stage in ("sft", "reward", "ppo")
    ),
    (
        CRITIC_KEYS,
        lambda p: not p.ppo.critic_free and p.ppo.algorithm != "dpo",
        lambda p: f"ppo.algorithm is {p.ppo.algorithm!r}, which trains no value model",
        "set ppo.algorithm: ppo",
    ),
    (
        ("ppo.group_std_normalise",),
        lambda p: p.ppo.algorithm == "grpo",
        lambda p: f"ppo.algorithm is {p.ppo.algorithm!r} (it applies to grpo only)",
        "set ppo.algorithm: grpo",
    ),
    (
        RL_KEYS,
        lambda p: p.ppo.algorithm != "dpo",
        lambda p: "ppo.algorithm is 'dpo', which samples nothing and reads the dpo section",
        "choose an RL ppo.algorithm (ppo, grpo, rloo, reinforce_pp)",
    ),
    (
        tuple(f"dpo.{item.name}" for item in dataclasses.fields(DPOConfig)),
        lambda p: p.ppo.algorithm == "dpo",
        lambda p: f"ppo.algorithm is {p.ppo.algorithm!r} (the dpo section applies to ppo.algorithm: dpo only)",
        "set ppo.algorithm: dpo",
    ),
    (
        ("ppo.kl_horizon",),
        lambda p: p.ppo.adaptive_kl,
        lambda p: f"ppo.adaptive_kl is false (β stays ppo.kl_coef = {p.ppo.kl_coef})",
        "set ppo.adaptive_kl: true",
    ),
)
HUMAN_LABELS_DIR = "data/human_labels"  # the label stage's DVC dependency (dvc.yaml): label.labels_file must lie in it


def idle_key_problems(params: Params) -> list[str]:
    """Every key changed from its default in a mode where its stage ignores it: one line naming key, cause and fix."""
    defaults, problems = Params(), []
    for keys, in_effect, idle_because, fix in MODE_KEYS:
        if in_effect(params):
            continue
        for key in keys:
            value, default = _value(params, key), _value(defaults, key)
            if value != default:
                problems.append(
                    f"{key} = {value!r} has no effect: {idle_because(params)}; set it back to {default!r} or {fix}"
                )
    labels_file = posixpath.normpath(params.label.labels_file)
    if params.label.annotator == "human" and not labels_file.startswith(HUMAN_LABELS_DIR + "/"):
        problems.append(
            f"label.labels_file {params.label.labels_file!r} lies outside {HUMAN_LABELS_DIR}/, the label "
            "stage's DVC dependency, so DVC would not see new labels; "
            f"keep the file under {HUMAN_LABELS_DIR}/"
        )
    return problems


def _validate(params: Params, where: str) -> None:
    """Choices, ranges and sizes that must divide; the first problem is raised, naming the file and the key."""
    model = params.prepare.model
    checks = [
        (
            params.label.annotator in {"simulated", "dataset", "human"},
            f"label.annotator must be simulated, dataset or human, got {params.label.annotator!r}",
        ),
        (
            params.ppo.kl_estimator in {"k1", "k3"},
            f"ppo.kl_estimator must be k1 or k3, got {params.ppo.kl_estimator!r}",
        ),
        (
            params.ppo.value_init in {"reward", "zero"},
            f"ppo.value_init must be reward or zero, got {params.ppo.value_init!r}",
        ),
        (
            params.sample_pairs.samples_per_prompt >= 2,
            f"sample_pairs.samples_per_prompt must be at least 2, got {params.sample_pairs.samples_per_prompt}",
        ),
        (
            params.label.annotator != "dataset" or bool(params.label.dataset),
            "label.dataset is required when label.annotator is dataset",
        ),
        (
            model.n_head <= 0 or model.n_embd % model.n_head == 0,
            f"prepare.model.n_embd ({model.n_embd}) must be divisible by prepare.model.n_head ({model.n_head})",
        ),
    ]
    checks += [
        (
            getattr(params, stage).sampling_seeds in SAMPLING_SEEDS,
            f"{stage}.sampling_seeds must be one of {list(SAMPLING_SEEDS)}, "
            f"got {getattr(params, stage).sampling_seeds!r}",
        )
        for stage in ("sample_pairs", "evaluate")
    ]
    checks += launch_problems(params.launch)
    checks += _algorithm_problems(params)
    problems = [problem for ok, problem in checks if not ok] + idle_key_problems(params) + range_problems(params)
    if problems:
        raise ConfigError(
            f"{where}: {problems[0]}" + (f" (and {len(problems) - 1} more problem(s))" if len(problems) > 1 else "")
        )


def launch_problems(launch: LaunchConfig) -> list[tuple[bool, str]]:
    """(ok, problem) for the shared launch settings and each stage's override."""
    checks = [
        (launch.num_processes >= 1, f"launch.num_processes must be ≥ 1, got {launch.num_processes}"),
        (
            launch.mixed_precision in MIXED_PRECISIONS,
            f"launch.mixed_precision must be one of {list(MIXED_PRECISIONS)}, got {launch.mixed_precision!r}",
        ),
        (
            launch.stall_timeout_s >= 0,
            f"launch.stall_timeout_s must be ≥ 0 seconds (0 = never stop a silent stage), got {launch.stall_timeout_s}",
        ),
    ]
    for stage in MODEL_STAGES:
        override: LaunchOverride = getattr(launch, stage)
        checks += [
            (
                override.num_processes is None or override.num_processes >= 1,
                f"launch.{stage}.num_processes must be ≥ 1 or null, got {override.num_processes}",
            ),
            (
                override.mixed_precision in (None, *MIXED_PRECISIONS),
                f"launch.{stage}.mixed_precision must be null or one of {list(MIXED_PRECISIONS)}, "
                f"got {override.mixed_precision!r}",
            ),
        ]
    return checks


def _validate_ppo_sizes(params: Params, where: str) -> None:
    try:  # every process's share of the rollout batch must split into minibatches and micro-batches exactly
        params.ppo.derived(params.ppo.num_processes)
    except ConfigError as error:
        raise ConfigError(f"{where}: {str(error).removeprefix('params.yaml: ')}") from None
