"""Progress of long command-line work (archive verify and restore, backup and restore): a tqdm bar on a
terminal, nothing when the output is piped or redirected."""
from __future__ import annotations

import sys
from typing import Iterable, TypeVar

from tqdm import tqdm

T = TypeVar("T")


def progress(items: Iterable[T], label: str, *, total: int | None = None, show: bool | None = None) -> Iterable[T]:
    """``items``, with a bar on stderr when it is a terminal (``show`` overrides the guess)."""
    if show is None:
        show = sys.stderr.isatty()
    if total is None and hasattr(items, "__len__"):
        total = len(items)
    return tqdm(items, desc=label, total=total, unit="obj", disable=not show, file=sys.stderr, leave=False)
