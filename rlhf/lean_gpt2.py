"""A lean forward pass (with an optional KV cache) for GPT-2-family models, on the models' own weights.

Why: for the small models PPO runs on a CPU, the Hugging Face forward costs more in Python (output capturing, mask
builders, cache objects, an unfused tanh-GELU of five kernels) than in arithmetic, and ``generate()`` adds its
logits-processor machinery on every token. These functions compute the same numbers (tested against the HF
forward to 1e-5) with a handful of fused kernels per block: ``addmm`` for every projection, attention as two
batched matmuls on the CPU (SDPA on CUDA), ``gelu(approximate="tanh")``, and a preallocated KV cache written in place.

They read the parameters of an unmodified ``GPT2LMHeadModel`` / ``GPT2ForSequenceClassification`` and run under
autograd and autocast like any module code, so the optimiser, DDP and ``accelerate.autocast`` see no difference.
:func:`supports` says when they apply; everything else (LoRA adapters, FSDP's per-block hooks, gradient
checkpointing) takes the Hugging Face path. Callers reach these functions through :mod:`rlhf.lean`, which dispatches
on the architecture (Llama-family models: :mod:`rlhf.lean_llama`). The KV-cached decoder built on them is
:func:`rlhf.sampling.lean_sample`.

Shapes: b = rows, s = sequence, h = heads, d = hidden, dh = d / h, v = vocabulary.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

TANH_GELU = {
    "gelu_new",
    "gelu_pytorch_tanh",
    "gelu_fast",
}  # the same tanh approximation (fast = a cheaper rounding of it)


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


def _conv1d(layer: nn.Module, x: torch.Tensor, packed: PackedLinear | None = None) -> torch.Tensor:
    """GPT-2's Conv1D (weight stored in × out): x @ W + b as one addmm over the flattened rows; with ``packed`` (the
    decoder's CPU bf16 snapshot of this layer, :class:`KVCache`) one oneDNN GEMM on the prepacked weight."""
    if packed is not None:
        return packed_linear(x, packed)
    shape = x.shape[:-1] + (layer.weight.shape[1],)
    return torch.addmm(layer.bias, x.reshape(-1, x.shape[-1]), layer.weight).view(shape)


@dataclass
class PackedLinear:
    """A projection's bf16 weight in oneDNN's blocked layout for GEMMs of a given row count, and its bf16 bias."""

    weight: torch.Tensor
    bias: torch.Tensor | None


def cpu_has_bf16_gemm() -> bool:
    """Whether oneDNN has bf16 GEMM kernels on this CPU (AVX-512, AVX512-BF16 or AMX); without them bf16 matmuls take
    a conversion path many times slower than fp32 (docs/performance.md § "bf16 on the matrix units")."""
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def packs_decoding_weights(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether the decoder prepacks its weights: bf16 on a CPU whose oneDNN has bf16 kernels. A plain bf16 GEMM
    reorders the weight into oneDNN's blocked layout on every call, which at one-token shapes costs about as much as
    the multiply; decoding reuses each weight for every token (docs/performance.md § "bf16 on the matrix units")."""
    return dtype == torch.bfloat16 and device.type == "cpu" and cpu_has_bf16_gemm()


def packed_linear(x: torch.Tensor, packed: PackedLinear) -> torch.Tensor:
    """(…, in) → (…, out) bf16: x (cast to bf16) times the prepacked weight, plus the bias; bitwise a bf16 addmm."""
    return torch.ops.mkldnn._linear_pointwise(x.to(packed.weight.dtype), packed.weight, packed.bias, "none", [], "")


@torch.no_grad()
def pack_linear(weight_out_in: torch.Tensor, bias: torch.Tensor | None, rows: int) -> PackedLinear:
    """(out, in) weight → :class:`PackedLinear` for ``rows``-row bf16 GEMMs (a snapshot, outside autograd)."""
    weight = torch.ops.mkldnn._reorder_linear_weight(weight_out_in.detach().to(torch.bfloat16), rows)
    return PackedLinear(weight, None if bias is None else bias.detach().to(torch.bfloat16))


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float) -> torch.Tensor:
    """(b, h, s, dh) queries, (b, h, S, dh) keys/values, (b, 1, s, S) boolean mask → (b, h, s, dh).

    On CUDA the fused ``scaled_dot_product_attention``. On the CPU, for the short sequences of PPO, two batched
    matmuls and a softmax: at these lengths torch's CPU flash kernel with a mask is several times slower
    (measured: docs/performance.md).
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
    """Keys and values of every layer, preallocated for the whole sequence: (layers, b, h, s, dh) each; and, where
    :func:`packs_decoding_weights`, each layer's projections prepacked for b-row GEMMs (c_attn, attn.c_proj, c_fc,
    mlp.c_proj): a snapshot of the weights taken when decoding starts."""

    keys: torch.Tensor
    values: torch.Tensor
    packed: list[tuple[PackedLinear, ...]] | None = None

    @classmethod
    def empty(cls, model: nn.Module, batch: int, length: int, dtype: torch.dtype, device: torch.device) -> KVCache:
        config = model.config
        shape = (config.n_layer, batch, config.n_head, length, config.n_embd // config.n_head)
        packed = None
        if packs_decoding_weights(dtype, device):
            projections = lambda block: (block.attn.c_attn, block.attn.c_proj, block.mlp.c_fc, block.mlp.c_proj)  # noqa: E731
            packed = [
                tuple(pack_linear(p.weight.t(), p.bias, batch) for p in projections(block))
                for block in model.transformer.h
            ]
        return cls(
            torch.empty(shape, dtype=dtype, device=device), torch.empty(shape, dtype=dtype, device=device), packed
        )


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
        packed = cache.packed[index] if cache is not None and cache.packed is not None else (None,) * 4
        x = F.layer_norm(h, (config.n_embd,), block.ln_1.weight, block.ln_1.bias, eps)
        qkv = _conv1d(block.attn.c_attn, x, packed[0]).view(batch, length, 3, heads, head_dim)
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
        h = h + _conv1d(block.attn.c_proj, a, packed[1])
        x = F.layer_norm(h, (config.n_embd,), block.ln_2.weight, block.ln_2.bias, eps)
        h = h + _conv1d(block.mlp.c_proj, act(_conv1d(block.mlp.c_fc, x, packed[2])), packed[3])
    return F.layer_norm(h, (config.n_embd,), trunk.ln_f.weight, trunk.ln_f.bias, eps)


def full_forward(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """(b, s) ids + mask (left- and/or right-padded) → (b, s, d) hidden states, positions counted over real tokens."""
    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    return hidden_states(model, input_ids, position_ids, attention_mask_4d(attention_mask, 0, input_ids.shape[1]))


def lm_logits(model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """(…, d) → (…, v) with the model's (tied) LM head."""
    return F.linear(hidden, model.lm_head.weight)
