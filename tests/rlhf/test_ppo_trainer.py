"""The PPO loop's glue: rollout-time and train-time logprobs agree, sharding, one real iteration."""

from __future__ import annotations

import random

import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState

from rlhf import embedded
from rlhf.config import PPOConfig, TinyModelConfig
from rlhf.distributed import shard_for_rank
from rlhf.modeling import RewardNormalization, build_tiny_gpt2, load_scalar_model
from rlhf.ppo_trainer.experience import add_advantages, collect_experience
from rlhf.ppo_trainer.loop import train_ppo
from rlhf.ppo_trainer.losses import ppo_minibatch_loss
from rlhf.ppo_trainer.memory import Bf16Weights, policy_then_critic_backward
from rlhf.ppo_trainer.models import PolicyAndCritic, PPOModels


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


PROMPTS = [
    "the plot was",
    "the music was very lovely and the cast was",
    "the film was",
    "the ending was dull but the script was",
]


def test_train_time_logprobs_equal_rollout_logprobs_before_any_update(models: PPOModels) -> None:
    """At the first minibatch the new policy is the old one: ratio 1, nothing clipped, approx KL 0."""
    config = PPOConfig(response_length=8, temperature=0.7)
    trainable = PolicyAndCritic(models.policy, models.critic)
    torch.manual_seed(0)
    experience = collect_experience(
        models, trainable, PROMPTS, config, forward_batch_size=2, device=torch.device("cpu")
    )
    # reference = same weights as the policy: per-token KL exactly 0 on valid tokens
    assert torch.allclose(experience.logprobs, experience.ref_logprobs, atol=1e-6)
    experience = add_advantages(experience, config, kl_coef=0.1, all_reduce_sum=None)
    _, stats = ppo_minibatch_loss(trainable, experience, config)
    assert float(stats["ppo/policy/approxkl"]) < 1e-10 and float(stats["ppo/policy/clipfrac"]) == 0.0
    assert float(stats["ppo/val/clipfrac"]) == 0.0


def perturbed_experience(models: PPOModels, trainable: PolicyAndCritic, config: PPOConfig):
    """A rollout batch whose old log-probs and values are off the current model's (ratios ≠ 1, some clipped)."""
    torch.manual_seed(0)
    experience = collect_experience(
        models, trainable, PROMPTS, config, forward_batch_size=4, device=torch.device("cpu")
    )
    experience = add_advantages(experience, config, kl_coef=0.1, all_reduce_sum=None)
    generator = torch.Generator().manual_seed(1)
    experience.logprobs = (
        experience.logprobs
        + 0.3 * torch.randn(experience.logprobs.shape, generator=generator) * experience.response_mask
    )
    experience.values = (
        experience.values + 0.5 * torch.randn(experience.values.shape, generator=generator) * experience.response_mask
    )
    return experience


def test_policy_then_critic_backward_gives_the_joint_backwards_gradients_and_statistics(models: PPOModels) -> None:
    """Two backwards (policy, then critic) over disjoint parameters: the same gradients, bit for bit, as one."""
    config = PPOConfig(
        response_length=8, temperature=0.7, ent_coef=0.01, vf_coef=0.3, clip_range=0.1, clip_range_value=0.1
    )
    trainable = PolicyAndCritic(models.policy, models.critic)
    assert trainable.lean
    experience = perturbed_experience(models, trainable, config)
    trainable.zero_grad(set_to_none=True)
    loss, joint_stats = ppo_minibatch_loss(trainable, experience, config)
    (loss * 0.7).backward()
    joint = {name: p.grad.clone() for name, p in trainable.named_parameters()}
    trainable.zero_grad(set_to_none=True)
    stats = policy_then_critic_backward(trainable, experience, config, (0.7, 0.7), Accelerator(cpu=True), None)
    assert float(joint_stats["ppo/policy/clipfrac"]) > 0 and float(joint_stats["ppo/val/clipfrac"]) > 0
    assert stats.keys() == joint_stats.keys()
    for name, value in joint_stats.items():
        assert torch.allclose(stats[name], value, rtol=1e-6, atol=0), name
    for name, parameter in trainable.named_parameters():
        assert torch.equal(parameter.grad, joint[name]), name
    trainable.zero_grad(set_to_none=True)


def test_policy_then_critic_backward_casts_one_model_at_a_time_under_bf16_weights(models: PPOModels) -> None:
    """While the policy runs, the critic holds its fp32 masters (and vice versa); all fp32 again afterwards."""
    config = PPOConfig(response_length=8, temperature=0.7)
    trainable = PolicyAndCritic(models.policy, models.critic)
    experience = perturbed_experience(models, trainable, config)
    weights = Bf16Weights(trainable)
    seen = []  # at each model's embedding lookup: which model, and the dtypes the policy and the critic hold

    def record(name):
        dtypes = lambda model: {p.dtype for p in model.parameters()}  # noqa: E731
        return lambda module, args: seen.append((name, dtypes(trainable.policy), dtypes(trainable.critic)))

    handles = [
        trainable.policy.transformer.wte.register_forward_pre_hook(record("policy")),
        trainable.critic.transformer.wte.register_forward_pre_hook(record("critic")),
    ]
    AcceleratorState._reset_state(reset_partial_state=True)  # one process-wide state: this test's precision is bf16
    try:
        stats = policy_then_critic_backward(
            trainable, experience, config, (1.0, 1.0), Accelerator(cpu=True, mixed_precision="bf16"), weights
        )
    finally:
        for handle in handles:
            handle.remove()
        AcceleratorState._reset_state(reset_partial_state=True)
    assert seen == [("policy", {torch.bfloat16}, {torch.float32}), ("critic", {torch.float32}, {torch.bfloat16})]
    assert all(p.dtype == torch.float32 and p.grad.dtype == torch.bfloat16 for p in trainable.parameters())
    assert torch.isfinite(stats["ppo/loss/total"]) and stats["ppo/loss/total"].dtype == torch.float32
    trainable.zero_grad(set_to_none=True)


def test_shards_are_disjoint_and_equal_sized() -> None:
    items = list(range(10))
    shards = [shard_for_rank(items, rank, 3) for rank in range(3)]
    assert [len(s) for s in shards] == [3, 3, 3]
    assert sorted(sum(shards, [])) == list(range(9))


def test_one_iteration_changes_the_policy_and_logs_metrics(models: PPOModels) -> None:
    config = PPOConfig(
        iterations=1, rollout_batch_size=4, num_minibatches=2, ppo_epochs=1, response_length=6, learning_rate=1e-2
    )
    before = [p.detach().clone() for p in models.policy.parameters()]
    history = train_ppo(models, PROMPTS, config, seed=0, accelerator=Accelerator(cpu=True))
    assert len(history) == 1 and history[0]["episodes"] == 4
    assert any(not torch.equal(a, b) for a, b in zip(before, models.policy.parameters()))
    assert all(
        torch.equal(a, b)
        for a, b in zip(
            models.reference.parameters(),
            build_tiny_gpt2(
                TinyModelConfig(n_layer=1, n_head=2, n_embd=16, n_positions=48), models.tokenizer, seed=0
            ).parameters(),
        )
    )
