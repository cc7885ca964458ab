"""Progress bars: the library reports through callbacks and generators, only the app draws."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn


def make_progress() -> Progress:
    """Bars on stderr, so stdout carries only results (written files, figures)."""
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    transient=True, console=Console(stderr=True))


@contextlib.contextmanager
def tensor_progress(label: str) -> Iterator[Callable[[int, int], None]]:
    """A `progress(done, total)` callback drawn as one bar."""
    with make_progress() as bar:
        task = bar.add_task(label, total=None)

        def update(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        yield update
