"""The ``medd`` command: inspect plugins and configs, build packages, run the demo."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from medd.config import ConfigError, load_config


def cmd_plugins(args) -> int:
    from medd.plugins.host import load_plugins

    disabled = ()
    if args.config:
        disabled = load_config(args.config).disabled_plugins
    plugins = load_plugins(disabled)
    for kind, entries in plugins.listing().items():
        print(f"{kind}s:")
        for name, source in entries:
            print(f"  {name:<16} (entry point {source})")
    if disabled:
        print("disabled: " + ", ".join(disabled))
    return 0


def cmd_check_config(args) -> int:
    # The same validation twistd runs before it starts a node.
    from medd.validation import validate_file

    config = validate_file(args.config).config
    print(f"{args.config}: ok ({config.role} node {config.name})")
    return 0


def cmd_package(args) -> int:
    from medd.objects import InvalidObject
    from medd.package import build_package, decode_content
    from medd.plugins.host import load_plugins
    from medd.plugins.objecttypes import text_report_content

    data = Path(args.file).read_bytes()
    plugins = load_plugins()
    try:
        if args.study_uid:
            if not args.uid:
                raise InvalidObject("a text report needs --uid as well as --study-uid")
            content = text_report_content(data.decode("utf-8"), args.uid, args.study_uid)
        else:
            content = decode_content("application/dicom", data)
        candidates = [t for t in plugins.object_types if t.recognise(content)]
        if args.type:
            candidates = [t for t in candidates if t.name == args.type]
        if not candidates:
            raise InvalidObject(f"no object type {'named ' + args.type + ' ' if args.type else ''}carries this content")
        attachment = candidates[0].identifier(content)
    except InvalidObject as e:
        print(f"medd package: {args.file}: {e.reason}", file=sys.stderr)
        return 2
    sys.stdout.buffer.write(build_package(content, attachment, origin=args.origin, destination=args.to))
    return 0


def cmd_demo(args) -> int:
    from medd.demo import run_demo

    viewer = Path(args.viewer_config) if args.viewer_config else None
    gateway = Path(args.gateway_config) if args.gateway_config else None
    return run_demo(Path(args.config), Path(args.site), viewer, gateway)


def _role_of(config_path: str) -> str | None:
    try:
        return load_config(config_path, check_files=False).role
    except ConfigError:
        return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="medd", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("plugins", help="list the loaded plugins by kind")
    p.add_argument("--config", help="honour [plugins] disabled from this config")
    p.set_defaults(func=cmd_plugins)

    p = sub.add_parser("check-config", help="validate a node configuration")
    p.add_argument("config")
    p.set_defaults(func=cmd_check_config)

    p = sub.add_parser("package", help="write a package for FILE to stdout")
    p.add_argument("file", help="a DICOM file, or a UTF-8 text report with --study-uid")
    p.add_argument("--to", required=True, help="destination address")
    p.add_argument("--from", dest="origin", default="medd@localhost", help="origin address")
    p.add_argument("--type", help="object type (default: the most specific that fits)")
    p.add_argument("--uid", help="report UID of a text report")
    p.add_argument("--study-uid", help="Study Instance UID of a text report")
    p.set_defaults(func=cmd_package)

    p = sub.add_parser("demo", help="run the all-in-one demo site on loopback")
    p.add_argument("--config", default="etc/demo.ini")
    p.add_argument("--site", default="demo-site", help="folder for the demo's data")
    p.add_argument("--viewer-config", default="etc/demo-viewer.ini", help="the demo viewer ('' for central only)")
    p.add_argument("--gateway-config", default="etc/demo-gateway.ini",
                   help="the demo gateway the samples enter through ('' to store them on central directly)")
    p.set_defaults(func=cmd_demo)

    from medd.cli.archive import add_archive_commands

    add_archive_commands(sub)

    from medd.cli.admin import add_admin_commands
    from medd.cli.audit import add_audit_commands

    add_audit_commands(sub)

    add_admin_commands(sub)

    from medd.cli.users import add_user_commands

    add_user_commands(sub)

    from medd.cli.db import add_db_commands

    add_db_commands(sub)

    from medd.cli.gateway import add_gateway_commands

    add_gateway_commands(sub)

    from medd.cli.doctor import add_doctor_command

    add_doctor_command(sub)

    from medd.cli.backup import add_backup_commands

    add_backup_commands(sub)

    args = parser.parse_args(argv)
    if args.command == "track" and _role_of(args.config) == "gateway":
        # `medd track` is central's history of an object; a gateway answers from its own receipts.
        from medd.cli import gateway

        args.func = gateway.track
    try:
        return args.func(args)
    except ConfigError as e:
        print(f"medd: invalid configuration:\n{e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
