"""The lean GPT-2 forward and sampler compute what the Hugging Face model computes."""

from __future__ import annotations

import pytest
import torch
from support import tiny_gpt2_config
from transformers import GPT2Config, GPT2ForSequenceClassification, GPT2LMHeadModel

from rlhf import lean_gpt2
from rlhf.sampling import lean_sample


def tiny_config(**overrides) -> GPT2Config:
    return tiny_gpt2_config(**overrides)


def padded_batch() -> tuple[torch.Tensor, torch.Tensor]:
    """3 rows: left padding of 0/2/1 tokens, right padding of 1/0/2 tokens (prompt + response layout)."""
    torch.manual_seed(1)
    ids = torch.randint(3, 50, (3, 9))
    mask = torch.ones(3, 9, dtype=torch.long)
    mask[1, :2] = 0
    mask[2, :1] = 0
    mask[0, -1:] = 0
    mask[2, -2:] = 0
    return torch.where(mask.bool(), ids, 0), mask


def hf_positions(mask: torch.Tensor) -> torch.Tensor:
    return (mask.cumsum(-1) - 1).clamp(min=0)


@pytest.mark.parametrize("activation", ["gelu_new", "gelu"])
def test_lm_logits_match_hugging_face_on_real_tokens(activation: str) -> None:
    torch.manual_seed(0)
    model = GPT2LMHeadModel(tiny_config(activation_function=activation)).eval()
    ids, mask = padded_batch()
    expected = model(input_ids=ids, attention_mask=mask, position_ids=hf_positions(mask)).logits
    got = lean_gpt2.lm_logits(model, lean_gpt2.full_forward(model, ids, mask))
    real = mask.bool()
    assert lean_gpt2.supports(model)
    assert torch.allclose(got[real], expected[real], atol=1e-5, rtol=1e-5)
    assert torch.isfinite(got).all()  # padding rows stay finite (each position sees itself)


def test_gradients_match_hugging_face() -> None:
    torch.manual_seed(0)
    model = GPT2LMHeadModel(tiny_config())
    ids, mask = padded_batch()
    real = mask.bool()
    model(input_ids=ids, attention_mask=mask, position_ids=hf_positions(mask)).logits[real].square().mean().backward()
    expected = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    lean_gpt2.lm_logits(model, lean_gpt2.full_forward(model, ids, mask))[real].square().mean().backward()
    for want, param in zip(expected, model.parameters()):
        assert torch.allclose(param.grad, want, atol=1e-6, rtol=1e-4)


def test_scalar_model_matches_hugging_face() -> None:
    torch.manual_seed(0)
    model = GPT2ForSequenceClassification(tiny_config(num_labels=1)).eval()
    ids, mask = padded_batch()
    hidden = model.transformer(input_ids=ids, attention_mask=mask, position_ids=hf_positions(mask)).last_hidden_state
    got = model.score(lean_gpt2.full_forward(model, ids, mask))
    assert torch.allclose(got[mask.bool()], model.score(hidden)[mask.bool()], atol=1e-5)


def test_sampler_logprobs_equal_a_full_forward_and_rows_stop_at_eos() -> None:
    """KV-cached decoding with left-padded prompts gives the log-probs a full forward gives (1e-5), EOS at step 0 is
    barred, rows are padded after their EOS, and decoding stops once every row has ended."""
    torch.manual_seed(0)
    model = GPT2LMHeadModel(tiny_config()).eval()
    query = torch.tensor([[0, 0, 5, 6], [7, 8, 9, 10]])
    query_mask = (query != 0).long()
    with torch.no_grad():
        model.lm_head.weight[1] *= 0  # EOS equally likely as others: some rows end early
    generator = torch.Generator().manual_seed(3)
    out = lean_sample(
        model,
        query,
        query_mask,
        max_new_tokens=12,
        temperature=0.7,
        eos_token_id=1,
        pad_token_id=0,
        generator=generator,
        keep_hidden=True,
    )
    t = out.responses.shape[1]
    ended_at = [(row == 1).nonzero()[0].item() if (row == 1).any() else None for row in out.responses]
    assert (out.responses[:, 0] != 1).all()
    response_mask = torch.ones_like(out.responses, dtype=torch.long)
    for row, end in enumerate(ended_at):
        if end is not None:
            response_mask[row, end + 1 :] = 0
            assert (out.responses[row, end + 1 :] == 0).all()
    assert t == 12 or all(end is not None for end in ended_at)
    ids = torch.cat([query, out.responses], 1)
    mask = torch.cat([query_mask, response_mask], 1)
    logits = (
        model(input_ids=ids, attention_mask=mask, position_ids=hf_positions(mask)).logits[:, query.shape[1] - 1 : -1]
        / 0.7
    )
    full = torch.log_softmax(logits, -1).gather(-1, out.responses[..., None]).squeeze(-1)
    valid = response_mask.bool()
    assert torch.allclose(out.logprobs[valid], full[valid], atol=1e-5)
    hidden = model.transformer(input_ids=ids, attention_mask=mask, position_ids=hf_positions(mask)).last_hidden_state[
        :, query.shape[1] - 1 : -1
    ]
    assert torch.allclose(out.hidden[valid], hidden[valid], atol=1e-5)


def test_inverse_cdf_sampling_is_a_function_of_the_uniforms() -> None:
    """The same uniforms give the same tokens whatever rows share the batch."""
    torch.manual_seed(0)
    model = GPT2LMHeadModel(tiny_config()).eval()
    query = torch.tensor([[0, 4, 5], [6, 7, 8]])
    uniforms = torch.rand(2, 6)
    settings = {"max_new_tokens": 6, "temperature": 1.0, "eos_token_id": 1, "pad_token_id": 0}
    both = lean_sample(model, query, (query != 0).long(), **settings, uniforms=uniforms).responses
    alone = lean_sample(model, query[1:], (query[1:] != 0).long(), **settings, uniforms=uniforms[1:]).responses
    assert torch.equal(both[1, : alone.shape[1]], alone[0])


def test_unsupported_models_take_the_hugging_face_path() -> None:
    model = GPT2LMHeadModel(tiny_config())
    model.gradient_checkpointing_enable()
    assert not lean_gpt2.supports(model)
    assert not lean_gpt2.supports(torch.nn.Linear(2, 2))
