"""Labelling as a person does it: a paused `rlhf-human-labels` run answered in the Prefect UI, in a real browser.

The flow runs in a subprocess reporting to the session's `prefect server start` (tests/flows/conftest.py); Playwright
drives Debian's headless Chromium (tests/flows/browser.py) on the run's page, the one the flow's log links to
(`{ui}/runs/flow-run/{id}`, the V1 UI): Resume, the form, Submit. Batch 1's choices are clicked in their lists,
batch 2's made with the keys the form names. Screenshots of the filled forms are saved in $RLHF_TEST_ARTIFACTS (else
test-artifacts/ in the repository root) and their paths printed.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path

import httpx
import playwright.sync_api as playwright_api
import pytest
from browser import INSTALL_HINT, chromium_path, launch_chromium
from server_support import prefect_client_env, ui_root
from support import REPO
from test_labeling import expected_rows, make_labelling_repo, without_time

from flows.labeling import batch_description, pair_table, pending_pairs

BATCH_SIZE, N_PAIRS = 5, 9  # two batches: pairs 1–5 and 6–9 of the 9 in test_labeling.SAMPLES
PAUSE_TIMEOUT_S = 90  # the flow's subprocess imports Prefect and the project before pausing (≈ 10 s on 2 cores)
KEYS = {"A": ["ArrowDown", "Enter"], "B": ["ArrowDown", "ArrowDown", "Enter"], "skip": ["ArrowUp", "Enter"]}
FLOW_SCRIPT = """
import json, sys
from prefect import tags
from flows.labeling import collect_human_labels
with tags(sys.argv[1]):
    state = collect_human_labels(
        ".", batch_size=int(sys.argv[2]), n_batches=2, timeout_s=120, poll_interval_s=0.5, return_state=True
    )
print("RESULT " + json.dumps({"type": state.type.value, "value": state.result() if state.is_completed() else None}))
"""


def artifacts_dir(tmp_path: Path) -> Path:
    """$RLHF_TEST_ARTIFACTS, else test-artifacts/ in the repository (beside the other browser test's screenshot)."""
    folder = Path(os.environ.get("RLHF_TEST_ARTIFACTS") or REPO / "test-artifacts")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def wait_for_pause(api_url: str, tag: str, pause_key: str) -> dict:
    """The tagged run once paused under ``pause_key`` with its form (schema) stored, as the API returns it."""
    deadline = time.monotonic() + PAUSE_TIMEOUT_S
    while time.monotonic() < deadline:
        runs = httpx.post(
            f"{api_url}/flow_runs/filter",
            json={"flow_runs": {"tags": {"all_": [tag]}, "state": {"type": {"any_": ["PAUSED"]}}}},
            timeout=30,
        ).json()
        for run in runs:
            details = run["state"]["state_details"]
            keyset = details.get("run_input_keyset") or {}
            if details.get("pause_key") == pause_key and keyset:
                stored = httpx.get(f"{api_url}/flow_runs/{run['id']}/input/{keyset['schema']}", timeout=30)
                if stored.status_code == 200:
                    return run
        time.sleep(0.3)
    raise AssertionError(f"no run tagged {tag} paused with key {pause_key!r} within {PAUSE_TIMEOUT_S} s")


def open_form(page, url: str):
    """The run's page, Resume pressed: the dialog with the form."""
    page.goto(url)
    page.get_by_role("button", name="Resume", exact=True).click()
    dialog = page.get_by_role("dialog")
    playwright_api.expect(dialog.locator(".schema-form-property").first).to_be_visible(timeout=30_000)
    return dialog


def choice_field(dialog, title: str):
    """The form's field titled ``title`` (the UI adds " (Optional)" to a field with a default, e.g. a name given)."""
    label = dialog.page.locator(".schema-form-property__label").filter(
        has_text=re.compile(rf"^{re.escape(title)}( \(Optional\))?$")
    )
    return dialog.locator(".schema-form-property").filter(has=label)


def check_form(dialog, batch: list[dict], first: int, batch_number: int) -> None:
    """The form shows where the batch stands, and each pair beside its choice: prompt | A | B, side by side."""
    annotator = choice_field(dialog, "Annotator")
    last = first + len(batch) - 1
    playwright_api.expect(annotator).to_contain_text(f"Batch {batch_number} of 2 · pairs {first}–{last} of {N_PAIRS}")
    # The form's description (above the fields; a long form squeezes it out of sight) links the run's V1 page.
    link = dialog.locator("a.markdown-renderer__link").filter(has_text="the V1 UI")
    playwright_api.expect(link).to_have_attribute("href", dialog.page.url)
    titles = [
        title.removesuffix(" (Optional)") for title in dialog.locator(".schema-form-property__label").all_inner_texts()
    ]
    assert titles == ["Annotator"] + [f"Pair {n} of {N_PAIRS}" for n in range(first, last + 1)], titles
    for number, pair in enumerate(batch, start=first):
        table = choice_field(dialog, f"Pair {number} of {N_PAIRS}").locator("table")
        assert table.locator("th").all_inner_texts() == ["Prompt", "A", "B"]
        cells = table.locator("td")
        assert cells.all_inner_texts() == [pair[key].strip() for key in ("prompt", "response_a", "response_b")]
        boxes = [cells.nth(k).bounding_box() for k in range(3)]  # one row: same top (to a pixel), left to right
        assert max(box["y"] for box in boxes) - min(box["y"] for box in boxes) < 1, boxes
        assert (
            boxes[0]["x"] + boxes[0]["width"] <= boxes[1]["x"] + 1
            and boxes[1]["x"] + boxes[1]["width"] <= boxes[2]["x"] + 1
        )


def screenshot_whole_dialog(page, dialog, path: Path) -> Path:
    """A PNG of the dialog with all of its form in view (the window made as tall as the form needs)."""
    body_height = dialog.locator(".p-modal__body").evaluate("body => body.scrollHeight")
    width = page.viewport_size["width"]
    page.set_viewport_size({"width": width, "height": min(body_height + 250, 12_000)})
    page.wait_for_timeout(300)  # let the modal settle at the new size
    dialog.locator(".p-modal__card").screenshot(path=str(path))
    page.set_viewport_size({"width": width, "height": 1000})
    print(f"screenshot of the filled labelling form: {path}")
    return path


def test_the_form_shows_sampled_text_verbatim_never_as_markup() -> None:
    """Responses are model output: whatever they hold is shown as text, in the choices' HTML tables and in the
    description's Markdown table (which the V2 UI renders with raw HTML allowed)."""
    pair = {"prompt": "a | b <script>x()</script> *y* `z` [l](u) &amp;", "response_a": "one\ntwo", "response_b": ""}
    table = pair_table(pair)
    assert (
        "<script>" not in table and "<td>a | b &lt;script&gt;x()&lt;/script&gt; *y* `z` [l](u) &amp;amp;</td>" in table
    )
    assert "<td>one<br>two</td><td>—</td>" in table and "\n" not in table  # one line: the V1 UI joins lines
    row = batch_description([pair], "Batch 1 of 1 · pair 3 of 3", first=3).splitlines()[-3]
    assert row == r"| 3 | a \| b \<script\>x()\</script\> \*y\* \`z\` \[l\](u) \&amp; | one<br>two | — |"


@pytest.mark.slow
@pytest.mark.skipif(chromium_path() is None, reason=f"needs chromium: {INSTALL_HINT}")
def test_a_person_labels_two_batches_in_the_browser(prefect_server: str, tmp_path: Path) -> None:
    repo = make_labelling_repo(tmp_path / "repo")
    assert len(pending_pairs(repo, 100)) == N_PAIRS
    tag = f"browser-labelling-{uuid.uuid4().hex[:8]}"
    log = tmp_path / "flow.log"
    started = datetime.now(timezone.utc) - timedelta(seconds=1)
    with log.open("w") as output:
        flow = subprocess.Popen(
            [sys.executable, "-c", FLOW_SCRIPT, tag, str(BATCH_SIZE)],
            cwd=repo,
            env=prefect_client_env(prefect_server, tmp_path / "prefect-home"),
            stdout=output,
            stderr=subprocess.STDOUT,
        )
    artifacts = artifacts_dir(tmp_path)
    try:
        run = wait_for_pause(prefect_server, tag, "labels-batch-1")
        url = f"{ui_root(prefect_server)}/runs/flow-run/{run['id']}"
        with playwright_api.sync_playwright() as playwright:
            browser = launch_chromium(playwright)
            try:
                page = browser.new_page(viewport={"width": 1400, "height": 1000})
                page.set_default_timeout(30_000)

                # Batch 1: the name typed, each choice clicked in its list. (Space opens the list: a mouse click on
                # a V1 select, the page's own "Level" one too, opens and at once closes it in headless Chromium.)
                batch_1 = pending_pairs(repo, BATCH_SIZE)
                choices_1 = ["A", "B", "skip", "B", "A"]
                dialog = open_form(page, url)
                check_form(dialog, batch_1, first=1, batch_number=1)
                choice_field(dialog, "Annotator").locator("textarea").fill("carol")
                for number, choice in enumerate(choices_1, start=1):
                    select = choice_field(dialog, f"Pair {number} of {N_PAIRS}").locator(".p-select-button__control")
                    select.focus()
                    page.keyboard.press("Space")
                    page.get_by_role("option", name=choice, exact=True).click()
                    playwright_api.expect(select).to_have_text(choice)
                screenshot_whole_dialog(page, dialog, artifacts / "labelling-form-batch-1.png")
                dialog.get_by_role("button", name="Submit").click()
                playwright_api.expect(dialog).to_be_hidden()

                # Batch 2, keyboard only: the name is kept from batch 1; Tab Tab moves from one choice to the next.
                wait_for_pause(prefect_server, tag, "labels-batch-2")
                batch_2 = pending_pairs(repo, BATCH_SIZE, exclude={batch_1[2]["pair_id"]})
                choices_2 = ["B", "A", "A", "B"]
                dialog = open_form(page, url)
                check_form(dialog, batch_2, first=BATCH_SIZE + 1, batch_number=2)
                playwright_api.expect(choice_field(dialog, "Annotator").locator("textarea")).to_have_value("carol")
                selects = dialog.locator(".p-select-button__control")
                selects.first.focus()
                for key in KEYS["skip"]:  # a choice changed: skip first, then B
                    page.keyboard.press(key)
                playwright_api.expect(selects.first).to_have_text("skip")
                for k, choice in enumerate(choices_2):
                    if k:
                        page.keyboard.press("Tab")
                        page.keyboard.press("Tab")
                    for key in KEYS[choice]:
                        page.keyboard.press(key)
                    playwright_api.expect(selects.nth(k)).to_have_text(choice)
                screenshot_whole_dialog(page, dialog, artifacts / "labelling-form-batch-2.png")
                dialog.get_by_role("button", name="Submit").click()
                playwright_api.expect(dialog).to_be_hidden()
            finally:
                browser.close()
        flow.wait(timeout=90)
    finally:
        if flow.poll() is None:
            flow.kill()
            flow.wait()
    output = log.read_text()
    results = [line.removeprefix("RESULT ") for line in output.splitlines() if line.startswith("RESULT ")]
    assert flow.returncode == 0 and results, output[-4000:]
    outcome = json.loads(results[-1])
    labels_file = repo / "data/human_labels/labels.jsonl"
    assert outcome == {
        "type": "COMPLETED",
        "value": {"labelled": 8, "skipped": 1, "labels_file": str(labels_file)},
    }, output[-4000:]

    rows = [json.loads(line) for line in labels_file.read_text().splitlines()]
    assert without_time(rows) == expected_rows(batch_1, choices_1, "carol") + expected_rows(batch_2, choices_2, "carol")
    assert all(row["source"] == "human" for row in rows)
    for row in rows:
        labelled_at = datetime.fromisoformat(row["labelled_at"])
        assert labelled_at.utcoffset() == timedelta(0) and started <= labelled_at <= datetime.now(timezone.utc)
    # The pair skipped in batch 1 is all that is left for the next labelling run.
    assert [pair["pair_id"] for pair in pending_pairs(repo, 100)] == [batch_1[2]["pair_id"]]
