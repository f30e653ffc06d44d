"""PPO and its successors on the embedded task: same data, same reward model, same gold judge (docs/algorithms.md).

    python bench/algorithms.py --workdir /tmp/algorithms                       # every algorithm, seeds 0 1 2
    python bench/algorithms.py --workdir /tmp/algorithms --only ppo,grpo --seeds 0
    python bench/algorithms.py --workdir /tmp/algorithms --sweep diversity     # the mode-collapse settings, seed 0
    python bench/algorithms.py --workdir /tmp/algorithms --sweep precision     # PPO in fp32 and in bf16, seeds 0 1 2

The upstream stages (prepare → reward, params.yaml as it is, seed 0) run once into ``<workdir>/upstream``; every run
then gets its own folder whose upstream outputs are links to those, its params.yaml with ``seed: S`` and the run's
``ppo``/``dpo`` overrides, and runs the `ppo` and `evaluate` stages exactly as dvc.yaml runs them. ``seed`` moves only
the ppo (seed + 4) and evaluate (seed + 5) streams here, since nothing upstream reruns.

Matched budget: every RL algorithm samples the same 60 × 128 episodes of at most 24 tokens (the table reports the
tokens actually generated); DPO samples nothing while training: its budget is the preference data the reward model
was trained on. ``--jobs 2`` runs two runs at a time on one thread each (the wall times are then per run, one core).
Writes ``<workdir>/results-<sweep>.json`` and ``machine-<sweep>.json`` (bench/machine.py) and prints the markdown
table of docs/algorithms.md.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "bench"))
import machine  # noqa: E402
from support import merge_params, stage_command  # noqa: E402  (dvc.yaml's commands and params, as the tests use them)

UPSTREAM_STAGES = ("prepare", "sft", "sample_pairs", "label", "reward")
UPSTREAM_OUTPUTS = ("data", "models/base", "models/sft", "models/reward", "configs")

# name → (params overrides, what it is). Each as its paper runs it, on the embedded defaults otherwise.
ALGORITHMS: dict[str, tuple[dict, str]] = {
    "ppo": ({}, "PPO: critic from the RM, GAE λ 0.95, KL −β·k1 in the reward (adaptive β)"),
    "grpo": (
        {"ppo": {"algorithm": "grpo", "group_size": 4}},
        "GRPO: K = 4, (r − mean)/std, KL −β·k1 in the reward (as every algorithm here)",
    ),
    "grpo_kl_loss": (
        {"ppo": {"algorithm": "grpo", "group_size": 4, "kl_penalty": "loss"}},
        "GRPO as published: K = 4, (r − mean)/std, KL as a β·k3 loss term",
    ),
    "dr_grpo": (
        {
            "ppo": {
                "algorithm": "grpo",
                "group_size": 4,
                "kl_penalty": "loss",
                "group_std_normalise": False,
                "loss_aggregation": "seq-mean-token-sum-norm",
            }
        },
        "Dr. GRPO: K = 4, r − mean, token sums over the length cap",
    ),
    "rloo": ({"ppo": {"algorithm": "rloo", "group_size": 4}}, "RLOO: K = 4, leave-one-out baseline, KL in the reward"),
    "reinforce_pp": (
        {"ppo": {"algorithm": "reinforce_pp"}},
        "REINFORCE++: token KL in the reward, global advantage whitening",
    ),
    "dpo": ({"ppo": {"algorithm": "dpo"}}, "DPO: offline on data/preferences (σ loss, β from the dpo section)"),
}

# The mode-collapse study (docs/algorithms.md): settings meant to keep distinct responses up, PPO unless named.
DIVERSITY: dict[str, tuple[dict, str]] = {
    "ppo_ent_0.01": ({"ppo": {"ent_coef": 0.01}}, "PPO, entropy bonus c2 = 0.01"),
    "ppo_ent_0.03": ({"ppo": {"ent_coef": 0.03}}, "PPO, entropy bonus c2 = 0.03"),
    "ppo_kl_target_1": ({"ppo": {"kl_target": 1.0, "kl_horizon": 2000}}, "PPO, adaptive KL target 1 nat (fast β)"),
    "ppo_clip_higher": ({"ppo": {"clip_range_high": 0.28}}, "PPO, clip-higher ε_high = 0.28"),
    "ppo_kl_loss_0.3": ({"ppo": {"kl_penalty": "loss", "kl_coef": 0.3}}, "PPO, KL as a β·k3 loss term, β = 0.3"),
    "grpo_kl_loss_0.3": (
        {"ppo": {"algorithm": "grpo", "group_size": 4, "kl_penalty": "loss", "kl_coef": 0.3}},
        "GRPO, KL as a β·k3 loss term, β = 0.3",
    ),
    "grpo_kl_loss_0.5": (
        {"ppo": {"algorithm": "grpo", "group_size": 4, "kl_penalty": "loss", "kl_coef": 0.5}},
        "GRPO, KL as a β·k3 loss term, β = 0.5",
    ),
    "grpo_k8": ({"ppo": {"algorithm": "grpo", "group_size": 8}}, "GRPO with K = 8 samples per prompt"),
}

# bf16 must not cost learning (docs/performance.md § "bf16"): the embedded default's PPO in fp32 and in bf16
PRECISION: dict[str, tuple[dict, str]] = {
    "ppo": ({}, "PPO, fp32 (the embedded default)"),
    "ppo_bf16": (
        {"launch": {"ppo": {"mixed_precision": "bf16"}}},
        "PPO, bf16 (launch.ppo.mixed_precision: bf16; fp32 master weights and AdamW)",
    ),
}

METRICS = (
    "gold_win_rate",
    "gold_win_rate_ci_low",
    "gold_win_rate_ci_high",
    "gold_gain_in_sft_std",
    "kl_to_ref",
    "valid_rate_policy",
    "valid_rate_sft",
    "distinct_policy",
    "distinct_sft",
    "response_length_policy",
)


def environment(threads: int) -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    return env


def run_stage(stage: str, folder: Path, threads: int) -> tuple[float, float]:
    """One stage as dvc.yaml runs it; returns its wall seconds and CPU seconds (its whole process tree: os.wait4's
    rusage counts the waited-for descendants), the fairer measure while other runs share the cores.
    Its output goes to <folder>/<stage>.log."""
    started = time.perf_counter()
    with (folder / f"{stage}.log").open("w") as log:
        command = stage_command(stage, folder)
        child = subprocess.Popen(command, cwd=folder, env=environment(threads), stdout=log, stderr=log)
        _, status, usage = os.wait4(child.pid, 0)
    code = os.waitstatus_to_exitcode(status)
    if code:
        raise RuntimeError(f"{stage} failed in {folder} (exit {code}): see {folder / f'{stage}.log'}")
    return time.perf_counter() - started, usage.ru_utime + usage.ru_stime


def build_upstream(workdir: Path) -> Path:
    upstream = workdir / "upstream"
    if (upstream / "models/reward").exists():
        return upstream
    upstream.mkdir(parents=True, exist_ok=True)
    shutil.copy(REPO / "params.yaml", upstream / "params.yaml")
    shutil.copytree(REPO / "configs", upstream / "configs", dirs_exist_ok=True)
    for stage in UPSTREAM_STAGES:
        print(f"upstream: {stage} …", flush=True)
        run_stage(stage, upstream, threads=2)
    return upstream


def run_one(upstream: Path, folder: Path, overrides: dict, seed: int, threads: int) -> dict:
    """ppo + evaluate for one (algorithm, seed) on the shared upstream; returns the table's numbers."""
    if folder.exists():
        shutil.rmtree(folder)
    (folder / "models").mkdir(parents=True)
    for name in UPSTREAM_OUTPUTS:
        (folder / name).symlink_to(upstream / name, target_is_directory=True)
    # the repository's params.yaml (its ppo, dpo and evaluate sections as they are now); the upstream sections match
    # what built <workdir>/upstream unless params.yaml changed since
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["seed"] = seed
    merge_params(params, overrides)
    (folder / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    seconds, cpu_seconds = run_stage("ppo", folder, threads)
    run_stage("evaluate", folder, threads)
    evaluation = json.loads((folder / "metrics/evaluate.json").read_text())
    training = json.loads((folder / "metrics/ppo.json").read_text())
    with (folder / "plots/ppo.csv").open() as handle:
        history = list(csv.DictReader(handle))
    tokens = sum(float(row.get("rollout/generated_tokens") or 0) for row in history)
    return {
        **{name: evaluation.get(name) for name in METRICS},
        "generated_tokens": tokens,
        "stage_seconds": seconds,
        "stage_cpu_seconds": cpu_seconds,
        "peak_rss_mib": training.get("peak_rss_mib"),
        "trainable_parameters": training.get("trainable_parameters"),
    }


def summarise(results: dict[str, list[dict]]) -> str:
    """The markdown table: mean over seeds (± std where there are several), then SFT's validity for reference."""

    def cell(runs: list[dict], name: str, digits: int = 3) -> str:
        values = [run[name] for run in runs if run.get(name) is not None]
        if not values:
            return "–"
        mean = statistics.fmean(values)
        spread = f" ± {statistics.stdev(values):.{digits}f}" if len(values) > 1 else ""
        return f"{mean:.{digits}f}{spread}"

    header = (
        "| algorithm | seeds | gold win rate (95 % CI, mean of bounds) | gold gain (SFT std) | KL to SFT | validity "
        "(SFT) | distinct (SFT) | length | tokens generated | wall s | CPU s | peak RSS MiB | trained params |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|\n"
    )
    rows = []
    for name, runs in results.items():
        interval = (
            f"[{cell(runs, 'gold_win_rate_ci_low').split(' ')[0]}, {cell(runs, 'gold_win_rate_ci_high').split(' ')[0]}]"
        )
        rows.append(
            f"| {name} | {len(runs)} | {cell(runs, 'gold_win_rate')} {interval} "
            f"| {cell(runs, 'gold_gain_in_sft_std', 2)} "
            f"| {cell(runs, 'kl_to_ref', 2)} | {cell(runs, 'valid_rate_policy')} ({cell(runs, 'valid_rate_sft')}) "
            f"| {cell(runs, 'distinct_policy', 2)} ({cell(runs, 'distinct_sft', 2)}) "
            f"| {cell(runs, 'response_length_policy', 1)} | {cell(runs, 'generated_tokens', 0)} "
            f"| {cell(runs, 'stage_seconds', 0)} | {cell(runs, 'stage_cpu_seconds', 0)} "
            f"| {cell(runs, 'peak_rss_mib', 0)} "
            f"| {cell(runs, 'trainable_parameters', 0)} |"
        )
    return header + "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--only", default="", help="comma-separated names (default: all of the chosen set)")
    parser.add_argument("--sweep", choices=["algorithms", "diversity", "precision"], default="algorithms")
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time (each on 2 / jobs threads)")
    args = parser.parse_args()
    table = {"algorithms": ALGORITHMS, "diversity": DIVERSITY, "precision": PRECISION}[args.sweep]
    names = [n for n in table if not args.only or n in args.only.split(",")]
    upstream = build_upstream(args.workdir.resolve())
    results_path = args.workdir / f"results-{args.sweep}.json"
    results: dict[str, list[dict]] = json.loads(results_path.read_text()) if results_path.exists() else {}
    threads = max(1, 2 // args.jobs)
    jobs = [(name, seed) for seed in args.seeds for name in names]

    def one(job: tuple[str, int]) -> tuple[str, int, dict]:
        name, seed = job
        folder = args.workdir.resolve() / "runs" / f"{name}-seed{seed}"
        result = run_one(upstream, folder, table[name][0], seed, threads)
        print(f"{name} seed {seed}: {json.dumps(result)}", flush=True)
        return name, seed, result

    with ThreadPoolExecutor(args.jobs) as pool:
        for name, seed, result in pool.map(one, jobs):
            runs = [r for r in results.get(name, []) if r.get("seed") != seed]
            results[name] = sorted([*runs, {"seed": seed, **result}], key=lambda r: r["seed"])
            results_path.write_text(json.dumps(results, indent=1))
    described = machine.describe("cpu")
    (args.workdir / f"machine-{args.sweep}.json").write_text(json.dumps(described, indent=1))
    print(f"machine: {machine.one_line(described)}")
    print(summarise({name: results[name] for name in table if name in results}))


if __name__ == "__main__":
    main()
