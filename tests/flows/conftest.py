"""Fixtures for the flow tests: a real Prefect server (API + UI) in a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from server_support import SERVER_STARTUP_TIMEOUT_S, free_port, stop, wait_until_healthy, without_prefect_settings


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
            cwd=home,
            env=env,
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        wait_until_healthy(api_url, process, log, SERVER_STARTUP_TIMEOUT_S)
        yield api_url
    finally:
        stop(process)
