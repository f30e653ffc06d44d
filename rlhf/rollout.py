"""Rollout: sample responses from a policy and turn them into scored experience (kept apart from optimisation).

Shapes: b = episodes, q = query (prompt) length, left-padded; t = response length, right-padded after the EOS.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from rlhf import lean_gpt2, ppo
from rlhf.modeling import (
    RewardNormalization,
    causal_lm_logits,
    per_token_scalars,
    sequence_scores,
)


@torch.no_grad()
def generate_responses(
    policy: PreTrainedModel,
    query_ids: torch.Tensor,
    query_mask: torch.Tensor,
    max_new_tokens: int,
    temperature: float,
    eos_token_id: int,
    pad_token_id: int,
    generator_seed: int | None = None,
) -> torch.Tensor:
    """Sample (b, max_new_tokens) response ids with the KV cache; pure sampling (no top-k/top-p), as PPO assumes.

    Rows that finished early are padded with ``pad_token_id`` after their EOS.
    """
    if generator_seed is not None:
        torch.manual_seed(generator_seed)
    if lean_gpt2.supports(policy):  # the same distribution without generate()'s per-token machinery
        sample = lean_gpt2.sample(policy, query_ids, query_mask, max_new_tokens, temperature, eos_token_id, pad_token_id)
        return pad_responses(sample.responses, max_new_tokens, pad_token_id)
    output = policy.generate(
        input_ids=query_ids,
        attention_mask=query_mask,
        max_new_tokens=max_new_tokens,
        min_new_tokens=1,
        do_sample=True,
        temperature=temperature,
        top_k=0,
        top_p=1.0,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
        use_cache=True,
    )
    return pad_responses(output[:, query_ids.shape[1] :], max_new_tokens, pad_token_id)


def pad_responses(responses: torch.Tensor, length: int, pad_token_id: int) -> torch.Tensor:
    """(b, t ≤ length) → (b, length): generate() stops early once every row has ended; pad the rest."""
    if responses.shape[1] == length:
        return responses
    padding = responses.new_full((responses.shape[0], length - responses.shape[1]), pad_token_id)
    return torch.cat([responses, padding], dim=1)


def response_logprobs(
    model: PreTrainedModel,
    query_ids: torch.Tensor,
    query_mask: torch.Tensor,
    responses: torch.Tensor,
    response_mask: torch.Tensor,
    temperature: float,
    with_entropy: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(b, t) log-probs of the response tokens under ``model`` (logits / temperature); optional (b, t) entropy."""
    input_ids = torch.cat([query_ids, responses], dim=1)
    attention_mask = torch.cat([query_mask, response_mask.long()], dim=1)
    logits = causal_lm_logits(model, input_ids, attention_mask)
    # the logit at position i predicts token i+1: response tokens are predicted from q−1 … q+t−2
    response_logits = logits[:, query_ids.shape[1] - 1 : -1]
    logprobs = ppo.logprobs_from_logits(response_logits, responses, temperature)
    entropy = ppo.entropy_from_logits(response_logits, temperature) if with_entropy else None
    return logprobs, entropy


def response_values(
    critic: PreTrainedModel,
    query_ids: torch.Tensor,
    query_mask: torch.Tensor,
    responses: torch.Tensor,
    response_mask: torch.Tensor,
) -> torch.Tensor:
    """(b, t) critic values V(s_i) for the state just before each response token is chosen."""
    input_ids = torch.cat([query_ids, responses], dim=1)
    attention_mask = torch.cat([query_mask, response_mask.long()], dim=1)
    values = per_token_scalars(critic, input_ids, attention_mask)
    return values[:, query_ids.shape[1] - 1 : -1]


@torch.no_grad()
def reward_scores(
    reward_model: PreTrainedModel,
    normalization: RewardNormalization,
    query_ids: torch.Tensor,
    query_mask: torch.Tensor,
    responses: torch.Tensor,
    response_mask: torch.Tensor,
) -> torch.Tensor:
    """(b,) normalised RM score of query + response, read at the last real response token (the EOS)."""
    input_ids = torch.cat([query_ids, responses], dim=1)
    attention_mask = torch.cat([query_mask, response_mask.long()], dim=1)
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
    RESPONSE_FIELDS = ("responses", "response_mask", "logprobs", "ref_logprobs", "values", "rewards", "advantages", "returns", "kl")  # (b, t)

    def trimmed(self) -> "Experience":
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

    def select(self, index: torch.Tensor) -> "Experience":
        """Rows ``index`` of every tensor (a minibatch)."""
        fields = {name: (value[index] if isinstance(value, torch.Tensor) else value) for name, value in vars(self).items()}
        return Experience(**fields)
