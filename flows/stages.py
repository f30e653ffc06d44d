"""The Prefect task that runs one DVC stage: DVC decides (and caches), Prefect shows.

The stage runs as ``dvc repro --single-item STAGE`` in a subprocess (the flow never holds a model). Three channels:
- its whole output (DVC, accelerate, the program's plain lines) goes to ``.rlhf/logs/STAGE.log`` and, line by line,
  to the task's log in the Prefect UI;
- its events (tasks/stage_io.py: JSON lines in ``.rlhf/logs/STAGE.jsonl``) are tailed while it runs: progress becomes
  a live progress artifact (PPO: key ``ppo-progress``) and the console's progress bar (flows/console.py);
- when it ends, its metrics become a markdown artifact (key ``stage-metrics``: the summary first, then one table per
  metrics file) and the evaluation one led by the verdict (key ``evaluation``: flows/artifacts.py), and the console
  prints one summary line. A stage DVC skips as unchanged finishes in a COMPLETED state named ``Cached``.

Retries (given per stage by the lifecycle flow: ppo 1) rerun the stage, which resumes from its last resume
checkpoint; a stage that stopped on purpose (bad input: exit 2, diverged: exit 3, disk full: exit 4, reported in a
``failed`` event since the launchers do not pass exit codes on) is not retried, nor a timed-out one. A stage the
launcher stopped for making no progress (exit 5) is retried.

The Prefect API may go away while a stage runs (the server killed or restarted, the network down): the stage does not
need it, so it runs on and DVC records it. Its progress is sent and the API checked on a thread of their own
(:class:`ApiWatch`), so an API that is gone or slow never holds up the stage, its output or the console, which says
when the API stops (and starts again) answering. When the stage has ended the API is asked once more: if it still
does not answer, the task raises :class:`PrefectApiLost`, whose one line says what became of the stage and to rerun
`rlhf run` once the server is back (the CLI prints it; :func:`api_loss` finds it).
"""

from __future__ import annotations

import contextvars
import json
import logging
import os
import re
import subprocess
import threading
import time
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.states import Completed

from flows.artifacts import evaluation_markdown, stage_markdown, stage_summary
from flows.console import console
from pipeline.workspace import (
    dvc_command,
    heal_dvc_rwlock,
    stage_environment,
    stage_metrics_files,
    stage_names,
    stage_outputs,
)
from tasks.stage_io import EXIT_BAD_INPUT, EXIT_DIVERGED, EXIT_NO_SPACE, EventTail, events_file, key_numbers

SKIPPED_MARKERS = ("didn't change, skipping", "is cached - skipping run")
METRICS_ARTIFACT_KEY, PROGRESS_ARTIFACT_KEY, EVALUATION_ARTIFACT_KEY = "stage-metrics", "ppo-progress", "evaluation"
POLL_EVENTS_S = 0.2
API_CHECK_EVERY_S = 5.0  # how often a running stage checks that the Prefect API answers
API_PROBE_TIMEOUT_S = 5.0  # one /health request: an API that does not answer within this is taken as gone
DVC_FAILED = 255  # `dvc repro`'s own status when a stage's command fails; its ERROR line has the command's status
DVC_EXITED = re.compile(r"^ERROR: failed to reproduce .*exited with (-?\d+)\s*$")


NO_RETRY_EXIT_CODES = frozenset({EXIT_BAD_INPUT, EXIT_DIVERGED, EXIT_NO_SPACE})  # a rerun would fail the same way
# DVC's own writes (its cache, dvc.lock, .dvc/tmp) finding the disk full: "ERROR: failed to transfer '…' - [Errno 28]
# No space left on device", after which DVC may still exit 0 with the cache incomplete (docs/reliability.md)
DVC_NO_SPACE = re.compile(r"^ERROR: .*(\[Errno (?:28|122)\]|No space left on device|Disk quota exceeded)")


class StageFailed(RuntimeError):
    """A DVC stage exited non-zero; the message carries the end of its output.

    ``exit_code``: the stage program's own status when it reported one (``failed`` event), else DVC's.
    """

    def __init__(self, stage: str, exit_code: int, tail: str) -> None:
        super().__init__(f"stage {stage!r} failed (exit {exit_code}):\n{tail}")
        self.stage, self.exit_code, self.tail = stage, exit_code, tail

    def __reduce__(self):  # picklable with its fields (Prefect may persist the exception as the failed state's result)
        return (type(self), (self.stage, self.exit_code, self.tail))


def retry_on_crash(task, task_run, state) -> bool:
    """Prefect ``retry_condition_fn``: retry a stage that crashed (killed, out of memory, …), not one that stopped on
    purpose (:data:`NO_RETRY_EXIT_CODES`) nor one that timed out (its process may still be running)."""
    error = state.data if isinstance(state.data, BaseException) else state.result(raise_on_failure=False)
    return isinstance(error, StageFailed) and error.exit_code not in NO_RETRY_EXIT_CODES


def flatten(record: dict, prefix: str = "") -> dict[str, object]:
    out: dict[str, object] = {}
    for key, value in record.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}/"))
        else:
            out[f"{prefix}{key}"] = value
    return out


@dataclass
class StageOutcome:
    stage: str
    skipped: bool  # DVC found the stage unchanged and did not run it
    metrics: dict[str, object]


def prefect_api_url() -> str:
    """The Prefect API this process reports to: PREFECT_API_URL, or the temporary server's."""
    from prefect.client.orchestration import get_client

    return str(get_client(sync_client=True).api_url).rstrip("/")


@contextmanager
def quick_client():
    """A Prefect client that tries a request once, for at most :data:`API_PROBE_TIMEOUT_S` (the engine's own client
    retries for ≈ 20 s, pipeline/cli.py): for the checks and the progress, which must never hold anything up."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_CLIENT_MAX_RETRIES, temporary_settings

    with (
        temporary_settings({PREFECT_CLIENT_MAX_RETRIES: 0}),  # read at each request
        get_client(sync_client=True, httpx_settings={"timeout": API_PROBE_TIMEOUT_S}) as client,
    ):
        yield client


def prefect_api_error() -> str | None:
    """Why the Prefect API does not answer now (its ``/health``, asked once); None when it answers."""
    try:
        with quick_client() as client:
            error = client.api_healthcheck()
    except Exception as failure:  # a client that cannot even be built: the same answer
        error = failure
    return None if error is None else describe_error(error)


def describe_error(error: BaseException) -> str:
    """``ConnectError: [Errno 111] Connection refused``, on one line."""
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def quiet_prefect_api_errors() -> None:
    """Once the console has said that the API is gone, Prefect's log and event workers would repeat it on every batch
    they fail to send ("--- Error logging to API ---", "Service 'EventsWorker' failed …"); `--verbose` keeps them."""
    if not console().verbose:
        logging.raiseExceptions = False  # how the log worker decides whether to print its failures
        for handler in logging.getLogger("prefect._internal").handlers:  # its level is a setting, read at each record
            handler.setLevel(logging.CRITICAL)


def give_up_on_api() -> None:
    """The run stops for want of the API. What this process still sends (the task's and the flow's final states, the
    last log lines and events) is tried once rather than retried for ≈ 20 s each, so the run ends, and its process
    exits, in seconds. Process-wide, as the run is over: the client reads the setting at each request, from the
    global settings, which the refresh rebuilds from the environment."""
    from prefect.context import refresh_global_settings_context

    os.environ["PREFECT_CLIENT_MAX_RETRIES"] = "0"
    refresh_global_settings_context()
    quiet_prefect_api_errors()


class ApiWatch:
    """While a stage runs, on a thread of its own: sends its progress to one progress artifact (created on the first
    event, updated after; only the latest is sent) and checks every :data:`API_CHECK_EVERY_S` that the Prefect API
    answers. ``error`` says why it did not at the last check (None: it did). The stage's run loop never waits on the
    API, so a dead or hung server holds up neither the stage nor the console."""

    def __init__(self, stage: str):
        from prefect.utilities.context import get_task_and_flow_run_ids

        self.stage = stage
        self.key = PROGRESS_ARTIFACT_KEY if stage == "ppo" else f"{stage.replace('_', '-')}-progress"
        self.run_ids = get_task_and_flow_run_ids()  # the artifact belongs to this task run
        self.error: str | None = None
        self.artifact_id = None
        self._pending: tuple[float, str] | None = None
        self._wake, self._closing = threading.Event(), threading.Event()
        run = contextvars.copy_context().run  # the run's settings: the API it reports to
        self._thread = threading.Thread(target=run, args=(self._loop,), name=f"api-watch-{stage}", daemon=True)
        self._thread.start()

    def __call__(self, record: dict) -> None:
        """A stage event: progress is kept for the thread to send."""
        if record.get("event") != "progress" or not record.get("total"):
            return
        percent = 100.0 * float(record["step"]) / float(record["total"])
        numbers = key_numbers(record)
        shown = f"{self.stage}: step {record['step']}/{record['total']}" + (f" · {numbers}" if numbers else "")
        self._pending = (percent, shown)
        self._wake.set()

    def close(self) -> None:
        """Stop the thread (a request in flight ends within its timeout)."""
        self._closing.set()
        self._wake.set()
        self._thread.join(API_PROBE_TIMEOUT_S + 1)

    def _loop(self) -> None:
        next_check = 0.0
        while not self._closing.is_set():
            if self.error is not None or time.monotonic() >= next_check:
                self.error = prefect_api_error()
                next_check = time.monotonic() + API_CHECK_EVERY_S
            pending, self._pending = self._pending, None
            if pending and self.error is None:
                try:
                    self._send(*pending)
                except Exception:  # cosmetic; whether the API is gone is the next check's to say
                    next_check = 0.0
            self._wake.wait(API_CHECK_EVERY_S)
            self._wake.clear()

    def _send(self, percent: float, shown: str) -> None:
        from prefect.client.schemas.actions import ArtifactCreate, ArtifactUpdate

        with quick_client() as client:
            if self.artifact_id is None:
                task_run_id, flow_run_id = self.run_ids
                artifact = ArtifactCreate(
                    type="progress", key=self.key, description=shown, data=percent,
                    task_run_id=task_run_id, flow_run_id=flow_run_id,
                )  # fmt: skip
                self.artifact_id = client.create_artifact(artifact=artifact).id
            else:
                client.update_artifact(self.artifact_id, ArtifactUpdate(data=percent, description=shown))


class PrefectApiLost(RuntimeError):
    """The Prefect API stopped answering while a stage ran and still does not once it has ended. The message is the
    line for the person: what became of the stage (finished and recorded by DVC, or stopped with its resume
    checkpoint kept) and to run `rlhf run` again once the server is back."""

    def __init__(
        self, stage: str, api_url: str, error: str, exit_code: int, checkpoint: str = "", skipped: bool = False
    ) -> None:
        self.stage, self.api_url, self.error = stage, api_url, error
        self.exit_code, self.checkpoint, self.skipped = exit_code, checkpoint, skipped
        resumes = ""
        if exit_code != 0:
            kept = f", its resume checkpoint kept in {checkpoint}" if checkpoint else ""
            fate = f"{stage} stopped (exit {exit_code}, see above){kept}"
            resumes = f" and {stage} resumes from its checkpoint" if checkpoint else ""
        elif skipped:
            fate = f"{stage} was unchanged (DVC skipped it)"
        else:
            fate = f"{stage} finished and DVC recorded it in dvc.lock"
        super().__init__(
            f"the Prefect API at {api_url} stopped answering during stage {stage} ({error}); {fate}. "
            f"{rerun_hint()}: finished stages are skipped{resumes}."
        )

    def __reduce__(self):  # picklable with its fields, like StageFailed
        fields = (self.stage, self.api_url, self.error, self.exit_code, self.checkpoint, self.skipped)
        return (type(self), fields)


def rerun_hint() -> str:
    """What to do: start the server again, unless it was `rlhf run`'s temporary one (the next run starts another)."""
    from prefect.settings import PREFECT_API_URL

    if PREFECT_API_URL.value():
        return "Once the server answers again, run `rlhf run` again"
    return "Run `rlhf run` again (it starts a new temporary server)"


def unreachable_api() -> str | None:
    """Before a run: the line to show when PREFECT_API_URL is set and does not answer (no stage has run); else None.
    Without it the run gets a temporary server of its own."""
    from prefect.settings import PREFECT_API_URL

    url = PREFECT_API_URL.value()
    error = prefect_api_error() if url else None
    if error is None:
        return None
    return (
        f"the Prefect API at {url} does not answer ({error}): no stage was run. Start the server (`prefect server "
        "start`) or unset PREFECT_API_URL to use a temporary one, then run `rlhf run` again."
    )


def api_loss(error: BaseException) -> str | None:
    """The line to show when ``error`` (what the flow raised) comes from the Prefect API going away; None when it does
    not. The engine, failing to record the task's and the flow's states, raises its own connection error while
    handling the task's :class:`PrefectApiLost`, so the chain of causes is searched."""
    import httpx
    from prefect.settings import PREFECT_API_URL

    chain, seen = [], error
    while seen is not None and len(chain) < 20:
        chain.append(seen)
        seen = seen.__cause__ or seen.__context__
    lost = next((item for item in chain if isinstance(item, PrefectApiLost)), None)
    if lost is not None:
        return str(lost)
    transport = next((item for item in chain if isinstance(item, httpx.TransportError)), None)
    if transport is None:
        return None
    url = PREFECT_API_URL.value()  # not the client's: asking it would start another temporary server
    api = f"the Prefect API at {url}" if url else "the temporary Prefect server"
    return (
        f"{api} stopped answering while no stage was running ({describe_error(transport)}); the stages that "
        f"finished are recorded by DVC. {rerun_hint()}: finished stages are skipped."
    )


def publish_stage_artifacts(repo_dir: str | Path, stage: str, by_file: dict[str, dict[str, object]]) -> None:
    """The stage's metrics (summary first, a table per file) and, for evaluate, the evaluation led by its verdict."""
    if by_file:
        create_markdown_artifact(
            markdown=stage_markdown(stage, by_file), key=METRICS_ARTIFACT_KEY, description=f"metrics of stage {stage}"
        )
    if stage == "evaluate":
        evaluation = by_file.get("metrics/evaluate.json", {})
        ppo_path, samples = Path(repo_dir, "metrics/ppo.json"), Path(repo_dir, "metrics/samples.md")
        ppo = flatten(json.loads(ppo_path.read_text())) if ppo_path.exists() else {}
        create_markdown_artifact(
            markdown=evaluation_markdown(evaluation, ppo, samples.read_text() if samples.exists() else ""),
            key=EVALUATION_ARTIFACT_KEY,
            description="PPO policy vs SFT: the verdict, gold vs proxy, cost, health, samples",
        )


def run_dvc_stage(repo_dir: str | Path, stage: str, on_line, on_record, on_poll=lambda: None) -> tuple[int, bool, str]:
    """Run ``dvc repro --single-item STAGE``: its output to ``.rlhf/logs/STAGE.log`` and ``on_line``, its events to
    ``on_record`` while it runs (``on_poll`` after each look at them); returns (exit code, skipped, output tail)."""
    command = dvc_command("repro", "--single-item", stage)
    events = events_file(stage, repo_dir)
    events.parent.mkdir(parents=True, exist_ok=True)
    events.unlink(missing_ok=True)  # the file will hold this run's events only
    tail: deque[str] = deque(maxlen=40)
    skipped = threading.Event()

    def pump(stream, log) -> None:  # the output, read on its own thread so events are shown while the stage is silent
        for raw in stream:
            line = raw.rstrip()
            log.write(raw)
            log.flush()
            tail.append(line)
            if any(marker in line for marker in SKIPPED_MARKERS):
                skipped.set()
            on_line(line)

    reader = EventTail(events)
    with (
        open(log_file(repo_dir, stage), "w") as log,
        subprocess.Popen(
            command,
            cwd=repo_dir,
            env=stage_environment(unbuffered=True),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            bufsize=1,
        ) as process,
    ):
        assert process.stdout is not None
        pumping = threading.Thread(target=pump, args=(process.stdout, log), daemon=True)
        pumping.start()
        while process.poll() is None:
            for record in reader.read():
                on_record(record)
            on_poll()
            time.sleep(POLL_EVENTS_S)
        pumping.join()
        for record in reader.read():
            on_record(record)
    return process.returncode, skipped.is_set(), "\n".join(tail)


def log_file(repo_dir: str | Path, stage: str) -> Path:
    """Where a stage's whole output goes (beside its events file)."""
    return events_file(stage, repo_dir).with_suffix(".log")


def stage_exit_code(exit_code: int, tail: str) -> int:
    """The stage program's own exit code: ``exit_code`` unless that is DVC's generic 255, then the status DVC's
    ``ERROR: failed to reproduce …, exited with N`` line gives."""
    if exit_code == DVC_FAILED:
        for line in reversed(tail.splitlines()):
            match = DVC_EXITED.match(line.strip())
            if match:
                return int(match.group(1))
    return exit_code


def dvc_no_space(tail: str) -> list[str]:
    """DVC's own ``ERROR`` lines about a full disk in a stage's output (not the stage program's ``error:`` line)."""
    return [line for line in tail.splitlines() if DVC_NO_SPACE.match(line.strip())]


def failure_reason(tail: str) -> list[str]:
    """The lines that say why a stage failed: its ``error:`` lines (the one-line refusals) and DVC's ``ERROR``, else
    the last lines of its output."""
    lines = [line for line in tail.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith(("error:", "ERROR:", "ERROR "))]
    return (errors or lines[-8:])[-4:]


def read_stage_metrics(repo_dir: str | Path, stage: str) -> dict[str, dict[str, object]]:
    """The stage's metrics files (dvc.yaml's ``metrics``), flattened, by path."""
    by_file = {}
    for path in stage_metrics_files(repo_dir, stage):
        if path.exists():
            by_file[str(path.relative_to(repo_dir))] = flatten(json.loads(path.read_text()))
    return by_file


def resume_checkpoint(repo_dir: str | Path, stage: str) -> str:
    """The stage's resume checkpoint folder (relative to the workspace) if it holds one, else ""."""
    folder = Path(".rlhf/checkpoints", stage)  # rlhf/checkpoint.py's layout (not imported: it needs torch)
    return str(folder) if Path(repo_dir, folder, "latest.json").exists() else ""


@task(task_run_name="{stage}", retries=0, retry_condition_fn=retry_on_crash, log_prints=False)
def run_stage(stage: str, repo_dir: str = ".") -> StageOutcome:
    """One DVC stage as a Prefect task. No retries by default (DVC makes a rerun by hand cheap); the lifecycle flow
    gives ppo one (``with_options(retries=…)``), which resumes from its last resume checkpoint. If the Prefect API is
    gone when the stage has ended, raises :class:`PrefectApiLost` (never retried: the retry could not be recorded)."""
    logger, screen = get_run_logger(), console()
    names = stage_names(repo_dir)
    api_url, stops = prefect_api_url(), []
    log_path = log_file(repo_dir, stage)
    shown_path = log_path.relative_to(repo_dir)
    screen.stage_started(stage, names.index(stage) + 1 if stage in names else 0, len(names), str(shown_path))
    watch, told = ApiWatch(stage), [None]  # told: the API error the console last reported (None: it answers)

    def on_record(record: dict) -> None:
        if record.get("event") == "failed" and isinstance(record.get("exit_code"), int):
            stops.append(record["exit_code"])
        watch(record)
        screen.event(record)

    def on_line(line: str) -> None:  # the task's log in the Prefect UI (on the console only with --verbose: cli.py)
        logger.log(logging.INFO, line)

    def on_poll() -> None:  # the console says when the API stops, or starts again, answering
        if watch.error and not told[0]:
            quiet_prefect_api_errors()
            screen.api_unreachable(api_url, watch.error)
        elif told[0] and not watch.error:
            screen.api_answers(api_url)
        told[0] = watch.error

    healed = heal_dvc_rwlock(repo_dir)  # a full disk may have cut it off in an earlier run: DVC would refuse to start
    if healed:
        screen.line(f"{stage}: {healed}")
    try:
        code, skipped, tail = run_dvc_stage(repo_dir, stage, on_line, on_record, on_poll)
    finally:
        watch.close()
    if code in (0, DVC_FAILED) and dvc_no_space(tail):  # DVC's writes, not the program's: exit 0 would hide it
        code = EXIT_NO_SPACE
        tail += "\nerror: DVC could not write its cache or lock files (disk full); free space and rerun the stage"
    api_error = prefect_api_error()  # the stage has ended: can the flow go on?
    by_file = read_stage_metrics(repo_dir, stage) if code == 0 else {}
    metrics = {name: value for values in by_file.values() for name, value in values.items()}
    if code != 0:
        code = stops[-1] if stops else stage_exit_code(code, tail)  # the launchers do not pass every code on
        screen.stage_failed(code, failure_reason(tail), str(shown_path))
    else:
        screen.stage_finished(stage_summary(stage, metrics), stage_outputs(repo_dir, stage), skipped)
    if api_error:
        give_up_on_api()
        raise PrefectApiLost(stage, api_url, api_error, code, resume_checkpoint(repo_dir, stage), skipped)
    if code != 0:
        raise StageFailed(stage, code, tail)
    publish_stage_artifacts(repo_dir, stage, by_file)
    outcome = StageOutcome(stage, skipped, metrics)
    if skipped:
        logger.info("stage %s unchanged: DVC skipped it (outputs restored from the cache)", stage)
        return Completed(message=f"DVC: stage {stage} unchanged, skipped", name="Cached", data=outcome)
    return outcome
