"""Tests for rlhf.data: reading JSONL, validating the internal records, splits and length checks."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from rlhf.data import (
    DataError,
    check_lengths,
    read_jsonl,
    require_fields,
    split_train_eval,
    validate_demonstrations,
    validate_preferences,
    validate_prompts,
    validate_samples,
)

# ----------------------------------------------------------------------------------------------- io


def test_read_jsonl_names_file_and_line_of_bad_json(tmp_path: Path) -> None:
    path = tmp_path / "pairs.jsonl"
    path.write_text('{"prompt": "a"}\n{"prompt": \n')
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))}: line 2: invalid JSON"):
        read_jsonl(path)


def test_read_jsonl_rejects_non_object_rows_and_missing_files(tmp_path: Path) -> None:
    path = tmp_path / "rows.jsonl"
    path.write_text('{"prompt": "a"}\n\n["not", "an", "object"]\n')
    with pytest.raises(DataError, match=r"line 3: expected a JSON object, got list"):
        read_jsonl(path)
    with pytest.raises(DataError, match=r"missing\.jsonl: no such file"):
        read_jsonl(tmp_path / "missing.jsonl")


# --------------------------------------------------------------------------------------- validation


def test_require_fields_names_first_bad_row_and_field() -> None:
    rows = [{"prompt": "a", "n": 1}, {"prompt": "b"}, {"prompt": 3, "n": 1}]
    with pytest.raises(DataError, match=r"^src: row 1: missing field 'n'$"):
        require_fields(rows, {"prompt": str, "n": int}, "src")
    with pytest.raises(DataError, match=r"^src: row 2: field 'prompt' must be a string, got int$"):
        require_fields(rows, {"prompt": str}, "src")
    with pytest.raises(DataError, match=r"field 'n' must be an integer, got bool"):
        require_fields([{"n": True}], {"n": int}, "src")
    with pytest.raises(DataError, match=r"row 0: field 'prompt' is empty"):
        validate_prompts([{"prompt": "  "}], "src")


def test_validate_internal_records() -> None:
    validate_prompts([{"prompt": "a"}], "p")
    validate_demonstrations([{"prompt": "a", "response": " b"}], "d")
    validate_samples([{"prompt_id": 0, "prompt": "a", "responses": ["x", ""]}], "s")  # generated text may be empty
    validate_preferences([{"prompt": "a", "chosen": "x", "rejected": "", "margin": 1.0}], "pairs")
    with pytest.raises(DataError, match=r"^d: row 0: field 'response' must be a string, got NoneType$"):
        validate_demonstrations([{"prompt": "a", "response": None}], "d")
    with pytest.raises(DataError, match=r"^s: row 0: 'responses' needs at least 2 entries"):
        validate_samples([{"prompt_id": 0, "prompt": "a", "responses": ["x"]}], "s")
    with pytest.raises(DataError, match=r"^s: row 0: responses\[1\] must be a string, got int$"):
        validate_samples([{"prompt_id": 0, "prompt": "a", "responses": ["x", 1]}], "s")
    with pytest.raises(DataError, match=r"^s: row 0: field 'prompt_id' must be an integer, got str$"):
        validate_samples([{"prompt_id": "0", "prompt": "a", "responses": ["x", "y"]}], "s")


def test_validate_preferences_rejects_identical_pair() -> None:
    rows = [{"prompt": "a", "chosen": "x", "rejected": "y"}, {"prompt": "a", "chosen": "x", "rejected": "x"}]
    with pytest.raises(DataError, match=r"^pairs\.jsonl: row 1: 'chosen' and 'rejected' are identical"):
        validate_preferences(rows, "pairs.jsonl")


# ------------------------------------------------------------------------------- splits and lengths


def test_split_train_eval_is_deterministic_and_never_empty() -> None:
    rows = [{"i": i} for i in range(10)]
    train, evaluation = split_train_eval(rows, 0.2, seed=1)
    assert (train, evaluation) == split_train_eval(rows, 0.2, seed=1)
    assert len(evaluation) == 2 and sorted(train + evaluation, key=lambda r: r["i"]) == rows
    assert len(split_train_eval(rows[:2], 0.01, seed=0)[1]) == 1  # at least one eval row
    assert len(split_train_eval(rows[:2], 0.99, seed=0)[0]) == 1  # and one train row
    with pytest.raises(ValueError, match="eval_fraction"):
        split_train_eval(rows, 1.0, seed=0)


def test_split_train_eval_keeps_groups_together() -> None:
    rows = [{"prompt": f"p{i // 3}", "k": i} for i in range(12)]  # 4 prompts × 3 pairs
    train, evaluation = split_train_eval(rows, 0.25, seed=0, group_key="prompt")
    assert len(evaluation) == 3
    assert not {row["prompt"] for row in train} & {row["prompt"] for row in evaluation}


def test_check_lengths_names_row_count_and_limit(tiny_tokenizer) -> None:
    check_lengths(["the plot", "the plot was good"], tiny_tokenizer, 4, "prompts.jsonl", "prompt")
    with pytest.raises(
        DataError,
        match=r"^prompts\.jsonl: row 1: prompt is 5 tokens long, more than the 4 the model allows \(1 of 3 rows",
    ):
        check_lengths(["the plot", "the plot was very good", "good"], tiny_tokenizer, 4, "prompts.jsonl", "prompt")


def test_read_jsonl_takes_a_bom_crlf_and_unicode_line_separators_inside_strings(tmp_path: Path) -> None:
    # a Windows export (BOM, CRLF), and U+2028 inside a string: JSON allows it raw, json.dumps(ensure_ascii=False)
    # writes it raw, and it must not cut the line
    path = tmp_path / "rows.jsonl"
    path.write_bytes('\ufeff{"prompt": "a"}\r\n\r\n{"prompt": "b\u2028c"}\r\n'.encode())
    assert read_jsonl(path) == [{"prompt": "a"}, {"prompt": "b\u2028c"}]
    path.write_bytes(b'{"prompt": "a"}\r\n{"prompt": \r\n')
    with pytest.raises(DataError, match=r"rows.jsonl: line 2: invalid JSON"):
        read_jsonl(path)


def test_check_lengths_in_chunks_names_the_first_long_row_overall(
    tiny_tokenizer, monkeypatch: pytest.MonkeyPatch
) -> None:
    import rlhf.data

    monkeypatch.setattr(rlhf.data, "LENGTH_CHECK_CHUNK", 2)  # rows 0-1, 2-3, 4: the long ones sit in later chunks
    texts = ["the plot", "the plot was", "the plot", "the plot was good", "the plot was good good"]
    with pytest.raises(DataError, match=r"f: row 3: text is 4 tokens long, more than the 3 .* \(2 of 5 rows"):
        check_lengths(texts, tiny_tokenizer, 3, "f", "text")
