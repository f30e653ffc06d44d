"""The Prefect task that publishes `models/release/` to the Hub (pipeline/hub.py does the work).

The token comes from ``HF_TOKEN`` or, failing that, the Prefect Secret block ``secret_block`` (default
``hf-token``; create it with ``Secret(value=...).save("hf-token")``). It is handed to the client only: never a
parameter, a log line or an artifact. No task-level retries: `publish_release` retries the transient HTTP
errors itself, and a gate failure must not be repeated. The result becomes a markdown artifact (key `publish`).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact

from pipeline.hub import PublishResult, publish_release
from pipeline.lineage import LOCK_FILE

PUBLISH_ARTIFACT_KEY = "publish"
DEFAULT_SECRET_BLOCK = "hf-token"


def hub_token(secret_block: str = DEFAULT_SECRET_BLOCK) -> str | None:
    """``HF_TOKEN`` if set, else the Secret block's value, else None (anonymous: fails on a private Hub)."""
    if os.environ.get("HF_TOKEN"):
        return os.environ["HF_TOKEN"]
    from prefect.blocks.system import Secret

    try:
        return Secret.load(secret_block).get()
    except ValueError:  # no such block
        return None


@task(name="publish-release")
def publish_task(
    repo_dir: str,
    repo_id: str,
    private: bool = True,
    force: bool = False,
    metric: str = "gold_win_rate",
    min_value: float = 0.5,
    secret_block: str = DEFAULT_SECRET_BLOCK,
) -> dict:
    """Upload ``repo_dir``/models/release to ``repo_id`` if metrics/evaluate.json has ``metric`` ≥ ``min_value``."""
    logger = get_run_logger()
    metrics_path = Path(repo_dir, "metrics/evaluate.json")
    metrics = json.loads(metrics_path.read_text()) if metrics_path.exists() else {}
    token = hub_token(secret_block)
    if token is None:
        logger.warning("no HF_TOKEN and no Secret block %r: publishing anonymously", secret_block)
    result: PublishResult = publish_release(
        Path(repo_dir, "models/release"),
        repo_id,
        token=token,
        private=private,
        gate_metrics=metrics,
        gate=(metric, min_value),
        force=force,
        lock_path=Path(repo_dir, LOCK_FILE),
    )
    logger.info("published %s: commit %s, tag %s", repo_id, result.commit_oid, result.tag)
    create_markdown_artifact(
        key=PUBLISH_ARTIFACT_KEY,
        description="release published to the Hub",
        markdown="\n".join(
            [
                "# Published release",
                "",
                f"- **repo**: [{repo_id}]({result.url})",
                f"- **commit**: `{result.commit_oid}`"
                + ("" if result.created_commit else " (unchanged: no new commit)"),
                f"- **tag**: `{result.tag}` (the release's md5 in dvc.lock)",
                f"- **gate**: {metric} ≥ {min_value}" + (" (forced)" if force else ""),
            ]
        ),
    )
    return asdict(result)
