"""Record formats, JSONL io, importers for the common public schemas, and validation.

Bad input fails here, with a `DataError` naming the file (and row or line) and the problem, before any
expensive work starts. Writes are atomic, so a failed write never damages an output that already exists.

Internal record schemas passed between stages (one JSON object per line):

    prompts         {"prompt": str}
    demonstrations  {"prompt": str, "response": str}
    samples         {"prompt_id": int, "prompt": str, "responses": list[str]}   # ≥ 2 responses per prompt
    preferences     {"prompt": str, "chosen": str, "rejected": str, ...}       # extra keys allowed

`prompt + response` is always the full text the model sees. A prompt therefore ends with the cue for the
assistant turn and the response continues it: with the default rendering (Anthropic HH style) the prompt
ends "\\n\\nAssistant:" and the response starts with a space, exactly as hh-rlhf stores it.
Generated responses (samples, and preferences built from them) may be empty strings: a policy that stops
at once produced that text. Imported human data with an empty response is dropped as broken.

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
import os
import random
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, Protocol, TextIO

logger = logging.getLogger(__name__)

Row = dict[str, Any]
PreferenceSchema = Literal["prompt_chosen_rejected", "hh_rlhf", "conversational"]

ASSISTANT_CUE = "\n\nAssistant:"  # hh-rlhf: the prompt ends here, the response follows
HUMAN_CUE = "\n\nHuman:"
LOCAL_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")
PREFERENCE_SCHEMAS: tuple[PreferenceSchema, ...] = ("prompt_chosen_rejected", "hh_rlhf", "conversational")


class DataError(ValueError):
    """Bad input data. The message always starts with the file or source name: "{source}: {problem}"."""


def _row_error(source: str, index: int, problem: str) -> DataError:
    return DataError(f"{source}: row {index}: {problem}")


# --------------------------------------------------------------------------------------------------
# JSON / JSONL io
# --------------------------------------------------------------------------------------------------


def read_jsonl(path: str | os.PathLike) -> list[Row]:
    """Read one JSON object per line; blank lines are skipped. Line numbers in errors count from 1."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as error:
        raise DataError(f"{path}: cannot read: {error}") from None
    rows: list[Row] = []
    for line_number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise DataError(f"{path}: line {line_number}: invalid JSON: {error.msg} (column {error.colno})") from None
        if not isinstance(row, dict):
            raise DataError(f"{path}: line {line_number}: expected a JSON object, got {type(row).__name__}")
        rows.append(row)
    return rows


def _atomic_write(path: str | os.PathLike, write: Callable[[TextIO], None]) -> None:
    """Write to a temporary file beside `path`, then rename it over `path`: readers see old or new, never half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.parent / f".{path.name}.{uuid.uuid4().hex}.tmp"
    try:
        # os.open with mode 0o666 honours the umask (tempfile would leave the output at 0o600).
        with open(os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), "w", encoding="utf-8") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def write_jsonl(path: str | os.PathLike, rows: Iterable[Mapping[str, Any]]) -> None:
    """Write rows as UTF-8 JSON lines, atomically; creates parent directories."""

    def write(file: TextIO) -> None:
        for index, row in enumerate(rows):
            try:
                line = json.dumps(row, ensure_ascii=False)
            except (TypeError, ValueError) as error:
                raise DataError(f"{path}: row {index} is not JSON-serialisable: {error}") from None
            file.write(line + "\n")

    _atomic_write(path, write)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write one JSON document (indent 2, sorted keys), atomically; creates parent directories."""
    try:
        text = json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False)
    except (TypeError, ValueError) as error:
        raise DataError(f"{path}: not JSON-serialisable: {error}") from None
    _atomic_write(path, lambda file: file.write(text + "\n"))


# --------------------------------------------------------------------------------------------------
# Validation of the internal records
# --------------------------------------------------------------------------------------------------


def _type_name(kind: type) -> str:
    return {str: "a string", int: "an integer", float: "a number", list: "a list", dict: "an object"}.get(
        kind, kind.__name__
    )


def _field_problem(row: Any, field: str, kind: type, allow_empty: bool) -> str | None:
    if field not in row:
        return f"missing field {field!r}"
    value = row[field]
    # bool is an int subclass, but a flag is never a valid id, count or score; an int is a valid float.
    if kind is float:
        valid = isinstance(value, (int, float)) and not isinstance(value, bool)
    else:
        valid = isinstance(value, kind) and not (isinstance(value, bool) and kind is not bool)
    if not valid:
        return f"field {field!r} must be {_type_name(kind)}, got {type(value).__name__}"
    if not allow_empty:
        if isinstance(value, str) and not value.strip():
            return f"field {field!r} is empty"
        if isinstance(value, (list, dict)) and not value:
            return f"field {field!r} is empty"
    return None


def require_fields(
    rows: Sequence[Any], fields: Mapping[str, type], source: str, *, allow_empty: Iterable[str] = ()
) -> None:
    """Check every row has every field with the given type and (unless in `allow_empty`) a non-empty value.

    Raises a `DataError` naming the first bad row (counting from 0) and the field.
    """
    allow_empty = frozenset(allow_empty)
    for index, row in enumerate(rows):
        if not isinstance(row, Mapping):
            raise _row_error(source, index, f"expected an object, got {type(row).__name__}")
        for field, kind in fields.items():
            problem = _field_problem(row, field, kind, field in allow_empty)
            if problem:
                raise _row_error(source, index, problem)


def validate_prompts(rows: Sequence[Any], source: str) -> None:
    require_fields(rows, {"prompt": str}, source)


def validate_demonstrations(rows: Sequence[Any], source: str) -> None:
    require_fields(rows, {"prompt": str, "response": str}, source)


def validate_samples(rows: Sequence[Any], source: str) -> None:
    require_fields(rows, {"prompt_id": int, "prompt": str, "responses": list}, source)
    for index, row in enumerate(rows):
        responses = row["responses"]
        if len(responses) < 2:
            raise _row_error(source, index, f"'responses' needs at least 2 entries to compare, got {len(responses)}")
        for position, response in enumerate(responses):
            if not isinstance(response, str):
                problem = f"responses[{position}] must be a string, got {type(response).__name__}"
                raise _row_error(source, index, problem)


def validate_preferences(rows: Sequence[Any], source: str) -> None:
    require_fields(rows, {"prompt": str, "chosen": str, "rejected": str}, source, allow_empty=("chosen", "rejected"))
    for index, row in enumerate(rows):
        if row["chosen"] == row["rejected"]:
            raise _row_error(source, index, "'chosen' and 'rejected' are identical: the pair carries no preference")


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
            raise _row_error(str(path), index, f"expected an object, got {type(row).__name__}")
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
            raise _row_error(source, index, str(problem)) from None
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


def to_demonstrations(
    rows: Sequence[Mapping[str, Any]], source: str, render: Renderer = render_messages
) -> list[Row]:
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
            raise _row_error(source, index, str(problem)) from None
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
            raise _row_error(source, index, str(problem)) from None
        if not prompt.strip():
            raise _row_error(source, index, "the prompt is empty")
        prompts.setdefault(prompt)
    return [{"prompt": prompt} for prompt in prompts]


# --------------------------------------------------------------------------------------------------
# Splits and length checks
# --------------------------------------------------------------------------------------------------


def split_train_eval(
    rows: Sequence[Row], eval_fraction: float, seed: int, *, group_key: str | None = None
) -> tuple[list[Row], list[Row]]:
    """Deterministic random split; at least one eval row (and one train row) when there are ≥ 2 rows.

    With `group_key` (e.g. "prompt"), rows sharing that value land on the same side, so pairs built from
    one prompt cannot leak from training into evaluation. Each side keeps the input order.
    """
    if not 0 < eval_fraction < 1:
        raise ValueError(f"eval_fraction must be between 0 and 1 (exclusive), got {eval_fraction}")
    groups: dict[Any, list[int]] = {}
    for index, row in enumerate(rows):
        groups.setdefault(row[group_key] if group_key else index, []).append(index)
    if len(groups) < 2:
        return list(rows), []
    keys = list(groups)
    random.Random(seed).shuffle(keys)
    target = max(1, round(len(rows) * eval_fraction))
    eval_indices: set[int] = set()
    for key in keys[:-1]:  # the last group always stays in training
        if len(eval_indices) >= target:
            break
        eval_indices.update(groups[key])
    train = [row for index, row in enumerate(rows) if index not in eval_indices]
    evaluation = [row for index, row in enumerate(rows) if index in eval_indices]
    return train, evaluation


def check_lengths(texts: Sequence[str], tokenizer: Any, max_tokens: int, source: str, what: str) -> None:
    """Raise a `DataError` for the first text longer than `max_tokens` tokens (one batched tokenizer call).

    `what` names the text in the message, e.g. "prompt" → "row 3: prompt is 70 tokens long, …".
    """
    if not texts:
        return
    lengths = [len(ids) for ids in tokenizer(list(texts))["input_ids"]]
    too_long = [index for index, length in enumerate(lengths) if length > max_tokens]
    if too_long:
        first = too_long[0]
        raise _row_error(
            source,
            first,
            f"{what} is {lengths[first]} tokens long, more than the {max_tokens} the model allows "
            f"({len(too_long)} of {len(texts)} rows are too long)",
        )
