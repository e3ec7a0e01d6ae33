"""A tiny progress interface so pipelines report progress without importing rich.

The CLI passes a rich-backed implementation (``funad.cli.common``); library
callers and tests get :class:`NullProgress`.
"""

from __future__ import annotations

from typing import Optional, Protocol


class Task(Protocol):
    def advance(self, n: float = 1) -> None: ...
    def update(self, *, description: Optional[str] = None, total: Optional[float] = None, **fields: object) -> None: ...


class Progress(Protocol):
    def task(self, description: str, total: Optional[float] = None, unit: str = "it") -> Task: ...


class _NullTask:
    def advance(self, n: float = 1) -> None:
        pass

    def update(self, *, description: Optional[str] = None, total: Optional[float] = None, **fields: object) -> None:
        pass


class NullProgress:
    """Progress that shows nothing."""

    def task(self, description: str, total: Optional[float] = None, unit: str = "it") -> Task:
        return _NullTask()
