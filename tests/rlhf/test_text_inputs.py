"""Every text reader takes a file as Windows tools write it: a UTF-8 byte-order mark and CRLF line ends."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from support import REPO

from rlhf.data import read_jsonl
from rlhf.files import read_csv
from rlhf.importers import load_table
from rlhf.params import load_params

BOM = "\ufeff"
ROWS = [
    {"prompt": "the plot", "chosen": "was lovely .", "rejected": "was dull ."},
    {"prompt": "the music", "chosen": "was great .", "rejected": "was awful ."},
]


def windows(text: str) -> str:
    """``text`` as a Windows export: a byte-order mark first, CRLF line ends."""
    return BOM + text.replace("\n", "\r\n")


def write(path: Path, text: str) -> Path:
    path.write_bytes(text.encode("utf-8"))  # bytes: no newline translation
    return path


FORMATS = {
    "jsonl": "".join(json.dumps(row) + "\n" for row in ROWS),
    "json": json.dumps(ROWS, indent=2) + "\n",
    "csv": "prompt,chosen,rejected\n" + "".join(f"{r['prompt']},{r['chosen']},{r['rejected']}\n" for r in ROWS),
}


@pytest.mark.parametrize("suffix", sorted(FORMATS))
def test_imported_tables_read_the_same_with_a_bom_and_crlf(tmp_path: Path, suffix: str) -> None:
    plain = write(tmp_path / f"plain.{suffix}", FORMATS[suffix])
    exported = write(tmp_path / f"exported.{suffix}", windows(FORMATS[suffix]))
    assert exported.read_bytes().startswith(b"\xef\xbb\xbf") and b"\r\n" in exported.read_bytes()
    assert load_table(str(exported)) == load_table(str(plain)) == ROWS


def test_pipeline_jsonl_and_csv_files_read_the_same_with_a_bom_and_crlf(tmp_path: Path) -> None:
    assert read_jsonl(write(tmp_path / "labels.jsonl", windows(FORMATS["jsonl"]))) == ROWS
    rows = read_csv(write(tmp_path / "ppo.csv", windows("step,objective/kl\n1,0.5\n2,0.75\n")))
    assert rows == [{"step": "1", "objective/kl": "0.5"}, {"step": "2", "objective/kl": "0.75"}]


def test_params_yaml_reads_the_same_with_a_bom_and_crlf(tmp_path: Path) -> None:
    shutil.copy(REPO / "params.yaml", tmp_path / "plain.yaml")
    exported = write(tmp_path / "params.yaml", windows((REPO / "params.yaml").read_text()))
    assert load_params(exported) == load_params(tmp_path / "plain.yaml")
