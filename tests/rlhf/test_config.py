"""params.yaml loading: defaults, validation errors naming the file and key, derived sizes."""

from __future__ import annotations

from pathlib import Path

import pytest

from rlhf.config import ConfigError, PPOConfig, load_params

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
    path.write_text("ppo: {mixed_precision: no, adaptive_kl: false, checkpoint_every: 15}\n")
    params = load_params(path)
    assert params.ppo.mixed_precision == "no" and params.ppo.adaptive_kl is False and params.ppo.checkpoint_every == 15


def test_params_are_read_with_yaml_1_2_booleans_as_dvc_writes_them(tmp_path: Path) -> None:
    # `dvc exp run -S` rewrites params.yaml with `mixed_precision: no` unquoted: a string in YAML 1.2
    path = tmp_path / "params.yaml"
    path.write_text("ppo:\n  mixed_precision: no\n  anneal_lr: false\n")
    params = load_params(path)
    assert params.ppo.mixed_precision == "no" and params.ppo.anneal_lr is False
