"""A launched stage that stops making progress is stopped by its launcher, which says where each rank was
(tasks/stall.py); a stage process dies with its launcher.

The stall is real: one rank of a 2-process PPO run is frozen with SIGSTOP (as a rank stuck in a driver call or
swapped out would be); the other rank then waits in its next collective, and the launcher's watch, after
``launch.stall_timeout_s`` without an event, collects the ranks' stacks (faulthandler on SIGUSR1) and kills them.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml
from support import REPO, set_params, stage_command, stage_pids, write_params

from tasks.stage_io import EXIT_STALLED, events_file, read_events
from tasks.stall import where


def test_where_names_the_project_frame_and_the_call_it_waits_in(tmp_path: Path) -> None:
    """A real faulthandler dump of a process blocked in a sleep called from a project function."""
    project = tmp_path / "project"
    (project / "pkg").mkdir(parents=True)
    (project / "pkg/work.py").write_text(
        textwrap.dedent(
            """\
            import faulthandler, signal, sys, time

            def wait_for_peer():
                print("ready", flush=True)
                time.sleep(60)

            faulthandler.register(signal.SIGUSR1, file=open(sys.argv[1], "w"), all_threads=True)
            wait_for_peer()
            """
        )
    )
    dump = tmp_path / "0.txt"
    process = subprocess.Popen([sys.executable, "pkg/work.py", str(dump)], cwd=project, stdout=subprocess.PIPE)
    try:
        assert process.stdout.readline() == b"ready\n"
        time.sleep(0.5)  # past the print, into the sleep
        process.send_signal(signal.SIGUSR1)
        deadline = time.monotonic() + 10
        while "wait_for_peer" not in dump.read_text() and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        process.kill()
        process.wait()
    # time.sleep is C: the innermost Python frame is the project's own
    assert where(dump.read_text(), project) == "pkg/work.py:5 in wait_for_peer"
    assert where("", project) == "no Python stack written"


def test_where_shows_the_library_call_a_project_frame_waits_in(tmp_path: Path) -> None:
    project = tmp_path / "project"
    dump = textwrap.dedent(
        f"""\
        Thread 0x00007f0000000001 (most recent call first):
          File "/usr/lib/python3.11/threading.py", line 331 in wait

        Current thread 0x00007f0000000002 (most recent call first):
          File "/venv/lib/python3.11/site-packages/torch/distributed/distributed_c10d.py", line 2810 in all_reduce
          File "{project}/rlhf/ppo_trainer/loop.py", line 120 in train_ppo
          File "{project}/tasks/ppo.py", line 88 in main
        """
    )
    assert where(dump, project) == (
        "rlhf/ppo_trainer/loop.py:120 in train_ppo, waiting in torch/distributed/distributed_c10d.py:2810 in all_reduce"
    )


def test_a_stage_process_dies_with_its_launcher(tmp_path: Path) -> None:
    """The launcher SIGKILLed (no chance to stop its children): the stage process does not run on."""
    child = "from tasks.stall import die_with_parent; die_with_parent(); import time; print('armed', flush=True); " + (
        "time.sleep(120)"
    )
    parent = subprocess.Popen(
        [sys.executable, "-c", f"import subprocess, sys; subprocess.run([sys.executable, '-c', {child!r}])"],
        cwd=REPO,
        stdout=subprocess.PIPE,
    )
    assert parent.stdout.readline() == b"armed\n"
    stage = next(p for p in Path("/proc").iterdir() if p.name.isdigit() and _parent_of(p) == parent.pid)
    parent.kill()
    parent.wait()
    deadline = time.monotonic() + 10
    while stage.exists() and _state(stage) != "Z" and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not stage.exists() or _state(stage) == "Z", "the stage process outlived its launcher"


def _parent_of(proc: Path) -> int:
    try:
        return int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return -1


def _state(proc: Path) -> str:
    try:
        return (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return "gone"


def rank_pid(workspace: Path, rank: int) -> int | None:
    """The PID of the ppo worker process with RANK=``rank`` in ``workspace`` (its environment, Linux /proc)."""
    for pid in stage_pids(workspace, "ppo"):
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in environ and b"LOCAL_RANK=" + str(rank).encode() in environ:
            return pid
    return None


@pytest.mark.slow
def test_a_frozen_rank_stops_the_launch_with_where_each_rank_was_and_a_rerun_resumes(
    in_copy_of_workspace: Path,
) -> None:
    workspace = in_copy_of_workspace.resolve()
    params = yaml.safe_load((workspace / "params.yaml").read_text())
    params["ppo"].update(iterations=6, resume_every=2)
    write_params(workspace, params)
    set_params(
        workspace,
        launch={"stall_timeout_s": 20, "ppo": {"config_file": "configs/cpu-2proc.yaml", "num_processes": 2}},
    )
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    events_file("ppo", workspace).unlink()  # the copied workspace's run
    process = subprocess.Popen(
        stage_command("ppo"), cwd=workspace, env=env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True
    )
    frozen = None
    try:
        deadline = time.monotonic() + 240
        while frozen is None and time.monotonic() < deadline and process.poll() is None:
            if any(e["step"] == 2 for e in read_events("ppo", workspace, "checkpoint")):
                frozen = rank_pid(workspace, 1)
                os.kill(frozen, signal.SIGSTOP)
            time.sleep(0.02)
        assert frozen, "rank 1 was running when iteration 2's checkpoint was written"
        stopped_at = time.monotonic()
        _, stderr = process.communicate(timeout=120)
        waited = time.monotonic() - stopped_at
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == EXIT_STALLED, stderr[-3000:]
    lines = stderr.splitlines()
    lines = lines[next(i for i, line in enumerate(lines) if line.startswith("error:")) :]  # after the load's bars
    assert lines[0].startswith("error: ppo: no event for 20 s (launch.stall_timeout_s), so the launcher stopped it;")
    assert '"event": "checkpoint"' in lines[0] and "(full stacks in .rlhf/logs/ppo.stacks):" in lines[0]
    ranks = dict(line.strip().split(": ", 1) for line in lines[1:3])
    assert ranks["rank 1"] == "no Python stack written"  # frozen: it could not run its handler
    # the other one waits for it in a collective, called from the training loop
    assert ranks["rank 0"].startswith("rlhf/ppo_trainer/") and ", waiting in torch/distributed/" in ranks["rank 0"]
    assert len(lines) == 3, f"nothing after the ranks (no traceback, no agent log): {lines[3:]}"
    assert 20 <= waited < 60, f"stopped {waited:.0f} s after rank 1 froze (timeout 20 s)"
    assert stage_pids(workspace, "ppo") == [], "no rank left running (the frozen one included)"
    saved = json.loads((workspace / ".rlhf/checkpoints/ppo/latest.json").read_text())["step"]
    assert saved >= 2

    set_params(workspace, launch={"stall_timeout_s": 0})  # changed params do not void a resume (config_part)
    done = subprocess.run(stage_command("ppo"), cwd=workspace, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert [e["step"] for e in read_events("ppo", workspace, "resumed")] == [saved]
    assert json.loads((workspace / "metrics/ppo.json").read_text())["iterations"] == 6


@pytest.mark.slow
@pytest.mark.parametrize("processes", [1, 2])
def test_killing_the_launcher_alone_stops_every_stage_process(in_copy_of_workspace: Path, processes: int) -> None:
    """SIGKILL to tasks.launch only (torchrun starts its workers in sessions of their own, where a kill of the
    launcher's process group does not reach them; accelerate's one-process launch leaves its child too)."""
    workspace = in_copy_of_workspace.resolve()
    set_params(workspace, ppo={"iterations": 200})
    if processes == 2:
        set_params(workspace, launch={"ppo": {"config_file": "configs/cpu-2proc.yaml", "num_processes": 2}})
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    events_file("ppo", workspace).unlink()  # the copied workspace's run
    launcher = subprocess.Popen(
        stage_command("ppo"), cwd=workspace, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + 240
        while not read_events("ppo", workspace, "progress") and time.monotonic() < deadline:
            time.sleep(0.05)
        workers = [pid for pid in stage_pids(workspace, "ppo") if pid != launcher.pid]
        assert len(workers) == processes, "the stage is running"
        launcher.kill()
        launcher.wait()
        deadline = time.monotonic() + 10
        while any(_state(Path(f"/proc/{pid}")) not in ("gone", "Z") for pid in workers):
            assert time.monotonic() < deadline, "a stage process outlived its launcher"
            time.sleep(0.05)
    finally:
        for pid in stage_pids(workspace, "ppo"):
            os.kill(pid, signal.SIGKILL)
