"""The lean forward passes, one entry point for every architecture that has one: dispatch on ``config.model_type`` to
:mod:`rlhf.lean_gpt2` (GPT-2) or :mod:`rlhf.lean_llama` (Llama, Qwen2, Mistral).

Callers (:mod:`rlhf.sampling`'s lean decoder, :func:`rlhf.modeling.causal_lm_logits` and
:func:`~rlhf.modeling.per_token_scalars`, :mod:`rlhf.ppo_trainer.models`) use only this module, so a model takes the
lean path exactly when :func:`supports` says so and the Hugging Face path otherwise. Each function hands its
arguments unchanged to the architecture's own, so a GPT-2 computes what :mod:`rlhf.lean_gpt2` computes.

Shapes: b = rows, s = sequence, S = keys visible, d = hidden, v = vocabulary.
"""

from __future__ import annotations

from types import ModuleType

import torch
from torch import nn

from rlhf import lean_gpt2, lean_llama

MODULES: dict[str, ModuleType] = {"gpt2": lean_gpt2} | {family: lean_llama for family in lean_llama.FAMILIES}

# (b, s) key validity → (b, 1, q, s) boolean mask; the same contract for every architecture
attention_mask_4d = lean_gpt2.attention_mask_4d


def _module(model: nn.Module) -> ModuleType | None:
    return MODULES.get(getattr(getattr(model, "config", None), "model_type", None))


def supports(model: nn.Module) -> bool:
    """Whether ``model`` has a lean forward that reproduces its Hugging Face forward (see each module's ``supports``:
    plain layers, no LoRA, no gradient checkpointing, …)."""
    module = _module(model)
    return module is not None and module.supports(model)


def empty_cache(model: nn.Module, batch: int, length: int, dtype: torch.dtype, device: torch.device):
    """A preallocated KV cache of ``length`` columns for :func:`hidden_states` (the architecture's ``KVCache``)."""
    return _module(model).KVCache.empty(model, batch, length, dtype, device)


def hidden_states(
    model: nn.Module,
    input_ids: torch.Tensor,
    position_ids: torch.Tensor,
    mask: torch.Tensor,
    cache=None,
    start: int = 0,
) -> torch.Tensor:
    """(b, s) ids at columns ``start … start+s`` → (b, s, d) final hidden states; ``mask`` (b, 1, s, S) from
    :func:`attention_mask_4d`; with ``cache`` (:func:`empty_cache`) keys/values are written at ``start``."""
    return _module(model).hidden_states(model, input_ids, position_ids, mask, cache, start)


def full_forward(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """(b, s) ids + mask (left- and/or right-padded) → (b, s, d) hidden states, positions counted over real tokens."""
    return _module(model).full_forward(model, input_ids, attention_mask)


def lm_logits(model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """(…, d) → (…, v) with the model's LM head."""
    return _module(model).lm_logits(model, hidden)
