"""`rlhf`: the command-line front door.

    rlhf run                   run the pipeline as the Prefect flow `rlhf-lifecycle` (DVC decides what reruns)
    rlhf repro                 the same without Prefect: plain `dvc repro`
    rlhf stage NAME            reproduce one stage and its out-of-date upstream stages (`dvc repro NAME`)
    rlhf status                out-of-date stages (`dvc status`)
    rlhf serve --cron EXPR     serve the scheduled retraining deployment `rlhf-retrain`
    rlhf label                 label pending pairs in the Prefect UI (flow `rlhf-human-labels`)

Prefect: with PREFECT_API_URL set the runs go to that server (start one with `prefect server start`, UI at
http://127.0.0.1:4200); otherwise a temporary local server is started for the run.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

STAGES = ("prepare", "sft", "sample_pairs", "label", "reward", "ppo", "evaluate", "release")


def stage_environment() -> dict[str, str]:
    """The stage commands (`python`, `accelerate`) must resolve to this installation's interpreter."""
    env = dict(os.environ)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    env.setdefault("DVC_NO_ANALYTICS", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


def dvc(*args: str) -> int:
    return subprocess.call([sys.executable, "-m", "dvc", *args], env=stage_environment())


def prefect_defaults() -> None:
    """Offline-friendly Prefect settings (no telemetry lookups); explicit user settings win."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("DVC_NO_ANALYTICS", "1")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="rlhf", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="run the pipeline as a Prefect flow")
    run.add_argument("--stage-timeout", type=float, default=None, help="seconds before a stage's task times out")
    commands.add_parser("repro", help="run the pipeline with plain dvc repro")
    stage = commands.add_parser("stage", help="reproduce one stage (and its out-of-date upstream stages)")
    stage.add_argument("name", choices=STAGES)
    commands.add_parser("status", help="show out-of-date stages")
    serve = commands.add_parser("serve", help="serve the scheduled retraining deployment")
    serve.add_argument("--cron", required=True, help='cron expression, e.g. "0 3 * * *"')
    serve.add_argument("--metric", default="gold_win_rate", help="evaluation metric the gate compares")
    serve.add_argument("--margin", type=float, default=0.0, help="how much better a new model must be to be promoted")
    label = commands.add_parser("label", help="collect human preference labels through the Prefect UI")
    label.add_argument("--batch-size", type=int, default=8)
    label.add_argument("--batches", type=int, default=1)
    args = parser.parse_args(argv)
    if args.command == "repro":
        return dvc("repro")
    if args.command == "stage":
        return dvc("repro", args.name)
    if args.command == "status":
        return dvc("status")
    prefect_defaults()
    if args.command == "run":
        from flows.lifecycle import lifecycle

        state = lifecycle(repo_dir=".", stage_timeout_s=args.stage_timeout, return_state=True)
        return 0 if state.is_completed() else 1
    if args.command == "serve":
        from flows.retrain import serve as serve_retrain

        serve_retrain(args.cron, ".", args.metric, args.margin)
        return 0
    from flows.labeling import collect_human_labels

    state = collect_human_labels(repo_dir=".", batch_size=args.batch_size, n_batches=args.batches, return_state=True)
    return 0 if state.is_completed() else 1


if __name__ == "__main__":
    sys.exit(main())
