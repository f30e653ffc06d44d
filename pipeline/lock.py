"""One pipeline run per workspace: an exclusive ``flock`` on ``.rlhf/lifecycle.lock``.

Taken by the lifecycle and retrain flows and by the CLI commands that run stages (`rlhf run`, `repro`, `stage`,
`publish`). A second run refuses at once with the holder's pid and start time, or waits up to ``wait_s`` seconds.
The kernel releases a ``flock`` when its holder exits, however it dies (SIGKILL included), so a crashed run never
leaves a stale lock; the file itself stays, holding the last holder's details for the message. The descriptor is
not inherited by child processes (PEP 446), so stages started under the lock do not keep it alive.

Re-entrant within one process: the retrain flow holds the lock and calls the lifecycle flow, which takes it again.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

LOCK_FILE = Path(".rlhf/lifecycle.lock")
POLL_S = 0.2  # how often a waiting run retries


class WorkspaceBusy(RuntimeError):
    """Another run holds the workspace lock; the message names the lock file and the holder."""


_held: dict[Path, list[int]] = {}  # lock path → [file descriptor, depth] for locks this process holds
_guard = threading.Lock()


def lock_path(repo_dir: str | Path = ".") -> Path:
    return Path(repo_dir).resolve() / LOCK_FILE


def holder_of(path: Path) -> dict:
    """The details the current (or last) holder wrote into the lock file; {} if none yet."""
    try:
        return json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        return {}


def describe(holder: dict) -> str:
    if not holder:
        return "another process (details not written yet)"
    return f"pid {holder.get('pid')} on {holder.get('host')} ({holder.get('what')}, started {holder.get('started')})"


def _try_lock(descriptor: int) -> bool:
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False


def _acquire(path: Path, wait_s: float, what: str) -> int:
    """Open and lock ``path`` (waiting up to ``wait_s``), then record this process as the holder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)  # non-inheritable by default
    deadline = time.monotonic() + max(0.0, wait_s)
    while not _try_lock(descriptor):
        if time.monotonic() >= deadline:
            os.close(descriptor)
            waited = f" after waiting {wait_s:g} s" if wait_s > 0 else ""
            raise WorkspaceBusy(
                f"{path}: the workspace is locked by {describe(holder_of(path))}{waited}: another pipeline run is in "
                f"progress here. Wait for it to finish, or pass --wait-for-lock SECONDS to wait (the lock is freed "
                f"when that process exits, even if it is killed)"
            )
        time.sleep(POLL_S)
    holder = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "what": what,
        "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    os.ftruncate(descriptor, 0)
    os.pwrite(descriptor, json.dumps(holder).encode(), 0)
    return descriptor


@contextmanager
def workspace_lock(repo_dir: str | Path = ".", wait_s: float = 0.0, what: str = "rlhf") -> Iterator[Path]:
    """Hold the workspace lock of ``repo_dir`` for the ``with`` block; yields the lock file's path.

    Raises :class:`WorkspaceBusy` if another process holds it for longer than ``wait_s`` seconds (0: refuse at once).
    ``what`` (e.g. "rlhf-lifecycle flow") is shown to a refused run.
    """
    path = lock_path(repo_dir)
    with _guard:
        entry = _held.get(path)
        if entry is not None:
            entry[1] += 1
    if entry is None:
        descriptor = _acquire(path, wait_s, what)
        with _guard:
            _held[path] = entry = [descriptor, 1]
    try:
        yield path
    finally:
        with _guard:
            entry[1] -= 1
            last = entry[1] == 0
            if last:
                del _held[path]
        if last:
            fcntl.flock(entry[0], fcntl.LOCK_UN)
            os.close(entry[0])
