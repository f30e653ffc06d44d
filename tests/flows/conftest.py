"""Fixtures for the flow tests: a real Prefect server (API + UI) in a subprocess."""

from __future__ import annotations

import pytest
from server_support import free_port, start_server, stop


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory: pytest.TempPathFactory):
    """`prefect server start` on a free port with a fresh SQLite database; yields its API URL (`…/api`).

    The UI is served at the URL without `/api` and talks to this API (PREFECT_SERVER_UI_API_URL). Its static
    bundle is copied under the temporary home rather than into the installed package.
    """
    home = tmp_path_factory.mktemp("prefect-server")
    port = free_port()
    api_url = f"http://127.0.0.1:{port}/api"
    process = start_server(
        home, port, PREFECT_SERVER_UI_API_URL=api_url, PREFECT_SERVER_UI_STATIC_DIRECTORY=str(home / "ui")
    )
    try:
        yield api_url
    finally:
        stop(process)
