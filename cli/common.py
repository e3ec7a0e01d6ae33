"""Shared pieces of the command line: logging, consoles, the progress bar and the error mapping.

On a terminal, log lines and progress bars are drawn by rich. When stdout or
stderr is not a terminal (piped, redirected, CI), each line is written plain
and unwrapped, and no progress bar is drawn.
"""

from __future__ import annotations

import functools
import logging
import sys
from typing import Callable, Optional

import click
from rich.console import Console
from rich.table import Column
from rich.logging import RichHandler
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress as RichProgressBar,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from funad.pipelines.errors import user_error_types

# Width given to a console that is not a terminal: wide enough that rich never wraps a line.
_UNWRAPPED = 10_000


def _console(stream) -> Console:
    """A console on ``stream`` (resolved at print time, so CliRunner's capture works) that never wraps when piped."""
    if stream.isatty():
        return Console(stderr=stream is sys.stderr)
    return Console(stderr=stream is sys.stderr, soft_wrap=True, width=_UNWRAPPED)


console = _console(sys.stderr)  # messages and logs
stdout_console = _console(sys.stdout)  # results (tables)


class _PlainFormatter(logging.Formatter):
    """``message`` for INFO, ``WARNING: message`` for the rest: one unwrapped line per record."""

    def format(self, record: logging.LogRecord) -> str:
        text = record.getMessage()
        return text if record.levelno == logging.INFO else f"{record.levelname}: {text}"


def setup_logging(verbose: int = 0) -> None:
    """Log funad's INFO lines (DEBUG with -vv) to stderr: through rich on a terminal, plain otherwise."""
    level = logging.DEBUG if verbose > 1 else logging.INFO
    if console.is_terminal:
        handler: logging.Handler = RichHandler(console=console, show_path=False, rich_tracebacks=False)
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(_PlainFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)
    logging.getLogger("funad").setLevel(level)


class _RichTask:
    """One bar: ``advance`` moves it (and its rate in ``unit``/s); ``update`` sets its text fields."""

    def __init__(self, bar: RichProgressBar, task_id, unit: str) -> None:
        self._bar, self._id, self._unit = bar, task_id, unit
        self._own_rate = False

    def advance(self, n: float = 1) -> None:
        self._bar.advance(self._id, n)
        speed = self._bar.tasks[self._id].speed if self._id < len(self._bar.tasks) else None
        if speed and not self._own_rate:
            self._bar.update(self._id, rate=f"{speed:.3g} {self._unit}/s")

    def update(self, *, description: Optional[str] = None, total: Optional[float] = None, **fields: object) -> None:
        kw: dict = {}
        if description is not None:
            kw["description"] = description
        if total is not None:
            kw["total"] = total
        rate = fields.pop("it/s", None)  # a rate the task measures itself replaces the bar's units/s
        if isinstance(rate, (int, float)):
            kw["rate"], self._own_rate = f"{rate:.3g} it/s", True
        info = " ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in fields.items())
        self._bar.update(self._id, info=info, **kw)


class RichProgress:
    """Implements ``funad.pipelines.progress.Progress`` with a rich live bar (nothing when not a terminal).

    One line per task, laid out to fit 100 columns: description, a short
    bar, done/total, elapsed, ETA, rate (the task's own ``it/s`` field when
    it reports one, else units/s), then the task's other fields (the fit's
    losses), which are cut first when the line is too long.
    """

    def __init__(self, disable: bool = False, console: Console = console) -> None:
        def fixed(width: Optional[int] = None) -> Column:
            return Column(no_wrap=True, min_width=width)

        self._bar = RichProgressBar(
            TextColumn("[bold]{task.description}", table_column=Column(no_wrap=True, max_width=24,
                                                                       overflow="ellipsis")),
            BarColumn(bar_width=12, table_column=fixed(12)),
            MofNCompleteColumn(table_column=fixed()),
            TimeElapsedColumn(table_column=fixed(7)),
            TextColumn("eta", table_column=fixed()),
            TimeRemainingColumn(table_column=fixed(7)),
            TextColumn("{task.fields[rate]}", table_column=fixed()),
            # The task's fields (the fit's losses and it/s) take what is left and are cut first.
            TextColumn("{task.fields[info]}", table_column=Column(no_wrap=True, overflow="ellipsis", ratio=1)),
            console=console,
            disable=disable or not console.is_terminal,
            transient=False,
            expand=True,
        )

    def __enter__(self) -> "RichProgress":
        self._bar.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._bar.__exit__(*exc)

    def task(self, description: str, total: Optional[float] = None, unit: str = "it") -> _RichTask:
        return _RichTask(self._bar, self._bar.add_task(description, total=total, info="", rate=""), unit)


def user_errors(fn: Callable) -> Callable:
    """Turn the library's user-facing exceptions into clean click errors (no traceback)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except user_error_types() as exc:
            raise click.ClickException(str(exc)) from exc
        except KeyboardInterrupt:
            console.print("[yellow]interrupted; finished work is kept: run the same command again to continue "
                          "(funad fit: add --resume)[/]")
            sys.exit(130)

    return wrapper


class LazyChoice(click.Choice):
    """A ``click.Choice`` whose choices are read when first needed (so listing them imports nothing at start-up)."""

    def __init__(self, load: Callable[[], tuple]) -> None:
        self._load, self._choices, self.case_sensitive = load, None, True

    @property
    def choices(self) -> tuple:  # type: ignore[override]
        if self._choices is None:
            self._choices = tuple(self._load())
        return self._choices

    @choices.setter
    def choices(self, value) -> None:
        self._choices = tuple(value)
