"""Record formats, JSONL reading, validation, splits and length checks.

Bad input fails here, with a `DataError` naming the file (and row or line) and the problem, before any
expensive work starts.

Internal record schemas passed between stages (one JSON object per line):

    prompts         {"prompt": str}
    demonstrations  {"prompt": str, "response": str}
    samples         {"prompt_id": int, "prompt": str, "responses": list[str]}   # ≥ 2 responses per prompt
    preferences     {"prompt": str, "chosen": str, "rejected": str, ...}       # extra keys allowed

`prompt + response` is always the full text the model sees. A prompt therefore ends with the cue for the
assistant turn and the response continues it: with the default rendering (Anthropic HH style) the prompt
ends "\\n\\nAssistant:" and the response starts with a space, exactly as hh-rlhf stores it; with a model's chat
template the prompt ends with the template's generation prompt and the response stops before the end-of-turn token,
which is the tokenizer's EOS (docs/design.md, "Chat models: one renderer").
Generated responses (samples, and preferences built from them) may be empty strings: a policy that stops
at once produced that text. Imported human data with an empty response is dropped as broken.

Importers of the common public schemas (hh-rlhf, UltraFeedback, TRL formats): rlhf/importers.py.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

Row = dict[str, Any]


class DataError(ValueError):
    """Bad input data. The message always starts with the file or source name: "{source}: {problem}"."""


def row_error(source: str, index: int, problem: str) -> DataError:
    return DataError(f"{source}: row {index}: {problem}")


# --------------------------------------------------------------------------------------------------
# JSON / JSONL io
# --------------------------------------------------------------------------------------------------


def read_jsonl(path: str | os.PathLike) -> list[Row]:
    """Read one JSON object per line; blank lines are skipped. Line numbers in errors count from 1."""
    path = Path(path)
    rows: list[Row] = []
    try:
        # line by line: the whole file as one string plus its list of lines would double the peak (docs/scale.md)
        # newline="": lines end at \n, \r\n or \r only (JSON strings may hold U+2028); utf-8-sig drops a BOM
        with path.open(encoding="utf-8-sig", newline="") as file:
            for line_number, line in enumerate(file, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as error:
                    problem = f"invalid JSON: {error.msg} (column {error.colno})"
                    raise DataError(f"{path}: line {line_number}: {problem}") from None
                if not isinstance(row, dict):
                    raise DataError(f"{path}: line {line_number}: expected a JSON object, got {type(row).__name__}")
                rows.append(row)
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as error:
        raise DataError(f"{path}: cannot read: {error}") from None
    return rows


# --------------------------------------------------------------------------------------------------
# Validation of the internal records
# --------------------------------------------------------------------------------------------------


def _type_name(kind: type) -> str:
    return {str: "a string", int: "an integer", float: "a number", list: "a list", dict: "an object"}.get(
        kind, kind.__name__
    )


def _field_problem(row: Any, field: str, kind: type, allow_empty: bool) -> str | None:
    if field not in row:
        return f"missing field {field!r}"
    value = row[field]
    # bool is an int subclass, but a flag is never a valid id, count or score; an int is a valid float.
    if kind is float:
        valid = isinstance(value, (int, float)) and not isinstance(value, bool)
    else:
        valid = isinstance(value, kind) and not (isinstance(value, bool) and kind is not bool)
    if not valid:
        return f"field {field!r} must be {_type_name(kind)}, got {type(value).__name__}"
    if not allow_empty:
        if isinstance(value, str) and not value.strip():
            return f"field {field!r} is empty"
        if isinstance(value, (list, dict)) and not value:
            return f"field {field!r} is empty"
    return None


def require_fields(
    rows: Sequence[Any], fields: Mapping[str, type], source: str, *, allow_empty: Iterable[str] = ()
) -> None:
    """Check every row has every field with the given type and (unless in `allow_empty`) a non-empty value.

    Raises a `DataError` naming the first bad row (counting from 0) and the field.
    """
    allow_empty = frozenset(allow_empty)
    for index, row in enumerate(rows):
        if not isinstance(row, Mapping):
            raise row_error(source, index, f"expected an object, got {type(row).__name__}")
        for field, kind in fields.items():
            problem = _field_problem(row, field, kind, field in allow_empty)
            if problem:
                raise row_error(source, index, problem)


def validate_prompts(rows: Sequence[Any], source: str) -> None:
    require_fields(rows, {"prompt": str}, source)


def validate_demonstrations(rows: Sequence[Any], source: str) -> None:
    require_fields(rows, {"prompt": str, "response": str}, source)


def validate_samples(rows: Sequence[Any], source: str) -> None:
    require_fields(rows, {"prompt_id": int, "prompt": str, "responses": list}, source)
    for index, row in enumerate(rows):
        responses = row["responses"]
        if len(responses) < 2:
            raise row_error(source, index, f"'responses' needs at least 2 entries to compare, got {len(responses)}")
        for position, response in enumerate(responses):
            if not isinstance(response, str):
                problem = f"responses[{position}] must be a string, got {type(response).__name__}"
                raise row_error(source, index, problem)


def validate_preferences(rows: Sequence[Any], source: str) -> None:
    require_fields(rows, {"prompt": str, "chosen": str, "rejected": str}, source, allow_empty=("chosen", "rejected"))
    for index, row in enumerate(rows):
        if row["chosen"] == row["rejected"]:
            raise row_error(source, index, "'chosen' and 'rejected' are identical: the pair carries no preference")


# --------------------------------------------------------------------------------------------------
# Splits and length checks
# --------------------------------------------------------------------------------------------------


def split_train_eval(
    rows: Sequence[Row], eval_fraction: float, seed: int, *, group_key: str | None = None
) -> tuple[list[Row], list[Row]]:
    """Deterministic random split; at least one eval row (and one train row) when there are ≥ 2 rows.

    With `group_key` (e.g. "prompt"), rows sharing that value land on the same side, so pairs built from
    one prompt cannot leak from training into evaluation. Each side keeps the input order.
    """
    if not 0 < eval_fraction < 1:
        raise ValueError(f"eval_fraction must be between 0 and 1 (exclusive), got {eval_fraction}")
    groups: dict[Any, list[int]] = {}
    for index, row in enumerate(rows):
        groups.setdefault(row[group_key] if group_key else index, []).append(index)
    if len(groups) < 2:
        return list(rows), []
    keys = list(groups)
    random.Random(seed).shuffle(keys)
    target = max(1, round(len(rows) * eval_fraction))
    eval_indices: set[int] = set()
    for key in keys[:-1]:  # the last group always stays in training
        if len(eval_indices) >= target:
            break
        eval_indices.update(groups[key])
    train = [row for index, row in enumerate(rows) if index not in eval_indices]
    evaluation = [row for index, row in enumerate(rows) if index in eval_indices]
    return train, evaluation


LENGTH_CHECK_CHUNK = 10_000  # texts tokenised at a time by check_lengths


def check_lengths(texts: Sequence[str], tokenizer: Any, max_tokens: int, source: str, what: str) -> None:
    """Raise a `DataError` for the first text longer than `max_tokens` tokens (one batched tokenizer call).

    `what` names the text in the message, e.g. "prompt" → "row 3: prompt is 70 tokens long, …".
    """
    if not texts:
        return
    # in chunks, keeping only the lengths: all token ids at once cost 2.6 GiB for 1 M texts (docs/scale.md)
    lengths = [
        len(ids)
        for start in range(0, len(texts), LENGTH_CHECK_CHUNK)
        for ids in tokenizer(list(texts[start : start + LENGTH_CHECK_CHUNK]))["input_ids"]
    ]
    too_long = [index for index, length in enumerate(lengths) if length > max_tokens]
    if too_long:
        first = too_long[0]
        raise row_error(
            source,
            first,
            f"{what} is {lengths[first]} tokens long, more than the {max_tokens} the model allows "
            f"({len(too_long)} of {len(texts)} rows are too long)",
        )
