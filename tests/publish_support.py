"""Helpers for the publishing tests: a tiny release workspace, and pointing this process's Hub client at a stand-in."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml

os.environ.setdefault("HF_HUB_DISABLE_XET", "1")  # read when huggingface_hub is imported: classic LFS upload
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

from huggingface_hub import constants  # noqa: E402

RELEASE_MD5 = "0123456789abcdef0123456789abcdef"  # what dvc.lock records for models/release in the stub lock
PASSING = {"gold_win_rate": 0.75}


def make_release_workspace(root: Path) -> Path:
    """``root`` with models/release (tiny GPT-2, tokenizer, card), a dvc.lock stub and metrics/evaluate.json."""
    from rlhf.config import TinyModelConfig
    from rlhf.embedded import train_tokenizer, vocabulary
    from rlhf.modeling import build_tiny_gpt2

    release = root / "models/release"
    release.mkdir(parents=True)
    tokenizer = train_tokenizer([" ".join(vocabulary())] * 4)
    model = build_tiny_gpt2(TinyModelConfig(n_layer=1, n_head=2, n_embd=16, n_positions=32), tokenizer, seed=0)
    model.save_pretrained(release)
    tokenizer.save_pretrained(release)
    (release / "README.md").write_text("---\nlicense: mit\nlibrary_name: transformers\n---\n# tiny release\n")
    lock = {
        "schema": "2.0",
        "stages": {
            "release": {
                "cmd": "python -m tasks.release",
                "outs": [{"path": "models/release", "md5": RELEASE_MD5 + ".dir"}],
            }
        },
    }
    (root / "dvc.lock").write_text(yaml.safe_dump(lock))
    (root / "metrics").mkdir()
    (root / "metrics/evaluate.json").write_text(json.dumps(PASSING))
    return root


def use_endpoint(endpoint: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The client in this process: online, classic LFS, ``endpoint`` as the Hub (its constants are read at import)."""
    monkeypatch.setenv("HF_ENDPOINT", endpoint)
    settings = {
        "HF_HUB_OFFLINE": False,
        "HF_HUB_DISABLE_XET": True,
        "HF_HUB_DISABLE_TELEMETRY": True,
        "ENDPOINT": endpoint,
        "HUGGINGFACE_CO_URL_TEMPLATE": endpoint + "/{repo_id}/resolve/{revision}/{filename}",
    }
    for name, value in settings.items():
        monkeypatch.setattr(constants, name, value)


def files_containing(folder: Path, needle: str) -> list[Path]:
    return [p for p in folder.rglob("*") if p.is_file() and needle.encode() in p.read_bytes()]
