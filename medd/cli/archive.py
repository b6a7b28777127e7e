"""``medd archive list|verify|restore``: the operator's view of the lifetime archive.

Each subcommand reads the node's config, opens the same database, blob
store and archive backend the daemon uses, and works beside a running
daemon: verify only reads, restore only adds to the working store.
"""
from __future__ import annotations

import sys

from medd.config import ConfigError, ConfigProblem, load_config


def add_archive_commands(sub) -> None:
    """Add ``archive`` and its subcommands to the ``medd`` argument parser."""
    p = sub.add_parser("archive", help="list, verify and restore the lifetime archive")
    archive = p.add_subparsers(dest="archive_command", required=True)

    def with_config(parser):
        parser.add_argument("--config", required=True, help="the central node's configuration")
        return parser

    q = with_config(archive.add_parser("list", help="volumes (or --objects) by centre, modality, date"))
    q.add_argument("--centre", help="registered imaging centre (also finds its older volumes filed under one of its AE "
                                    "titles or addresses), `unregistered`, or a folder name")
    q.add_argument("--modality", help="e.g. CT")
    q.add_argument("--since", help="date (YYYY-MM-DD) or ISO timestamp: volumes still open or closed since, objects archived since")
    q.add_argument("--objects", action="store_true", help="list archived objects rather than volumes")
    q.set_defaults(func=cmd_list)

    q = with_config(archive.add_parser("verify", help="re-read volumes and check every member's SHA-256"))
    q.add_argument("volume", nargs="?", help="one volume, as `medd archive list` shows it (default: all)")
    q.set_defaults(func=cmd_verify)

    q = with_config(archive.add_parser("restore", help="bring objects back into the working store"))
    q.add_argument("uid", nargs="*", help="SOP Instance UIDs")
    q.add_argument("--study", help="every archived object of this Study Instance UID")
    q.set_defaults(func=cmd_restore)

    q = with_config(archive.add_parser("offsite", help="record that closed volumes were moved off site"))
    q.add_argument("volume", nargs="+")
    q.set_defaults(func=cmd_offsite)


def _catalogue(config):
    """The catalogue connector over the node's database, inline (no reactor), and that database."""
    from medd.storage.catalogue import Catalogue
    from medd.storage.database import WallClock, open_database

    database = open_database(config)
    return Catalogue(database, WallClock()), database


def _open(config_path: str, reactor):
    """The archiving service of a config, not started (its methods are used directly), and its database."""
    from medd.central.archiving import archive_settings, make_archiving
    from medd.plugins.host import check_storage, load_plugins
    from medd.service import check_against_plugins
    from medd.storage.database import open_database

    config = load_config(config_path)
    plugins = load_plugins(config.disabled_plugins)
    check_against_plugins(config, plugins)
    if archive_settings(config) is None:
        raise ConfigError([ConfigProblem(config.path, "archive", "backend", "no archive is configured")])
    database = open_database(config, reactor=reactor)
    backend = config.section("storage").get("backend", "file")
    blobs = plugins.storage[("blobstore", backend)](config)
    check_storage(plugins, "blobstore", blobs, backend)
    return make_archiving(reactor, config, plugins, database, blobs), database


def _run(config_path: str, work) -> int:
    """Run ``await work(service)`` under a reactor; its result is the exit status."""
    from twisted.internet.defer import ensureDeferred
    from twisted.internet.task import react

    status = []

    def main(reactor):
        service, database = _open(config_path, reactor)

        async def go():
            try:
                status.append(await work(service))
            finally:
                if service.pool.started:
                    service.pool.stop()
                database.stop()

        return ensureDeferred(go())

    try:
        react(main)
    except SystemExit as e:
        if e.code not in (0, None) and not status:
            return int(e.code) if isinstance(e.code, int) else 1
    return status[0] if status else 1


def _when(value) -> str:
    return value.strftime("%Y-%m-%d %H:%M") if value else "-"


def cmd_list(args) -> int:
    from medd.central.archiving import utc
    from medd.storage.database import resolved

    config = load_config(args.config)
    try:
        since = utc(args.since) if args.since else None
    except ValueError:
        print(f"medd archive list: --since: not a date: {args.since!r}", file=sys.stderr)
        return 2
    catalogue, db = _catalogue(config)
    try:
        if args.objects:
            rows = resolved(catalogue.find_archived(centre=args.centre, modality=args.modality, since=since))
            print(f"{'SOP Instance UID':<64}  {'centre':<24} {'mod':<5} {'size':>10}  {'archived':<16}  {'state':<8}  volume")
            for a in rows:
                state = "evicted" if a.evicted_at else ("verified" if a.verified_at else "archived")
                print(
                    f"{a.sop_instance_uid:<64}  {a.centre:<24} {a.modality or '-':<5} {a.size:>10}  "
                    f"{_when(a.archived_at):<16}  {state:<8}  {a.volume}"
                )
        else:
            rows = resolved(catalogue.find_volumes(centre=args.centre, modality=args.modality, since=since))
            print(f"{'volume':<48} {'centre':<24} {'mod':<5} {'state':<8} {'objects':>7} {'bytes':>12}  {'created':<16}  {'closed':<16}")
            for v in rows:
                print(
                    f"{v.path:<48} {v.centre:<24} {v.modality or '-':<5} {v.state:<8} {v.members:>7} {v.size:>12}  "
                    f"{_when(v.created_at):<16}  {_when(v.closed_at):<16}"
                )
    finally:
        db.stop()
    return 0


def cmd_verify(args) -> int:
    async def work(service) -> int:
        try:
            results = await service.verify(args.volume, show_progress=None)
        except KeyError as e:
            print(f"medd archive verify: {e.args[0]}", file=sys.stderr)
            return 2
        failed = 0
        for r in results:
            if r.ok:
                print(f"ok       {r.volume} ({r.members} objects, now {r.state})")
                continue
            failed += 1
            print(f"DAMAGED  {r.volume} ({r.members} objects)")
            for b in r.bad:
                print(f"  bad object {b.uid} (member {b.member}): {b.reason}")
            for p in r.problems:
                print(f"  {p}")
        print(f"{len(results)} volumes verified, {failed} damaged")
        return 1 if failed else 0

    return _run(args.config, work)


def cmd_restore(args) -> int:
    if bool(args.uid) == bool(args.study):
        print("medd archive restore: give either UIDs or --study UID", file=sys.stderr)
        return 2

    async def work(service) -> int:
        from medd.central.archiving import RestoreFailed

        try:
            if args.study:
                restored = await service.restore_study(args.study, show_progress=None)
            else:
                restored = await service.restore(args.uid, show_progress=None)
        except RestoreFailed as e:
            print(f"medd archive restore: {e}", file=sys.stderr)
            return 1
        for uid in restored:
            print(f"restored {uid}")
        missing = [] if args.study else sorted(set(args.uid) - set(restored))
        for uid in missing:
            print(f"not in the archive: {uid}", file=sys.stderr)
        if args.study and not restored:
            print(f"no archived object of study {args.study}", file=sys.stderr)
            return 1
        return 1 if missing else 0

    return _run(args.config, work)


def cmd_offsite(args) -> int:
    from medd.storage.database import resolved

    config = load_config(args.config)
    catalogue, db = _catalogue(config)
    status = 0
    try:
        for path in args.volume:
            if not resolved(catalogue.move_offsite(path)):
                print(f"medd archive offsite: {path}: not a closed volume", file=sys.stderr)
                status = 1
                continue
            print(f"{path}: offsite")
    finally:
        db.stop()
    return status
