"""Crash-safe resume checkpoints for the training stages (SFT, reward model, PPO).

Resume checkpoints live outside DVC outputs, in ``.rlhf/checkpoints/<stage>/`` (DVC deletes a stage's outs before it
re-runs the stage, which would delete the very checkpoint a rerun needs). Layout of one stage's folder::

    latest.json            {"step": 400, "dir": "step-400", "fingerprint": "…"}   pointer, replaced atomically
    step-400/state.pt      torch.save of the main process's state (models, optimisers, RNG, data position, extras)
    step-400/rng-rank<r>.pt  optional: each process's own RNG state (multi-process PPO)
    step-400/meta.json     {"step", "fingerprint", "ranks", "format"}
    tmp-step-600/          a save in progress; never read, removed by the next successful save

A save writes everything into ``tmp-step-N``, fsyncs it, renames it to ``step-N`` (atomic on POSIX) and only then
replaces ``latest.json`` (temp file + ``os.replace``), so a process killed at any instant leaves either the previous
checkpoint or the new one, never a half-written one that a rerun would load. A save that finds the disk full removes
its half-written folder (and the new ``step-N`` if ``latest.json`` could not be pointed at it) and raises
:class:`rlhf.files.NoSpaceError`: ``latest.json`` still points at the previous checkpoint, which a rerun resumes from.

A checkpoint is resumed only when its fingerprint (:func:`fingerprint` of the config, seed and input hashes) equals
the current one; otherwise it is discarded with a logged reason and training starts fresh.

Everything saved is plain data (tensors, dicts, lists, tuples, ints, floats, bools, None, strings), so it loads with
``torch.load(weights_only=True)``: NumPy's RNG keys are stored as a tensor, not an ndarray, for that reason.

One class drives it for every loop, :class:`ResumeCheckpoints` (open on start, save every N steps, clear at the end).
With several processes (PPO under accelerate) it takes a :class:`Processes`: every rank then writes its own RNG file
``step-N/rng-rank<r>.pt`` and reads it back on resume, while the main process alone writes ``state.pt``. The folder
must be on a filesystem all ranks see (one machine: yes).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
import re
import shutil
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rlhf.files import NoSpaceError, fsync_folder, is_no_space, path_digest, tensor_bytes, write_atomic, write_json

CHECKPOINT_ROOT = Path(".rlhf/checkpoints")
FORMAT = 1  # bump when the layout or state content changes: older checkpoints then stop matching
LATEST = "latest.json"
STATE_FILE = "state.pt"
META_FILE = "meta.json"
_STEP_DIR = re.compile(r"^step-(\d+)$")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be written or read back as expected (e.g. a rank's RNG file is missing)."""


def checkpoint_folder(stage: str, root: Path = CHECKPOINT_ROOT) -> Path:
    """Where ``stage`` keeps its resume checkpoints (relative to the workspace, the stage's cwd)."""
    return root / stage


# ---------------------------------------------------------------------------------------------------- fingerprint


def _canonical(part: Any) -> Any:
    """A JSON-able, order-independent form of one fingerprint part (dataclass → dict, Path → content hash)."""
    if dataclasses.is_dataclass(part) and not isinstance(part, type):
        return _canonical(dataclasses.asdict(part))
    if isinstance(part, Path):
        return {"path": part.as_posix(), "sha256": path_digest(part)}
    if isinstance(part, Mapping):
        return {str(key): _canonical(value) for key, value in part.items()}
    if isinstance(part, (list, tuple)):
        return [_canonical(value) for value in part]
    if isinstance(part, (str, int, float, bool)) or part is None:
        return part
    raise TypeError(f"fingerprint: cannot hash a {type(part).__name__}; pass a dataclass, dict, Path or plain value")


def config_part(config: Any, ignore: tuple[str, ...] = ("resume_every",)) -> dict[str, Any]:
    """A config dataclass as a dict without the fields that cannot change the result (how often to checkpoint)."""
    return {key: value for key, value in dataclasses.asdict(config).items() if key not in ignore}


def fingerprint(*parts: Any) -> str:
    """A stable hash of everything a run's result depends on.

    Parts may be config dataclasses or dicts (hashed as sorted JSON), plain values (the seed) and ``Path`` objects,
    which are replaced by the sha256 of the file or folder contents (so a re-created but identical input matches).
    e.g. ``fingerprint(config_without_resume_every, seed, Path("data/sft"), Path("models/base"))``.
    """
    payload = json.dumps([FORMAT, *(_canonical(p) for p in parts)], sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(payload.encode()).hexdigest()


# ------------------------------------------------------------------------------------------------------------ RNG


def capture_rng(generators: Mapping[str, torch.Generator] | None = None) -> dict[str, Any]:
    """Python, NumPy, torch CPU (and CUDA when initialised) RNG states plus the named ``generators``' states.

    The result holds only tensors and plain values (loads with ``weights_only=True``).
    """
    version, internal, gauss = random.getstate()
    name, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    state: dict[str, Any] = {
        "python": {"version": version, "state": list(internal), "gauss": gauss},
        "numpy": {
            "name": name,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(position),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian),
        },
        "torch": torch.get_rng_state(),
        "generators": {key: generator.get_state() for key, generator in (generators or {}).items()},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: Mapping[str, Any], generators: Mapping[str, torch.Generator] | None = None) -> None:
    """Inverse of :func:`capture_rng`: the next draws of every stream equal those after the capture, bitwise.

    Every generator named in ``generators`` must be in the saved state (a missing one is a :class:`CheckpointError`).
    """
    python = state["python"]
    random.setstate((python["version"], tuple(python["state"]), python["gauss"]))
    numpy = state["numpy"]
    np.random.set_state(
        (
            numpy["name"],
            numpy["keys"].numpy().astype(np.uint32),
            numpy["pos"],
            numpy["has_gauss"],
            numpy["cached_gaussian"],
        )
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
    for key, generator in (generators or {}).items():
        if key not in state["generators"]:
            raise CheckpointError(
                f"checkpoint has no state for the random generator {key!r} (saved: {sorted(state['generators'])})"
            )
        generator.set_state(state["generators"][key])


# ---------------------------------------------------------------------------------------------------- save / load


def staging_dir(folder: Path, step: int) -> Path:
    """The temp folder a checkpoint of ``step`` is assembled in (the same name on every rank)."""
    return Path(folder) / f"tmp-step-{step}"


def _step_dirs(folder: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints (renamed ``step-N`` folders), oldest first."""
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir()]
    return sorted(found)


def save_rank_rng(
    folder: str | Path, step: int, rank: int, generators: Mapping[str, torch.Generator] | None = None
) -> Path:
    """Every process: write its own RNG state (:func:`capture_rng`) to ``tmp-step-N/rng-rank<r>.pt``.

    Call before the barrier that precedes the main process's :func:`save_checkpoint` (with ``ranks=world_size``).
    """
    path = staging_dir(Path(folder), step) / f"rng-rank{rank}.pt"
    rng = capture_rng(generators)
    write_atomic(path, lambda handle: torch.save(rng, handle))  # creates the staging folder
    return path


def load_rank_rng(
    folder: str | Path, step: int, rank: int, generators: Mapping[str, torch.Generator] | None = None
) -> None:
    """Every process: restore its own RNG streams from ``step-N/rng-rank<r>.pt`` (after :func:`load_latest`)."""
    path = Path(folder) / f"step-{step}" / f"rng-rank{rank}.pt"
    if not path.is_file():
        raise CheckpointError(
            f"{path}: missing; the checkpoint was written by fewer processes "
            "(include the process count in the fingerprint)"
        )
    restore_rng(torch.load(path, weights_only=True), generators)


def save_checkpoint(
    folder: str | Path, step: int, state: dict[str, Any], fingerprint: str, *, ranks: int = 0, keep: int = 1
) -> Path:
    """Atomically store ``state`` as the checkpoint of ``step`` and point ``latest.json`` at it; returns its folder.

    ``state``: model/optimiser/scheduler ``state_dict()``s, :func:`capture_rng` output, the data position and small
    extras, all plain data and tensors. ``ranks`` > 0: the per-rank RNG files ``rng-rank0..ranks-1`` must already be
    in the staging folder (:func:`save_rank_rng`). ``keep``: complete checkpoints kept (the newest ``keep``); stale
    temp folders of killed saves are removed too. Main process only.
    """
    folder = Path(folder)
    staging = staging_dir(folder, step)
    staging.mkdir(parents=True, exist_ok=True)
    for stale in staging.iterdir():  # leftovers of a save of the same step killed in an earlier run
        match = re.match(r"^rng-rank(\d+)\.pt$", stale.name)
        if stale.is_file() and not (match and int(match.group(1)) < ranks):
            stale.unlink()
    missing = [r for r in range(ranks) if not (staging / f"rng-rank{r}.pt").is_file()]
    if missing:
        raise CheckpointError(
            f"{staging}: RNG files of ranks {missing} are missing; call save_rank_rng on every rank before a barrier"
        )
    needed = state_bytes(state)
    try:
        write_atomic(staging / STATE_FILE, lambda handle: torch.save(state, handle), needed=needed)
        meta = {
            "step": step,
            "fingerprint": fingerprint,
            "ranks": ranks,
            "format": FORMAT,
            "time": round(time.time(), 3),
        }
        write_json(staging / META_FILE, meta, indent=None)
        final = folder / f"step-{step}"
        if final.exists():  # a complete save of this step that latest.json never pointed to (killed in between)
            shutil.rmtree(final)
        staging.rename(final)
        fsync_folder(folder)
        write_json(folder / LATEST, {"step": step, "dir": final.name, "fingerprint": fingerprint}, indent=None)
    except Exception as error:
        if not is_no_space(error):
            raise
        discard_save(folder, step)
        path = error.path if isinstance(error, NoSpaceError) else staging / STATE_FILE
        raise NoSpaceError(path, max(needed, getattr(error, "needed", 0)), "half-written checkpoint removed") from error
    _prune(folder, keep=max(1, keep), newest=step)
    return final


def state_bytes(state: Any) -> int:
    """About the bytes ``torch.save(state)`` writes: its tensors' (for messages about a full disk)."""
    tensors: list[torch.Tensor] = []
    pending = [state]
    while pending:
        item = pending.pop()
        if isinstance(item, torch.Tensor):
            tensors.append(item)
        elif isinstance(item, Mapping):
            pending.extend(item.values())
        elif isinstance(item, (list, tuple)):
            pending.extend(item)
    return tensor_bytes(tensors)


def discard_save(folder: str | Path, step: int) -> None:
    """Remove what a failed save of ``step`` left: its temp folder, and ``step-N`` unless ``latest.json`` points to it
    (so a full disk is not left fuller, and the previous checkpoint stays the one resumed). Main process only."""
    folder = Path(folder)
    shutil.rmtree(staging_dir(folder, step), ignore_errors=True)
    pointer = _read_json(folder / LATEST) or {}
    if pointer.get("dir") != f"step-{step}":
        shutil.rmtree(folder / f"step-{step}", ignore_errors=True)


def _prune(folder: Path, keep: int, newest: int) -> None:
    """Remove stale temp folders and all but the ``keep`` newest complete checkpoints (never the one just written).

    Temp folders of later steps are left alone: other ranks may already be writing their RNG files into them.
    """
    for path in folder.iterdir():
        temp_step = re.match(r"^tmp-step-(\d+)$", path.name)
        if temp_step and int(temp_step.group(1)) <= newest:
            shutil.rmtree(path, ignore_errors=True)
        elif re.match(r"^\.latest\.json\.[0-9a-f]+\.tmp$", path.name):  # rlhf.files.write_atomic's temp file
            path.unlink(missing_ok=True)
    complete = [(step, path) for step, path in _step_dirs(folder) if step <= newest]
    for _, path in complete[:-keep]:
        shutil.rmtree(path, ignore_errors=True)
    for step, path in _step_dirs(folder):  # newer than the one just written: from another run, never pointed to
        if step > newest:
            shutil.rmtree(path, ignore_errors=True)


def _read_json(path: Path) -> dict | None:
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def _latest_dir(folder: Path) -> Path | None:
    """The checkpoint ``latest.json`` points to; without a usable pointer, the newest complete ``step-N`` folder."""
    pointer = _read_json(folder / LATEST)
    if (
        pointer
        and isinstance(pointer.get("dir"), str)
        and _STEP_DIR.match(pointer["dir"])
        and (folder / pointer["dir"] / META_FILE).is_file()
    ):
        return folder / pointer["dir"]
    complete = [path for _, path in _step_dirs(folder) if (path / META_FILE).is_file()]
    return complete[-1] if complete else None


def load_latest(
    folder: str | Path,
    fingerprint: str,
    *,
    discard: bool = True,
    log: Callable[[str], None] = print,
    map_location: str | torch.device = "cpu",
) -> tuple[int, dict[str, Any]] | None:
    """``(step, state)`` of the newest complete checkpoint made with ``fingerprint``, else None.

    A checkpoint with another fingerprint (changed params or inputs) or one that fails to load is reported through
    ``log`` and, when ``discard`` (the main process), deleted; temp folders of killed saves are never read.
    """
    folder = Path(folder)
    latest = _latest_dir(folder)
    if latest is None:
        return None
    meta = _read_json(latest / META_FILE) or {}
    step = meta.get("step")
    if meta.get("fingerprint") != fingerprint or meta.get("format") != FORMAT:
        log(
            f"{folder}: discarding the checkpoint of step {step}: it was made with other params or inputs "
            f"(fingerprint {str(meta.get('fingerprint'))[:12]} != {fingerprint[:12]}); training starts from step 0"
        )
        if discard:
            clear(folder)
        return None
    try:
        state = torch.load(latest / STATE_FILE, map_location=map_location, weights_only=True)
    except Exception as error:  # noqa: BLE001 - a damaged file must not stop a fresh start
        log(
            f"{latest / STATE_FILE}: unreadable ({type(error).__name__}: {error}); "
            "discarding it, training starts from step 0"
        )
        if discard:
            clear(folder)
        return None
    return int(step), state


def clear(folder: str | Path) -> None:
    """Delete a stage's checkpoints (after its final outputs are written, or when they no longer match)."""
    shutil.rmtree(Path(folder), ignore_errors=True)


def kept_on_disk(stage: str, unit: str = "step", root: Path = CHECKPOINT_ROOT) -> str:
    """For the message of a stage that stopped: the resume checkpoint on disk that a rerun would start from."""
    folder = checkpoint_folder(stage, root)
    latest = _latest_dir(folder)
    step = (_read_json(latest / META_FILE) or {}).get("step") if latest is not None else None
    if step is None:
        return f"no resume checkpoint in {folder.as_posix()}"
    return (
        f"resume checkpoint of {unit} {step} kept in {folder.as_posix()}, a rerun with the same params resumes from it"
    )


# ------------------------------------------------------------------------------------------------------- the loop


def _print_event(event: str, fields: dict) -> None:
    print(f"checkpoint: {event} {json.dumps(fields, default=str)}", flush=True)


@dataclass(frozen=True)
class Processes:
    """The processes that share one checkpoint folder. The default is one process (SFT, the reward model); PPO under
    accelerate builds one from its Accelerator (:func:`rlhf.distributed.processes_of`)."""

    rank: int = 0
    world_size: int = 1
    barrier: Callable[[], None] = lambda: None  # returns once every process has called it
    gather: Callable[[int], list[int]] = lambda value: [value]  # every process's value, on every process

    @property
    def main(self) -> bool:
        return self.rank == 0


@dataclass
class ResumeCheckpoints:
    """What a training loop needs, on one process or several: resume on start, save every ``every`` steps, clear at
    the end. ``every`` ≤ 0 turns saving off (resume still works).

    Every method is called on every process; the main process alone writes ``state.pt`` and deletes, and only it
    reports through ``notify(event, fields)``: ``resumed`` {step}, ``checkpoint`` {step, seconds},
    ``checkpoint_discarded`` {reason} and ``checkpoint_unsupported`` {reason} (the stage programs forward these as
    events). ``noun`` and ``unit`` word the sentence of :meth:`kept` ("checkpoint", "step" by default).
    """

    folder: Path
    fingerprint: str
    every: int
    notify: Callable[[str, dict], None] = _print_event
    processes: Processes = field(default_factory=Processes)
    keep: int = 1
    noun: str = "checkpoint"
    unit: str = "step"
    extras: Callable[[], dict] = dict  # the caller's bookkeeping, saved under "extras" by loops that record it (PPO)
    step: int = field(default=0, init=False)  # the step resumed from (0: a fresh start)
    last_step: int | None = field(default=None, init=False)  # step of the newest checkpoint on disk, if known
    state: dict[str, Any] | None = field(
        default=None, init=False, repr=False
    )  # loaded by open(), handed over by resume()
    opened: bool = field(default=False, init=False)

    @classmethod
    def for_config(cls, stage: str, config: Any, seed: int, *inputs: Path, **options: Any) -> ResumeCheckpoints:
        """A one-process training stage's checkpoints: saved every ``config.resume_every`` steps, valid only for the
        same ``config`` (how often to save aside), ``seed`` and ``inputs`` (content hashes)."""
        return cls.for_stage(stage, config.resume_every, config_part(config), seed, *inputs, **options)

    @classmethod
    def for_stage(cls, stage: str, every: int, *parts: Any, **options: Any) -> ResumeCheckpoints:
        """The checkpoints of ``stage`` in :data:`CHECKPOINT_ROOT`, fingerprinted by ``parts``
        (see :func:`fingerprint`); ``options``: the other fields (notify, processes, noun, unit …)."""
        return cls(checkpoint_folder(stage), fingerprint(*parts), every, **options)

    def _report(self, event: str, fields: dict) -> None:
        if self.processes.main:
            self.notify(event, fields)

    def due(self, step: int, total: int) -> bool:
        """Save after ``step`` completed steps? Never at the last step: the final model is written instead."""
        return self.every > 0 and step % self.every == 0 and 0 < step < total

    def open(
        self, validate: Callable[[dict], str | None] = lambda extras: None, unsupported: str | None = None
    ) -> dict | None:
        """Load the newest checkpoint made with this fingerprint; returns its ``extras`` (None: a fresh start, after
        which the main process empties the folder). ``validate(extras)`` may veto a checkpoint with a reason (files it
        relies on are gone); ``unsupported``: why this launch cannot checkpoint at all (saving is then off)."""
        self.opened, found, processes = True, None, self.processes
        if unsupported:
            self.every = 0
            self._report("checkpoint_unsupported", {"reason": unsupported})
        else:
            discarded = lambda why: self._report("checkpoint_discarded", {"reason": why})  # noqa: E731
            found = load_latest(self.folder, self.fingerprint, discard=False, log=discarded)
            problem = validate(found[1].get("extras", {})) if found else None
            if problem:
                discarded(
                    f"{self.folder}: discarding the checkpoint of step {found[0]}: {problem}; "
                    "training starts from step 0"
                )
                found = None
        if processes.world_size > 1:  # every rank read the same files: a disagreement is a bug, not a choice
            steps = processes.gather(found[0] if found else 0)
            if len(set(steps)) != 1:
                raise CheckpointError(f"{self.folder}: the processes found different checkpoints {steps}")
        processes.barrier()  # nobody reads the folder any more
        if found is None:
            if processes.main:
                clear(self.folder)
            processes.barrier()
            return None
        self.step, self.state, self.last_step = found[0], found[1], found[0]
        self._report("resumed", {"step": self.step})
        return found[1].get("extras", {})

    def resume(self) -> tuple[int, dict[str, Any]] | None:
        """``(step, state)`` of the checkpoint to continue from, None for a fresh start; opens the folder first unless
        the caller did. The state is handed over once (the manager keeps no reference to it)."""
        if not self.opened:
            self.open()
        state, self.state = self.state, None
        return (self.step, state) if state is not None else None

    def save(
        self,
        step: int,
        state: dict[str, Any] | Callable[[], dict[str, Any]],
        generators: Mapping[str, torch.Generator] | None = None,
    ) -> None:
        """The checkpoint after ``step`` (a collective with several processes). ``state``: the main process's state, or
        a function making it there; with ``generators`` every rank also saves its RNG streams (:func:`capture_rng`) for
        :meth:`load_rng`, without them the caller keeps its RNG in ``state``."""
        started, processes = time.perf_counter(), self.processes
        try:
            if generators is not None:
                save_rank_rng(self.folder, step, processes.rank, generators)
                processes.barrier()
            if processes.main:
                ranks = processes.world_size if generators is not None else 0
                save_checkpoint(
                    self.folder,
                    step,
                    state() if callable(state) else state,
                    self.fingerprint,
                    ranks=ranks,
                    keep=self.keep,
                )
        except Exception as error:
            if processes.main and is_no_space(error):  # e.g. this rank's RNG file: the other ranks' go too
                discard_save(self.folder, step)
            raise
        processes.barrier()
        self.last_step = step
        self._report("checkpoint", {"step": step, "seconds": round(time.perf_counter() - started, 4)})

    def load_rng(self, generators: Mapping[str, torch.Generator]) -> None:
        """This process's RNG streams as :meth:`save` saved them with the checkpoint resumed from."""
        load_rank_rng(self.folder, self.step, self.processes.rank, generators)

    def clear(self) -> None:
        """Delete the checkpoints (call once the final outputs are written)."""
        if self.processes.main:
            clear(self.folder)
        self.last_step = None

    def kept(self) -> str:
        """A sentence for error messages: which checkpoint a rerun would resume from."""
        if self.last_step is None:
            return f"no {self.noun} was saved; a rerun starts from {self.unit} 0"
        return (
            f"the last good {self.noun} ({self.unit} {self.last_step}) is kept in {self.folder}; "
            "a rerun with the same params resumes from it"
        )
