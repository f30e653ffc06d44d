"""End to end: `dvc repro` of the tiny pipeline in a fresh git repository, then a no-op, then `dvc exp run -S`;
then what `dvc status` marks stale after an edit of a library module or of a param."""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from support import REPO, git_env, make_tiny_repo

from pipeline.workspace import stage_names

pytestmark = pytest.mark.slow
STAGES = stage_names(REPO)  # dvc.yaml order


def run(repo: Path, *args: str) -> str:
    result = subprocess.run(args, cwd=repo, env=git_env(), capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, f"{args} failed:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    return result.stdout + result.stderr


def stages_run(output: str) -> list[str]:
    return re.findall(r"Running stage '([a-z_]+)'", output)


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_repo(tmp_path_factory.mktemp("e2e") / "repo")


def test_dvc_repro_runs_every_stage_then_is_a_no_op(repo: Path) -> None:
    output = run(repo, sys.executable, "-m", "dvc", "repro")
    assert stages_run(output) == STAGES
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    assert set(lock["stages"]) == set(STAGES)
    evaluation = json.loads((repo / "metrics/evaluate.json").read_text())
    assert evaluation["n_prompts"] > 0 and 0 <= evaluation["gold_win_rate"] <= 1
    card = (repo / "models/release/README.md").read_text()
    assert lock["stages"]["ppo"]["outs"][0]["md5"] in card  # lineage: the card names the DVC hash of the policy
    for stage in ("prepare", "ppo", "evaluate"):  # … and of every dep and out of the upstream stages
        assert all(item["md5"] in card for kind in ("deps", "outs") for item in lock["stages"][stage].get(kind, []))
    assert {"models/policy_checkpoints", "plots/ppo.csv"} <= {dep["path"] for dep in lock["stages"]["evaluate"]["deps"]}
    again = run(repo, sys.executable, "-m", "dvc", "repro")
    assert stages_run(again) == [] and "up to date" in again
    shown = run(repo, sys.executable, "-m", "dvc", "metrics", "show", "--json")
    assert "gold_win_rate" in shown and "accuracy" in shown


def test_changing_a_ppo_param_reruns_only_ppo_evaluate_release(repo: Path) -> None:
    run(repo, "git", "add", "-A")
    run(repo, "git", "commit", "-qm", "pipeline outputs")
    output = run(repo, sys.executable, "-m", "dvc", "exp", "run", "-n", "lr-2e-4", "-S", "ppo.learning_rate=0.0002")
    assert stages_run(output) == ["ppo", "evaluate", "release"]
    assert yaml.safe_load((repo / "params.yaml").read_text())["ppo"]["learning_rate"] == 0.0002
    shown = run(repo, sys.executable, "-m", "dvc", "exp", "show", "--json")
    assert "0.0002" in shown


def experiment_metrics(shown: list[dict]) -> dict[str, dict]:
    """`dvc exp show --json` → {experiment name: {metrics file: its metrics}} for the baseline's experiments."""
    out = {}
    for baseline in shown:
        for experiment in baseline.get("experiments") or []:
            for revision in experiment.get("revs") or []:
                metrics = (revision.get("data") or {}).get("metrics") or {}
                out[revision["name"]] = {path: entry["data"] for path, entry in metrics.items()}
    return out


def test_dvclive_metrics_compare_experiments_side_by_side(repo: Path, tmp_path: Path) -> None:
    """DVCLive's files of sft, reward and ppo: `dvc exp show` lists each experiment's PPO metrics and `dvc plots diff`
    draws both experiments' PPO curves."""
    run(repo, sys.executable, "-m", "dvc", "exp", "run", "-n", "lr-5e-4", "-S", "ppo.learning_rate=0.0005")
    experiments = experiment_metrics(json.loads(run(repo, sys.executable, "-m", "dvc", "exp", "show", "--json")))
    assert {"lr-2e-4", "lr-5e-4"} <= set(experiments)
    live = {name: experiments[name]["dvclive/ppo/metrics.json"] for name in ("lr-2e-4", "lr-5e-4")}
    ppo = yaml.safe_load((repo / "params.yaml").read_text())["ppo"]
    for metrics in live.values():  # the field names as logged, nested by DVC at "/"; the last iteration's values
        assert metrics["step"] == ppo["iterations"] and {"kl", "scores"} <= set(metrics["objective"])
    assert live["lr-2e-4"]["objective"] != live["lr-5e-4"]["objective"]
    for stage in ("sft", "reward"):
        assert "loss" in experiments["lr-5e-4"][f"dvclive/{stage}/metrics.json"]["train"]
    table = run(repo, sys.executable, "-m", "dvc", "exp", "show", "--md", "--only-changed")
    assert "objective.kl" in table and "lr-2e-4" in table and "lr-5e-4" in table
    html = tmp_path / "plots"
    run(repo, sys.executable, "-m", "dvc", "plots", "diff", "lr-2e-4", "lr-5e-4", "-o", str(html))
    page = (html / "index.html").read_text()
    assert "dvclive/ppo/plots/metrics/objective/kl.tsv" in page and "lr-2e-4" in page and "lr-5e-4" in page


TIMING = re.compile(r"(^|/)(seconds|episodes_per_second|eps|peak_rss_mib|peak_gpu_mib)$|(^|/)timing/")


def results_only(metrics: dict, prefix: str = "") -> dict:
    """``metrics`` flattened, without what measures the machine rather than the run (time, speed, memory)."""
    flat = {}
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(results_only(value, f"{name}/"))
        elif not TIMING.search(name):
            flat[name] = value
    return flat


def contents(repo: Path, names: tuple[str, ...]) -> dict[str, str]:
    """sha256 of every file under ``names`` (DVC rewrites some files in place when it queues: same bytes)."""
    files = [p for name in names for p in [repo / name, *(repo / name).rglob("*")] if p.is_file()]
    return {str(p.relative_to(repo)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def test_queued_experiments_run_two_at_a_time_give_the_results_of_one_by_one(repo: Path) -> None:
    """`dvc exp run --queue` + `dvc queue start -j 2`: each experiment in its own temporary workspace (its own
    .rlhf/ resume checkpoints, staging folders and event logs), the same results as the experiments run one by one
    above (lr-2e-4, lr-5e-4), and the main workspace untouched."""
    watched = ("models", "metrics", "dvclive", ".rlhf", "params.yaml", "dvc.lock")
    before = contents(repo, watched)
    for name, rate in (("queued-2e-4", "0.0002"), ("queued-5e-4", "0.0005")):
        run(repo, sys.executable, "-m", "dvc", "exp", "run", "--queue", "-n", name, "-S", f"ppo.learning_rate={rate}")
    run(repo, sys.executable, "-m", "dvc", "queue", "start", "-j", "2")
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        status = run(repo, sys.executable, "-m", "dvc", "queue", "status")
        if "queued-2e-4" in status and not re.search(r"\b(Queued|Running)\b", status):
            break
        time.sleep(3)
    assert status.count("Success") == 2, status
    experiments = experiment_metrics(json.loads(run(repo, sys.executable, "-m", "dvc", "exp", "show", "--json")))
    for queued, one_by_one in (("queued-2e-4", "lr-2e-4"), ("queued-5e-4", "lr-5e-4")):
        for path in ("metrics/evaluate.json", "metrics/ppo.json", "dvclive/ppo/metrics.json"):
            assert results_only(experiments[queued][path]) == results_only(experiments[one_by_one][path]), path
    assert contents(repo, watched) == before, "the queued experiments worked in their own folders"


def stale_stages(repo: Path) -> set[str]:
    """The stages `dvc status` reports changed (their own deps or params; not yet the stages downstream of them)."""
    return set(json.loads(run(repo, sys.executable, "-m", "dvc", "status", "--json")))


def test_dvc_sees_the_code_each_stage_imports(repo: Path) -> None:
    from test_dvc_deps import sampler_module  # imported by sample_pairs, ppo and evaluate only (their import closures)

    assert stale_stages(repo) == set()  # after the repro and the experiment above
    module = repo / sampler_module()
    original = module.read_text()
    module.write_text(original + "\n# an edit of the sampler\n")
    try:
        assert stale_stages(repo) == {"sample_pairs", "ppo", "evaluate"}  # and nothing upstream
    finally:
        module.write_text(original)
    assert stale_stages(repo) == set()


def test_a_formerly_hidden_default_is_a_dvc_param(repo: Path) -> None:
    params_file = repo / "params.yaml"
    original = params_file.read_text()
    edited, count = re.subn(r"(?m)^(\s+clip_range:\s*)0\.2\b", r"\g<1>0.3", original)
    assert count == 1, "params.yaml lists ppo.clip_range"
    params_file.write_text(edited)
    try:
        assert stale_stages(repo) == {"ppo", "release"}  # release: the model card lists all of params.yaml
    finally:
        params_file.write_text(original)
