"""A command run in a real terminal (a detached tmux session), its screen captured while it runs (`capture-pane`)."""

from __future__ import annotations

import shlex
import shutil
import subprocess
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class TerminalRun:
    exit_code: int
    screens: list[str] = field(default_factory=list)  # the visible screen, every `every_s`, then the last one


def tmux_available() -> bool:
    return shutil.which("tmux") is not None


def run_in_terminal(
    command: list[str], cwd: Path, env: dict[str, str], timeout_s: float, every_s: float = 0.25, size=(150, 50)
) -> TerminalRun:
    """Run ``command`` in ``cwd`` with exactly ``env`` on a ``size`` (columns, rows) terminal; capture its screen."""
    socket, session = f"rlhf-test-{uuid.uuid4().hex[:8]}", "run"
    status = cwd.parent / f"{socket}.status"  # beside the workspace, not in it
    script = cwd.parent / f"{socket}.sh"
    exports = "".join(f"export {key}={shlex.quote(value)}\n" for key, value in env.items() if key.isidentifier())
    script.write_text(
        f"{exports}cd {shlex.quote(str(cwd))}\n{shlex.join(command)}\necho $? > {shlex.quote(str(status))}\n"
    )
    tmux = ["tmux", "-L", socket]
    width, height = size
    subprocess.run(
        [*tmux, "new-session", "-d", "-s", session, "-x", str(width), "-y", str(height), f"env -i bash {script}"],
        check=True,
        env={"PATH": env.get("PATH", ""), "TERM": "xterm-256color"},
    )
    subprocess.run([*tmux, "set-option", "-t", session, "remain-on-exit", "on"], check=False)
    run = TerminalRun(exit_code=-1)
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            screen = subprocess.run([*tmux, "capture-pane", "-p", "-t", session], capture_output=True, text=True).stdout
            if not run.screens or screen != run.screens[-1]:
                run.screens.append(screen)
            if status.exists() and status.read_text().strip():
                time.sleep(every_s)  # the last redraw
                run.screens.append(
                    subprocess.run([*tmux, "capture-pane", "-p", "-t", session], capture_output=True, text=True).stdout
                )
                run.exit_code = int(status.read_text())
                break
            time.sleep(every_s)
    finally:
        subprocess.run([*tmux, "kill-server"], capture_output=True)
        script.unlink(missing_ok=True)
        status.unlink(missing_ok=True)
    return run
