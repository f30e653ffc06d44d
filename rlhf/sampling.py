"""Sampling responses from a policy: one entry point, :func:`sample`, for every caller (the sample_pairs stage, the
evaluation, the PPO rollout).

Pure sampling from softmax(logits / T) (no top-k or top-p: PPO's log-prob ratios assume it), at least one token per
row (EOS is barred at the first step, as ``generate(min_new_tokens=1)``), rows padded after their EOS.

Two decoders draw from that distribution:

- :func:`lean_sample` for a plain GPT-2 or Llama-family model (:func:`rlhf.lean.supports`): a preallocated KV cache
  over the lean forward of :mod:`rlhf.lean`, without ``generate()``'s per-token machinery. It also records each token's
  log-prob and, on request, the hidden state that chose it: PPO's old log-probs and value-head inputs, no extra forward;
- Hugging Face ``generate()`` for every other model (LoRA adapters, gradient checkpointing, other architectures).

And take their randomness from one of two sources:

- by default the global torch RNG (``torch.multinomial`` in the lean decoder, ``generate(do_sample=True)`` otherwise);
- ``uniforms`` (b, ≥ t): token i of row e is drawn by inverse transform from ``uniforms[e, i]`` (:func:`inverse_cdf`,
  written once: the lean decoder calls it, ``generate()`` through :class:`InverseCDFSampler`), so a row's tokens do
  not depend on the batch it is in (PPO's ``sampling_seeds: per_episode``).

Shapes: b = rows, q = prompt length (left-padded), t = response length, v = vocabulary, d = hidden width.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from transformers import LogitsProcessor, LogitsProcessorList

from rlhf import lean as lean_forward  # "lean" is also sample()'s decoder switch

# Below this many rows × width, lean decoding on the CPU (:func:`sample`) stays in fp32 under bf16 autocast: at such
# one-token shapes oneDNN's bf16 GEMM costs more per call than MKL's fp32 one, while larger ones gain from bf16's
# halved weight traffic (and its bf16 instructions where the CPU has them; measured: docs/performance.md).
CPU_BF16_DECODE_MIN_ELEMENTS = 4096


def decodes_in_fp32(policy: nn.Module, rows: int, device: torch.device) -> bool:
    """Whether :func:`sample` decodes ``rows`` prompts in fp32 although bf16 autocast is on (see above)."""
    width = policy.config.hidden_size  # GPT-2: n_embd
    return device.type == "cpu" and torch.is_autocast_enabled("cpu") and rows * width < CPU_BF16_DECODE_MIN_ELEMENTS


@dataclass
class Sample:
    """Sampled responses, and what the lean decoder recorded on the way (None from ``generate()``); its t' ≤ t columns
    end where decoding stopped, once every row had ended."""

    responses: Tensor  # (b, t) sampled ids, pad after each row's EOS
    logprobs: Tensor | None = (
        None  # (b, t') log softmax(logits / T) of each token (before the EOS bar), 0 after the EOS
    )
    hidden: Tensor | None = None  # (b, t', d) with keep_hidden: the final hidden state that chose each token


def inverse_cdf(probabilities: Tensor, uniforms: Tensor) -> Tensor:
    """(b, v) probabilities, (b,) uniforms in [0, 1) → (b,) the first token whose cumulative probability exceeds u.

    Given the same u a row draws the same token whatever batch it is in ("common random numbers"); tokens with
    probability 0 are never chosen.
    """
    cdf = probabilities.cumsum(-1)
    threshold = uniforms.to(cdf) * cdf[:, -1]  # the total is 1 up to rounding: scale u so it always lands in a bin
    tokens = torch.searchsorted(cdf, threshold.unsqueeze(-1), right=True).squeeze(-1)
    return tokens.clamp(max=probabilities.shape[-1] - 1)


def inverse_cdf_sample(logits: Tensor, uniforms: Tensor, temperature: float) -> Tensor:
    """(b, v) logits, (b,) uniforms → (b,) tokens drawn from softmax(logits / T) by :func:`inverse_cdf`."""
    return inverse_cdf(torch.softmax(logits.float() / temperature, dim=-1), uniforms)


class InverseCDFSampler(LogitsProcessor):
    """Turns ``generate()``'s greedy decoding into sampling with per-row uniforms: the chosen token keeps score 0,
    all others −inf. Runs after generate()'s own processors (min_new_tokens), so it samples what they leave."""

    def __init__(self, uniforms: Tensor, temperature: float, query_length: int):
        self.uniforms = uniforms  # (b, ≥ t): one uniform per row and response position
        self.temperature = temperature
        self.query_length = query_length

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        step = input_ids.shape[1] - self.query_length
        tokens = inverse_cdf_sample(scores, self.uniforms[:, step], self.temperature)
        chosen = torch.full_like(scores, float("-inf"))
        return chosen.scatter(1, tokens.unsqueeze(-1), 0.0)


@torch.no_grad()
def sample(
    policy: nn.Module,
    query_ids: Tensor,
    query_mask: Tensor,
    max_new_tokens: int,
    temperature: float,
    eos_token_id: int,
    pad_token_id: int,
    *,
    uniforms: Tensor | None = None,
    keep_hidden: bool = False,
    lean: bool | None = None,
) -> Sample:
    """Sample (b, max_new_tokens) responses to left-padded prompts, rows padded after their EOS.

    ``uniforms``: per-row draws as in the module docstring (default: the global RNG). ``lean``: the decoder, by default
    the lean one when :func:`rlhf.lean.supports` the policy, else ``generate()``; only the lean one records
    log-probs and (``keep_hidden``) hidden states, None otherwise.
    """
    if lean_forward.supports(policy) if lean is None else lean:
        fp32 = decodes_in_fp32(policy, query_ids.shape[0], query_ids.device)
        with torch.autocast("cpu", enabled=False) if fp32 else contextlib.nullcontext():
            drawn = lean_sample(
                policy,
                query_ids,
                query_mask,
                max_new_tokens=max_new_tokens,
                temperature=temperature,
                eos_token_id=eos_token_id,
                pad_token_id=pad_token_id,
                uniforms=uniforms,
                keep_hidden=keep_hidden,
            )
        return Sample(pad_responses(drawn.responses, max_new_tokens, pad_token_id), drawn.logprobs, drawn.hidden)
    sampling = {"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0}
    if uniforms is not None:  # greedy over the one token InverseCDFSampler leaves
        processor = InverseCDFSampler(uniforms, temperature, query_ids.shape[1])
        sampling = {
            "do_sample": False,
            "temperature": None,
            "top_k": None,
            "top_p": None,
            "logits_processor": LogitsProcessorList([processor]),
        }
    output = policy.generate(
        input_ids=query_ids,
        attention_mask=query_mask,
        max_new_tokens=max_new_tokens,
        min_new_tokens=1,
        **sampling,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
        use_cache=True,
    )
    return Sample(pad_responses(output[:, query_ids.shape[1] :], max_new_tokens, pad_token_id))


def pad_responses(responses: Tensor, length: int, pad_token_id: int) -> Tensor:
    """(b, t ≤ length) → (b, length): decoding stops early once every row has ended; pad the rest."""
    if responses.shape[1] == length:
        return responses
    padding = responses.new_full((responses.shape[0], length - responses.shape[1]), pad_token_id)
    return torch.cat([responses, padding], dim=1)


@torch.no_grad()
def lean_sample(
    model: nn.Module,
    query_ids: Tensor,
    query_mask: Tensor,
    *,
    uniforms: Tensor | None = None,
    generator: torch.Generator | None = None,
    keep_hidden: bool = False,
    max_new_tokens: int,
    temperature: float,
    eos_token_id: int,
    pad_token_id: int,
) -> Sample:
    """The lean decoder: up to ``max_new_tokens`` tokens of a model :func:`rlhf.lean.supports`, with a preallocated
    KV cache.

    The log-prob recorded is that of the unmodified distribution (before the EOS bar), which is what PPO's ratio
    compares against. ``uniforms``: :func:`inverse_cdf` draws; otherwise ``torch.multinomial`` with ``generator``
    (default: the global RNG). Decoding stops as soon as every row has ended, so t ≤ ``max_new_tokens``.
    """
    device = query_ids.device
    batch, query_length = query_ids.shape
    dtype = (
        torch.get_autocast_dtype("cuda" if device.type == "cuda" else "cpu")
        if torch.is_autocast_enabled(device.type)
        else model.lm_head.weight.dtype
    )
    cache = lean_forward.empty_cache(model, batch, query_length + max_new_tokens, dtype, device)
    key_mask = torch.zeros(batch, query_length + max_new_tokens, dtype=torch.bool, device=device)
    key_mask[:, :query_length] = query_mask.bool()
    positions = (query_mask.long().cumsum(-1) - 1).clamp(min=0)
    next_position = positions[:, -1] + 1
    responses = torch.full((batch, max_new_tokens), pad_token_id, dtype=torch.long, device=device)
    logprobs = torch.zeros(batch, max_new_tokens, device=device)
    hiddens = []
    ended = torch.zeros(batch, dtype=torch.bool, device=device)
    # prefill: the whole prompt, keep the last position
    prefill_mask = lean_forward.attention_mask_4d(key_mask[:, :query_length], 0, query_length)
    hidden = lean_forward.hidden_states(model, query_ids, positions, prefill_mask, cache, 0)[:, -1]
    steps = 0
    for step in range(max_new_tokens):
        logits = lean_forward.lm_logits(model, hidden).float() / temperature  # (b, v)
        log_distribution = torch.log_softmax(logits, dim=-1)
        choice = (
            log_distribution
            if step > 0
            else log_distribution.index_fill(1, torch.tensor([eos_token_id], device=device), float("-inf"))
        )
        if uniforms is not None:
            tokens = inverse_cdf(choice.exp(), uniforms[:, step])
        else:
            tokens = torch.multinomial(choice.exp(), 1, generator=generator).squeeze(-1)
        alive = ~ended
        tokens = torch.where(alive, tokens, pad_token_id)
        responses[:, step] = tokens
        logprobs[:, step] = torch.where(alive, log_distribution.gather(1, tokens[:, None]).squeeze(1), 0.0)
        if keep_hidden:
            hiddens.append(hidden)
        ended = ended | (alive & (tokens == eos_token_id))
        steps = step + 1
        if steps == max_new_tokens or bool(ended.all()):
            break
        column = query_length + step
        key_mask[:, column] = alive  # this step's token (the EOS included) is real for rows alive before it
        mask = lean_forward.attention_mask_4d(key_mask[:, : column + 1], column, 1)
        hidden = lean_forward.hidden_states(model, tokens[:, None], next_position[:, None], mask, cache, column)[:, -1]
        next_position = next_position + 1
    return Sample(responses[:, :steps], logprobs[:, :steps], torch.stack(hiddens, 1) if keep_hidden else None)
