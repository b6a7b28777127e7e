"""The viewer's access policies: its DICOMweb and pages serve only a logged-in
radiologist (the reading room's session cookie), and objects enter a viewer
only from central: its outbox (the requestor), central's push to
``POST /packages`` with the token configured on both sides (central's
``[push] http_token``, the viewer's ``[central] push_token``), or the
viewer's own reading room; never from another sender on one of its listeners.
The one STOW-RS a viewer takes is a logged-in radiologist's, from the reading
room's own pages (OHIF saving measurements): the session cookie, plus a
same-origin check against cross-site request forgery (the browser's
``Sec-Fetch-Site: same-origin``, or an ``Origin`` naming this host; a request
with neither is refused too, since every browser sends one of them with a
POST). What such a STOW may carry (SR and presentation states, no images) the
DICOMweb transport checks by the decision's role. An image whose pixel data
its DICOMweb sent to a radiologist is recorded as opened by them."""
from __future__ import annotations

import hmac
from urllib.parse import urlsplit

from twisted.internet.defer import ensureDeferred

from medd.dicomjson import metadata_json
from medd.objects import SR_SOP_CLASS_PREFIX
from medd.plugins.hookspecs import AccessClaim, AccessDecision, SenderClaim, hookimpl
from medd.viewer.reading import MEASUREMENT_TRANSPORTS
from medd.viewer.web.session import SESSION_COOKIE

# The transports objects legitimately reach a viewer's ingest by.
OWN_TRANSPORTS = ("pull", "local")
# What a report's Medd-Report-Source is read from: central (the pull; a push, which the sender policy below
# admits only with central's token) or this viewer's own reading room (local).
VOUCHING_TRANSPORTS = OWN_TRANSPORTS + ("http", "https")


def keep_report_sources(keep):
    """The viewer ingest's ``package_with``: for a report package from central or the reading room, ``keep(conn,
    uid, source)`` who it says made it, in the report's index transaction. From anyone else (which the sender
    policy refuses anyway) the header is not read: the report is then vouched for by no one."""
    def package_with(conn, record, package) -> None:
        if (record.object_type == "report" and package.report_source is not None
                and record.transport in VOUCHING_TRANSPORTS):
            keep(conn, record.sop_instance_uid, package.report_source)

    return package_with


class ViewerAccess:
    def __init__(self, reading_room, push_token: str | None = None, metadata_cache=None):
        self.reading_room = reading_room
        self.push_token = push_token
        self.metadata_cache = metadata_cache

    def _from_central(self, token: str | None) -> bool:
        return bool(self.push_token and token and hmac.compare_digest(token.encode(), self.push_token.encode()))

    @hookimpl
    def medd_check_access(self, claim: AccessClaim):
        if claim.action == "package":
            if self._from_central(claim.credentials):
                return AccessDecision(True, who="central", authenticated=True, role="central")
            return AccessDecision(False, reason="a viewer takes packages only from central (its [central] push_token)")
        if claim.action == "store" and not (claim.cookies or {}).get(SESSION_COOKIE.decode()):
            return AccessDecision(False, authenticated=claim.presented,
                                  reason="a viewer takes objects only from central, and measurements only from a "
                                         "logged-in radiologist")
        return ensureDeferred(self._radiologist(claim))

    async def _radiologist(self, claim: AccessClaim) -> AccessDecision:
        token = (claim.cookies or {}).get(SESSION_COOKIE.decode())
        if not token:
            return AccessDecision(False, reason="log in to the reading room first")
        state = await self.reading_room.session_state(token)
        if state is None:
            return AccessDecision(False, reason="the reading-room session has ended; log in again")
        if state.locked:
            return AccessDecision(False, authenticated=True,
                                  reason="the reading room is locked; type your password on its page to unlock it")
        if claim.action == "store" and not same_origin(claim):
            return AccessDecision(False, who=state.user, authenticated=True,
                                  reason="a measurement is stored only from the reading room's own pages "
                                         f"(Origin {claim.origin or 'missing'}, Sec-Fetch-Site "
                                         f"{claim.fetch_site or 'missing'})")
        return AccessDecision(True, who=state.user, authenticated=True, role="radiologist")

    @hookimpl
    def medd_pixel_data_retrieved(self, uid: str, who: str, peer: str | None):
        """A radiologist's browser fetched an image's pixel data (WADO-RS) to show it: the image is opened."""
        return ensureDeferred(self.reading_room.pixels_shown(uid, who, peer))

    @hookimpl
    def medd_object_stored(self, stored):
        """Every DICOM object's WADO-RS metadata is cached as it arrives; a radiologist's measurement report
        (an SR stored over STOW-RS) sends its overlays to central."""
        return ensureDeferred(self._stored(stored))

    async def _stored(self, stored) -> None:
        if self.metadata_cache is not None and stored.media_type == "application/dicom":
            data = await self.reading_room.ingest.read_blob(stored.digest)
            document = await self.reading_room.ingest.run_blocking(metadata_json, data)
            await self.metadata_cache.put({stored.digest: document})
        if stored.object_type == "overlay" and stored.transport in MEASUREMENT_TRANSPORTS \
                and (stored.sop_class_uid or "").startswith(SR_SOP_CLASS_PREFIX):
            await self.reading_room.measurements_saved(stored)

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


def same_origin(claim: AccessClaim) -> bool:
    """Whether a browser sent the request from this site's own pages: ``Sec-Fetch-Site: same-origin``, else an
    ``Origin`` whose host is the request's ``Host``. A cross-site value of either refuses."""
    if claim.fetch_site is not None and claim.fetch_site.lower() != "same-origin":
        return False
    if claim.origin is not None:
        return bool(claim.host) and claim.origin != "null" and urlsplit(claim.origin).netloc.lower() == claim.host.lower()
    return claim.fetch_site is not None
