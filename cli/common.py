"""Shared pieces of the command line: rich logging, progress bars, error mapping."""

from __future__ import annotations

import functools
import logging
import sys
from typing import Callable, Optional

import click
from rich.console import Console
from rich.logging import RichHandler
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress as RichProgressBar,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

console = Console(stderr=True)
stdout_console = Console()


def setup_logging(verbose: int = 0) -> None:
    level = logging.DEBUG if verbose > 1 else logging.INFO if verbose == 1 else logging.WARNING
    root = logging.getLogger()
    root.handlers[:] = [RichHandler(console=console, show_path=False, rich_tracebacks=False)]
    root.setLevel(logging.WARNING)
    logging.getLogger("funad").setLevel(level if verbose else logging.INFO)


class _RichTask:
    def __init__(self, bar: RichProgressBar, task_id: int) -> None:
        self._bar, self._id = bar, task_id

    def advance(self, n: float = 1) -> None:
        self._bar.advance(self._id, n)

    def update(self, *, description: Optional[str] = None, total: Optional[float] = None, **fields: object) -> None:
        kw: dict = {}
        if description is not None:
            kw["description"] = description
        if total is not None:
            kw["total"] = total
        info = "  ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in fields.items())
        self._bar.update(self._id, info=info, **kw)


class RichProgress:
    """Implements ``funad.pipelines.progress.Progress`` with a rich live bar.

    Use as a context manager; the bar shows the rate in ``unit``/s.
    """

    def __init__(self, disable: bool = False) -> None:
        self._bar = RichProgressBar(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TaskProgressColumn(),
            TextColumn("{task.fields[rate]}"),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
            TextColumn("{task.fields[info]}"),
            console=console,
            disable=disable,
            transient=False,
        )

    def __enter__(self) -> "RichProgress":
        self._bar.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._bar.__exit__(*exc)

    def task(self, description: str, total: Optional[float] = None, unit: str = "it") -> _RichTask:
        task_id = self._bar.add_task(description, total=total, info="", rate="")
        task = _RichTask(self._bar, task_id)
        bar = self._bar

        orig_advance = task.advance

        def advance(n: float = 1) -> None:
            orig_advance(n)
            speed = bar.tasks[task_id].speed if task_id < len(bar.tasks) else None
            if speed:
                bar.update(task_id, rate=f"{speed:.1f} {unit}/s")

        task.advance = advance  # type: ignore[method-assign]
        return task


def user_errors(fn: Callable) -> Callable:
    """Turn the library's user-facing exceptions into clean click errors (no traceback)."""
    from funad.cache import CacheError  # local import keeps `cli` import cheap
    from funad.errors import FunADError
    from funad.pipelines.errors import PipelineError

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (CacheError, FunADError, PipelineError) as exc:
            raise click.ClickException(str(exc)) from exc
        except KeyboardInterrupt:
            console.print("[yellow]interrupted; completed work is kept and a re-run resumes[/]")
            sys.exit(130)

    return wrapper
