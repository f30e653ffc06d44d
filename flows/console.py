"""What a person sees while `rlhf run` works: per stage a start line, a live progress bar, a summary line.

    [6/8] ppo           started 08:41:02 · log .rlhf/logs/ppo.log
          ppo           ━━━━━━━━━━━━━━╸━━━━━━━━━━━━━━━  31/60  52% · RM score 1.21 · KL 1.87 · 0:52, about 0:48 left
    [6/8] ppo           done in 1 min 44 s · RM score 1.43 · KL 2.42 → models/policy, models/policy_checkpoints

In a terminal the bar redraws in place (carriage return, at most 5 times a second); anywhere else (a CI log, a file,
a pipe) it is plain text with no control characters: a progress line at each quarter of the loop instead. The
stage's own output (DVC, accelerate, the programs' plain lines) goes to ``.rlhf/logs/STAGE.log`` and the Prefect UI;
``--verbose`` turns Prefect's console handler back on, which prints it here too (and the bar becomes plain lines, so
the two never overwrite each other). The numbers come from the stage's events (tasks/stage_io.py) and metrics files.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from typing import TextIO

from tasks.stage_io import key_numbers

BAR_WIDTH = 30
NAME_WIDTH = 13
REDRAW_EVERY_S = 0.2
PLAIN_MARKS = 4  # without a terminal: one progress line per quarter of the loop


def duration(seconds: float) -> str:
    """``42 s``, ``3 min 05 s``, ``1 h 02 min``."""
    seconds = max(0.0, seconds)
    if seconds < 60:
        return f"{seconds:.0f} s" if seconds >= 10 else f"{seconds:.1f} s"
    minutes, secs = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {secs:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def clock(seconds: float) -> str:
    """``1:05`` (minutes:seconds) or ``1:02:05``."""
    minutes, secs = divmod(round(max(0.0, seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def bar(fraction: float, width: int = BAR_WIDTH) -> str:
    """A progress bar of ``width`` cells: ``━━━━╸───``."""
    done = max(0.0, min(1.0, fraction)) * width
    full = int(done)
    head = "╸" if full < width and done - full >= 0.5 else ""
    return "━" * full + head + "─" * (width - full - len(head))


def progress_text(record: dict, elapsed_s: float, with_bar: bool) -> str:
    """``31/60  52% · RM score 1.21 · KL 1.87 · 0:52, about 0:48 left`` (with a bar first in a terminal)."""
    step, total = int(record["step"]), int(record["total"])
    fraction = step / total if total else 0.0
    parts = [f"{step}/{total}  {fraction:4.0%}"]
    numbers = key_numbers(record)
    if numbers:
        parts.append(numbers)
    timing = clock(elapsed_s)
    if 0 < fraction < 1:
        timing += f", about {clock(elapsed_s * (1 - fraction) / fraction)} left"
    parts.append(timing)
    text = " · ".join(parts)
    return f"{bar(fraction)}  {text}" if with_bar else text


@dataclass
class Console:
    """The person-facing output of a pipeline run (one stage at a time)."""

    stream: TextIO = field(default_factory=lambda: sys.stdout)
    tty: bool | None = None  # None: ask the stream
    verbose: bool = False  # Prefect's console handler prints every log line too: plain progress lines, no redraws
    _stage: str = ""
    _label: str = ""
    _started: float = 0.0
    _bar_shown: bool = False
    _last_draw: float = 0.0
    _marks_shown: int = 0

    def __post_init__(self) -> None:
        if self.tty is None:
            self.tty = bool(getattr(self.stream, "isatty", lambda: False)()) and os.environ.get("TERM") != "dumb"
        self.tty = self.tty and not self.verbose

    def _write(self, text: str) -> None:
        self.stream.write(text)
        self.stream.flush()

    def line(self, text: str) -> None:
        """One line, after clearing a bar being drawn."""
        self._clear_bar()
        self._write(text + "\n")

    def _clear_bar(self) -> None:
        if self._bar_shown:
            self._write("\r\x1b[K")
            self._bar_shown = False

    def stage_started(self, stage: str, index: int, total: int, log_path: str) -> None:
        self._stage, self._label = stage, f"[{index}/{total}] {stage:<{NAME_WIDTH}}"
        self._started, self._marks_shown, self._last_draw = time.monotonic(), 0, 0.0
        self.line(f"{self._label} started {time.strftime('%H:%M:%S')} · log {log_path}")

    def event(self, record: dict) -> None:
        """A stage event: progress moves the bar; a resume is worth a line."""
        if record.get("event") == "resumed":
            self.line(f"{' ' * 6}{self._stage:<{NAME_WIDTH}} resumed from step {record.get('step')}")
        if record.get("event") != "progress" or not record.get("total"):
            return
        elapsed = time.monotonic() - self._started
        step, total = int(record["step"]), int(record["total"])
        if self.tty:
            now = time.monotonic()
            if now - self._last_draw >= REDRAW_EVERY_S or step == total:
                self._last_draw = now
                text = f"{' ' * 6}{self._stage:<{NAME_WIDTH}} {progress_text(record, elapsed, True)}"
                width = shutil.get_terminal_size().columns - 1  # a wrapped bar could not be redrawn in place
                self._write(f"\r\x1b[K{text[:width]}")
                self._bar_shown = True
            return
        mark = PLAIN_MARKS * step // total
        if mark > self._marks_shown and step < total:
            self._marks_shown = mark
            self.line(f"{' ' * 6}{self._stage:<{NAME_WIDTH}} {progress_text(record, elapsed, False)}")

    def stage_finished(self, summary: str, outputs: list[str], skipped: bool) -> None:
        if skipped:
            self.line(f"{self._label} unchanged: skipped by DVC (outputs from its cache)")
            return
        took = duration(time.monotonic() - self._started)
        where = f" → {', '.join(outputs)}" if outputs else ""
        self.line(f"{self._label} done in {took}" + (f" · {summary}" if summary else "") + where)

    def api_unreachable(self, api_url: str, error: str) -> None:
        """The Prefect API stopped answering while the stage runs (flows/stages.py ApiWatch)."""
        self.line(
            f"{' ' * 6}{self._stage:<{NAME_WIDTH}} the Prefect API at {api_url} does not answer ({error}); the stage "
            "goes on, and the run stops after it unless the server answers again by then"
        )

    def api_answers(self, api_url: str) -> None:
        self.line(f"{' ' * 6}{self._stage:<{NAME_WIDTH}} the Prefect API at {api_url} answers again: the run goes on")

    def stage_failed(self, exit_code: int, reason: list[str], log_path: str) -> None:
        took = duration(time.monotonic() - self._started)
        self.line(f"{self._label} FAILED after {took} (exit {exit_code}); full output: {log_path}")
        for text in reason:
            self.line(f"{' ' * 6}{text}")


_console: Console | None = None


def console() -> Console:
    """The process's console (stdout; ``RLHF_VERBOSE=1``: `rlhf run --verbose`)."""
    global _console
    if _console is None:
        _console = Console(verbose=os.environ.get("RLHF_VERBOSE", "") not in ("", "0"))
    return _console
