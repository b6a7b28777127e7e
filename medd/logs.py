"""``[log] format = json``: twistd's log as one JSON object per line (Twisted's ``jsonFileLogObserver``).

Every field of an event is kept (``uid``, ``study_uid``, ``peer``, ``transport``,
``origin`` on the ingest's events), so a log shipper indexes them without parsing
prose. The file is the one twistd would write (``--logfile``, stdout with ``-n``
and none), a :class:`twisted.python.logfile.LogFile` rotated as twistd rotates
its own: at 1 MB, and on ``SIGUSR1`` (what logrotate sends).
"""
from __future__ import annotations

import signal
import sys

from twisted.logger import ILogObserver, jsonFileLogObserver
from twisted.python.logfile import LogFile


def json_log_observer(logfile: str | None, nodaemon: bool) -> ILogObserver:
    """The observer twistd's own ``UnixAppLogger`` would make for these options, writing JSON lines."""
    if logfile == "-" or (nodaemon and not logfile):
        out = sys.stdout
    else:
        out = LogFile.fromFullPath(logfile or "twistd.log")
        if not signal.getsignal(signal.SIGUSR1):

            def rotate(_signal, _frame):
                from twisted.internet import reactor

                reactor.callFromThread(out.rotate)

            signal.signal(signal.SIGUSR1, rotate)
    # No RFC 7464 record separator: one event per line, as log shippers read them.
    return jsonFileLogObserver(out, recordSeparator="")
