"""The reading room: the radiologist's web UI, served by the viewer node.

Server-rendered pages (twisted.web.template, so every value is escaped) over
the viewer's :class:`~medd.viewer.contract.IReadingRoom`: login, the
worklist, and a study's reading screen: the patient banner, its images
and its report panel side by side (:mod:`.reading_screen`). The images are shown by OHIF
Viewer 3 (:mod:`.ohif`), which reads them from the node's own DICOMweb
with the session cookie; pixel data it fetches marks the image opened
(:mod:`medd.viewer.access`).

The modules, by concern: :mod:`.session` (cookies, CSRF, forms),
:mod:`.serving` and :mod:`.layout` (answering, the page skeleton),
:mod:`.pages` (login), :mod:`.worklist` (the worklist and its API), :mod:`.locking` (the idle
lock), :mod:`.reading_screen` (a study: its images beside its report), :mod:`.ohif` (OHIF's app and configuration)
and :mod:`.resources` (static files).
"""
from __future__ import annotations

from pathlib import Path

from twisted.web.resource import Resource

from medd.viewer.web.locking import LockAction, UnlockResource
from medd.viewer.web.pages import HomePage, LoginAction, LogoutAction
from medd.viewer.web.reading_screen import StudiesResource
from medd.viewer.web.worklist import WorklistResource, api_resources
from medd.viewer.web.ohif import load_app, ohif_resources
from medd.viewer.web.resources import STATIC, StaticFiles
from medd.viewer.web.serving import ApiResource, Room
from medd.viewer.web.session import CSRF_HEADER, csrf_token

__all__ = ["CSRF_HEADER", "csrf_token", "reading_room_resources"]


def reading_room_resources(reading_room, api, ohif_dist: Path | None = None) -> dict[bytes, Resource]:
    """The reading room's resources, by first path segment, for the viewer's HTTP listener.

    ``reading_room`` provides :class:`~medd.viewer.contract.IReadingRoom`;
    ``api`` provides ``run_blocking`` for reading bodies and rendering; ``ohif_dist`` is OHIF's
    prebuilt app (default: where ``make ohif`` installs it).
    """
    room = Room(reading_room, api)
    resources = ohif_resources(room, load_app(ohif_dist))
    return {
        **resources,
        b"": HomePage(room),
        b"login": LoginAction(room),
        b"logout": LogoutAction(room),
        b"worklist": WorklistResource(room),
        b"studies": StudiesResource(room),
        b"static": StaticFiles(str(STATIC)),
        b"api": ApiResource(room, api_resources(room)),
        b"lock": LockAction(room),
        b"unlock": UnlockResource(room),
    }
