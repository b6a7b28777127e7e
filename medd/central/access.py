"""Central's access policy for DICOMweb (the ``medd_check_access`` hook).

QIDO-RS and WADO-RS read patients' data: only an administrator's bearer
token may. STOW-RS stays open to any sender for now, exactly as C-STORE is
(the imaging centre is who sent it, and an unknown sender's objects are
quarantined); it becomes credential-only with the centres' credentials.
"""
from __future__ import annotations

from twisted.internet.defer import ensureDeferred

from medd.plugins.hookspecs import AccessClaim, AccessDecision, hookimpl


class CentralAccess:
    def __init__(self, directory):
        self.directory = directory

    @hookimpl
    def medd_check_access(self, claim: AccessClaim):
        if claim.action == "send":
            return ensureDeferred(self._sender(claim))
        if claim.action == "store":
            return AccessDecision(True, who=claim.peer or "")
        return ensureDeferred(self._reader(claim))

    async def _sender(self, claim: AccessClaim) -> AccessDecision:
        """SMTP AUTH: ``peer`` is the address given as user name, ``credentials`` the password: the
        token of the centre one of whose addresses that is, or of the viewer at that address."""
        address, token = (claim.peer or "").strip().lower(), claim.credentials
        if not token:
            return AccessDecision(False, reason="no password")
        centre = await self.directory.centre_claim(address, token)
        if centre.named is not None and centre.authenticated is not None and centre.named.name == centre.authenticated.name:
            return AccessDecision(True, who=f"centre {centre.named.name}")
        viewer = await self.directory.claimants(address, token)
        if viewer.named is not None and viewer.authenticated is not None and viewer.named.address == viewer.authenticated.address:
            return AccessDecision(True, who=f"viewer {address}")
        return AccessDecision(False, reason=f"{address} is no registered centre or viewer address with that token")

    async def _reader(self, claim: AccessClaim) -> AccessDecision:
        if not claim.credentials:
            return AccessDecision(False, reason="an administrator's token (Authorization: Bearer) is required")
        admin = await self.directory.admin_by_token(claim.credentials)
        if admin is None:
            return AccessDecision(False, reason="the token is not an administrator's")
        return AccessDecision(True, who=admin)
