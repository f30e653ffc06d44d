"""The PPO loop's glue: rollout-time and train-time logprobs agree, sharding, one real iteration."""

from __future__ import annotations

import random

import pytest
import torch
from accelerate import Accelerator

from rlhf import embedded
from rlhf.config import PPOConfig, TinyModelConfig
from rlhf.modeling import RewardNormalization, build_tiny_gpt2, load_scalar_model
from rlhf.ppo_trainer import PPOModels, PolicyAndCritic, add_advantages, collect_experience, ppo_minibatch_loss, shard_for_rank, train_ppo


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> PPOModels:
    rng = random.Random(0)
    tokenizer = embedded.train_tokenizer([embedded.sample_review(rng) for _ in range(200)])
    shape = TinyModelConfig(n_layer=1, n_head=2, n_embd=16, n_positions=48)
    folder = tmp_path_factory.mktemp("policy")
    build_tiny_gpt2(shape, tokenizer, seed=0).save_pretrained(folder)

    def fresh_policy():
        return build_tiny_gpt2(shape, tokenizer, seed=0)

    return PPOModels(
        policy=fresh_policy(),
        reference=fresh_policy(),
        critic=load_scalar_model(folder, tokenizer.pad_token_id),
        reward_model=load_scalar_model(folder, tokenizer.pad_token_id),
        reward_normalization=RewardNormalization(),
        tokenizer=tokenizer,
    )


PROMPTS = ["the plot was", "the music was very lovely and the cast was", "the film was", "the ending was dull but the script was"]


def test_train_time_logprobs_equal_rollout_logprobs_before_any_update(models: PPOModels) -> None:
    """At the first minibatch the new policy is the old one: ratio 1, nothing clipped, approx KL 0."""
    config = PPOConfig(response_length=8, temperature=0.7)
    trainable = PolicyAndCritic(models.policy, models.critic)
    torch.manual_seed(0)
    experience = collect_experience(models, trainable, PROMPTS, config, forward_batch_size=2, device=torch.device("cpu"))
    # reference = same weights as the policy: per-token KL exactly 0 on valid tokens
    assert torch.allclose(experience.logprobs, experience.ref_logprobs, atol=1e-6)
    experience = add_advantages(experience, config, kl_coef=0.1, all_reduce_sum=None)
    _, stats = ppo_minibatch_loss(trainable, experience, config)
    assert float(stats["ppo/policy/approxkl"]) < 1e-10 and float(stats["ppo/policy/clipfrac"]) == 0.0
    assert float(stats["ppo/val/clipfrac"]) == 0.0


def test_shards_are_disjoint_and_equal_sized() -> None:
    items = list(range(10))
    shards = [shard_for_rank(items, rank, 3) for rank in range(3)]
    assert [len(s) for s in shards] == [3, 3, 3]
    assert sorted(sum(shards, [])) == list(range(9))


def test_one_iteration_changes_the_policy_and_logs_metrics(models: PPOModels) -> None:
    config = PPOConfig(iterations=1, rollout_batch_size=4, num_minibatches=2, ppo_epochs=1, response_length=6, learning_rate=1e-2)
    before = [p.detach().clone() for p in models.policy.parameters()]
    history = train_ppo(models, PROMPTS, config, seed=0, accelerator=Accelerator(cpu=True))
    assert len(history) == 1 and history[0]["episodes"] == 4
    assert any(not torch.equal(a, b) for a, b in zip(before, models.policy.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(models.reference.parameters(), build_tiny_gpt2(TinyModelConfig(n_layer=1, n_head=2, n_embd=16, n_positions=48), models.tokenizer, seed=0).parameters()))
