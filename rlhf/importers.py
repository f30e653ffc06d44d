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

One renderer for the whole pipeline (docs/design.md, "Chat models: one renderer"): `renderer_for(tokenizer)` is the
model's chat template when its tokenizer has one, else the hh-rlhf text format (`render_messages`). With a chat
template, hh-rlhf transcripts (and prompts in that format) become messages and are rendered with the template, and
responses stop before the template's end-of-turn token, which the pipeline appends as EOS.
"""

from __future__ import annotations

import csv
import json
import logging
import re
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
        document = json.loads(path.read_text(encoding="utf-8-sig"))  # a byte-order mark (Windows exports) is dropped
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

    `render_messages` is the default; `ChatTemplateRenderer` renders with a tokenizer's chat template (see
    `renderer_for`). A renderer may carry `end_of_turn`, the text closing an assistant turn: responses are cut
    before it, because the pipeline appends it as EOS (rlhf.modeling.encode_prompt_response).
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


# A one-turn conversation whose assistant answer is found again in the render, to see what follows the answer
_PROBE_ANSWER = "Fine, thanks."
_PROBE_CONVERSATION = [{"role": "user", "content": "How are you?"}, {"role": "assistant", "content": _PROBE_ANSWER}]


def _special_tokens(tokenizer: Any) -> set[str]:
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    return {token.content for token in added.values() if token.special} | set(tokenizer.all_special_tokens)


def end_of_turn_token(tokenizer: Any) -> str | None:
    """The special token the tokenizer's chat template closes an assistant turn with (ChatML `<|im_end|>`,
    Llama-3 `<|eot_id|>`), or None when there is no template or no special token follows the answer.

    Found by rendering a one-turn conversation and reading the special token right after the assistant's
    content (whitespace between them is allowed, as in Llama-2's " </s>").
    """
    if not getattr(tokenizer, "chat_template", None):
        return None
    try:
        full = tokenizer.apply_chat_template(_PROBE_CONVERSATION, tokenize=False)
    except Exception:  # a template may reject any conversation it was not written for; then there is no token
        return None
    at = full.rfind(_PROBE_ANSWER) if isinstance(full, str) else -1
    if at < 0:
        return None
    after = full[at + len(_PROBE_ANSWER) :].lstrip()
    found = [token for token in _special_tokens(tokenizer) if token and after.startswith(token)]
    return max(found, key=len) if found else None  # the longest: "<|im_end|>" rather than a special "<" prefix


class ChatTemplateRenderer:
    """A tokenizer's chat template as a `Renderer`; `end_of_turn` is its end-of-turn token ("" when none)."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.end_of_turn = end_of_turn_token(tokenizer) or ""

    def __call__(self, messages: list[dict], *, add_generation_prompt: bool = False) -> str:
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def renderer_for(tokenizer: Any) -> Renderer:
    """The tokenizer's chat template when it has one (a `ChatTemplateRenderer`), else `render_messages`."""
    if getattr(tokenizer, "chat_template", None):
        return ChatTemplateRenderer(tokenizer)
    return render_messages


def _renders_hh(render: Renderer) -> bool:
    """Whether `render` is the hh-rlhf format itself: hh text then stays byte for byte as the dataset stores it."""
    return render is render_messages


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


def _cut_end_of_turn(added: str, end_of_turn: str) -> str:
    """The final turn's text without the end-of-turn token and what follows it (ChatML's trailing newline).

    The pipeline appends EOS (the end-of-turn token) after every response, so prompt + response + EOS is the
    rendered conversation up to its end-of-turn token.
    """
    at = added.rfind(end_of_turn)
    if at < 0:
        raise _RowProblem(f"the chat template did not close the final assistant turn with {end_of_turn!r}")
    if added[at + len(end_of_turn) :].strip():
        trailing = added[at + len(end_of_turn) :][:40]
        raise _RowProblem(f"the chat template renders {trailing!r} after the final {end_of_turn!r}")
    return added[:at]


def _split_conversation(messages: list[dict], render: Renderer) -> tuple[str, str]:
    """(prompt, response) for a conversation ending in an assistant turn.

    The prompt is the render of everything before the final turn plus the assistant cue; the response is the
    text the final turn adds, so prompt + response == render(messages); with an end-of-turn token
    (`Renderer.end_of_turn`) the response stops before it, so prompt + response + EOS == render(messages) up to
    what follows that token. If a template does not render that way (the full render does not start with the
    prompt), the response is the final turn's content.
    """
    problem = _message_problem(messages)
    if problem:
        raise _RowProblem(problem)
    if not messages or messages[-1]["role"] != "assistant":
        raise _RowProblem("the conversation does not end with an assistant message")
    prompt = _render(render, messages[:-1], add_generation_prompt=True)
    full = _render(render, messages, add_generation_prompt=False)
    if not full.startswith(prompt):
        return prompt, messages[-1]["content"]
    end_of_turn = getattr(render, "end_of_turn", "")
    added = full[len(prompt) :]
    return prompt, _cut_end_of_turn(added, end_of_turn) if end_of_turn else added


_HH_CUES = re.compile(f"({re.escape(HUMAN_CUE)}|{re.escape(ASSISTANT_CUE)})")


def hh_messages(text: str) -> list[dict]:
    """An hh-rlhf transcript as messages: each "\\n\\nHuman:" / "\\n\\nAssistant:" starts a user / assistant turn
    (content stripped of the space after the cue and surrounding whitespace); text before the first cue is a
    system message. A trailing empty assistant turn (a prompt ending with the cue) is kept."""
    head, *parts = _HH_CUES.split(text)
    messages = [{"role": "system", "content": head.strip()}] if head.strip() else []
    for cue, content in zip(parts[::2], parts[1::2]):
        messages.append({"role": "user" if cue == HUMAN_CUE else "assistant", "content": content.strip()})
    return messages


def _is_hh_prompt(text: str) -> bool:
    return text.endswith(ASSISTANT_CUE) and HUMAN_CUE in text


def _text_pair(prompt: str, response: str, render: Renderer) -> tuple[str, str]:
    """A string prompt and its response: hh-format prompts go through a chat template; other text stays as is
    (plain strings are already model text, as in TRL's standard, non-conversational format)."""
    if _renders_hh(render) or not _is_hh_prompt(prompt):
        return prompt, response
    turns = hh_messages(prompt)[:-1]  # the empty assistant turn the cue opens
    return _split_conversation([*turns, {"role": "assistant", "content": response.strip()}], render)


def _text_prompt(prompt: str, render: Renderer) -> str:
    """A string prompt as model text: an hh-format prompt through a chat template, other text as is."""
    if _renders_hh(render) or not _is_hh_prompt(prompt):
        return prompt
    return _render(render, hh_messages(prompt)[:-1], add_generation_prompt=True)


def _split_transcript(transcript: Any, field: str, render: Renderer) -> tuple[str, str]:
    """hh-rlhf: prompt = text up to and including the last "\\n\\nAssistant:", response = the rest; with a chat
    template the transcript is converted to messages (`hh_messages`) and split as a conversation."""
    if not isinstance(transcript, str):
        raise _RowProblem(f"field {field!r} must be a string transcript, got {type(transcript).__name__}")
    cut = transcript.rfind(ASSISTANT_CUE)
    if cut < 0:
        raise _RowProblem(f"field {field!r} has no {ASSISTANT_CUE.strip()!r} turn (expected an hh-rlhf transcript)")
    if not _renders_hh(render):
        try:
            return _split_conversation(hh_messages(transcript), render)
        except _RowProblem as problem:
            raise _RowProblem(f"field {field!r}: {problem}") from None
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
        chosen, rejected = _string(row, "chosen"), _string(row, "rejected")
        return (*_text_pair(prompt, chosen, render), *_text_pair(prompt, rejected, render))
    if schema == "hh_rlhf":
        chosen, rejected = row.get("chosen"), row.get("rejected")
        return (*_split_transcript(chosen, "chosen", render), *_split_transcript(rejected, "rejected", render))
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
        if isinstance(chosen, list):
            return _split_conversation(chosen, render)
        return _split_transcript(chosen, "chosen", render)
    # {prompt, completion | response | chosen}: strings, or message lists (TRL's conversational formats)
    answer_field = schema.removeprefix("prompt_")
    prompt, answer = row.get("prompt"), row.get(answer_field)
    if isinstance(answer, list):
        return _split_conversation((prompt if isinstance(prompt, list) else []) + answer, render)
    if isinstance(prompt, list):
        return _render(render, prompt, add_generation_prompt=True), _string(row, answer_field)
    return _text_pair(_string(row, "prompt"), _string(row, answer_field), render)


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
        return _text_prompt(_string(row, "prompt"), render)
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
