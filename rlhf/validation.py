"""Up-front input checks of the stage programs, and the fix hint of the one-line refusal (tasks/stage_io.py).

Each stage's ``main()`` starts with a block like::

    with refuse_bad_input():
        params = load_params()
        prompts = read_records(PROMPTS, data.validate_prompts)
        check_model_dir(SFT_MODEL)
        ...

Everything in the block is cheap (params, JSONL files, tokenizers, config.json; never model weights). Any
`ConfigError`, `DataError` (or other ValueError/OSError) raised there stops the stage with exit code 2 and a single
``error: <file>: <row/key>: <problem>. Fix: <what to do>`` line on stderr, before any output is touched.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from rlhf.data import DataError, Row, read_jsonl

# Which stage writes each input: the fix for a damaged or missing generated input is to rebuild it.
PRODUCERS = {
    "data/sft": "prepare",
    "data/prompts": "prepare",
    "models/base": "prepare",
    "models/sft": "sft",
    "data/pairs": "sample_pairs",
    "data/preferences": "label",
    "models/reward": "reward",
    "models/policy_checkpoints": "ppo",
    "models/policy": "ppo",
    "plots/ppo.csv": "ppo",
    "metrics/evaluate.json": "evaluate",
    "metrics/samples.md": "evaluate",
}
HUMAN_LABELS = "data/human_labels"
WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")


def _producer_of(message: str) -> tuple[str, str] | None:
    """(path, stage) of the first generated input named at the start of ``message``."""
    for path, stage in sorted(PRODUCERS.items(), key=lambda item: -len(item[0])):  # longest first: policy_checkpoints
        if message.startswith(path):
            return path, stage
    return None


def fix_hint(message: str) -> str:
    """What the user should do about a refusal whose message starts with the file it names."""
    if message.startswith(("params.yaml", "dvc.yaml")) or message.split(":", 1)[0].endswith("params.yaml"):
        return "Fix: correct that value in params.yaml (every field is documented in rlhf/config.py)."
    if message.startswith(HUMAN_LABELS):
        return "Fix: correct the labels file (people's labels are appended to it by the labelling flow, `rlhf label`)."
    producer = _producer_of(message)
    if producer is not None:
        path, stage = producer
        kind = "folder" if path.startswith("models/") else "file"
        return (
            f"Fix: {path} is written by the `{stage}` stage: rebuild the {kind} with `dvc repro {stage}` "
            "(or repair it by hand)."
        )
    return "Fix: correct the input named above, or point params.yaml at a valid one."


def with_fix(message: str) -> str:
    """``message`` with a fix hint appended, unless it already says what to do."""
    message = message.rstrip()
    if "Fix:" in message:
        return message
    end = "" if message.endswith((".", "?", "!")) else "."
    return f"{message}{end} {fix_hint(message)}"


# ------------------------------------------------------------------------------------------------------- records


def read_records(path: str | Path, validate: Callable[[Sequence[Any], str], None]) -> list[Row]:
    """The rows of a JSONL input, refused if the file is missing, empty, malformed or fails ``validate``."""
    rows = read_jsonl(path)
    if not rows:
        raise DataError(f"{path}: empty file: no records")
    validate(rows, str(path))
    return rows


def read_json_object(path: str | Path) -> dict[str, Any]:
    """A JSON object file (e.g. metrics); ``{}`` if it does not exist, a DataError if it is not a valid object."""
    path = Path(path)
    if not path.exists():
        return {}
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise DataError(f"{path}: invalid JSON: {error}") from None
    if not isinstance(document, dict):
        raise DataError(f"{path}: expected a JSON object, got {type(document).__name__}")
    return document


# -------------------------------------------------------------------------------------------------------- models


def check_model_dir(folder: str | Path) -> None:
    """Refuse a missing or incomplete save_pretrained folder (config, weights and tokenizer) before loading it."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder}: model folder not found")
    missing = []
    if not (folder / "config.json").is_file():
        missing.append("config.json")
    if not any((folder / name).is_file() for name in WEIGHT_FILES):
        missing.append(" or ".join(WEIGHT_FILES[:1] + WEIGHT_FILES[2:3]))
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        missing.append("a tokenizer (tokenizer.json / tokenizer_config.json)")
    if missing:
        raise DataError(f"{folder}: incomplete model folder: missing {', '.join(missing)}")


def embedding_rows(folder: str | Path) -> int:
    """Rows of the input embedding the model at ``folder`` declares (config.json ``vocab_size``)."""
    from transformers import AutoConfig  # lazy: keeps this module importable without transformers

    config = AutoConfig.from_pretrained(str(folder))
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    vocab = getattr(text_config, "vocab_size", None)
    if not isinstance(vocab, int):
        raise DataError(f"{folder}/config.json: no integer vocab_size")
    return vocab


def check_tokenizer_fits_model(tokenizer: Any, folder: str | Path) -> None:
    """Refuse a tokenizer that can produce ids the model has no embedding row for (a foreign or resized tokenizer).

    A tokenizer smaller than the embedding is fine (embeddings are often padded to a multiple of 64).
    """
    rows = embedding_rows(folder)
    if len(tokenizer) > rows:
        raise DataError(
            f"{folder}: the tokenizer has {len(tokenizer)} tokens but the model's embedding has only {rows} rows "
            f"(config.json vocab_size): ids ≥ {rows} would crash or read garbage, "
            "so this tokenizer does not belong to this model"
        )
    for name in ("pad_token_id", "eos_token_id", "bos_token_id"):
        token_id = getattr(tokenizer, name, None)
        if isinstance(token_id, int) and not 0 <= token_id < rows:
            raise DataError(
                f"{folder}: tokenizer {name} {token_id} is outside the model's embedding (vocab_size {rows})"
            )


def check_same_tokenizer(reference: Any, reference_folder: str | Path, other: Any, other_folder: str | Path) -> None:
    """Refuse two models that must read the same token ids (policy and reward model) but have different tokenizers."""
    if len(reference) != len(other):
        problem = f"{len(other)} tokens vs {len(reference)}"
    elif reference.get_vocab() != other.get_vocab():
        problem = "same size, different vocabulary"
    elif (reference.eos_token_id, reference.pad_token_id) != (other.eos_token_id, other.pad_token_id):
        problem = (
            f"EOS/pad ids {other.eos_token_id}/{other.pad_token_id} "
            f"vs {reference.eos_token_id}/{reference.pad_token_id}"
        )
    else:
        return
    raise DataError(
        f"{other_folder}: its tokenizer differs from the one in {reference_folder} ({problem}); "
        "both models must share one tokenizer"
    )


# ------------------------------------------------------------------------------------------------------ annotators


def load_judge(spec: str, key: str) -> Callable:
    """The callable a ``module:callable`` param names, or a ConfigError naming the params key."""
    from rlhf.annotators import load_callable
    from rlhf.config import ConfigError

    try:
        return load_callable(spec)
    except ValueError as error:
        raise ConfigError(f"params.yaml: {key}: {error}") from None


def finite_scores(
    score: Callable[[str, str], Any], samples: Sequence[Row], source: str, what: str
) -> Callable[[str, str], float]:
    """Score each distinct (prompt, response) of ``samples`` once, up front, refusing a non-numeric or non-finite score.

    The refusal names the row of ``source`` and the response. Returns a lookup with ``score``'s signature that
    answers from the scores computed here (the same values, in the same first-call order), so labelling can use it
    in place of the user's callable.
    """
    scores: dict[tuple[str, str], float] = {}
    for index, row in enumerate(samples):
        for position, response in enumerate(row["responses"]):
            key = (row["prompt"], response)
            if key in scores:
                continue
            raw = score(*key)
            try:
                value = float(raw)
            except (TypeError, ValueError):
                value = None
            if value is None or not math.isfinite(value):
                got = f"{raw!r}" if value is not None else f"a {type(raw).__name__} ({raw!r}), not a number"
                raise DataError(
                    f"{source}: row {index}: {what} returned {got} for responses[{position}] {response[:60]!r}; "
                    "a non-finite score would turn into garbage labels. "
                    "Fix: make it return a finite number for every (prompt, response)"
                )
            scores[key] = value
    return lambda prompt, response: scores[(prompt, response)]
