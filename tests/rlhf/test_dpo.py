"""DPO: the math of rlhf.dpo on hand-worked values (the arithmetic beside each number), and the loop
rlhf.dpo_training.train_dpo on a tiny model in this process."""

from __future__ import annotations

import math

import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from support import tiny_gpt2_config
from transformers import GPT2LMHeadModel

from rlhf.config import DPOConfig
from rlhf.dpo import (
    implicit_rewards,
    ipo_loss,
    pair_losses,
    preference_logratio,
    preference_stats,
    response_mask,
    sequence_logprobs,
    sigmoid_loss,
)
from rlhf.dpo_training import DPO_EVAL_STATS, DPO_STATS, dpo_examples, dpo_snapshot_steps, pair_logprobs, train_dpo
from rlhf.modeling import causal_lm_logits
from rlhf.training import TrainedForward


def close(actual: torch.Tensor, expected, atol: float = 1e-6) -> None:
    torch.testing.assert_close(actual, torch.as_tensor(expected, dtype=actual.dtype), atol=atol, rtol=0)


# --- sequence log-probs: the response only, EOS included, padding never --------------------------------------


def test_response_mask_starts_at_the_prompt_length_and_stops_at_padding():
    attention = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])
    mask = response_mask(attention, torch.tensor([2, 1]))
    assert mask.tolist() == [[False, False, True, True], [False, True, True, False]]


def log_of(*probabilities: float) -> list[float]:
    return [math.log(p) for p in probabilities]


def test_sequence_logprobs_sum_the_response_tokens_and_skip_the_prompt_and_padding():
    # vocabulary {0, 1, 2}; logits are log-probabilities, so log_softmax returns them unchanged.
    # row 0: ids [0, 1, 2, 1], prompt 2 tokens, no padding. Response = tokens 2 (position 2) and 1 (position 3, EOS),
    #   predicted by positions 1 and 2: log 0.5 + log 0.25 = log 0.125 = −2.0794415. Position 0 predicts the prompt
    #   token 1 with p = 0.1 (log 0.1 = −2.30 if it were wrongly counted); position 3 predicts nothing.
    # row 1: ids [0, 2, 1, 0], prompt 1 token, position 3 is padding. Response = tokens 2 (position 1) and 1
    #   (position 2), predicted by positions 0 and 1: log 0.6 + log 0.8 = log 0.48 = −0.7339692. Position 2 predicts
    #   the pad with log-prob ≈ −1e4, which would swamp the sum if it counted.
    logits = torch.tensor(
        [
            [log_of(0.1, 0.1, 0.8), log_of(0.2, 0.3, 0.5), log_of(0.25, 0.25, 0.5), [9.0, 9.0, 9.0]],
            [log_of(0.2, 0.2, 0.6), log_of(0.1, 0.8, 0.1), [-1e4, 0.0, 0.0], [9.0, 9.0, 9.0]],
        ]
    )
    ids = torch.tensor([[0, 1, 2, 1], [0, 2, 1, 0]])
    mask = response_mask(torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]]), torch.tensor([2, 1]))
    close(sequence_logprobs(logits, ids, mask), [math.log(0.125), math.log(0.48)], atol=1e-5)


# --- losses --------------------------------------------------------------------------------------------------------

# Three pairs (log π(c), log π(r), log π_ref(c), log π_ref(r)):
#   pair 0: (−3, −5, −4, −4) → h = (−3 + 4) − (−5 + 4) = 1 − (−1) = +2
#   pair 1: (−6, −2, −4, −4) → h = (−6 + 4) − (−2 + 4) = −2 − 2 = −4
#   pair 2: (−4, −4, −4, −4) → h = 0 (the policy is the reference)
POLICY_CHOSEN = torch.tensor([-3.0, -6.0, -4.0])
POLICY_REJECTED = torch.tensor([-5.0, -2.0, -4.0])
REFERENCE = torch.tensor([-4.0, -4.0, -4.0])


def test_preference_logratio_is_the_difference_of_the_two_log_ratios():
    close(preference_logratio(POLICY_CHOSEN, POLICY_REJECTED, REFERENCE, REFERENCE), [2.0, -4.0, 0.0])


def test_sigmoid_loss_is_minus_log_sigmoid_of_beta_h():
    # β = 0.5: β·h = 1, −2, 0 → −log σ(1) = log(1 + e^−1) = 0.3132617; −log σ(−2) = log(1 + e²) = 2.1269280;
    # −log σ(0) = log 2 = 0.6931472
    close(sigmoid_loss(torch.tensor([2.0, -4.0, 0.0]), beta=0.5), [0.3132617, 2.1269280, 0.6931472])


def test_conservative_dpo_mixes_in_the_flipped_label():
    # ε = 0.25, β·h = 1: 0.75·(−log σ(1)) + 0.25·(−log σ(−1)) = 0.75·0.3132617 + 0.25·1.3132617 = 0.5632617
    # (= −log σ(x) + ε·x, since log σ(−x) = log σ(x) − x); β·h = 0: 0.75·log 2 + 0.25·log 2 = log 2 = 0.6931472
    close(sigmoid_loss(torch.tensor([2.0, 0.0]), beta=0.5, label_smoothing=0.25), [0.5632617, 0.6931472])


def test_ipo_loss_regresses_h_on_one_over_two_beta():
    # β = 0.5 → target 1/(2·0.5) = 1: (2 − 1)² = 1; (−4 − 1)² = 25; (0 − 1)² = 1
    close(ipo_loss(torch.tensor([2.0, -4.0, 0.0]), beta=0.5), [1.0, 25.0, 1.0])
    # β = 0.1 → target 5: (2 − 5)² = 9
    close(ipo_loss(torch.tensor([2.0]), beta=0.1), [9.0])


def test_pair_losses_dispatch_on_dpo_loss_and_refuse_the_rest():
    h = torch.tensor([2.0])
    close(pair_losses(h, "sigmoid", 0.5), [0.3132617])
    close(pair_losses(h, "sigmoid", 0.5, label_smoothing=0.25), [0.5632617])
    close(pair_losses(h, "ipo", 0.5), [1.0])
    with pytest.raises(ValueError, match="dpo.loss"):
        pair_losses(h, "hinge", 0.5)
    with pytest.raises(ValueError, match="dpo.label_smoothing"):
        pair_losses(h, "ipo", 0.5, label_smoothing=0.1)


def test_sigmoid_loss_is_finite_with_finite_gradients_far_into_either_tail():
    # β·h = ±1000: σ(−1000) underflows to 0 in float32, so log(σ(·)) would be −inf; logsigmoid gives
    # −log σ(−1000) = 1000 and −log σ(1000) = log(1 + e^−1000) ≈ 0, with gradients −1 and ≈ 0
    h = torch.tensor([-1000.0, 1000.0], requires_grad=True)
    loss = sigmoid_loss(h, beta=1.0)
    close(loss.detach(), [1000.0, 0.0])
    loss.sum().backward()
    close(h.grad, [-1.0, 0.0])


# --- statistics ----------------------------------------------------------------------------------------------------


def test_implicit_rewards_and_preference_stats():
    # β = 0.5. Implicit rewards β·(log π − log π_ref):
    #   chosen   0.5·(−3 + 4) = +0.5, 0.5·(−6 + 4) = −1, 0 → mean (0.5 − 1 + 0)/3 = −1/6
    #   rejected 0.5·(−5 + 4) = −0.5, 0.5·(−2 + 4) = +1, 0 → mean (−0.5 + 1 + 0)/3 = +1/6
    #   margins  +1, −2, 0 → mean −1/3; accuracy: only pair 0 is strictly positive (the tie is no success) → 1/3
    close(implicit_rewards(POLICY_CHOSEN, REFERENCE, 0.5), [0.5, -1.0, 0.0])
    stats = preference_stats(POLICY_CHOSEN, POLICY_REJECTED, REFERENCE, REFERENCE, beta=0.5)
    assert stats.keys() == {"rewards/chosen", "rewards/rejected", "rewards/margin", "accuracy"}
    close(stats["rewards/chosen"], -1 / 6)
    close(stats["rewards/rejected"], 1 / 6)
    close(stats["rewards/margin"], -1 / 3)
    close(stats["accuracy"], 1 / 3)


# --- one gradient step on a tiny model -----------------------------------------------------------------------------


def test_snapshot_steps_are_every_n_and_the_last():
    assert dpo_snapshot_steps(50, 168) == {50, 100, 150, 168}
    assert dpo_snapshot_steps(4, 8) == {4, 8}
    assert dpo_snapshot_steps(0, 8) == {8}  # 0: only the final policy


@pytest.fixture
def word_tokenizer():
    """Word-level tokenizer: <pad> 0, <eos> 1 (as tiny_gpt2_config), then the review words."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<eos>", "<unk>", "the", "plot", "music", "was", "lovely", "dull", "good", "bad", "."]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


PAIRS = [
    {"prompt": "the plot was", "chosen": " lovely .", "rejected": " dull ."},
    {"prompt": "the music was", "chosen": " good .", "rejected": " bad . the plot was bad ."},
    {"prompt": "the plot", "chosen": " was good .", "rejected": " was bad ."},
    {"prompt": "the music", "chosen": " was lovely .", "rejected": " was dull ."},
]


def tiny_policy() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    return GPT2LMHeadModel(tiny_gpt2_config()).eval()


@pytest.mark.parametrize(("loss", "label_smoothing"), [("sigmoid", 0.0), ("sigmoid", 0.2), ("ipo", 0.0)])
def test_a_gradient_step_widens_the_margin_between_chosen_and_rejected(word_tokenizer, loss, label_smoothing):
    # At the start π = π_ref, so h = 0 for every pair; one small SGD step on the mean loss moves the mean h up
    # (to first order by lr·c·‖Σ∇h‖²/n with c > 0 for all three losses at h = 0).
    model, examples = tiny_policy(), dpo_examples(word_tokenizer, PAIRS)
    forward = TrainedForward(model, causal_lm_logits)  # the module train_dpo trains
    with torch.no_grad():
        reference = pair_logprobs(forward, examples, word_tokenizer.pad_token_id)
    chosen, rejected = pair_logprobs(forward, examples, word_tokenizer.pad_token_id)
    before = preference_logratio(chosen, rejected, *reference)
    close(before.detach(), [0.0] * 4)
    pair_losses(before, loss, 0.1, label_smoothing).mean().backward()
    torch.optim.SGD(model.parameters(), lr=0.05).step()
    with torch.no_grad():
        after = preference_logratio(*pair_logprobs(forward, examples, word_tokenizer.pad_token_id), *reference)
    assert float(after.mean()) > 1e-3


@pytest.fixture
def accelerator():
    AcceleratorState._reset_state(reset_partial_state=True)  # one process-wide state: this test's is plain CPU
    yield Accelerator(cpu=True)
    AcceleratorState._reset_state(reset_partial_state=True)


def run_train_dpo(tokenizer, accelerator, **config) -> tuple[GPT2LMHeadModel, list[dict], list[int]]:
    snapshots: list[int] = []
    settings = dict(batch_size=4, epochs=6, learning_rate=3e-3, warmup_steps=1, snapshot_every=4) | config
    model, history = train_dpo(
        tiny_policy(),
        tokenizer,
        DPOConfig(**settings),
        seed=7,
        train_rows=PAIRS,
        eval_rows=PAIRS[:2],
        accelerator=accelerator,
        on_snapshot=lambda step, prepared: snapshots.append(step),
    )
    return model, history, snapshots


def test_train_dpo_raises_the_margin_and_logs_each_step(word_tokenizer, accelerator):
    # 4 pairs, batch 4 → 1 step per epoch, 6 epochs → 6 steps; snapshots (and held-out stats) after steps 4 and 6
    model, history, snapshots = run_train_dpo(word_tokenizer, accelerator)
    assert [row["step"] for row in history] == [1, 2, 3, 4, 5, 6] and snapshots == [4, 6]
    assert set(DPO_STATS + DPO_EVAL_STATS) <= set(history[0])
    assert history[0]["eval/accuracy"] is None and history[3]["eval/accuracy"] is not None
    # step 1 trains at π = π_ref: margin 0 up to float noise, loss log 2
    assert abs(history[0]["dpo/rewards/margin"]) < 1e-5 and history[0]["dpo/loss"] == pytest.approx(math.log(2))
    assert history[-1]["dpo/rewards/margin"] > 0.05 and history[-1]["dpo/accuracy"] == 1.0
    assert history[-1]["eval/accuracy"] == 1.0 and history[-1]["eval/loss"] < math.log(2)
    # lr (warmup_linear, 0-based step s): warm-up (s + 1)/1 = 1 at s = 0, then (6 − s)/(6 − 1): s = 1 → 1,
    # s = 2 → 4/5 = 0.8, s = 5 → 1/5: 3e-3, 3e-3, 2.4e-3, …, 6e-4
    assert [row["lr"] for row in history] == pytest.approx([3e-3, 3e-3, 2.4e-3, 1.8e-3, 1.2e-3, 6e-4])
    assert isinstance(model, GPT2LMHeadModel)


def test_train_dpo_accumulates_micro_batches_into_the_same_update(word_tokenizer, accelerator):
    # batch 4 as one micro-batch or as 2 of 2 pairs (each weighted 2/4): the same pairs against the same reference
    # log-probs, the same mean-over-pairs gradient and logged loss (measured: 7e-5 of the update's norm apart)
    start = {k: v.clone() for k, v in tiny_policy().state_dict().items()}
    whole, whole_history, _ = run_train_dpo(word_tokenizer, accelerator, epochs=2)
    split, split_history, _ = run_train_dpo(word_tokenizer, accelerator, epochs=2, gradient_accumulation_steps=2)
    assert [row["dpo/loss"] for row in split_history] == pytest.approx([row["dpo/loss"] for row in whole_history])
    a, b = whole.state_dict(), split.state_dict()
    difference = torch.cat([(a[k] - b[k]).flatten() for k in start]).norm()
    update = torch.cat([(a[k] - start[k]).flatten() for k in start]).norm()
    assert update > 1e-3 and difference / update < 1e-3
