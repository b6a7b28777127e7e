"""What a plugin sees of a config section it declared, when the node checks it.

A plugin declares the keys it reads with the ``medd_register_config`` hook and
may give a check; the check receives one :class:`SectionCheck` and reports
each problem with :meth:`SectionCheck.problem`, naming the key. The node adds
the file and section, and refuses to start on any problem, exactly as for its
own sections.
"""
from __future__ import annotations

from pathlib import Path
from types import MappingProxyType
from typing import Callable, Mapping, Optional


class SectionCheck:
    """One config section, read-only, and the way to report a problem in it."""

    def __init__(self, section: str, values: Mapping[str, str], folder: Path,
                 report: Callable[[str, Optional[str], str], None], *, check_files: bool = True):
        #: The section's name, without brackets.
        self.section = section
        #: The keys as written (lower case), values stripped; empty if the section is absent.
        self.values: Mapping[str, str] = MappingProxyType({k: v.strip() for k, v in values.items()})
        self._folder = folder
        self._report = report
        #: False for ``load_config(check_files=False)`` (a config checked before
        #: the files it names exist): skip existence checks then.
        self.check_files = check_files

    def get(self, key: str, default: str | None = None) -> str | None:
        """The value of ``key``, or ``default`` when it is absent or empty."""
        return self.values.get(key) or default

    def path(self, key: str) -> Path | None:
        """The value of ``key`` as a path, relative ones taken from the config file's folder."""
        value = self.get(key)
        if value is None:
            return None
        path = Path(value)
        return path if path.is_absolute() else self._folder / path

    def problem(self, key: str | None, message: str) -> None:
        """Report that ``key`` of this section (None: the section as a whole) is unusable, and why."""
        self._report(self.section, key, message)
