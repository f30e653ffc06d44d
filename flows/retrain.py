"""Flow `rlhf-retrain`: scheduled retraining with an evaluation gate.

    rlhf serve --cron "0 3 * * *"      # serves the deployment `rlhf-retrain` (at most one run at a time)

Each run: 1. ask DVC whether any input changed (new labels, data, params, code); 2. if so, run the lifecycle;
3. compare the new evaluation with the promoted model's record; 4. promote only if better by `margin`, and then
publish the release to the Hub if `publish_repo_id` is set (flows/publish.py); 5. with `gc_cache`, drop from the DVC
cache what the workspace no longer uses (`dvc gc --workspace`); 6. record the decision as an artifact (key
`retrain-decision`).
"""

from __future__ import annotations

import json
import shutil
import subprocess
from datetime import datetime, timezone
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact

from flows.lifecycle import lifecycle
from flows.notify import notify_failure
from flows.publish import publish_task
from pipeline.lineage import LOCK_FILE, git_commit
from pipeline.lock import workspace_lock
from pipeline.workspace import dvc_command, out_of_date_stages, stage_environment
from rlhf.files import replace_folder, staging_folder, write_json

PROMOTED_DIR = Path(".rlhf/promoted")  # the promoted release and its record (outside DVC: a decision, not an output)
DECISION_ARTIFACT_KEY = "retrain-decision"


@task(retries=2, retry_delay_seconds=5)  # a read-only query: safe to repeat
def changed_stages(repo_dir: str) -> list[str]:
    """Stages DVC considers out of date (changed deps, params or missing outputs)."""
    return out_of_date_stages(repo_dir)


def read_record(repo_dir: str) -> dict | None:
    path = Path(repo_dir, PROMOTED_DIR, "record.json")
    return json.loads(path.read_text()) if path.exists() else None


def gate(new_metrics: dict, promoted: dict | None, metric: str, margin: float) -> tuple[bool, str]:
    """Promote when there is no promoted model yet, or the new ``metric`` beats the promoted one by ``margin``."""
    if metric not in new_metrics:
        return False, f"the new evaluation has no {metric!r}"
    if promoted is None:
        return True, "no model promoted yet"
    old, new = float(promoted["metrics"][metric]), float(new_metrics[metric])
    if new >= old + margin:
        return True, f"{metric} {new:.4f} ≥ promoted {old:.4f} + margin {margin}"
    return False, f"{metric} {new:.4f} < promoted {old:.4f} + margin {margin}"


@task
def promote(repo_dir: str, metrics: dict) -> dict:
    """Copy models/release into the promoted slot with a record of where it came from."""
    target = Path(repo_dir, PROMOTED_DIR)
    staging = staging_folder(target)
    shutil.copytree(Path(repo_dir, "models/release"), staging / "release")
    record = {
        "metrics": metrics,
        "git_commit": git_commit(repo_dir),
        "promoted_at": datetime.now(timezone.utc).isoformat(),
        "dvc_lock": Path(repo_dir, LOCK_FILE).read_text(),
    }
    write_json(staging / "record.json", record)
    replace_folder(staging, target)
    return record


@task
def collect_cache_garbage(repo_dir: str) -> str:
    """`dvc gc --workspace --force`: keep in the DVC cache only the objects the workspace's dvc.lock uses.

    Every run that retrains adds its new outputs to the cache (models, preferences, snapshots) and nothing ever
    removes the previous run's, so the cache grows by a run's outputs per run. The promoted release is a copy
    outside the cache (.rlhf/promoted), so it is unaffected; earlier runs' outputs can no longer be checked out from
    this cache (`dvc push` them to a remote first to keep them). Returns DVC's summary."""
    result = subprocess.run(
        dvc_command("gc", "--workspace", "--force"),
        cwd=repo_dir,
        env=stage_environment(),
        capture_output=True,
        text=True,
        check=True,
    )
    return " ".join(line.strip() for line in result.stdout.splitlines() if line.strip()) or "nothing to remove"


@flow(name="rlhf-retrain", log_prints=True, on_failure=[notify_failure], on_crashed=[notify_failure])
def retrain(
    repo_dir: str = ".",
    metric: str = "gold_win_rate",
    margin: float = 0.0,
    force: bool = False,
    publish_repo_id: str = "",
    publish_private: bool = True,
    publish_min_value: float = 0.5,
    wait_for_lock_s: float = 0.0,
    label_batches: int = 1,
    gc_cache: bool = False,
) -> dict:
    """Retrain if inputs changed; promote the result only if it beats the promoted model; publish what is promoted.

    ``publish_repo_id`` empty means don't publish; otherwise a promoted release is uploaded to that Hub repo if its
    ``metric`` is at least ``publish_min_value`` (token: HF_TOKEN or the Prefect Secret block `hf-token`).
    ``label_batches``: with `label.annotator: human`, how many batches of pairs the lifecycle pauses for before the
    label stage (0: none; the labels then come from `rlhf label` runs between retrains, and they are the change that
    starts the next retrain). ``gc_cache``: after a run that retrained, `dvc gc --workspace` (collect_cache_garbage).
    The whole run (status check, lifecycle, promotion, publishing, gc) holds the workspace lock (pipeline/lock.py): it
    fails at once if another run holds it, or after waiting ``wait_for_lock_s`` seconds.
    """
    repo = str(Path(repo_dir).resolve())
    with workspace_lock(repo, wait_for_lock_s, "rlhf-retrain flow"):
        publish = {"repo_id": publish_repo_id, "private": publish_private, "min_value": publish_min_value}
        return _retrain(repo, metric, margin, force, publish, label_batches, gc_cache)


def _retrain(
    repo: str, metric: str, margin: float, force: bool, publish: dict, label_batches: int, gc_cache: bool
) -> dict:
    logger = get_run_logger()
    # 1. did anything change?
    changed = changed_stages(repo)
    if not changed and not force:
        decision = {"ran": False, "promoted": False, "reason": "no input changed since the last run"}
    else:
        # 2. run the pipeline (DVC reruns only what changed)
        results = lifecycle(repo_dir=repo, label_batches=label_batches)
        new_metrics = results["evaluate"]["metrics"]
        # 3–4. evaluation gate
        promoted = read_record(repo)
        ok, reason = gate(new_metrics, promoted, metric, margin)
        decision = {
            "ran": True,
            "changed_stages": changed,
            "stages_run": [stage for stage, result in results.items() if not result["skipped"]],
            "promoted": ok,
            "reason": reason,
            "metric": metric,
            "new": new_metrics.get(metric),
            "previous": None if promoted is None else promoted["metrics"].get(metric),
        }
        if ok:
            promote(repo, new_metrics)
            decision["release"] = str(Path(repo, PROMOTED_DIR, "release"))
            if publish["repo_id"]:
                published = publish_task(
                    repo, publish["repo_id"], private=publish["private"], metric=metric, min_value=publish["min_value"]
                )
                decision["published"] = {key: published[key] for key in ("url", "commit_oid", "tag", "created_commit")}
        if gc_cache:  # after promotion and publishing: both read the workspace (and .rlhf), never the cache
            decision["gc"] = collect_cache_garbage(repo)
    # 6. record the decision
    logger.info("retrain decision: %s", decision)
    lines = ["# Retrain decision", ""] + [f"- **{k}**: {v}" for k, v in decision.items()]
    create_markdown_artifact(markdown="\n".join(lines), key=DECISION_ARTIFACT_KEY, description="retrain gate decision")
    return decision


def serve(
    cron: str,
    repo_dir: str = ".",
    metric: str = "gold_win_rate",
    margin: float = 0.0,
    publish_repo_id: str = "",
    wait_for_lock_s: float = 0.0,
    label_batches: int = 1,
    gc_cache: bool = False,
) -> None:
    """Serve the cron deployment `rlhf-retrain`; the deployment allows one run at a time (and the workspace lock one
    run of any kind: a scheduled run that finds a manual one in progress waits ``wait_for_lock_s``, then fails).
    ``label_batches``, ``gc_cache``: as :func:`retrain` (unattended with human labels: ``label_batches=0``)."""
    deployment = retrain.to_deployment(
        name="rlhf-retrain",
        cron=cron,
        concurrency_limit=1,
        parameters={
            "repo_dir": str(Path(repo_dir).resolve()),
            "metric": metric,
            "margin": margin,
            "publish_repo_id": publish_repo_id,
            "wait_for_lock_s": wait_for_lock_s,
            "label_batches": label_batches,
            "gc_cache": gc_cache,
        },
        description="Retrain when inputs change; promote only if the evaluation beats the promoted model.",
    )
    from prefect import serve as prefect_serve

    prefect_serve(deployment)
