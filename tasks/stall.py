"""Hangs of launched stages: one that stops making progress fails fast and says where each rank was; a stage
process dies with its launcher; and a multi-process stage exits without the teardown that can deadlock
(docs/reliability.md).

Two halves, joined by the environment variable ``RLHF_STACKS_DIR`` that the launcher sets for its children:

- in each stage process (``arm_stage_process``, called by ``tasks.stage_io.start_events``): SIGUSR1 makes Python's
  ``faulthandler`` write every thread's stack to ``RANK.txt`` in that folder, and the process dies with its launcher
  (Linux ``PR_SET_PDEATHSIG``), so a killed launcher never leaves a stage process running on;
- in the launcher (``StallWatch``, run by tasks/launch.py): a thread that watches the stage's events file; when no
  event has been written for ``launch.stall_timeout_s`` seconds it signals every process under the launcher, reads
  their stacks, kills them, and keeps a one-line summary per rank for the launcher's error.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import faulthandler
import os
import re
import signal
import sys
import threading
import time
from pathlib import Path

import psutil

STACKS_ENV = "RLHF_STACKS_DIR"
PR_SET_PDEATHSIG = 1  # linux/prctl.h
_dump_file = None  # kept open for faulthandler, which writes to its descriptor from the signal handler


def stacks_folder(events: Path) -> Path:
    """Where the ranks of the stage whose events file is ``events`` write their stacks: ``.rlhf/logs/ppo.stacks/``."""
    return events.with_suffix(".stacks")


def arm_stage_process() -> None:
    """In a stage process started by tasks/launch.py: dump stacks on SIGUSR1, die with the launcher. Elsewhere (a
    stage's main() called in a test's process) nothing."""
    global _dump_file
    folder = os.environ.get(STACKS_ENV)
    if not folder:
        return
    rank = int(os.environ.get("RANK", "0"))
    Path(folder).mkdir(parents=True, exist_ok=True)
    path = Path(folder) / f"{rank}.txt"
    _dump_file = open(path, "w")  # noqa: SIM115 (open for the life of the process)
    faulthandler.register(signal.SIGUSR1, file=_dump_file, all_threads=True)
    atexit.register(_remove_if_unused, path)  # a stage that ends normally leaves no empty stack file behind
    die_with_parent()


def end_stage(accelerator) -> None:
    """The last call of a model stage's main(): accelerate's ``end_training`` (trackers, the process group); then, in
    a launch of several processes, this process exits at once (exit 0), its atexit handlers run and its streams
    flushed, without the interpreter's teardown of the objects still alive.

    Why: that teardown frees the DDP wrapper's Reducer with the GIL held, which can drop the last reference to the
    gloo process group; its destructor joins gloo's worker thread, which may still be freeing the tensors of the last
    collective and waits for the GIL: a deadlock (pytorch/pytorch#56297, seen here under CPU load: docs/reliability.md
    "The hang"). Every output is written (and fsynced, rlhf/files.py) before this call."""
    accelerator.end_training()
    if accelerator.num_processes <= 1:
        return
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _remove_if_unused(path: Path) -> None:
    faulthandler.unregister(signal.SIGUSR1)
    if path.exists() and path.stat().st_size == 0:
        path.unlink(missing_ok=True)
        with contextlib.suppress(OSError):  # the other ranks' files may still be there
            path.parent.rmdir()


def die_with_parent() -> None:
    """SIGKILL this process when its parent exits (Linux; elsewhere nothing). A parent already gone before the call
    (re-parented between fork and here) ends this process at once."""
    parent = os.getppid()
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
            return
    except (OSError, AttributeError):  # no libc prctl (macOS …)
        return
    if os.getppid() != parent:
        os.kill(os.getpid(), signal.SIGKILL)


FRAME = re.compile(r'^\s+File "(?P<file>[^"]+)", line (?P<line>\d+) in (?P<function>\S+)')


def where(dump: str, project: Path) -> str:
    """``file:line in function`` of the interrupted thread's innermost frame in ``project``, and its innermost frame
    overall when that is elsewhere (a torch collective, a lock). ``dump`` is faulthandler's text: blocks of
    ``Thread 0x… (most recent call first):`` or ``Current thread 0x…`` followed by ``  File "…", line N in f``."""
    blocks = re.split(r"\n(?=(?:Current thread|Thread) 0x)", dump.strip())
    block = next((b for b in blocks if b.startswith("Current thread")), blocks[0] if blocks else "")
    frames = [m.groupdict() for m in map(FRAME.match, block.splitlines()) if m]
    if not frames:
        return "no Python stack written"

    def own(frame: dict) -> bool:
        return Path(frame["file"]).is_relative_to(project) and "site-packages" not in frame["file"]

    def show(frame: dict) -> str:
        path = Path(frame["file"])
        if "site-packages" in path.parts:  # an installed package: from its top-level folder
            shown = Path(*path.parts[path.parts.index("site-packages") + 1 :])
        else:
            shown = path.relative_to(project) if path.is_relative_to(project) else path
        return f"{shown}:{frame['line']} in {frame['function']}"

    own = next((frame for frame in frames if own(frame)), None)
    if own is None or own is frames[0]:
        return show(frames[0])
    return f"{show(own)}, waiting in {show(frames[0])}"


def _stamp(path: Path) -> tuple[int, int] | None:
    try:
        stat = path.stat()
    except FileNotFoundError:
        return None
    return stat.st_size, stat.st_mtime_ns


class StallWatch(threading.Thread):
    """Watches ``events`` (the stage's JSON-lines events file) from the launcher; after ``timeout_s`` without a
    change, stops the stage's processes and sets ``report``: one line per rank saying where it was."""

    def __init__(self, events: Path, timeout_s: float, project: Path, poll_s: float = 1.0) -> None:
        super().__init__(daemon=True, name="stall-watch")
        self.events, self.timeout_s, self.project, self.poll_s = events, timeout_s, project, poll_s
        self.folder = stacks_folder(events)
        self.finished = threading.Event()
        self.report: list[str] | None = None  # set when the stage was stopped
        self.last_event = ""

    def run(self) -> None:
        stamp, changed = _stamp(self.events), time.monotonic()
        while not self.finished.wait(self.poll_s):
            now_stamp = _stamp(self.events)
            if now_stamp != stamp:
                stamp, changed = now_stamp, time.monotonic()
            elif time.monotonic() - changed >= self.timeout_s:
                self.report = self.stop_stage()
                return

    def stop_stage(self) -> list[str]:
        self.last_event = self._last_event()
        processes = psutil.Process().children(recursive=True)
        for process in processes:
            try:
                process.send_signal(signal.SIGUSR1)
            except psutil.Error:
                pass
        time.sleep(2.0)  # faulthandler writes from the signal handler; a process busy in C code still handles it
        ranks = sorted(self.folder.glob("*.txt"), key=lambda path: int(path.stem))
        lines = [f"rank {path.stem}: {where(path.read_text(errors='replace'), self.project)}" for path in ranks]
        for process in processes:
            try:
                process.kill()
            except psutil.Error:
                pass
        return lines or ["no rank had started its stage program"]

    def _last_event(self) -> str:
        try:
            last = self.events.read_text().strip().splitlines()[-1]
        except (FileNotFoundError, IndexError):
            return "none"
        return last[:200]
