"""The viewer role's services: requestor and outgoing packages, plus the
reading room the web UI is given (``node.reading_room``)."""
from __future__ import annotations

from twisted.application.service import MultiService

from medd.mail.submit import MailToCentral
from medd.pull import CentralClient, Requestor
from medd.storage.accounts import Accounts
from medd.storage.inbox import Inbox
from medd.storage.metadata_cache import MetadataCache
from medd.storage.outgoing import OutgoingPackages
from medd.storage.reporting import Reporting
from medd.viewer.access import keep_report_sources
from medd.viewer.outgoing import OutgoingService
from medd.viewer.reading import ReadingRoom
from medd.viewer.settings import central_settings, reading_room_settings


class ViewerServices(MultiService):
    """Children of a viewer node: the requestor and the sender of outgoing packages."""

    def __init__(self, node, mail_senders: dict | None = None):
        super().__init__()
        self.settings = central_settings(node.config)
        clock = node.clock
        self.client = CentralClient(node.reactor, self.settings)
        to_central = self.client
        if self.settings.packages is not None:
            # [central] packages = mailto:…: status, overlays and reports by mail ([mail] smarthost).
            to_central = MailToCentral(node.reactor, self.settings.packages, mail_senders or {})
        self.outgoing = OutgoingService(
            OutgoingPackages(node.database, clock), node.ingest, node.blobs, to_central, self.settings.backoff, clock,
        )
        self.outgoing.setName("outgoing")
        self.outgoing.setServiceParent(self)
        self.requestor = Requestor(self.client, node.ingest, self.settings, clock)
        self.requestor.setName("requestor")
        self.requestor.setServiceParent(self)
        reporting = Reporting(node.database, clock)
        room = reading_room_settings(node.config, check_files=False)
        node.ingest.package_with = keep_report_sources(reporting.keeper())
        self.metadata_cache = MetadataCache(node.database, clock)
        self.reading_room = ReadingRoom(Inbox(node.database, clock), Accounts(node.database, clock), node.ingest,
                                        self.outgoing, node.config.name, self.settings, clock, audit=node.audit,
                                        room_settings=room, reporting=reporting, templates=room.templates)

    def stopService(self):
        d = super().stopService()

        def close(result):
            closed = self.client.close()
            return closed.addCallback(lambda _: result) if closed is not None else result

        return d.addBoth(close) if d is not None else close(None)
