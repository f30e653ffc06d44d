"""A lean forward pass and KV-cached sampler for GPT-2-family models, on the models' own weights.

Why: for the small models PPO runs on a CPU, the Hugging Face forward costs more in Python (output capturing, mask
builders, cache objects, an unfused tanh-GELU of five kernels) than in arithmetic, and ``generate()`` adds its
logits-processor machinery on every token. These functions compute the same numbers (tested against the HF
forward to 1e-5) with a handful of fused kernels per block: ``addmm`` for every projection, attention as two
batched matmuls on the CPU (SDPA on CUDA), ``gelu(approximate="tanh")``, and a preallocated KV cache written in place.

They read the parameters of an unmodified ``GPT2LMHeadModel`` / ``GPT2ForSequenceClassification`` and run under
autograd and autocast like any module code, so the optimiser, DDP and ``accelerate.autocast`` see no difference.
:func:`supports` says when they apply; everything else (LoRA adapters, FSDP's per-block hooks, gradient
checkpointing, other architectures) takes the Hugging Face path.

Shapes: b = rows, s = sequence, h = heads, d = hidden, dh = d / h, v = vocabulary.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

# Below this width, decoding on the CPU stays in fp32 under bf16 autocast: one-token steps multiply (b, d) by (d, 3d)
# matrices, where oneDNN's bf16 GEMM costs more per call than MKL's fp32 (b=8, d=128: 25 µs against 15 µs), while
# from d = 512 on the bf16 weights' halved memory traffic wins (140 against 276 µs). Measured here, torch 2.13.
CPU_BF16_DECODE_MIN_WIDTH = 256
TANH_GELU = {"gelu_new", "gelu_pytorch_tanh", "gelu_fast"}  # the same tanh approximation (fast = a cheaper rounding of it)


def supports(model: nn.Module) -> bool:
    """Whether ``model`` is a plain GPT-2 (causal LM or one-output scorer) these functions reproduce exactly."""
    config = getattr(model, "config", None)
    trunk = getattr(model, "transformer", None)
    if config is None or getattr(config, "model_type", None) != "gpt2" or trunk is None:
        return False
    if getattr(config, "add_cross_attention", False) or getattr(config, "reorder_and_upcast_attn", False):
        return False
    if config.activation_function not in TANH_GELU | {"gelu"}:
        return False
    checkpointing = getattr(model, "is_activation_checkpointing", None)
    if checkpointing is None:
        checkpointing = getattr(model, "is_gradient_checkpointing", False)
    if checkpointing or hasattr(model, "peft_config"):
        return False
    if any(m.p > 0 for m in model.modules() if isinstance(m, nn.Dropout)) and model.training:
        return False
    # Conv1D layers of exactly the GPT-2 class (LoRA or quantisation would swap them)
    block = trunk.h[0]
    return type(block.attn.c_attn).__name__ == "Conv1D" and type(block.mlp.c_fc).__name__ == "Conv1D"


def _activation(config) -> callable:
    approximate = "tanh" if config.activation_function in TANH_GELU else "none"
    return lambda x: F.gelu(x, approximate=approximate)


def _conv1d(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """GPT-2's Conv1D (weight stored in × out): x @ W + b as one addmm over the flattened rows."""
    shape = x.shape[:-1] + (layer.weight.shape[1],)
    return torch.addmm(layer.bias, x.reshape(-1, x.shape[-1]), layer.weight).view(shape)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float) -> torch.Tensor:
    """(b, h, s, dh) queries, (b, h, S, dh) keys/values, (b, 1, s, S) boolean mask → (b, h, s, dh).

    On CUDA the fused ``scaled_dot_product_attention``. On the CPU, for the short sequences of PPO, two batched
    matmuls and a softmax: torch 2.13's CPU flash kernel with a mask took 28 ms forward + backward where these
    took 3 ms (8 × 8 heads × 40 tokens, measured here; bench/ppo_vs_trl.py).
    """
    if q.device.type == "cuda":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    weights = torch.matmul(q, k.transpose(-1, -2)) * scale
    weights = weights.float().masked_fill(~mask, float("-inf")).softmax(-1).to(v.dtype)
    return torch.matmul(weights, v)


def attention_mask_4d(key_mask: torch.Tensor, query_start: int, query_length: int) -> torch.Tensor:
    """(b, s) key validity → (b, 1, query_length, s) boolean mask: causal, valid keys, and always the query itself.

    Query i sits at column ``query_start + i``. Letting every position see itself keeps rows of padding (no valid
    key at all) finite; their outputs are never read.
    """
    keys = torch.arange(key_mask.shape[1], device=key_mask.device)
    queries = torch.arange(query_start, query_start + query_length, device=key_mask.device)
    causal = keys[None, :] <= queries[:, None]  # (q, s)
    allowed = causal[None] & key_mask.bool()[:, None, :]
    allowed |= keys[None, None, :] == queries[None, :, None]
    return allowed[:, None]


@dataclass
class KVCache:
    """Keys and values of every layer, preallocated for the whole sequence: (layers, b, h, s, dh) each."""

    keys: torch.Tensor
    values: torch.Tensor

    @classmethod
    def empty(cls, model: nn.Module, batch: int, length: int, dtype: torch.dtype, device: torch.device) -> "KVCache":
        config = model.config
        shape = (config.n_layer, batch, config.n_head, length, config.n_embd // config.n_head)
        return cls(torch.empty(shape, dtype=dtype, device=device), torch.empty(shape, dtype=dtype, device=device))


def hidden_states(
    model: nn.Module,
    input_ids: torch.Tensor,
    position_ids: torch.Tensor,
    mask: torch.Tensor,
    cache: KVCache | None = None,
    start: int = 0,
) -> torch.Tensor:
    """(b, s) ids at columns ``start … start+s`` → (b, s, d) final hidden states (after ln_f).

    ``mask``: (b, 1, s, S) boolean from :func:`attention_mask_4d` (S = keys visible: s without a cache, else the
    cache's filled length start+s). With ``cache``, this step's keys/values are written at ``start`` and the
    attention reads columns 0 … start+s.
    """
    trunk = model.transformer
    config = model.config
    heads, head_dim = config.n_head, config.n_embd // config.n_head
    act = _activation(config)
    eps = config.layer_norm_epsilon
    batch, length = input_ids.shape
    h = trunk.wte(input_ids) + trunk.wpe(position_ids)
    end = start + length
    for index, block in enumerate(trunk.h):
        x = F.layer_norm(h, (config.n_embd,), block.ln_1.weight, block.ln_1.bias, eps)
        qkv = _conv1d(block.attn.c_attn, x).view(batch, length, 3, heads, head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (b, h, s, dh)
        if cache is not None:
            cache.keys[index, :, :, start:end] = k
            cache.values[index, :, :, start:end] = v
            k, v = cache.keys[index, :, :, :end], cache.values[index, :, :, :end]
        scale = (1.0 / math.sqrt(head_dim)) if config.scale_attn_weights else 1.0
        if config.scale_attn_by_inverse_layer_idx:
            scale /= float(index + 1)
        a = attention(q, k.to(q.dtype), v.to(q.dtype), mask, scale)
        a = a.transpose(1, 2).reshape(batch, length, config.n_embd)
        h = h + _conv1d(block.attn.c_proj, a)
        x = F.layer_norm(h, (config.n_embd,), block.ln_2.weight, block.ln_2.bias, eps)
        h = h + _conv1d(block.mlp.c_proj, act(_conv1d(block.mlp.c_fc, x)))
    return F.layer_norm(h, (config.n_embd,), trunk.ln_f.weight, trunk.ln_f.bias, eps)


def full_forward(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """(b, s) ids + mask (left- and/or right-padded) → (b, s, d) hidden states, positions counted over real tokens."""
    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    return hidden_states(model, input_ids, position_ids, attention_mask_4d(attention_mask, 0, input_ids.shape[1]))


def lm_logits(model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """(…, d) → (…, v) with the model's (tied) LM head."""
    return F.linear(hidden, model.lm_head.weight)


@dataclass
class Sample:
    responses: torch.Tensor  # (b, t) sampled ids, pad after each row's EOS; t ≤ max_new_tokens (stops when all ended)
    logprobs: torch.Tensor  # (b, t) log softmax(logits / T) of the sampled token, unmodified by min_new_tokens; 0 after EOS
    hidden: torch.Tensor | None  # (b, t, d) final hidden state of the position that chose each token (value heads)


@torch.no_grad()
def sample(
    model: nn.Module,
    query_ids: torch.Tensor,
    query_mask: torch.Tensor,
    max_new_tokens: int,
    temperature: float,
    eos_token_id: int,
    pad_token_id: int,
    uniforms: torch.Tensor | None = None,
    keep_hidden: bool = False,
    generator: torch.Generator | None = None,
) -> Sample:
    """Pure sampling (no top-k/top-p) of up to ``max_new_tokens`` tokens with a preallocated KV cache.

    At least one token per row (EOS is barred at the first step, as ``min_new_tokens=1``); the log-prob recorded is
    that of the unmodified distribution, which is what PPO's ratio compares against. ``uniforms`` (b, ≥t): draw
    token i of row e by inverse transform from ``uniforms[e, i]`` (see ``rlhf.ppo_trainer.inverse_cdf_sample``);
    otherwise ``torch.multinomial`` with ``generator``. Decoding stops as soon as every row has ended.
    """
    device = query_ids.device
    if device.type == "cpu" and torch.is_autocast_enabled("cpu") and model.config.n_embd < CPU_BF16_DECODE_MIN_WIDTH:
        with torch.autocast("cpu", enabled=False):
            return sample(model, query_ids, query_mask, max_new_tokens, temperature, eos_token_id, pad_token_id, uniforms, keep_hidden, generator)
    batch, query_length = query_ids.shape
    dtype = torch.get_autocast_dtype("cuda" if device.type == "cuda" else "cpu") if torch.is_autocast_enabled(device.type) else model.lm_head.weight.dtype
    cache = KVCache.empty(model, batch, query_length + max_new_tokens, dtype, device)
    key_mask = torch.zeros(batch, query_length + max_new_tokens, dtype=torch.bool, device=device)
    key_mask[:, :query_length] = query_mask.bool()
    positions = (query_mask.long().cumsum(-1) - 1).clamp(min=0)
    next_position = positions[:, -1] + 1
    responses = torch.full((batch, max_new_tokens), pad_token_id, dtype=torch.long, device=device)
    logprobs = torch.zeros(batch, max_new_tokens, device=device)
    hiddens = []
    ended = torch.zeros(batch, dtype=torch.bool, device=device)
    # prefill: the whole prompt, keep the last position
    hidden = hidden_states(model, query_ids, positions, attention_mask_4d(key_mask[:, :query_length], 0, query_length), cache, 0)[:, -1]
    steps = 0
    for step in range(max_new_tokens):
        logits = lm_logits(model, hidden).float() / temperature  # (b, v)
        log_distribution = torch.log_softmax(logits, dim=-1)
        choice = log_distribution if step > 0 else log_distribution.index_fill(1, torch.tensor([eos_token_id], device=device), float("-inf"))
        if uniforms is not None:
            cdf = choice.exp().cumsum(-1)
            tokens = torch.searchsorted(cdf, (uniforms[:, step].to(cdf) * cdf[:, -1]).unsqueeze(-1), right=True).squeeze(-1)
            tokens = tokens.clamp(max=logits.shape[-1] - 1)
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
        mask = attention_mask_4d(key_mask[:, : column + 1], column, 1)
        hidden = hidden_states(model, tokens[:, None], next_position[:, None], mask, cache, column)[:, -1]
        next_position = next_position + 1
    return Sample(responses[:, :steps], logprobs[:, :steps], torch.stack(hiddens, 1) if keep_hidden else None)
