"""The ways a reading-room request ends early."""
from __future__ import annotations


class WebError(Exception):
    """A request the reading room answers with an error page (or JSON for the API)."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


class NotLoggedIn(Exception):
    """No valid session: a page redirects to the login form, the API answers 401."""


class SessionLocked(Exception):
    """The session is locked after the page sat idle: a page asks for the password again, the API answers 423."""
