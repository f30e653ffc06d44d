"""Shared fixtures: a workspace where every stage of the tiny pipeline has run once."""

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
