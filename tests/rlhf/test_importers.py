"""Tests for rlhf.importers: small files in the real public schemas, written to tmp_path (no Hub access)."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import pytest

from rlhf.data import DataError, validate_preferences
from rlhf.files import write_jsonl
from rlhf.importers import (
    detect_preference_schema,
    load_table,
    render_messages,
    renderer_for,
    to_demonstrations,
    to_preference_records,
    to_prompts,
)

# Anthropic/hh-rlhf: full transcripts; chosen and rejected share everything up to the last assistant turn.
HH_PROMPT = (
    "\n\nHuman: How do I bake bread?\n\nAssistant: What kind of bread?\n\nHuman: Sourdough, please.\n\nAssistant:"
)
HH_ROWS = [
    {"chosen": HH_PROMPT + " Start with an active starter.", "rejected": HH_PROMPT + " I don't know."},
    {
        "chosen": "\n\nHuman: Is the sky blue?\n\nAssistant: Yes, on a clear day.",
        "rejected": "\n\nHuman: Is the sky blue?\n\nAssistant: No.",
    },
]


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict:
    return {"role": "assistant", "content": text}


# HuggingFaceH4/ultrafeedback_binarized: prompt string, chosen/rejected conversations, messages, scores.
ULTRAFEEDBACK_ROWS = [
    {
        "prompt": "Is the sky blue?",
        "prompt_id": "a1",
        "chosen": [user("Is the sky blue?"), assistant("Yes, on a clear day.")],
        "rejected": [user("Is the sky blue?"), assistant("No.")],
        "messages": [user("Is the sky blue?"), assistant("Yes, on a clear day.")],
        "score_chosen": 8.0,
        "score_rejected": 3.5,
    },
    {
        "prompt": "Name a prime.",
        "prompt_id": "b2",
        "chosen": [user("Name a prime."), assistant("7")],
        "rejected": [user("Name a prime."), assistant("8")],
        "messages": [user("Name a prime."), assistant("7")],
        "score_chosen": 9.0,
        "score_rejected": 1.0,
    },
]


# ------------------------------------------------------------------------------------- conversations


def test_render_messages_hh_style() -> None:
    messages = [{"role": "system", "content": "Be brief."}, user("Hi"), assistant("Hello."), user("Bye")]
    assert render_messages(messages) == "Be brief.\n\nHuman: Hi\n\nAssistant: Hello.\n\nHuman: Bye"
    assert render_messages([user("Hi")], add_generation_prompt=True) == "\n\nHuman: Hi\n\nAssistant:"
    with pytest.raises(DataError, match=r"unknown role 'tool'"):
        render_messages([user("Hi"), {"role": "tool", "content": "{}"}])


def test_renderer_for_uses_the_chat_template(tiny_tokenizer) -> None:
    assert renderer_for(tiny_tokenizer) is render_messages  # no template
    tiny_tokenizer.chat_template = (
        "{% for m in messages %}<{{ m.role }}>{{ m.content }}</s>{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    # "</s>" is plain text here: no end-of-turn token, so the response keeps everything the final turn adds
    records, _ = to_preference_records(ULTRAFEEDBACK_ROWS[:1], "uf", render=renderer_for(tiny_tokenizer))
    assert records == [
        {"prompt": "<user>Is the sky blue?</s><assistant>", "chosen": "Yes, on a clear day.</s>", "rejected": "No.</s>"}
    ]
    # as a special token "</s>" ends the turn: the response stops before it, since the pipeline appends it as EOS
    tiny_tokenizer.add_special_tokens({"eos_token": "</s>"})
    records, _ = to_preference_records(ULTRAFEEDBACK_ROWS[:1], "uf", render=renderer_for(tiny_tokenizer))
    assert records == [
        {"prompt": "<user>Is the sky blue?</s><assistant>", "chosen": "Yes, on a clear day.", "rejected": "No."}
    ]


# --------------------------------------------------------------------------------------- importers


def test_hh_rlhf_jsonl_to_preferences(tmp_path: Path) -> None:
    path = tmp_path / "hh.jsonl"
    write_jsonl(path, HH_ROWS)
    rows = load_table(str(path))
    assert detect_preference_schema(rows[0].keys(), rows[0]) == "hh_rlhf"
    records, dropped = to_preference_records(rows, str(path))
    assert dropped == 0
    assert records[0] == {"prompt": HH_PROMPT, "chosen": " Start with an active starter.", "rejected": " I don't know."}
    assert records[1] == {
        "prompt": "\n\nHuman: Is the sky blue?\n\nAssistant:",
        "chosen": " Yes, on a clear day.",
        "rejected": " No.",
    }
    validate_preferences(records, str(path))


@pytest.mark.parametrize("suffix", [".parquet", ".jsonl"])
def test_ultrafeedback_binarized_to_preferences(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"ultrafeedback{suffix}"
    if suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(ULTRAFEEDBACK_ROWS), path)
    else:
        write_jsonl(path, ULTRAFEEDBACK_ROWS)
    rows = load_table(str(path))
    assert rows[0]["chosen"] == ULTRAFEEDBACK_ROWS[0]["chosen"]
    assert detect_preference_schema(rows[0].keys(), rows[0]) == "conversational"
    records, dropped = to_preference_records(rows, str(path))
    assert dropped == 0
    # the same conversation as the hh-rlhf row gives exactly the same record
    hh_records, _ = to_preference_records(HH_ROWS[1:], "hh")
    assert records[0] == hh_records[0]
    assert records[1] == {"prompt": "\n\nHuman: Name a prime.\n\nAssistant:", "chosen": " 7", "rejected": " 8"}


def test_conversational_with_separate_prompt_messages() -> None:
    # TRL's conversational preference format: prompt and answers as separate message lists
    rows = [{"prompt": [user("Name a prime.")], "chosen": [assistant("7")], "rejected": [assistant("8")]}]
    records, _ = to_preference_records(rows, "trl")
    assert records == [{"prompt": "\n\nHuman: Name a prime.\n\nAssistant:", "chosen": " 7", "rejected": " 8"}]


def test_prompt_chosen_rejected_csv(tmp_path: Path) -> None:
    path = tmp_path / "pairs.csv"
    with path.open("w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=["prompt", "chosen", "rejected"])
        writer.writeheader()
        writer.writerow({"prompt": "The plot was", "chosen": " great, with a twist.", "rejected": " bad, I left."})
    rows = load_table(str(path))
    assert detect_preference_schema(rows[0].keys(), rows[0]) == "prompt_chosen_rejected"
    records, _ = to_preference_records(rows, str(path))
    assert records == [{"prompt": "The plot was", "chosen": " great, with a twist.", "rejected": " bad, I left."}]


def test_local_directory_of_jsonl_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")  # keep the user's cache clean
    folder = tmp_path / "hh"
    write_jsonl(folder / "part-0.jsonl", HH_ROWS[:1])
    write_jsonl(folder / "part-1.jsonl", HH_ROWS[1:])
    rows = load_table(str(folder))
    assert sorted(rows, key=lambda row: row["chosen"]) == sorted(HH_ROWS, key=lambda row: row["chosen"])
    assert load_table(str(folder), data_files="part-1.jsonl") == HH_ROWS[1:]


def test_hub_ids_go_to_datasets_and_failures_name_the_source(monkeypatch: pytest.MonkeyPatch) -> None:
    datasets = pytest.importorskip("datasets")
    calls = []

    def fake_load_dataset(source, split, data_files):
        calls.append((source, split, data_files))
        if source == "owner/missing":
            raise FileNotFoundError("Dataset 'owner/missing' doesn't exist on the Hub")
        return datasets.Dataset.from_list(HH_ROWS)

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    assert load_table("Anthropic/hh-rlhf", split="test") == HH_ROWS
    assert calls == [("Anthropic/hh-rlhf", "test", None)]
    with pytest.raises(DataError, match=r"^owner/missing: cannot load dataset .*doesn't exist"):
        load_table("owner/missing")


def test_load_table_errors(tmp_path: Path) -> None:
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(DataError, match=rf"^{re.escape(str(empty))}: no rows$"):
        load_table(str(empty))
    with pytest.raises(DataError, match=r"nope\.jsonl: no such file or directory"):
        load_table(str(tmp_path / "nope.jsonl"))
    with pytest.raises(DataError, match=r"unsupported file type '\.txt'"):
        (tmp_path / "a.txt").write_text("x")
        load_table(str(tmp_path / "a.txt"))
    listed = tmp_path / "list.json"
    listed.write_text(json.dumps([{"prompt": "a"}]))
    assert load_table(str(listed)) == [{"prompt": "a"}]


def test_missing_column_names_file_and_column(tmp_path: Path) -> None:
    path = tmp_path / "pairs.csv"
    path.write_text("prompt,chosen\nThe plot was, good\n")
    rows = load_table(str(path))
    expected = rf"^{re.escape(str(path))}: missing column 'rejected' \(columns found: chosen, prompt\)"
    with pytest.raises(DataError, match=expected):
        to_preference_records(rows, str(path))


def test_wrong_types_name_the_row() -> None:
    rows = [HH_ROWS[0], {"chosen": HH_ROWS[1]["chosen"], "rejected": None}]
    with pytest.raises(DataError, match=r"^hh: row 1: field 'rejected' must be a string transcript, got NoneType$"):
        to_preference_records(rows, "hh")
    bad_role = [{**ULTRAFEEDBACK_ROWS[0], "rejected": [{"role": "bot", "content": "No."}]}]
    with pytest.raises(DataError, match=r"^uf: row 0: message 0 has unknown role 'bot'"):
        to_preference_records(bad_role, "uf")


def test_unusable_pairs_are_dropped_and_all_unusable_is_an_error() -> None:
    same = {"chosen": HH_ROWS[1]["chosen"], "rejected": HH_ROWS[1]["chosen"]}
    records, dropped = to_preference_records([HH_ROWS[0], same], "hh")
    assert (len(records), dropped) == (1, 1)
    with pytest.raises(DataError, match=r"^hh: none of the 1 rows is a usable preference"):
        to_preference_records([same], "hh")


def test_to_demonstrations_from_each_schema() -> None:
    expected = {"prompt": "\n\nHuman: Name a prime.\n\nAssistant:", "response": " 7"}
    assert to_demonstrations(ULTRAFEEDBACK_ROWS[1:], "uf") == [expected]  # "messages"
    assert to_demonstrations([{"chosen": [user("Name a prime."), assistant("7")]}], "c") == [expected]
    assert to_demonstrations(HH_ROWS[1:], "hh") == [
        {"prompt": "\n\nHuman: Is the sky blue?\n\nAssistant:", "response": " Yes, on a clear day."}
    ]
    assert to_demonstrations([{"prompt": "The plot", "completion": " was good."}], "pc") == [
        {"prompt": "The plot", "response": " was good."}
    ]
    assert to_demonstrations([{"prompt": "The plot", "response": " was good."}], "pr") == [
        {"prompt": "The plot", "response": " was good."}
    ]
    with pytest.raises(DataError, match=r"^x\.jsonl: unrecognised columns \(question, text\)"):
        to_demonstrations([{"question": "q", "text": "t"}], "x.jsonl")
    with pytest.raises(DataError, match=r"^m: row 0: the conversation does not end with an assistant message"):
        to_demonstrations([{"messages": [user("Hi")]}], "m")


def test_to_prompts_from_each_schema() -> None:
    assert to_prompts([{"prompt": "The plot"}, {"prompt": "The plot"}, {"prompt": "A film"}], "p") == [
        {"prompt": "The plot"},
        {"prompt": "A film"},
    ]  # duplicates removed, order kept
    assert to_prompts([{"prompt": [user("Hi")]}], "p") == [{"prompt": "\n\nHuman: Hi\n\nAssistant:"}]
    assert to_prompts(HH_ROWS[:1], "hh") == [{"prompt": HH_PROMPT}]
    assert to_prompts(ULTRAFEEDBACK_ROWS[:1], "uf") == [{"prompt": "\n\nHuman: Is the sky blue?\n\nAssistant:"}]
    with pytest.raises(DataError, match=r"^p: unrecognised columns \(text\)"):
        to_prompts([{"text": "x"}], "p")
