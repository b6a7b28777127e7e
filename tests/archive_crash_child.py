"""The child process of test_archive's kill tests: ingests and archives objects in a loop.

``python -m tests.archive_crash_child CONFIG loop`` prints ``committed N``
after each archived batch, forever. ``... CONFIG torn`` archives one batch,
then writes half of the next member, prints ``torn`` and hangs there, so the
parent can kill it in the middle of an append.
"""
from __future__ import annotations

import sys
from io import BytesIO

from pydicom import dcmread
from pydicom.uid import generate_uid
from twisted.internet.defer import ensureDeferred
from twisted.internet.task import react

from medd.config import load_config
from medd.service import make_node
from tests.conftest import testdata


def variant(n: int) -> bytes:
    ds = dcmread(BytesIO(testdata("CT_small.dcm")))
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=["crash", str(n)])
    out = BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def say(text: str) -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def tear_the_second_append(archive) -> None:
    writes = [0]
    real_write = archive._write

    def write(fd, data):
        writes[0] += 1
        if writes[0] == 4:  # the header of the first member of the second append
            real_write(fd, data)
        elif writes[0] == 5:  # half of its bytes, then stop dead
            real_write(fd, data[: len(data) // 2])
            say("torn")
            sys.stdin.read()
        else:
            real_write(fd, data)

    archive._write = write


async def run(reactor, config_path: str, mode: str) -> None:
    node = make_node(reactor, load_config(config_path))
    node.database.create_schema()
    archiving = node.archiving
    if mode == "torn":
        tear_the_second_append(archiving.archive)
    n = 0
    while True:
        await node.ingest.receive_dicom(variant(n), transport="test", origin="CRASHTEST")
        await node.routing.router.kick()  # objects are archived once their centre is decided
        await archiving.archive_pending()
        say(f"committed {n}")
        n += 1


def main(reactor, config_path: str, mode: str):
    return ensureDeferred(run(reactor, config_path, mode))


if __name__ == "__main__":
    react(main, sys.argv[1:])
