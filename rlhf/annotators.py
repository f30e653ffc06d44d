"""Preference annotators: who decides which of two responses is better.

The default "human" is simulated: a hidden gold judge plus Bradley–Terry noise, calibrated so a τ = 1
annotator agrees with the noiseless gold on ~85 % of pairs of sampled reviews (docs/design.md §5). The gold judge is
pluggable as ``"module:callable"`` so users can bring their own. The label stage's other sources of preferences
(imported datasets, human labels) need no annotator and live in the stage program.
"""

from __future__ import annotations

import importlib
import itertools
import math
import random
from collections.abc import Callable
from dataclasses import KW_ONLY, dataclass, field

GoldFn = Callable[[str, str], float]  # (prompt, response) -> gold score, higher is better


def load_callable(spec: str) -> Callable:
    """The object named by ``"package.module:attr"`` (``attr`` may be dotted, e.g. ``Class.method``)."""
    module_name, sep, attr_path = spec.partition(":")
    if not sep or not module_name or not attr_path:
        raise ValueError(f"callable spec {spec!r} must look like 'package.module:attr'")
    try:
        obj = importlib.import_module(module_name)
    except ImportError as error:
        raise ValueError(f"callable spec {spec!r}: cannot import module {module_name!r} ({error})") from error
    for name in attr_path.split("."):
        try:
            obj = getattr(obj, name)
        except AttributeError as error:
            raise ValueError(f"callable spec {spec!r}: {module_name!r} has no attribute {attr_path!r}") from error
    if not callable(obj):
        raise ValueError(f"callable spec {spec!r} names a {type(obj).__name__}, not a callable")
    return obj


def preference_probability(gold_margin: float, temperature: float) -> float:
    """Bradley–Terry P(a ≻ b) = σ((g_a − g_b) / τ) (Bradley & Terry 1952; Christiano et al. 2017).

    τ = 0 is the noiseless limit: 1 or 0, and 0.5 for an exact tie.
    """
    if temperature == 0 or gold_margin == 0:
        return 0.5 if gold_margin == 0 else float(gold_margin > 0)
    x = gold_margin / temperature
    # Split by sign so exp never overflows for large |margin| / small τ.
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


@dataclass
class SimulatedAnnotator:
    """A noisy labeller around a gold judge; deterministic for a seed and call order."""

    gold: GoldFn
    _: KW_ONLY
    temperature: float = 1.0  # Bradley–Terry noise scale in gold units; 0 = noiseless (ties by fair coin)
    flip_prob: float = 0.0  # extra uniform label noise: after deciding, swap the label with this probability
    seed: int
    _rng: random.Random = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature must be ≥ 0, got {self.temperature}")
        if not 0.0 <= self.flip_prob <= 1.0:
            raise ValueError(f"flip_prob must be in [0, 1], got {self.flip_prob}")
        self._rng = random.Random(self.seed)

    def prefer_first_by_margin(self, gold_margin: float) -> bool:
        """Label one pair whose gold scores differ by ``gold_margin`` = g_first − g_second."""
        # Always two draws per label (common random numbers): the same seed gives the same uniforms for
        # every temperature / flip_prob, so runs that vary only the noise stay comparable.
        u_preference, u_flip = self._rng.random(), self._rng.random()
        prefer_first = u_preference < preference_probability(gold_margin, self.temperature)
        return prefer_first != (u_flip < self.flip_prob)

    def prefer_first(self, prompt: str, a: str, b: str) -> bool:
        return self.prefer_first_by_margin(self.gold(prompt, a) - self.gold(prompt, b))

    def noiseless_preference(self, prompt: str, a: str, b: str) -> float:
        """1.0 if the gold prefers ``a``, 0.0 if ``b``, 0.5 on a tie."""
        return preference_probability(self.gold(prompt, a) - self.gold(prompt, b), temperature=0.0)


def pairs_from_samples(prompt: str, responses: list[str]) -> list[tuple[str, str]]:
    """All unordered pairs of distinct responses, in sample order (K distinct → K·(K−1)/2 pairs).

    Duplicate responses are dropped first: an identical pair carries no preference and a repeated one would
    double-count its comparison. ``prompt`` is unused but kept so a pair builder can depend on it.
    """
    distinct = list(dict.fromkeys(responses))
    return list(itertools.combinations(distinct, 2))


def label_pairs(rows: list[dict], annotator: SimulatedAnnotator, annotator_id: str) -> tuple[list[dict], dict]:
    """Label every pair of each row's sampled responses.

    ``rows``: {"prompt_id", "prompt", "responses": [...]}. Returns preference rows {"prompt_id", "prompt",
    "chosen", "rejected", "annotator", "gold_margin"} (``gold_margin`` = g_chosen − g_rejected, noiseless,
    for diagnostics only: never a training signal) and stats: "n_pairs", "n_skipped_identical" and
    "agreement_with_gold", the fraction of labels matching the noiseless gold (ties count 0.5): the ceiling the
    reward model's accuracy against gold is compared with.
    """
    preferences: list[dict] = []
    agreement_sum, n_skipped = 0.0, 0
    for row in rows:
        prompt, responses = row["prompt"], row["responses"]
        pairs = pairs_from_samples(prompt, responses)
        n_skipped += len(responses) * (len(responses) - 1) // 2 - len(pairs)
        # Score each distinct response once: a user-supplied gold may be expensive.
        scores = {response: annotator.gold(prompt, response) for response in dict.fromkeys(responses)}
        for a, b in pairs:
            margin = scores[a] - scores[b]
            first = annotator.prefer_first_by_margin(margin)
            gold_first = preference_probability(margin, temperature=0.0)
            agreement_sum += gold_first if first else 1.0 - gold_first
            chosen, rejected = (a, b) if first else (b, a)
            preferences.append(
                {
                    "prompt_id": row["prompt_id"],
                    "prompt": prompt,
                    "chosen": chosen,
                    "rejected": rejected,
                    "annotator": annotator_id,
                    "gold_margin": scores[chosen] - scores[rejected],
                }
            )
    n_pairs = len(preferences)
    stats = {
        "n_pairs": n_pairs,
        "n_skipped_identical": n_skipped,
        "agreement_with_gold": agreement_sum / n_pairs if n_pairs else None,
    }
    return preferences, stats


def make_annotator(gold_spec: str, temperature: float, flip_prob: float, seed: int) -> SimulatedAnnotator:
    """The simulated annotator of params; ``gold_spec`` is ``"module:callable"`` (prompt, response) → score."""
    return SimulatedAnnotator(load_callable(gold_spec), temperature=temperature, flip_prob=flip_prob, seed=seed)
