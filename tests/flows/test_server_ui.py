"""`rlhf run` in a terminal against a real `prefect server start`: its console while it runs, then the run's page in
the Prefect UI, seen by headless Chromium.

Kept as test artifacts in the repository root: test-artifacts/console-tty.txt (the terminal, captured with tmux while
the ppo stage's progress bar moves, and when the run has ended) and test-artifacts/prefect-flow-run.png.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import httpx
import pytest
import yaml
from browser import chromium_path, dump_dom, screenshot
from server_support import prefect_client_env, ui_root
from support import REPO, make_tiny_repo_with_stages_done, write_params
from terminal import run_in_terminal, tmux_available

from pipeline.workspace import stage_names

pytestmark = pytest.mark.slow
FLOW_NAME = "rlhf-lifecycle"
SCREENSHOT = REPO / "test-artifacts" / "prefect-flow-run.png"
CONSOLE_CAPTURE = REPO / "test-artifacts" / "console-tty.txt"
PPO_ITERATIONS = 8  # a few seconds of ppo: long enough to catch its bar mid-way
RLHF = Path(sys.executable).with_name("rlhf")  # the console script, as a user would type it
TASK_RUNS_RECORDED_TIMEOUT_S = 60  # task run states reach the database through the server's event pipeline


def api(api_url: str, path: str, body: dict | None = None):
    response = httpx.post(f"{api_url}{path}", json=body or {}, timeout=30)
    response.raise_for_status()
    return response.json()


def flow_runs_since(api_url: str, since: datetime) -> list[dict]:
    return api(
        api_url,
        "/flow_runs/filter",
        {
            "flows": {"name": {"any_": [FLOW_NAME]}},
            "flow_runs": {"start_time": {"after_": since.isoformat()}},
        },
    )


def task_runs_of(api_url: str, flow_run_id: str) -> list[dict]:
    return api(api_url, "/task_runs/filter", {"task_runs": {"flow_run_id": {"any_": [flow_run_id]}}})


def wait_for_task_runs(api_url: str, flow_run_id: str, expected: int) -> list[dict]:
    """The task runs once `expected` of them are recorded in a final state (or what is there at the timeout)."""
    deadline = time.monotonic() + TASK_RUNS_RECORDED_TIMEOUT_S
    while True:
        task_runs = task_runs_of(api_url, flow_run_id)
        final = [run for run in task_runs if run["state_type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED")]
        if len(final) >= expected or time.monotonic() > deadline:
            return task_runs
        time.sleep(1)


@pytest.fixture(scope="module")
def lifecycle_run(prefect_server: str, pipeline_workspace: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """`rlhf run` of the tiny pipeline in a fresh git + DVC repository, reporting to the session's server.

    The stages up to the reward model are already done there (the outputs of the session's pipeline_workspace,
    recorded in dvc.lock), so the run shows them as cached task runs and runs ppo, evaluate and release: the
    from-scratch run of every stage is the lifecycle tests' (tests/flows/test_lifecycle.py)."""
    folder = tmp_path_factory.mktemp("server-ui")
    repo = make_tiny_repo_with_stages_done(
        folder / "repo", pipeline_workspace, ["prepare", "sft", "sample_pairs", "label", "reward"]
    )
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["ppo"]["iterations"] = PPO_ITERATIONS
    write_params(repo, params)
    started = datetime.now(timezone.utc) - timedelta(seconds=1)
    env = {**prefect_client_env(prefect_server, folder / "prefect-home"), "TERM": "xterm-256color"}
    if tmux_available():  # a terminal, as a person runs it
        terminal = run_in_terminal([str(RLHF), "run"], repo, env, timeout_s=600)
        exit_code, screens = terminal.exit_code, terminal.screens
        output = screens[-1] if screens else ""
    else:
        result = subprocess.run([str(RLHF), "run"], cwd=repo, env=env, capture_output=True, text=True, timeout=600)
        exit_code, screens, output = result.returncode, [], result.stdout + result.stderr
    assert exit_code == 0, f"rlhf run failed:\n{output[-4000:]}"
    flow_runs = flow_runs_since(prefect_server, started)
    stages = stage_names(repo)
    task_runs = wait_for_task_runs(prefect_server, flow_runs[0]["id"], len(stages)) if len(flow_runs) == 1 else []
    return {"flow_runs": flow_runs, "task_runs": task_runs, "stages": stages, "screens": screens}


def test_the_terminal_shows_a_moving_progress_bar_and_a_summary_line_per_stage(lifecycle_run: dict) -> None:
    screens = lifecycle_run["screens"]
    if not screens:
        pytest.skip("tmux not installed (apt-get install tmux): no terminal to capture")
    bar = re.compile(
        r"^ +ppo +[━╸─]{30}  (\d+)/" + str(PPO_ITERATIONS) + r" +\d+% · RM score .* · KL .*, about \d+:\d\d left$"
    )
    during = [(screen, int(m.group(1))) for screen in screens for line in screen.splitlines() if (m := bar.match(line))]
    assert during, "no capture shows ppo's bar mid-way:\n" + screens[-1]
    assert len({step for _, step in during}) >= 2, "the bar moved (several steps seen)"
    final = screens[-1]
    CONSOLE_CAPTURE.parent.mkdir(exist_ok=True)
    CONSOLE_CAPTURE.write_text(
        "# `rlhf run` in a 150×50 terminal (tmux capture-pane), while ppo runs:\n\n"
        + during[len(during) // 2][0].rstrip()
        + "\n\n# when the run has ended:\n\n"
        + final.rstrip()
        + "\n"
    )
    print(f"terminal captures kept in {CONSOLE_CAPTURE}")
    lines = final.splitlines()
    for index, stage in enumerate(lifecycle_run["stages"], start=1):
        ended = [
            line
            for line in lines
            if line.startswith(f"[{index}/8] {stage} ") and ("done in" in line or "unchanged" in line)
        ]
        assert len(ended) == 1, (stage, final)
    assert any(line.startswith("rlhf run: done in") for line in lines)
    assert not any("━" in line for line in lines), "each bar gave way to its stage's summary line"


def test_the_server_serves_the_ui_wired_to_its_api(prefect_server: str) -> None:
    root = ui_root(prefect_server)
    page = httpx.get(f"{root}/", headers={"Accept": "text/html"}, follow_redirects=True, timeout=30)
    assert page.status_code == 200 and "<html" in page.text.lower()
    settings = httpx.get(f"{root}/ui-settings", timeout=30).json()
    assert settings["api_url"] == prefect_server  # else the page would ask another server (the default port)
    assert "v2" in settings["available_uis"]


def test_rlhf_run_leaves_one_completed_flow_run_whose_task_runs_cover_every_stage(lifecycle_run: dict) -> None:
    flow_runs = lifecycle_run["flow_runs"]
    assert len(flow_runs) == 1, [(run["name"], run["state_type"]) for run in flow_runs]
    assert flow_runs[0]["state_type"] == "COMPLETED"
    task_runs = lifecycle_run["task_runs"]
    assert sorted(run["name"] for run in task_runs) == sorted(lifecycle_run["stages"])
    assert {run["name"]: run["state_type"] for run in task_runs} == dict.fromkeys(lifecycle_run["stages"], "COMPLETED")


@pytest.mark.skipif(chromium_path() is None, reason="needs chromium (apt-get install chromium; .ci/run does)")
def test_the_ui_page_of_the_run_lists_its_stage_task_runs(prefect_server: str, lifecycle_run: dict) -> None:
    assert len(lifecycle_run["flow_runs"]) == 1
    flow_run = lifecycle_run["flow_runs"][0]
    # The default (V2) UI's flow run page; the Task Runs tab lists them by name (the graph above is a canvas).
    url = f"{ui_root(prefect_server)}/v2/runs/flow-run/{flow_run['id']}?tab=TaskRuns"
    dom = dump_dom(url, wait_ms=15_000)
    texts = {
        text.strip() for text in re.findall(r">([^<>]+)<", re.sub(r"<(script|style)\b.*?</\1>", "", dom, flags=re.S))
    }
    assert flow_run["name"] in texts and "Completed" in texts, f"run page not rendered:\n{sorted(texts)[:80]}"
    missing = [stage for stage in lifecycle_run["stages"] if stage not in texts]
    assert not missing, f"task runs {missing} not shown at {url}"
    # Tall enough to show the run graph and all eight task runs under it.
    png = screenshot(url, SCREENSHOT, wait_ms=15_000, window=(1600, 1450))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000
