"""What every stage program shares and the library must not do: its events, the one-line refusal that exits the
process, and process-wide malloc tuning (docs/design.md §3).

Two audiences, two channels (docs/design.md §9):
- machines: each event (start, progress, checkpoint, metrics, failed) is one JSON line ``{"stage", "event", "time",
  …}`` appended to ``.rlhf/logs/STAGE.jsonl`` (:func:`events_file`); the Prefect flow tails it for its progress
  artifacts and its console, tests and benchmarks read it (:func:`read_events`). Each stage program starts it empty
  (:func:`start_events`), so it holds the latest run's events (a resumed run's begin with ``resumed``).
- people: stdout carries short plain lines (what ``dvc repro`` shows): the stage's key numbers at most every tenth of
  its loop (:data:`KEY_NUMBERS`) and its metrics when it ends.
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

from rlhf.files import NoSpaceError, free_space, is_no_space, shown_path
from rlhf.validation import with_fix
from tasks.stall import arm_stage_process

EVENTS_DIR = Path(".rlhf/logs")  # beside the resume checkpoints, outside DVC's outs; relative to the repo root
EXIT_BAD_INPUT = 2  # refused before any expensive work: a rerun fails the same way
EXIT_DIVERGED = 3  # NaN/inf in training (rlhf.guards.NonFiniteError): the last good checkpoint is kept
EXIT_NO_SPACE = 4  # a write found the disk or quota full: partial files removed, the last good checkpoint kept;
# not retried (a rerun fills the disk again until someone frees space)
EXIT_STALLED = 5  # no event for launch.stall_timeout_s: the launcher stopped the stage (tasks/stall.py); retried


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


# The three or four numbers a person watches in each stage's loop: (event field, label). Shown by the stage's plain
# lines and by the console of `rlhf run` (flows/console.py); every field still goes to the events file and DVCLive.
KEY_NUMBERS: dict[str, tuple[tuple[str, str], ...]] = {
    "sft": (("train/loss", "loss"), ("eval/loss", "eval loss")),
    "reward": (("train/loss", "loss"), ("eval/accuracy", "eval accuracy")),
    "ppo": (("objective/scores", "RM score"), ("objective/kl", "KL"), ("eps", "episodes/s")),
    "dpo": (("dpo/loss", "loss"), ("dpo/accuracy", "accuracy"), ("dpo/rewards/margin", "margin")),
}


def events_file(stage: str, repo_dir: str | Path = ".") -> Path:
    """The JSON-lines events file of ``stage`` (the latest run's events)."""
    return Path(repo_dir, EVENTS_DIR, f"{stage}.jsonl")


def start_events(stage: str) -> None:
    """A stage program's first call: its events file starts empty, for this run's events (the main process clears it;
    the other ranks of a launch only ever append)."""
    _shown_tenths.pop(stage, None)
    if os.environ.get("RANK", "0") == "0":
        events_file(stage).unlink(missing_ok=True)
    arm_stage_process()  # launched: stacks on SIGUSR1 for the launcher's stall watch, and die with the launcher


class EventTail:
    """Reads the JSON lines appended to a stage's events file since the last read (the file may appear late)."""

    def __init__(self, path: Path):
        self.path, self.offset, self.partial = path, 0, ""

    def read(self) -> list[dict]:
        try:
            with open(self.path) as events:
                events.seek(self.offset)
                text = events.read()
                self.offset = events.tell()
        except FileNotFoundError:
            return []
        lines = (self.partial + text).split("\n")
        self.partial = lines.pop()  # an unfinished last line waits for its end
        records = []
        for line in lines:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return records


def read_events(stage: str, repo_dir: str | Path = ".", event: str | None = None) -> list[dict]:
    """The stage's recorded events, in order (only those named ``event`` if given); [] when there are none."""
    records = EventTail(events_file(stage, repo_dir)).read()
    return [record for record in records if event is None or record["event"] == event]


_shown_tenths: dict[str, int] = {}  # stage -> the last tenth of its loop a plain progress line was printed for


def emit(stage: str, event: str, **fields: object) -> None:
    """Record one event (a JSON line in the stage's events file) and show a person its plain line on stdout."""
    record = {"stage": stage, "event": event, "time": round(time.time(), 3), **fields}
    path = events_file(stage)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as out:  # one write of one line: lines of several processes never interleave
        out.write(json.dumps(record, default=float) + "\n")
    line = plain_line(record)
    if line:
        print(line, flush=True)


def key_numbers(record: dict) -> str:
    """``RM score 1.23 · KL 2.10`` from a progress record: its stage's :data:`KEY_NUMBERS`, or (DPO, which runs as
    the ppo stage) the first table whose fields the record has."""
    own = KEY_NUMBERS.get(record.get("stage", ""), ())
    tables = [own, *(pairs for pairs in KEY_NUMBERS.values() if pairs is not own)]
    fields = next((pairs for pairs in tables if any(name in record for name, _ in pairs)), ())
    return " · ".join(f"{label} {record[name]:.3g}" for name, label in fields if isinstance(record.get(name), float))


def plain_line(record: dict) -> str | None:
    """The line a person sees on the stage's stdout for an event, or None (progress: once per tenth of the loop)."""
    stage, event = record["stage"], record["event"]
    if event == "progress" and record.get("total"):
        step, total = int(record["step"]), int(record["total"])
        tenth = 10 * step // total
        if tenth <= _shown_tenths.get(stage, -1):
            return None
        _shown_tenths[stage] = tenth
        numbers = key_numbers(record)
        return f"{stage}: {step}/{total}" + (f" · {numbers}" if numbers else "")
    if event == "metrics":
        shown = [f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in record.items() if k != "time"]
        return f"{stage}: done: " + ", ".join(shown[2:10]) + (" …" if len(shown) > 10 else "")
    if event == "resumed":
        return f"{stage}: resumed from step {record.get('step')}"
    if event in ("checkpoint_discarded", "checkpoint_unsupported"):
        return f"{stage}: {event.replace('_', ' ')}: {record.get('reason')}"
    return None


NOT_METRICS = frozenset({"step", "total", "time", "epoch"})  # progress fields that are coordinates, not metrics


class TrainingLog:
    """The ``log(record)`` of a training loop (sft, reward, ppo): each record a ``progress`` event and, on the main
    process, DVCLive metrics at ``record["step"]`` under ``live_dir`` (``dvclive/STAGE``: ``metrics.json`` holds the
    latest values for ``dvc exp show``, ``plots/metrics/<name>.tsv`` one curve per field for ``dvc plots diff``).

    DVCLive only writes files: no experiment saving, no dvc.yaml edits (dvc.yaml declares the folder as the stage's
    metrics and plots), no report, no timestamps (a rerun writes the same bytes).
    """

    def __init__(self, stage: str, live_dir: Path | None, main_process: bool = True):
        self.stage, self.live_dir, self.main_process = stage, live_dir, main_process
        self.live = self._open(resume=False) if main_process and live_dir is not None else None

    def _open(self, resume: bool):
        from dvclive import Live  # imported here: only main processes of training stages need it

        return Live(
            str(self.live_dir), resume=resume, report=None, save_dvc_exp=False, dvcyaml=False, monitor_system=False
        )

    def __call__(self, record: dict) -> None:
        if not self.main_process:
            return
        emit(self.stage, "progress", **record)
        if self.live is not None:
            self._log_metrics(record)

    def _log_metrics(self, record: dict) -> None:
        self.live.step = int(record["step"])
        for name, value in record.items():
            if name not in NOT_METRICS and isinstance(value, (int, float)) and not isinstance(value, bool):
                self.live.log_metric(name, float(value))
        self.live.make_summary()

    def rewrite(self, history: list[dict]) -> None:
        """Make the DVCLive curves hold ``history`` from its first step: a resumed run logged only the steps after its
        checkpoint (DVC deleted the folder before the rerun), but the full history came back with the checkpoint."""
        if self.live is None:
            return
        self.live = self._open(resume=False)  # starts the folder afresh
        for record in history:
            self._log_metrics(record)


def checkpoint_events(stage: str) -> Callable[[str, dict], None]:
    """The ``notify(event, fields)`` of a stage's resume checkpoints (rlhf.checkpoint): each event a progress line."""
    return lambda event, fields: emit(stage, event, **fields)


def fail(message: str, code: int = EXIT_BAD_INPUT) -> None:
    """Stop a stage with a one-line error (file and problem); under a multi-process launch only rank 0 prints it
    (every rank stops for the same reason, and one line is the promise)."""
    if os.environ.get("RANK", "0") == "0":  # torchrun's global rank; unset for one process
        print(f"error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(code)


def _mib(size: int) -> str:
    mib = size / 2**20
    return f"{mib:.2g} MiB" if mib < 10 else f"{mib:.0f} MiB"


def _first(error: BaseException | None, kind: type) -> Any:
    """The first error of type ``kind`` in ``error``'s chain (itself, then what it was raised from or during)."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, kind):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


def no_space_message(stage: str, error: BaseException, kept: Callable[[], str] | None = None) -> str:
    """The one line of a stage stopped by a full disk: what could not be written, about how much it needed, how much
    is free where, and what is kept (the write's own note, then ``kept()``: e.g. the resume checkpoint on disk)."""
    found = _first(error, NoSpaceError)
    if found is not None:  # from rlhf.files: the partial file or folder is already removed, the size estimated
        path, needed, free, mount = shown_path(found.path), f"≈ {_mib(found.needed)}", found.free, found.mount
        notes = [found.kept or "partial files removed"]
    else:  # from a writer outside rlhf.files (DVCLive, the events file, a PNG): it may name no file, may leave part
        raw = _first(error, OSError)
        named = (getattr(raw, "filename2", None) or getattr(raw, "filename", None)) if raw is not None else None
        path = shown_path(named) if named else "a file the error does not name"
        (free, mount), needed = free_space(named or "."), "more than is free"
        notes = [f"{path} may be incomplete" if named else "the file being written may be incomplete"]
    if kept is not None:
        notes.append(kept())
    return (
        f"{stage}: no space left on device writing {path} (needed {needed}, {_mib(free)} free on {mount}); "
        f"free space and rerun — {'; '.join(notes)}"
    )


def reports_full_disk(stage: str, kept: Callable[[], str] | None = None) -> Callable[[Callable], Callable]:
    """Decorator of a stage program's ``main``: a full disk (ENOSPC or EDQUOT, however the writer wrapped it) stops the
    stage with :func:`no_space_message` and exit :data:`EXIT_NO_SPACE` instead of a traceback; ``kept``: a sentence
    on what a rerun resumes from (rlhf.checkpoint.kept_on_disk), read after the failed write cleaned up."""

    def decorate(main: Callable) -> Callable:
        @functools.wraps(main)
        def run(*args: Any, **kwargs: Any) -> Any:
            try:
                return main(*args, **kwargs)
            except Exception as error:
                if not is_no_space(error):
                    raise
                fail(no_space_message(stage, error, kept), code=EXIT_NO_SPACE)

        return run

    return decorate


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


def tune_malloc_for_training(mmap_threshold: int = 32 << 20, trim_threshold: int = 1 << 30) -> bool:
    """Fix glibc's malloc thresholds for a training process (glibc only; returns whether it applied; mallopt(3)).

    A PPO step allocates and frees thousands of activation and gradient tensors; glibc's dynamic default serves some
    with mmap and trims the heap after frees, so their pages are faulted in and zeroed again every step. Blocks under
    32 MiB (glibc's largest allowed threshold: every activation and per-tensor gradient of the models this runs on a
    CPU) come from a heap that is trimmed once per iteration (:func:`release_free_heap`), not after every free.
    A 1 MiB threshold still mmapped each 2–4 MiB weight gradient and GEMM output afresh, page faults included
    (measurements: docs/performance.md). (M_MMAP_THRESHOLD = -3, M_TRIM_THRESHOLD = -1.)
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
