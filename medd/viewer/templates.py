"""Per-modality report templates: text files a site edits, in the folder
``[reading_room] templates`` names (medd ships ``etc/templates``).

A file is named for the modalities it serves, joined by ``-``
(``CT.txt``, ``CR-DX.txt``); ``default.txt`` serves any other. A new draft
starts from the template of the study's modality. The files are read each
time a report is started, so an edit applies at once. Blocking; run on a
thread pool.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

MAX_TEMPLATE = 64 * 1024
NAME = re.compile(r"^[A-Za-z0-9]{1,16}(-[A-Za-z0-9]{1,16})*\.txt$")
DEFAULT = "default.txt"
# Modalities that are not the images being read: a study's report, presentation states, key images.
NOT_READ = ("SR", "PR", "KO", "DOC")


@dataclass(frozen=True)
class Template:
    name: str  # the file's name, e.g. CR-DX.txt
    text: str


def template_for(folder: Path, modalities) -> Template | None:
    """The template of the first of ``modalities`` that has one, else ``default.txt``, else None."""
    by_modality: dict[str, Path] = {}
    try:
        files = sorted(p for p in folder.iterdir() if p.is_file() and NAME.match(p.name))
    except OSError:
        return None
    for path in files:
        if path.name != DEFAULT:
            for modality in path.stem.upper().split("-"):
                by_modality.setdefault(modality, path)
    wanted = [m.upper() for m in modalities if m and m.upper() not in NOT_READ]
    path = next((by_modality[m] for m in wanted if m in by_modality), None) or folder / DEFAULT
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_TEMPLATE + 1)
    except OSError:
        return None
    if len(data) > MAX_TEMPLATE:
        data = data[:MAX_TEMPLATE]
    return Template(path.name, data.decode("utf-8", "replace").replace("\r\n", "\n"))
