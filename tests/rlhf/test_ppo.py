"""Unit tests for rlhf.ppo: every expected number is worked out by hand in the comment beside it."""

from __future__ import annotations

import math
import threading

import pytest
import torch

from rlhf.ppo import (
    AdaptiveKLController,
    FixedKLController,
    clipped_surrogate_objective,
    compute_rewards,
    entropy_from_logits,
    first_true_index,
    gae_advantages,
    kl_per_token,
    last_token_index,
    logprobs_from_logits,
    make_kl_controller,
    masked_mean,
    masked_sum,
    masked_var,
    masked_whiten,
    policy_loss,
    truncate_after_stop_token,
    value_loss,
)

PAD = 1e6  # garbage at padded positions: must never reach a result


def close(actual: torch.Tensor, expected, atol: float = 1e-5) -> None:
    torch.testing.assert_close(actual, torch.as_tensor(expected, dtype=actual.dtype), atol=atol, rtol=0)


# --- clipped surrogate and policy loss (docs/design.md §4.1) -----------------------------------------------------

# The three seed cases, ε = 0.2:
#   A = +1.5, r = 1.5: min(2.25, 1.2·1.5 = 1.80) = 1.80   (clipped term active)
#   A = +1.5, r = 1.1: min(1.65, 1.1·1.5 = 1.65) = 1.65   (inside the clip range)
#   A = −0.8, r = 1.5: min(−1.20, 1.2·−0.8 = −0.96) = −1.20 (unclipped term is the pessimistic one)
RATIOS = torch.tensor([1.5, 1.1, 1.5])
ADVANTAGES = torch.tensor([1.5, 1.5, -0.8])


def test_clipped_surrogate_objective_seed_cases():
    close(clipped_surrogate_objective(RATIOS, ADVANTAGES, clip_range=0.2), [1.80, 1.65, -1.20])


def test_policy_loss_is_negated_masked_mean_with_stats_and_gradients():
    # One row of the three seed cases plus a padded position holding garbage.
    old = torch.zeros(1, 4)
    logprobs = torch.cat([RATIOS.log(), torch.tensor([PAD])]).unsqueeze(0).requires_grad_()
    advantages = torch.cat([ADVANTAGES, torch.tensor([PAD])]).unsqueeze(0)
    mask = torch.tensor([[True, True, True, False]])
    loss, stats = policy_loss(logprobs, old, advantages, mask, clip_range=0.2)
    # loss = −(1.80 + 1.65 − 1.20) / 3 = −0.75: a loss to minimise, so higher objective → lower loss.
    close(loss, -0.75)
    # Only case 1 has the clipped term strictly active: clipfrac = 1/3.
    close(stats["clipfrac"], 1 / 3)
    # approxkl = 0.5·mean(ln²1.5, ln²1.1, ln²1.5) = 0.5·(0.164402 + 0.009084 + 0.164402)/3 = 0.0563147
    close(stats["approxkl"], 0.0563147)
    # ratio_mean = (1.5 + 1.1 + 1.5)/3 = 1.366667
    close(stats["ratio_mean"], 4.1 / 3)
    assert all(not v.requires_grad for v in stats.values())
    loss.backward()
    # d loss / d log π = −(A·r)/3 where the unclipped term is active, 0 where clipped or padded: case 1
    # clipped → 0; case 2 → −1.5·1.1/3 = −0.55; case 3 → +0.8·1.5/3 = +0.40; pad → 0 (and not nan).
    close(logprobs.grad, [[0.0, -0.55, 0.40, 0.0]])


# --- value loss (docs/design.md §4.2) ----------------------------------------------------------------------------


def test_value_loss_takes_the_larger_of_clipped_and_unclipped_error():
    # V_old = 0, ε_v = 0.2.
    #   V = 0.5, R = 1: unclipped (0.5−1)² = 0.25; clip(V) = 0.2 → (0.2−1)² = 0.64 → 0.64 (clipped larger)
    #   V = −0.5, R = 0: unclipped 0.25; clip(V) = −0.2 → 0.04 → 0.25 (clipped smaller)
    #   V = 0.1, R = 0: inside the range, both 0.01
    #   4th position is padding with garbage.
    values = torch.tensor([[0.5, -0.5, 0.1, PAD]], requires_grad=True)
    old_values = torch.zeros(1, 4)
    returns = torch.tensor([[1.0, 0.0, 0.0, -PAD]])
    mask = torch.tensor([[True, True, True, False]])
    loss, stats = value_loss(values, old_values, returns, mask, clip_range_value=0.2)
    # 0.5·(0.64 + 0.25 + 0.01)/3 = 0.15
    close(loss, 0.15)
    close(stats["clipfrac"], 1 / 3)
    # mean_value = (0.5 − 0.5 + 0.1)/3
    close(stats["mean_value"], 0.1 / 3)
    loss.backward()
    # Clipped term active in case 1 → no gradient; case 2: 0.5·2·(−0.5)/3 = −1/6; case 3: 0.5·2·0.1/3 = 1/30.
    close(values.grad, [[0.0, -1 / 6, 1 / 30, 0.0]])


# --- GAE (docs/design.md §4.3) -----------------------------------------------------------------------------------

REWARDS = torch.tensor([[0.0, 0.0, 1.0]])
VALUES = torch.tensor([[0.5, 0.2, 0.4]])


def test_gae_gamma_one_lambda_half():
    # γ = 1, λ = 0.5, value after the last token = 0:
    #   t=2: δ = 1 + 0 − 0.4 = 0.6;   A = 0.6
    #   t=1: δ = 0 + 0.4 − 0.2 = 0.2; A = 0.2 + 0.5·0.6 = 0.5
    #   t=0: δ = 0 + 0.2 − 0.5 = −0.3; A = −0.3 + 0.5·0.5 = −0.05
    # returns = A + V = [0.45, 0.7, 1.0]
    advantages, returns = gae_advantages(REWARDS, VALUES, torch.ones(1, 3, dtype=torch.bool), gamma=1.0, lam=0.5)
    close(advantages, [[-0.05, 0.5, 0.6]])
    close(returns, [[0.45, 0.7, 1.0]])


def test_gae_discounted():
    # γ = 0.9, λ = 0.5 (γλ = 0.45):
    #   t=2: δ = 1 − 0.4 = 0.6;               A = 0.6
    #   t=1: δ = 0.9·0.4 − 0.2 = 0.16;        A = 0.16 + 0.45·0.6 = 0.43
    #   t=0: δ = 0.9·0.2 − 0.5 = −0.32;       A = −0.32 + 0.45·0.43 = −0.1265
    advantages, returns = gae_advantages(REWARDS, VALUES, torch.ones(1, 3, dtype=torch.bool), gamma=0.9, lam=0.5)
    close(advantages, [[-0.1265, 0.43, 0.6]])
    close(returns, [[0.3735, 0.63, 1.0]])


def test_gae_lambda_one_is_return_minus_value():
    # γ = λ = 1: A_t = Σ_{k≥t} r_k − V_t = [1 − 0.5, 1 − 0.2, 1 − 0.4]
    advantages, _ = gae_advantages(REWARDS, VALUES, torch.ones(1, 3, dtype=torch.bool), gamma=1.0, lam=1.0)
    close(advantages, [[0.5, 0.8, 0.6]])


def test_gae_padding_gets_zero_and_does_not_leak():
    # Row 0: the hand case above followed by two pads full of garbage; row 1: a single token (r = 2, V = 0.5,
    # so A = 2 − 0.5 = 1.5, return 2) then pads. Both batched together.
    rewards = torch.tensor([[0.0, 0.0, 1.0, PAD, PAD], [2.0, PAD, PAD, PAD, PAD]])
    values = torch.tensor([[0.5, 0.2, 0.4, PAD, -PAD], [0.5, PAD, -PAD, PAD, PAD]])
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 0, 0, 0, 0]], dtype=torch.bool)
    advantages, returns = gae_advantages(rewards, values, mask, gamma=1.0, lam=0.5)
    close(advantages, [[-0.05, 0.5, 0.6, 0.0, 0.0], [1.5, 0.0, 0.0, 0.0, 0.0]])
    close(returns, [[0.45, 0.7, 1.0, 0.0, 0.0], [2.0, 0.0, 0.0, 0.0, 0.0]])


# --- masked statistics and whitening (docs/design.md §4.3, §4.6) -------------------------------------------------

# Left-padding-like masks: the valid values are 1..7, the padded slots hold 1e6.
STAT_VALUES = torch.tensor([[PAD, PAD, 1.0, 2.0, 3.0], [PAD, 4.0, 5.0, 6.0, 7.0]])
STAT_MASK = torch.tensor([[0, 0, 1, 1, 1], [0, 1, 1, 1, 1]], dtype=torch.bool)


def test_masked_sum_and_mean_ignore_padding():
    close(masked_sum(STAT_VALUES, STAT_MASK), 28.0)  # 1 + … + 7
    close(masked_sum(STAT_VALUES, STAT_MASK, dim=-1), [6.0, 22.0])
    close(masked_mean(STAT_VALUES, STAT_MASK), 4.0)  # 28 / 7
    close(masked_mean(STAT_VALUES, STAT_MASK, dim=-1), [2.0, 5.5])  # 6/3, 22/4
    # An all-masked row averages to 0, not nan; inf in padding does not turn into nan.
    close(masked_mean(torch.tensor([[math.inf, 1.0]]), torch.tensor([[False, False]]), dim=-1), [0.0])


def test_masked_var_ignores_padding():
    # Squared deviations from 4: 9 + 4 + 1 + 0 + 1 + 4 + 9 = 28 → unbiased 28/6, biased 28/7.
    close(masked_var(STAT_VALUES, STAT_MASK), 28 / 6)
    close(masked_var(STAT_VALUES, STAT_MASK, unbiased=False), 4.0)


def test_masked_whiten_ignores_padding():
    whitened = masked_whiten(STAT_VALUES, STAT_MASK)
    std = math.sqrt(28 / 6)
    expected = torch.tensor([[0.0, 0.0, -3.0, -2.0, -1.0], [0.0, 0.0, 1.0, 2.0, 3.0]]) / std
    close(whitened, expected)
    # shift_mean=False only rescales: (x − 4)/std + 4 at valid positions, pads still 0.
    close(masked_whiten(STAT_VALUES, STAT_MASK, shift_mean=False), torch.where(STAT_MASK, expected + 4.0, 0.0))


class SimulatedAllReduce:
    """Two "processes" as threads: each call blocks until every rank has contributed, then returns the sum.

    Behaves like ``accelerator.reduce(x, "sum")`` whatever sequence of collectives the caller makes.
    """

    def __init__(self, world_size: int) -> None:
        self.barrier = threading.Barrier(world_size, timeout=5)
        self.contributions: list[torch.Tensor | None] = [None] * world_size

    def for_rank(self, rank: int):
        def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
            self.contributions[rank] = tensor.clone()
            self.barrier.wait()
            total = sum(self.contributions)
            self.barrier.wait()  # nobody overwrites a slot before every rank has read it
            return total

        return all_reduce_sum


def run_on_two_ranks(function, shards):
    """Run ``function(shard, all_reduce_sum)`` on two threads and return the per-rank results."""
    reduce = SimulatedAllReduce(world_size=2)
    results: list = [None, None]

    def worker(rank: int) -> None:
        results[rank] = function(shards[rank], reduce.for_rank(rank))

    threads = [threading.Thread(target=worker, args=(rank,)) for rank in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results


def test_whitening_statistics_are_global_across_processes():
    # Rank 0 holds row 0 (valid 1, 2, 3), rank 1 holds row 1 (valid 4..7): unequal token counts on purpose.
    # Global mean is 4 (not the per-rank 2 and 5.5), so each rank must match its slice of the global whitening.
    shards = [(STAT_VALUES[:1], STAT_MASK[:1]), (STAT_VALUES[1:], STAT_MASK[1:])]
    whitened = run_on_two_ranks(lambda shard, reduce: masked_whiten(*shard, all_reduce_sum=reduce), shards)
    close(torch.cat(whitened), masked_whiten(STAT_VALUES, STAT_MASK))
    means = run_on_two_ranks(lambda shard, reduce: masked_mean(*shard, all_reduce_sum=reduce), shards)
    close(torch.stack(means), [4.0, 4.0])
    variances = run_on_two_ranks(lambda shard, reduce: masked_var(*shard, all_reduce_sum=reduce), shards)
    close(torch.stack(variances), [28 / 6, 28 / 6])


def test_masked_mean_all_reduce_needs_a_scalar_reduction():
    with pytest.raises(ValueError):
        masked_mean(STAT_VALUES, STAT_MASK, dim=-1, all_reduce_sum=lambda x: x)


# --- log-probs and entropy (docs/design.md §4.6) -----------------------------------------------------------------


def test_logprobs_divide_logits_by_temperature():
    # Logits [ln 9, 0]. T = 1: p = [9/10, 1/10]. T = 2: logits [ln 3, 0] → p = [3/4, 1/4].
    logits = torch.tensor([[[math.log(9.0), 0.0], [math.log(9.0), 0.0]]])
    tokens = torch.tensor([[0, 1]])
    close(logprobs_from_logits(logits, tokens), [[math.log(0.9), math.log(0.1)]])
    close(logprobs_from_logits(logits, tokens, temperature=2.0), [[math.log(0.75), math.log(0.25)]])
    with pytest.raises(ValueError):
        logprobs_from_logits(logits, tokens, temperature=0.0)


def test_logprobs_match_naive_softmax():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 5, generator=generator)
    tokens = torch.randint(0, 5, (2, 3), generator=generator)
    naive = torch.softmax(logits / 0.7, dim=-1).log().gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    close(logprobs_from_logits(logits, tokens, temperature=0.7), naive)


def test_entropy_from_logits():
    # Logits [ln 4, ln 2, 0] → p = [4/7, 2/7, 1/7];
    # H = −Σ p ln p = ln 7 − (4/7·2 ln 2 + 2/7·ln 2) = ln 7 − (10/7) ln 2 = 1.945910 − 0.990210 = 0.955700
    logits = torch.tensor([[[math.log(4.0), math.log(2.0), 0.0]]])
    close(entropy_from_logits(logits), [[0.955700]])
    # Logits [ln 9, 0] at T = 2 → p = [3/4, 1/4]: H = −(0.75 ln 0.75 + 0.25 ln 0.25) = 0.562335
    close(entropy_from_logits(torch.tensor([[[math.log(9.0), 0.0]]]), temperature=2.0), [[0.562335]])
    # A banned token (−inf) contributes 0: uniform over the other two → ln 2, with a finite gradient.
    banned = torch.tensor([[[0.0, 0.0, -math.inf]]], requires_grad=True)
    entropy = entropy_from_logits(banned)
    close(entropy, [[math.log(2.0)]])
    entropy.sum().backward()
    assert torch.isfinite(banned.grad).all()


# --- KL estimators (docs/design.md §4.4) -------------------------------------------------------------------------


def test_kl_k1_and_k3_hand_values():
    # π = 0.5, π_ref = 0.25: k1 = ln 2 = 0.693147; r = 0.25/0.5 = 0.5 → k3 = (0.5 − 1) − ln 0.5 = 0.193147
    # π = 0.25, π_ref = 0.5: k1 = −ln 2 (negative); r = 2 → k3 = (2 − 1) − ln 2 = 0.306853
    # π = π_ref: both 0.
    logprobs = torch.tensor([[math.log(0.5), math.log(0.25), math.log(0.3)]])
    ref_logprobs = torch.tensor([[math.log(0.25), math.log(0.5), math.log(0.3)]])
    close(kl_per_token(logprobs, ref_logprobs, "k1"), [[0.693147, -0.693147, 0.0]])
    close(kl_per_token(logprobs, ref_logprobs, "k3"), [[0.193147, 0.306853, 0.0]])
    with pytest.raises(ValueError):
        kl_per_token(logprobs, ref_logprobs, "k2")  # type: ignore[arg-type]


def test_k3_is_never_negative():
    generator = torch.Generator().manual_seed(0)
    logprobs, ref_logprobs = -3 * torch.rand(2, 64, 32, generator=generator)
    assert (kl_per_token(logprobs, ref_logprobs, "k3") >= 0).all()
    assert (kl_per_token(logprobs, ref_logprobs, "k1") < 0).any()


# --- KL controllers (docs/design.md §4.4) ------------------------------------------------------------------------


def test_adaptive_kl_controller_hand_updates():
    controller = AdaptiveKLController(init_kl_coef=0.1, target=6.0, horizon=10_000)
    # KL 9: e = 9/6 − 1 = 0.5 → clipped to 0.2; β = 0.1·(1 + 0.2·100/10000) = 0.1002
    controller.update(current_kl=9.0, n_steps=100)
    assert controller.value == pytest.approx(0.1002)
    # KL 3: e = −0.5 → clipped to −0.2; β = 0.1002·(1 − 0.2·1000/10000) = 0.1002·0.98 = 0.098196
    controller.update(current_kl=3.0, n_steps=1000)
    assert controller.value == pytest.approx(0.098196)
    # KL 6.6: e = 0.1 (inside the clip); β = 0.098196·(1 + 0.1·500/10000) = 0.098196·1.005 = 0.09868698
    controller.update(current_kl=6.6, n_steps=500)
    assert controller.value == pytest.approx(0.09868698)


def test_fixed_kl_controller_and_factory():
    fixed = make_kl_controller(0.05, adaptive=False, target=6.0, horizon=10_000)
    assert isinstance(fixed, FixedKLController)
    fixed.update(current_kl=100.0, n_steps=1000)
    assert fixed.value == 0.05
    adaptive = make_kl_controller(0.05, adaptive=True, target=6.0, horizon=10_000)
    assert isinstance(adaptive, AdaptiveKLController) and adaptive.value == 0.05


# --- stop tokens, positions and rewards (docs/design.md §4.4, §4.5) ----------------------------------------------

EOS, PAD_ID = 2, 0


def test_first_true_index():
    bools = torch.tensor([[False, True, True], [False, False, False], [True, False, False]])
    close(first_true_index(bools), [1, 3, 0])  # none → size of dim (3)
    close(first_true_index(bools, dim=0), [2, 0, 0])


def test_truncate_after_stop_token():
    responses = torch.tensor([[3, EOS, 5, EOS], [3, 4, 5, 6], [EOS, 5, 6, 7]])
    truncated, mask, contains_stop = truncate_after_stop_token(responses, EOS, PAD_ID)
    # Row 0: everything after the FIRST EOS becomes pad; the EOS itself stays valid.
    # Row 1: no EOS → untouched, all valid. Row 2: EOS first → only it is valid.
    close(truncated, [[3, EOS, PAD_ID, PAD_ID], [3, 4, 5, 6], [EOS, PAD_ID, PAD_ID, PAD_ID]])
    close(mask, [[True, True, False, False], [True, True, True, True], [True, False, False, False]])
    close(contains_stop, [True, False, True])


def test_last_token_index():
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0], [0, 1, 1, 0]], dtype=torch.bool)
    close(last_token_index(mask), [1, 3, -1, 2])


def test_score_lands_on_the_eos_not_the_pad_after_it():
    # Row 0: EOS at position 1, then pads; row 1: no EOS, all three tokens valid.
    _, mask, _ = truncate_after_stop_token(torch.tensor([[7, EOS, 9], [7, 8, 9]]), EOS, PAD_ID)
    scores = torch.tensor([2.0, -1.0])
    # k1 = logp − ref: row 0 [0.5, −0.2, garbage], row 1 [0.1, 0.1, 0.3]; β = 0.1 →
    #   non-score reward row 0 [−0.05, 0.02, 0], row 1 [−0.01, −0.01, −0.03]
    #   rewards row 0 [−0.05, 0.02 + 2, 0], row 1 [−0.01, −0.01, −0.03 − 1]
    logprobs = torch.tensor([[0.5, -0.2, PAD], [0.1, 0.1, 0.3]])
    ref_logprobs = torch.zeros(2, 3)
    rewards, kl, non_score_reward = compute_rewards(scores, logprobs, ref_logprobs, mask, kl_coef=0.1)
    close(kl, [[0.5, -0.2, 0.0], [0.1, 0.1, 0.3]])
    close(non_score_reward, [[-0.05, 0.02, 0.0], [-0.01, -0.01, -0.03]])
    close(rewards, [[-0.05, 2.02, 0.0], [-0.01, -0.01, -1.03]])


def test_compute_rewards_k3_and_empty_row():
    # k3 of logp = ln 0.5, ref = ln 0.25 is 0.193147 (see the KL test); β = 1; score 3 on the only token.
    # A row with no valid token gets nothing (the score must not wrap round to the last column).
    logprobs = torch.tensor([[math.log(0.5), 0.0], [0.0, 0.0]])
    ref_logprobs = torch.tensor([[math.log(0.25), 0.0], [0.0, 0.0]])
    mask = torch.tensor([[True, False], [False, False]])
    rewards, _, _ = compute_rewards(torch.tensor([3.0, 5.0]), logprobs, ref_logprobs, mask, 1.0, "k3")
    close(rewards, [[3.0 - 0.193147, 0.0], [0.0, 0.0]])
