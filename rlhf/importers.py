"""Importers for the common public schemas: tables from files, folders or the Hub, turned into the internal records
of rlhf/data.py (demonstrations, prompts, preferences); conversations rendered to model text.

Public schemas accepted by the importers (`to_preference_records`, `to_demonstrations`, `to_prompts`):

    hh_rlhf                 {"chosen": str, "rejected": str}  full "\\n\\nHuman: …\\n\\nAssistant: …" transcripts
    prompt_chosen_rejected  {"prompt": str, "chosen": str, "rejected": str}
    conversational          {"chosen": [messages], "rejected": [messages], "prompt"?: str | [messages]}
                            (UltraFeedback-binarized; TRL's conversational preference format)
    demonstrations          {"prompt", "completion"}, {"prompt", "response"}, {"messages": [messages]},
                            or any preference schema (its chosen side)

A message is {"role": "system" | "user" | "assistant", "content": str}.
"""

from __future__ import annotations

import csv
import functools
import json
import logging
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, Protocol

from rlhf.data import DataError, Row, read_jsonl, row_error

logger = logging.getLogger(__name__)

PreferenceSchema = Literal["prompt_chosen_rejected", "hh_rlhf", "conversational"]

ASSISTANT_CUE = "\n\nAssistant:"  # hh-rlhf: the prompt ends here, the response follows
HUMAN_CUE = "\n\nHuman:"
LOCAL_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")
PREFERENCE_SCHEMAS: tuple[PreferenceSchema, ...] = ("prompt_chosen_rejected", "hh_rlhf", "conversational")


# --------------------------------------------------------------------------------------------------
# Loading tables (local files, local directories, Hub datasets)
# --------------------------------------------------------------------------------------------------


def _read_json_file(path: Path) -> list[Row]:
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        return read_jsonl(path)  # JSON lines saved as .json (common); errors then name the line
    except (OSError, UnicodeDecodeError) as error:
        raise DataError(f"{path}: cannot read: {error}") from None
    if not isinstance(document, list):
        raise DataError(f"{path}: expected a JSON list of objects, got {type(document).__name__}")
    for index, row in enumerate(document):
        if not isinstance(row, dict):
            raise row_error(str(path), index, f"expected an object, got {type(row).__name__}")
    return document


def _read_csv_file(path: Path) -> list[Row]:
    try:
        with path.open(newline="", encoding="utf-8-sig") as file:
            return [dict(row) for row in csv.DictReader(file)]
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise DataError(f"{path}: cannot read CSV: {error}") from None


def _read_parquet_file(path: Path) -> list[Row]:
    import pyarrow.parquet  # lazy: stage programs on a GPU machine may lack pyarrow and never read parquet

    try:
        return pyarrow.parquet.read_table(path).to_pylist()
    except (OSError, ValueError) as error:  # pyarrow's errors derive from these
        raise DataError(f"{path}: cannot read parquet: {error}") from None


def _read_local_file(path: Path) -> list[Row]:
    readers = {".jsonl": read_jsonl, ".json": _read_json_file, ".csv": _read_csv_file, ".parquet": _read_parquet_file}
    reader = readers.get(path.suffix.lower())
    if reader is None:
        raise DataError(f"{path}: unsupported file type {path.suffix!r} (expected one of {', '.join(readers)})")
    return reader(path)


def _load_with_datasets(source: str, split: str, data_files: str | None) -> list[Row]:
    try:
        import datasets  # lazy: heavy, and absent on the GPU machine

        table = datasets.load_dataset(source, split=split, data_files=data_files)
    except Exception as error:  # loader errors are many and unrelated types; all mean "cannot load this"
        raise DataError(f"{source}: cannot load dataset (split {split!r}): {type(error).__name__}: {error}") from None
    return table.to_list()


def _looks_local(source: str) -> bool:
    """A path rather than a Hub id ("owner/name"): saves a slow, failing Hub lookup for a mistyped path."""
    parent = Path(source).expanduser().parent
    return (
        source.startswith((".", "/", "~"))
        or source.lower().endswith(LOCAL_SUFFIXES)
        or (parent != Path(".") and parent.is_dir())  # e.g. "data/prompts" inside the project
    )


def load_table(source: str, split: str = "train", data_files: str | None = None) -> list[Row]:
    """Rows of a local file (.jsonl, .json list, .parquet, .csv), a local directory of such files, or a Hub dataset.

    Directories and Hub ids go through `datasets.load_dataset(source, split=split, data_files=data_files)`;
    `split` and `data_files` are ignored for a single local file. An empty table is an error.
    """
    path = Path(source).expanduser()
    if path.is_file():
        rows = _read_local_file(path)
    elif path.is_dir() or not _looks_local(source):
        rows = _load_with_datasets(str(path) if path.is_dir() else source, split, data_files)
    else:
        raise DataError(f"{source}: no such file or directory")
    if not rows:
        raise DataError(f"{source}: no rows")
    return rows


# --------------------------------------------------------------------------------------------------
# Conversations
# --------------------------------------------------------------------------------------------------


class Renderer(Protocol):
    """Turns messages into model text; `add_generation_prompt` appends the cue for the assistant's turn.

    `render_messages` is the default; `functools.partial(tokenizer.apply_chat_template, tokenize=False)`
    fits too (see `renderer_for`).
    """

    def __call__(self, messages: list[dict], *, add_generation_prompt: bool = False) -> str: ...


_ROLE_PREFIX = {"user": "\n\nHuman: ", "assistant": "\n\nAssistant: "}


def _message_problem(messages: Any) -> str | None:
    if not isinstance(messages, list):
        return f"messages must be a list, got {type(messages).__name__}"
    for position, message in enumerate(messages):
        if not isinstance(message, Mapping) or not isinstance(message.get("role"), str):
            return f"message {position} must be an object with a string 'role'"
        role = message["role"]
        if role not in ("system", "user", "assistant"):
            return f"message {position} has unknown role {role!r} (expected system, user or assistant)"
        if role == "system" and position != 0:
            return f"message {position}: a system message is only allowed first"
        if not isinstance(message.get("content"), str):
            content_type = type(message.get("content")).__name__
            return f"message {position} ({role}) must have string 'content', got {content_type}"
    return None


def render_messages(messages: list[dict], *, add_generation_prompt: bool = False) -> str:
    """Plain Anthropic-HH rendering: "{system}\\n\\nHuman: {user}\\n\\nAssistant: {assistant}…".

    Used when the tokenizer has no chat template. `add_generation_prompt` appends "\\n\\nAssistant:".
    """
    problem = _message_problem(messages)
    if problem:
        raise DataError(f"messages: {problem}")
    text = "".join(
        message["content"] if message["role"] == "system" else _ROLE_PREFIX[message["role"]] + message["content"]
        for message in messages
    )
    return text + ASSISTANT_CUE if add_generation_prompt else text


def renderer_for(tokenizer: Any) -> Renderer:
    """The tokenizer's chat template when it has one, else `render_messages`."""
    if getattr(tokenizer, "chat_template", None):
        return functools.partial(tokenizer.apply_chat_template, tokenize=False)
    return render_messages


def _render(render: Renderer, messages: list[dict], add_generation_prompt: bool) -> str:
    problem = _message_problem(messages)
    if problem:
        raise _RowProblem(problem)
    try:
        return render(messages, add_generation_prompt=add_generation_prompt)
    except Exception as error:  # a chat template may reject a conversation (e.g. roles must alternate)
        raise _RowProblem(f"rendering the conversation failed: {type(error).__name__}: {error}") from None


class _RowProblem(Exception):
    """A problem with one row; the caller adds the source and row number."""


def _split_conversation(messages: list[dict], render: Renderer) -> tuple[str, str]:
    """(prompt, response) for a conversation ending in an assistant turn.

    The prompt is the render of everything before the final turn plus the assistant cue; the response is the
    text the final turn adds, so prompt + response == render(messages). If a template does not render that
    way (the full render does not start with the prompt), the response is the final turn's content.
    """
    problem = _message_problem(messages)
    if problem:
        raise _RowProblem(problem)
    if not messages or messages[-1]["role"] != "assistant":
        raise _RowProblem("the conversation does not end with an assistant message")
    prompt = _render(render, messages[:-1], add_generation_prompt=True)
    full = _render(render, messages, add_generation_prompt=False)
    response = full[len(prompt) :] if full.startswith(prompt) else messages[-1]["content"]
    return prompt, response


def _split_transcript(transcript: Any, field: str) -> tuple[str, str]:
    """hh-rlhf: prompt = text up to and including the last "\\n\\nAssistant:", response = the rest."""
    if not isinstance(transcript, str):
        raise _RowProblem(f"field {field!r} must be a string transcript, got {type(transcript).__name__}")
    cut = transcript.rfind(ASSISTANT_CUE)
    if cut < 0:
        raise _RowProblem(f"field {field!r} has no {ASSISTANT_CUE.strip()!r} turn (expected an hh-rlhf transcript)")
    cut += len(ASSISTANT_CUE)
    return transcript[:cut], transcript[cut:]


def _string(row: Mapping[str, Any], field: str) -> str:
    value = row.get(field)
    if not isinstance(value, str):
        raise _RowProblem(f"field {field!r} must be a string, got {type(value).__name__}")
    return value


def _columns_error(source: str, columns: Iterable[str], accepted: str) -> DataError:
    found = ", ".join(sorted(columns)) or "none"
    return DataError(f"{source}: unrecognised columns ({found}); expected {accepted}")


# --------------------------------------------------------------------------------------------------
# Preferences
# --------------------------------------------------------------------------------------------------

_PREFERENCE_FORMATS = (
    "prompt_chosen_rejected {prompt, chosen, rejected} strings, "
    "hh_rlhf {chosen, rejected} transcripts, or conversational {chosen, rejected} message lists"
)


def detect_preference_schema(
    columns: Iterable[str], first_row: Mapping[str, Any], source: str = "preferences"
) -> PreferenceSchema:
    """Which public preference schema a table uses, judged from its columns and first row."""
    columns = set(columns)
    missing = {"chosen", "rejected"} - columns
    if missing:
        found = ", ".join(sorted(columns)) or "none"
        raise DataError(
            f"{source}: missing column {' and '.join(map(repr, sorted(missing)))} (columns found: {found}); "
            f"accepted schemas: {_PREFERENCE_FORMATS}"
        )
    chosen, rejected = first_row.get("chosen"), first_row.get("rejected")
    if isinstance(chosen, list) and isinstance(rejected, list):
        return "conversational"
    if isinstance(chosen, str) and isinstance(rejected, str):
        return "prompt_chosen_rejected" if isinstance(first_row.get("prompt"), str) else "hh_rlhf"
    raise DataError(
        f"{source}: row 0: 'chosen' and 'rejected' must both be strings or both message lists, "
        f"got {type(chosen).__name__} and {type(rejected).__name__}"
    )


def _conversation_sides(row: Mapping[str, Any]) -> tuple[list, list]:
    """Full chosen and rejected conversations; TRL's format keeps a message-list prompt apart from them."""
    chosen, rejected, prompt = row.get("chosen"), row.get("rejected"), row.get("prompt")
    if not isinstance(chosen, list) or not isinstance(rejected, list):
        raise _RowProblem("'chosen' and 'rejected' must be message lists")
    if isinstance(prompt, list):
        return prompt + chosen, prompt + rejected
    return chosen, rejected


def _preference_parts(row: Mapping[str, Any], schema: PreferenceSchema, render: Renderer) -> tuple[str, str, str, str]:
    """(chosen prompt, chosen response, rejected prompt, rejected response) of one row."""
    if schema == "prompt_chosen_rejected":
        prompt = _string(row, "prompt")
        return prompt, _string(row, "chosen"), prompt, _string(row, "rejected")
    if schema == "hh_rlhf":
        return (*_split_transcript(row.get("chosen"), "chosen"), *_split_transcript(row.get("rejected"), "rejected"))
    chosen, rejected = _conversation_sides(row)
    return (*_split_conversation(chosen, render), *_split_conversation(rejected, render))


def to_preference_records(
    rows: Sequence[Mapping[str, Any]], source: str, render: Renderer = render_messages
) -> tuple[list[Row], int]:
    """Convert a public preference table to internal records; returns (records, number of rows dropped).

    Malformed rows (wrong types, unknown roles, no assistant turn) raise a `DataError`. Rows that are well
    formed but carry no usable preference are dropped: chosen == rejected, an empty text, or chosen and
    rejected continuing different prompts (a few hh-rlhf rows). If every row is dropped, that is an error.
    """
    if not rows:
        raise DataError(f"{source}: no rows")
    schema = detect_preference_schema(rows[0].keys(), rows[0], source)
    records: list[Row] = []
    for index, row in enumerate(rows):
        try:
            prompt, chosen, rejected_prompt, rejected = _preference_parts(row, schema, render)
        except _RowProblem as problem:
            raise row_error(source, index, str(problem)) from None
        usable = prompt == rejected_prompt and prompt.strip() and chosen.strip() and rejected.strip()
        if usable and chosen != rejected:
            records.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    dropped = len(rows) - len(records)
    if not records:
        raise DataError(
            f"{source}: none of the {len(rows)} rows is a usable preference "
            "(chosen equal to rejected, an empty text, or different prompts)"
        )
    if dropped:
        logger.warning("%s: dropped %d of %d rows with no usable preference", source, dropped, len(rows))
    return records, dropped


# --------------------------------------------------------------------------------------------------
# Demonstrations and prompts
# --------------------------------------------------------------------------------------------------

_DEMONSTRATION_FORMATS = (
    "{messages}, {prompt, completion}, {prompt, response}, {prompt, chosen} or {chosen} (hh-rlhf transcripts)"
)


def _demonstration_schema(columns: set[str], source: str) -> str:
    for schema, needed in (
        ("messages", {"messages"}),
        ("prompt_completion", {"prompt", "completion"}),
        ("prompt_response", {"prompt", "response"}),
        ("prompt_chosen", {"prompt", "chosen"}),
        ("chosen", {"chosen"}),
    ):
        if needed <= columns:
            return schema
    raise _columns_error(source, columns, _DEMONSTRATION_FORMATS)


def _demonstration_parts(row: Mapping[str, Any], schema: str, render: Renderer) -> tuple[str, str]:
    if schema == "messages":
        return _split_conversation(row.get("messages"), render)
    if schema == "chosen":
        chosen = row.get("chosen")
        return _split_conversation(chosen, render) if isinstance(chosen, list) else _split_transcript(chosen, "chosen")
    # {prompt, completion | response | chosen}: strings, or message lists (TRL's conversational formats)
    answer_field = schema.removeprefix("prompt_")
    prompt, answer = row.get("prompt"), row.get(answer_field)
    if isinstance(answer, list):
        return _split_conversation((prompt if isinstance(prompt, list) else []) + answer, render)
    if isinstance(prompt, list):
        return _render(render, prompt, add_generation_prompt=True), _string(row, answer_field)
    return _string(row, "prompt"), _string(row, answer_field)


def to_demonstrations(rows: Sequence[Mapping[str, Any]], source: str, render: Renderer = render_messages) -> list[Row]:
    """Convert a public SFT or preference table to internal demonstrations {"prompt", "response"}.

    For conversations the response is the final assistant turn. Rows with an empty prompt or response are
    dropped (with a warning); malformed rows raise a `DataError`.
    """
    if not rows:
        raise DataError(f"{source}: no rows")
    schema = _demonstration_schema(set(rows[0].keys()), source)
    records: list[Row] = []
    for index, row in enumerate(rows):
        try:
            prompt, response = _demonstration_parts(row, schema, render)
        except _RowProblem as problem:
            raise row_error(source, index, str(problem)) from None
        if prompt.strip() and response.strip():
            records.append({"prompt": prompt, "response": response})
    if not records:
        raise DataError(f"{source}: all {len(rows)} rows have an empty prompt or response")
    if len(records) < len(rows):
        dropped = len(rows) - len(records)
        logger.warning("%s: dropped %d of %d rows with an empty prompt or response", source, dropped, len(rows))
    return records


def _prompt_of(row: Mapping[str, Any], schema: str, render: Renderer) -> str:
    if schema == "prompt":
        prompt = row.get("prompt")
        if isinstance(prompt, list):
            return _render(render, prompt, add_generation_prompt=True)
        return _string(row, "prompt")
    if schema == "messages":
        messages = row.get("messages")
        problem = _message_problem(messages)
        if problem:
            raise _RowProblem(problem)
        if messages and messages[-1]["role"] == "assistant":
            messages = messages[:-1]  # a full conversation: prompt for its last turn
        return _render(render, messages, add_generation_prompt=True)
    return _demonstration_parts(row, schema, render)[0]


def to_prompts(rows: Sequence[Mapping[str, Any]], source: str, render: Renderer = render_messages) -> list[Row]:
    """Internal prompts {"prompt"} from {"prompt": str | messages} or any demonstration or preference schema.

    Duplicates are removed, first occurrence kept (preference tables repeat a prompt once per pair).
    """
    if not rows:
        raise DataError(f"{source}: no rows")
    columns = set(rows[0].keys())
    answers = {"messages", "completion", "response", "chosen"}
    schema = _demonstration_schema(columns, source) if columns & answers else "prompt"
    if schema == "prompt" and "prompt" not in columns:
        raise _columns_error(source, columns, "{prompt} or " + _DEMONSTRATION_FORMATS)
    prompts: dict[str, None] = {}  # ordered set
    for index, row in enumerate(rows):
        try:
            prompt = _prompt_of(row, schema, render)
        except _RowProblem as problem:
            raise row_error(source, index, str(problem)) from None
        if not prompt.strip():
            raise row_error(source, index, "the prompt is empty")
        prompts.setdefault(prompt)
    return [{"prompt": prompt} for prompt in prompts]
