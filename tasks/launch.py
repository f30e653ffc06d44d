"""Start a model stage as params.yaml's `launch` says: `accelerate launch` with the stage's profile, process count
and precision (the shared values, or the stage's overrides: rlhf.config.LaunchConfig).

    python -m tasks.launch -m tasks.sft --base models/base --data data/sft …        (dvc.yaml's cmd)

becomes (printed on stderr, then run in this process)

    accelerate launch --config_file configs/cpu-1proc.yaml --num_processes 1 --mixed_precision no \
        -m tasks.sft --base models/base --data data/sft …

The launcher exits with the stage's exit code (2: refused input, 3: diverged, 4: disk full), without accelerate's
traceback of its child's failure: the stage has already printed its one-line error. A stage that writes no event for
``launch.stall_timeout_s`` seconds is stopped with where each rank was, exit code 5 (tasks/stall.py).

Machines other than the first of a multi-node launch run that accelerate command themselves with their
``--machine_rank`` (README "Many machines"; the launcher prints it when the profile has num_machines > 1).
"""

from __future__ import annotations

import logging
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from rlhf.config import ConfigError, Launch
from rlhf.distributed import read_profile
from rlhf.params import load_params
from tasks.stage_io import (
    EXIT_BAD_INPUT,
    EXIT_DIVERGED,
    EXIT_NO_SPACE,
    EXIT_STALLED,
    events_file,
    fail,
    refuse_bad_input,
)
from tasks.stall import STACKS_ENV, StallWatch, stacks_folder

USAGE = "usage: python -m tasks.launch -m tasks.<stage> [stage arguments…]"


def accelerate_arguments(launch: Launch, module: str, arguments: list[str]) -> list[str]:
    """The arguments of `accelerate launch` for a stage."""
    return [
        "--config_file",
        launch.config_file,
        "--num_processes",
        str(launch.num_processes),
        "--mixed_precision",
        launch.mixed_precision,
        "-m",
        module,
        *arguments,
    ]


class HeldRecords(logging.Handler):
    """Keeps the log records of a logger tree while a launch runs, to pass on afterwards or drop."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def run_accelerate(arguments: list[str], watch: StallWatch | None = None) -> int:
    """`accelerate launch` with ``arguments`` in this process; the stage's exit code (the first failed rank's).

    torchrun's agent (several processes) logs its view of a failure ("closing signal SIGTERM", "failed (exitcode: 2)
    local_rank: 0 …") after the stage has printed its one ``error:`` line; those records are held while the launch
    runs and passed on unless the stage stopped on purpose (bad input, divergence, full disk) or ``watch`` stopped it,
    where they would only repeat what was said.
    """
    from accelerate.commands.launch import launch_command, launch_command_parser
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    if os.environ.get("RLHF_VERBOSE", "") in ("", "0"):
        # its "values were not passed … defaults used instead" warning on every CPU launch: the defaults are intended
        logging.getLogger("accelerate.commands.launch").setLevel(logging.ERROR)
    agent, held = logging.getLogger("torch.distributed.elastic"), HeldRecords()
    agent.addHandler(held)
    agent.propagate = False
    try:
        launch_command(launch_command_parser().parse_args(arguments))
        code = 0
    except subprocess.CalledProcessError as failed:  # one process: accelerate re-raises its child's exit code
        code = failed.returncode
    except ChildFailedError as failed:  # several processes (torchrun)
        codes = [failure.exitcode for _, failure in sorted(failed.failures.items())]
        code = next((code for code in codes if code > 0), 1)
    finally:
        agent.removeHandler(held)
        agent.propagate = True
    stalled = watch is not None and watch.report is not None
    if code not in (EXIT_BAD_INPUT, EXIT_DIVERGED, EXIT_NO_SPACE) and not stalled:  # a crash: the agent's view helps
        for record in held.records:
            logging.getLogger(record.name).handle(record)
    return code


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) < 2 or argv[0] != "-m" or not argv[1].startswith("tasks."):
        fail(USAGE)
    module, arguments = argv[1], argv[2:]
    stage = module.removeprefix("tasks.")
    with refuse_bad_input():  # params and the profile only: nothing starts when they are wrong
        try:
            launch = load_params().launch.for_stage(stage)
        except KeyError as error:
            raise ConfigError(f"{error.args[0]}; {USAGE}") from None
        machines = int(read_profile(launch.config_file, "launch profile").get("num_machines", 1) or 1)
        stall_timeout_s = load_params().launch.stall_timeout_s
    command = accelerate_arguments(launch, module, arguments)
    shown = shlex.join(["accelerate", "launch", *command])
    print(f"launch: {shown}", file=sys.stderr, flush=True)
    if machines > 1:
        print(
            f"launch: {machines} machines: on machine k = 1 … {machines - 1} run, in a checkout with the same "
            f"inputs: {shown.replace(' -m ', ' --machine_rank k -m ', 1)}",
            file=sys.stderr,
            flush=True,
        )
    raise SystemExit(run_watched(stage, command, stall_timeout_s))


def run_watched(stage: str, command: list[str], stall_timeout_s: float) -> int:
    """run_accelerate under a StallWatch of the stage's events file (none when ``stall_timeout_s`` is 0)."""
    events = events_file(stage).resolve()
    shutil.rmtree(stacks_folder(events), ignore_errors=True)  # a previous run's stacks would be read as this one's
    os.environ[STACKS_ENV] = str(stacks_folder(events))  # inherited by the stage processes
    watch = StallWatch(events, stall_timeout_s, project=Path(__file__).resolve().parents[1])
    if stall_timeout_s > 0:
        watch.start()
    try:
        code = run_accelerate(command, watch)
    finally:
        watch.finished.set()
    if watch.report is None:
        return code
    print(
        f"error: {stage}: no event for {stall_timeout_s:g} s (launch.stall_timeout_s), so the launcher stopped it; "
        f"last event: {watch.last_event}; where each rank was (full stacks in {stacks_folder(events_file(stage))}):",
        file=sys.stderr,
        flush=True,
    )
    for line in watch.report:
        print(f"  {line}", file=sys.stderr, flush=True)
    return EXIT_STALLED


if __name__ == "__main__":
    main()
