"""Fixtures for the flow tests: a real Prefect server (API + UI) in a subprocess, and how to talk to it.

pytest imports every conftest.py as the module `conftest`, the last one loaded winning, so once this file is loaded
`from conftest import …` in the test modules here and in directories collected after this one (tests/tasks)
resolves to this file: it re-exports the helpers of tests/conftest.py for them.
"""

from __future__ import annotations

import importlib.util
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest


def _root_conftest():
    name = "tests_root_conftest"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, Path(__file__).resolve().parents[1] / "conftest.py")
        sys.modules[name] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules[name])
    return sys.modules[name]


_root = _root_conftest()
REPO, git_env, make_tiny_repo, run_stage, tiny_params, write_params = (
    _root.REPO, _root.git_env, _root.make_tiny_repo, _root.run_stage, _root.tiny_params, _root.write_params)

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
    env.update(PREFECT_HOME=str(home), PREFECT_API_URL=api_url, PREFECT_UI_URL=ui_root(api_url),
               PREFECT_SERVER_ANALYTICS_ENABLED="false")
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


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory: pytest.TempPathFactory):
    """`prefect server start` on a free port with a fresh SQLite database; yields its API URL (`…/api`).

    The UI is served at the URL without `/api` and talks to this API (PREFECT_SERVER_UI_API_URL). Its static
    bundle is copied under the temporary home rather than into the installed package.
    """
    home = tmp_path_factory.mktemp("prefect-server")
    port = free_port()
    api_url = f"http://127.0.0.1:{port}/api"
    env = without_prefect_settings(dict(os.environ))
    env.update(
        PREFECT_HOME=str(home),  # the database defaults to sqlite at $PREFECT_HOME/prefect.db
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_SERVER_UI_API_URL=api_url,
        PREFECT_SERVER_UI_STATIC_DIRECTORY=str(home / "ui"),
    )
    log = home / "server.log"
    with log.open("w") as output:
        process = subprocess.Popen(
            [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
            cwd=home, env=env, stdout=output, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_until_healthy(api_url, process, log, SERVER_STARTUP_TIMEOUT_S)
        yield api_url
    finally:
        stop(process)
