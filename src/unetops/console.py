"""Logging and progress bars on stderr, so stdout stays clean for piping."""

import logging
from collections.abc import Iterable, Iterator
from typing import TypeVar

from rich.console import Console
from rich.logging import RichHandler
from rich.progress import track as _rich_track

T = TypeVar("T")

console = Console(stderr=True)
logging.basicConfig(
    level=logging.INFO,
    format="%(message)s",
    datefmt="[%X]",
    handlers=[RichHandler(console=console, show_path=False, rich_tracebacks=False)],
)
log = logging.getLogger("unetops")


def track(items: Iterable[T], description: str, total: int | None = None) -> Iterator[T]:
    """A progress bar over ``items`` (hidden when stderr is not a terminal)."""
    yield from _rich_track(
        items, description=description, total=total, console=console, transient=True,
        disable=not console.is_terminal,
    )
