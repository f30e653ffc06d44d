"""Flow `rlhf-lifecycle`: every DVC stage as a Prefect task, in dvc.yaml order.

    rlhf run        # against PREFECT_API_URL when set, else an ephemeral local Prefect server

A failing stage fails its task and the flow; later stages do not run.
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow, get_run_logger

from flows.labeling import collect_human_labels
from flows.stages import StageOutcome, run_stage, stage_order
from rlhf.config import load_params


@flow(name="rlhf-lifecycle", log_prints=True)
def lifecycle(
    repo_dir: str = ".",
    stage_timeout_s: float | None = None,
    label_batch_size: int = 8,
    label_batches: int = 1,
    label_timeout_s: int = 3600,
) -> dict[str, dict]:
    """Run the pipeline; returns each stage's metrics (and whether DVC skipped it).

    With `label.annotator: human` the flow pauses before the label stage for people to label pairs in the UI.
    """
    logger = get_run_logger()
    repo = str(Path(repo_dir).resolve())
    results: dict[str, dict] = {}
    for stage in stage_order(repo):
        if stage == "label" and load_params(Path(repo, "params.yaml")).label.annotator == "human":
            labelling = collect_human_labels(repo, batch_size=label_batch_size, n_batches=label_batches, timeout_s=label_timeout_s)
            logger.info("human labels: %d new, %d skipped (%s)", labelling["labelled"], labelling["skipped"], labelling["labels_file"])
        task = run_stage.with_options(timeout_seconds=stage_timeout_s) if stage_timeout_s else run_stage
        state = task(stage, repo, return_state=True)
        outcome: StageOutcome = state.result()  # raises the stage's error, failing the flow
        results[stage] = {"skipped": outcome.skipped, "metrics": outcome.metrics}
        logger.info("stage %s: %s", stage, "unchanged (cached)" if outcome.skipped else "ran")
    return results
