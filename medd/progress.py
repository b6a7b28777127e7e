"""Progress of long command-line work (archive verify and restore, backup and restore): a tqdm bar on a
terminal, nothing when the output is piped or redirected."""
from __future__ import annotations

import sys
from typing import Iterable, TypeVar

T = TypeVar("T")


def _shown(show: bool | None) -> bool:
    return sys.stderr.isatty() if show is None else show


def progress_bar(total: int, label: str, *, unit: str = "B", show: bool | None = False):
    """A tqdm bar to ``update(n)`` by hand (bytes by default); ``show=None`` shows it on a terminal only."""
    from tqdm import tqdm  # only when a command needs it, not with every node

    return tqdm(total=total, desc=label, unit=unit, unit_scale=unit == "B", disable=not _shown(show),
                file=sys.stderr, leave=False)


def progress(items: Iterable[T], label: str, *, total: int | None = None, show: bool | None = None) -> Iterable[T]:
    """``items``, with a bar on stderr when it is a terminal (``show`` overrides the guess)."""
    from tqdm import tqdm

    if total is None and hasattr(items, "__len__"):
        total = len(items)
    return tqdm(items, desc=label, total=total, unit="obj", disable=not _shown(show), file=sys.stderr, leave=False)
