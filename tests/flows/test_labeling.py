"""Human-in-the-loop labelling: the flow pauses for a form, is resumed through the API, appends labels, continues.

The flow runs in a background thread (a paused run blocks its thread); the test plays the person, reading the
paused run's form from the API and resuming it, once with a raw ``POST /flow_runs/{id}/resume`` and once with
``prefect.flow_runs.resume_flow_run``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import threading
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import httpx
import yaml

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

from prefect import flow, task  # noqa: E402
from prefect.artifacts import Artifact  # noqa: E402
from prefect.client.orchestration import get_client  # noqa: E402
from prefect.client.schemas.filters import (  # noqa: E402
    FlowFilter,
    FlowFilterName,
    FlowRunFilter,
    FlowRunFilterState,
    FlowRunFilterStateType,
)
from prefect.client.schemas.objects import FlowRun, StateType  # noqa: E402
from prefect.flow_runs import resume_flow_run  # noqa: E402
from prefect.settings import PREFECT_API_URL  # noqa: E402
from support import REPO, stage_command  # noqa: E402

from flows.labeling import append_labels, collect_human_labels, pending_pairs, records_from_answers  # noqa: E402

FLOW_NAME = "rlhf-human-labels"
SAMPLES = [  # 3 prompts × 3 distinct responses = 9 pairs
    {"prompt_id": 0, "prompt": "the plot", "responses": [" was lovely .", " was dull .", " was very good ."]},
    {"prompt_id": 1, "prompt": "the music", "responses": [" was awful .", " was fine .", " was great ."]},
    {"prompt_id": 2, "prompt": "the acting", "responses": [" was bad .", " was superb .", " was okay ."]},
]


def make_labelling_repo(folder: Path) -> Path:
    """A folder with params.yaml (label.annotator: human) and sampled pairs: all the labelling flow needs."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["label"]["annotator"] = "human"
    folder.mkdir(parents=True)
    (folder / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (folder / "data/pairs").mkdir(parents=True)
    (folder / "data/pairs/samples.jsonl").write_text("".join(json.dumps(row) + "\n" for row in SAMPLES))
    shutil.copytree(REPO / "data/human_labels", folder / "data/human_labels")
    return folder


def in_background(function, *args, **kwargs) -> tuple[threading.Thread, dict]:
    """Start ``function`` in a daemon thread; its return value lands in the returned dict under "value"."""
    outcome: dict = {}

    def target() -> None:
        try:
            outcome["value"] = function(*args, **kwargs)
        except BaseException as error:  # surfaced by the test through outcome["error"]
            outcome["error"] = error

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread, outcome


def wait_for_form(pause_key: str, timeout_s: float = 30) -> tuple[FlowRun, dict, str]:
    """The labelling run paused under ``pause_key``, once its form is stored: (run, JSON schema, description)."""
    deadline = time.monotonic() + timeout_s
    with get_client(sync_client=True) as client:
        while time.monotonic() < deadline:
            runs = client.read_flow_runs(
                flow_filter=FlowFilter(name=FlowFilterName(any_=[FLOW_NAME])),
                flow_run_filter=FlowRunFilter(
                    state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.PAUSED]))
                ),
            )
            for run in runs:
                details = run.state.state_details
                if details.pause_key == pause_key and details.run_input_keyset:
                    try:  # the flow stores the form just after entering PAUSED
                        schema = json.loads(client.read_flow_run_input(run.id, details.run_input_keyset["schema"]))
                        description = json.loads(
                            client.read_flow_run_input(run.id, details.run_input_keyset["description"])
                        )
                    except Exception:
                        continue
                    return run, schema, description
            time.sleep(0.2)
    raise AssertionError(f"no {FLOW_NAME} run paused with key {pause_key!r} within {timeout_s} s")


def assert_form_shows(schema: dict, description: str, batch: list[dict], where: str) -> None:
    """The form for ``batch``: one A / B / skip choice per pair, each showing its pair (an HTML table: prompt, A, B),
    the whole batch in the description above the form; ``where``, the batch's place in the run, heading both."""
    assert set(schema["properties"]) == {"annotator"} | {f"pair_{k}" for k in range(1, len(batch) + 1)}
    assert schema["properties"]["annotator"]["description"].startswith(where + ".")
    assert description.startswith(f"### {where}\n")
    first = int(re.search(r"pairs? (\d+)", where).group(1))
    total = int(where.rsplit(" of ", 1)[1])
    for number, pair in enumerate(batch, start=1):
        field = schema["properties"][f"pair_{number}"]
        assert field["enum"] == ["A", "B", "skip"] and field["title"] == f"Pair {first + number - 1} of {total}"
        texts = [pair["prompt"].strip(), pair["response_a"].strip(), pair["response_b"].strip()]
        assert re.findall(r"<td>(.*?)</td>", field["description"]) == texts
        assert f"| {first + number - 1} | {' | '.join(texts)} |" in description


def expected_rows(batch: list[dict], choices: list[str], annotator: str) -> list[dict]:
    rows = []
    for pair, choice in zip(batch, choices):
        if choice != "skip":
            chosen, rejected = (pair["response_a"], pair["response_b"])[:: 1 if choice == "A" else -1]
            rows.append(
                {
                    "pair_id": pair["pair_id"],
                    "prompt": pair["prompt"],
                    "chosen": chosen,
                    "rejected": rejected,
                    "annotator": annotator,
                }
            )
    return rows


def label_lines(repo: Path) -> list[dict]:
    return [json.loads(line) for line in (repo / "data/human_labels/labels.jsonl").read_text().splitlines()]


def without_time(rows: list[dict]) -> list[dict]:
    return [{k: row[k] for k in ("pair_id", "prompt", "chosen", "rejected", "annotator")} for row in rows]


@task
def run_label_stage(repo_dir: str) -> dict:
    """The DVC `label` stage's program, as `dvc repro` would run it (cwd = the repository)."""
    subprocess.run(stage_command("label"), cwd=repo_dir, check=True, capture_output=True, timeout=120)
    return json.loads(Path(repo_dir, "metrics/label.json").read_text())


@flow
def label_then_label_stage(repo_dir: str) -> dict:
    """What the lifecycle does with `label.annotator: human`: the labelling subflow, then the label stage."""
    labelling = collect_human_labels(repo_dir, batch_size=4, n_batches=2, timeout_s=60, poll_interval_s=0.5)
    return {"labelling": labelling, "label_stage": run_label_stage(repo_dir)}


def test_paused_labelling_resumed_through_the_api_writes_labels_and_continues(prefect_api, tmp_path: Path) -> None:
    repo = make_labelling_repo(tmp_path / "repo")
    all_pair_ids = {p["pair_id"] for p in pending_pairs(repo, 9)}
    started = datetime.now(timezone.utc) - timedelta(seconds=1)
    thread, outcome = in_background(label_then_label_stage, str(repo), return_state=True)

    # Batch 1: four pairs; answered by a plain HTTP client, as the UI does.
    batch_1 = pending_pairs(repo, 4)
    run, schema, description = wait_for_form("labels-batch-1")
    assert_form_shows(schema, description, batch_1, "Batch 1 of 2 · pairs 1–4 of 8")
    assert schema["required"] == ["annotator", "pair_1", "pair_2", "pair_3", "pair_4"]
    choices_1 = ["A", "B", "skip", "A"]
    answers = {"annotator": "alice", **{f"pair_{k}": c for k, c in enumerate(choices_1, start=1)}}
    response = httpx.post(f"{PREFECT_API_URL.value()}/flow_runs/{run.id}/resume", json={"run_input": answers})
    assert response.status_code < 300 and response.json()["status"] == "ACCEPT", response.text

    # Batch 2: the next four pairs, neither the labelled ones nor the one skipped in batch 1.
    run_2, schema, description = wait_for_form("labels-batch-2")
    assert run_2.id == run.id
    batch_2 = pending_pairs(repo, 4, exclude={batch_1[2]["pair_id"]})
    assert not {p["pair_id"] for p in batch_2} & {p["pair_id"] for p in batch_1}
    assert_form_shows(schema, description, batch_2, "Batch 2 of 2 · pairs 5–8 of 8")
    assert schema["properties"]["annotator"]["default"] == "alice"  # the name given in batch 1, pre-filled
    choices_2 = ["B", "A", "A", "B"]
    resume_flow_run(
        run.id, run_input={"annotator": "alice", **{f"pair_{k}": c for k, c in enumerate(choices_2, start=1)}}
    )

    thread.join(timeout=60)
    assert not thread.is_alive() and "error" not in outcome, outcome
    state = outcome["value"]
    assert state.is_completed(), state
    result = state.result()
    assert result["labelling"]["labelled"] == 7 and result["labelling"]["skipped"] == 1

    rows = label_lines(repo)
    assert without_time(rows) == expected_rows(batch_1, choices_1, "alice") + expected_rows(batch_2, choices_2, "alice")
    assert all(row["source"] == "human" for row in rows)
    for row in rows:
        labelled_at = datetime.fromisoformat(row["labelled_at"])
        assert labelled_at.utcoffset() == timedelta(0) and started <= labelled_at <= datetime.now(timezone.utc)

    # The flow continued into the label stage, which built the preference splits from the human labels.
    assert result["label_stage"]["annotator"] == "human"
    preferences = [
        json.loads(line)
        for split in ("train", "eval")
        for line in (repo / f"data/preferences/{split}.jsonl").read_text().splitlines()
    ]
    assert result["label_stage"]["n_train"] > 0 and result["label_stage"]["n_eval"] > 0
    assert sorted(p["pair_id"] for p in preferences) == sorted(row["pair_id"] for row in rows)

    summary = Artifact.get("labelling")
    assert summary is not None and "| 1 | 4 | 3 | 1 |" in summary.data and "| 2 | 4 | 4 | 0 |" in summary.data

    # A second labelling run offers only what is left: the skipped pair and the one never offered.
    thread, outcome = in_background(
        collect_human_labels, str(repo), batch_size=8, timeout_s=60, annotator="bob", poll_interval_s=0.5
    )
    run_3, schema, description = wait_for_form("labels-batch-1")
    assert run_3.id != run.id
    remaining = pending_pairs(repo, 8)
    never_offered = all_pair_ids - {p["pair_id"] for p in batch_1 + batch_2}
    assert len(never_offered) == 1 and {p["pair_id"] for p in remaining} == never_offered | {batch_1[2]["pair_id"]}
    assert_form_shows(schema, description, remaining, "Batch 1 of 1 · pairs 1–2 of 2")
    assert schema["properties"]["annotator"]["default"] == "bob"
    resume_flow_run(run_3.id, run_input={"pair_1": "B", "pair_2": "A"})  # the pre-filled annotator is kept
    thread.join(timeout=60)
    assert outcome.get("value") == {
        "labelled": 2,
        "skipped": 0,
        "labels_file": str(repo / "data/human_labels/labels.jsonl"),
    }, outcome
    rows = label_lines(repo)
    assert len(rows) == 9 and len({row["pair_id"] for row in rows}) == 9 and rows[-1]["annotator"] == "bob"

    # Nothing left: the flow returns at once instead of pausing.
    assert collect_human_labels(str(repo), batch_size=8, timeout_s=5) == {
        "labelled": 0,
        "skipped": 0,
        "labels_file": str(repo / "data/human_labels/labels.jsonl"),
    }
    assert len(label_lines(repo)) == 9


def test_an_answer_given_twice_is_appended_once(tmp_path: Path) -> None:
    repo = make_labelling_repo(tmp_path / "repo")
    labels_file = repo / "data/human_labels/labels.jsonl"
    batch = pending_pairs(repo, 3)
    now = datetime.now(timezone.utc)
    first, _ = records_from_answers(batch, {"annotator": "alice", "pair_1": "A", "pair_2": "B", "pair_3": "skip"}, now)
    # The same pairs answered again (a second form for the same batch), the first one the other way round.
    again, _ = records_from_answers(batch, {"annotator": "bob", "pair_1": "B", "pair_2": "B", "pair_3": "A"}, now)
    assert append_labels(labels_file, first) == 2
    assert append_labels(labels_file, again) == 1  # only pair 3 is new
    rows = label_lines(repo)
    assert [(row["pair_id"], row["annotator"]) for row in rows] == [
        (batch[0]["pair_id"], "alice"),
        (batch[1]["pair_id"], "alice"),
        (batch[2]["pair_id"], "bob"),
    ]
    assert not {p["pair_id"] for p in pending_pairs(repo, 9)} & {row["pair_id"] for row in rows}


def test_a_label_counts_by_content_not_by_position(tmp_path: Path) -> None:
    """Resampled pairs reuse pair ids; a label on the old texts must not hide the new pair at the same position."""
    repo = make_labelling_repo(tmp_path / "repo")
    pair = pending_pairs(repo, 1)[0]
    records, _ = records_from_answers([pair], {"annotator": "alice", "pair_1": "A"}, datetime.now(timezone.utc))
    append_labels(repo / "data/human_labels/labels.jsonl", records)
    assert pair["pair_id"] not in {p["pair_id"] for p in pending_pairs(repo, 9)}
    resampled = [dict(SAMPLES[0], responses=[" was new .", " was newer .", " was newest ."]), *SAMPLES[1:]]
    (repo / "data/pairs/samples.jsonl").write_text("".join(json.dumps(row) + "\n" for row in resampled))
    assert pair["pair_id"] in {p["pair_id"] for p in pending_pairs(repo, 9)}
