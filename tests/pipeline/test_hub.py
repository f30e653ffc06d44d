"""Publishing a release with the unmodified `huggingface_hub` client against a local stand-in for the Hub.

The stand-in (tests/hub_server.py) speaks the API subset the client uses; the client reaches it through
``HF_ENDPOINT``. Checked: publish → snapshot_download → from_pretrained gives the local release's greedy tokens;
a second publish makes no commit; a failed gate sends nothing; transient 503s are retried; the token appears
in no URL, log line or produced file; `rlhf publish` does the same from the command line.
"""

from __future__ import annotations

import logging
import os
import secrets
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from hub_server import HubServer
from huggingface_hub import snapshot_download
from publish_support import (
    PASSING,
    RELEASE_MD5,
    files_containing,
    make_release_workspace,
    use_endpoint,
)  # first: HF_HUB_* env
from support import REPO, git_env
from transformers import AutoModelForCausalLM, AutoTokenizer

from pipeline.hub import GateFailed, publish_release, release_tag

TOKEN = "hf_" + secrets.token_hex(16)  # a fresh secret per run: any occurrence of it is a leak


@pytest.fixture(scope="module")
def hub():
    with HubServer(token=TOKEN) as server:
        yield server


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_release_workspace(tmp_path_factory.mktemp("publish") / "repo")


@pytest.fixture(autouse=True)
def client_settings(hub: HubServer, monkeypatch: pytest.MonkeyPatch):
    use_endpoint(hub.endpoint, monkeypatch)


def greedy_tokens(folder: Path | str) -> list[int]:
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    prompt = tokenizer("the plot was", return_tensors="pt")
    with torch.no_grad():
        output = model.generate(**prompt, max_new_tokens=12, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return output[0].tolist()


def test_publish_download_and_republish(hub: HubServer, workspace: Path, tmp_path: Path, caplog, capsys):
    caplog.set_level(logging.DEBUG)
    release = workspace / "models/release"
    # 1. publish: a private repo, one commit, a tag named after the release's md5 in dvc.lock
    result = publish_release(release, "org/tiny", token=TOKEN, gate_metrics=PASSING, gate=("gold_win_rate", 0.5))
    assert result.created_commit and result.tag == f"run-{RELEASE_MD5[:12]}" == release_tag(release)
    assert result.url == f"{hub.endpoint}/org/tiny" and hub.repos["org/tiny"].private
    assert hub.repos["org/tiny"].tags[result.tag] == result.commit_oid == hub.repos["org/tiny"].branches["main"]
    assert hub.repos["org/tiny"].commits[result.commit_oid]["model.safetensors"].lfs  # binary → LFS path
    # 2. download by tag and generate: same greedy tokens as the local release
    download = snapshot_download("org/tiny", revision=result.tag, token=TOKEN, cache_dir=tmp_path / "cache")
    assert greedy_tokens(download) == greedy_tokens(release)
    # 3. publishing the same release again changes nothing
    commits, tags = hub.commit_count, dict(hub.repos["org/tiny"].tags)
    again = publish_release(release, "org/tiny", token=TOKEN, gate_metrics=PASSING, gate=("gold_win_rate", 0.5))
    assert not again.created_commit and again.commit_oid == result.commit_oid
    assert hub.commit_count == commits and hub.repos["org/tiny"].tags == tags
    # 4. the token travels only in the Authorization header
    assert all(TOKEN not in request.url and TOKEN.encode() not in request.body for request in hub.requests)
    assert TOKEN not in caplog.text and TOKEN not in "".join(capsys.readouterr())
    assert files_containing(workspace, TOKEN) == [] and files_containing(tmp_path, TOKEN) == []


def test_client_skips_unchanged_files_without_the_tree_check(hub: HubServer, workspace: Path, monkeypatch):
    """The second line of idempotence: preupload returns `oid`s, so the client itself makes no empty commit."""
    release = workspace / "models/release"
    publish_release(release, "org/oids", token=TOKEN, gate_metrics=PASSING, gate=("gold_win_rate", 0.5))
    monkeypatch.setattr("pipeline.hub.remote_holds", lambda *args, **kwargs: False)
    commits = hub.commit_count
    again = publish_release(release, "org/oids", token=TOKEN, gate_metrics=PASSING, gate=("gold_win_rate", 0.5))
    assert not again.created_commit and hub.commit_count == commits


def test_failed_gate_publishes_nothing(hub: HubServer, workspace: Path):
    seen = len(hub.requests)
    with pytest.raises(GateFailed, match="gold_win_rate"):
        publish_release(
            workspace / "models/release",
            "org/gated",
            token=TOKEN,
            gate_metrics={"gold_win_rate": 0.3},
            gate=("gold_win_rate", 0.5),
        )
    with pytest.raises(GateFailed):
        publish_release(
            workspace / "models/release", "org/gated", token=TOKEN, gate_metrics={}, gate=lambda m: m.get("ok", False)
        )
    assert len(hub.requests) == seen and "org/gated" not in hub.repos
    forced = publish_release(
        workspace / "models/release",
        "org/gated",
        token=TOKEN,
        gate_metrics={"gold_win_rate": 0.3},
        gate=("gold_win_rate", 0.5),
        force=True,
    )
    assert forced.created_commit


def test_transient_errors_are_retried_and_client_errors_are_not(hub: HubServer, workspace: Path):
    hub.fail_next["commit"] = [503]
    result = publish_release(
        workspace / "models/release",
        "org/retry",
        token=TOKEN,
        gate_metrics=PASSING,
        gate=("gold_win_rate", 0.5),
        retry_delay_s=0.01,
    )
    assert result.created_commit and hub.kinds_seen().count("commit") >= 2 and hub.commit_count
    hub.fail_next["create"], creates = [403], hub.kinds_seen().count("create")
    with pytest.raises(Exception, match="403"):
        publish_release(
            workspace / "models/release",
            "org/forbidden",
            token=TOKEN,
            gate_metrics=PASSING,
            gate=("gold_win_rate", 0.5),
            retry_delay_s=0.01,
        )
    assert hub.kinds_seen().count("create") == creates + 1 and "org/forbidden" not in hub.repos  # not retried
    with pytest.raises(Exception, match="401"):  # a wrong token is refused, not retried
        publish_release(
            workspace / "models/release",
            "org/retry",
            token="hf_wrong",
            gate_metrics=PASSING,
            gate=("gold_win_rate", 0.5),
        )


def test_cli_publish(hub: HubServer, workspace: Path):
    env = {k: v for k, v in os.environ.items() if k not in {"HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"}}
    env.update(HF_TOKEN=TOKEN, HF_ENDPOINT=hub.endpoint, PYTHONPATH=str(REPO))
    command = [sys.executable, "-m", "pipeline.cli", "publish", "--repo-id", "org/cli"]
    first = subprocess.run(command, cwd=workspace, env=env, capture_output=True, text=True, timeout=60)
    assert first.returncode == 0, first.stderr
    assert f"tag run-{RELEASE_MD5[:12]}" in first.stdout and "(new commit)" in first.stdout
    second = subprocess.run(command, cwd=workspace, env=env, capture_output=True, text=True, timeout=60)
    assert second.returncode == 0 and "no new commit" in second.stdout
    gated = subprocess.run(
        command[:-1] + ["org/cli-gated", "--min-value", "0.9"],
        cwd=workspace,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert gated.returncode == 2 and "org/cli-gated" not in hub.repos
    for run in (first, second, gated):
        assert TOKEN not in run.stdout + run.stderr
    assert files_containing(workspace, TOKEN) == []


def dvc_release_repo(root: Path) -> Path:
    """A git + DVC repository whose `release` stage (a copy of a built release) has run: dvc.lock holds the real md5
    of models/release, and the DVC cache its files."""
    make_release_workspace(root)
    shutil.move(root / "models/release", root / "built")
    (root / "dvc.lock").unlink()
    (root / "dvc.yaml").write_text(
        yaml.safe_dump(
            {
                "stages": {
                    "release": {"cmd": "cp -r built models/release", "deps": ["built"], "outs": ["models/release"]}
                }
            }
        )
    )
    for command in (
        ["git", "init", "-q"],
        [sys.executable, "-m", "dvc", "init", "-q"],
        [sys.executable, "-m", "dvc", "repro", "-q"],
        ["git", "add", "-A"],
        ["git", "commit", "-qm", "release"],
    ):
        subprocess.run(command, cwd=root, env=git_env(), check=True, capture_output=True)
    return root


def test_cli_refuses_a_release_that_no_longer_matches_dvc_lock_then_publishes_it_restored(
    hub: HubServer, tmp_path: Path
):
    repo = dvc_release_repo(tmp_path / "repo")
    weights = repo / "models/release/model.safetensors"
    intact = weights.read_bytes()
    env = {k: v for k, v in git_env().items() if k not in {"HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"}}
    env.update(HF_TOKEN=TOKEN, HF_ENDPOINT=hub.endpoint, PYTHONPATH=str(REPO))
    command = [sys.executable, "-m", "pipeline.cli", "publish", "--repo-id", "org/checked"]
    for damage in (
        lambda: weights.write_bytes(intact[:-100]),  # truncated
        lambda: weights.write_bytes(intact[:500] + bytes([intact[500] ^ 1]) + intact[501:]),  # one bit flipped
        lambda: (repo / "models/release/config.json").unlink(),  # a file removed
    ):
        damage()
        before = sorted((p.name, p.stat().st_size) for p in (repo / "models/release").iterdir())
        refused = subprocess.run(command, cwd=repo, env=env, capture_output=True, text=True, timeout=120)
        assert refused.returncode == 2, refused.stdout + refused.stderr
        errors = [line for line in refused.stderr.splitlines() if line.startswith("error: ")]
        assert len(errors) == 1 and "models/release: modified" in errors[0] and "dvc checkout release" in errors[0]
        assert "org/checked" not in hub.repos  # nothing was created or uploaded
        assert sorted((p.name, p.stat().st_size) for p in (repo / "models/release").iterdir()) == before  # untouched
        subprocess.run(
            [sys.executable, "-m", "dvc", "checkout", "-f", "release"],
            cwd=repo,
            env=git_env(),
            check=True,
            capture_output=True,
        )
        assert weights.read_bytes() == intact  # the cache restored the recorded release
    published = subprocess.run(command, cwd=repo, env=env, capture_output=True, text=True, timeout=120)
    assert published.returncode == 0, published.stderr
    assert "matches dvc.lock" in published.stderr and "org/checked" in hub.repos
