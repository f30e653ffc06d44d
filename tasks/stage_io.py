"""What every stage program shares and the library must not do: progress lines on stdout, the one-line refusal
that exits the process, and process-wide malloc tuning (docs/design.md §3).

Progress lines are single-line JSON objects ``@rlhf {"stage": …, "event": …, …}`` so an orchestrator (the Prefect
flow) can turn them into progress bars and tables while the stage runs; everything else on stdout is plain log text.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rlhf.validation import with_fix

PROGRESS_PREFIX = "@rlhf "  # marks a machine-readable progress line
EXIT_BAD_INPUT = 2  # refused before any expensive work: a rerun fails the same way
EXIT_DIVERGED = 3  # NaN/inf in training (rlhf.guards.NonFiniteError): the last good checkpoint is kept


def parse_paths(argv: list[str] | None, program: str, names: str) -> argparse.Namespace:
    """The stage's input and output paths, each ``--name PATH`` (``name+``: one or more paths), all required.

    Paths are written once, in dvc.yaml's ``cmd``, and reach the program as arguments (as in DVC's
    example-get-started), so DVC's deps and outs and what the program reads and writes cannot drift apart.
    e.g. ``parse_paths(argv, "python -m tasks.sft", "base data out metrics")``; ``--sft_data`` is ``--sft-data``.
    """
    parser = argparse.ArgumentParser(prog=program, description="Paths as dvc.yaml passes them (its `cmd`).")
    for name in names.split():
        many = name.endswith("+")
        name = name.rstrip("+")
        parser.add_argument(
            f"--{name.replace('_', '-')}", dest=name, type=Path, required=True, nargs="+" if many else None
        )
    return parser.parse_args(argv)


def emit(stage: str, event: str, **fields: object) -> None:
    """Print one progress/metrics line, flushed so it streams."""
    record = {"stage": stage, "event": event, "time": round(time.time(), 3), **fields}
    print(PROGRESS_PREFIX + json.dumps(record, default=float), flush=True)


def progress_logger(stage: str) -> Callable[[dict], None]:
    """A ``log(record)`` callback for the training loops."""
    return lambda record: emit(stage, "progress", **record)


def checkpoint_events(stage: str) -> Callable[[str, dict], None]:
    """The ``notify(event, fields)`` of a stage's resume checkpoints (rlhf.checkpoint): each event a progress line."""
    return lambda event, fields: emit(stage, event, **fields)


def fail(message: str, code: int = EXIT_BAD_INPUT) -> None:
    """Stop a stage with a one-line error (file and problem); under a multi-process launch only rank 0 prints it
    (every rank stops for the same reason, and one line is the promise)."""
    if os.environ.get("RANK", "0") == "0":  # torchrun's global rank; unset for one process
        print(f"error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(code)


class _RefuseBadInput:
    """Context manager of :func:`refuse_bad_input` (a class, so type checkers see it never swallows an error)."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, traceback: Any) -> None:
        # ConfigError and DataError are ValueErrors; OSError covers unreadable files and folders transformers rejects
        if isinstance(error, (ValueError, OSError)):
            fail(with_fix(str(error)))


def refuse_bad_input() -> _RefuseBadInput:
    """``with refuse_bad_input(): ...``: a bad-input error raised inside becomes one ``error:`` line with a fix, exit 2.

    Everything in the block must be cheap (params, JSONL files, tokenizers, config.json; never model weights).
    """
    return _RefuseBadInput()


@functools.cache
def _libc():
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    return None if name is None else ctypes.CDLL(name)


def tune_malloc_for_training(mmap_threshold: int = 1 << 20, trim_threshold: int = 1 << 30) -> bool:
    """Fix glibc's malloc thresholds for a training process (glibc only; returns whether it applied; mallopt(3)).

    A PPO step allocates and frees thousands of 0.1–1 MiB activation tensors; glibc's dynamic default serves some
    with mmap and trims the heap after frees, so their pages are faulted in and zeroed again every step. Blocks of
    1 MiB and more (weights, gradients, optimiser state) keep their own mappings and go back to the OS when freed.
    Measurements: docs/performance.md. (M_MMAP_THRESHOLD = -3, M_TRIM_THRESHOLD = -1.)
    """
    try:
        libc = _libc()
        return libc is not None and bool(libc.mallopt(-3, mmap_threshold)) and bool(libc.mallopt(-1, trim_threshold))
    except (OSError, AttributeError):
        return False


def release_free_heap() -> bool:
    """Hand the heap's free pages back to the OS (glibc malloc_trim(3); returns whether any were released).

    With the heap untrimmed (:func:`tune_malloc_for_training`), memory freed after one phase stays resident; trimming
    once per PPO iteration keeps peak RSS from creeping up.
    """
    try:
        libc = _libc()
        return libc is not None and bool(libc.malloc_trim(0))
    except (OSError, AttributeError):
        return False
