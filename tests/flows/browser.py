"""Headless Chromium (Debian's `chromium` package) for looking at the Prefect UI from tests.

Looking: no driver and no DevTools protocol, Chromium's own `--dump-dom` and `--screenshot` switches. The page's
scripts run for `wait_ms` of *virtual* time, which stands still while network requests are in flight, so a slow
server costs wall time but doesn't cut the page short.

Using (clicking, typing): `launch_chromium(playwright)`, Playwright driving that same executable; Playwright's own
browser downloads (`playwright install`) are never needed.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # Playwright is a test dependency: only the tests that drive a browser import it
    from playwright.sync_api import Browser, Playwright

CHROMIUM_CANDIDATES = ("/usr/bin/chromium", "chromium", "chromium-browser")
INSTALL_HINT = "apt-get install --no-install-recommends chromium"
# Headless in a container (no sandbox, no GPU, a small /dev/shm), and a browser that phones nowhere: offline.
HEADLESS_ARGS = ("--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage")
OFFLINE_ARGS = (
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
)


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
        raise FileNotFoundError(f"chromium not found: {INSTALL_HINT}")
    with tempfile.TemporaryDirectory(prefix="chromium-profile-") as profile:
        command = [
            executable,
            "--headless",
            *HEADLESS_ARGS,
            *OFFLINE_ARGS,  # with a fresh profile: the machine may be offline
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


def launch_chromium(playwright: Playwright) -> Browser:
    """Headless Chromium driven by Playwright (`with sync_playwright() as playwright: ...`): Debian's executable,
    not a browser Playwright downloads. Close it (`browser.close()`) when done."""
    executable = chromium_path()
    if executable is None:
        raise FileNotFoundError(f"chromium not found: {INSTALL_HINT}")
    return playwright.chromium.launch(
        executable_path=executable, headless=True, args=[*HEADLESS_ARGS, *OFFLINE_ARGS, "--hide-scrollbars"]
    )
