"""Headless Chromium (Debian's `chromium` package) for looking at the Prefect UI from tests.

No driver and no DevTools protocol: Chromium's own `--dump-dom` and `--screenshot` switches. The page's scripts
run for `wait_ms` of *virtual* time, which stands still while network requests are in flight, so a slow server
costs wall time but doesn't cut the page short.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

CHROMIUM_CANDIDATES = ("/usr/bin/chromium", "chromium", "chromium-browser")


def chromium_path() -> str | None:
    """The Chromium executable, or None where it isn't installed (`apt-get install chromium`)."""
    for candidate in CHROMIUM_CANDIDATES:
        found = shutil.which(candidate)
        if found:
            return found
    return None


def run_chromium(url: str, wait_ms: int, action: list[str], window: tuple[int, int]) -> subprocess.CompletedProcess:
    executable = chromium_path()
    if executable is None:
        raise FileNotFoundError("chromium not found: apt-get install --no-install-recommends chromium")
    with tempfile.TemporaryDirectory(prefix="chromium-profile-") as profile:
        command = [
            executable,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            # a fresh profile that phones nowhere: the machine may be offline
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={profile}",
            # the flow run graph is WebGL: let it fall back to the software renderer
            "--enable-unsafe-swiftshader",
            "--hide-scrollbars",
            f"--window-size={window[0]},{window[1]}",
            f"--virtual-time-budget={wait_ms}",
            *action,
            url,
        ]
        result = subprocess.run(command, capture_output=True, text=True, timeout=wait_ms / 1000 + 120)
    if result.returncode != 0:
        raise RuntimeError(f"chromium exited with {result.returncode}:\n{result.stderr[-4000:]}")
    return result


def dump_dom(url: str, wait_ms: int = 15_000, window: tuple[int, int] = (1600, 1200)) -> str:
    """The page's DOM (serialised HTML) after its scripts ran for `wait_ms` of virtual time."""
    return run_chromium(url, wait_ms, ["--dump-dom"], window).stdout


def screenshot(url: str, path: str | Path, wait_ms: int = 15_000, window: tuple[int, int] = (1600, 1200)) -> Path:
    """Save a PNG of the page's viewport (`window` pixels) after `wait_ms` of virtual time; returns the path."""
    path = Path(path).resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    run_chromium(url, wait_ms, [f"--screenshot={path}"], window)
    if not path.exists():
        raise RuntimeError(f"chromium wrote no screenshot to {path}")
    return path
