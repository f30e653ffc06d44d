"""Scoring sampled responses (:mod:`rlhf.sampling` samples them): log-probs under a policy, critic values, reward-model
scores, used by the evaluation and the PPO rollout (:mod:`rlhf.ppo_trainer.experience`); and :class:`Experience`, one
scored PPO rollout batch.

Shapes: b = episodes, q = query (prompt) length, left-padded; t = response length, right-padded after the EOS.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from transformers import PreTrainedModel

from rlhf import ppo
from rlhf.modeling import RewardNormalization, causal_lm_logits, per_token_scalars, sequence_scores


def joined(query_ids: Tensor, query_mask: Tensor, responses: Tensor, response_mask: Tensor) -> tuple[Tensor, Tensor]:
    """(b, q + t) ids and attention mask of query and response."""
    return torch.cat([query_ids, responses], dim=1), torch.cat([query_mask, response_mask.long()], dim=1)


def response_logprobs(
    model: PreTrainedModel,
    query_ids: Tensor,
    query_mask: Tensor,
    responses: Tensor,
    response_mask: Tensor,
    temperature: float,
) -> Tensor:
    """(b, t) log-probs of the response tokens under ``model`` (logits / temperature)."""
    input_ids, attention_mask = joined(query_ids, query_mask, responses, response_mask)
    logits = causal_lm_logits(model, input_ids, attention_mask)
    # the logit at position i predicts token i+1: response tokens are predicted from q−1 … q+t−2
    response_logits = logits[:, query_ids.shape[1] - 1 : -1]
    return ppo.logprobs_from_logits(response_logits, responses, temperature)


def response_values(
    critic: PreTrainedModel, query_ids: Tensor, query_mask: Tensor, responses: Tensor, response_mask: Tensor
) -> Tensor:
    """(b, t) critic values V(s_i) for the state just before each response token is chosen."""
    input_ids, attention_mask = joined(query_ids, query_mask, responses, response_mask)
    values = per_token_scalars(critic, input_ids, attention_mask)
    return values[:, query_ids.shape[1] - 1 : -1]


@torch.no_grad()
def reward_scores(
    reward_model: PreTrainedModel,
    normalization: RewardNormalization,
    query_ids: Tensor,
    query_mask: Tensor,
    responses: Tensor,
    response_mask: Tensor,
) -> Tensor:
    """(b,) normalised RM score of query + response, read at the last real response token (the EOS)."""
    input_ids, attention_mask = joined(query_ids, query_mask, responses, response_mask)
    return normalization.apply(sequence_scores(reward_model, input_ids, attention_mask))


@dataclass
class Experience:
    """One rollout batch; b episodes, t response tokens."""

    query_ids: torch.Tensor  # (b, q) prompt ids, left-padded
    query_mask: torch.Tensor  # (b, q) 1 on real prompt tokens
    responses: torch.Tensor  # (b, t) sampled ids, pad after the first EOS
    response_mask: torch.Tensor  # (b, t) bool, True up to and including the EOS
    logprobs: torch.Tensor  # (b, t) log π_old(token), masked positions 0
    ref_logprobs: torch.Tensor  # (b, t) log π_ref(token)
    values: torch.Tensor  # (b, t) V_old
    scores: torch.Tensor  # (b,) normalised RM score (EOS-trick penalty applied)
    contains_eos: torch.Tensor  # (b,) bool
    rewards: torch.Tensor | None = None  # (b, t) −β·KL + score at the last real token
    advantages: torch.Tensor | None = None  # (b, t) GAE, whitened
    returns: torch.Tensor | None = None  # (b, t) advantages + values (unwhitened)
    kl: torch.Tensor | None = None  # (b, t) per-token KL estimate

    QUERY_FIELDS = ("query_ids", "query_mask")  # (b, q)
    RESPONSE_FIELDS = (
        "responses",
        "response_mask",
        "logprobs",
        "ref_logprobs",
        "values",
        "rewards",
        "advantages",
        "returns",
        "kl",
    )  # (b, t)

    def trimmed(self) -> Experience:
        """The same episodes without the columns no row uses: leading query padding, trailing response padding.

        Every forward over the batch then costs what its longest real sequence costs (padding waste removed).
        """
        first_query_column = int(self.query_mask.any(0).long().argmax())
        response_columns = max(1, int(self.response_mask.sum(1).max()))
        fields = dict(vars(self))
        for name in self.QUERY_FIELDS:
            fields[name] = fields[name][:, first_query_column:]
        for name in self.RESPONSE_FIELDS:
            if fields[name] is not None:
                fields[name] = fields[name][:, :response_columns]
        return Experience(**fields)

    def select(self, index: torch.Tensor) -> Experience:
        """Rows ``index`` of every tensor (a minibatch)."""
        fields = {
            name: (value[index] if isinstance(value, torch.Tensor) else value) for name, value in vars(self).items()
        }
        return Experience(**fields)
