"""Archive throughput: medd's tape archive against plain GNU tar writing the same files in the same run.

    .venv/bin/python bench/archive/run.py [--small 1000] [--large 20] [--work DIR]

Builds a central node in a scratch folder, ingests the corpus (not timed),
then times one archiving pass (append + fsync + read-back + hash +
catalogue) and `tar -cf` over the same blob files, with and without a
`sync` of the tar file. Prints MB/s and the ratios.
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from io import BytesIO
from pathlib import Path

import pydicom.data
from pydicom import dcmread
from pydicom.uid import generate_uid
from twisted.internet.defer import ensureDeferred
from twisted.internet.task import react

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from medd.config import load_config  # noqa: E402
from medd.service import make_node  # noqa: E402


def corpus(small: int, large: int):
    """CT_small.dcm re-UIDed (39 KB each), and 2048x2048 16-bit CT images (8 MB each)."""
    template = dcmread(pydicom.data.get_testdata_file("CT_small.dcm"))
    for i in range(small + large):
        ds = template.copy()
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        if i >= small:
            ds.Rows = ds.Columns = 2048
            ds.PixelData = (bytes(range(256)) * (2048 * 2048 * 2 // 256))[:-2] + i.to_bytes(2, "little")
        out = BytesIO()
        ds.save_as(out, enforce_file_format=True)
        yield ("CT_A" if i % 2 else "CT_B"), out.getvalue()


def write_config(work: Path) -> Path:
    (work / "archive").mkdir(parents=True)
    path = work / "central.ini"
    path.write_text(textwrap.dedent(f"""
        [node]
        role = central
        name = bench.central
        [database]
        url = sqlite:///{work / 'index.sqlite'}
        [storage]
        path = {work / 'store'}
        [archive]
        backend = tape
        path = {work / 'archive'}
        volume_size = 1G
        interval = 86400
    """))
    return path


def timed(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True)
    return time.perf_counter() - t0


async def bench(reactor, args) -> None:
    work = Path(args.work or tempfile.mkdtemp(prefix="medd-archive-bench-"))
    node = make_node(reactor, load_config(write_config(work)))
    node.database.create_schema()
    digests = []
    for origin, data in corpus(args.small, args.large):
        stored = await node.ingest.receive_dicom(data, transport="bench", origin=origin)
        digests.append(stored.digest)
    total = sum(node.blobs.path(d).stat().st_size for d in digests)
    files = [str(node.blobs.path(d).relative_to(node.blobs.blobs)) for d in digests]
    (work / "files.txt").write_text("\n".join(files) + "\n")
    mb = total / 1e6
    print(f"corpus: {args.small} x 39 KB + {args.large} x 8 MB = {len(digests)} objects, {mb:.1f} MB; work folder {work}")

    tar_out = work / "plain.tar"
    tar_cmd = ["tar", "--format=pax", "-cf", str(tar_out), "-C", str(node.blobs.blobs), "-T", str(work / "files.txt")]
    t_tar = timed(tar_cmd)
    tar_out.unlink()
    t_tar_sync = timed(["sh", "-c", " ".join(f"'{c}'" for c in tar_cmd) + f" && sync '{tar_out}'"])
    tar_out.unlink()

    archiving = node.archiving
    archiving.pool.start()
    t0 = time.perf_counter()
    report = await archiving.archive_pending()
    t_medd = time.perf_counter() - t0
    assert report.archived == len(digests), report
    volumes = await archiving.catalogue.find_volumes()
    archiving.pool.stop()
    node.database.stop()
    node.ingest.stop()

    rows = [
        ("medd archive (append, fsync, read back, hash, catalogue)", t_medd),
        ("tar --format=pax -cf (no fsync)", t_tar),
        ("tar --format=pax -cf && sync FILE", t_tar_sync),
    ]
    for name, t in rows:
        print(f"{name:<58} {t:7.2f} s  {mb / t:8.1f} MB/s")
    print(f"ratio medd / tar:        {t_tar / t_medd:.2f}")
    print(f"ratio medd / tar + sync: {t_tar_sync / t_medd:.2f}")
    print(f"volumes: {len(volumes)} ({', '.join(v.path for v in volumes)})")
    if not args.keep:
        shutil.rmtree(work)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", type=int, default=1000)
    parser.add_argument("--large", type=int, default=20)
    parser.add_argument("--work", help="scratch folder (default: a new temporary one)")
    parser.add_argument("--keep", action="store_true", help="keep the scratch folder")
    args = parser.parse_args()
    react(lambda reactor: ensureDeferred(bench(reactor, args)))


if __name__ == "__main__":
    main()
