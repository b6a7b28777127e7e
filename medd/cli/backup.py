"""`medd backup --config FILE DEST` and `medd restore --config FILE SRC` (medd/backup.py)."""
from __future__ import annotations

import os
import sys


def add_backup_commands(sub) -> None:
    default = os.environ.get("MEDD_CONFIG")
    config_help = "the node's config (default: $MEDD_CONFIG)"
    p = sub.add_parser("backup", help="back the node up into DEST while it runs: its database and the blobs "
                                      "new since the last backup, with a manifest of SHA-256 digests")
    p.add_argument("--config", default=default, required=default is None, help=config_help)
    p.add_argument("dest", help="the folder of the node's backups (each run adds DEST/<time>, DEST/latest)")
    p.set_defaults(func=cmd_backup)
    p = sub.add_parser("restore", help="restore a backup into an empty node (refuses one that holds anything)")
    p.add_argument("--config", default=default, required=default is None, help=config_help)
    p.add_argument("src", help="a backup folder, or the DEST of medd backup (its latest)")
    p.set_defaults(func=cmd_restore)


def _run(command: str, work, args) -> int:
    """``work(config)`` for ``medd backup|restore``, a BackupError as one line and exit status 1."""
    from medd.backup import BackupError
    from medd.config import load_config

    try:
        print(work(load_config(args.config)))
    except BackupError as e:
        print(f"medd {command}: {e}", file=sys.stderr)
        return 1
    return 0


def cmd_backup(args) -> int:
    from medd.backup import backup

    def work(config) -> str:
        done = backup(config, args.dest)
        return (f"{done.path}: {done.blobs} blobs ({done.copied} copied, {done.bytes_copied} bytes; "
                f"{done.linked} linked from the previous backup)")

    return _run("backup", work, args)


def cmd_restore(args) -> int:
    from medd.backup import restore

    def work(config) -> str:
        done = restore(config, args.src)
        return f"restored {done.blobs} blobs ({done.bytes} bytes) and the database into {args.config}"

    return _run("restore", work, args)
