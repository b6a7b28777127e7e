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
        if claim.action == "store":
            return AccessDecision(True, who=claim.peer or "")
        return ensureDeferred(self._reader(claim))

    async def _reader(self, claim: AccessClaim) -> AccessDecision:
        if not claim.credentials:
            return AccessDecision(False, reason="an administrator's token (Authorization: Bearer) is required")
        admin = await self.directory.admin_by_token(claim.credentials)
        if admin is None:
            return AccessDecision(False, reason="the token is not an administrator's")
        return AccessDecision(True, who=admin)
