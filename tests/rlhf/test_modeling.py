"""Masking and padding: scores and logprobs must not depend on how a batch was padded."""

from __future__ import annotations

import pytest
import torch
from transformers import GPT2Config, GPT2ForSequenceClassification, GPT2LMHeadModel

from rlhf.modeling import (
    last_real_index,
    left_pad,
    per_token_scalars,
    position_ids_from_mask,
    right_pad,
    sequence_scores,
)
from rlhf.rollout import response_logprobs

PAD = 0


@pytest.fixture(scope="module")
def tiny_models() -> tuple[GPT2LMHeadModel, GPT2ForSequenceClassification]:
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=20,
        n_positions=32,
        n_embd=16,
        n_layer=2,
        n_head=2,
        resid_pdrop=0,
        embd_pdrop=0,
        attn_pdrop=0,
        pad_token_id=PAD,
    )
    return GPT2LMHeadModel(config).eval(), GPT2ForSequenceClassification(
        GPT2Config(**{**config.to_dict(), "num_labels": 1})
    ).eval()


def test_position_ids_count_only_real_tokens() -> None:
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 0]])
    # left padding: positions start at the first real token; right padding: pads after the end repeat nothing harmful
    assert position_ids_from_mask(mask).tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 3, 3]]


def test_last_real_index_for_left_and_right_padding() -> None:
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 0, 0], [0, 0, 0, 0, 0]])
    assert last_real_index(mask).tolist() == [4, 2, -1]


def test_sequence_score_is_read_at_the_last_real_token_whatever_the_padding(tiny_models) -> None:
    _, scorer = tiny_models
    sequences = [[5, 6, 7, 8], [9, 10]]
    left_ids, left_mask = left_pad(sequences, PAD)
    right_ids, right_mask = right_pad(sequences, PAD)
    alone = torch.stack(
        [sequence_scores(scorer, torch.tensor([s]), torch.ones(1, len(s), dtype=torch.long))[0] for s in sequences]
    )
    torch.testing.assert_close(sequence_scores(scorer, left_ids, left_mask), alone, atol=1e-5, rtol=0)
    torch.testing.assert_close(sequence_scores(scorer, right_ids, right_mask), alone, atol=1e-5, rtol=0)
    # and it is the per-token output at the EOS (last real) position, not at the pad after it
    per_token = per_token_scalars(scorer, right_ids, right_mask)
    assert torch.isclose(per_token[1, 1], alone[1], atol=1e-5)


def test_response_logprobs_do_not_depend_on_left_padding_of_the_query(tiny_models) -> None:
    policy, _ = tiny_models
    queries = [[3, 4, 5], [6]]
    query_ids, query_mask = left_pad(queries, PAD)
    responses = torch.tensor([[7, 8, 1], [9, 2, PAD]])
    response_mask = torch.tensor([[True, True, True], [True, True, False]])
    batched = response_logprobs(policy, query_ids, query_mask, responses, response_mask, temperature=0.7)
    for row, query in enumerate(queries):
        alone = response_logprobs(
            policy,
            torch.tensor([query]),
            torch.ones(1, len(query), dtype=torch.long),
            responses[row : row + 1],
            response_mask[row : row + 1],
            temperature=0.7,
        )
        valid = response_mask[row]
        torch.testing.assert_close(batched[row][valid], alone[0][valid], atol=1e-5, rtol=0)
