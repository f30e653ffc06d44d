"""The 2-process kill-and-resume test, repeated under CPU load (issue 17: it had hung twice when the suite ran beside
the pipeline on the same two cores).

    .venv/bin/python bench/resume_under_load.py --repeats 20                 # load: a pipeline loop + 1 burner
    .venv/bin/python bench/resume_under_load.py --repeats 5 --burners 0 --no-pipeline   # no load

The load, started before the first repeat and kept up until the last ends:

- ``pipeline``: the whole pipeline of this checkout on its embedded default, ``dvc repro --force`` in a loop, in a
  ``git clone`` of HEAD in a temporary folder (every stage, the model stages through ``accelerate launch``), as a
  user's `rlhf run` beside the test suite would;
- ``--burners N``: N processes each multiplying 256×256 matrices in one thread without pause.

Each repeat is a fresh ``pytest tests/reliability/test_ppo_resume.py -k two_process`` (its session fixture builds the
tiny workspace, then: an uninterrupted 2-process run, a run SIGKILLed during the save of iteration 4, the resumed
run, compared bit for bit). A repeat that passes the test's own 300 s limit on a stage fails with the events and
stderr of the stalled run. Results: bench/results/resume-under-load.json (each repeat's exit code, wall time and the
load average when it ended) and .log (the output of failed repeats).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench/results"
BURN = "import torch\ntorch.set_num_threads(1)\na = torch.rand(256, 256)\nwhile True:\n    a = (a @ a).tanh()\n"


def start_pipeline_loop(folder: Path, log) -> subprocess.Popen:
    """`dvc repro --force` of this checkout's pipeline, over and over, in a clone inside ``folder``."""
    clone = folder / "clone"
    subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "DVC_NO_ANALYTICS": "1"}
    loop = "while true; do dvc repro --force -q || sleep 1; done"
    return subprocess.Popen(["bash", "-c", loop], cwd=clone, env=env, stdout=log, stderr=log, start_new_session=True)


def run_repeat(index: int) -> dict:
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/reliability/test_ppo_resume.py"]
        + ["-k", "two_process"],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    return {
        "repeat": index,
        "exit_code": done.returncode,
        "wall_s": round(time.monotonic() - started, 1),
        "load_average_1min": os.getloadavg()[0],
        "output": done.stdout + done.stderr,  # whole: a stalled run's stacks sit in the middle of it
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--burners", type=int, default=1)
    parser.add_argument("--no-pipeline", action="store_true", help="no pipeline loop beside the test")
    parser.add_argument("--name", default="resume-under-load")
    args = parser.parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)
    load: list[subprocess.Popen] = []
    repeats: list[dict] = []
    with tempfile.TemporaryDirectory() as scratch, open(Path(scratch) / "load.log", "w") as load_log:
        try:
            if not args.no_pipeline:
                load.append(start_pipeline_loop(Path(scratch), load_log))
            for _ in range(args.burners):
                load.append(subprocess.Popen([sys.executable, "-c", BURN], start_new_session=True))
            time.sleep(5)  # the load is running before the first repeat starts
            for index in range(1, args.repeats + 1):
                repeats.append(run_repeat(index))
                last = repeats[-1]
                load_average = last["load_average_1min"]
                print(f"repeat {index}: exit {last['exit_code']} in {last['wall_s']} s, load {load_average:.2f}")
        finally:
            for process in load:
                subprocess.run(["pkill", "-KILL", "-s", str(process.pid)], check=False)  # the whole session
    passed = sum(r["exit_code"] == 0 for r in repeats)
    summary = {
        "test": "tests/reliability/test_ppo_resume.py -k two_process",
        "load": {"pipeline_loop": not args.no_pipeline, "burners": args.burners, "cores": os.cpu_count()},
        "repeats": len(repeats),
        "passed": passed,
        "consecutive_passes": next((i for i, r in enumerate(repeats) if r["exit_code"]), len(repeats)),
        "wall_s": [r["wall_s"] for r in repeats],
        "load_average_1min": [round(r["load_average_1min"], 2) for r in repeats],
    }
    (RESULTS / f"{args.name}.json").write_text(json.dumps(summary, indent=2) + "\n")
    failed = [f"--- repeat {r['repeat']} (exit {r['exit_code']})\n{r['output']}" for r in repeats if r["exit_code"]]
    (RESULTS / f"{args.name}.log").write_text("\n".join(failed) or "every repeat passed\n")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
