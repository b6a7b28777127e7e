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
    def over(cls, database, clock) -> "CentralStorage":
        """The connectors of ``database``, every stamp taken from ``clock`` (the reactor in a node)."""
        return cls(Directory(database, clock), Routing(database, clock), Deliveries(database, clock),
                   Tracking(database, clock))

    @property
    def clock(self):
        """The one clock the connectors stamp with; central's services compare against it too."""
        return self.deliveries.clock
