"""Start a model stage as params.yaml's `launch` says: `accelerate launch` with the stage's profile, process count
and precision (the shared values, or the stage's overrides: rlhf.config.LaunchConfig).

    python -m tasks.launch -m tasks.sft --base models/base --data data/sft …        (dvc.yaml's cmd)

becomes (printed on stderr, then run in this process)

    accelerate launch --config_file configs/cpu-1proc.yaml --num_processes 1 --mixed_precision no \
        -m tasks.sft --base models/base --data data/sft …

The launcher exits with the stage's exit code (2: refused input, 3: diverged), without accelerate's traceback of
its child's failure: the stage has already printed its one-line error.

Machines other than the first of a multi-node launch run that accelerate command themselves with their
``--machine_rank`` (README "Many machines"; the launcher prints it when the profile has num_machines > 1).
"""

from __future__ import annotations

import logging
import os
import shlex
import subprocess
import sys

from rlhf.config import ConfigError, Launch
from rlhf.distributed import read_profile
from rlhf.params import load_params
from tasks.stage_io import EXIT_BAD_INPUT, EXIT_DIVERGED, fail, refuse_bad_input

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


def run_accelerate(arguments: list[str]) -> int:
    """`accelerate launch` with ``arguments`` in this process; the stage's exit code (the first failed rank's).

    torchrun's agent (several processes) logs its view of a failure ("closing signal SIGTERM", "failed (exitcode: 2)
    local_rank: 0 …") after the stage has printed its one ``error:`` line; those records are held while the launch
    runs and passed on unless the stage stopped on purpose (bad input, divergence), where they would only repeat it.
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
    if code not in (EXIT_BAD_INPUT, EXIT_DIVERGED):  # a crash: what the agent saw says where
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
    raise SystemExit(run_accelerate(command))


if __name__ == "__main__":
    main()
