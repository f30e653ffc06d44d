"""Flow `rlhf-human-labels`: people label preference pairs in the Prefect UI.

    rlhf label --batch-size 8 --batches 3      # then open the paused run in the UI and press "Resume"

Each batch of pending pairs (from ``data/pairs/samples.jsonl``) pauses the flow run with an input form
(``pause_flow_run(wait_for_input=…)``): the person's id plus one A / B / skip choice per pair, the prompt and both
responses shown beside each choice. Resuming the run (the UI's Resume form, ``prefect.flow_runs.resume_flow_run``
or ``POST /api/flow_runs/{id}/resume`` with ``{"run_input": {...}}``) hands the answers back; each answered pair
becomes one line of the labels file (``label.labels_file``):

    {"prompt", "chosen", "rejected", "annotator", "labelled_at" (UTC ISO 8601), "pair_id", "source": "human"}

"skip" writes nothing: the pair is offered again by the next labelling run (not by a later batch of this run).
The labels file lives in ``data/human_labels/``, a dependency of the DVC `label` stage, so new labels make the next
`dvc repro` relabel and retrain; commit the file to git (DVC records its hash in dvc.lock).

In the browser: the run's log links its page (``View at {ui}/runs/flow-run/{id}``, Prefect's V1 UI), which has a
Resume button beside the run's name. The form says where the batch stands ("Batch 2 of 3 · pairs 9–16 of 24") and
which keys answer it, numbers the choices through the run ("Pair 9 of 24") and shows each pair above its choice as a
table, prompt | A | B side by side; the name is pre-filled from the batch before. Keys on a choice: ↓ Enter = A,
↓ ↓ Enter = B, ↑ Enter = skip, Tab Tab = the next pair. The V2 UI (``{ui}/v2/runs/flow-run/{id}``, where the
server's start page leads; Resume is in the run's ⋮ menu) shows the batch as one table above the form and each
choice's table as HTML source (it does not render field descriptions); there Enter, then a, b or s, Enter answers.
tests/flows/test_labeling_browser.py labels two batches in the V1 UI with headless Chromium.
"""

from __future__ import annotations

import fcntl
import hashlib
import html
import json
import os
from collections.abc import Collection, Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.flow_runs import pause_flow_run
from prefect.input import RunInput
from prefect.runtime import flow_run
from prefect.utilities.urls import url_for
from pydantic import Field, create_model

from rlhf import data
from rlhf.annotators import pairs_from_samples
from rlhf.params import load_params

SAMPLES = Path("data/pairs/samples.jsonl")
LABELLING_ARTIFACT_KEY = "labelling"
Choice = Literal["A", "B", "skip"]
PairKey = tuple[str, frozenset[str]]  # (prompt, {response, response}): what a label is about, in any order


def labels_path(repo_dir: str | Path) -> Path:
    """The labels file named by ``label.labels_file`` in the repository's params.yaml."""
    return Path(repo_dir, load_params(Path(repo_dir, "params.yaml")).label.labels_file)


def pair_key(prompt: str, first: str, second: str) -> PairKey:
    return prompt, frozenset((first, second))


def labelled_pairs(labels_file: Path) -> set[PairKey]:
    """The pairs the labels file already holds a preference for (none if it does not exist yet).

    Judged by content, not by ``pair_id``: pair ids are positions in the samples file, which the `sample_pairs`
    stage rewrites whenever the SFT model changes, and an old label must not hide a new pair at the same position.
    """
    if not labels_file.exists():
        return set()
    rows = data.read_jsonl(labels_file)
    data.validate_preferences(rows, str(labels_file))
    return {pair_key(row["prompt"], row["chosen"], row["rejected"]) for row in rows}


def _show_swapped(pair_id: str, prompt: str) -> bool:
    """Whether to show the later sample as A: half the pairs, fixed per pair, so position bias cancels out."""
    return hashlib.sha256(f"{pair_id}\0{prompt}".encode()).digest()[0] % 2 == 1


def pending_pairs(repo_dir: str | Path, batch_size: int, exclude: Collection[str] = ()) -> list[dict]:
    """Up to ``batch_size`` unlabelled pairs, in samples-file order: {pair_id, prompt, response_a, response_b}.

    ``pair_id`` is ``"{prompt_id}:{i}:{j}"`` with i < j the positions of the two responses in the sample row;
    pairs whose id is in ``exclude`` (skipped earlier in this run) are left out too.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    samples_file = Path(repo_dir, SAMPLES)
    rows = data.read_jsonl(samples_file)
    data.validate_samples(rows, str(samples_file))
    done = labelled_pairs(labels_path(repo_dir))
    pending: list[dict] = []
    for row in rows:
        prompt, responses = row["prompt"], row["responses"]
        for first, second in pairs_from_samples(prompt, responses):
            pair_id = f"{row['prompt_id']}:{responses.index(first)}:{responses.index(second)}"
            if pair_id in exclude or pair_key(prompt, first, second) in done:
                continue
            a, b = (second, first) if _show_swapped(pair_id, prompt) else (first, second)
            pending.append({"pair_id": pair_id, "prompt": prompt, "response_a": a, "response_b": b})
            if len(pending) == batch_size:
                return pending
    return pending


# The Prefect UI renders a paused run's form in one of two ways, from the same stored schema and description:
# - V1 (the run page the flow's log links to, `{ui}/runs/flow-run/{id}`, Resume beside the run's name): each
#   field's description as Markdown with its single line breaks joined into spaces (Markdown tables cannot survive
#   that; one line of HTML can: its sanitizer keeps tables and `class`); the form's description above the fields,
#   squeezed to nothing once the form is taller than the window.
# - V2 (`{ui}/v2/runs/flow-run/{id}`, Resume in the run's ⋮ menu; the server's default for `/`): the form's
#   description as GitHub Markdown above the fields, in full; each field's description as plain text.
# So each choice carries its pair as an HTML table (V1), the form's description carries all the batch's pairs as a
# Markdown table (V2), and the instructions live in the first field's description, in plain words both can show.
_MD_SPECIALS = str.maketrans({c: "\\" + c for c in "\\`*_[]<>|~&"})

# V1 stylesheet utility classes (Tailwind: its reset leaves a bare table without borders); `overflow-wrap` is
# inherited, so `break-words` on the table breaks long words in every cell.
_TABLE_ATTRS = 'cellpadding="8" class="w-full table-fixed text-sm break-words border border-divider"'


def _html_cell(text: str) -> str:
    """``text`` as HTML table cell content: escaped, line breaks kept as ``<br>``, an empty text as an em dash."""
    return "<br>".join(html.escape(line) for line in text.strip().splitlines()) or "—"


def _markdown_cell(text: str) -> str:
    """``text`` as literal GitHub Markdown table cell content: whatever could start an inline construct (emphasis,
    code, link, HTML, entity) or end the cell backslash-escaped, line breaks as ``<br>``, empty as an em dash."""
    return "<br>".join(line.strip().translate(_MD_SPECIALS) for line in text.strip().splitlines()) or "—"


def pair_table(pair: Mapping[str, str]) -> str:
    """One pair as a single line of HTML: a table of the prompt and responses A and B side by side."""
    cells = "".join(f"<td>{_html_cell(pair[key])}</td>" for key in ("prompt", "response_a", "response_b"))
    return (
        f'<table {_TABLE_ATTRS}><thead class="border-b border-divider"><tr align="left"><th>Prompt</th><th>A</th>'
        f'<th>B</th></tr></thead><tbody><tr valign="top">{cells}</tr></tbody></table>'
    )


def progress(n_pairs: int, batch_number: int = 1, n_batches: int = 1, first: int = 1, total: int = 0) -> str:
    """Where a batch of ``n_pairs`` stands in its run, e.g. "Batch 2 of 3 · pairs 9–16 of 24"."""
    last = first + n_pairs - 1
    pairs = f"pair {first}" if n_pairs == 1 else f"pairs {first}–{last}"
    return f"Batch {batch_number} of {max(n_batches, batch_number)} · {pairs} of {max(total, last)}"


def instructions(where: str) -> str:
    """The first field's description: where the batch stands, how to answer, which keys do it (plain words: the V2
    UI shows it as plain text, the V1 UI as Markdown)."""
    return (
        f"{where}. For each pair choose A or B, whichever response answers the prompt better, or skip if you cannot "
        "tell (a skipped pair comes back in the next labelling run), then Submit."
        "\n\nKeys, on a choice: ↓ Enter = A, ↓ ↓ Enter = B, ↑ Enter = skip, Tab Tab = next pair "
        "(V2 UI: Enter, then a, b or s, Enter)."
        "\n\nYour name or id, recorded with every label you give:"
    )


def batch_description(batch: Sequence[Mapping[str, str]], where: str, first: int = 1, run_url: str = "") -> str:
    """The Markdown above the form: the batch's place in the run and all its pairs, one table row each.

    What the V2 UI shows of the pairs (its fields' descriptions are plain text); the V1 UI shows each pair beside
    its choice instead, at ``run_url``, the run's V1 page.
    """
    rows = [
        f"| {first + k} | {_markdown_cell(p['prompt'])} | {_markdown_cell(p['response_a'])} | "
        f"{_markdown_cell(p['response_b'])} |"
        for k, p in enumerate(batch)
    ]
    v1 = f"[the V1 UI]({run_url})" if run_url else "the V1 UI"
    return "\n\n".join(
        [
            f"### {where}",
            "\n".join(["| Pair | Prompt | A | B |", "|---|---|---|---|", *rows]),
            f"Each choice below repeats its pair as an HTML table, which {v1} draws beside the choice.",
        ]
    )


def batch_input_model(
    batch: Sequence[Mapping[str, str]],
    annotator: str = "",
    *,
    batch_number: int = 1,
    n_batches: int = 1,
    first: int = 1,
    total: int = 0,
    run_url: str = "",
) -> type[RunInput]:
    """The form for one batch: ``annotator`` plus ``pair_1 … pair_k``, each A / B / skip.

    The choices are numbered through the run ("Pair 9 of 24": ``first`` is the number of the batch's first pair,
    ``total`` how many pairs the run offers, in ``n_batches`` batches) and each shows its pair, the prompt and both
    responses side by side, so the form needs nothing else to be answered; the first field says where the batch
    stands and how to answer. ``run_url``: the run's page in the UI, linked from the form's description.
    """
    total = max(total, first + len(batch) - 1)
    where = progress(len(batch), batch_number, n_batches, first, total)
    fields: dict[str, Any] = {
        "annotator": (
            str,
            Field(
                default=annotator or ...,
                min_length=1,
                pattern=r"\S",
                title="Annotator",
                description=instructions(where),
                json_schema_extra={"position": 0},
            ),
        )
    }
    for number, pair in enumerate(batch, start=1):
        fields[f"pair_{number}"] = (
            Choice,
            Field(
                title=f"Pair {first + number - 1} of {total}",
                description=pair_table(pair),
                json_schema_extra={"position": number},
            ),
        )
    model = create_model("PreferenceBatch", __base__=RunInput, **fields)
    model._description = batch_description(batch, where, first, run_url)  # above the form (RunInput.save stores it)
    return model


def records_from_answers(
    batch: Sequence[Mapping[str, str]], answers: Mapping[str, Any], labelled_at: datetime
) -> tuple[list[dict], list[str]]:
    """(label rows for the answered pairs, pair ids skipped) from one submitted form."""
    annotator = str(answers["annotator"]).strip()
    records, skipped = [], []
    for number, pair in enumerate(batch, start=1):
        choice = answers[f"pair_{number}"]
        if choice == "skip":
            skipped.append(pair["pair_id"])
            continue
        chosen, rejected = (
            (pair["response_a"], pair["response_b"]) if choice == "A" else (pair["response_b"], pair["response_a"])
        )
        records.append(
            {
                "prompt": pair["prompt"],
                "chosen": chosen,
                "rejected": rejected,
                "annotator": annotator,
                "labelled_at": labelled_at.astimezone(timezone.utc).isoformat(timespec="seconds"),
                "pair_id": pair["pair_id"],
                "source": "human",
            }
        )
    return records, skipped


def append_labels(labels_file: Path, records: Sequence[Mapping[str, Any]]) -> int:
    """Append the records whose pair the file does not already hold; returns how many were written.

    An exclusive lock on the file makes the check-then-append atomic between concurrent labelling runs (two people
    answering the same batch: the first answer wins), and the write is flushed and fsynced before the lock goes.
    """
    if not records:
        return 0  # e.g. a batch all skipped: never create an empty labels file
    labels_file.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(labels_file, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o666)
    with open(fd, "r+", encoding="utf-8") as file:
        fcntl.flock(file.fileno(), fcntl.LOCK_EX)  # released when the file closes
        done = labelled_pairs(labels_file)
        size = os.fstat(file.fileno()).st_size
        ends_with_newline = size == 0 or os.pread(file.fileno(), 1, size - 1) == b"\n"
        lines = []
        for record in records:
            key = pair_key(record["prompt"], record["chosen"], record["rejected"])
            if key not in done:
                done.add(key)
                lines.append(json.dumps(record, ensure_ascii=False) + "\n")
        if lines:
            separator = "" if ends_with_newline else "\n"  # after a hand edit that left no final newline
            file.write(separator + "".join(lines))
            file.flush()
            os.fsync(file.fileno())
    return len(lines)


def summary_markdown(batches: Sequence[Mapping[str, int]], labels_file: Path, n_in_file: int, n_pending: int) -> str:
    lines = ["# Human preference labels", "", "| batch | offered | labelled | skipped |", "|---|---|---|---|"]
    lines += [f"| {b['batch']} | {b['offered']} | {b['labelled']} | {b['skipped']} |" for b in batches]
    lines += [
        "",
        f"- labels in `{labels_file}`: **{n_in_file}**",
        f"- pairs still unlabelled: **{n_pending}**",
        "",
        "The `label` stage reads this file when `label.annotator: human`; commit it so `dvc repro` can reproduce.",
    ]
    return "\n".join(lines)


@flow(name="rlhf-human-labels")
def collect_human_labels(
    repo_dir: str = ".",
    batch_size: int = 8,
    n_batches: int = 1,
    timeout_s: int = 3600,
    annotator: str = "",
    poll_interval_s: float = 10,
) -> dict:
    """Ask people for preferences on up to ``n_batches`` batches of pending pairs, pausing the run for each.

    ``timeout_s``: how long each batch waits to be answered before the run fails (labels of earlier batches are
    kept). ``annotator``: pre-filled in the first form (each later form: the name given in the one before).
    ``poll_interval_s``: how often the paused run checks for Resume. Returns {"labelled", "skipped", "labels_file"}.
    """
    logger = get_run_logger()
    repo = Path(repo_dir).resolve()
    labels_file = labels_path(repo)
    skipped_ids: set[str] = set()
    batches: list[dict[str, int]] = []
    # For the form's progress line ("batch 2 of 3 · pairs 9–16 of 24"): what this run will offer, as of now.
    size = max(batch_size, 1)  # a batch_size < 1 is refused by pending_pairs below
    total = min(len(pending_pairs(repo, batch_size=1 << 62)), size * max(n_batches, 0))
    planned_batches = -(-total // size)
    offered = 0
    for number in range(1, n_batches + 1):
        batch = pending_pairs(repo, batch_size, exclude=skipped_ids)
        if not batch:
            logger.info("no unlabelled pairs left in %s", SAMPLES)
            break
        planned_batches = max(planned_batches, number)
        logger.info(
            "batch %d/%d: %d pairs wait for labels; answer the form of this paused run (Resume)",
            number,
            planned_batches,
            len(batch),
        )
        form = batch_input_model(
            batch,
            annotator,
            batch_number=number,
            n_batches=planned_batches,
            first=offered + 1,
            total=total,
            run_url=url_for("flow-run", obj_id=flow_run.id) or "",  # its V1 page, as the run's log links to
        )
        offered += len(batch)
        answers = pause_flow_run(
            wait_for_input=form, timeout=timeout_s, poll_interval=poll_interval_s, key=f"labels-batch-{number}"
        )
        answered = answers.model_dump()
        records, skipped = records_from_answers(batch, answered, datetime.now(timezone.utc))
        annotator = str(answered["annotator"]).strip()  # pre-filled in the next batch's form: enter it once a run
        written = append_labels(labels_file, records)
        skipped_ids.update(skipped)
        batches.append({"batch": number, "offered": len(batch), "labelled": written, "skipped": len(skipped)})
        logger.info("batch %d: %d labels appended to %s, %d skipped", number, written, labels_file, len(skipped))
    n_in_file = len(data.read_jsonl(labels_file)) if labels_file.exists() else 0
    n_pending = len(pending_pairs(repo, batch_size=1 << 62))
    create_markdown_artifact(
        markdown=summary_markdown(batches, labels_file, n_in_file, n_pending),
        key=LABELLING_ARTIFACT_KEY,
        description="human preference labelling: counts",
    )
    return {
        "labelled": sum(b["labelled"] for b in batches),
        "skipped": sum(b["skipped"] for b in batches),
        "labels_file": str(labels_file),
    }
