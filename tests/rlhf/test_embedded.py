import random

import pytest
from transformers import AutoTokenizer

from rlhf.embedded import (
    ADJECTIVES,
    INVALID_SCORE,
    NOUNS,
    Clause,
    gold_score,
    is_held_out,
    is_valid,
    make_corpus,
    parse_review,
    sample_review,
    split_prompt,
    train_tokenizer,
    vocabulary,
)


def test_lexicon_is_balanced_and_words_are_unambiguous():
    assert len(NOUNS) == 16 and len(ADJECTIVES) == 30
    assert sum(ADJECTIVES.values()) == 0.0  # uniform adjectives → sentiment-neutral demonstrations
    words = vocabulary()
    assert len(words) == len(set(words))  # a word has one grammatical role


@pytest.mark.parametrize(
    "prompt, response, expected",
    [
        ("the plot was", " very lovely but the music was dull .", 1.0),  # (1.5·2 + 1·(−1)) / 2 = 1.0
        ("the plot was", " very lovely .", 3.0),  # 1.5·2, the maximum
        ("the film was", " very awful .", -3.0),  # 1.5·(−2), the lowest valid score
        ("the scenery was", " rather brilliant .", 2.0),  # 1.0·2
        ("the film was", " long .", 0.0),
        # (0.75·1 + 1.25·(−2) + 0) / 3 = −1.75 / 3
        ("the cast was somewhat good and the story was", " quite terrible and the ending was loud .", -1.75 / 3),
        ("", "the acting was nice .", 1.0),  # the whole review as the response
    ],
)
def test_gold_score_by_hand(prompt, response, expected):
    assert gold_score(prompt, response) == pytest.approx(expected)


def test_parse_review_clauses():
    assert parse_review("the plot was very lovely but the music was dull .") == [
        Clause("plot", "very", "lovely"),
        Clause("music", None, "dull"),
    ]
    assert parse_review(" the plot was lovely .") is not None  # one leading space is allowed


@pytest.mark.parametrize(
    "text",
    [
        "the plot was lovely and the plot was dull .",  # repeated noun
        "the plot was good and the cast was good and the music was good and the film was good .",  # 4 clauses
        "the plot was lovely",  # missing period
        "the plot was lovely.",  # period not a separate word
        "asdf qwerty",
        "the plot was lovely . and",  # text after the period
        "the plot was lovely .the",
        "the plot was lovely was lovely .",  # the reward-hacking pattern seen in the prototype
        "the plot was  lovely .",  # extra whitespace
        "the plot was lovely . ",
        "  the plot was lovely .",  # only one leading space may be stripped
        "the plot was lovely\n.",
        "the plot was very very lovely .",
        "the plot was very .",
        "the plot was lovely and .",
        "the plot was lovely and the music was",
        "the lovely was plot .",
        "The plot was lovely .",
        "the villain was lovely .",  # unknown noun
        ".",
        "",
    ],
)
def test_invalid_reviews(text):
    assert parse_review(text) is None
    assert not is_valid("", text)
    assert gold_score("", text) == INVALID_SCORE


def test_invalid_scores_below_every_valid_score():
    assert INVALID_SCORE < gold_score("the film was", " very awful .")


def test_sampled_reviews_are_valid_and_round_trip_through_split_prompt():
    rng = random.Random(0)
    n, n_long, clause_counts, total_gold = 2000, 0, [0, 0, 0], 0.0
    for _ in range(n):
        review = sample_review(rng)
        clauses = parse_review(review)
        assert clauses is not None, review
        clause_counts[len(clauses) - 1] += 1
        prompt, response = split_prompt(review, rng)
        assert prompt + response == review
        assert prompt.endswith(" was") and response.startswith(" ") and response.endswith(" .")
        n_long += len(prompt.split(" ")) > 3
        total_gold += gold_score(prompt, response)
    assert all(abs(c / n - p) < 0.04 for c, p in zip(clause_counts, (0.35, 0.40, 0.25)))
    assert 0.24 < n_long / n < 0.34  # ≈ 0.45 · 0.65
    assert abs(total_gold / n) < 0.1  # lexicon mean is 0, so demonstrations are neutral on average


def test_split_prompt_long_form_shape():
    rng = random.Random(3)
    review = "the plot was very lovely but the music was dull ."
    forms = {split_prompt(review, rng) for _ in range(50)}
    assert forms == {
        ("the plot was", " very lovely but the music was dull ."),
        ("the plot was very lovely but the music was", " dull ."),
    }
    assert {split_prompt("the plot was dull .", rng) for _ in range(20)} == {("the plot was", " dull .")}
    with pytest.raises(ValueError):
        split_prompt("the plot was", rng)


def _long_key(prompt):
    words = prompt.split(" ")
    return (words[1], words[-5], words[-4], words[-2]) if len(words) > 3 else None


def test_make_corpus_sizes_determinism_and_validity():
    corpus = make_corpus(seed=7, n_demonstrations=400, n_train_prompts=200, n_eval_prompts=100)
    assert {k: len(v) for k, v in corpus.items()} == {
        "sft_train": 400,
        "sft_eval": 20,
        "prompts_train": 200,
        "prompts_eval": 100,
    }
    assert corpus == make_corpus(seed=7, n_demonstrations=400, n_train_prompts=200, n_eval_prompts=100)
    assert corpus != make_corpus(seed=8, n_demonstrations=400, n_train_prompts=200, n_eval_prompts=100)
    for row in corpus["sft_train"] + corpus["sft_eval"]:
        assert set(row) == {"prompt", "response"} and is_valid(row["prompt"], row["response"])
    for row in corpus["prompts_train"] + corpus["prompts_eval"]:
        assert set(row) == {"prompt"} and is_valid(row["prompt"], " good .")


def test_make_corpus_eval_long_prompts_are_held_out():
    corpus = make_corpus(seed=0, n_demonstrations=600, n_train_prompts=300, n_eval_prompts=300)
    train_prompts = {r["prompt"] for r in corpus["prompts_train"]}
    eval_prompts = {r["prompt"] for r in corpus["prompts_eval"]}
    eval_long = {p for p in eval_prompts if _long_key(p)}
    shared = train_prompts & eval_prompts
    assert eval_long and all(is_held_out(_long_key(p)) for p in eval_long)
    assert all(len(p.split(" ")) == 3 for p in shared)  # only the 16 short "the N was" forms are shared
    # No training text contains a held-out combination, not even inside a demonstration.
    for row in corpus["sft_train"] + corpus["prompts_train"]:
        words = (row["prompt"] + row.get("response", "")).split(" ")
        conjunction_positions = [i for i, w in enumerate(words) if w in ("and", "but")]
        if conjunction_positions:  # the long prompt this text would give: up to "and|but the N2 was"
            first_two_clauses = " ".join(words[: conjunction_positions[0] + 4])
            assert not is_held_out(_long_key(first_two_clauses))
    # The long-prompt share is about the same on both sides (≈ 29 %).
    long_share = [sum(bool(_long_key(r["prompt"])) for r in corpus[k]) / 300 for k in ("prompts_train", "prompts_eval")]
    assert all(0.18 < s < 0.40 for s in long_share)


@pytest.fixture(scope="module")
def tokenizer():
    corpus = make_corpus(seed=0, n_demonstrations=200, n_train_prompts=0, n_eval_prompts=0)
    return train_tokenizer(r["prompt"] + r["response"] for r in corpus["sft_train"])


def test_every_grammar_word_is_one_token(tokenizer):
    for word in vocabulary():
        assert len(tokenizer.encode(" " + word)) == 1, word
    assert len(tokenizer) <= 512


def test_tokenizer_round_trip_and_concatenation(tokenizer):
    for text in ["the plot was very lovely but the music was dull .", "  odd spacing\tand naïve 🎬 text!"]:
        assert tokenizer.decode(tokenizer.encode(text)) == text
    rng = random.Random(1)
    for _ in range(50):
        prompt, response = split_prompt(sample_review(rng), rng)
        assert tokenizer.encode(prompt + response) == tokenizer.encode(prompt) + tokenizer.encode(response)


def test_tokenizer_special_tokens(tokenizer, tmp_path):
    assert tokenizer.eos_token == tokenizer.bos_token == "<|endoftext|>"
    assert tokenizer.pad_token == "<|pad|>" and tokenizer.pad_token_id != tokenizer.eos_token_id
    assert tokenizer.padding_side == "left" and tokenizer.model_max_length == 128
    batch = tokenizer(["the plot was", "the plot was very lovely and the cast was"], padding=True)
    assert batch["input_ids"][0][0] == tokenizer.pad_token_id  # left padding
    tokenizer.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    assert reloaded.pad_token_id == tokenizer.pad_token_id and reloaded.padding_side == "left"
    assert reloaded.encode("the plot was dull .") == tokenizer.encode("the plot was dull .")


def test_tokenizer_too_small_vocab_is_an_error():
    with pytest.raises(ValueError, match="vocab_size=300"):
        train_tokenizer(["the plot was dull ."], vocab_size=300)
