"""Progress bars on a terminal (rich), for work on large guests; silent otherwise."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager

SHOW_ABOVE = 256 << 20  # bytes: smaller jobs finish before a bar would help


@contextmanager
def bar(description: str, stream: object = None) -> Iterator[Callable[[int], Callable[[int], None]]]:
    """Yields a factory: factory(total_bytes) -> advance(n) callback."""
    out = stream or sys.stderr
    if not getattr(out, "isatty", lambda: False)():
        yield lambda total: (lambda n: None)
        return
    from rich.progress import BarColumn, DownloadColumn, Progress, TransferSpeedColumn

    with Progress("[progress.description]{task.description}", BarColumn(), DownloadColumn(),
                  TransferSpeedColumn(), transient=True) as prog:
        def factory(total: int) -> Callable[[int], None]:
            if total < SHOW_ABOVE:
                return lambda n: None
            task = prog.add_task(description, total=total)
            return lambda n: prog.advance(task, n)
        yield factory
