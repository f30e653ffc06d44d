"""One sampling entry point (rlhf.sampling.sample): the decoder it picks, and the one inverse-CDF draw both use."""

from __future__ import annotations

import torch
from support import tiny_gpt2_config
from transformers import GPT2LMHeadModel

from rlhf.sampling import sample

EOS, PAD = 1, 0


def tiny_policy() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    config = tiny_gpt2_config()  # EOS 1, pad 0
    model = GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        model.lm_head.weight[EOS] *= 0  # EOS about as likely as any token: some rows end early
    return model


QUERY = torch.tensor([[0, 0, 5, 6], [7, 8, 9, 10], [0, 11, 12, 13]])


def test_both_decoders_draw_the_same_tokens_from_the_same_uniforms() -> None:
    """The lean decoder and generate() (through InverseCDFSampler) share rlhf.sampling.inverse_cdf: equal tokens."""
    policy, uniforms = tiny_policy(), torch.rand(3, 10, generator=torch.Generator().manual_seed(1))
    lean = sample(policy, QUERY, (QUERY != 0).long(), 10, 0.8, EOS, PAD, uniforms=uniforms, lean=True)
    hugging_face = sample(policy, QUERY, (QUERY != 0).long(), 10, 0.8, EOS, PAD, uniforms=uniforms, lean=False)
    assert lean.responses.shape == hugging_face.responses.shape == (3, 10)  # both padded to max_new_tokens
    assert torch.equal(lean.responses, hugging_face.responses)
    assert (lean.responses == EOS).any(), "the rows end at an EOS, so the padding after it is compared too"


def test_the_default_decoder_is_the_lean_one_where_it_applies_and_only_it_records_log_probs() -> None:
    policy = tiny_policy()
    torch.manual_seed(3)
    drawn = sample(policy, QUERY, (QUERY != 0).long(), 10, 1.0, EOS, PAD, keep_hidden=True)
    assert drawn.logprobs is not None and drawn.hidden.shape[:2] == drawn.logprobs.shape
    assert (drawn.responses[:, 0] != EOS).all()  # at least one token per row, as generate(min_new_tokens=1)
    policy.gradient_checkpointing_enable()  # the lean decoder does not support it: generate() samples
    drawn = sample(policy, QUERY, (QUERY != 0).long(), 10, 1.0, EOS, PAD)
    assert drawn.logprobs is None and drawn.hidden is None and drawn.responses.shape == (3, 10)
