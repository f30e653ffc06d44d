"""The embedded default task: make movie-review continuations positive (docs/design.md §5).

A laptop-scale stand-in for the "positive continuations" experiment of lm-human-preferences and TRL's
sentiment demo, fully offline and deterministic. Reviews come from a tiny grammar::

    review := clause ((" and " | " but ") clause){0,2} " ."
    clause := "the " NOUN " was " [ADVERB " "] ADJECTIVE

e.g. ``the plot was very lovely but the music was dull .``. The hidden gold judge (`gold_score`) is the mean
lexicon sentiment of the clauses; anything outside the grammar scores `INVALID_SCORE`, below every valid
review, so a policy cannot gain by breaking the grammar. The policy never sees this function: only the
simulated annotator (rlhf/annotators.py) and the evaluation do.
"""

from __future__ import annotations

import random
import zlib
from collections.abc import Iterable
from dataclasses import dataclass

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

NOUNS: tuple[str, ...] = (
    "plot",
    "acting",
    "music",
    "ending",
    "cast",
    "story",
    "script",
    "film",
    "dialogue",
    "pacing",
    "soundtrack",
    "scenery",
    "humour",
    "director",
    "lighting",
    "costumes",
)

# Six adjectives per sentiment level, so the lexicon mean is exactly 0: uniformly sampled demonstrations are
# sentiment-neutral on average and SFT alone leaves room for PPO to improve.
ADJECTIVES: dict[str, float] = {
    **dict.fromkeys(("wonderful", "brilliant", "superb", "lovely", "excellent", "stunning"), 2.0),
    **dict.fromkeys(("good", "nice", "fun", "charming", "clever", "pleasant"), 1.0),
    **dict.fromkeys(("long", "short", "loud", "simple", "quiet", "modern"), 0.0),
    **dict.fromkeys(("dull", "weak", "messy", "slow", "bland", "clumsy"), -1.0),
    **dict.fromkeys(("awful", "terrible", "dreadful", "boring", "painful", "horrible"), -2.0),
}

# Intensity multipliers on the adjective's sentiment; a clause without an adverb counts as 1.0.
ADVERBS: dict[str, float] = {"very": 1.5, "quite": 1.25, "rather": 1.0, "somewhat": 0.75}

CONJUNCTIONS: tuple[str, ...] = ("and", "but")
FUNCTION_WORDS: tuple[str, ...] = ("the", "was", *CONJUNCTIONS, ".")
MAX_CLAUSES = 3
# Lowest valid score is very·(−2) = −3; invalid text must rank below every valid review.
INVALID_SCORE = -4.0

CLAUSE_COUNT_WEIGHTS = (0.35, 0.40, 0.25)  # P(1, 2, 3 clauses) in sampled demonstrations
ADVERB_PROB = 0.4
# Long prompts need ≥ 2 clauses (65 % of reviews): 0.45 · 0.65 ≈ 29 % of all prompts are long.
LONG_PROMPT_PROB = 0.45
# Share of (noun, adjective, conjunction, noun2) combinations reserved for evaluation prompts.
HELD_OUT_FRACTION = 0.1

BOS_EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
MODEL_MAX_LENGTH = 128
# A cap, not the final size: 258 byte/special tokens + ~210 merges make every grammar word one token (≈ 467),
# after which BPE has nothing left to merge. 400 is too small once all 256 bytes stay in the alphabet.
TOKENIZER_VOCAB_SIZE = 512


def vocabulary() -> list[str]:
    """Every word the grammar can produce (the period included)."""
    return [*FUNCTION_WORDS, *NOUNS, *ADVERBS, *ADJECTIVES]


@dataclass(frozen=True)
class Clause:
    noun: str
    adverb: str | None
    adjective: str

    def words(self) -> list[str]:
        adverb = [self.adverb] if self.adverb else []
        return ["the", self.noun, "was", *adverb, self.adjective]

    def sentiment(self) -> float:
        multiplier = ADVERBS[self.adverb] if self.adverb else 1.0
        return multiplier * ADJECTIVES[self.adjective]


def _parse_clause(words: list[str], i: int) -> tuple[Clause, int] | None:
    """Parse one clause starting at ``words[i]``; returns it and the index after it."""
    if words[i : i + 1] != ["the"] or i + 3 >= len(words) or words[i + 2] != "was":
        return None
    noun, j = words[i + 1], i + 3
    if noun not in NOUNS:
        return None
    adverb = words[j] if words[j] in ADVERBS else None
    if adverb is not None:
        j += 1
    if j >= len(words) or words[j] not in ADJECTIVES:
        return None
    return Clause(noun, adverb, words[j]), j + 1


def parse_review(text: str) -> list[Clause] | None:
    """The clauses of a review, or None when ``text`` is not exactly a valid review.

    Strict on purpose: the gold judge must punish every deviation (extra spaces, trailing text, a repeated
    noun such as "the plot was lovely was lovely"), or PPO will find and exploit it (docs/design.md §5).
    """
    if text.startswith(" "):
        text = text[1:]
    words = text.split(" ")  # split(" ") keeps empty strings, so double or trailing spaces fail below
    if len(words) < 2 or words[-1] != ".":
        return None
    body, clauses, i = words[:-1], [], 0
    while True:
        parsed = _parse_clause(body, i)
        if parsed is None:
            return None
        clause, i = parsed
        clauses.append(clause)
        if i == len(body):
            break
        if body[i] not in CONJUNCTIONS or len(clauses) == MAX_CLAUSES:
            return None
        i += 1
    nouns = [c.noun for c in clauses]
    return clauses if len(set(nouns)) == len(nouns) else None


def is_valid(prompt: str, response: str) -> bool:
    return parse_review(prompt + response) is not None


def gold_score(prompt: str, response: str) -> float:
    """Hidden gold judge: mean over clauses of adverb multiplier × adjective sentiment, in [−3, 3].

    ``response`` continues ``prompt`` verbatim (it starts with a space). Invalid text → `INVALID_SCORE`.
    """
    clauses = parse_review(prompt + response)
    if clauses is None:
        return INVALID_SCORE
    return sum(c.sentiment() for c in clauses) / len(clauses)


def _sample_clauses(rng: random.Random) -> list[Clause]:
    n_clauses = rng.choices((1, 2, 3), weights=CLAUSE_COUNT_WEIGHTS)[0]
    nouns = rng.sample(NOUNS, n_clauses)
    adverbs, adjectives = list(ADVERBS), list(ADJECTIVES)
    return [
        Clause(noun, rng.choice(adverbs) if rng.random() < ADVERB_PROB else None, rng.choice(adjectives))
        for noun in nouns
    ]


def _render(clauses: list[Clause], conjunctions: list[str]) -> str:
    words = clauses[0].words()
    for conjunction, clause in zip(conjunctions, clauses[1:]):
        words += [conjunction, *clause.words()]
    return " ".join([*words, "."])


def sample_review(rng: random.Random) -> str:
    """A random valid review: uniform adjectives (sentiment-neutral on average), 1–3 distinct-noun clauses."""
    clauses = _sample_clauses(rng)
    conjunctions = [rng.choice(CONJUNCTIONS) for _ in clauses[1:]]
    return _render(clauses, conjunctions)


def _split_words(review: str, long_form: bool) -> tuple[str, str]:
    clauses = parse_review(review)
    if clauses is None:
        raise ValueError(f"not a valid review: {review!r}")
    if long_form and len(clauses) < 2:
        raise ValueError(f"a long prompt needs at least 2 clauses: {review!r}")
    # "the N was" is 3 words; the long form adds the rest of clause 1, the conjunction and "the N2 was".
    n_prompt_words = len(clauses[0].words()) + 4 if long_form else 3
    words = review.lstrip(" ").split(" ")
    return " ".join(words[:n_prompt_words]), " " + " ".join(words[n_prompt_words:])


def split_prompt(review: str, rng: random.Random) -> tuple[str, str]:
    """Split a review into (prompt, response) with ``prompt + response == review``.

    Short form ``the N was`` (response completes the clause and may add more), or for reviews with ≥ 2
    clauses the long form ``the N was [adv] adj and|but the N2 was``, which fixes the first clause's sentiment
    so the policy must make the rest positive despite it.
    """
    clauses = parse_review(review)
    long_form = rng.random() < LONG_PROMPT_PROB and clauses is not None and len(clauses) >= 2
    return _split_words(review, long_form)


def _long_prompt_key(prompt: str) -> tuple[str, str, str, str] | None:
    """(noun, adjective, conjunction, noun2) of a long prompt; None for a short ``the N was`` prompt."""
    words = prompt.split(" ")
    if len(words) <= 3:
        return None
    return words[1], words[-5], words[-4], words[-2]


def is_held_out(key: tuple[str, str, str, str]) -> bool:
    """Whether a long-prompt combination is reserved for evaluation; a fixed property of the task, not the seed."""
    return zlib.crc32("|".join(key).encode()) % 1000 < HELD_OUT_FRACTION * 1000


def _review_key(review: str) -> tuple[str, str, str, str] | None:
    clauses = parse_review(review)
    assert clauses is not None
    if len(clauses) < 2:
        return None
    return _long_prompt_key(_split_words(review, long_form=True)[0])


def _draw_example(rng: random.Random, for_eval: bool) -> tuple[str, str]:
    """One (prompt, response) from the train side or the eval side of the held-out split.

    Training text never contains a held-out combination (not even inside a demonstration), and eval long
    prompts only use held-out ones, so the two prompt sets overlap only in the 16 short ``the N was`` forms.
    The form is drawn first with its marginal probability and the review from its conditional (rejection
    sampling), so both sides keep `split_prompt`'s form mix despite the held-out rejections.
    """
    long_form = rng.random() < LONG_PROMPT_PROB * (1.0 - CLAUSE_COUNT_WEIGHTS[0])
    while True:
        review = sample_review(rng)
        key = _review_key(review)  # None exactly for 1-clause reviews
        if long_form and key is None:
            continue
        if not long_form and key is not None and rng.random() < LONG_PROMPT_PROB:
            continue  # `split_prompt` would have made this review long
        if for_eval and long_form and not is_held_out(key):
            continue
        if not for_eval and key is not None and is_held_out(key):
            continue
        return _split_words(review, long_form)


def _draw_rows(seed: int, name: str, n: int, for_eval: bool, with_response: bool) -> list[dict]:
    # One stream per split (str seeds hash deterministically), so changing one size leaves the others unchanged.
    rng = random.Random(f"{seed}:{name}")
    rows = []
    for _ in range(n):
        prompt, response = _draw_example(rng, for_eval)
        rows.append({"prompt": prompt, "response": response} if with_response else {"prompt": prompt})
    return rows


def make_corpus(seed: int, n_demonstrations: int, n_train_prompts: int, n_eval_prompts: int) -> dict[str, list[dict]]:
    """The task's datasets, deterministic for ``seed``.

    Returns "sft_train" (``n_demonstrations`` rows {"prompt", "response"}), "sft_eval" (≈ 5 % more, same
    distribution), "prompts_train" and "prompts_eval" (rows {"prompt"}). Only 16 short prompts exist, so they
    appear on both sides; long prompts are disjoint via held-out combinations (see `_draw_example`).
    """
    n_sft_eval = max(1, round(0.05 * n_demonstrations))
    return {
        "sft_train": _draw_rows(seed, "sft_train", n_demonstrations, for_eval=False, with_response=True),
        "sft_eval": _draw_rows(seed, "sft_eval", n_sft_eval, for_eval=False, with_response=True),
        "prompts_train": _draw_rows(seed, "prompts_train", n_train_prompts, for_eval=False, with_response=False),
        "prompts_eval": _draw_rows(seed, "prompts_eval", n_eval_prompts, for_eval=True, with_response=False),
    }


def train_tokenizer(texts: Iterable[str], vocab_size: int = TOKENIZER_VOCAB_SIZE) -> PreTrainedTokenizerFast:
    """A byte-level BPE (as GPT-2) trained locally on ``texts`` plus the grammar's vocabulary.

    No prefix space is added, so ``prompt + response`` tokenises to the prompt's ids followed by the
    response's: rollouts can be concatenated at the id level. The vocabulary is appended to the training
    text so every grammar word (with its leading space) becomes one token even on a tiny corpus; raises
    ValueError when ``vocab_size`` is too small for that.
    """
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[BOS_EOS_TOKEN, PAD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # any byte stays encodable
        show_progress=False,
    )
    lexicon = " ".join(vocabulary())
    tokenizer.train_from_iterator([*texts, lexicon, " " + lexicon], trainer=trainer)
    hf_tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=BOS_EOS_TOKEN,
        eos_token=BOS_EOS_TOKEN,
        pad_token=PAD_TOKEN,  # distinct from EOS, so a generated EOS is never masked out as padding
        padding_side="left",  # generation appends on the right
        model_max_length=MODEL_MAX_LENGTH,
        clean_up_tokenization_spaces=False,  # would turn " ." into "." and break decode(encode(x)) == x
    )
    split_words = [w for w in vocabulary() if len(hf_tokenizer.encode(" " + w)) != 1]
    if split_words:
        raise ValueError(f"vocab_size={vocab_size} leaves grammar words split into several tokens: {split_words}")
    return hf_tokenizer
