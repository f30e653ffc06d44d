"""Soak: the retrain flow run N times in a row, each after a new batch of human labels (docs/reliability.md).

    python bench/soak.py --workdir /tmp/soak                          # 10 runs; gc from run 6; bench/results/soak.*
    python bench/soak.py --workdir /tmp/soak --runs 4 --gc-from 0     # never gc: the cache's growth alone

The workspace is a fresh git + DVC repository of the tiny configuration (tests/support.py) with
`label.annotator: human`, its pairs sampled once (`dvc repro sample_pairs`). Before each run a person labels the
next batch of pending pairs: the answers are written as the labelling flow writes them (flows/labeling.py:
``pending_pairs`` → ``records_from_answers`` → ``append_labels``), the person preferring the response the gold judge
scores higher. That new batch is the change `dvc status` sees, so each run reruns label → reward → ppo → evaluate →
release; the run is the `rlhf-retrain` flow with ``label_batches=0`` (it does not pause for more labels) and, from
run ``--gc-from`` on, ``gc_cache=True``. Afterwards labels.jsonl and dvc.lock are committed, as the README says.

Each run is its own process (`--one-run`), as a Prefect worker or `rlhf serve` runs each flow run, reporting to one
Prefect server for the whole soak. Peak RSS per run is the kernel's high-water mark (VmHWM) of each process: the
flow process reads its own at the end; the processes it starts (DVC, the stage launchers and workers, git) are
sampled from outside every 0.2 s (:class:`DescendantPeaks`). Also recorded per run: wall time, the decision, the DVC
cache's size and growth, and what `.rlhf/` holds. :func:`problems` checks the soak; the results go to ``--out``
(JSON) and a markdown table beside it (``.md``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import subprocess
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import psutil
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
from support import git_env, make_tiny_repo, tiny_params  # noqa: E402  (the tests' tiny git + DVC repository)

UPSTREAM = ["prepare", "sft", "sample_pairs"]  # done once; the labels are given on their pairs
RETRAINED = ["label", "reward", "ppo", "evaluate", "release"]  # what a new batch of labels reruns
BATCH_SIZE = 8  # pairs per batch: the labelling flow's default (`rlhf label --batch-size 8`)
RSS_TOLERANCE = 0.05  # a run's peak RSS may exceed run 2's by this share (see problems())
LOGS_TOLERANCE = 1.25  # .rlhf/logs may be this many times run 2's size (accumulating would be 1.5 by run 3)
MIB = 1024 * 1024


# ---------------------------------------------------------------------------------------------- the workspace


def soak_params() -> dict:
    """The tiny configuration with human labels: each retrain is started by a new batch of them."""
    params = tiny_params()
    params["label"]["annotator"] = "human"
    return params


def make_workspace(repo: Path, env: dict[str, str]) -> Path:
    """A fresh git + DVC repository with its pairs sampled (`rlhf stage sample_pairs` does the same): what a person
    needs before the first batch of labels."""
    make_tiny_repo(repo, soak_params())
    run([sys.executable, "-m", "dvc", "repro", "sample_pairs"], repo, env)
    return repo


def run(command: list[str], cwd: Path, env: dict[str, str]) -> str:
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True)
    if result.returncode:
        raise RuntimeError(f"{' '.join(command)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result.stdout


def label_new_batch(repo: Path, size: int = BATCH_SIZE, annotator: str = "soak") -> int:
    """A person answers the next ``size`` pending pairs; the answers land in labels.jsonl as the labelling flow
    writes them. Returns how many labels were appended."""
    from flows.labeling import append_labels, labels_path, pending_pairs, records_from_answers
    from rlhf.embedded import gold_score

    batch = pending_pairs(repo, size)
    answers: dict[str, str] = {"annotator": annotator}
    for number, pair in enumerate(batch, start=1):
        better_a = gold_score(pair["prompt"], pair["response_a"]) >= gold_score(pair["prompt"], pair["response_b"])
        answers[f"pair_{number}"] = "A" if better_a else "B"
    records, _ = records_from_answers(batch, answers, datetime.now(timezone.utc))
    return append_labels(labels_path(repo), records)


def commit_labels(repo: Path, run_number: int, env: dict[str, str]) -> None:
    """Commit the labels with the dvc.lock they were trained into (data/human_labels/README.md)."""
    run(["git", "add", "data/human_labels", "dvc.lock"], repo, env)
    run(["git", "commit", "-qm", f"soak run {run_number}: new labels"], repo, env)


# ---------------------------------------------------------------------------------------------- one run


def one_run(repo: Path, result_file: Path, gc_cache: bool, margin: float = 0.0) -> None:
    """In its own process: the retrain flow on ``repo``; writes the decision and this process's peak RSS."""
    sys.path.insert(0, str(repo))  # the workspace's copy of the flows, as the stages use its copy of the tasks
    from flows.retrain import retrain

    decision = retrain(repo_dir=str(repo), margin=margin, label_batches=0, gc_cache=gc_cache)
    result_file.write_text(json.dumps({"decision": decision, "flow_peak_rss_mib": peak_rss_mib()}, default=str))


def run_retrain(repo: Path, env: dict[str, str], log: Path, gc_cache: bool, margin: float = 0.0) -> dict:
    """The retrain flow in a fresh process (its output to ``log``), the peaks of the processes it starts sampled
    meanwhile; its result, wall and CPU seconds and peak RSS per program."""
    result_file = log.with_suffix(".json")
    result_file.unlink(missing_ok=True)
    command = [sys.executable, str(Path(__file__).resolve()), "--one-run", str(repo), "--result", str(result_file)]
    command += ["--margin", str(margin)]
    started = time.perf_counter()
    with log.open("w") as output:
        process = subprocess.Popen(command + ["--gc"] * gc_cache, cwd=repo, env=env, stdout=output, stderr=output)
        sampler = DescendantPeaks(process.pid)
        sampler.start()
        _, status, usage = os.wait4(process.pid, 0)  # its CPU time and its waited-for descendants'
        process.returncode = code = os.waitstatus_to_exitcode(status)
        sampler.finish()
    wall = time.perf_counter() - started
    if code or not result_file.exists():
        raise RuntimeError(f"the retrain run failed (exit {code}): see {log}")
    peaks = sampler.by_program()
    stages = {name: mib for name, mib in peaks.items() if name in RETRAINED or name in UPSTREAM}
    return json.loads(result_file.read_text()) | {
        "wall_s": wall,
        "cpu_s": usage.ru_utime + usage.ru_stime,  # what the run costs on a quiet machine: the cores are shared
        "stage_peak_rss_mib": max(stages.values(), default=0.0),
        "peak_rss_by_program_mib": {name: round(mib, 1) for name, mib in sorted(peaks.items())},
    }


# ---------------------------------------------------------------------------------------------- peak RSS


def peak_rss_mib(pid: int | str = "self") -> float | None:
    """A process's VmHWM, MiB: its resident high-water mark since its exec (not ru_maxrss, which keeps across exec
    the high-water mark of the process it was forked from: a run started from a big pytest process would report
    pytest's); None once the process is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError):
        return None
    return None


def program_of(cmdline: list[str]) -> str:
    """What a process runs, for the peaks table: the stage (`tasks.ppo`: "ppo", launcher and workers alike), `dvc
    repro`…, `git`, else the executable's name."""
    modules = [arg.removeprefix("tasks.") for arg in cmdline if arg.startswith("tasks.") and arg != "tasks.launch"]
    if modules:
        return modules[-1]
    if "dvc" in cmdline:
        return " ".join(cmdline[cmdline.index("dvc") : cmdline.index("dvc") + 2])
    return Path(cmdline[0]).name if cmdline else "?"


class DescendantPeaks(threading.Thread):
    """Samples the VmHWM of every process below ``pid`` each ``interval_s``, keeping the highest per process.

    VmHWM only grows, so a process's last sample misses only what it added in its final interval. A child not yet
    past its exec (same command line as its parent) still shows its parent's memory and is skipped."""

    def __init__(self, pid: int, interval_s: float = 0.2):
        super().__init__(daemon=True)
        self.root, self.interval_s = psutil.Process(pid), interval_s
        self.peaks: dict[tuple[int, float], tuple[str, float]] = {}  # (pid, start time) → (program, MiB)
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.wait(self.interval_s):
            self.sample()

    def finish(self) -> None:
        self.done.set()
        self.join()

    def sample(self) -> None:
        try:
            children = self.root.children(recursive=True)
        except psutil.Error:
            return
        for child in children:
            try:
                cmdline, key = child.cmdline(), (child.pid, child.create_time())
                if cmdline == psutil.Process(child.ppid()).cmdline():
                    continue
            except psutil.Error:
                continue
            mib = peak_rss_mib(child.pid)
            if mib is not None:
                self.peaks[key] = (program_of(cmdline), max(mib, self.peaks.get(key, ("", 0.0))[1]))

    def by_program(self) -> dict[str, float]:
        """The highest peak among each program's processes."""
        peaks: dict[str, float] = {}
        for program, mib in self.peaks.values():
            peaks[program] = max(mib, peaks.get(program, 0.0))
        return peaks


# ---------------------------------------------------------------------------------------------- measurements


def folder_bytes(folder: Path) -> tuple[int, int]:
    """(bytes, files) under ``folder`` (0, 0 if absent); links are not followed."""
    total = count = 0
    for root, _, files in os.walk(folder):
        for name in files:
            total += os.lstat(os.path.join(root, name)).st_size
            count += 1
    return total, count


def cache_figures(repo: Path) -> dict:
    """MiB of the DVC cache (objects and run cache), DVC's tmp folder and state outside the repository, git's store,
    the workspace's cached outputs and the distinct content of the retrained stages' outputs; the object count."""
    objects, n_objects = folder_bytes(repo / ".dvc/cache/files")
    runs, _ = folder_bytes(repo / ".dvc/cache/runs")
    return {
        "cache_mib": round((objects + runs) / MIB, 3),
        "cache_objects_mib": round(objects / MIB, 3),
        "cache_objects": n_objects,
        "run_cache_mib": round(runs / MIB, 3),
        "dvc_tmp_mib": round(folder_bytes(repo / ".dvc/tmp")[0] / MIB, 2),
        "git_mib": round(folder_bytes(repo / ".git")[0] / MIB, 2),
        "site_cache_mib": round(folder_bytes(site_cache_dir(repo))[0] / MIB, 2),
        "workspace_outs_mib": round(workspace_outs_bytes(repo) / MIB, 3),
        "retrain_outs_mib": round(distinct_bytes(repo, RETRAINED) / MIB, 3),
    }


def site_cache_dir(repo: Path) -> Path:
    """DVC's per-repository state outside it (its hash and link databases, under /var/tmp/dvc by default)."""
    from dvc.repo import Repo

    with Repo(str(repo)) as dvc_repo:
        return Path(dvc_repo.site_cache_dir)


def distinct_bytes(repo: Path, stages: list[str]) -> int:
    """Bytes of the distinct file contents among ``stages``' cached outputs in the workspace: what a run of those
    stages adds to the cache when all of it is new (the cache stores each content once)."""
    lock = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]
    sizes: dict[str, int] = {}
    for stage in stages:
        for out in lock.get(stage, {}).get("outs", []):  # a stage not run yet adds nothing
            path = repo / out["path"]
            for file in sorted(path.rglob("*")) if path.is_dir() else [path]:
                if file.is_file():
                    sizes[hashlib.md5(file.read_bytes()).hexdigest()] = file.stat().st_size
    return sum(sizes.values())


def workspace_outs_bytes(repo: Path) -> int:
    """Bytes of the cached outputs dvc.lock records (what `dvc gc --workspace` must keep)."""
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    total = 0
    for stage in lock["stages"].values():
        for out in stage.get("outs", []):
            path = repo / out["path"]
            total += folder_bytes(path)[0] if path.is_dir() else path.stat().st_size if path.exists() else 0
    return total


def rlhf_contents(repo: Path) -> list[str]:
    """What `.rlhf/` holds, relative paths; folders end in `/`, the promoted release's files are one entry."""
    root = repo / ".rlhf"
    entries = []
    for path in sorted(root.rglob("*")):
        relative = path.relative_to(root).as_posix()
        if relative.startswith("promoted/release/"):
            continue
        entries.append(relative + "/" if path.is_dir() else relative)
    return entries


def allowed_in_rlhf(entry: str, stages: list[str]) -> bool:
    """What resume and the flows need: the lock, each stage's latest log, events and stack dumps (tasks/stall.py;
    replaced by the stage's next run), the promoted release and its record, and the checkpoint root (empty once the
    stages finished: a finished stage clears its checkpoints)."""
    fixed = {"lifecycle.lock", "logs/", "promoted/", "promoted/release/", "promoted/record.json", "checkpoints/"}
    if entry in fixed:
        return True
    names = "|".join(re.escape(stage) for stage in stages)
    return re.fullmatch(rf"logs/({names})(\.log|\.jsonl|\.stacks/|\.stacks/\d+\.txt)", entry) is not None


def folder_digest(folder: Path) -> str:
    """sha256 over a folder's relative paths and file contents ("" if absent): did the promoted release change?"""
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(path.relative_to(folder).as_posix().encode() + b"\0" + path.read_bytes())
    return digest.hexdigest() if folder.exists() else ""


def measure(repo: Path, result: dict) -> dict:
    """The figures after a run: the run's own plus the cache, `.rlhf/` and the labels."""
    from pipeline.workspace import stage_names

    contents = rlhf_contents(repo)
    labels = repo / "data/human_labels/labels.jsonl"
    return {
        **result,
        **cache_figures(repo),
        "rlhf": contents,
        "rlhf_unexpected": [e for e in contents if not allowed_in_rlhf(e, stage_names(repo))],
        "rlhf_logs_kib": round(folder_bytes(repo / ".rlhf/logs")[0] / 1024, 1),
        "rlhf_mib": round(folder_bytes(repo / ".rlhf")[0] / MIB, 2),
        "labels": len(labels.read_text().splitlines()),
        "promoted_digest": folder_digest(repo / ".rlhf/promoted/release"),
    }


# ---------------------------------------------------------------------------------------------- the soak


def soak(
    repo: Path, env: dict[str, str], runs: int, gc_from: int, logs: Path, margins: dict | None = None, say=print
) -> list[dict]:
    """``runs`` retrain runs in a row on ``repo``, each after a new batch of labels; ``gc_cache`` from run
    ``gc_from`` on (0: never); ``margins``: the gate's margin by run number (default 0.0, `rlhf serve`'s). Returns
    one record per run."""
    logs.mkdir(parents=True, exist_ok=True)
    results = []
    cache_before = cache_figures(repo)["cache_mib"]
    for number in range(1, runs + 1):
        added = label_new_batch(repo)
        gc_cache = 0 < gc_from <= number
        result = run_retrain(repo, env, logs / f"run-{number}.log", gc_cache, (margins or {}).get(number, 0.0))
        commit_labels(repo, number, env)
        record = {"run": number, "new_labels": added, "gc_cache": gc_cache, **measure(repo, result)}
        record["cache_growth_mib"] = round(record["cache_mib"] - cache_before, 3)
        cache_before = record["cache_mib"]
        results.append(record)
        say(summary_line(record))
    return results


def summary_line(r: dict) -> str:
    return (
        f"run {r['run']}: {r['wall_s']:.0f} s ({r['cpu_s']:.0f} s CPU), ran {r['decision'].get('stages_run')}, "
        f"promoted {r['decision']['promoted']}, flow {r['flow_peak_rss_mib']:.0f} MiB, stages "
        f"{r['stage_peak_rss_mib']:.0f} MiB, cache {r['cache_mib']} MiB ({r['cache_growth_mib']:+}), "
        f".rlhf {r['rlhf_mib']} MiB"
    )


def problems(results: list[dict], tolerance: float = RSS_TOLERANCE) -> list[str]:
    """What the soak must not show: a run that did not retrain; peak RSS above run 2's by more than ``tolerance``;
    anything in `.rlhf/` that resume does not need, or its logs accumulating; after a gc, more in the cache than the
    workspace's outputs (plus a little for DVC's folder manifests).

    Run 2 is the baseline because run 1 is the first in its workspace (the first promotion, DVC's first hashing of
    the new outputs); from run 2 on every run does the same work on 8 more labels. Each run is a fresh process, so
    growth could only come from what accumulates (labels, cache, the Prefect history), and it would climb run after
    run; 5 % is above the jitter measured in two 10-run soaks (stages 469–479 MiB, flow 112–114 MiB: ≤ 2.2 %), and a
    growth of 0.7 % a run or more passes it by run 10 (the test's 3 runs catch only a jump of 5 % in one run)."""
    found = []
    baseline = results[1] if len(results) > 1 else None
    for record in results:
        run, decision = record["run"], record["decision"]
        if not decision.get("ran") or decision.get("stages_run") != RETRAINED:
            found.append(f"run {run}: did not retrain {RETRAINED}: {decision}")
        if record["rlhf_unexpected"]:
            found.append(f"run {run}: .rlhf holds what resume does not need: {record['rlhf_unexpected']}")
        if baseline and run > 2:
            for key in ("flow_peak_rss_mib", "stage_peak_rss_mib"):
                if record[key] > baseline[key] * (1 + tolerance):
                    found.append(f"run {run}: {key} {record[key]:.0f} > run 2's {baseline[key]:.0f} + {tolerance:.0%}")
            if record["rlhf_logs_kib"] > baseline["rlhf_logs_kib"] * LOGS_TOLERANCE:
                found.append(f"run {run}: .rlhf/logs grew to {record['rlhf_logs_kib']} KiB from run 2's")
        if record["gc_cache"] and record["cache_objects_mib"] > record["workspace_outs_mib"] * 1.05 + 0.1:
            found.append(f"run {run}: cache {record['cache_objects_mib']} MiB after gc > workspace outputs")
    return found


def markdown_table(results: list[dict]) -> str:
    lines = [
        "| run | wall s (CPU s) | promoted | flow process peak RSS MiB | largest stage process peak RSS MiB "
        "| DVC cache MiB (objects) | growth MiB | gc | labels | .rlhf/ (besides logs/) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        stages = {k: v for k, v in r["peak_rss_by_program_mib"].items() if k in RETRAINED + UPSTREAM}
        largest = max(stages, key=stages.get) if stages else "?"
        rlhf = ", ".join(e for e in r["rlhf"] if not e.startswith("logs/"))
        lines.append(
            f"| {r['run']} | {r['wall_s']:.0f} ({r['cpu_s']:.0f}) | {'yes' if r['decision']['promoted'] else 'no'} "
            f"| {r['flow_peak_rss_mib']:.0f} | {r['stage_peak_rss_mib']:.0f} ({largest}) | {r['cache_mib']:.2f} "
            f"({r['cache_objects']}) | {r['cache_growth_mib']:+.2f} | {'yes' if r['gc_cache'] else 'no'} "
            f"| {r['labels']} | {rlhf}; logs/ {r['rlhf_logs_kib']} KiB |"
        )
    return "\n".join(lines)


def soak_env(prefect_api_url: str, prefect_home: Path) -> dict[str, str]:
    """The run processes' environment: the soak's Prefect server, one thread per process (shared 2-core machines),
    git identity, no DVC analytics."""
    env = {key: value for key, value in git_env().items() if not key.startswith("PREFECT_")}
    env.update(
        PREFECT_API_URL=prefect_api_url,
        PREFECT_HOME=str(prefect_home),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        OMP_NUM_THREADS="1",
        MKL_NUM_THREADS="1",
    )
    return env


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "?"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/rlhf-soak"))
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--gc-from", type=int, default=6, help="first run with gc_cache=True (0: never)")
    parser.add_argument("--out", type=Path, default=REPO / "bench/results/soak.json")
    parser.add_argument("--one-run", type=Path, help=argparse.SUPPRESS)  # the run process (run_retrain)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--gc", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--margin", type=float, default=0.0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one_run:
        one_run(args.one_run, args.result, args.gc, args.margin)
        return
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    if args.workdir.exists():
        raise SystemExit(f"{args.workdir} exists: give a new --workdir")
    started = time.perf_counter()
    with prefect_test_harness(server_startup_timeout=120):  # a real server with its own SQLite database
        env = soak_env(PREFECT_API_URL.value(), args.workdir / "prefect-home")
        repo = make_workspace(args.workdir / "repo", env)
        results = soak(repo, env, args.runs, args.gc_from, args.workdir / "logs")
    found = problems(results)
    report = {
        "runs": results,
        "problems": found,
        "total_s": round(time.perf_counter() - started),
        "settings": {"runs": args.runs, "gc_from": args.gc_from, "batch_size": BATCH_SIZE, "params": "tiny"},
        "machine": {"cpus": os.cpu_count(), "cpu": cpu_model(), "python": sys.version.split()[0]},
        "load_average_at_end": os.getloadavg(),  # other jobs on the machine: the wall times depend on them
    }
    args.out.write_text(json.dumps(report, indent=1, default=str) + "\n")
    args.out.with_suffix(".md").write_text(markdown_table(results) + "\n")
    print(markdown_table(results))
    print("problems:", found or "none")
    raise SystemExit(1 if found else 0)


if __name__ == "__main__":
    main()
