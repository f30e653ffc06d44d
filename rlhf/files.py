"""Files, written so a crash never leaves half of one: the one atomic write, the one content digest, and the JSON,
JSONL and CSV writers built on them (docs/design.md §3).

A file is written to a temporary sibling, fsynced and renamed over its target (``os.replace`` is atomic on POSIX);
a folder is assembled in a ``.partial`` sibling and renamed into place. Readers see the old version or the new one.

A write that finds the disk (or the quota) full removes what it had written and raises :class:`NoSpaceError`: what
could not be written, about how many bytes it needed, how many are free and where (docs/reliability.md, "Disk full").
"""

from __future__ import annotations

import contextlib
import csv
import errno
import hashlib
import io
import json
import os
import re
import shutil
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, BinaryIO


class WriteError(ValueError):
    """Data that cannot be written as asked (e.g. not JSON-serialisable); the message names the file."""


# ------------------------------------------------------------------------------------------------------ disk full

NO_SPACE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
# how writers that raise no OSError say it: safetensors ("I/O error: No space left on device (os error 28)") and
# tokenizers ("No space left on device (os error 28)"); torch.save to a handle keeps the OSError as __context__
_NO_SPACE_TEXT = re.compile(r"No space left on device|Disk quota exceeded|\(os error (?:28|122)\)")


def is_no_space(error: BaseException | None) -> bool:
    """Whether ``error``, or an error it was raised from or while handling, says the disk or the quota is full."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in NO_SPACE_ERRNOS:
            return True
        if _NO_SPACE_TEXT.search(str(error)):
            return True
        error = error.__cause__ or error.__context__
    return False


def tree_size(path: str | os.PathLike) -> int:
    """Bytes of a file, or of every file in a folder; 0 if absent."""
    path = Path(path)
    try:
        if path.is_file():
            return path.stat().st_size
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    except OSError:  # removed while being measured
        return 0


def tensor_bytes(tensors: Iterable[Any]) -> int:
    """Bytes of tensors as a file holds them (a tensor shared by two names, as tied weights are, counts once)."""
    return sum({tensor.data_ptr(): tensor.nbytes for tensor in tensors}.values())


def free_space(path: str | os.PathLike) -> tuple[int, Path]:
    """(bytes free to this user, mount point) of the filesystem that holds ``path`` (or would, once created)."""
    existing = Path(os.path.abspath(path))
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    mount = existing
    while not os.path.ismount(mount) and mount != mount.parent:
        mount = mount.parent
    return shutil.disk_usage(existing).free, mount


def shown_path(path: str | os.PathLike) -> str:
    """``path`` relative to the working folder (the workspace) when inside it, else absolute."""
    absolute = Path(os.path.abspath(path))
    try:
        return absolute.relative_to(Path.cwd()).as_posix()
    except ValueError:
        return absolute.as_posix()


class NoSpaceError(OSError):
    """A write that found the disk or the quota full, after its partial file or folder was removed.

    ``path``: what could not be written; ``needed``: about how many bytes it needed (the bytes being written, or the
    size of the previous version when larger); ``free``, ``mount``: bytes free now (after the clean-up) and where;
    ``kept``: what the failed write left as it was, for the stage's message.
    """

    def __init__(self, path: str | os.PathLike, needed: int, kept: str = "") -> None:
        super().__init__(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        self.path, self.needed, self.kept = Path(path), int(needed), kept
        self.free, self.mount = free_space(path)

    def __str__(self) -> str:
        return f"{self.strerror} writing {shown_path(self.path)} (needed ≈ {self.needed} bytes, {self.free} free)"


def _left_as_it_was(target: Path) -> str:
    return f"previous {shown_path(target)} untouched" if target.exists() else f"no partial {shown_path(target)} left"


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


def write_atomic(
    path: str | os.PathLike, write: Callable[[BinaryIO], Any], *, needed: int | Callable[[int], int] = 0
) -> None:
    """Write ``path`` through ``write(binary_handle)`` into a temporary sibling, fsync it, then rename it into place.

    Creates parent folders. On any error the temporary file is removed and ``path`` is left as it was; a full disk
    raises :class:`NoSpaceError`. ``needed``: the file's expected size in bytes, or a function of the bytes written
    when the disk filled (for the message; the written bytes and the previous version's size are its floor).
    """
    path = Path(path)
    temporary = path.parent / f".{path.name}.{uuid.uuid4().hex}.tmp"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # os.open with mode 0o666 honours the umask (tempfile would leave the output at 0o600)
        with open(os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException as error:
        written = tree_size(temporary)
        temporary.unlink(missing_ok=True)
        if isinstance(error, Exception) and is_no_space(error):
            estimate = needed(written) if callable(needed) else needed
            raise NoSpaceError(path, max(estimate, written, tree_size(path)), _left_as_it_was(path)) from error
        raise
    fsync_folder(path.parent)


def write_text(path: str | os.PathLike, text: str) -> None:
    """UTF-8 text, atomically."""
    data = text.encode("utf-8")
    write_atomic(path, lambda handle: handle.write(data), needed=len(data))


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

    done = [0, 0]  # rows and bytes handed to the file so far

    def write(handle: BinaryIO) -> None:
        for index, row in enumerate(rows):
            try:
                line = json.dumps(row, ensure_ascii=False) + "\n"
            except (TypeError, ValueError) as error:
                raise WriteError(f"{path}: row {index} is not JSON-serialisable: {error}") from None
            done[1] += handle.write(line.encode("utf-8"))
            done[0] = index + 1

    def needed(written: int) -> int:  # a disk full after k of n rows: the bytes of those k, scaled to n
        total = len(rows) if isinstance(rows, (list, tuple)) else 0
        return done[1] * total // done[0] if total and done[0] else max(written, done[1])

    write_atomic(path, write, needed=needed)


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


@contextlib.contextmanager
def write_folder(final: str | os.PathLike, *, needed: int = 0) -> Iterator[Path]:
    """``with write_folder(out, needed=n) as staging:`` fill ``staging`` (:func:`staging_folder`); it replaces ``out``
    when the block ends (:func:`replace_folder`). On any error the staging folder is removed and ``out`` is left as it
    was; a full disk raises :class:`NoSpaceError`, ``needed`` the expected bytes (e.g. :func:`tensor_bytes` of the
    model's weights) for its message."""
    final = Path(final)
    staging = final.with_name(final.name + ".partial")
    try:
        staging = staging_folder(final)
        yield staging
    except BaseException as error:
        written, culprit = tree_size(staging), _culprit(error, staging, final)
        shutil.rmtree(staging, ignore_errors=True)
        if isinstance(error, Exception) and is_no_space(error):
            estimate = max(needed, written, tree_size(final))
            raise NoSpaceError(culprit, estimate, _left_as_it_was(final)) from error
        raise
    replace_folder(staging, final)


def _culprit(error: BaseException, staging: Path, final: Path) -> Path:
    """The file a failed write into ``staging`` names, as it would be in ``final``; ``final`` when none is named
    (safetensors and tokenizers name none). A copy's OSError names its source first and its target second."""
    named = getattr(error, "filename2", None) or getattr(error, "filename", None)
    if named:
        try:
            return final / Path(os.path.abspath(named)).relative_to(os.path.abspath(staging))
        except ValueError:
            pass
    return final


def replace_folder(staging: str | os.PathLike, final: str | os.PathLike) -> None:
    """Move a fully written folder into place, so a crash never leaves a half-written output."""
    staging, final = Path(staging), Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    if os.stat(staging).st_dev != os.stat(final.parent).st_dev:
        # no rename across filesystems (e.g. .rlhf/checkpoints on a disk of its own): a copy beside ``final`` first
        with write_folder(final, needed=tree_size(staging)) as copy:
            shutil.copytree(staging, copy, dirs_exist_ok=True)
        shutil.rmtree(staging)
        return
    if final.exists():
        shutil.rmtree(final)
    staging.rename(final)
    fsync_folder(final.parent)
