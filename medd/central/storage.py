"""The storage connectors of the central role, built over one database and
one clock and handed together to the services, the admin API and the CLI."""
from __future__ import annotations

from dataclasses import dataclass

from medd.storage.deliveries import Deliveries
from medd.storage.directory import Directory
from medd.storage.routing import Routing
from medd.storage.tracking import Tracking


@dataclass(frozen=True)
class CentralStorage:
    directory: Directory
    routing: Routing
    deliveries: Deliveries
    tracking: Tracking

    @classmethod
    def over(cls, database, clock, *, audit=None) -> "CentralStorage":
        """The connectors of ``database``, every stamp taken from ``clock`` (the reactor in a node).
        With ``audit`` (a :class:`~medd.audit.AuditTrail`), deliveries and route corrections are
        recorded in it, in their own transactions."""
        from medd.audit import correction_recorder, export_recorder

        exported = export_recorder(audit) if audit is not None else None
        corrected = correction_recorder(audit) if audit is not None else None
        return cls(Directory(database, clock), Routing(database, clock, corrected),
                   Deliveries(database, clock, exported), Tracking(database, clock))

    @property
    def clock(self):
        """The one clock the connectors stamp with; central's services compare against it too."""
        return self.deliveries.clock
