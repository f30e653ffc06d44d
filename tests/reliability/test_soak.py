"""Soak (issue 17), short: the retrain flow three times in a row, each after a new batch of human labels.

The full soak (10 runs, the table in docs/reliability.md) is `python bench/soak.py`; this test runs the same code
(bench/soak.py) on the pipeline_workspace fixture's upstream outputs, in about 3 minutes on 2 cores. Run 1 keeps
the DVC cache as it is (its growth is one run's outputs); runs 2 and 3 collect garbage after the run
(``gc_cache=True``): the cache falls to what the workspace uses, and run 3 proves the next run needs nothing gc
deleted. Every run retrains label → reward → ppo → evaluate → release, peak RSS of run 3 stays within the tolerance
of run 2's, `.rlhf/` holds only what resume needs, and the promoted release (a copy outside the cache) survives gc.
"""

from __future__ import annotations

import hashlib
import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from prefect.settings import PREFECT_API_URL
from support import REPO, make_tiny_repo_with_stages_done

from pipeline.workspace import out_of_date_stages

pytestmark = pytest.mark.slow

UPSTREAM = ["prepare", "sft", "sample_pairs"]  # done once by the fixture; a new batch of labels reruns the rest


def load_soak():
    spec = importlib.util.spec_from_file_location("soak", REPO / "bench/soak.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


soak = load_soak()


@pytest.fixture
def soak_repo(pipeline_workspace: Path, tmp_path: Path) -> Path:
    """A git + DVC repository with human labels, its upstream stages done (the pairs to label exist)."""
    return make_tiny_repo_with_stages_done(tmp_path / "repo", pipeline_workspace, UPSTREAM, params=soak.soak_params())


def test_three_retrains_in_a_row_stay_bounded(soak_repo: Path, prefect_api, tmp_path: Path) -> None:
    env = soak.soak_env(PREFECT_API_URL.value(), tmp_path / "prefect-home")
    # run 3's gate refuses (an impossible margin), so the promoted release stays run 2's while gc drops run 2's objects
    results = soak.soak(soak_repo, env, runs=3, gc_from=2, logs=tmp_path / "logs", margins={3: 10.0})
    first, collected, after_gc = results
    print("\n" + soak.markdown_table(results))

    # every run retrained on its new batch; RSS, .rlhf/ contents and logs in bounds (bench/soak.py: problems)
    assert soak.problems(results) == []
    assert [r["new_labels"] for r in results] == [soak.BATCH_SIZE] * 3
    assert [r["labels"] for r in results] == [soak.BATCH_SIZE * k for k in (1, 2, 3)]
    # without gc a run adds its outputs to the cache; with gc the cache holds what the workspace uses, no more
    assert first["cache_growth_mib"] > 0
    for record in (collected, after_gc):
        assert record["decision"]["gc"].startswith("Removed"), record["decision"]["gc"]
        assert record["cache_objects"] < first["cache_objects"]
    # after gc: DVC finds the workspace up to date (its objects are kept); the promoted release, a copy outside the
    # cache, is run 2's, byte for byte, though gc removed run 2's objects from the cache
    assert out_of_date_stages(soak_repo) == []
    shutil.rmtree(soak_repo / "models/release")
    subprocess.run([sys.executable, "-m", "dvc", "checkout", "release"], cwd=soak_repo, env=env, check=True)
    assert out_of_date_stages(soak_repo) == []  # restored from the objects gc kept
    assert [r["decision"]["promoted"] for r in results] == [True, True, False]
    assert after_gc["promoted_digest"] == collected["promoted_digest"] != ""
    weights = hashlib.md5((soak_repo / ".rlhf/promoted/release/model.safetensors").read_bytes()).hexdigest()
    assert not (soak_repo / ".dvc/cache/files/md5" / weights[:2] / weights[2:]).exists()
