"""prefect.yaml's deployments on a real Prefect server: `prefect deploy --all`, a process worker running them, and the
failure notification (flows/notify.py) a failed run writes.

The checkout the worker runs is a tiny git + DVC repository with prefect.yaml whose params.yaml has a misspelt key:
the lifecycle's first stage refuses it in seconds (exit 2), so the failed run costs no training. The completed run
runs the same deployment on a second workspace (the `repo_dir` parameter) whose dvc.yaml has one trivial stage.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace
from uuid import uuid4

import pytest
import yaml
from server_support import prefect_client_env, ui_root
from support import REPO, make_tiny_repo, tiny_params

from flows import notify
from flows.notify import NOTIFICATIONS_FILE, describe, error_line, notify_failure

POOL = "rlhf-process"
LIFECYCLE, RETRAIN = "rlhf-lifecycle/rlhf-lifecycle", "rlhf-retrain/rlhf-retrain"
WORKER_TIMEOUT_S = 180
LOGS_RECORDED_TIMEOUT_S = 15
BAD_INPUT_TAIL = (
    "Running stage 'prepare':\n> python -m tasks.prepare --sft-data data/sft\n"
    "error: params.yaml: ppo: unknown key(s) ['learnig_rate']; did you mean 'learning_rate'?\n"
    "ERROR: failed to reproduce 'prepare': failed to run: python -m tasks.prepare, exited with 2"
)


# ---- the hook's message, without a server --------------------------------------------------------------------


def stage_failed(stage: str = "prepare", exit_code: int = 2, tail: str = BAD_INPUT_TAIL) -> Exception:
    from flows.stages import StageFailed

    return StageFailed(stage, exit_code, tail)


def test_the_message_names_the_stage_its_exit_code_the_error_the_run_page_and_what_to_do() -> None:
    record = describe(
        "rlhf-lifecycle",
        "crimson-fox",
        "1234",
        "Failed",
        stage_failed(),
        workspace="/srv/rlhf",
        ui_url="http://127.0.0.1:4200/runs/flow-run/1234",
    )
    message = record["message"]
    assert "\n" not in message  # one paragraph
    assert message.startswith("Prefect flow 'rlhf-lifecycle', run 'crimson-fox' (1234): FAILED: ")
    assert "stage 'prepare' failed with exit code 2 (bad input" in message
    # the stage program's own error line, not DVC's summary
    assert "Last error: error: params.yaml: ppo: unknown key(s) ['learnig_rate']" in message
    assert "Workspace: /srv/rlhf." in message and "Run page: http://127.0.0.1:4200/runs/flow-run/1234" in message
    assert "rerun `rlhf run`" in message and "DVC skips the stages that already finished" in message
    assert "ppo resumes from its last resume checkpoint" in message and "prefect flow-run logs 1234" in message
    assert (record["stage"], record["exit_code"], record["flow_run_id"]) == ("prepare", 2, "1234")
    assert record["subject"] == "rlhf-lifecycle run crimson-fox failed: stage prepare exit 2"


def test_the_message_of_other_failures() -> None:
    diverged = describe("rlhf-lifecycle", "r", "1", "Failed", stage_failed("ppo", 3, "step 7\nloss nan"))["message"]
    assert "stage 'ppo' failed with exit code 3 (training diverged" in diverged and "Last error: loss nan." in diverged
    killed = describe("rlhf-lifecycle", "r", "1", "Failed", stage_failed("sft", 137, ""))["message"]
    assert "stage 'sft' failed with exit code 137." in killed and "Last error" not in killed
    busy = describe("rlhf-retrain", "r", "1", "Failed", RuntimeError("the workspace is busy\nheld by pid 7"))
    assert "FAILED: RuntimeError. Last error: the workspace is busy." in busy["message"] and busy["stage"] is None
    crashed = describe("rlhf-retrain", "r", "1", "Crashed", None, state_message="Execution was cancelled by SIGTERM")
    assert "CRASHED: the run ended Crashed. Last error: Execution was cancelled by SIGTERM." in crashed["message"]
    assert "Run page" not in crashed["message"]  # no UI address known
    assert error_line("a\nb\n\n") == "b" and error_line("") == ""
    # `dvc repro` exits 255 whatever the stage's status; its ERROR line names the stage program's own
    assert describe("rlhf-lifecycle", "r", "1", "Failed", stage_failed("prepare", 255))["exit_code"] == 2
    assert describe("rlhf-lifecycle", "r", "1", "Failed", stage_failed("sft", 255, "Killed"))["exit_code"] == 255


@dataclass
class FakeRun:
    parameters: dict
    name: str = "crimson-fox"
    id: str = "1234"
    parent_task_run_id: str | None = None


class FakeState:
    name = "Failed"
    message = "stage 'prepare' failed"

    def __init__(self, error: BaseException) -> None:
        self.data = error


@pytest.fixture
def hook_logger(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    """The hook logs to a plain logger (no Prefect API here); caplog sees it."""
    logger = logging.getLogger("test-notify")
    monkeypatch.setattr(notify, "run_logger", lambda flow, flow_run: logger)
    monkeypatch.setattr(notify, "run_page", lambda flow_run: None)
    monkeypatch.delenv(notify.BLOCK_ENV, raising=False)
    caplog.set_level(logging.INFO, logger="test-notify")
    return caplog


def read_notifications(workspace: Path) -> tuple[list[dict], list[str]]:
    lines = (workspace / NOTIFICATIONS_FILE).read_text().splitlines()
    return [json.loads(line) for line in lines if line.startswith("{")], [
        line for line in lines if not line.startswith("{")
    ]


def test_the_hook_logs_and_appends_a_json_line_and_a_human_line(hook_logger, tmp_path: Path) -> None:
    flow = SimpleNamespace(name="rlhf-lifecycle")
    for _ in range(2):
        notify_failure(flow, FakeRun({"repo_dir": str(tmp_path)}), FakeState(stage_failed()))
    records, human = read_notifications(tmp_path)
    assert len(records) == len(human) == 2  # appended, one pair per failure
    assert records[0]["stage"] == "prepare" and records[0]["exit_code"] == 2
    assert records[0]["workspace"] == str(tmp_path) and records[0]["flow"] == "rlhf-lifecycle"
    assert human[0] == f"{records[0]['time']} {records[0]['message']}"
    errors = [r.getMessage() for r in hook_logger.records if r.levelno == logging.ERROR]
    assert errors == [records[0]["message"]] * 2


def test_a_subflow_failure_is_only_logged(hook_logger, tmp_path: Path) -> None:
    run = FakeRun({"repo_dir": str(tmp_path)}, parent_task_run_id="parent")
    notify_failure(SimpleNamespace(name="rlhf-lifecycle"), run, FakeState(stage_failed()))
    assert not (tmp_path / NOTIFICATIONS_FILE).exists()  # the parent run (rlhf-retrain) notifies
    assert any("stage 'prepare' failed" in r.getMessage() for r in hook_logger.records if r.levelno == logging.ERROR)


def test_the_block_gets_the_message_and_a_broken_notifier_never_raises(
    hook_logger, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from prefect.blocks.core import Block

    sent = []
    monkeypatch.setattr(
        Block, "load", lambda name: SimpleNamespace(notify=lambda body, subject: sent.append((name, body, subject)))
    )
    monkeypatch.setenv(notify.BLOCK_ENV, "slack-webhook/rlhf-alerts")
    notify_failure(
        SimpleNamespace(name="rlhf-lifecycle"), FakeRun({"repo_dir": str(tmp_path)}), FakeState(stage_failed())
    )
    records, _ = read_notifications(tmp_path)
    assert sent == [("slack-webhook/rlhf-alerts", records[0]["message"], records[0]["subject"])]

    # a block name without its type, a block that fails, an unwritable workspace: logged, nothing raised
    monkeypatch.setenv(notify.BLOCK_ENV, "rlhf-alerts")
    blocked = tmp_path / "file"
    blocked.write_text("not a folder")
    notify_failure(
        SimpleNamespace(name="rlhf-lifecycle"), FakeRun({"repo_dir": str(blocked)}), FakeState(stage_failed())
    )

    def unreachable(name):
        raise ConnectionError("slack is down")

    monkeypatch.setattr(Block, "load", unreachable)
    monkeypatch.setenv(notify.BLOCK_ENV, "slack-webhook/rlhf-alerts")
    notify_failure(
        SimpleNamespace(name="rlhf-lifecycle"), FakeRun({"repo_dir": str(tmp_path)}), FakeState(stage_failed())
    )
    errors = "\n".join(r.getMessage() for r in hook_logger.records if r.levelno == logging.ERROR)
    assert "give BLOCK-TYPE-SLUG/BLOCK-NAME, e.g. slack-webhook/rlhf-alerts" in errors
    assert "could not write the notification to the workspace" in errors
    assert "could not send the notification through the Prefect block 'slack-webhook/rlhf-alerts'" in errors
    assert "slack is down" in errors


# ---- prefect.yaml against a real server and a process worker -------------------------------------------------


@dataclass
class Project:
    api_url: str
    checkout: Path  # where `prefect deploy --all` ran and the worker's RLHF_WORKSPACE: the failing workspace
    env: dict[str, str]  # a Prefect client's environment for this server


def prefect(project_env: dict[str, str], cwd: Path, *args: str, timeout: float = 120) -> str:
    """`prefect ARGS` as a user types it (this interpreter's CLI); fails the test with its output if it fails."""
    result = subprocess.run(
        [sys.executable, "-m", "prefect", *args],
        cwd=cwd,
        env=project_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert result.returncode == 0, (
        f"prefect {' '.join(args)} exited {result.returncode}:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    )
    return result.stdout


def call(project: Project, method: str, *args, **kwargs):
    """One PrefectClient call against the project's server."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    async def go():
        async with get_client() as client:
            return await getattr(client, method)(*args, **kwargs)

    with temporary_settings({PREFECT_API_URL: project.api_url}):
        return asyncio.run(go())


@pytest.fixture(scope="module")
def project(prefect_server: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Project]:
    """The work pool, and `prefect deploy --all` run in a tiny checkout holding prefect.yaml (its params.yaml has a
    misspelt ppo key). The deployments are deleted afterwards: test_schedule.py applies its own `rlhf-retrain`."""
    root = tmp_path_factory.mktemp("deployments")
    params = tiny_params()
    params["ppo"]["learnig_rate"] = 0.001
    checkout = make_tiny_repo(root / "checkout", params)
    shutil.copy(REPO / "prefect.yaml", checkout / "prefect.yaml")
    (root / "prefect-home").mkdir()
    env = prefect_client_env(prefect_server, root / "prefect-home")
    env.pop("RLHF_WORKSPACE", None)  # the pull step's placeholder stays for the worker to fill
    env.pop(notify.BLOCK_ENV, None)
    prefect(env, checkout, "work-pool", "create", POOL, "--type", "process")
    prefect(env, checkout, "--no-prompt", "deploy", "--all")
    project = Project(prefect_server, checkout, env)
    yield project
    for name in (LIFECYCLE, RETRAIN):
        call(project, "delete_deployment", call(project, "read_deployment_by_name", name).id)


def run_with_worker(project: Project, deployment: str, parameters: dict | None = None, **worker_env: str):
    """Create a run of ``deployment`` and let `prefect worker start --pool rlhf-process --run-once` (started in the
    checkout, RLHF_WORKSPACE set to it) execute it; returns the flow run as the server has it afterwards."""
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: project.api_url}):
        flow_run = run_deployment(deployment, parameters=parameters, timeout=0)
    env = dict(project.env, RLHF_WORKSPACE=str(project.checkout), **worker_env)
    output = prefect(env, project.checkout, "worker", "start", "--pool", POOL, "--run-once", timeout=WORKER_TIMEOUT_S)
    stored = call(project, "read_flow_run", flow_run.id)
    assert stored.state.is_final(), f"the worker exited with the run {stored.state.name}:\n{output[-3000:]}"
    return stored


@pytest.mark.slow
def test_deploy_all_creates_both_deployments_on_the_process_pool(project: Project) -> None:
    from flows.retrain import serve

    assert call(project, "read_work_pool", POOL).type == "process"
    lifecycle = call(project, "read_deployment_by_name", LIFECYCLE)
    retrain = call(project, "read_deployment_by_name", RETRAIN)
    pull = [{"prefect.deployments.steps.set_working_directory": {"directory": "{{ $RLHF_WORKSPACE }}"}}]
    for deployment in (lifecycle, retrain):
        assert deployment.work_pool_name == POOL and deployment.pull_steps == pull
        assert deployment.global_concurrency_limit is not None and deployment.global_concurrency_limit.limit == 1
    assert lifecycle.entrypoint == "flows/lifecycle.py:lifecycle" and lifecycle.schedules == []
    assert retrain.entrypoint == "flows/retrain.py:retrain"
    [schedule] = retrain.schedules
    assert (schedule.schedule.cron, schedule.schedule.timezone, schedule.active) == ("0 3 * * *", "UTC", True)
    # the parameters `rlhf serve` gives the deployment it serves (its defaults: flows.retrain.serve's)
    defaults = {name: p.default for name, p in inspect.signature(serve).parameters.items() if name != "cron"}
    assert retrain.parameters == defaults
    assert yaml.safe_load((REPO / "prefect.yaml").read_text())["prefect-version"] == __import__("prefect").__version__


@pytest.mark.slow
def test_a_process_worker_runs_the_lifecycle_deployment_to_completion(project: Project, tmp_path: Path) -> None:
    workspace = tmp_path / "workspace"
    workspace.mkdir()
    (workspace / "dvc.yaml").write_text(
        yaml.safe_dump(
            {"stages": {"hello": {"cmd": "python -c \"open('hello.txt', 'w').write('hi')\"", "outs": ["hello.txt"]}}}
        )
    )
    subprocess.run([sys.executable, "-m", "dvc", "init", "--no-scm", "-q"], cwd=workspace, env=project.env, check=True)
    run = run_with_worker(project, LIFECYCLE, {"repo_dir": str(workspace)})
    assert run.state.is_completed(), run.state.message
    assert (workspace / "hello.txt").read_text() == "hi" and (workspace / "dvc.lock").exists()
    assert not (workspace / NOTIFICATIONS_FILE).exists()


class Webhook(BaseHTTPRequestHandler):
    received: list[dict] = []

    def do_POST(self) -> None:  # noqa: N802 (http.server's name)
        self.received.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def webhook() -> Iterator[tuple[str, list[dict]]]:
    """A local HTTP endpoint standing in for Slack: (its URL, the JSON bodies it received)."""
    Webhook.received = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), Webhook)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/hook", Webhook.received
    finally:
        server.shutdown()


@pytest.mark.slow
def test_a_failed_run_notifies_with_the_stage_and_exit_code(project: Project, webhook) -> None:
    from prefect.blocks.notifications import CustomWebhookNotificationBlock
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.settings import PREFECT_API_URL, temporary_settings

    url, received = webhook
    block_name = f"rlhf-test-{uuid4().hex[:8]}"
    with temporary_settings({PREFECT_API_URL: project.api_url}):
        block = CustomWebhookNotificationBlock(name="rlhf", url=url, json_data={"text": "{{subject}}: {{body}}"})
        block.save(block_name)
    slug = f"{CustomWebhookNotificationBlock.get_block_type_slug()}/{block_name}"
    run = run_with_worker(project, LIFECYCLE, RLHF_NOTIFY_BLOCK=slug)
    assert run.state.is_failed()

    records, human = read_notifications(project.checkout)
    [record] = [r for r in records if r["flow_run_id"] == str(run.id)]
    assert (record["flow"], record["flow_run_name"], record["stage"], record["exit_code"]) == (
        "rlhf-lifecycle",
        run.name,
        "prepare",
        2,
    )
    assert record["workspace"] == str(project.checkout.resolve())
    assert record["ui_url"] == f"{ui_root(project.api_url)}/runs/flow-run/{run.id}"
    message = record["message"]
    assert "stage 'prepare' failed with exit code 2" in message and "learnig_rate" in message
    assert "rerun `rlhf run`" in message
    assert f"{record['time']} {message}" in human

    # the same paragraph in the run's log, at ERROR, and through the notification block
    def logged() -> bool:
        logs = call(project, "read_logs", LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run.id])))
        return any(log.level == logging.ERROR and log.message == message for log in logs)

    deadline = time.monotonic() + LOGS_RECORDED_TIMEOUT_S  # the engine ships its logs before it exits; be patient
    while not logged() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert logged()
    assert received == [{"text": f"{record['subject']}: {message}"}]
