"""Data at scale (issue 14): peak RSS and wall time of the stages prepare → label → reward on N preference rows.

    .venv/bin/python bench/data_scale.py --rows 10000 --workspace W               # whole reward stage
    .venv/bin/python bench/data_scale.py --rows 1000000 --workspace W --reward-until checkpoint
    .venv/bin/python bench/data_scale.py --rows 1000000 --workspace W --profile   # where the memory goes
    .venv/bin/python bench/data_scale.py --rows 100000 --workspace W --profile --profiles prepare

A workspace named with --workspace is kept and reused (setup runs once); without it a temporary one is used and
removed unless --keep. Several --rows values run one after the other.

What runs. A scratch workspace (params.yaml of the repository with a tiny model, configs/), in which:

1. setup, once per workspace: ``prepare`` (the embedded default: tiny GPT-2 in models/base, data/sft, data/prompts)
   and a short ``sft`` (20 steps), so models/sft exists; both are measured too (they do not read the rows);
2. a JSONL of N preference rows ``{"prompt", "chosen", "rejected"}`` in imports/, made from the embedded task's
   corpus (prompts and responses of rlhf.embedded's generator; chosen is the response with the higher gold score,
   chosen ≠ rejected). Rows are a deterministic stream: the 10 k file is the first 10 k rows of the 1 M one;
3. ``label`` with ``label.annotator: dataset`` and ``label.dataset`` = that file (every other label key at its
   default), then ``reward`` on data/preferences; each stage is its dvc.yaml command (``python`` = this interpreter,
   the reward stage through ``tasks.launch`` → ``accelerate launch`` → the stage process), cwd = the workspace;
4. ``prepare`` once more in a second folder (prepare-import/) with ``prepare.dataset`` = the same file: the rows as
   SFT data (their chosen side) and prompts, to see prepare itself at N rows (the embedded prepare of step 1 does not
   read them). Skip with ``--no-prepare-import``.

``--reward-until checkpoint`` stops the reward stage (SIGKILL to its process group) at its first event with
``event`` ``checkpoint`` (step ``reward.resume_every`` = 100 of 64 pairs) or ``progress``, whichever comes first: on
1 M rows a whole epoch would take hours on 2 cores, while everything that grows with the rows (reading, validating
and length-checking every row, the content hash of the inputs, the epoch's shuffled order) happens before step 1.

What is measured, per stage process tree (the stage and, for the reward stage, accelerate's launcher and its child):

- ``peak_rss_mib``: the largest peak RSS of one process of the tree (the kernel's high-water mark: ``ru_maxrss`` of
  ``wait4`` and ``VmHWM`` of /proc/PID/status, read every 0.1 s and just before a kill);
- ``peak_tree_rss_mib``: the largest sum of the tree's RSS over the 0.1 s samples (launcher + stage process);
- ``wall_s``: from the start of the command to its exit (or to the kill), and the time of each stage event;
- a timeline of the tree's RSS every 0.5 s.

``--profile`` instead runs small programs, each in a fresh process, that call the same library functions as the
stages step by step on the N-row file of a workspace: ``prepare`` (tasks/prepare.py importing the rows), ``label``,
``reward`` (tasks/reward.py up to its first step; it reads the workspace's data/preferences, i.e. the output of the
last label run there: profile right after the run at the same --rows), and two programs measuring alternatives
(``alternatives-reading``: line-by-line reading, Arrow tables from ``datasets``; ``alternatives-tokenising``:
chunked length checks, token ids as numpy arrays, ``datasets.map`` with num_proc 1 and 2); ``--profiles`` picks some.
Before each step RSS is read and the kernel's high-water mark reset (``5`` into /proc/self/clear_refs), so each step
reports its own peak above the RSS it started from, what it kept, and its time. tracemalloc is not used: the fast
tokenizer's memory is Rust-side, invisible to it.

Results: bench/results/data-scale-<rows>.json and .log (``--profile``: data-scale-profile-<rows>.json); the page is
docs/scale.md. Linux only (/proc). Run one measurement at a time: the machine has 2 cores.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import itertools
import json
import os
import random
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tasks.stage_io import EVENTS_DIR, EventTail  # noqa: E402

RESULTS = REPO / "bench" / "results"
MIB = 1024 * 1024
POLL_S = 0.1
TIMELINE_S = 0.5
SFT_STEPS = 20
POOL_SIZE = 50_000  # distinct (prompt, response) examples the rows are drawn from


def rows_label(rows: int) -> str:
    """10000 → "10k", 1000000 → "1m"."""
    for size, suffix in ((1_000_000, "m"), (1_000, "k")):
        if rows >= size and rows % size == 0:
            return f"{rows // size}{suffix}"
    return str(rows)


# ----------------------------------------------------------------------------------------------------------------
# Workspace and data


def workspace_params(rows_file: Path | None) -> dict:
    """The repository's params.yaml with a tiny model (tests/support.py tiny_params' sizes), a short SFT, one reward
    epoch, and the dataset annotator reading ``rows_file`` (None: the simulated default)."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["prepare"].update(n_demonstrations=1500, n_train_prompts=64, n_eval_prompts=16)
    params["prepare"]["model"] = {"n_layer": 2, "n_head": 2, "n_embd": 32, "n_positions": 64}
    params["sft"].update(steps=SFT_STEPS, batch_size=32, warmup_steps=5, eval_every=SFT_STEPS)
    params["reward"].update(epochs=1)  # batch_size 64, resume_every 100: the defaults
    if rows_file is not None:
        params["label"].update(annotator="dataset", dataset=str(rows_file))
    return params


def write_params(folder: Path, params: dict) -> None:
    (folder / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def stage_command(stage: str, workspace: Path) -> list[str]:
    """The stage's dvc.yaml command (``${section.key}`` from the workspace's params), ``python`` = this interpreter."""
    command = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"][stage]["cmd"]
    params = yaml.safe_load((workspace / "params.yaml").read_text())

    def value(match: re.Match) -> str:
        section, key = match.group(1).split(".", 1)
        return str(params[section][key])

    words = shlex.split(re.sub(r"\$\{([\w.]+)\}", value, command))
    return [sys.executable, *words[1:]] if words[0] == "python" else words


def preference_rows(seed: int = 0) -> Iterator[dict]:
    """An endless deterministic stream of preference rows of the embedded task (a prefix of it for any N)."""
    from rlhf import embedded

    rng = random.Random(f"{seed}:data-scale")
    pool = [embedded._draw_example(rng, for_eval=False) for _ in range(POOL_SIZE)]
    responses = [response for _, response in pool]  # every prompt ends "… was": any response continues it
    while True:
        prompt, chosen = pool[rng.randrange(POOL_SIZE)]
        rejected = responses[rng.randrange(POOL_SIZE)]
        if rejected == chosen:
            continue
        if embedded.gold_score(prompt, rejected) > embedded.gold_score(prompt, chosen):
            chosen, rejected = rejected, chosen
        yield {"prompt": prompt, "chosen": chosen, "rejected": rejected}


def write_rows(path: Path, rows: int) -> None:
    if path.exists():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    with partial.open("w", encoding="utf-8") as handle:
        for _, row in zip(range(rows), preference_rows()):
            handle.write(json.dumps(row) + "\n")
    partial.replace(path)


# ----------------------------------------------------------------------------------------------------------------
# Measuring a process tree


def status_kib(pid: int, field: str) -> int:
    """A ``Vm*`` field of /proc/PID/status in KiB (0 when the process is gone)."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0
    found = re.search(rf"^{field}:\s+(\d+) kB", text, re.MULTILINE)
    return int(found.group(1)) if found else 0


def tree(pid: int) -> list[psutil.Process]:
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.Error:
        return []


def describe(process: psutil.Process, known: str = "?") -> str:
    """The module a python process runs (``-m``), else its script's name; ``known`` once it is gone."""
    try:
        words = process.cmdline()
    except psutil.Error:
        return known
    if len(words) < 2:  # a zombie's, or one not exec'd yet
        return known
    module = words[words.index("-m") + 1] if "-m" in words else Path(words[1] if len(words) > 1 else "?").name
    return module


def measure(
    command: list[str],
    cwd: Path,
    log: Callable[[str], None],
    stop: Callable[[dict], bool] = lambda event: False,
    env: dict | None = None,
) -> dict:
    """Run ``command`` in its own process group; its peak RSS (largest process; sampled sum of the tree), wall time,
    stage events (the stages' events files, tasks/stage_io.py) and RSS timeline. ``stop(event)`` true kills the group
    (after reading every peak)."""
    log(f"$ (cd {cwd} && {shlex.join(command)})")
    events_dir = cwd / EVENTS_DIR
    for old in events_dir.glob("*.jsonl"):
        old.unlink()  # each stage run then writes its file once: the tails below read it from its start
    tails: dict[Path, EventTail] = {}
    start = time.perf_counter()
    process = subprocess.Popen(
        command,
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        bufsize=1,
        start_new_session=True,
        env=env,
    )
    events: list[dict] = []
    stop_now = threading.Event()

    def read_output() -> None:
        for line in process.stdout:
            elapsed = time.perf_counter() - start
            log(f"[{elapsed:8.2f}s] {line.rstrip()}")

    def read_events() -> None:
        for path in sorted(events_dir.glob("*.jsonl")):
            for record in tails.setdefault(path, EventTail(path)).read():
                elapsed = time.perf_counter() - start
                record = {"t": round(elapsed, 2), **{k: v for k, v in record.items() if k != "time"}}
                events.append(record)
                if stop(record):
                    stop_now.set()

    reader = threading.Thread(target=read_output, daemon=True)
    reader.start()
    peaks: dict[int, dict] = {}  # pid → {"name", "hwm_kib"}
    timeline: list[list[float]] = []
    peak_tree_kib, next_sample, stopped, rusage_kib = 0, 0.0, False, 0
    while True:
        members = tree(process.pid)
        tree_kib = 0
        for member in members:
            entry = peaks.setdefault(member.pid, {"name": "?", "hwm_kib": 0})
            entry["name"] = describe(
                member, entry["name"]
            )  # again each time: tasks.launch execs accelerate in its place
            entry["hwm_kib"] = max(entry["hwm_kib"], status_kib(member.pid, "VmHWM"))
            tree_kib += status_kib(member.pid, "VmRSS")
        peak_tree_kib = max(peak_tree_kib, tree_kib)
        read_events()
        elapsed = time.perf_counter() - start
        if elapsed >= next_sample:
            timeline.append([round(elapsed, 2), round(tree_kib / 1024, 1)])
            next_sample += TIMELINE_S
        if stop_now.is_set():
            os.killpg(process.pid, signal.SIGKILL)
            stopped = True
        pid, status, usage = os.wait4(process.pid, 0 if stopped else os.WNOHANG)
        if pid:
            returncode = os.waitstatus_to_exitcode(status)
            rusage_kib = usage.ru_maxrss
            break
        time.sleep(POLL_S)
    wall = time.perf_counter() - start
    process.returncode = returncode  # reaped by wait4 above
    if stopped:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)  # a grandchild the group kill raced with
    reader.join(timeout=10)
    read_events()
    processes = [{"process": v["name"], "peak_rss_mib": round(v["hwm_kib"] / 1024, 1)} for v in peaks.values()]
    peak_kib = max([rusage_kib, *(v["hwm_kib"] for v in peaks.values())])
    result = {
        "command": shlex.join(command),
        "returncode": returncode,
        "stopped_early": stopped,
        "wall_s": round(wall, 2),
        "peak_rss_mib": round(peak_kib / 1024, 1),
        "peak_tree_rss_mib": round(peak_tree_kib / 1024, 1),
        "processes": processes,
        "events": events,
        "timeline": timeline,
    }
    log(
        f"→ rc {returncode}{' (stopped)' if stopped else ''}, wall {wall:.1f} s, peak RSS {peak_kib / 1024:.0f} MiB "
        f"(tree {peak_tree_kib / 1024:.0f} MiB): "
        + ", ".join(f"{p['process']} {p['peak_rss_mib']:.0f}" for p in processes)
    )
    return result


def stage_env() -> dict:
    env = dict(os.environ)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env["PATH"]
    return env


# ----------------------------------------------------------------------------------------------------------------
# The stage runs


def first_training_event(event: dict) -> bool:
    return event.get("event") in ("checkpoint", "progress")


def run_scale(args: argparse.Namespace) -> None:
    workspace = Path(args.workspace or tempfile.mkdtemp(prefix="data-scale-"))
    workspace.mkdir(parents=True, exist_ok=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    env = stage_env()
    for rows in args.rows:
        name = rows_label(rows)
        log_path = RESULTS / f"data-scale-{name}.log"
        with log_path.open("w", encoding="utf-8") as log_file:

            def log(line: str) -> None:
                print(line, flush=True)
                log_file.write(line + "\n")
                log_file.flush()

            result = {"rows": rows, "workspace": str(workspace), "machine": machine(), "stages": {}}
            setup_done = (workspace / "models/sft").is_dir()
            if not setup_done:
                shutil.copytree(REPO / "configs", workspace / "configs", dirs_exist_ok=True)
                write_params(workspace, workspace_params(None))
                for stage in ("prepare", "sft"):
                    result["stages"][f"setup:{stage}"] = measure(
                        stage_command(stage, workspace), workspace, log, env=env
                    )
            rows_file = (workspace / "imports" / f"preferences-{name}.jsonl").resolve()
            begin = time.perf_counter()
            write_rows(rows_file, rows)
            log(
                f"rows file {rows_file}: {rows_file.stat().st_size / MIB:.1f} MiB ({time.perf_counter() - begin:.1f} s)"
            )
            result["rows_file_mib"] = round(rows_file.stat().st_size / MIB, 1)
            write_params(workspace, workspace_params(rows_file))
            shutil.rmtree(workspace / ".rlhf", ignore_errors=True)  # no resume from an earlier run
            result["stages"]["label"] = measure(stage_command("label", workspace), workspace, log, env=env)
            stop = first_training_event if args.reward_until == "checkpoint" else (lambda event: False)
            result["reward_until"] = args.reward_until
            result["stages"]["reward"] = measure(stage_command("reward", workspace), workspace, log, stop, env=env)
            if args.prepare_import:
                folder = workspace / "prepare-import"
                shutil.rmtree(folder, ignore_errors=True)
                folder.mkdir()
                params = workspace_params(None)
                defaults = yaml.safe_load((REPO / "params.yaml").read_text())["prepare"]
                for key in ("n_demonstrations", "n_train_prompts", "n_eval_prompts"):  # embedded-corpus keys only
                    params["prepare"][key] = defaults[key]
                params["prepare"]["dataset"] = str(rows_file)
                write_params(folder, params)
                result["stages"]["prepare:import"] = measure(stage_command("prepare", folder), folder, log, env=env)
            out = RESULTS / f"data-scale-{name}.json"
            out.write_text(json.dumps(result, indent=1) + "\n")
            log(f"wrote {out}")
    if not args.keep and not args.workspace:
        shutil.rmtree(workspace, ignore_errors=True)


def machine() -> dict:
    return {
        "cpus": os.cpu_count(),
        "memory_gib": round(psutil.virtual_memory().total / 1024**3, 1),
        "load_average_1m": round(os.getloadavg()[0], 2),
        "python": sys.version.split()[0],
    }


# ----------------------------------------------------------------------------------------------------------------
# Profile: the stages' library calls step by step, in fresh processes


def rss_kib() -> int:
    return status_kib(os.getpid(), "VmRSS")


class Steps:
    """Per-step time, peak above the step's starting RSS (high-water mark reset at the start) and RSS kept."""

    def __init__(self) -> None:
        self.rows: list[dict] = []

    @contextlib.contextmanager
    def step(self, name: str) -> Iterator[None]:
        gc.collect()
        before = rss_kib()
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
        start = time.perf_counter()
        yield
        seconds = time.perf_counter() - start
        peak, after = status_kib(os.getpid(), "VmHWM"), rss_kib()
        row = {
            "step": name,
            "seconds": round(seconds, 2),
            "peak_above_start_mib": round((peak - before) / 1024, 1),
            "kept_mib": round((after - before) / 1024, 1),
            "rss_after_mib": round(after / 1024, 1),
        }
        self.rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)


def profile_prepare(workspace: Path, rows_file: Path, steps: Steps) -> None:
    """tasks/prepare.py with ``prepare.dataset`` = the rows file (embedded base model), call by call."""
    from rlhf import data, embedded, importers
    from rlhf.files import write_jsonl
    from rlhf.modeling import build_tiny_gpt2
    from rlhf.params import load_params

    config = load_params().prepare  # the workspace's: its tiny model
    with steps.step("importers.load_table (list of dicts)"):
        rows = importers.load_table(str(rows_file))
    with steps.step("importers.to_demonstrations (chosen side; source rows still held)"):
        demonstrations = importers.to_demonstrations(rows, str(rows_file))
    with steps.step("drop the source rows"):
        del rows
    with steps.step("data.split_train_eval (a group per row: dict of one-item lists, index set)"):
        sft_train, sft_eval = data.split_train_eval(demonstrations, 0.05, 0)
        corpus = {
            "sft_train": sft_train,
            "sft_eval": sft_eval,
            "prompts_train": [{"prompt": r["prompt"]} for r in sft_train],
            "prompts_eval": [{"prompt": r["prompt"]} for r in sft_eval],
        }
    with steps.step("embedded.train_tokenizer on every prompt + response"):
        tokenizer = embedded.train_tokenizer([r["prompt"] + r["response"] for r in sft_train], config.vocab_size)
    for name in ("prompts_train", "prompts_eval"):
        with steps.step(f"check_lengths {name} (one tokenizer call over all rows)"):
            data.check_lengths([r["prompt"] for r in corpus[name]], tokenizer, config.max_prompt_tokens, name, "prompt")
    with steps.step("validate_demonstrations + build_tiny_gpt2"):
        for name in ("sft_train", "sft_eval"):
            data.validate_demonstrations(corpus[name], name)
        build_tiny_gpt2(config.model, tokenizer, 0)
    out = Path(tempfile.mkdtemp(prefix="data-scale-prepare-"))
    for name, rows in corpus.items():
        with steps.step(f"write_jsonl {name}"):
            write_jsonl(out / f"{name}.jsonl", rows)
    shutil.rmtree(out)


def profile_label(workspace: Path, rows_file: Path, steps: Steps) -> None:
    """tasks/label.py with the dataset annotator, call by call."""
    from rlhf import data, importers
    from rlhf.files import write_jsonl
    from tasks.label import base_renderer, split_by_prompt

    with steps.step("imports + models/base tokenizer (base_renderer)"):
        render = base_renderer(workspace / "models/base")
    with steps.step("importers.load_table: read_text + splitlines + json.loads → list of dicts"):
        rows = importers.load_table(str(rows_file))
    with steps.step("importers.to_preference_records (source rows still held)"):
        records, _ = importers.to_preference_records(rows, str(rows_file), render)
    with steps.step("drop the source rows (label_from_dataset returns)"):
        del rows
    with steps.step("record['annotator'] = f'dataset:…' (a new string per row)"):
        for record in records:
            record["annotator"] = f"dataset:{rows_file}"
    with steps.step("data.validate_preferences"):
        data.validate_preferences(records, "profile")
    with steps.step("split_by_prompt (set of prompts, two lists)"):
        train, held_out = split_by_prompt(records, 0.1, 0)
    out = Path(tempfile.mkdtemp(prefix="data-scale-label-"))
    with steps.step("write_jsonl train (list of lines, join, encode)"):
        write_jsonl(out / "train.jsonl", train)
    with steps.step("write_jsonl eval"):
        write_jsonl(out / "eval.jsonl", held_out)
    shutil.rmtree(out)


def profile_reward(workspace: Path, rows_file: Path, steps: Steps) -> None:
    """tasks/reward.py up to its first training step, call by call (one process, no accelerate launcher)."""
    import torch

    from rlhf import data
    from rlhf.modeling import load_scalar_model, load_tokenizer
    from rlhf.training import pair_batch
    from rlhf.validation import read_records

    preferences = workspace / "data/preferences"
    with steps.step("imports + load_tokenizer(models/sft)"):
        tokenizer = load_tokenizer(workspace / "models/sft")
    splits = {}
    for split in ("train", "eval"):
        with steps.step(f"read_records {split}.jsonl (read_jsonl + validate_preferences)"):
            rows = read_records(preferences / f"{split}.jsonl", data.validate_preferences)
        for side in ("chosen", "rejected"):
            with steps.step(f"{split}: texts = [prompt + {side}] (list of str)"):
                texts = [r["prompt"] + r[side] for r in rows]
            with steps.step(f"{split}: check_lengths {side} (one tokenizer call over all rows)"):
                data.check_lengths(texts, tokenizer, 63, split, f"prompt + {side}")
            del texts
        splits[split] = rows
    with steps.step("load_scalar_model(models/sft)"):
        model = load_scalar_model(workspace / "models/sft", tokenizer.pad_token_id)
    with steps.step("epoch order: torch.randperm(n).tolist()"):
        order = torch.randperm(len(splits["train"]), generator=torch.Generator().manual_seed(0)).tolist()
    with steps.step("one step's batch: rows + pair_batch (64 pairs) + forward"):
        batch = pair_batch(tokenizer, [splits["train"][i] for i in order[:64]])
        model(input_ids=batch.ids, attention_mask=batch.mask)
    with steps.step("checkpoint's order tensor: torch.tensor(order)"):
        kept = torch.tensor(order, dtype=torch.int64)
    del kept


def profile_alternatives_reading(workspace: Path, rows_file: Path, steps: Steps) -> None:
    """Reading the rows other ways: line by line, and as a memory-mapped Arrow table (datasets)."""
    import datasets

    datasets.disable_progress_bars()
    with steps.step("rows read line by line from the file handle (no whole-file string)"):
        with rows_file.open(encoding="utf-8") as handle:
            rows = [json.loads(line) for line in handle if line.strip()]
    with steps.step("drop them"):
        del rows
    cache = Path(tempfile.mkdtemp(prefix="data-scale-arrow-"))
    with steps.step("datasets.load_dataset('json') → Arrow cache on disk, memory-mapped"):
        table = datasets.load_dataset("json", data_files=str(rows_file), split="train", cache_dir=str(cache))
    with steps.step("Arrow: one pass over every row in batches of 10 k (as a length check would)"):
        n = sum(len(batch["prompt"]) for batch in table.iter(batch_size=10_000))
    with steps.step("Arrow: 64 random rows (a training batch)"):
        picked = table[random.Random(0).sample(range(n), 64)]
    del picked
    with steps.step("Arrow: the table's size on disk (no work)"):
        size = sum(f.stat().st_size for f in cache.rglob("*.arrow"))
    steps.rows[-1]["arrow_mib"] = round(size / MIB, 1)
    shutil.rmtree(cache)


def profile_alternatives_tokenising(workspace: Path, rows_file: Path, steps: Steps) -> None:
    """The length check other ways: in chunks, lengths only; tokenising with datasets.map (num_proc 2)."""
    import datasets
    import numpy as np

    from rlhf import data
    from rlhf.modeling import load_tokenizer
    from rlhf.validation import read_records

    datasets.disable_progress_bars()
    tokenizer = load_tokenizer(workspace / "models/sft")
    rows = read_records(workspace / "data/preferences/train.jsonl", data.validate_preferences)
    texts = [r["prompt"] + r["chosen"] for r in rows]
    with steps.step("check_lengths in chunks of 10 k texts (same function, one side)"):
        for start in range(0, len(texts), 10_000):
            data.check_lengths(texts[start : start + 10_000], tokenizer, 63, "train", "prompt + chosen")
    with steps.step("lengths of all texts, chunks of 10 k, kept as int32 (backend encode_batch)"):
        lengths = np.concatenate(
            [
                np.fromiter((len(e.ids) for e in tokenizer.backend_tokenizer.encode_batch(texts[i : i + 10_000])), "i4")
                for i in range(0, len(texts), 10_000)
            ]
        )
    with steps.step("token ids of all texts kept flat (int32 ids + int64 offsets), chunks of 10 k"):
        flat = []
        for start in range(0, len(texts), 10_000):
            chunk = tokenizer(texts[start : start + 10_000], add_special_tokens=False)["input_ids"]
            flat.append(np.fromiter(itertools.chain.from_iterable(chunk), "i4"))
        ids = np.concatenate(flat)
        offsets = np.concatenate([[0], np.cumsum(lengths, dtype="i8")])
        del flat, chunk
    steps.rows[-1]["ids_mib"] = round((ids.nbytes + offsets.nbytes) / MIB, 1)
    del rows, texts, ids, offsets
    cache = Path(tempfile.mkdtemp(prefix="data-scale-arrow-"))
    table = datasets.load_dataset(
        "json", data_files=str(workspace / "data/preferences/train.jsonl"), split="train", cache_dir=str(cache)
    )

    def tokenize(batch: dict) -> dict:
        out = {}
        for side in ("chosen", "rejected"):
            texts = [p + r for p, r in zip(batch["prompt"], batch[side])]
            out[f"{side}_ids"] = tokenizer(texts, add_special_tokens=False)["input_ids"]
        return out

    for processes in (1, 2):
        with steps.step(f"datasets .map(tokenize both sides, batched, num_proc={processes}) → Arrow on disk"):
            tokenised = table.map(
                tokenize,
                batched=True,
                batch_size=10_000,
                num_proc=processes if processes > 1 else None,
                load_from_cache_file=False,
            )
        steps.rows[-1]["note"] = "peak is this process only; num_proc workers are separate processes"
        del tokenised
    shutil.rmtree(cache)


PROFILES = {
    "prepare": profile_prepare,
    "label": profile_label,
    "reward": profile_reward,
    "alternatives-reading": profile_alternatives_reading,
    "alternatives-tokenising": profile_alternatives_tokenising,
}


def run_profile(args: argparse.Namespace) -> None:
    if not args.workspace:
        raise SystemExit("--profile needs --workspace: a workspace of an earlier run at the same --rows (with --keep)")
    workspace = Path(args.workspace)
    for rows in args.rows:
        name = rows_label(rows)
        rows_file = workspace / "imports" / f"preferences-{name}.jsonl"
        if not rows_file.exists():
            raise SystemExit(f"{rows_file}: missing; run `bench/data_scale.py --rows {rows} --workspace …` first")
        result = {"rows": rows, "machine": machine(), "profiles": {}}
        for profile in args.profiles:
            print(f"profile {profile} ({name})", flush=True)
            command = [sys.executable, __file__, "--profile-worker", profile, "--workspace", str(workspace)]
            start = time.perf_counter()
            done = subprocess.run(
                [*command, "--rows", str(rows)], cwd=REPO, env=stage_env(), stdout=subprocess.PIPE, text=True
            )
            if done.returncode != 0:
                raise SystemExit(f"profile {profile} failed ({done.returncode})")
            result["profiles"][profile] = {
                "wall_s": round(time.perf_counter() - start, 1),
                "steps": json.loads(done.stdout.strip().splitlines()[-1]),
            }
        out = RESULTS / f"data-scale-profile-{name}.json"
        out.write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {out}", flush=True)


def profile_worker(args: argparse.Namespace) -> None:
    os.chdir(args.workspace)  # params.yaml and configs/ of the workspace, as the stages see them
    steps = Steps()
    workspace = Path(args.workspace)
    PROFILES[args.profile_worker](
        workspace, workspace / "imports" / f"preferences-{rows_label(args.rows[0])}.jsonl", steps
    )
    print(json.dumps(steps.rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[10_000], help="preference rows (one run per value)")
    parser.add_argument(
        "--reward-until",
        choices=("end", "checkpoint"),
        default="end",
        help="end: the whole reward stage; checkpoint: stop it at its first checkpoint/progress event",
    )
    parser.add_argument("--workspace", help="scratch workspace (default: a new temporary folder); reused if it exists")
    parser.add_argument("--keep", action="store_true", help="keep the temporary workspace")
    parser.add_argument("--no-prepare-import", dest="prepare_import", action="store_false")
    parser.add_argument("--profile", action="store_true", help="profile the library calls step by step instead")
    parser.add_argument("--profiles", nargs="+", choices=list(PROFILES), default=list(PROFILES))
    parser.add_argument("--profile-worker", choices=list(PROFILES), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.profile_worker:
        profile_worker(args)
    elif args.profile:
        run_profile(args)
    else:
        run_scale(args)


if __name__ == "__main__":
    main()
