"""PPO's successors and the modern PPO options on hand-worked values (docs/design.md §4b): the critic-free advantage
estimators on one group of 4 rewards, clip-higher, dual-clip, the loss aggregations and their micro-batch weights,
decoupled GAE λ, the clamped k3 loss, critic warm-up and a rule-based reward."""

from __future__ import annotations

import math
import random

import pytest
import torch
from accelerate import Accelerator

from rlhf import advantages as estimators
from rlhf import embedded, ppo
from rlhf.config import PPOConfig, TinyModelConfig
from rlhf.modeling import build_tiny_gpt2, load_scalar_model
from rlhf.ppo_trainer.experience import add_advantages, add_critic_free_advantages, collect_experience
from rlhf.ppo_trainer.losses import micro_batch_weights
from rlhf.ppo_trainer.models import PolicyAndCritic, PolicyOnly, PPOModels
from rlhf.ppo_trainer.optimise import optimise, prepare_training
from rlhf.rollout import Experience

# One prompt's group of K = 4 rewards: mean 3, deviations (−2, −1, 0, 3), unbiased variance (4 + 1 + 0 + 9) / 3 = 14/3
GROUP = torch.tensor([1.0, 2.0, 3.0, 6.0])
STD = math.sqrt(14 / 3)  # 2.1602…


def close(actual: torch.Tensor, expected: list[float], tol: float = 1e-5) -> None:
    assert torch.allclose(actual.float(), torch.tensor(expected, dtype=torch.float32), atol=tol, rtol=0), (
        actual,
        expected,
    )


# ------------------------------------------------------------------------------------------- advantage estimators


def test_grpo_advantage_is_the_reward_minus_the_group_mean_over_the_group_std() -> None:
    # (−2, −1, 0, 3) / 2.1602 = (−0.9258, −0.4629, 0, 1.3887)
    close(estimators.grpo_advantages(GROUP, 4), [-2 / STD, -1 / STD, 0.0, 3 / STD])
    # two prompts are two groups: the second group's baseline is its own mean 11, its std √((1 + 0 + 1 + 0)/3) = 0.8165
    second = torch.tensor([10.0, 11, 12, 11])
    s = math.sqrt(2 / 3)
    close(estimators.grpo_advantages(torch.cat([GROUP, second]), 4)[4:], [-1 / s, 0.0, 1 / s, 0.0])


def test_dr_grpo_drops_the_std_division() -> None:
    close(estimators.grpo_advantages(GROUP, 4, std_normalise=False), [-2.0, -1.0, 0.0, 3.0])


def test_rloo_baseline_is_the_mean_of_the_other_three_samples() -> None:
    # r_0 − (2 + 3 + 6)/3 = 1 − 11/3 = −8/3; r_1 − 10/3 = −4/3; r_2 − 3 = 0; r_3 − 2 = 4  (= 4/3 · (r − mean))
    close(estimators.rloo_advantages(GROUP, 4), [-8 / 3, -4 / 3, 0.0, 4.0])


def test_a_group_that_scores_alike_gets_zero_advantage_and_is_flagged() -> None:
    alike = torch.tensor([0.5, 0.5, 0.5, 0.5])
    close(estimators.grpo_advantages(alike, 4), [0, 0, 0, 0])
    close(estimators.rloo_advantages(alike, 4), [0, 0, 0, 0])
    flagged = estimators.uniform_groups(torch.cat([alike, GROUP]), 4)
    assert flagged.tolist() == [True] * 4 + [False] * 4


def test_reinforce_pp_whitens_the_return_to_go_over_the_global_batch() -> None:
    # token rewards: row 0 (0, 0, 1), row 1 (0, −1) then padding. Returns-to-go (γ = 1): (1, 1, 1) and (−1, −1).
    # Over the 5 valid tokens: mean 0.2, unbiased variance (3·0.8² + 2·1.2²)/4 = 1.2 → (0.8, −1.2) / 1.0954
    rewards = torch.tensor([[0.0, 0.0, 1.0], [0.0, -1.0, 7.0]])
    mask = torch.tensor([[True, True, True], [True, True, False]])
    a, b = 0.8 / math.sqrt(1.2), -1.2 / math.sqrt(1.2)
    close(estimators.reinforce_pp_advantages(rewards, mask), [[a, a, a], [b, b, 0.0]])
    # γ = 0.5 discounts: row 0's returns are (0.25, 0.5, 1)
    returns, _ = ppo.gae_advantages(rewards, torch.zeros_like(rewards), mask, 0.5, 1.0)
    close(returns[0], [0.25, 0.5, 1.0])


def test_sequence_reward_subtracts_beta_times_the_summed_kl_of_valid_tokens() -> None:
    # 2 − 0.5 · (0.1 + 0.2 + 0.3) = 1.7; the padded position's 9.0 never counts
    kl = torch.tensor([[0.1, 0.2, 0.3, 9.0]])
    mask = torch.tensor([[True, True, True, False]])
    close(estimators.sequence_rewards(torch.tensor([2.0]), kl, mask, 0.5), [1.7])


def test_critic_free_advantages_on_a_batch_put_the_group_advantage_on_every_valid_token() -> None:
    mask = torch.tensor([[True, True], [True, False], [True, True], [True, True]])
    zeros = torch.zeros(4, 2)
    batch = Experience(
        query_ids=torch.ones(4, 1, dtype=torch.long),
        query_mask=torch.ones(4, 1, dtype=torch.long),
        responses=torch.ones(4, 2, dtype=torch.long),
        response_mask=mask,
        logprobs=zeros,
        ref_logprobs=zeros,
        values=zeros,
        scores=GROUP,
        contains_eos=torch.ones(4, dtype=torch.bool),
    )
    config = PPOConfig(algorithm="rloo", group_size=4)
    batch = add_critic_free_advantages(batch, config, kl_coef=0.1)
    close(batch.advantages, [[-8 / 3, -8 / 3], [-4 / 3, 0.0], [0.0, 0.0], [4.0, 4.0]])
    assert float(batch.returns.abs().sum()) == 0.0  # no value model, no value targets


# ------------------------------------------------------------------------------------------------ PPO's options


def test_clip_higher_lets_the_ratio_of_a_positive_advantage_rise_to_1_plus_eps_high() -> None:
    ratios = torch.tensor([1.25, 1.4, 0.7])
    advantages = torch.tensor([1.0, 1.0, -1.0])
    # symmetric ε = 0.2: min(1.25, 1.2) = 1.2; min(1.4, 1.2) = 1.2; A < 0, r = 0.7: min(−0.7, −0.8) = −0.8
    close(ppo.clipped_surrogate_objective(ratios, advantages, 0.2), [1.2, 1.2, -0.8])
    # ε_low 0.2, ε_high 0.28: 1.25 is inside (1.25); 1.4 clips at 1.28; the lower side is unchanged (−0.8)
    close(ppo.clipped_surrogate_objective(ratios, advantages, 0.2, clip_range_high=0.28), [1.25, 1.28, -0.8])


def test_dual_clip_bounds_the_objective_of_a_negative_advantage_at_c_times_a() -> None:
    ratios = torch.tensor([5.0, 2.0, 5.0])
    advantages = torch.tensor([-1.0, -1.0, 1.0])
    # A = −1, r = 5: min(−5, −1.2) = −5, max(−5, 3·(−1)) = −3 (the bound binds)
    # A = −1, r = 2: min(−2, −1.2) = −2 > −3 (no effect); A = +1, r = 5: min(5, 1.2) = 1.2 (never for A > 0)
    close(ppo.clipped_surrogate_objective(ratios, advantages, 0.2, dual_clip=3.0), [-3.0, -2.0, 1.2])
    loss, stats = ppo.policy_loss(
        ratios.log().unsqueeze(0),
        torch.zeros(1, 3),
        advantages.unsqueeze(0),
        torch.ones(1, 3, dtype=torch.bool),
        0.2,
        dual_clip=3.0,
    )
    close(loss, [-(-3.0 - 2.0 + 1.2) / 3])
    close(stats["dual_clipfrac"], [1 / 3])


VALUES = torch.tensor([[1.0, 2.0, 3.0], [4.0, 99.0, 99.0], [7.0, 7.0, 7.0]])
MASK = torch.tensor([[True, True, True], [True, False, False], [False, False, False]])  # row 2: a filtered episode


@pytest.mark.parametrize(
    ("mode", "expected"),
    [
        ("token-mean", (1 + 2 + 3 + 4) / 4),  # 2.5: every valid token weighs the same
        ("seq-mean-token-sum", (6 + 4) / 2),  # 5: mean of the per-sequence sums (the empty row is left out)
        ("seq-mean-token-mean", (2 + 4) / 2),  # 3: mean of the per-sequence means
        ("seq-mean-token-sum-norm", (6 / 4 + 4 / 4) / 2),  # 1.25: sums over the constant horizon 4 (Dr. GRPO)
    ],
)
def test_loss_aggregation_modes(mode: str, expected: float) -> None:
    close(ppo.aggregate_loss(VALUES, MASK, mode, horizon=4), [expected])


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_micro_batch_weights_make_the_accumulated_loss_the_minibatch_aggregate(mode: str) -> None:
    """accelerate divides each of G micro-batch losses by G; with the weights the sum is the whole minibatch's."""
    generator = torch.Generator().manual_seed(0)
    values = torch.randn(8, 5, generator=generator)
    lengths = torch.tensor([5, 1, 3, 2, 5, 4, 1, 2])
    mask = torch.arange(5).unsqueeze(0) < lengths.unsqueeze(1)
    config = PPOConfig(loss_aggregation=mode, gradient_accumulation_steps=4, response_length=5)
    units = (ppo.loss_units(mask, mode), int(mask.sum()))
    total = 0.0
    for rows in torch.arange(8).split(2):
        micro = Experience(
            *(None,) * 3,
            response_mask=mask[rows],
            **dict.fromkeys(("logprobs", "ref_logprobs", "values", "scores", "contains_eos")),
        )
        policy_weight, _ = micro_batch_weights(micro, units, config, world_size=1)
        total += policy_weight / 4 * float(ppo.aggregate_loss(values[rows], mask[rows], mode, 5))
    assert total == pytest.approx(float(ppo.aggregate_loss(values, mask, mode, 5)), rel=1e-6)


def test_decoupled_lambda_gives_the_critic_monte_carlo_returns_and_the_actor_its_own_gae() -> None:
    # rewards (0, 0, 1) (score 1 at the last token, KL 0), values 0.5 each, γ = 1:
    # δ = (0, 0, 0.5). λ_critic = 1: A = (0.5, 0.5, 0.5), returns = A + V = (1, 1, 1), the Monte Carlo return.
    # λ_actor = 0.5: A = (0.125, 0.25, 0.5), then whitened.
    mask = torch.ones(1, 3, dtype=torch.bool)
    experience = Experience(
        query_ids=torch.ones(1, 1, dtype=torch.long),
        query_mask=torch.ones(1, 1, dtype=torch.long),
        responses=torch.ones(1, 3, dtype=torch.long),
        response_mask=mask,
        logprobs=torch.zeros(1, 3),
        ref_logprobs=torch.zeros(1, 3),
        values=torch.full((1, 3), 0.5),
        scores=torch.tensor([1.0]),
        contains_eos=torch.ones(1, dtype=torch.bool),
    )
    config = PPOConfig(lam=0.5, lam_critic=1.0)
    result = add_advantages(experience, config, kl_coef=0.1, all_reduce_sum=None)
    close(result.returns, [[1.0, 1.0, 1.0]])
    close(result.advantages, ppo.masked_whiten(torch.tensor([[0.125, 0.25, 0.5]]), mask).tolist())


def test_kl_loss_is_k3_clamped_at_ten() -> None:
    # log π = 0, log π_ref = −1: r = e^−1, k3 = (e^−1 − 1) + 1 = e^−1 = 0.3679; log π_ref − log π = 20: clamped to 10
    close(ppo.kl_loss_per_token(torch.tensor([0.0, -20.0]), torch.tensor([-1.0, 0.0])), [math.exp(-1), 10.0])


# --------------------------------------------------------------------------------------- on a tiny model, in-process


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory: pytest.TempPathFactory):
    rng = random.Random(0)
    tokenizer = embedded.train_tokenizer([embedded.sample_review(rng) for _ in range(200)])
    shape = TinyModelConfig(n_layer=1, n_head=2, n_embd=16, n_positions=48)
    folder = tmp_path_factory.mktemp("policy")
    build_tiny_gpt2(shape, tokenizer, seed=0).save_pretrained(folder)
    return tokenizer, shape, folder


PROMPTS = ["the plot was", "the film was", "the music was very lovely and the cast was", "the ending was"]


def test_critic_warmup_trains_the_critic_and_leaves_the_policy_and_its_optimiser_state_untouched(tiny_models) -> None:
    tokenizer, shape, folder = tiny_models
    models = PPOModels(
        policy=build_tiny_gpt2(shape, tokenizer, seed=0),
        reference=build_tiny_gpt2(shape, tokenizer, seed=0),
        critic=load_scalar_model(folder, tokenizer.pad_token_id),
        reward_model=load_scalar_model(folder, tokenizer.pad_token_id),
        reward_normalization=None,
        tokenizer=tokenizer,
        reward_rule=embedded.gold_score,
    )
    config = PPOConfig(rollout_batch_size=4, num_minibatches=2, ppo_epochs=1, response_length=8, learning_rate=1e-2)
    accelerator = Accelerator(cpu=True)
    prepared = prepare_training(models, config, accelerator)
    torch.manual_seed(0)
    batch = add_advantages(
        collect_experience(
            models, PolicyAndCritic(models.policy, models.critic), PROMPTS, config, 4, torch.device("cpu")
        ),
        config,
        kl_coef=0.1,
        all_reduce_sum=None,
    )
    policy_before = [p.detach().clone() for p in models.policy.parameters()]
    critic_before = [p.detach().clone() for p in models.critic.parameters()]
    optimise(prepared, batch, config, accelerator, torch.Generator().manual_seed(0), train_policy=False)
    assert all(torch.equal(a, b) for a, b in zip(policy_before, models.policy.parameters()))
    assert not any(p in prepared.optimizer.state for p in models.policy.parameters())  # no AdamW moments either
    assert any(not torch.equal(a, b) for a, b in zip(critic_before, models.critic.parameters()))
    optimise(prepared, batch, config, accelerator, torch.Generator().manual_seed(0), train_policy=True)
    assert any(not torch.equal(a, b) for a, b in zip(policy_before, models.policy.parameters()))


def test_a_rule_reward_scores_the_decoded_response_text_and_a_critic_free_module_has_no_values(tiny_models) -> None:
    tokenizer, shape, folder = tiny_models
    seen: list[tuple[str, str]] = []

    def rule(prompt: str, response: str) -> float:
        seen.append((prompt, response))
        return float(len(response.split()))

    models = PPOModels(
        policy=build_tiny_gpt2(shape, tokenizer, seed=0),
        reference=build_tiny_gpt2(shape, tokenizer, seed=0),
        critic=None,
        reward_model=None,
        reward_normalization=None,
        tokenizer=tokenizer,
        reward_rule=rule,
    )
    config = PPOConfig(algorithm="grpo", group_size=2, response_length=8, missing_eos_score=-3.0)
    torch.manual_seed(0)
    experience = collect_experience(models, PolicyOnly(models.policy), PROMPTS, config, 4, torch.device("cpu"))
    assert [prompt for prompt, _ in seen] == PROMPTS
    texts = tokenizer.batch_decode(
        experience.responses.masked_fill(~experience.response_mask, tokenizer.pad_token_id), skip_special_tokens=True
    )
    expected = [len(t.split()) if eos else -3.0 for t, eos in zip(texts, experience.contains_eos.tolist())]
    close(experience.scores, expected)
    assert float(experience.values.abs().sum()) == 0.0
