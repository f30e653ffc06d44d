"""`rlhf`: the command-line front door.

    rlhf run               reproduce the whole pipeline (`dvc repro`): only stages whose inputs changed rerun
    rlhf stage NAME        reproduce one stage and what it needs (`dvc repro NAME`)
    rlhf status            which stages are out of date (`dvc status`)
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="rlhf", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("run", help="reproduce the whole pipeline")
    stage = commands.add_parser("stage", help="reproduce one stage (and its out-of-date upstream stages)")
    stage.add_argument("name", choices=STAGES)
    commands.add_parser("status", help="show out-of-date stages")
    args = parser.parse_args(argv)
    if args.command == "run":
        return dvc("repro")
    if args.command == "stage":
        return dvc("repro", args.name)
    return dvc("status")


if __name__ == "__main__":
    sys.exit(main())
