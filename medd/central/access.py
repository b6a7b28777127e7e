"""Central's access policy for its HTTP listener (the ``medd_check_access`` hook).

Nothing is open. QIDO-RS and WADO-RS read patients' data: an administrator's
token or a reader's credential (``medd readers add NAME --scope read``) may.
STOW-RS and ``POST /packages`` write: a registered centre or a registered
viewer, each by its own credential (a viewer only its own object types, which
the ingest checks once the objects are read). Every decision is made from the
request's headers, before its body is read. SMTP AUTH (action ``send``) is
decided here too: the user name is a centre's or viewer's address, the
password its token; and whose a DICOM TLS association is (``associate``):
a centre's, by the client certificate registered for it.
"""
from __future__ import annotations

from twisted.internet.defer import ensureDeferred

from medd.plugins.hookspecs import AccessClaim, AccessDecision, hookimpl

READS = ("query", "retrieve")
WRITES = ("store", "package")


class CentralAccess:
    def __init__(self, directory):
        self.directory = directory

    @hookimpl
    def medd_check_access(self, claim: AccessClaim):
        if claim.action == "send":
            return ensureDeferred(self._sender(claim))
        if claim.action == "associate":
            return ensureDeferred(self._association(claim))
        return ensureDeferred(self._decide(claim))

    async def _decide(self, claim: AccessClaim) -> AccessDecision:
        needed = self._needed(claim.action)
        if not (claim.credentials or claim.certificate):
            return AccessDecision(False, reason=f"{needed} is required")
        principal = await self.directory.principal(claim.credentials, claim.certificate)
        if principal is None:
            return AccessDecision(False, reason=f"the credential is no one's; {needed} is required")
        address = principal.addresses[0] if principal.addresses else ""
        allowed = (
            (claim.action in READS and (principal.kind == "admin" or principal.scope == "read"))
            or (claim.action in WRITES and principal.kind in ("centre", "viewer") and bool(address))
        )
        if not allowed:
            return AccessDecision(False, who=principal.name, authenticated=True, role=principal.kind,
                                  reason=f"{principal.kind} {principal.name} may not; {needed} is required")
        return AccessDecision(True, who=principal.name, authenticated=True, role=principal.kind, address=address)

    @staticmethod
    def _needed(action: str) -> str:
        if action in READS:
            return "an administrator's token or a reader's credential (Authorization: Bearer, or its client certificate)"
        if action in WRITES:
            return "a registered centre's or viewer's credential (Authorization: Bearer, or its client certificate)"
        return f"no credential may {action}"

    async def _association(self, claim: AccessClaim) -> AccessDecision:
        """DICOM TLS: ``peer`` is the verified client certificate's CN, ``certificate`` its SHA-256. The
        association is a centre's when the certificate is the one ``medd centres add --client-cert``
        recorded for it and its CN is one of that centre's addresses (whatever the AE title says)."""
        cn = (claim.peer or "").strip().lower()
        principal = await self.directory.principal(None, claim.certificate) if claim.certificate else None
        if principal is None or principal.kind != "centre":
            return AccessDecision(False, reason="the client certificate is no registered centre's")
        if cn not in principal.addresses:
            return AccessDecision(False, who=principal.name, authenticated=True, role="centre",
                                  reason=f"the certificate's CN {cn!r} is not an address of centre {principal.name}")
        return AccessDecision(True, who=principal.name, authenticated=True, role="centre", address=cn)

    async def _sender(self, claim: AccessClaim) -> AccessDecision:
        """SMTP AUTH: ``peer`` is the address given as user name, ``credentials`` the password: the
        token of the centre one of whose addresses that is, or of the viewer at that address."""
        address, token = (claim.peer or "").strip().lower(), claim.credentials
        if not token:
            return AccessDecision(False, reason="no password")
        facts = await self.directory.sender_facts(address, token)
        if facts.named_centre is not None and facts.centre is not None and facts.named_centre.name == facts.centre.name:
            return AccessDecision(True, who=facts.centre.name, authenticated=True, role="centre")
        if facts.named_viewer is not None and facts.viewer is not None and facts.named_viewer.address == facts.viewer.address:
            return AccessDecision(True, who=address, authenticated=True, role="viewer")
        return AccessDecision(False, reason=f"{address} is no registered centre or viewer address with that token")
