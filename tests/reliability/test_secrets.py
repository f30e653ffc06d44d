"""The Hub token never lands in a log, metric, param, dvc.lock, model card or artifact.

One full run of the tiny pipeline with a planted ``HF_TOKEN``: the `rlhf-retrain` flow (forced) runs the lifecycle
(every stage through `dvc repro`), promotes the release and publishes it to a local stand-in of the Hub that accepts
only that token; then `rlhf publish` publishes again from the command line. Afterwards everything the run produced is
searched for the token, raw and base64-encoded: every file of the repository (.git, .dvc and its cache, models,
data, metrics, plots, dvc.lock, .rlhf with the promoted release), the Prefect database (flow/task runs, parameters,
states, logs, artifacts, events), the logs and artifacts as the Prefect API returns them, the files the Hub stored,
the URLs and bodies of every request sent to it, and all captured stdout/stderr.
"""

from __future__ import annotations

import asyncio
import base64
import os
import secrets
import subprocess
import sys
import time
from pathlib import Path

import pytest

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

from hub_server import HubServer  # noqa: E402
from prefect.client.orchestration import get_client  # noqa: E402
from prefect.settings import PREFECT_SERVER_DATABASE_CONNECTION_URL  # noqa: E402
from prefect.testing.utilities import prefect_test_harness  # noqa: E402
from publish_support import use_endpoint  # noqa: E402  (first: HF_HUB_* env)
from support import REPO, git_env, make_tiny_repo  # noqa: E402

from flows.retrain import retrain  # noqa: E402

PLANTED = "hf_PLANTEDsecret" + secrets.token_hex(8)  # fresh per run: any occurrence anywhere is a leak


def needles(secret: str) -> list[bytes]:
    """The secret raw and as it would appear inside any base64 text (each of the 3 alignments; edges trimmed)."""
    forms = [secret.encode()]
    for shift in range(3):
        encoded = base64.b64encode(b"\0" * shift + secret.encode())
        forms.append(encoded[4 if shift else 0 : -4])  # drop the characters the neighbouring bytes influence
    return forms


def hits(blob: bytes, forms: list[bytes]) -> list[bytes]:
    return [form for form in forms if form in blob]


PAGE = 200  # the API's default page size


async def read_all(read) -> list:
    """Every record of a paged read (``read(limit=…, offset=…)``)."""
    records: list = []
    while True:
        page = await read(limit=PAGE, offset=len(records))
        records += page
        if len(page) < PAGE:
            return records


def prefect_records() -> dict[str, str]:
    """Logs, artifacts, flow runs and task runs as the API returns them (all pages), each as one JSON text."""

    async def read() -> dict[str, str]:
        async with get_client() as client:
            kinds = {
                "logs": client.read_logs,
                "artifacts": client.read_artifacts,
                "flow_runs": client.read_flow_runs,
                "task_runs": client.read_task_runs,
            }
            return {
                name: "\n".join(r.model_dump_json() for r in await read_all(reader)) for name, reader in kinds.items()
            }

    return asyncio.run(read())


def wait_for_log(text: str, timeout_s: float = 60) -> dict[str, str]:
    """Prefect ships logs in background batches: read until ``text`` has arrived."""
    deadline = time.monotonic() + timeout_s
    while True:
        records = prefect_records()
        if text in records["logs"] or time.monotonic() > deadline:
            return records
        time.sleep(1)


def test_the_scan_finds_the_token_raw_and_inside_base64_at_any_offset() -> None:
    forms = needles(PLANTED)
    assert hits(f"Authorization: Bearer {PLANTED}".encode(), forms)
    for prefix in (b"", b"x", b"xy", b"user:", b"token="):
        assert hits(b"Basic " + base64.b64encode(prefix + PLANTED.encode() + b"\n"), forms), prefix
    assert not hits(PLANTED[:-1].encode() + b"?", forms) and not hits(base64.b64encode(PLANTED[:-3].encode()), forms)


@pytest.mark.slow
def test_a_full_run_and_two_publishes_leave_the_hub_token_nowhere(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd
) -> None:
    repo = make_tiny_repo(tmp_path / "repo")
    monkeypatch.setenv("HF_TOKEN", PLANTED)
    with HubServer(token=PLANTED) as hub:
        with prefect_test_harness(server_startup_timeout=120):
            database = Path(PREFECT_SERVER_DATABASE_CONNECTION_URL.value().split("///", 1)[1])
            use_endpoint(hub.endpoint, monkeypatch)
            decision = retrain(repo_dir=str(repo), force=True, publish_repo_id="org/secret-scan", publish_min_value=0.0)
            records = wait_for_log("retrain decision")
        # drained on exit: the database now holds every log line
        env = {k: v for k, v in os.environ.items() if k not in {"HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"}}
        env.update(git_env(), HF_TOKEN=PLANTED, HF_ENDPOINT=hub.endpoint, PYTHONPATH=str(REPO))
        env.pop("HF_HUB_OFFLINE", None)
        cli = subprocess.run(
            [sys.executable, "-m", "pipeline.cli", "publish", "--repo-id", "org/secret-scan-cli", "--min-value", "0"],
            cwd=repo,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert decision["ran"] and decision["promoted"] and decision["published"]["created_commit"], decision
    assert cli.returncode == 0, cli.stderr
    forms = needles(PLANTED)
    leaks: list[str] = []

    # 1. every file the run left in the repository, and the Prefect database
    files = [p for p in repo.rglob("*") if p.is_file()] + sorted(database.parent.glob(database.name + "*"))
    scanned_bytes = 0
    for path in files:
        blob = path.read_bytes()
        scanned_bytes += len(blob)
        leaks += [f"{path}: {form!r}" for form in hits(blob, forms)]
    # 2. what the Prefect API shows: logs (each stage's output streams into them), artifacts, runs and their parameters
    for name, text in records.items():
        leaks += [f"prefect {name}: {form!r}" for form in hits(text.encode(), forms)]
    # 3. the Hub: the files it stored, the URLs and bodies it received
    stored = {
        f"hub {repo_id}@{sha[:8]}/{path}": stored.data
        for repo_id, hub_repo in hub.repos.items()
        for sha, tree in hub_repo.commits.items()
        for path, stored in tree.items()
    }
    for name, blob in stored.items():
        leaks += [f"{name}: {form!r}" for form in hits(blob, forms)]
    for request in hub.requests:
        leaks += [
            f"hub request {request.method} {request.url}: {form!r}"
            for form in hits(request.url.encode() + request.body, forms)
        ]
    # 4. everything printed: this process (Prefect's console logs) and the CLI publish
    captured = capfd.readouterr()
    printed = captured.out + captured.err + cli.stdout + cli.stderr
    leaks += [f"stdout/stderr: {form!r}" for form in hits(printed.encode(), forms)]

    assert leaks == []
    # the scan cannot pass vacuously: it covered the whole run, and it does see the token where it legitimately is
    names = {str(p.relative_to(repo)) for p in files if repo in p.parents}
    assert {
        "dvc.lock",
        "params.yaml",
        "metrics/evaluate.json",
        "models/release/README.md",
        ".rlhf/promoted/release/README.md",
    } <= names
    assert any(name.startswith(".git/objects/") for name in names) and any(
        name.startswith(".dvc/cache/") for name in names
    )
    assert len(files) > 100 and scanned_bytes > 1_000_000 and database.exists()
    assert (
        records["logs"].count(": done: ") >= 6  # the stages' plain summary lines (tasks/stage_io.py)
        and "stage-metrics" in records["artifacts"]
        and "published org/secret-scan" in records["logs"]
    )
    assert any(name.endswith("README.md") for name in stored) and "published" in cli.stdout
    authorizations = [
        value for r in hub.requests for name, value in r.headers.items() if name.lower() == "authorization"
    ]
    assert authorizations.count(f"Bearer {PLANTED}") >= 4  # the token was really used (in the header, where it belongs)
