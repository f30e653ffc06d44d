"""Talking to a Prefect server started by the tests: ports, environments, health, shutdown."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
from support import git_env

SERVER_STARTUP_TIMEOUT_S = 90


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def without_prefect_settings(env: dict[str, str]) -> dict[str, str]:
    """The caller's environment minus its PREFECT_* settings (a profile or API URL of the developer's own)."""
    return {key: value for key, value in env.items() if not key.startswith("PREFECT_")}


def prefect_client_env(api_url: str, home: Path) -> dict[str, str]:
    """Environment for a process (e.g. `rlhf run`) that reports its runs to the server at `api_url`."""
    env = without_prefect_settings(git_env())
    env.update(
        PREFECT_HOME=str(home),
        PREFECT_API_URL=api_url,
        PREFECT_UI_URL=ui_root(api_url),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
    )
    return env


def ui_root(api_url: str) -> str:
    """`http://127.0.0.1:PORT/api` → `http://127.0.0.1:PORT`: the server serves the UI beside the API."""
    return api_url.removesuffix("/").removesuffix("/api")


def wait_until_healthy(api_url: str, process: subprocess.Popen, log: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"prefect server exited with {process.returncode}:\n{log.read_text()[-4000:]}")
        try:
            if httpx.get(f"{api_url}/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"prefect server not healthy after {timeout_s} s:\n{log.read_text()[-4000:]}")


def stop(process: subprocess.Popen) -> None:
    """SIGTERM the server's process group (the CLI runs uvicorn and services as children), SIGKILL if it lingers."""
    if process.poll() is not None:
        return
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)


def start_server(home: Path, port: int, **settings: str) -> subprocess.Popen:
    """`prefect server start` on ``port`` with its SQLite database under ``home``, in a process group of its own (the
    CLI runs uvicorn and its services as children); returns once healthy. Started again on the same home and port, it
    is the same server restarted: same database, same address. ``settings``: more PREFECT_* variables (the UI's)."""
    env = without_prefect_settings(dict(os.environ))
    # the database defaults to sqlite at $PREFECT_HOME/prefect.db
    env.update(PREFECT_HOME=str(home), PREFECT_SERVER_ANALYTICS_ENABLED="false", **settings)
    log = home / "server.log"
    with log.open("a") as output:
        process = subprocess.Popen(
            [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
            cwd=home,
            env=env,
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        wait_until_healthy(f"http://127.0.0.1:{port}/api", process, log, SERVER_STARTUP_TIMEOUT_S)
    except BaseException:
        stop(process)
        raise
    return process


def kill(process: subprocess.Popen) -> None:
    """SIGKILL the server's whole process group, as a crash or an OOM kill would: no shutdown of any kind."""
    os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=30)
