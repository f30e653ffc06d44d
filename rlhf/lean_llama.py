"""A lean forward pass (with an optional KV cache) for Llama-family models (Llama, Qwen2, Mistral), on the models'
own weights: the counterpart of :mod:`rlhf.lean_gpt2`, with the same signatures so that :mod:`rlhf.lean` dispatches.

Why: as for GPT-2, at PPO's small CPU sizes the Hugging Face forward and ``generate()`` cost more in Python (output
capturing, mask builders, ``DynamicCache``, logits processors) than in arithmetic: in our PPO loop a Llama policy ran
10–26 % below a GPT-2 of equal size, most of it in generation and in recomputing the old log-probs that the lean
decoder records for free (docs/performance.md § "Llama-family models (issue 14)").

Per decoder layer (pre-norm residual blocks):

- RMSNorm (Zhang & Sennrich 2019, "Root Mean Square Layer Normalization"), normalised in fp32 as ``LlamaRMSNorm``;
- q/k/v projections, with biases where the checkpoint has them (Qwen2);
- rotary position embedding, RoPE (Su et al. 2021, "RoFormer: Enhanced Transformer with Rotary Position
  Embedding"), in the half-split layout of HF's ``rotate_half``. cos/sin come from the model's own rotary module, so
  every ``rope_type`` transformers implements (linear, dynamic NTK, YaRN, LongRoPE, Llama 3) is reproduced;
- grouped-query attention, GQA (Ainslie et al. 2023, "GQA: Training Generalized Multi-Query Transformer Models from
  Multi-Head Checkpoints"): query head i·g + j reads key/value head i, as HF's ``repeat_kv``, but without repeating
  the keys and values: the g query heads of a key/value head share one batched matmul;
- SwiGLU MLP (Shazeer 2020, "GLU Variants Improve Transformer"): down(silu(gate(x)) · up(x)).

While decoding (a KV cache given), q/k/v and gate/up each run as one GEMM over weights that :meth:`KVCache.empty`
concatenates once per ``sample()`` call; the training forward keeps the separate projections (no concatenation in
the autograd graph). Everything runs under autograd and autocast like module code, so the optimiser, DDP and
``accelerate.autocast`` see no difference. :func:`supports` says when these functions apply; everything else
(LoRA adapters, gradient checkpointing, sliding windows, quantised layers) takes the Hugging Face path.

Shapes: b = rows, s = sequence (this call), S = keys visible, h = query heads, kvh = key/value heads, g = h / kvh,
dh = head dim, d = hidden, v = vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from rlhf.lean_gpt2 import KVCache as _KVCache
from rlhf.lean_gpt2 import PackedLinear, attention_mask_4d, pack_linear, packed_linear, packs_decoding_weights

FAMILIES = {"llama", "qwen2", "mistral"}  # same block; Qwen2 adds q/k/v biases, Mistral a sliding window
_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
_MLP = ("gate_proj", "up_proj", "down_proj")


def supports(model: nn.Module) -> bool:
    """Whether ``model`` is a plain Llama/Qwen2/Mistral causal LM or scorer that these functions reproduce exactly."""
    config = getattr(model, "config", None)
    trunk = getattr(model, "model", None)
    if config is None or getattr(config, "model_type", None) not in FAMILIES or trunk is None:
        return False
    if not hasattr(trunk, "layers") or not hasattr(trunk, "rotary_emb") or config.hidden_act != "silu":
        return False
    if _sliding_window_applies(config) or _checkpointing(model) or hasattr(model, "peft_config"):
        return False
    if getattr(config, "attention_dropout", 0.0) > 0 and model.training:
        return False
    return type(trunk.embed_tokens) is nn.Embedding and all(_plain_layer(layer) for layer in trunk.layers)


def _sliding_window_applies(config) -> bool:
    """A sliding window shorter than the context (Mistral; Qwen2 with ``use_sliding_window``) is not reproduced."""
    window = getattr(config, "sliding_window", None)
    if window is None or not getattr(config, "use_sliding_window", True):
        return False
    return window < config.max_position_embeddings


def _checkpointing(model: nn.Module) -> bool:
    checkpointing = getattr(model, "is_activation_checkpointing", None)
    if checkpointing is None:
        checkpointing = getattr(model, "is_gradient_checkpointing", False)
    return bool(checkpointing)


def _plain_layer(layer: nn.Module) -> bool:
    """Every projection exactly ``nn.Linear``: LoRA, quantisation (bitsandbytes subclasses nn.Linear) or a
    tensor-parallel split would swap or subclass them, and the lean path reads ``.weight`` directly."""
    linears = [getattr(layer.self_attn, name) for name in _PROJECTIONS] + [getattr(layer.mlp, name) for name in _MLP]
    return all(type(linear) is nn.Linear for linear in linears)


@dataclass
class Fused:
    """One layer's projections concatenated for decoding, in the decoding dtype: [q; k; v] and [gate; up]."""

    qkv_weight: torch.Tensor  # ((h + 2·kvh)·dh, d)
    qkv_bias: torch.Tensor | None  # ((h + 2·kvh)·dh,) with Qwen2's biases, else None
    gate_up_weight: torch.Tensor  # (2·intermediate, d)
    gate_up_bias: torch.Tensor | None
    # where rlhf.lean_gpt2.packs_decoding_weights: qkv, o_proj, gate_up, down_proj prepacked for the decoder's GEMMs
    packed: tuple[PackedLinear, PackedLinear, PackedLinear, PackedLinear] | None = None


def _cat(tensors: list[torch.Tensor | None], dtype: torch.dtype) -> torch.Tensor | None:
    """Concatenated along the output dimension; None when the layers have no bias. A Llama with ``attention_bias``
    has biases on all of q/k/v; no HF family has them on some only."""
    return None if tensors[0] is None else torch.cat(tensors).to(dtype)


@dataclass
class KVCache(_KVCache):
    """Keys and values of every layer, preallocated for the whole sequence: (layers, b, kvh, length, dh) each; and
    each layer's :class:`Fused` weights (one GEMM for q/k/v and one for gate/up per decoding step)."""

    fused: list[Fused] | None = None

    @classmethod
    def empty(cls, model: nn.Module, batch: int, length: int, dtype: torch.dtype, device: torch.device) -> KVCache:
        config, layers = model.config, model.model.layers
        shape = (config.num_hidden_layers, batch, config.num_key_value_heads, length, layers[0].self_attn.head_dim)
        with torch.no_grad():  # decoding only: the concatenated weights are a snapshot, outside autograd
            fused = [_fuse(layer, dtype, batch if packs_decoding_weights(dtype, device) else None) for layer in layers]
        keys, values = (torch.empty(shape, dtype=dtype, device=device) for _ in range(2))
        return cls(keys, values, fused=fused)


def _fuse(layer: nn.Module, dtype: torch.dtype, packed_rows: int | None = None) -> Fused:
    attn, mlp = layer.self_attn, layer.mlp
    qkv = (attn.q_proj, attn.k_proj, attn.v_proj)
    fused = Fused(
        _cat([p.weight for p in qkv], dtype),
        _cat([p.bias for p in qkv], dtype),
        _cat([mlp.gate_proj.weight, mlp.up_proj.weight], dtype),
        _cat([mlp.gate_proj.bias, mlp.up_proj.bias], dtype),
    )
    if packed_rows is not None:
        fused.packed = (
            pack_linear(fused.qkv_weight, fused.qkv_bias, packed_rows),
            pack_linear(attn.o_proj.weight, attn.o_proj.bias, packed_rows),
            pack_linear(fused.gate_up_weight, fused.gate_up_bias, packed_rows),
            pack_linear(mlp.down_proj.weight, mlp.down_proj.bias, packed_rows),
        )
    return fused


def rms_norm(x: torch.Tensor, norm: nn.Module) -> torch.Tensor:
    """(…, d) → (…, d) as ``LlamaRMSNorm``: normalised in fp32 (a half-precision mean of squares loses precision or
    overflows), cast back, times the weight."""
    return norm.weight * F.rms_norm(x.float(), (x.shape[-1],), eps=norm.variance_epsilon).to(x.dtype)


def rope_tables(trunk: nn.Module, h: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(b, s, d) embeddings, (b, s) positions → cos, signed sin, each (b, s, 1, dh) in h's dtype.

    From the model's own rotary module, so every rope_type (and its attention scaling) is the model's. The sin is
    signed for :func:`rotate`: HF's rotate_half(x)·sin = [−x₂, x₁]·[sin₁, sin₂] = roll(x, dh/2)·[−sin₁, sin₂].
    """
    cos, sin = trunk.rotary_emb(h, position_ids)  # (b, s, dh) each
    half = sin.shape[-1] // 2
    signed = torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)
    return cos[:, :, None], signed[:, :, None]


def rotate(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """(b, s, heads, dh) → the same, rotated: x·cos + rotate_half(x)·sin as one roll and one addcmul."""
    return torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, -1), signed_sin)


def additive_mask(mask: torch.Tensor, kv_heads: int, groups: int) -> torch.Tensor:
    """(b, 1, s, S) boolean (True = visible) → (b·kvh, g·s, S) float: 0 where visible, −inf elsewhere.

    Built once per forward for every layer; rows in the order of :func:`gqa_attention`'s query rows (j·s + t)."""
    batch, _, length, keys = mask.shape
    bias = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device).masked_fill(~mask, float("-inf"))
    return bias[:, :, None].expand(batch, kv_heads, groups, length, keys).reshape(batch * kv_heads, -1, keys)


def gqa_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, bias: torch.Tensor | None, scale: float
) -> torch.Tensor:
    """(b, s, h, dh) queries, (b, kvh, S, dh) keys/values → (b, s, h·dh).

    On CUDA the fused ``scaled_dot_product_attention`` with ``enable_gqa`` and the boolean ``mask`` (b, 1, s, S). On
    the CPU, as in :func:`rlhf.lean_gpt2.attention`, explicit matmuls (torch's CPU flash kernel with a mask is several
    times slower at PPO's lengths): the g query heads of each key/value head become g·s rows of one batched matmul,
    ``baddbmm`` adds the additive ``bias`` (:func:`additive_mask`) and the scale in the same kernel; softmax in fp32.
    """
    batch, length, heads, head_dim = q.shape
    kv_heads = k.shape[1]
    groups = heads // kv_heads
    if q.device.type == "cuda":
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k, v, attn_mask=mask, scale=scale, enable_gqa=True)
        return out.transpose(1, 2).reshape(batch, length, heads * head_dim)
    rows = (
        q.view(batch, length, kv_heads, groups, head_dim).permute(0, 2, 3, 1, 4).reshape(batch * kv_heads, -1, head_dim)
    )
    keys, values = k.reshape(batch * kv_heads, -1, head_dim), v.reshape(batch * kv_heads, -1, head_dim)
    scores = torch.baddbmm(bias.to(rows.dtype), rows, keys.transpose(1, 2), alpha=scale)  # (b·kvh, g·s, S)
    weights = scores.softmax(-1, dtype=torch.float32).to(values.dtype)
    out = torch.bmm(weights, values).view(batch, kv_heads, groups, length, head_dim)
    return out.permute(0, 3, 1, 2, 4).reshape(batch, length, heads * head_dim)


def _qkv(layer: nn.Module, x: torch.Tensor, fused: Fused | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(b, s, d) normed input → qk (b, s, h + kvh, dh), v (b, s, kvh, dh): queries and keys side by side so that RoPE
    rotates both in one pass; q/k/v as one GEMM when decoding (``fused``)."""
    attn = layer.self_attn
    batch, length = x.shape[:2]
    head_dim = attn.head_dim
    heads, kv_heads = attn.q_proj.out_features // head_dim, attn.k_proj.out_features // head_dim
    if fused is not None:
        qkv = (
            packed_linear(x, fused.packed[0])
            if fused.packed is not None
            else F.linear(x, fused.qkv_weight, fused.qkv_bias)
        ).view(batch, length, heads + 2 * kv_heads, head_dim)
        return qkv[:, :, : heads + kv_heads], qkv[:, :, heads + kv_heads :]
    q = F.linear(x, attn.q_proj.weight, attn.q_proj.bias).view(batch, length, heads, head_dim)
    k = F.linear(x, attn.k_proj.weight, attn.k_proj.bias).view(batch, length, kv_heads, head_dim)
    v = F.linear(x, attn.v_proj.weight, attn.v_proj.bias).view(batch, length, kv_heads, head_dim)
    return torch.cat((q, k), dim=2), v


def _mlp(layer: nn.Module, x: torch.Tensor, fused: Fused | None) -> torch.Tensor:
    """(b, s, d) → (b, s, d): SwiGLU, down(silu(gate(x)) · up(x)); gate and up as one GEMM when decoding."""
    mlp = layer.mlp
    if fused is not None and fused.packed is not None:
        gate, up = packed_linear(x, fused.packed[2]).chunk(2, dim=-1)
        return packed_linear(F.silu(gate) * up, fused.packed[3])
    if fused is not None:
        gate, up = F.linear(x, fused.gate_up_weight, fused.gate_up_bias).chunk(2, dim=-1)
    else:
        gate = F.linear(x, mlp.gate_proj.weight, mlp.gate_proj.bias)
        up = F.linear(x, mlp.up_proj.weight, mlp.up_proj.bias)
    return F.linear(F.silu(gate) * up, mlp.down_proj.weight, mlp.down_proj.bias)


def hidden_states(
    model: nn.Module,
    input_ids: torch.Tensor,
    position_ids: torch.Tensor,
    mask: torch.Tensor,
    cache: KVCache | None = None,
    start: int = 0,
) -> torch.Tensor:
    """(b, s) ids at columns ``start … start+s`` → (b, s, d) final hidden states (after the final RMSNorm).

    The contract of :func:`rlhf.lean_gpt2.hidden_states`: ``mask`` (b, 1, s, S) boolean from
    :func:`~rlhf.lean_gpt2.attention_mask_4d`; with ``cache`` (:meth:`KVCache.empty`), this step's keys/values are
    written at ``start`` and the attention reads columns 0 … start+s. A cache means decoding: the projections then
    use its fused weights, a snapshot outside autograd.
    """
    trunk = model.model
    config = model.config
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    h = trunk.embed_tokens(input_ids)
    cos, sin = rope_tables(trunk, h, position_ids)
    bias = None if h.device.type == "cuda" else additive_mask(mask, kv_heads, heads // kv_heads)
    fused = cache.fused if cache is not None else None
    end = start + input_ids.shape[1]
    for index, layer in enumerate(trunk.layers):
        x = rms_norm(h, layer.input_layernorm)
        qk, v = _qkv(layer, x, fused[index] if fused is not None else None)
        qk = rotate(qk, cos.to(qk.dtype), sin.to(qk.dtype))
        q, k, v = qk[:, :, :heads], qk[:, :, heads:].transpose(1, 2), v.transpose(1, 2)  # k, v: (b, kvh, s, dh)
        if cache is not None:
            cache.keys[index, :, :, start:end] = k
            cache.values[index, :, :, start:end] = v
            k, v = cache.keys[index, :, :, :end], cache.values[index, :, :, :end]
        a = gqa_attention(q, k.to(q.dtype), v.to(q.dtype), mask, bias, layer.self_attn.scaling)
        o_proj = layer.self_attn.o_proj
        packed = fused[index].packed if fused is not None else None
        h = h + (packed_linear(a, packed[1]) if packed is not None else F.linear(a, o_proj.weight, o_proj.bias))
        h = h + _mlp(layer, rms_norm(h, layer.post_attention_layernorm), fused[index] if fused is not None else None)
    return rms_norm(h, trunk.norm)


def full_forward(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """(b, s) ids + mask (left- and/or right-padded) → (b, s, d) hidden states, positions counted over real tokens."""
    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    return hidden_states(model, input_ids, position_ids, attention_mask_4d(attention_mask, 0, input_ids.shape[1]))


def lm_logits(model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """(…, d) → (…, v) with the model's LM head (tied to the embeddings or not: ``lm_head`` holds the one in use)."""
    return F.linear(hidden, model.lm_head.weight, model.lm_head.bias)
