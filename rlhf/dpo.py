"""Direct preference optimisation: the offline alternative to PPO (``ppo.algorithm: dpo``) as small pure functions.

Pure tensor functions, no models and no process group: the DPO loop (:func:`rlhf.training.train_dpo`) calls them.
Shapes use ``b`` for pairs, ``t`` for the length of a whole sequence (prompt + response + EOS, right-padded) and
``v`` for the vocabulary.

Sources:
- **[DPO]** Rafailov et al. 2023, "Direct Preference Optimization: Your Language Model is Secretly a Reward Model":
  the loss −log σ(β·h) (eq. 7) and the implicit reward β·log(π/π_ref) (§5).
- **[cDPO]** Mitchell 2023, "A note on DPO with noisy preferences & relationship to IPO": conservative DPO, the
  labels assumed flipped with probability ε.
- **[IPO]** Azar et al. 2023, "A General Theoretical Paradigm to Understand Learning from Human Preferences": the
  squared loss (h − 1/(2τ))² (eq. 17), with τ our β.

h, the preference log-ratio of a pair, is the same for every loss:
h = (log π(chosen) − log π_ref(chosen)) − (log π(rejected) − log π_ref(rejected)),
where log π(y) is the log-probability of the whole response y given its prompt: the **sum** over its tokens
(EOS included, the prompt not), as [DPO] and [IPO] define it. IPO keeps the sum too: eq. 17 is written on sequence
probabilities, and the sum keeps β's meaning identical across the two losses (IPO's target margin 1/(2β) is in
nats per pair). Some implementations (e.g. TRL's DPOTrainer) average IPO's log-probs over tokens instead, which
makes the target a per-token margin and changes how β must be set; the embedded task's responses are short
(≈ 5–15 tokens), so the sum's length effect is small here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

LOSSES = ("sigmoid", "ipo")  # dpo.loss


# --- Sequence log-probabilities ----------------------------------------------------------------------------------


def response_mask(attention_mask: Tensor, prompt_lengths: Tensor) -> Tensor:
    """True at the response tokens (EOS included) of right-padded prompt + response sequences.

    Args:
        attention_mask: ``(b, t)``, 1 at real tokens (right padding).
        prompt_lengths: ``(b,)`` int, the number of prompt tokens at the start of each row.

    Returns:
        ``(b, t)`` bool: position ``i`` is ≥ the row's prompt length and a real token.
    """
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    return (positions.unsqueeze(0) >= prompt_lengths.unsqueeze(1)) & attention_mask.bool()


def sequence_logprobs(logits: Tensor, input_ids: Tensor, response: Tensor) -> Tensor:
    """Sum of the log-probabilities of each row's response tokens: log π(response | prompt).

    Args:
        logits: ``(b, t, v)``, the model's logits for ``input_ids`` (position i predicts token i + 1).
        input_ids: ``(b, t)`` token ids.
        response: ``(b, t)`` bool, True at the response tokens (:func:`response_mask`). Position 0 is never
            predicted, so it never counts.

    Returns:
        ``(b,)`` float32 sums. Masked with ``torch.where``, so whatever padding positions hold never reaches them.
    """
    log_probs = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    token_logprobs = log_probs.gather(-1, input_ids[:, 1:].unsqueeze(-1).long()).squeeze(-1)  # (b, t − 1)
    counted = response[:, 1:].bool()
    return torch.where(counted, token_logprobs, torch.zeros((), device=logits.device)).sum(-1)


# --- Losses ------------------------------------------------------------------------------------------------------


def preference_logratio(
    policy_chosen: Tensor, policy_rejected: Tensor, reference_chosen: Tensor, reference_rejected: Tensor
) -> Tensor:
    """h = (log π(c) − log π_ref(c)) − (log π(r) − log π_ref(r)). Four ``(b,)`` sequence log-probs → ``(b,)``."""
    return (policy_chosen - reference_chosen) - (policy_rejected - reference_rejected)


def sigmoid_loss(logratio: Tensor, beta: float, label_smoothing: float = 0.0) -> Tensor:
    """DPO's loss per pair, conservative with ``label_smoothing`` ε > 0. ``(b,)`` h → ``(b,)``.

    −(1 − ε)·log σ(β·h) − ε·log σ(−β·h) ([DPO] eq. 7 at ε = 0; [cDPO]: each label flipped with probability ε).
    ``logsigmoid`` is stable for large |β·h| (no log of an underflowed σ).
    """
    scaled = beta * logratio
    return -(1 - label_smoothing) * F.logsigmoid(scaled) - label_smoothing * F.logsigmoid(-scaled)


def ipo_loss(logratio: Tensor, beta: float) -> Tensor:
    """IPO's loss per pair, (h − 1/(2β))² ([IPO] eq. 17, τ = β). ``(b,)`` h → ``(b,)``.

    A regression of h on the target 1/(2β): unlike the sigmoid loss it stops pushing once the margin is reached,
    so deterministic preferences cannot drive h (and the KL to the reference) to infinity.
    """
    return (logratio - 1 / (2 * beta)) ** 2


def pair_losses(logratio: Tensor, loss: str, beta: float, label_smoothing: float = 0.0) -> Tensor:
    """The ``dpo.loss`` of each pair: ``sigmoid`` (:func:`sigmoid_loss`) or ``ipo`` (:func:`ipo_loss`). (b,) → (b,)."""
    if loss == "sigmoid":
        return sigmoid_loss(logratio, beta, label_smoothing)
    if loss == "ipo":
        if label_smoothing:
            raise ValueError("dpo.label_smoothing applies to dpo.loss: sigmoid only; set it to 0 for ipo")
        return ipo_loss(logratio, beta)
    raise ValueError(f"dpo.loss must be one of {', '.join(LOSSES)}, got {loss!r}")


# --- Statistics --------------------------------------------------------------------------------------------------


def implicit_rewards(policy_logprobs: Tensor, reference_logprobs: Tensor, beta: float) -> Tensor:
    """β·(log π(y) − log π_ref(y)), the reward DPO's policy implicitly optimises ([DPO] §5). ``(b,)`` → ``(b,)``."""
    return beta * (policy_logprobs - reference_logprobs)


def preference_stats(
    policy_chosen: Tensor,
    policy_rejected: Tensor,
    reference_chosen: Tensor,
    reference_rejected: Tensor,
    beta: float,
) -> dict[str, Tensor]:
    """Means over the pairs of the implicit rewards of the chosen and the rejected responses, their margin, and the
    accuracy: the share of pairs whose margin is strictly positive (a tie, as at the start where π = π_ref, is not
    a success). Four ``(b,)`` → scalar float32 tensors, detached."""
    chosen = implicit_rewards(policy_chosen.detach().float(), reference_chosen.float(), beta)
    rejected = implicit_rewards(policy_rejected.detach().float(), reference_rejected.float(), beta)
    margin = chosen - rejected
    return {
        "rewards/chosen": chosen.mean(),
        "rewards/rejected": rejected.mean(),
        "rewards/margin": margin.mean(),
        "accuracy": (margin > 0).float().mean(),
    }
