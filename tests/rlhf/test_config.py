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
