"""The cron deployment `rlhf-retrain` on a real Prefect server: the scheduler creates runs, one at a time."""

from __future__ import annotations

import asyncio
import time

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId
from prefect.settings import PREFECT_API_URL, temporary_settings

from flows.retrain import retrain

pytestmark = pytest.mark.slow


def test_cron_deployment_gets_scheduled_runs(prefect_server: str, tmp_path) -> None:
    with temporary_settings({PREFECT_API_URL: prefect_server}):
        deployment = retrain.to_deployment(
            name="rlhf-retrain", cron="*/5 * * * *", concurrency_limit=1, parameters={"repo_dir": str(tmp_path)}
        )
        deployment_id = deployment.apply()

        async def scheduled_runs():
            async with get_client() as client:
                stored = await client.read_deployment(deployment_id)
                runs = await client.read_flow_runs(
                    deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id]))
                )
                return stored, runs

        deadline = time.monotonic() + 60
        stored, runs = asyncio.run(scheduled_runs())
        while not runs and time.monotonic() < deadline:
            time.sleep(2)
            stored, runs = asyncio.run(scheduled_runs())
    assert stored.name == "rlhf-retrain" and stored.schedules[0].schedule.cron == "*/5 * * * *"
    assert stored.global_concurrency_limit is not None and stored.global_concurrency_limit.limit == 1
    assert runs and all(run.state.is_scheduled() for run in runs)
    times = sorted(run.expected_start_time for run in runs)
    assert all(t.minute % 5 == 0 and t.second == 0 for t in times)  # on the cron grid
    assert all((later - earlier).total_seconds() >= 300 for earlier, later in zip(times, times[1:]))
