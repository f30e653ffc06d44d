"""Fixtures shared by the library tests."""

from __future__ import annotations

import pytest


@pytest.fixture
def tiny_tokenizer():
    """Whitespace word-level tokenizer built locally: one token per word."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "the": 1, "plot": 2, "was": 3, "good": 4}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]")
