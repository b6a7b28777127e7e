"""The viewer's access policies: its DICOMweb and pages serve only a logged-in
radiologist (the reading room's session cookie), and objects enter a viewer
only from central: its outbox (the requestor), central's push to
``POST /packages`` with the token configured on both sides (central's
``[push] http_token``, the viewer's ``[central] push_token``), or the
viewer's own reading room; never from another sender on one of its listeners.
An image whose pixel data its DICOMweb sent to a radiologist is recorded as
opened by them."""
from __future__ import annotations

import hmac

from twisted.internet.defer import ensureDeferred

from medd.plugins.hookspecs import AccessClaim, AccessDecision, SenderClaim, hookimpl
from medd.viewer.web.session import SESSION_COOKIE

# The transports objects legitimately reach a viewer's ingest by.
OWN_TRANSPORTS = ("pull", "local")


class ViewerAccess:
    def __init__(self, reading_room, push_token: str | None = None):
        self.reading_room = reading_room
        self.push_token = push_token

    def _from_central(self, token: str | None) -> bool:
        return bool(self.push_token and token and hmac.compare_digest(token.encode(), self.push_token.encode()))

    @hookimpl
    def medd_check_access(self, claim: AccessClaim):
        if claim.action == "package":
            if self._from_central(claim.credentials):
                return AccessDecision(True, who="central", authenticated=True, role="central")
            return AccessDecision(False, reason="a viewer takes packages only from central (its [central] push_token)")
        if claim.action == "store":
            return AccessDecision(False, authenticated=claim.presented,
                                  reason="a viewer takes objects only from central")
        return ensureDeferred(self._radiologist(claim))

    async def _radiologist(self, claim: AccessClaim) -> AccessDecision:
        token = (claim.cookies or {}).get(SESSION_COOKIE.decode())
        if not token:
            return AccessDecision(False, reason="log in to the reading room first")
        user = await self.reading_room.user_for_session(token)
        if user is None:
            return AccessDecision(False, reason="the reading-room session has ended; log in again")
        return AccessDecision(True, who=user, authenticated=True, role="radiologist")

    @hookimpl
    def medd_pixel_data_retrieved(self, uid: str, who: str, peer: str | None):
        """A radiologist's browser fetched an image's pixel data (WADO-RS) to show it: the image is opened."""
        return ensureDeferred(self.reading_room.pixels_shown(uid, who, peer))

    @hookimpl
    def medd_check_sender(self, claim: SenderClaim):
        if claim.transport in OWN_TRANSPORTS:
            return None
        if claim.transport in ("http", "https") and self._from_central(claim.credentials):
            return None
        if claim.signer is not None:
            # Verified against [mail] smime_recipient, central's certificate: only central signs so.
            return None
        return (f"this viewer takes packages only from central, not over {claim.transport} "
                "(send them to central)")
