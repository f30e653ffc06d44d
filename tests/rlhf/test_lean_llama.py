"""The lean Llama-family forward and decoder (rlhf.lean_llama, through the rlhf.lean dispatch) compute what the
Hugging Face model computes: a Llama with grouped-query attention and an untied head, a Qwen2 with q/k/v biases and a
tied head, a Mistral without sliding window."""

from __future__ import annotations

import random

import pytest
import torch
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    LlamaForSequenceClassification,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from rlhf import lean, lean_llama
from rlhf.modeling import causal_lm_logits, enable_gradient_checkpointing, per_token_scalars
from rlhf.sampling import sample

EOS, PAD, BOS = 1, 0, 2
SHAPE = dict(
    vocab_size=50,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,  # grouped-query attention: 2 query heads per key/value head
    max_position_embeddings=64,
    rms_norm_eps=1e-5,
    eos_token_id=EOS,
    pad_token_id=PAD,
    bos_token_id=BOS,
)
FAMILIES = {
    "llama": (LlamaConfig, LlamaForCausalLM, {"tie_word_embeddings": False}),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM, {"tie_word_embeddings": True}),
    "mistral": (MistralConfig, MistralForCausalLM, {"sliding_window": None, "num_key_value_heads": 1}),
}


def tiny_config(family: str, **overrides):
    config_class, _, family_settings = FAMILIES[family]
    return config_class(**(SHAPE | family_settings | overrides))


def tiny_model(family: str, **overrides) -> torch.nn.Module:
    """A random-init model of ``family``, eval mode; Qwen2's q/k/v biases random (HF initialises them to 0), so that
    the bias path is exercised; EOS about as likely as any token, so that some sampled rows end early."""
    torch.manual_seed(0)
    model = FAMILIES[family][1](tiny_config(family, **overrides)).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            for projection in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                if projection.bias is not None:
                    torch.nn.init.normal_(projection.bias, std=0.5)
        model.lm_head.weight[EOS] *= 0
    return model


def padded_batch() -> tuple[torch.Tensor, torch.Tensor]:
    """3 rows: left padding of 0/2/1 tokens, right padding of 1/0/2 tokens (prompt + response layout)."""
    torch.manual_seed(1)
    ids = torch.randint(3, 50, (3, 9))
    mask = torch.ones(3, 9, dtype=torch.long)
    mask[1, :2] = 0
    mask[2, :1] = 0
    mask[0, -1:] = 0
    mask[2, -2:] = 0
    return torch.where(mask.bool(), ids, PAD), mask


def hf_positions(mask: torch.Tensor) -> torch.Tensor:
    """Positions counted over real tokens, as rlhf.modeling passes them to the HF forward."""
    return (mask.cumsum(-1) - 1).clamp(min=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_match_hugging_face_on_real_tokens(family: str) -> None:
    model = tiny_model(family)
    ids, mask = padded_batch()
    expected = model(input_ids=ids, attention_mask=mask, position_ids=hf_positions(mask)).logits
    got = lean.lm_logits(model, lean.full_forward(model, ids, mask))
    real = mask.bool()
    assert lean.supports(model) and lean_llama.supports(model)
    assert torch.allclose(got[real], expected[real], atol=1e-5, rtol=1e-5)
    assert torch.isfinite(got).all()  # padding rows stay finite (each position sees itself)
    assert torch.equal(causal_lm_logits(model, ids, mask), got)  # rlhf.modeling takes the lean path


@pytest.mark.parametrize(
    "rope",
    [
        {"rope_type": "linear", "factor": 2.0, "rope_theta": 500.0},
        {"rope_type": "yarn", "factor": 2.0, "rope_theta": 10000.0, "original_max_position_embeddings": 8},
    ],
)
def test_scaled_rope_comes_from_the_models_own_rotary_module(rope: dict) -> None:
    """cos/sin (and YaRN's attention scaling) are the model's: scaled RoPE variants match HF too."""
    model = tiny_model("llama", rope_parameters=rope)
    ids, mask = padded_batch()
    expected = model(input_ids=ids, attention_mask=mask, position_ids=hf_positions(mask)).logits
    got = lean.lm_logits(model, lean.full_forward(model, ids, mask))
    assert torch.allclose(got[mask.bool()], expected[mask.bool()], atol=1e-5, rtol=1e-5)


def test_a_head_dim_other_than_width_over_heads_matches_hugging_face() -> None:
    """``head_dim`` set in the config (q/k/v project to heads · head_dim ≠ hidden size) is read from the model."""
    model = tiny_model("llama", head_dim=16)
    ids, mask = padded_batch()
    expected = model(input_ids=ids, attention_mask=mask, position_ids=hf_positions(mask)).logits
    got = lean.lm_logits(model, lean.full_forward(model, ids, mask))
    assert torch.allclose(got[mask.bool()], expected[mask.bool()], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_gradients_match_hugging_face(family: str) -> None:
    model = tiny_model(family).train()
    ids, mask = padded_batch()
    real = mask.bool()
    model(input_ids=ids, attention_mask=mask, position_ids=hf_positions(mask)).logits[real].square().mean().backward()
    expected = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    lean.lm_logits(model, lean.full_forward(model, ids, mask))[real].square().mean().backward()
    for want, param in zip(expected, model.parameters()):
        assert torch.allclose(param.grad, want, atol=1e-6, rtol=1e-4)


QUERY = torch.tensor([[0, 0, 5, 6], [7, 8, 9, 10], [0, 11, 12, 13]])


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_lean_decoder_draws_generates_tokens_and_records_their_log_probs(family: str) -> None:
    """With the same uniforms, the KV-cached lean decoder and generate() (InverseCDFSampler) draw the same tokens;
    the log-probs and hidden states it records are those of a full HF forward over prompt + response."""
    model = tiny_model(family)
    uniforms = torch.rand(3, 10, generator=torch.Generator().manual_seed(1))
    query_mask = (QUERY != PAD).long()
    drawn = sample(model, QUERY, query_mask, 10, 0.8, EOS, PAD, uniforms=uniforms, keep_hidden=True)
    hugging_face = sample(model, QUERY, query_mask, 10, 0.8, EOS, PAD, uniforms=uniforms, lean=False)
    assert drawn.logprobs is not None, "the default decoder for a supported Llama is the lean one"
    assert torch.equal(drawn.responses, hugging_face.responses)
    assert (drawn.responses == EOS).any(), "some rows end at an EOS, so the padding after it is compared too"
    t = drawn.logprobs.shape[1]
    responses = drawn.responses[:, :t]
    eos = (responses == EOS).long()
    response_mask = (eos.cumsum(1) - eos) == 0  # up to and including the first EOS
    ids = torch.cat([QUERY, responses], 1)
    mask = torch.cat([query_mask, response_mask.long()], 1)
    with torch.no_grad():
        output = model(input_ids=ids, attention_mask=mask, position_ids=hf_positions(mask), output_hidden_states=True)
    q = QUERY.shape[1]
    full = torch.log_softmax(output.logits[:, q - 1 : -1] / 0.8, -1).gather(-1, responses[..., None]).squeeze(-1)
    assert torch.allclose(drawn.logprobs[response_mask], full[response_mask], atol=1e-5)
    assert (drawn.logprobs[~response_mask] == 0).all()
    hidden = output.hidden_states[-1][:, q - 1 : -1]  # after the final norm: the LM head's input
    assert torch.allclose(drawn.hidden[response_mask], hidden[response_mask], atol=1e-5)


def test_narrow_models_decode_in_fp32_under_cpu_autocast() -> None:
    """rlhf.sampling reads the width from config.hidden_size (Llama configs have no n_embd): rows × width below
    CPU_BF16_DECODE_MIN_ELEMENTS decode in fp32 under bf16 autocast, so they draw what they draw without autocast."""
    model = tiny_model("llama")
    uniforms = torch.rand(3, 6, generator=torch.Generator().manual_seed(2))
    plain = sample(model, QUERY, (QUERY != PAD).long(), 6, 1.0, EOS, PAD, uniforms=uniforms)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast = sample(model, QUERY, (QUERY != PAD).long(), 6, 1.0, EOS, PAD, uniforms=uniforms)
    assert torch.equal(plain.responses, autocast.responses) and torch.equal(plain.logprobs, autocast.logprobs)


def test_scorer_per_token_scalars_match_hugging_face() -> None:
    """A LlamaForSequenceClassification (reward model, critic): the lean trunk feeds the score head as HF's does."""
    torch.manual_seed(0)
    scorer = LlamaForSequenceClassification(tiny_config("llama", num_labels=1)).eval()
    ids, mask = padded_batch()
    assert lean.supports(scorer)
    got = per_token_scalars(scorer, ids, mask)
    expected = per_token_scalars(scorer, ids, mask, lean=False)
    assert torch.allclose(got[mask.bool()], expected[mask.bool()], atol=1e-5)


def test_ppo_rollout_log_probs_equal_the_training_forwards_before_any_update() -> None:
    """In the PPO loop a Llama policy + critic run lean: the sampler's log-probs serve as the old log-probs, and the
    first minibatch's lean training forward reproduces them (ratio 1, approx KL 0)."""
    from rlhf import embedded
    from rlhf.config import PPOConfig
    from rlhf.modeling import RewardNormalization
    from rlhf.ppo_trainer.experience import add_advantages, collect_experience
    from rlhf.ppo_trainer.losses import ppo_minibatch_loss
    from rlhf.ppo_trainer.models import PolicyAndCritic, PPOModels

    rng = random.Random(0)
    tokenizer = embedded.train_tokenizer([embedded.sample_review(rng) for _ in range(200)])
    ids = {"vocab_size": len(tokenizer), "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}
    ids["bos_token_id"] = tokenizer.bos_token_id

    def policy():
        torch.manual_seed(0)
        return LlamaForCausalLM(tiny_config("llama", **ids)).eval()

    def scorer():
        torch.manual_seed(1)
        return LlamaForSequenceClassification(tiny_config("llama", num_labels=1, **ids)).eval()

    models = PPOModels(policy(), policy(), scorer(), scorer(), RewardNormalization(), tokenizer)
    trainable = PolicyAndCritic(models.policy, models.critic)
    assert trainable.lean
    config = PPOConfig(response_length=8, temperature=0.7)
    prompts = ["the plot was", "the music was very lovely and the cast was", "the film was"]
    torch.manual_seed(0)
    experience = collect_experience(
        models, trainable, prompts, config, forward_batch_size=2, device=torch.device("cpu")
    )
    assert torch.allclose(experience.logprobs, experience.ref_logprobs, atol=1e-5)
    experience = add_advantages(experience, config, kl_coef=0.1, all_reduce_sum=None)
    _, stats = ppo_minibatch_loss(trainable, experience, config)
    assert float(stats["ppo/policy/approxkl"]) < 1e-10 and float(stats["ppo/policy/clipfrac"]) == 0.0


def test_unsupported_models_take_the_hugging_face_path() -> None:
    """LoRA (wrapped, or its layers injected), gradient checkpointing, a sliding window shorter than the context and
    attention dropout in training are not reproduced: those models keep the HF forward and generate()."""
    from peft import LoraConfig, get_peft_model

    wrapped = get_peft_model(tiny_model("llama"), LoraConfig(r=2, target_modules=["v_proj"], task_type="CAUSAL_LM"))
    assert not lean.supports(wrapped)
    assert not lean.supports(wrapped.get_base_model())  # the base model now holds lora.Linear layers
    checkpointing = tiny_model("qwen2")
    enable_gradient_checkpointing(checkpointing)  # as PPO's gradient_checkpointing option does
    assert not lean.supports(checkpointing.train())
    assert not lean.supports(tiny_model("mistral", sliding_window=16))
    assert not lean.supports(tiny_model("qwen2", use_sliding_window=True, sliding_window=16, max_window_layers=0))
    assert not lean.supports(tiny_model("llama", attention_dropout=0.1).train())
    assert lean.supports(tiny_model("llama", attention_dropout=0.1).eval())
    assert not lean.supports(torch.nn.Linear(2, 2))
    drawn = sample(checkpointing.eval(), QUERY, (QUERY != PAD).long(), 4, 1.0, EOS, PAD)
    assert drawn.logprobs is None  # generate() sampled


@pytest.mark.parametrize("family", ["gpt2", "qwen2"])
def test_prepacked_bf16_decoding_draws_what_plain_bf16_gemms_draw(family: str, monkeypatch) -> None:
    """On a CPU with oneDNN bf16 kernels the decoder prepacks each projection once (rlhf.lean_gpt2.pack_linear);
    the tokens, log-probs and hidden states are bitwise those of the bf16 GEMMs it replaces."""
    from support import tiny_gpt2_config
    from transformers import GPT2LMHeadModel

    from rlhf import lean_gpt2
    from rlhf.sampling import lean_sample

    if not lean_gpt2.packs_decoding_weights(torch.bfloat16, torch.device("cpu")):
        pytest.skip("this CPU's oneDNN has no bf16 kernels: the decoder does not prepack here")
    torch.manual_seed(0)
    model = GPT2LMHeadModel(tiny_gpt2_config(vocab_size=50)).eval() if family == "gpt2" else tiny_model(family)
    uniforms = torch.rand(3, 6, generator=torch.Generator().manual_seed(3))

    def draw():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return lean_sample(
                model,
                QUERY,
                (QUERY != PAD).long(),
                uniforms=uniforms,
                keep_hidden=True,
                max_new_tokens=6,
                temperature=1.0,
                eos_token_id=EOS,
                pad_token_id=PAD,
            )

    packed = draw()
    cache = lean.empty_cache(model, 3, 8, torch.bfloat16, torch.device("cpu"))
    assert (cache.packed if family == "gpt2" else cache.fused[0].packed) is not None
    monkeypatch.setattr(lean_gpt2, "packs_decoding_weights", lambda dtype, device: False)
    monkeypatch.setattr(lean_llama, "packs_decoding_weights", lambda dtype, device: False)
    plain = draw()
    assert torch.equal(packed.responses, plain.responses)
    assert torch.equal(packed.logprobs, plain.logprobs) and torch.equal(packed.hidden, plain.hidden)
