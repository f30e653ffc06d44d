"""Tests for rlhf.files: the one atomic writer, the one digest, and the JSON, JSONL and CSV writers and reader."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from rlhf.data import read_jsonl
from rlhf.files import (
    WriteError,
    path_digest,
    read_csv,
    replace_folder,
    staging_folder,
    write_csv,
    write_json,
    write_jsonl,
)


def test_jsonl_round_trip_keeps_unicode(tmp_path: Path) -> None:
    path = tmp_path / "nested" / "rows.jsonl"
    rows = [{"prompt": "café ☕"}, {"prompt": "b", "n": 2}]
    write_jsonl(path, rows)
    assert read_jsonl(path) == rows
    assert "café ☕" in path.read_text(encoding="utf-8")  # ensure_ascii=False


def test_write_json_is_sorted_and_indented(tmp_path: Path) -> None:
    write_json(tmp_path / "metrics.json", {"b": 1, "a": 2})
    assert (tmp_path / "metrics.json").read_text() == '{\n  "a": 2,\n  "b": 1\n}\n'


@pytest.mark.parametrize("write", [write_jsonl, write_json])
def test_failed_write_leaves_the_old_file_untouched(tmp_path: Path, write) -> None:
    path = tmp_path / "out.jsonl"
    path.write_text("old contents\n")
    with pytest.raises(WriteError, match=rf"^{re.escape(str(path))}: .*not JSON-serialisable"):
        write(path, [{"prompt": "fine"}, {"prompt": object()}])  # fails after the first row
    assert path.read_text() == "old contents\n"
    assert [p.name for p in tmp_path.iterdir()] == ["out.jsonl"]  # no temporary file left behind
    assert issubclass(WriteError, ValueError)  # a stage refuses it like any bad input (exit 2)


def test_csv_round_trip_and_a_missing_file_reads_as_no_rows(tmp_path: Path) -> None:
    rows = [{"step": 0, "kl": 0.0}, {"step": 1, "kl": 0.25}]
    write_csv(tmp_path / "curve.csv", rows)
    assert (tmp_path / "curve.csv").read_bytes() == b"step,kl\r\n0,0.0\r\n1,0.25\r\n"  # csv's own line ends, as before
    assert read_csv(tmp_path / "curve.csv") == [{"step": "0", "kl": "0.0"}, {"step": "1", "kl": "0.25"}]
    assert read_csv(tmp_path / "absent.csv") == []


def test_path_digest_covers_names_and_contents(tmp_path: Path) -> None:
    folder = tmp_path / "model"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.json").write_text("{}")
    (folder / "sub/b.bin").write_bytes(b"\x00\x01")
    before = path_digest(folder)
    assert path_digest(folder) == before and len(before) == 64
    (folder / "sub/b.bin").write_bytes(b"\x00\x02")
    assert path_digest(folder) != before
    (folder / "sub/b.bin").write_bytes(b"\x00\x01")
    (folder / "a.json").rename(folder / "c.json")
    assert path_digest(folder) != before  # same bytes under another name
    assert path_digest(tmp_path / "absent") == "missing"


def test_a_folder_is_replaced_whole(tmp_path: Path) -> None:
    final = tmp_path / "out"
    final.mkdir()
    (final / "old.txt").write_text("old")
    staging = staging_folder(final)
    assert staging.name == "out.partial" and not any(staging.iterdir())
    (staging / "new.txt").write_text("new")
    replace_folder(staging, final)
    assert [p.name for p in final.iterdir()] == ["new.txt"] and not staging.exists()
