"""``POST /studies/{uid}/withdraw-measurements``: the radiologist deleted the study's measurements. OHIF
cannot save an empty measurement report, so this call (JSON, ``X-CSRF-Token``) sends central an empty new
version of each image's overlay; the earlier versions stay, marked superseded."""
from __future__ import annotations

from medd.viewer.contract import UnknownObject
from medd.viewer.web.errors import WebError
from medd.viewer.web.serving import UidResource, json_response, serve
from medd.viewer.web.session import check_csrf


class WithdrawMeasurements(UidResource):
    isLeaf = True

    def render_POST(self, request):
        return serve(request, self._post, api=True)

    async def _post(self, request):
        session = await self.room.session(request)
        check_csrf(request, session, None)
        try:
            withdrawn = await self.room.reading_room.withdraw_measurements(self.uid, session.user)
        except UnknownObject as e:
            raise WebError(404, f"there is no study {self.uid} in this viewer") from e
        return json_response(200, {"withdrawn": withdrawn})

