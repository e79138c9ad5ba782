"""Progress of the long stages (transform, training): a Prefect progress artifact in every run,
and a rich progress bar when the terminal is a TTY (plain log lines otherwise).

The library reports through ``progress`` callbacks; this module turns them into both. A stage
is opened by the flow or task that knows its total (``open_stage``) and advanced by whoever
does the work in this process (``advance``): shard tasks run on threads of the flow's
process, so they find their stage here. Tasks on Dask workers are other processes: there the
stage is unknown and ``advance`` does nothing; the flow completes the stage when it ends.
"""

from __future__ import annotations

import sys
import threading
import time
from typing import Any, Optional

from prefect.artifacts import create_progress_artifact, update_progress_artifact

# The artifact is updated at most this often: each update is an API call.
ARTIFACT_EVERY_SECONDS = 2.0

_lock = threading.Lock()
_stages: dict[str, "Stage"] = {}
_bar: Any = None  # one rich Progress for every stage of this process, while a stage is open


def terminal() -> bool:
    """A person watches this terminal (stdout is a TTY): show bars."""
    return sys.stdout.isatty()


def _log_console() -> Any:
    """The rich console Prefect's log lines are printed on: the bar shares it, so log lines scroll above the bar."""
    import logging

    from prefect.logging.handlers import PrefectConsoleHandler
    from rich.console import Console

    from rich.default_styles import DEFAULT_STYLES
    from rich.theme import Theme

    for name in ("prefect", "prefect.flow_runs", "prefect.task_runs", ""):
        for handler in logging.getLogger(name).handlers:
            if isinstance(handler, PrefectConsoleHandler):
                # Prefect's theme has only its own styles: add rich's bar and progress styles to it.
                bar_styles = {key: style for key, style in DEFAULT_STYLES.items() if key.startswith(("bar.", "progress."))}
                handler.console.push_theme(Theme(bar_styles, inherit=False))
                return handler.console
    return Console(file=sys.stderr)


class Stage:
    """One stage's progress: ``done`` of ``total`` units, mirrored in an artifact and maybe a bar."""

    def __init__(self, key: str, title: str, total: int, unit: str):
        self.key, self.title, self.total, self.unit = key, title, max(total, 1), unit
        self.done = 0
        self.note = ""
        self.started = time.monotonic()
        self._artifact_at = 0.0
        self.artifact_id = create_progress_artifact(progress=0.0, key=key, description=self._description())
        self.bar_task = _bar.add_task(title, total=self.total, note="") if _bar is not None else None

    def _rate(self) -> str:
        return f"{self.done / max(time.monotonic() - self.started, 1e-9):.1f} {self.unit}/s"

    def _description(self) -> str:
        text = f"{self.title}: {self.done}/{self.total} {self.unit} ({self._rate()})"
        return f"{text}; {self.note}" if self.note else text

    def advance(self, units: int = 1, note: Optional[str] = None, *, to: Optional[int] = None) -> None:
        with _lock:
            self.done = min(self.total, to if to is not None else self.done + units)
            if note is not None:
                self.note = note
            if self.bar_task is not None and _bar is not None:
                try:
                    _bar.update(self.bar_task, total=self.total, completed=self.done,
                                note=f"{self._rate()}  {self.note}".rstrip())
                except Exception:  # a display problem never fails a run
                    self.bar_task = None
            now = time.monotonic()
            if now - self._artifact_at < ARTIFACT_EVERY_SECONDS and self.done < self.total:
                return
            self._artifact_at = now
        update_progress_artifact(self.artifact_id, 100.0 * self.done / self.total, description=self._description())


def open_stage(key: str, title: str, total: int, unit: str) -> Stage:
    """Start reporting a stage (artifact ``key``) of ``total`` units."""
    global _bar
    with _lock:
        if terminal() and _bar is None:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            _bar = Progress(
                TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                TextColumn("{task.fields[note]}"), TimeElapsedColumn(),
                console=_log_console(), transient=False,
            )
            try:
                _bar.start()
            except Exception:  # a display problem never fails a run: log lines remain
                _bar = None
    stage = Stage(key, title, total, unit)
    with _lock:
        _stages[key] = stage
    return stage


def advance(key: str, units: int = 1, note: Optional[str] = None) -> None:
    """Advance the open stage ``key`` of this process, if any."""
    stage = _stages.get(key)
    if stage is not None:
        stage.advance(units, note)


def close_stage(stage: Stage, note: Optional[str] = None) -> None:
    """The stage is over: 100 %, and the bar stops with the last stage.

    Work that ended sooner (early stopping) becomes the total; work that never reported
    (a cache hit) counts as done.
    """
    global _bar
    with _lock:
        if 0 < stage.done < stage.total:
            stage.total = stage.done
    stage.advance(to=stage.total, note=note)
    with _lock:
        _stages.pop(stage.key, None)
        if _bar is not None and not _stages:
            _bar.stop()
            _bar = None
