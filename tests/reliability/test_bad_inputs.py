"""The bad-input corpus: every stage refuses a damaged input up front, with one clear message, touching nothing.

Each case starts from a copy of the fully built tiny workspace, damages one input, and runs the stage that reads it
as a real subprocess, with the command dvc.yaml gives (``python -m tasks.X``; ``accelerate launch … -m tasks.ppo``).
Checked for every case:
- the exit code is non-zero;
- stderr holds exactly one ``error:`` line, naming the file and the row/line/key, and a ``Fix:`` saying what to do
  (and no Python traceback other than the accelerate launcher's report of its child's exit code);
- the stage did no work: no event recorded but a ``failed`` one (no start, progress, checkpoint, metrics);
- every file and folder of the workspace (models, data, metrics, plots, checkpoints, …) is byte-identical.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import shutil
import subprocess
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from support import REPO, git_env, stage_command, write_params

from pipeline.workspace import stage_names
from rlhf import data
from rlhf.files import write_jsonl
from tasks.stage_io import EVENTS_DIR, events_file, read_events

# ------------------------------------------------------------------------------------------------------- helpers


def workspace_inventory(root: Path) -> dict[str, str]:
    """sha256 of every file and a marker for every folder under ``root`` (bytecode caches and the stages' own event
    logs aside)."""
    inventory = {}
    for path in sorted(root.rglob("*")):
        if "__pycache__" in path.parts or path.is_relative_to(root / EVENTS_DIR):
            continue
        relative = str(path.relative_to(root))
        inventory[relative] = "dir" if path.is_dir() else hashlib.sha256(path.read_bytes()).hexdigest()
    return inventory


def run_stage_process(stage: str, workspace: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        stage_command(stage, workspace), cwd=workspace, env=git_env(), capture_output=True, text=True, timeout=180
    )


def stage_events(workspace: Path, stage: str) -> set[str]:
    """The events the stage recorded (tasks/stage_io.py: its events file, removed before the run)."""
    return {record["event"] for record in read_events(stage, workspace)}


def edit_params(workspace: Path, section: str, **values: object) -> None:
    params = yaml.safe_load((workspace / "params.yaml").read_text())
    params[section].update(values)
    write_params(workspace, params)


def edit_rows(path: Path, change: Callable[[list[dict]], list[dict]]) -> None:
    write_jsonl(path, change(data.read_jsonl(path)))


def set_field(index: int, **values: object) -> Callable[[list[dict]], list[dict]]:
    def change(rows: list[dict]) -> list[dict]:
        rows[index] = {**rows[index], **values}
        return rows

    return change


# ------------------------------------------------------------------------------------------------------- damages


def empty_file(relative: str) -> Callable[[Path], None]:
    return lambda workspace: (workspace / relative).write_text("")


def break_line(relative: str, line_number: int) -> Callable[[Path], None]:
    def damage(workspace: Path) -> None:
        path = workspace / relative
        lines = path.read_text().splitlines()
        lines.insert(line_number - 1, '{"prompt": "the plot was", "response": ')  # cut off mid-object
        path.write_text("\n".join(lines) + "\n")

    return damage


def drop_field(relative: str, index: int, field: str) -> Callable[[Path], None]:
    def change(rows: list[dict]) -> list[dict]:
        del rows[index][field]
        return rows

    return lambda workspace: edit_rows(workspace / relative, change)


def chosen_equals_rejected(workspace: Path) -> None:
    edit_rows(workspace / "data/preferences/eval.jsonl", lambda rows: set_field(0, rejected=rows[0]["chosen"])(rows))


def overlong_prompt(workspace: Path) -> None:
    edit_rows(
        workspace / "data/prompts/train.jsonl",
        lambda rows: rows + [{"prompt": "the plot was lovely and " * 12 + "the plot was"}],
    )


def resized_tokenizer(folder: str) -> Callable[[Path], None]:
    """Save a tokenizer with 100 extra tokens into ``folder``: more ids than the model has embedding rows."""

    def damage(workspace: Path) -> None:
        from rlhf.modeling import load_tokenizer

        tokenizer = load_tokenizer(workspace / folder)
        tokenizer.add_tokens([f"<extra_{i}>" for i in range(100)])
        tokenizer.save_pretrained(workspace / folder)

    return damage


def empty_human_labels(workspace: Path) -> None:
    """Human annotation selected, but the labels file (a preferences file) is empty."""
    (workspace / "data/human_labels").mkdir(parents=True, exist_ok=True)
    (workspace / "data/human_labels/labels.jsonl").write_text("")
    edit_params(workspace, "label", annotator="human")


def on_two_processes(stage: str, damage: Callable[[Path], None]) -> Callable[[Path], None]:
    """``damage``, with ``stage`` launched on two processes (torchrun; configs/cpu-2proc.yaml)."""

    def both(workspace: Path) -> None:
        damage(workspace)
        edit_params(workspace, "launch", **{stage: {"config_file": "configs/cpu-2proc.yaml", "num_processes": 2}})

    return both


def params_change(section: str, **values: object) -> Callable[[Path], None]:
    return lambda workspace: edit_params(workspace, section, **values)


def remove(relative: str) -> Callable[[Path], None]:
    def damage(workspace: Path) -> None:
        path = workspace / relative
        shutil.rmtree(path) if path.is_dir() else path.unlink()

    return damage


NAN_ROW, NAN_RESPONSE = 5, 1


def nan_gold(workspace: Path) -> None:
    """A custom gold judge (label.gold) that returns NaN for one sampled response, the first time it occurs."""
    samples = data.read_jsonl(workspace / "data/pairs/samples.jsonl")
    target = [samples[NAN_ROW]["prompt"], samples[NAN_ROW]["responses"][NAN_RESPONSE]]
    # the labeller scores each distinct (prompt, response) once: make this the first row holding the pair
    assert all([r["prompt"], x] != target for r in samples[:NAN_ROW] for x in r["responses"])
    assert target[1] not in samples[NAN_ROW]["responses"][:NAN_RESPONSE]
    (workspace / "bad_gold.py").write_text(
        f"TARGET = {json.dumps(target)}\n\n\ndef judge(prompt, response):\n"
        "    return float('nan') if [prompt, response] == TARGET else len(response) / 10\n"
    )
    edit_params(workspace, "label", gold="bad_gold:judge")


# ---------------------------------------------------------------------------------------------------------- cases


@dataclass(frozen=True)
class Case:
    name: str
    stage: str  # the stage that reads the damaged input
    damage: Callable[[Path], None]
    expected: tuple[str, ...]  # substrings of the one error line: the file, the row/line/key, the problem, the fix


CASES = [
    Case(
        "empty prompts file",
        "sample_pairs",
        empty_file("data/prompts/train.jsonl"),
        ("data/prompts/train.jsonl: empty file", "dvc repro prepare"),
    ),
    Case(  # every rank refuses; rank 0 prints the line, and torchrun's agent adds nothing
        "empty prompts file on two processes",
        "ppo",
        on_two_processes("ppo", empty_file("data/prompts/train.jsonl")),
        ("data/prompts/train.jsonl: empty file", "dvc repro prepare"),
    ),
    Case(
        "empty preferences file",
        "label",
        empty_human_labels,
        ("data/human_labels/labels.jsonl: empty file", "rlhf label"),
    ),
    Case(
        "malformed JSONL line",
        "sft",
        break_line("data/sft/train.jsonl", 3),
        ("data/sft/train.jsonl: line 3: invalid JSON", "dvc repro prepare"),
    ),
    Case(
        "missing field",
        "label",
        drop_field("data/pairs/samples.jsonl", 2, "responses"),
        ("data/pairs/samples.jsonl: row 2: missing field 'responses'", "dvc repro sample_pairs"),
    ),
    Case(
        "prompt is a number",
        "evaluate",
        lambda ws: edit_rows(ws / "data/prompts/eval.jsonl", set_field(1, prompt=42)),
        ("data/prompts/eval.jsonl: row 1: field 'prompt' must be a string, got int", "dvc repro prepare"),
    ),
    Case(
        "param of the wrong type",
        "sft",
        params_change("sft", learning_rate="fast"),
        ("params.yaml: sft.learning_rate: expected float, got 'fast'", "Fix: correct that value in params.yaml"),
    ),
    Case(
        "chosen identical to rejected",
        "reward",
        chosen_equals_rejected,
        ("data/preferences/eval.jsonl: row 0: 'chosen' and 'rejected' are identical", "dvc repro label"),
    ),
    Case(
        "over-long prompt",
        "sample_pairs",
        overlong_prompt,
        (
            "data/prompts/train.jsonl: row 64: prompt (+ 24 response tokens) is",
            "more than the 40 the model allows",
            "dvc repro prepare",
        ),
    ),
    Case(
        "tokenizer larger than the model's embedding",
        "reward",
        resized_tokenizer("models/sft"),
        ("models/sft: the tokenizer has", "embedding has only", "does not belong to this model", "dvc repro sft"),
    ),
    Case(
        "reward model with a foreign tokenizer",
        "evaluate",
        resized_tokenizer("models/reward"),
        ("models/reward: its tokenizer differs from the one in models/policy", "tokens vs", "dvc repro reward"),
    ),
    Case(
        "missing model folder",
        "ppo",
        remove("models/reward"),
        ("models/reward: model folder not found", "dvc repro reward"),
    ),
    Case(
        "missing policy weights",
        "release",
        remove("models/policy/model.safetensors"),
        ("models/policy: incomplete model folder: missing model.safetensors", "dvc repro ppo"),
    ),
    Case(
        "batch not divisible by the minibatches",
        "ppo",
        params_change("ppo", rollout_batch_size=15),
        (
            "params.yaml: ppo.rollout_batch_size (15) must be divisible by ppo.num_minibatches (2)",
            "e.g. ppo.rollout_batch_size = 14 or 16",
        ),
    ),
    Case(
        "negative learning rate",
        "reward",
        params_change("reward", learning_rate=-0.001),
        ("params.yaml: reward.learning_rate must be > 0, got -0.001", "Fix: correct that value in params.yaml"),
    ),
    Case(
        "infinite label noise",
        "label",
        params_change("label", temperature=math.inf),
        ("params.yaml: label.temperature must be a finite number, got inf",),
    ),
    Case(
        "misspelt key in the ppo section stops the first stage",
        "prepare",
        params_change("ppo", learnig_rate=0.001),
        ("params.yaml: ppo: unknown key(s) ['learnig_rate']; did you mean 'learning_rate'?",),
    ),
    Case(
        "non-finite score from a custom annotator",
        "label",
        nan_gold,
        (
            f"data/pairs/samples.jsonl: row {NAN_ROW}: label.gold 'bad_gold:judge' returned nan "
            f"for responses[{NAN_RESPONSE}]",
            "Fix: make it return a finite number",
        ),
    ),
]


TEST_OF_EACH_CASE = "test_bad_input_is_refused_up_front_and_leaves_every_output_untouched"
STAGE_PROCESSES_AT_ONCE = 2  # a refused stage process mostly imports, on one core: CI's 2 cores run two at a time


class Refusals:
    """Each case's run: its own copy of the fully built workspace, damaged, its inventory, and the stage's process.

    ``refusals(case)`` → (workspace, inventory before the run, the process's future). On the first call every case
    this session runs is damaged in its own copy and its stage process started, STAGE_PROCESSES_AT_ONCE at a time in
    the background; each case's test then waits for its own process. The processes are independent (each in its own
    folder), and are the ones a case ran alone before: the same command, in the same damaged workspace.
    """

    def __init__(self, pipeline_workspace: Path, folders: pytest.TempPathFactory, selected: list[Case]) -> None:
        self.pipeline_workspace, self.folders, self.selected = pipeline_workspace, folders, selected
        self.pool = ThreadPoolExecutor(max_workers=STAGE_PROCESSES_AT_ONCE)
        self.runs: dict[str, tuple[Path, dict[str, str], Future]] = {}

    def start(self, case: Case) -> None:
        workspace = self.folders.mktemp("bad_input") / "workspace"
        shutil.copytree(self.pipeline_workspace, workspace)
        try:
            case.damage(workspace)
        except Exception as error:  # raised by this case's own test, not by the test that started every case
            failed: Future = Future()
            failed.set_exception(error)
            self.runs[case.name] = (workspace, {}, failed)
            return
        events_file(case.stage, workspace).unlink(missing_ok=True)  # the events of this run only
        before = workspace_inventory(workspace)
        self.runs[case.name] = (workspace, before, self.pool.submit(run_stage_process, case.stage, workspace))

    def __call__(self, case: Case) -> tuple[Path, dict[str, str], Future]:
        if not self.runs:
            for selected in self.selected:
                self.start(selected)
        if case.name not in self.runs:
            self.start(case)
        return self.runs[case.name]


@pytest.fixture(scope="module")
def refusals(pipeline_workspace: Path, tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest):
    selected = [
        item.callspec.params["case"]
        for item in request.session.items
        if getattr(item, "originalname", None) == TEST_OF_EACH_CASE and item.path == request.path
    ]
    refusals = Refusals(pipeline_workspace, tmp_path_factory, selected)
    yield refusals
    refusals.pool.shutdown(cancel_futures=True)


@pytest.mark.parametrize("case", CASES, ids=[case.name.replace(" ", "-") for case in CASES])
def test_bad_input_is_refused_up_front_and_leaves_every_output_untouched(case: Case, refusals: Refusals) -> None:
    workspace, before, process = refusals(case)
    result = process.result()
    assert result.returncode == 2, result.stdout + result.stderr  # refused input, through tasks/launch.py too
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.stderr
    message = errors[0]
    print(f"{case.name} ({case.stage}): {message}")  # shown with -rP: the corpus's messages at a glance
    for expected in case.expected:
        assert expected in message, message
    assert "Fix: " in message
    exceptions = re.findall(r"^([\w.]+(?:Error|Exception))\b", result.stderr, flags=re.MULTILINE)
    assert exceptions == [], result.stderr  # no traceback, not even accelerate's of its failed child
    others = [
        line for line in result.stderr.splitlines() if line.strip() and not line.startswith(("error: ", "launch: "))
    ]
    assert others == [], result.stderr  # nothing but our line (and the launcher's command): no torchrun agent report
    assert stage_events(workspace, case.stage) <= {
        "failed"
    }  # refused before any start/progress/metrics/checkpoint record
    assert workspace_inventory(workspace) == before


def test_the_corpus_covers_every_kind_of_damage_the_issue_names() -> None:
    assert len(CASES) >= 12
    assert {case.stage for case in CASES} == set(stage_names(REPO))  # every stage of dvc.yaml


# ------------------------------------------------------------------------------- the same checks, in process (fast)


@pytest.mark.parametrize(
    ("section", "values", "problem"),
    [
        ("sft", {"learning_rate": -0.001}, "sft.learning_rate must be > 0, got -0.001"),
        ("ppo", {"learning_rate": 0}, "ppo.learning_rate must be > 0, got 0.0"),
        ("sample_pairs", {"temperature": 0.0}, "sample_pairs.temperature must be > 0, got 0.0"),
        ("ppo", {"temperature": -1.0}, "ppo.temperature must be > 0, got -1.0"),
        ("evaluate", {"temperature": 0}, "evaluate.temperature must be > 0, got 0.0"),
        ("ppo", {"kl_coef": math.nan}, "ppo.kl_coef must be a finite number, got nan"),
        ("label", {"flip_prob": 1.5}, "label.flip_prob must be between 0 and 1, got 1.5"),
        ("ppo", {"gamma": 1.5}, "ppo.gamma must be ≤ 1, got 1.5"),
        ("reward", {"batch_size": 0}, "reward.batch_size must be > 0, got 0"),
        (
            "ppo",
            {"rollout_batch_size": 6, "launch": {"num_processes": 2}},
            "ppo.rollout_batch_size / 2 processes (3) must be divisible by ppo.num_minibatches (2)",
        ),
        ("launch", {"mixed_precision": "fp16"}, "launch.mixed_precision must be one of ['no', 'bf16'], got 'fp16'"),
        ("launch", {"sft": {"num_processes": 0}}, "launch.sft.num_processes must be ≥ 1 or null, got 0"),
        ("launch", {"stall_timeout_s": -1}, "launch.stall_timeout_s must be ≥ 0 seconds (0 = never stop a silent"),
        ("ppo", {"gradient_accumulation_steps": 3}, "must be divisible by ppo.gradient_accumulation_steps (3)"),
        (
            "prepare",
            {"model": {"n_layer": 2, "n_head": 3, "n_embd": 32, "n_positions": 64}},
            "prepare.model.n_embd (32) must be divisible by prepare.model.n_head (3)",
        ),
        ("label", {"annotator": "oracle"}, "label.annotator must be simulated, dataset or human, got 'oracle'"),
    ],
)
def test_invalid_params_are_refused_naming_the_key_and_the_fix(
    tmp_path: Path, section: str, values: dict, problem: str
) -> None:
    from support import tiny_params

    from rlhf.config import ConfigError
    from rlhf.params import load_params
    from rlhf.validation import with_fix

    params = tiny_params()
    params["launch"]["ppo"].update(values.pop("launch", {}) if section == "ppo" else {})  # ppo's own launch override
    params[section].update(values)
    write_params(tmp_path, params)
    with pytest.raises(ConfigError) as refusal:
        load_params(tmp_path / "params.yaml")
    message = with_fix(str(refusal.value))
    assert message.startswith(f"{tmp_path / 'params.yaml'}: ") and problem in message, message
    assert message.endswith("Fix: correct that value in params.yaml (every field is documented in rlhf/config.py).")


def test_a_custom_score_must_be_a_finite_number() -> None:
    from rlhf.data import DataError
    from rlhf.validation import finite_scores

    samples = [{"prompt": "p", "responses": ["a", "b"]}, {"prompt": "q", "responses": ["c", "d", "c"]}]
    calls: list[tuple[str, str]] = []

    def judge(prompt: str, response: str) -> float:
        calls.append((prompt, response))
        return {"a": 1, "b": 2.5, "c": -1.0, "d": 0}[response]

    lookup = finite_scores(judge, samples, "samples.jsonl", "label.gold 'm:judge'")
    assert [lookup("p", "a"), lookup("p", "b"), lookup("q", "c"), lookup("q", "d")] == [1.0, 2.5, -1.0, 0.0]
    assert calls == [("p", "a"), ("p", "b"), ("q", "c"), ("q", "d")]  # each distinct pair scored once, in order
    for bad, shown in (
        (math.inf, "inf"),
        (-math.inf, "-inf"),
        ("high", "a str ('high'), not a number"),
        (None, "a NoneType"),
    ):
        with pytest.raises(
            DataError,
            match=(
                rf"^samples\.jsonl: row 1: label\.gold 'm:judge' returned {re.escape(shown)}.* "
                r"for responses\[1\] 'd'"
            ),
        ):
            finite_scores(
                lambda prompt, response, bad=bad: bad if response == "d" else 0.0,
                samples,
                "samples.jsonl",
                "label.gold 'm:judge'",
            )
