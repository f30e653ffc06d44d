"""Helpers shared by the tests: a tiny configuration of the pipeline, running stages, tiny git+DVC repositories."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("ACCELERATE_USE_CPU", "1")


def tiny_params() -> dict:
    """params.yaml shrunk so the whole pipeline runs in about a minute on 2 cores."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["prepare"].update(n_demonstrations=1500, n_train_prompts=64, n_eval_prompts=16)
    params["prepare"]["model"] = {"n_layer": 2, "n_head": 2, "n_embd": 32, "n_positions": 64}
    params["sft"].update(steps=60, batch_size=32, warmup_steps=5, eval_every=30)
    params["sample_pairs"].update(n_prompts=48, samples_per_prompt=3)
    params["reward"].update(epochs=1, batch_size=16, warmup_steps=2)
    params["ppo"].update(
        iterations=2, rollout_batch_size=16, num_minibatches=2, ppo_epochs=2, snapshot_every=1
    )  # 2 policy snapshots
    params["evaluate"].update(n_prompts=8, samples_per_prompt=2, snapshot_prompts=4, bootstrap_resamples=200)
    return params


def write_params(folder: Path, params: dict) -> None:
    (folder / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def merge_params(into: dict, values: dict) -> None:
    """Nested update of a params mapping: mappings merge key by key, anything else replaces."""
    for key, value in values.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            merge_params(into[key], value)
        else:
            into[key] = value


def set_params(folder: Path, **sections: dict) -> None:
    """Update sections of ``folder``'s params.yaml; nested mappings (``launch={"sft": {…}}``) merge key by key."""
    params = yaml.safe_load((folder / "params.yaml").read_text())
    merge_params(params, sections)
    write_params(folder, params)


def stage_command(stage: str, workspace: Path | None = None) -> list[str]:
    """The stage's command as dvc.yaml writes it (paths included), ``${section.key}`` filled from the workspace's
    params.yaml (default: the repository's); ``python`` is this interpreter."""
    command = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"][stage]["cmd"]
    params = yaml.safe_load(((workspace or REPO) / "params.yaml").read_text())

    def value(match: re.Match) -> str:
        section, key = match.group(1).split(".", 1)
        return str(params[section][key])

    words = shlex.split(re.sub(r"\$\{([\w.]+)\}", value, command))
    return [sys.executable, *words[1:]] if words[0] == "python" else words


def stage_arguments(stage: str) -> list[str]:
    """The arguments dvc.yaml passes to the stage's program (its paths): everything after ``-m tasks.<stage>``."""
    words = stage_command(stage)
    return words[words.index(f"tasks.{stage}") + 1 :]


def run_stage(stage: str) -> None:
    """Run a stage program's main() in this process (cwd is the workspace), with the paths dvc.yaml passes."""
    import importlib

    importlib.import_module(f"tasks.{stage}").main(stage_arguments(stage))


def stage_pids(workspace: Path, stage: str) -> list[int]:
    """PIDs of the processes running ``tasks.<stage>`` in ``workspace``: the launcher (tasks/launch.py, which runs
    `accelerate launch` in its own process) and its workers (Linux /proc). Killing a stage means killing them all,
    as a SIGKILL of a whole process group (Ctrl-C in a terminal, a preempted machine) does."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
            if f"tasks.{stage}".encode() in argv and Path(os.readlink(entry / "cwd")) == workspace:
                found.append(int(entry.name))
        except (OSError, ValueError):
            continue
    return found


def git_env() -> dict[str, str]:
    """Environment for subprocesses: this interpreter first on PATH, a git identity, no DVC analytics."""
    env = dict(os.environ)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env["PATH"]
    env.update(
        DVC_NO_ANALYTICS="1",
        GIT_AUTHOR_NAME="ci",
        GIT_AUTHOR_EMAIL="ci@example.invalid",
        GIT_COMMITTER_NAME="ci",
        GIT_COMMITTER_EMAIL="ci@example.invalid",
    )
    return env


def make_tiny_repo(repo: Path, params: dict | None = None) -> Path:
    """A fresh git + DVC repository holding the pipeline's code and a tiny params.yaml, committed."""
    repo.mkdir(parents=True, exist_ok=True)
    for folder in ("rlhf", "tasks", "configs", "flows", "pipeline"):
        shutil.copytree(REPO / folder, repo / folder, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "dvc.yaml", repo / "dvc.yaml")
    if (REPO / "data/human_labels").exists():
        shutil.copytree(REPO / "data/human_labels", repo / "data/human_labels")
    write_params(repo, params or tiny_params())
    for command in (
        ["git", "init", "-q"],
        [sys.executable, "-m", "dvc", "init", "-q"],
        ["git", "add", "-A"],
        ["git", "commit", "-qm", "tiny pipeline"],
    ):
        subprocess.run(command, cwd=repo, env=git_env(), check=True, capture_output=True)
    return repo


def stage_outputs(stage: str) -> list[str]:
    """The paths dvc.yaml declares the stage writes (outs, metrics and plots)."""
    declared = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"][stage]
    entries = [entry for kind in ("outs", "metrics", "plots") for entry in declared.get(kind) or []]
    return [entry if isinstance(entry, str) else next(iter(entry)) for entry in entries]


def make_tiny_repo_with_stages_done(repo: Path, workspace: Path, stages: list[str], params: dict | None = None) -> Path:
    """make_tiny_repo with ``workspace``'s params.yaml and the outputs ``stages`` wrote there (the pipeline_workspace
    fixture: the same code and params), recorded in dvc.lock with `dvc commit`: DVC and the flows find those stages
    up to date and run only the others. ``params``: params.yaml instead of the workspace's (changing only what the
    stages after ``stages`` read)."""
    make_tiny_repo(repo, params or yaml.safe_load((workspace / "params.yaml").read_text()))
    for stage in stages:
        for output in stage_outputs(stage):
            source, target = workspace / output, repo / output
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copytree(source, target) if source.is_dir() else shutil.copy2(source, target)
    subprocess.run(
        [sys.executable, "-m", "dvc", "commit", "-f", *stages], cwd=repo, env=git_env(), check=True, capture_output=True
    )
    return repo


def tiny_gpt2_config(**overrides):
    """A 2-layer GPT-2 config for the library tests: vocabulary 50, EOS 1, pad 0, dropout off."""
    from transformers import GPT2Config

    values = dict(
        vocab_size=50,
        n_positions=32,
        n_embd=32,
        n_layer=2,
        n_head=4,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        eos_token_id=1,
        pad_token_id=0,
        bos_token_id=2,
    )
    return GPT2Config(**(values | overrides))
