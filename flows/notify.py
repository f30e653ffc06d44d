"""A failed (or crashed) pipeline run tells someone: the flows' ``on_failure`` / ``on_crashed`` state hook.

    @flow(name="rlhf-lifecycle", on_failure=[notify_failure], on_crashed=[notify_failure])

The hook writes one paragraph: the flow, the run's name and id, what failed (for a stage: its name, its exit code
and what the exit code means, the stage's last error line), the workspace, the run's page in the UI (when the UI's
address is known: PREFECT_UI_URL, or derived from PREFECT_API_URL) and what to do next. It goes

1. to the run's log at ERROR (the UI shows it on the run's page);
2. to ``<workspace>/.rlhf/notifications.log`` (the workspace is the flow's ``repo_dir`` parameter), appended as one
   JSON line (the fields, for tools: lines starting with ``{``) and one human line;
3. through a Prefect notification block when ``RLHF_NOTIFY_BLOCK`` names one, as ``BLOCK-TYPE-SLUG/BLOCK-NAME``
   (e.g. ``slack-webhook/rlhf-alerts``): ``Block.load(name).notify(body, subject)``.

Routing to Slack or e-mail (docs/deployments.md § Notifications)::

    prefect block register -m prefect.blocks.notifications      # once per server: the notification block types
    python -c "from prefect.blocks.notifications import SlackWebhook; \
SlackWebhook(url='https://hooks.slack.com/services/…').save('rlhf-alerts')"
    export RLHF_NOTIFY_BLOCK=slack-webhook/rlhf-alerts            # where the flow runs: the worker, `rlhf run`

(or create the block in the UI: Blocks → + → Slack Webhook). E-mail: a ``SendgridEmail`` block
(``sendgrid-email/NAME``); any other service: ``CustomWebhookNotificationBlock`` (``custom-webhook/NAME``) or another
``NotificationBlock`` subclass. The alternative without code in the run is a Prefect Automation (trigger: a flow run
of ``rlhf-*`` entering Failed or Crashed; action: send a notification with the block): it also covers runs whose
process died before any hook could run.

A notifier that fails (block missing, Slack unreachable, workspace not writable) is logged, never raised: the run's
own failure stays the one reported. A subflow's failure (the lifecycle run inside a retrain run) is logged in its
own run only; the parent run, which fails with the same error, sends the notification, so one failure notifies once.
"""

from __future__ import annotations

import json
import logging
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from flows.stages import stage_exit_code
from tasks.stage_io import EXIT_BAD_INPUT, EXIT_DIVERGED, EXIT_NO_SPACE, EXIT_STALLED

BLOCK_ENV = "RLHF_NOTIFY_BLOCK"  # BLOCK-TYPE-SLUG/BLOCK-NAME of a Prefect notification block, e.g. slack-webhook/x
NOTIFICATIONS_FILE = Path(".rlhf/notifications.log")
MAX_ERROR_CHARS = 400  # of the error line quoted in the paragraph

EXIT_MEANINGS = {
    EXIT_BAD_INPUT: "bad input, refused before any expensive work: a rerun fails the same way until it is fixed",
    EXIT_DIVERGED: "training diverged (NaN/inf): the last good checkpoint is kept",
    EXIT_NO_SPACE: "disk full: partial files removed, previous outputs and the last good checkpoint kept; free space "
    "and rerun",
    EXIT_STALLED: "no progress for launch.stall_timeout_s: stopped, with where each rank was in the stage's log",
}

NEXT_STEPS = (
    "Next: fix the cause (the run's full log: its page in the UI or `prefect flow-run logs {run_id}`), then rerun "
    "`rlhf run` in the workspace or run the deployment again: DVC skips the stages that already finished and ppo "
    "resumes from its last resume checkpoint."
)

_fallback = logging.getLogger(__name__)


def error_of(state: Any) -> BaseException | None:
    """The exception a failed or crashed state holds, if it can be read (never raises)."""
    data = getattr(state, "data", None)
    if isinstance(data, BaseException):
        return data
    try:
        result = state.result(raise_on_failure=False)
    except Exception:
        return None
    return result if isinstance(result, BaseException) else None


def error_line(tail: str) -> str:
    """The line of a stage's output tail that says what went wrong: the stage program's own ``error:`` line, else
    DVC's ``ERROR:`` line, else the last line."""
    lines = [line.strip() for line in tail.splitlines() if line.strip()]
    for prefix in ("error:", "ERROR:"):
        found = [line for line in lines if line.startswith(prefix)]
        if found:
            return found[-1]
    return lines[-1] if lines else ""


def clip(text: str, limit: int = MAX_ERROR_CHARS) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def describe(
    flow_name: str,
    run_name: str,
    run_id: str,
    state_name: str,
    error: BaseException | None,
    state_message: str | None = None,
    workspace: str | None = None,
    ui_url: str | None = None,
) -> dict[str, Any]:
    """The notification's fields and its one-paragraph ``message`` (pure: the unit tests call it directly)."""
    stage = getattr(error, "stage", None)
    exit_code = getattr(error, "exit_code", None)
    if stage is not None and isinstance(exit_code, int):  # flows.stages.StageFailed (duck-typed)
        tail = str(getattr(error, "tail", "") or "")
        exit_code = stage_exit_code(exit_code, tail)
        meaning = EXIT_MEANINGS.get(exit_code)
        what = f"stage {stage!r} failed with exit code {exit_code}" + (f" ({meaning})" if meaning else "")
        detail = error_line(tail)
    elif error is not None:
        what = f"{type(error).__name__}"
        detail = (str(error).strip().splitlines() or [""])[0]
    else:
        what = f"the run ended {state_name}"
        detail = (state_message or "").strip()
    parts = [f"Prefect flow {flow_name!r}, run {run_name!r} ({run_id}): {state_name.upper()}: {what}."]
    if detail:
        parts.append(f"Last error: {clip(detail)}" + ("" if detail.endswith((".", "?", "!")) else "."))
    if workspace:
        parts.append(f"Workspace: {workspace}.")
        if stage is not None:
            parts.append(f"The stage's whole output: {Path(workspace, '.rlhf/logs', f'{stage}.log')}.")
    if ui_url:
        parts.append(f"Run page: {ui_url} .")
    parts.append(NEXT_STEPS.format(run_id=run_id))
    subject = f"{flow_name} run {run_name} {state_name.lower()}" + (
        f": stage {stage} exit {exit_code}" if stage is not None else ""
    )
    return {
        "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "event": "rlhf.flow-run.failed",
        "flow": flow_name,
        "flow_run_name": run_name,
        "flow_run_id": run_id,
        "state": state_name,
        "stage": stage,
        "exit_code": exit_code,
        "error": clip(detail) if detail else None,
        "workspace": workspace,
        "ui_url": ui_url,
        "subject": subject,
        "message": " ".join(parts),
    }


def run_page(flow_run: Any) -> str | None:
    try:
        from prefect.utilities.urls import url_for

        return url_for(flow_run)
    except Exception:
        return None


def workspace_of(flow_run: Any) -> str | None:
    parameters = getattr(flow_run, "parameters", None) or {}
    repo_dir = parameters.get("repo_dir", ".")
    try:
        return str(Path(str(repo_dir)).resolve())
    except (OSError, RuntimeError):
        return None


def append_notification(workspace: str | Path, record: dict[str, Any]) -> Path:
    """Append the record as one JSON line and its message as one human line to the workspace's notifications log."""
    path = Path(workspace, NOTIFICATIONS_FILE)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as log:
        log.write(json.dumps(record, ensure_ascii=False, default=str) + "\n")
        log.write(f"{record['time']} {record['message']}\n")
    return path


def send_through_block(name: str, body: str, subject: str) -> None:
    """``Block.load(name).notify(body, subject)``; name is ``BLOCK-TYPE-SLUG/BLOCK-NAME``."""
    from prefect.blocks.core import Block

    if "/" not in name:
        raise ValueError(f"{BLOCK_ENV}={name!r}: give BLOCK-TYPE-SLUG/BLOCK-NAME, e.g. slack-webhook/{name}")
    block = Block.load(name)
    if not callable(getattr(block, "notify", None)):
        raise TypeError(f"block {name!r} ({type(block).__name__}) is not a notification block: it has no notify()")
    block.notify(body, subject)


def run_logger(flow: Any, flow_run: Any) -> logging.Logger | logging.LoggerAdapter:
    try:
        from prefect.logging.loggers import flow_run_logger

        return flow_run_logger(flow_run, flow)
    except Exception:
        return _fallback


def notify_failure(flow: Any, flow_run: Any, state: Any) -> None:
    """Prefect ``on_failure`` / ``on_crashed`` hook: log, append to .rlhf/notifications.log, send via the block."""
    logger: logging.Logger | logging.LoggerAdapter = _fallback
    try:
        logger = run_logger(flow, flow_run)
        record = describe(
            flow_name=getattr(flow, "name", None) or getattr(flow_run, "flow_name", None) or "?",
            run_name=str(getattr(flow_run, "name", "?")),
            run_id=str(getattr(flow_run, "id", "?")),
            state_name=getattr(state, "name", None) or "Failed",
            error=error_of(state),
            state_message=getattr(state, "message", None),
            workspace=workspace_of(flow_run),
            ui_url=run_page(flow_run),
        )
        logger.error("%s", record["message"])
        if getattr(flow_run, "parent_task_run_id", None) is not None:
            logger.info("a subflow run: its parent run sends the notification")
            return
        if record["workspace"]:
            try:
                path = append_notification(record["workspace"], record)
                logger.info("notification appended to %s", path)
            except Exception as error:
                logger.error("could not write the notification to the workspace: %s: %s", type(error).__name__, error)
        block_name = os.environ.get(BLOCK_ENV, "").strip()
        if block_name:
            try:
                send_through_block(block_name, record["message"], record["subject"])
                logger.info("notification sent through the Prefect block %r", block_name)
            except Exception as error:
                logger.error(
                    "could not send the notification through the Prefect block %r: %s: %s",
                    block_name,
                    type(error).__name__,
                    error,
                )
    except Exception as error:  # the notifier must never turn into the run's problem
        logger.error("the failure notification itself failed: %s: %s", type(error).__name__, error)
