"""The Prefect server dies during `ppo`: a real `prefect server start`, SIGKILLed (its whole process group) once ppo has
written its first resume checkpoint, while `rlhf run` reports to it.

ppo does not need the API: it runs on to its end and DVC records it. The console says at once that the API does not
answer, and the run ends with one line naming the API, the stage and its fate, and what to do; exit code 75
(EX_TEMPFAIL), no traceback, no process left in the workspace, no lock held, the finished stages' outputs and their
dvc.lock entries byte-identical. Then the server is started again (same home, so the same database, same port) and
`rlhf run` completes: DVC skips every finished stage, ppo included, and runs evaluate and release.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml
from server_support import free_port, kill, prefect_client_env, start_server, stop
from support import make_tiny_repo_with_stages_done, stage_outputs

from pipeline.cli import EX_TEMPFAIL
from pipeline.lock import workspace_lock
from pipeline.workspace import out_of_date_stages
from rlhf.files import path_digest
from tasks.stage_io import read_events

pytestmark = pytest.mark.slow
RLHF = Path(sys.executable).with_name("rlhf")
DONE = ["prepare", "sft", "sample_pairs", "label", "reward"]  # recorded in dvc.lock before the run
PPO_ITERATIONS, RESUME_EVERY = 40, 2  # the server dies after iteration 2; ppo runs ≈ 10–30 s more without it
RUN_TIMEOUT_S = 300


class Run:
    """`rlhf run` in ``repo`` as a subprocess, its output lines kept with the time each arrived."""

    def __init__(self, repo: Path, env: dict[str, str]):
        self.started = time.monotonic()
        self.lines: list[tuple[float, str]] = []
        self.process = subprocess.Popen(
            [str(RLHF), "run"], cwd=repo, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.process.stdout:
            self.lines.append((time.monotonic(), line.rstrip("\n")))

    def wait(self) -> int:
        code = self.process.wait(timeout=RUN_TIMEOUT_S)
        self._reader.join(timeout=10)
        return code

    @property
    def output(self) -> str:
        return "\n".join(line for _, line in self.lines)

    def when(self, text: str) -> float:
        """When the first line holding ``text`` arrived."""
        return next(at for at, line in self.lines if text in line)


def finished_state(repo: Path) -> dict[str, object]:
    """What the finished stages wrote (hashes of their outputs) and their entries in dvc.lock."""
    lock = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]
    digests = {path: path_digest(repo / path) for stage in DONE for path in stage_outputs(stage)}
    return {"outputs": digests, "dvc.lock": {stage: lock[stage] for stage in DONE}}


def processes_in(folder: Path) -> list[str]:
    """The processes whose working directory is ``folder``: `rlhf run`, `dvc repro`, a stage and its workers."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and Path(os.readlink(entry / "cwd")) == folder:
                argv = (entry / "cmdline").read_bytes().split(b"\0")
                found.append(f"{entry.name} {b' '.join(argv).decode()}")
        except OSError:
            continue
    return found


def kill_after_first_checkpoint(repo: Path, run: Run, server: subprocess.Popen) -> float:
    """SIGKILL the server once ppo has saved a resume checkpoint; returns when."""
    latest = repo / ".rlhf/checkpoints/ppo/latest.json"
    while not latest.exists():
        assert run.process.poll() is None, f"rlhf run ended before ppo saved a checkpoint:\n{run.output}"
        assert time.monotonic() - run.started < RUN_TIMEOUT_S, run.output
        time.sleep(0.1)
    kill(server)
    return time.monotonic()


def test_a_server_killed_during_ppo_lets_ppo_finish_ends_in_one_line_and_a_rerun_completes(
    pipeline_workspace: Path, tmp_path: Path
) -> None:
    params = yaml.safe_load((pipeline_workspace / "params.yaml").read_text())
    params["ppo"].update(iterations=PPO_ITERATIONS, resume_every=RESUME_EVERY)
    repo = make_tiny_repo_with_stages_done(tmp_path / "repo", pipeline_workspace, DONE, params).resolve()
    home, port = tmp_path / "prefect-home", free_port()
    home.mkdir()
    api_url = f"http://127.0.0.1:{port}/api"
    env = {**prefect_client_env(api_url, home), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    before = finished_state(repo)
    server = start_server(home, port, PREFECT_SERVER_UI_ENABLED="false")  # no UI: it only slows the start
    run = Run(repo, env)
    try:
        killed = kill_after_first_checkpoint(repo, run, server)
        code = run.wait()
        ended = time.monotonic()
    finally:
        stop(server)
        if run.process.poll() is None:
            run.process.kill()

    output = run.output
    final = run.lines[-1][1]
    assert code == EX_TEMPFAIL, output
    assert final.startswith("rlhf run: FAILED after "), output
    assert (
        f"the Prefect API at {api_url} stopped answering during stage ppo (ConnectError: " in final
        and "ppo finished and DVC recorded it in dvc.lock. Once the server answers again, run `rlhf run` again: "
        "finished stages are skipped."
        in final
    ), final
    notice = f"the Prefect API at {api_url} does not answer (ConnectError: "
    assert notice in output, "the console said so while ppo ran on"
    assert "[6/8] ppo           done in" in output, "ppo ran to its end"
    assert not any(word in output for word in ("Traceback", "Error logging to API", "EventsWorker")), output
    ppo_done = run.when("[6/8] ppo           done")
    print(
        f"server killed {killed - run.started:.1f} s into the run; noticed {run.when(notice) - killed:.1f} s later; "
        f"after ppo's last line: the final line {run.when('rlhf run: FAILED') - ppo_done:.1f} s, the exit "
        f"{ended - ppo_done:.1f} s"
    )

    assert not processes_in(repo), "no stage, dvc repro or rlhf run left running"
    assert json.loads((repo / ".dvc/tmp/rwlock").read_text() or "{}") == {}, "DVC's lock released"
    with workspace_lock(repo):  # free at once (it raises WorkspaceBusy otherwise)
        pass
    assert finished_state(repo) == before, "the finished stages' outputs and dvc.lock entries are untouched"
    assert out_of_date_stages(repo) == ["evaluate", "release"], "DVC recorded ppo as done"
    ppo_outputs = {path: path_digest(repo / path) for path in stage_outputs("ppo")}

    server = start_server(home, port, PREFECT_SERVER_UI_ENABLED="false")  # the same database and address
    try:
        rerun = Run(repo, env)
        assert rerun.wait() == 0, rerun.output
    finally:
        stop(server)
    assert "[6/8] ppo           unchanged: skipped by DVC" in rerun.output, rerun.output
    assert not read_events("ppo", repo, "resumed")
    assert rerun.lines[-1][1].startswith("rlhf run: done in "), rerun.output
    assert finished_state(repo) == before
    assert {path: path_digest(repo / path) for path in stage_outputs("ppo")} == ppo_outputs
    assert out_of_date_stages(repo) == []
    assert (repo / "models/release").is_dir()
