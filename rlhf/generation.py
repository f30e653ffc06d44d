"""Generation at scale for the stages that sample a prompt list (sample_pairs, evaluate): K responses per prompt,
batched and KV-cached on the process's device (:func:`rlhf.sampling.sample`), each process sampling a disjoint shard
of the prompts (:func:`rlhf.distributed.shard_slice`; the results go back in prompt order with
:func:`rlhf.distributed.gather_in_order`).

Where the randomness comes from (``sampling_seeds``, as PPO's ``ppo.sampling_seeds``):

- ``per_rank``: the global torch RNG, seeded ``seed`` on rank 0 (so one process draws exactly what it always did)
  and ``seed + r·RANK_SEED_STRIDE`` on rank r: the samples depend on the number of processes;
- ``per_episode``: token i of sample k of prompt p is drawn from uniform [p·K + k, i] of that episode's own
  generator (:func:`episode_uniforms`): the samples do not depend on the batch or the number of processes.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase

from rlhf import ppo
from rlhf.modeling import encode_prompts
from rlhf.sampling import sample

RANK_SEED_STRIDE = 1_000_003  # per_rank: rank r's seed is seed + r·stride (a prime, apart from nearby stage seeds)


def rank_seed(seed: int, rank: int) -> int:
    """The global-RNG seed of rank ``rank`` under ``per_rank`` sampling (rank 0: ``seed`` itself)."""
    return seed + rank * RANK_SEED_STRIDE


def episode_uniforms(seed: int, episodes: Sequence[int], length: int) -> Tensor:
    """(len(episodes), length) uniforms in [0, 1): row j from a generator seeded by (``seed``, ``episodes[j]``), so an
    episode draws the same tokens in any batch, on any process."""
    rows = [torch.rand(length, generator=torch.Generator().manual_seed(seed * 2**32 + episode)) for episode in episodes]
    return torch.stack(rows) if rows else torch.empty(0, length)


@dataclass
class SampledBatch:
    """One batch of sampled responses: rows are prompt-major (K per prompt)."""

    prompts: list[str]  # the batch's prompts, each once
    query_ids: Tensor  # (b·K, q) left-padded, on the device
    query_mask: Tensor  # (b·K, q)
    responses: Tensor  # (b·K, t) ids, pad after the EOS
    response_mask: Tensor  # (b·K, t) bool, true up to and including the EOS
    finished: Tensor  # (b·K,) bool: emitted EOS within max_new_tokens


def sample_batches(
    policy: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    prompt_ids: Sequence[int],
    samples_per_prompt: int,
    max_new_tokens: int,
    temperature: float,
    batch_size: int,
    episode_seed: int | None = None,
) -> Iterator[SampledBatch]:
    """Sample ``samples_per_prompt`` responses to each prompt, ``batch_size`` prompts at a time, on ``policy``'s device.

    ``prompt_ids``: each prompt's index in the whole prompt list (its episodes are id·K + k); ``episode_seed``: None
    draws from the global torch RNG (per_rank), else each episode's uniforms (per_episode, :func:`episode_uniforms`).
    """
    device = next(policy.parameters()).device
    k = samples_per_prompt
    for start in range(0, len(prompts), batch_size):
        chunk = list(prompts[start : start + batch_size])
        expanded = [prompt for prompt in chunk for _ in range(k)]
        query_ids, query_mask = (t.to(device) for t in encode_prompts(tokenizer, expanded))
        uniforms = None
        if episode_seed is not None:
            episodes = [p * k + j for p in prompt_ids[start : start + batch_size] for j in range(k)]
            uniforms = episode_uniforms(episode_seed, episodes, max_new_tokens).to(device)
        raw = sample(
            policy,
            query_ids,
            query_mask,
            max_new_tokens,
            temperature,
            tokenizer.eos_token_id,
            tokenizer.pad_token_id,
            uniforms=uniforms,
        ).responses
        responses, mask, finished = ppo.truncate_after_stop_token(raw, tokenizer.eos_token_id, tokenizer.pad_token_id)
        yield SampledBatch(chunk, query_ids, query_mask, responses, mask, finished)


def decode_responses(tokenizer: PreTrainedTokenizerBase, batch: SampledBatch) -> list[str]:
    """The batch's responses as text (EOS and padding removed)."""
    ids = batch.responses.masked_fill(~batch.response_mask, tokenizer.pad_token_id)
    return tokenizer.batch_decode(ids.cpu(), skip_special_tokens=True)
