"""Shared fixtures: a workspace where every stage of the tiny pipeline has run once; a Prefect API for flow tests."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from support import REPO, run_stage, tiny_params, write_params

from pipeline.workspace import stage_names


@pytest.fixture(scope="session")
def pipeline_workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder where every stage of the tiny pipeline ran once, in DAG order (shared by the stage tests)."""
    workspace = tmp_path_factory.mktemp("pipeline")
    write_params(workspace, tiny_params())
    shutil.copytree(REPO / "configs", workspace / "configs")
    previous = Path.cwd()
    os.chdir(workspace)
    try:
        for stage in stage_names(REPO):  # dvc.yaml order
            run_stage(stage)
    finally:
        os.chdir(previous)
    return workspace


@pytest.fixture
def in_copy_of_workspace(pipeline_workspace: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private copy of the pipeline workspace as cwd, so a test may damage it."""
    copy = tmp_path / "workspace"
    shutil.copytree(pipeline_workspace, copy)
    monkeypatch.chdir(copy)
    return copy


@pytest.fixture(scope="session")
def _prefect_test_server():
    """One prefect_test_harness (a temporary Prefect server and SQLite database) for the whole session: starting one
    takes ≈ 12 s, and the flow tests tell their runs apart by flow-run id, pause key or artifact key."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="module")
def prefect_api(_prefect_test_server):
    """The session's Prefect test server as the API of this module's flows. After the module, the log and event
    workers are drained, as leaving a prefect_test_harness drains them: nothing of this module's is still in flight
    when the next module starts, and a later harness of its own (tests/reliability/test_secrets.py) gets fresh
    workers talking to its server rather than to this one."""
    yield
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    APILogWorker.drain_all()
    EventsWorker.drain_all()
