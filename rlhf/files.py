"""Files, written so a crash never leaves half of one: the one atomic write, the one content digest, and the JSON,
JSONL and CSV writers built on them (docs/design.md §3).

A file is written to a temporary sibling, fsynced and renamed over its target (``os.replace`` is atomic on POSIX);
a folder is assembled in a ``.partial`` sibling and renamed into place. Readers see the old version or the new one.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import shutil
import uuid
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, BinaryIO


class WriteError(ValueError):
    """Data that cannot be written as asked (e.g. not JSON-serialisable); the message names the file."""


def fsync_folder(folder: Path) -> None:
    """Make a rename or creation inside ``folder`` durable (POSIX; a no-op where folders cannot be opened)."""
    try:
        handle = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(handle)
    finally:
        os.close(handle)


def write_atomic(path: str | os.PathLike, write: Callable[[BinaryIO], Any]) -> None:
    """Write ``path`` through ``write(binary_handle)`` into a temporary sibling, fsync it, then rename it into place.

    Creates parent folders. On any error the temporary file is removed and ``path`` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.parent / f".{path.name}.{uuid.uuid4().hex}.tmp"
    try:
        # os.open with mode 0o666 honours the umask (tempfile would leave the output at 0o600)
        with open(os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    fsync_folder(path.parent)


def write_text(path: str | os.PathLike, text: str) -> None:
    """UTF-8 text, atomically."""
    data = text.encode("utf-8")
    write_atomic(path, lambda handle: handle.write(data))


def write_json(path: str | os.PathLike, obj: Any, *, indent: int | None = 2) -> None:
    """One JSON document (sorted keys, indent 2 by default), atomically."""
    try:
        text = json.dumps(obj, indent=indent, sort_keys=True, ensure_ascii=False)
    except (TypeError, ValueError) as error:
        raise WriteError(f"{path}: not JSON-serialisable: {error}") from None
    write_text(path, text + "\n" if indent is not None else text)


def write_jsonl(path: str | os.PathLike, rows: Iterable[Mapping[str, Any]]) -> None:
    """Rows as UTF-8 JSON lines, atomically; each line is written as it is made (no copy of the whole file in
    memory: 1 M preference rows cost 0.6 GiB as one string, docs/scale.md)."""

    def write(handle: BinaryIO) -> None:
        for index, row in enumerate(rows):
            try:
                line = json.dumps(row, ensure_ascii=False) + "\n"
            except (TypeError, ValueError) as error:
                raise WriteError(f"{path}: row {index} is not JSON-serialisable: {error}") from None
            handle.write(line.encode("utf-8"))

    write_atomic(path, write)


def write_csv(path: str | os.PathLike, rows: list[Mapping[str, Any]]) -> None:
    """Rows (dicts with the same keys, in the first row's order) as CSV with a header, atomically."""
    buffer = io.StringIO(newline="")
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]) if rows else [])
    writer.writeheader()
    writer.writerows(rows)
    write_text(path, buffer.getvalue())


def read_csv(path: str | os.PathLike) -> list[dict[str, str]]:
    """Rows of a CSV file with a header ([] if the file does not exist)."""
    path = Path(path)
    if not path.exists():
        return []
    with path.open(newline="", encoding="utf-8-sig") as handle:  # a byte-order mark is dropped
        return list(csv.DictReader(handle))


def path_digest(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes, or of a folder's files (sorted relative paths and contents); "missing" if absent."""
    path = Path(path)
    digest = hashlib.sha256()
    if path.is_file():
        files = [(path.name, path)]
    elif path.is_dir():
        files = sorted((p.relative_to(path).as_posix(), p) for p in path.rglob("*") if p.is_file())
    else:
        return "missing"
    for name, file in files:
        digest.update(name.encode() + b"\0")
        with file.open("rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
        digest.update(b"\0")
    return digest.hexdigest()


def staging_folder(final: str | os.PathLike) -> Path:
    """A fresh, empty ``<final>.partial`` sibling to assemble a folder in before :func:`replace_folder`."""
    final = Path(final)
    staging = final.with_name(final.name + ".partial")
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    return staging


def replace_folder(staging: str | os.PathLike, final: str | os.PathLike) -> None:
    """Move a fully written folder into place, so a crash never leaves a half-written output."""
    staging, final = Path(staging), Path(final)
    if final.exists():
        shutil.rmtree(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    staging.rename(final)
    fsync_folder(final.parent)
