"""Flow `rlhf-lifecycle`: every DVC stage as a Prefect task, in dvc.yaml order.

    rlhf run        # against PREFECT_API_URL when set, else an ephemeral local Prefect server

A failing stage fails its task and the flow; later stages do not run.
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow, get_run_logger

from flows.stages import StageOutcome, run_stage, stage_order


@flow(name="rlhf-lifecycle", log_prints=True)
def lifecycle(repo_dir: str = ".", stage_timeout_s: float | None = None) -> dict[str, dict]:
    """Run the pipeline; returns each stage's metrics (and whether DVC skipped it)."""
    logger = get_run_logger()
    repo = str(Path(repo_dir).resolve())
    results: dict[str, dict] = {}
    for stage in stage_order(repo):
        task = run_stage.with_options(timeout_seconds=stage_timeout_s) if stage_timeout_s else run_stage
        state = task(stage, repo, return_state=True)
        outcome: StageOutcome = state.result()  # raises the stage's error, failing the flow
        results[stage] = {"skipped": outcome.skipped, "metrics": outcome.metrics}
        logger.info("stage %s: %s", stage, "unchanged (cached)" if outcome.skipped else "ran")
    return results
