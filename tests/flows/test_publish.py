"""The Prefect task `publish-release`: token from a Secret block, result as the `publish` artifact, no token leaks."""

from __future__ import annotations

import asyncio
import os
import secrets
import time
from pathlib import Path

import pytest

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

from hub_server import HubServer  # noqa: E402
from prefect import flow  # noqa: E402
from prefect.artifacts import Artifact  # noqa: E402
from prefect.blocks.system import Secret  # noqa: E402
from prefect.client.orchestration import get_client  # noqa: E402
from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId  # noqa: E402
from publish_support import files_containing, make_release_workspace, use_endpoint  # noqa: E402  (first: HF_HUB_* env)

from flows.publish import PUBLISH_ARTIFACT_KEY, publish_task  # noqa: E402

pytestmark = pytest.mark.slow
TOKEN = "hf_" + secrets.token_hex(16)


@flow
def publish_once(repo_dir: str, repo_id: str) -> dict:
    return publish_task(repo_dir, repo_id, secret_block="hf-token-test")


def flow_run_logs(flow_run_id, expected: str, timeout_s: float = 60) -> str:
    """The run's logs; they reach the API in background batches, so wait until ``expected`` has arrived."""

    async def read():
        async with get_client() as client:
            return await client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))

    deadline = time.monotonic() + timeout_s
    while True:
        text = "\n".join(log.message for log in asyncio.run(read()))
        if expected in text or time.monotonic() > deadline:
            return text
        time.sleep(1)


def test_publish_task_reads_the_secret_block(prefect_api, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    repo = make_release_workspace(tmp_path / "repo")
    monkeypatch.delenv("HF_TOKEN", raising=False)
    with HubServer(token=TOKEN) as hub:
        use_endpoint(hub.endpoint, monkeypatch)
        Secret(value=TOKEN).save("hf-token-test")
        state = publish_once(str(repo), "org/flow", return_state=True)
        result = state.result()
        artifact = Artifact.get(PUBLISH_ARTIFACT_KEY)
        logs = flow_run_logs(state.state_details.flow_run_id, "published org/flow")
    assert result["created_commit"] and hub.repos["org/flow"].tags[result["tag"]] == result["commit_oid"]
    assert result["commit_oid"] in artifact.data and result["tag"] in artifact.data
    assert "published org/flow" in logs and TOKEN not in logs and TOKEN not in artifact.data
    assert all(TOKEN not in request.url for request in hub.requests) and files_containing(repo, TOKEN) == []
