"""Two runs on one workspace: the second refuses at once (or waits with --wait-for-lock), and nothing is corrupted.

The lock is ``fcntl.flock`` on ``.rlhf/lifecycle.lock`` (pipeline/lock.py), held by `rlhf run/repro/stage/publish`, the
lifecycle flow and the retrain flow. Another process holds it in these tests: a small holder script, or a real
`rlhf stage prepare` run.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from support import git_env, make_tiny_repo, tiny_params, write_params

from pipeline.lock import LOCK_FILE, WorkspaceBusy, holder_of, lock_path, workspace_lock

HOLDER_SCRIPT = """
import sys, time
from pipeline.lock import workspace_lock
with workspace_lock(sys.argv[1], 0.0, "test holder"):
    print("locked", flush=True)
    time.sleep(float(sys.argv[2]))
"""
TRY_SCRIPT = """
import sys
from pipeline.lock import WorkspaceBusy, workspace_lock
try:
    with workspace_lock(sys.argv[1], 0.0, "test probe"):
        print("free")
except WorkspaceBusy:
    print("busy")
"""


def start_holder(repo: Path, seconds: float = 120.0) -> subprocess.Popen:
    """Another process holding ``repo``'s lock for ``seconds``; returns once it holds it."""
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER_SCRIPT, str(repo), str(seconds)], stdout=subprocess.PIPE, text=True, env=git_env()
    )
    assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
    return holder


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.kill()
    process.wait(timeout=30)


def lock_is_free_for_another_process(repo: Path) -> bool:
    """Asked from a fresh process: this process's own (re-entrant) hold would answer "free" here."""
    result = subprocess.run(
        [sys.executable, "-c", TRY_SCRIPT, str(repo)], capture_output=True, text=True, env=git_env(), timeout=60
    )
    return result.stdout.strip() == "free"


def inventory(root: Path) -> dict[str, str]:
    """sha256 of every file (and a marker for every folder) under ``root``, .git and .dvc included."""
    return {
        str(p.relative_to(root)): "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if "__pycache__" not in p.parts
    }


def rlhf_cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "pipeline.cli", *args]


@pytest.fixture
def holder(tmp_path: Path) -> Iterator[subprocess.Popen]:
    process = start_holder(tmp_path)
    yield process
    stop(process)


# ------------------------------------------------------------------------------------------------------ the lock


def test_a_second_run_is_refused_at_once_naming_the_lock_file_and_the_holder(
    tmp_path: Path, holder: subprocess.Popen
) -> None:
    started = time.monotonic()
    with pytest.raises(WorkspaceBusy) as refusal:
        with workspace_lock(tmp_path, 0.0, "second run"):
            pytest.fail("the lock was granted twice")
    assert time.monotonic() - started < 1.0
    message = str(refusal.value)
    assert str(tmp_path / LOCK_FILE) in message and f"pid {holder.pid}" in message and "test holder" in message
    assert "--wait-for-lock" in message
    assert holder_of(lock_path(tmp_path))["pid"] == holder.pid  # the refused run did not overwrite the holder's record


def test_a_waiting_run_gets_the_lock_when_the_holder_finishes(tmp_path: Path) -> None:
    holder = start_holder(tmp_path, seconds=1.5)
    try:
        with pytest.raises(WorkspaceBusy, match=r"after waiting 0\.2 s"):
            with workspace_lock(tmp_path, 0.2):
                pass
        started = time.monotonic()
        with workspace_lock(tmp_path, 60.0, "waiting run"):
            waited = time.monotonic() - started
            assert holder.poll() is not None or holder.wait(timeout=5) == 0  # the holder had finished
            assert holder_of(lock_path(tmp_path))["pid"] == os.getpid()
    finally:
        stop(holder)
    assert 0.3 < waited < 30


def test_a_sigkilled_holder_releases_the_lock(tmp_path: Path) -> None:
    holder = start_holder(tmp_path)
    assert not lock_is_free_for_another_process(tmp_path)
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait(timeout=30)
    with workspace_lock(tmp_path, 0.0, "after the crash"):  # the kernel released the dead holder's flock
        assert holder_of(lock_path(tmp_path))["what"] == "after the crash"


def test_the_lock_is_reentrant_in_one_process_and_released_after_the_block_even_on_error(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="boom"):
        with workspace_lock(tmp_path, 0.0, "outer"):
            with workspace_lock(tmp_path, 0.0, "inner (the retrain flow calling the lifecycle flow)"):
                assert not lock_is_free_for_another_process(tmp_path)
            assert not lock_is_free_for_another_process(tmp_path)  # still held by the outer block
            raise RuntimeError("boom")
    assert lock_is_free_for_another_process(tmp_path)


# ------------------------------------------------------------------------------------------------------ the CLI


@pytest.fixture(scope="module")
def tiny_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A git + DVC repository of the tiny pipeline, nothing run yet (prepare shrunk further: it runs here)."""
    params = tiny_params()
    params["prepare"].update(n_demonstrations=200)
    return make_tiny_repo(tmp_path_factory.mktemp("concurrency") / "repo", params)


@pytest.mark.parametrize("command", [["repro"], ["stage", "sft"], ["run"]], ids=lambda c: "rlhf " + " ".join(c))
def test_the_cli_refuses_quickly_and_touches_nothing_while_the_workspace_is_locked(
    tiny_repo: Path, command: list[str]
) -> None:
    holder = start_holder(tiny_repo)
    try:
        before = inventory(tiny_repo)
        started = time.monotonic()
        result = subprocess.run(
            rlhf_cli(*command), cwd=tiny_repo, env=git_env(), capture_output=True, text=True, timeout=120
        )
        elapsed = time.monotonic() - started
        assert result.returncode == 2, result.stdout + result.stderr
        errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
        assert len(errors) == 1 and str(tiny_repo / LOCK_FILE) in errors[0] and f"pid {holder.pid}" in errors[0], (
            result.stderr
        )
        assert elapsed < 20  # refused before DVC (or a Prefect server) started: no stage ran
        assert inventory(tiny_repo) == before
    finally:
        stop(holder)


def test_two_real_runs_at_once_the_second_refuses_or_waits_and_the_first_completes(
    tiny_repo: Path, tmp_path: Path
) -> None:
    log = (tmp_path / "first.log").open("w")
    first = subprocess.Popen(
        rlhf_cli("stage", "prepare"), cwd=tiny_repo, env=git_env(), stdout=log, stderr=subprocess.STDOUT
    )
    try:
        deadline = time.monotonic() + 60
        while holder_of(lock_path(tiny_repo)).get("pid") != first.pid or lock_is_free_for_another_process(tiny_repo):
            assert first.poll() is None and time.monotonic() < deadline, "the first run never took the lock"
            time.sleep(0.1)
        refused = subprocess.run(
            rlhf_cli("repro"), cwd=tiny_repo, env=git_env(), capture_output=True, text=True, timeout=120
        )
        assert (
            refused.returncode == 2 and f"pid {first.pid}" in refused.stderr and "rlhf stage prepare" in refused.stderr
        )
        assert first.poll() is None, "the refusal must come while the first run is still going"
        waiting = subprocess.run(
            rlhf_cli("stage", "prepare", "--wait-for-lock", "300"),
            cwd=tiny_repo,
            env=git_env(),
            capture_output=True,
            text=True,
            timeout=400,
        )
        first.wait(timeout=300)
    finally:
        stop(first)
        log.close()
    assert first.returncode == 0, (tmp_path / "first.log").read_text()
    assert waiting.returncode == 0, waiting.stdout + waiting.stderr
    assert "didn't change" in waiting.stdout + waiting.stderr  # it ran after the first: prepare was already up to date
    status = subprocess.run(
        [sys.executable, "-m", "dvc", "status", "prepare", "--json"],
        cwd=tiny_repo,
        env=git_env(),
        capture_output=True,
        text=True,
        check=True,
    )
    assert json.loads(status.stdout) == {}  # dvc.lock and the outputs agree: nothing half-written
    assert lock_is_free_for_another_process(tiny_repo)


# ---------------------------------------------------------------------------------------------------- the flows


def task_run_count(flow_run_id) -> int:
    import asyncio

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    async def read():
        async with get_client() as client:
            return await client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))

    return len(asyncio.run(read()))


@pytest.mark.slow
def test_the_flows_refuse_while_the_workspace_is_locked_and_release_the_lock_after_a_run(
    prefect_api, tiny_repo: Path
) -> None:
    from flows.lifecycle import lifecycle
    from flows.notify import NOTIFICATIONS_FILE
    from flows.retrain import retrain

    holder = start_holder(tiny_repo)
    try:
        before = inventory(tiny_repo)
        for flow_function in (lifecycle, retrain):
            state = flow_function(repo_dir=str(tiny_repo), return_state=True)
            assert state.is_failed()
            with pytest.raises(WorkspaceBusy) as refusal:
                state.result()
            assert str(tiny_repo / LOCK_FILE) in str(refusal.value) and f"pid {holder.pid}" in str(refusal.value)
            assert task_run_count(state.state_details.flow_run_id) == 0  # no stage (nor `dvc status`) ran
        # the refusals were notified (flows/notify.py), one line pair per flow, and nothing else was written
        notifications = tiny_repo / NOTIFICATIONS_FILE
        records = [json.loads(line) for line in notifications.read_text().splitlines() if line.startswith("{")]
        assert [r["flow"] for r in records] == ["rlhf-lifecycle", "rlhf-retrain"]
        assert all(f"pid {holder.pid}" in r["message"] for r in records)
        notifications.unlink()
        assert inventory(tiny_repo) == before
    finally:
        stop(holder)
    # a run that fails (bad params: the first stage to run refuses them) still releases the lock
    good_params = (tiny_repo / "params.yaml").read_text()
    params = yaml.safe_load(good_params)
    params["sft"]["learning_rate"] = -1.0
    write_params(tiny_repo, params)
    try:
        state = lifecycle(repo_dir=str(tiny_repo), return_state=True)
    finally:
        (tiny_repo / "params.yaml").write_text(good_params)
    assert state.is_failed()
    with pytest.raises(Exception, match=r"sft\.learning_rate must be > 0"):
        state.result()
    assert lock_is_free_for_another_process(tiny_repo)
