"""`medd viewers|centres|admins|routes|quarantine|track`: the administrator's commands.

They work on the node's database directly (the daemon need not run); a
running daemon picks changes up on its next routing/outbox poll.
"""
from __future__ import annotations

import getpass
import json
import os
import sys
from contextlib import contextmanager

from medd.central import routing
from medd.central.storage import CentralStorage
from medd.central.tracking import history_json, quarantine_json, study_lines
from medd.cli.audit import cli_audit_trail, record_credential_change
from medd.config import load_config
from medd.storage.database import WallClock, open_database, resolved
from medd.storage.directory import DirectoryError
from medd.storage.routing import CorrectionError

DEFAULT_CONFIG = os.environ.get("MEDD_CONFIG", "etc/central.ini")


@contextmanager
def _central(args):
    """Central's connectors over the node's database, run inline: the same calls the daemon makes."""
    config = load_config(args.config)
    database = open_database(config)
    try:
        yield CentralStorage.over(database, WallClock(), audit=cli_audit_trail(config, database))
    finally:
        database.stop()


def _run(args, call):
    """``resolved(call(storage))`` on the node's database."""
    with _central(args) as storage:
        return resolved(call(storage))


def _fail(message: str) -> int:
    print(f"medd: {message}", file=sys.stderr)
    return 2


def _guard(fn):
    def wrapper(args):
        try:
            return fn(args) or 0
        except (DirectoryError, CorrectionError) as e:
            return _fail(str(e))

    return wrapper


def _issue_client_certificate(args, common_name: str):
    """(PEM of certificate + key, its SHA-256) signed by [tls] client_ca_key, or None without
    ``--client-cert``; raises DirectoryError when the config has no client CA to sign with."""
    if not args.client_cert:
        return None
    config = load_config(args.config)
    if not (config.tls_client_ca and config.tls_client_ca_key):
        raise DirectoryError(f"{args.config}: --client-cert needs [tls] client_ca and client_ca_key (the CA that signs it)")
    from medd.tlscert import issue_from_ca_files

    return issue_from_ca_files(config.tls_client_ca, config.tls_client_ca_key, common_name)


def _write_client_certificate(args, issued) -> None:
    from pathlib import Path

    out = Path(args.client_cert)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(issued[0])
    out.chmod(0o600)
    print(f"client certificate and key for the TLS transport written to {out} (SHA-256 {issued[1]})", file=sys.stderr)


@_guard
def viewers_add(args):
    if bool(args.pull) == bool(args.push):
        return _fail("give exactly one of --pull or --push URL")
    smime = _smime_certificate(args)
    issued = _issue_client_certificate(args, args.address.strip().lower())
    added = _run(args, lambda s: s.directory.add_viewer(args.address, args.push, args.authorise or [],
                                                          client_certificate=issued[1] if issued else None))
    if issued:
        _write_client_certificate(args, issued)
    _register_smime_certificate(args, added.viewer.address, smime)
    record_credential_change(args.config, "viewer token" + (" and client certificate" if issued else "") + " issued",
                             added.viewer.address, "C")
    print(added.token)
    print(f"viewer {added.viewer.address} added ({added.viewer.mode}); the line above is its token, shown once", file=sys.stderr)


@_guard
def viewers_list(args):
    for v in _run(args, lambda s: s.directory.viewers()):
        print(f"{v.address:<36} {v.mode:<5} {v.push_url or '-':<40} {', '.join(v.authorisations) or '(no authorisation)'}")


@_guard
def viewers_remove(args):
    _run(args, lambda s: s.directory.remove_viewer(args.address))
    record_credential_change(args.config, "viewer removed: its token and certificate revoked", args.address, "D")


@_guard
def viewers_authorise(args):
    _run(args, lambda s: s.directory.authorise(args.address, args.scope))


@_guard
def viewers_revoke(args):
    _run(args, lambda s: s.directory.revoke(args.address, args.scope))


def _smime_certificate(args) -> str | None:
    """``--smime-cert FILE``, read and checked before anything is written: the PEM certificate the
    centre's or viewer's S/MIME signatures are verified against."""
    if not args.smime_cert:
        return None
    from pathlib import Path

    from cryptography import x509

    try:
        pem = Path(args.smime_cert).read_bytes()
        x509.load_pem_x509_certificate(pem)
        return pem.decode("ascii")
    except (OSError, ValueError) as e:
        raise DirectoryError(f"{args.smime_cert}: not a readable PEM certificate ({e})") from e


def _register_smime_certificate(args, address: str | None, pem: str | None) -> None:
    if pem is None:
        return
    who = _run(args, lambda s: s.directory.set_smime_certificate(address, pem))
    record_credential_change(args.config, "S/MIME certificate registered", address, "U")
    print(f"{who}: S/MIME certificate {args.smime_cert} registered", file=sys.stderr)


def _credentials(centre) -> str:
    held = [name for name, has in (("token", centre.has_token), ("client certificate", centre.client_cert_sha256)) if has]
    return f" [{', '.join(held)}]" if held else ""


@_guard
def centres_add(args):
    address = (args.address or [None])[0]
    if address is None and (args.token or args.client_cert):
        existing = _run(args, lambda s: s.directory.centre(args.name))
        address = existing.address if existing else None
        if address is None:
            return _fail("a centre's credential authenticates its package address: give --address")
    smime = _smime_certificate(args)
    if smime is not None and address is None:
        return _fail("--smime-cert needs the centre's address (--address)")
    issued = _issue_client_certificate(args, address.strip().lower()) if address else None
    added = _run(args, lambda s: s.directory.add_centre(args.name, args.ae or [], args.address or [], args.network or [],
                                                        token=args.token, client_certificate=issued[1] if issued else None))
    if issued:
        _write_client_certificate(args, issued)
    _register_smime_certificate(args, address, smime)
    if added.token or issued:
        record_credential_change(args.config, "centre " + " and ".join(
            w for w, given in (("token", added.token), ("client certificate", issued)) if given) + " issued",
            added.centre.name, "C")
    centre = added.centre
    print(f"centre {centre.name}: " + ", ".join(f"{k} {v}" for k, v in centre.aliases) + _credentials(centre))
    if added.token:
        print(added.token)
        print(f"the line above is centre {centre.name}'s token (its gateway's `[gateway] token`), shown once", file=sys.stderr)


@_guard
def centres_token(args):
    token = _run(args, lambda s: s.directory.issue_centre_token(args.name))
    record_credential_change(args.config, "centre token replaced (the old one revoked)", args.name, "U")
    print(token)
    print(f"centre {args.name} has a new token (the line above, shown once); the old one no longer works", file=sys.stderr)


@_guard
def centres_list(args):
    for c in _run(args, lambda s: s.directory.centres()):
        print(f"{c.name:<24} " + ", ".join(f"{k} {v}" for k, v in c.aliases) + _credentials(c))


@_guard
def admins_add(args):
    token = _run(args, lambda s: s.directory.add_admin(args.name))
    record_credential_change(args.config, "administrator token issued", args.name, "C")
    print(token)


@_guard
def admins_password(args):
    from medd.cli.users import _read_password
    from medd.viewer.users import UserError, hash_password

    try:
        hashed = hash_password(_read_password(args))
    except UserError as e:
        return _fail(str(e))
    _run(args, lambda s: s.directory.set_admin_password(args.name, hashed))
    record_credential_change(args.config, "administrator password set", args.name, "U")
    print(f"administrator {args.name} may now log in to the console with that password too", file=sys.stderr)


@_guard
def readers_add(args):
    if not (args.token or args.client_cert):
        raise DirectoryError("a reader needs a credential: --token, --client-cert FILE, or both")
    issued = _issue_client_certificate(args, f"reader:{args.name}")
    new = _run(args, lambda s: s.directory.add_reader(args.name, args.scope, token=args.token,
                                                      client_certificate=issued[1] if issued else None))
    if issued:
        _write_client_certificate(args, issued)
    print(f"reader {new.reader.name} may {new.reader.scope} (DICOMweb QIDO-RS and WADO-RS)", file=sys.stderr)
    if new.token:
        print(new.token)


@_guard
def readers_list(args):
    for r in _run(args, lambda s: s.directory.readers()):
        held = [name for name, has in (("token", r.has_token), ("client certificate", r.client_cert_sha256)) if has]
        print(f"{r.name:<24} {r.scope:<6} {', '.join(held)}  since {r.created_at:%Y-%m-%d}")


@_guard
def readers_revoke(args):
    _run(args, lambda s: s.directory.revoke_reader(args.name))
    print(f"reader {args.name} revoked: its credentials no longer work", file=sys.stderr)


@_guard
def routes_list(args):
    rules = _run(args, lambda s: s.directory.rules())
    for r in rules:
        print(f"{r.id:>4}  centre={r.centre or '*':<16} modality={r.modality or '*':<6} type={r.object_type or '*':<8} -> {r.destination}")
    if not rules:
        print("(no routing rules)")


@_guard
def routes_add(args):
    rule = _run(args, lambda s: s.directory.add_rule(args.to, args.centre or "", args.modality or "", args.type or ""))
    print(f"rule {rule.id} added")


@_guard
def routes_remove(args):
    _run(args, lambda s: s.directory.remove_rule(args.id))


@_guard
def quarantine_list(args):
    entries = _run(args, lambda s: s.routing.quarantined(None if args.all else "held"))
    if args.json:
        print(json.dumps([quarantine_json(e) for e in entries], indent=2))
        return
    for e in entries:
        print(f"{e.id:>5}  {e.state:<8} {e.uid}  centre={e.centre or '?'} modality={e.modality or '-'} "
              f"to={e.destination or '-'}\n       {e.reason}")
    if not entries:
        print("(quarantine is empty)")


@_guard
def quarantine_route(args):
    _run(args, lambda s: routing.correct_route(s.routing, args.id, args.to, args.admin))
    print(f"entry {args.id} released to {args.to}")


@_guard
def quarantine_reject(args):
    _run(args, lambda s: s.routing.reject(args.id, args.reason, args.admin))
    print(f"entry {args.id} rejected")


@_guard
def track(args):
    histories = _run(args, lambda s: s.tracking.track(args.uid))
    if not histories:
        return _fail(f"nothing known about {args.uid}")
    if args.json:
        print(json.dumps([history_json(h) for h in histories], indent=2))
        return
    study = _run(args, lambda s: s.tracking.study_state(args.uid))
    if study is not None:
        # A study UID: its state summed over its images first, then each image's history.
        print("\n".join(study_lines(study)))
    for h in histories:
        o = h.object
        print(f"{o.object_type} {o.sop_instance_uid}  study {o.study_instance_uid}  {o.modality or ''} "
              f"patient {o.patient_id or '-'}")
        print(f"  received {o.received_at.isoformat()} from {o.origin} over {o.transport}")
        if h.routing:
            print(f"  routing: {h.routing.outcome} (centre {h.routing.centre or 'unknown'})")
        for q in h.quarantine:
            print(f"  quarantine #{q.id} {q.state}: {q.reason}")
            for c in q.corrections:
                print(f"    {c.at.isoformat()} {c.admin} {c.action} {c.old_route or '-'} -> {c.new_route or '-'} {c.reason or ''}")
        for d in h.deliveries:
            print(f"  -> {d.destination}: {d.state} (attempts {d.attempts})")
            for e in d.history:
                print(f"     {e.at.isoformat()} {e.state:<9} {e.detail or ''}")
        for kind, attached in (("overlay", h.overlays), ("report", h.reports)):
            for a in attached:
                print(f"  {kind} {a.uid} from {a.origin}")


def add_admin_commands(sub) -> None:
    def command(parent, name, func, help_):
        p = parent.add_parser(name, help=help_)
        p.add_argument("--config", default=DEFAULT_CONFIG, help="the central node's config (default: $MEDD_CONFIG or etc/central.ini)")
        p.set_defaults(func=func)
        return p

    def group(name, help_):
        p = sub.add_parser(name, help=help_)
        return p.add_subparsers(dest=f"{name}_command", required=True)

    g = group("viewers", "the directory of viewers")
    p = command(g, "add", viewers_add, "register a viewer; prints its token")
    p.add_argument("address")
    p.add_argument("--pull", action="store_true", help="the viewer polls central (GET /outbox)")
    p.add_argument("--push", metavar="URL", help="central pushes to smtp://h:p, tls://h:p, http(s)://h/packages or mailto:address "
                                                   "(through [mail] smarthost)")
    p.add_argument("--authorise", action="append", metavar="CENTRE[:MODALITY]")
    p.add_argument("--client-cert", metavar="FILE",
                   help="also issue a TLS client certificate (CN = the address) signed by [tls] client_ca_key; "
                        "written to FILE with its key")
    p.add_argument("--smime-cert", metavar="FILE",
                   help="its S/MIME certificate (PEM): packages signed with its key are its credential over SMTP "
                        "and IMAP (PS3.15 B.8)")
    command(g, "list", viewers_list, "list viewers")
    command(g, "remove", viewers_remove, "remove a viewer").add_argument("address")
    for name, func in (("authorise", viewers_authorise), ("revoke", viewers_revoke)):
        p = command(g, name, func, f"{name} a viewer for CENTRE[:MODALITY]")
        p.add_argument("address")
        p.add_argument("scope", metavar="CENTRE[:MODALITY]")

    g = group("centres", "imaging centres and how they are recognised")
    p = command(g, "add", centres_add, "add a centre, or more ways to recognise it")
    p.add_argument("name")
    p.add_argument("--ae", action="append", help="calling AE title of its modalities (plain DIMSE: no credential)")
    p.add_argument("--address", action="append",
                   help="package origin address (the first one is also where its receipts and results are queued)")
    p.add_argument("--network", action="append", metavar="CIDR",
                   help="a network its modalities send from; when given, its AE titles name it only from these")
    p.add_argument("--token", action="store_true",
                   help="issue a bearer token (printed as the last line): its packages over HTTP(S), its outbox")
    p.add_argument("--client-cert", metavar="FILE",
                   help="issue a TLS client certificate (CN = its first address) signed by [tls] client_ca_key; "
                        "written to FILE with its key")
    p.add_argument("--smime-cert", metavar="FILE",
                   help="its S/MIME certificate (PEM): packages signed with its key are its credential over SMTP "
                        "and IMAP (PS3.15 B.8)")
    command(g, "list", centres_list, "list centres")
    command(g, "token", centres_token, "issue a new bearer token to a centre (the old one stops working)").add_argument("name")

    g = group("admins", "administrators")
    command(g, "add", admins_add, "add an administrator; prints its token").add_argument("name")
    p = command(g, "password", admins_password, "set an administrator's console password (asks for it twice)")
    p.add_argument("name")
    p.add_argument("--password-file", metavar="FILE", help="read the password from the first line of FILE")

    g = group("readers", "read credentials for DICOMweb QIDO-RS and WADO-RS on central")
    p = command(g, "add", readers_add, "register a reader: a token (printed as the last line) and/or a client certificate")
    p.add_argument("name")
    p.add_argument("--scope", required=True, choices=["read"],
                   help="what it may do: read = DICOMweb QIDO-RS and WADO-RS (never write)")
    p.add_argument("--token", action="store_true", help="issue a bearer token (Authorization: Bearer)")
    p.add_argument("--client-cert", metavar="FILE",
                   help="issue a TLS client certificate (CN = reader:NAME) signed by [tls] client_ca_key, written "
                        "to FILE with its key; central knows it by its SHA-256 on an HTTPS listener")
    command(g, "list", readers_list, "list readers and their credentials")
    command(g, "revoke", readers_revoke, "remove a reader; its token and certificate stop working").add_argument("name")

    g = group("routes", "routing rules")
    command(g, "list", routes_list, "list routing rules")
    p = command(g, "add", routes_add, "route objects of a centre and/or modality to a viewer")
    p.add_argument("--centre")
    p.add_argument("--modality")
    p.add_argument("--type", choices=["image", "overlay", "report"])
    p.add_argument("--to", required=True)
    command(g, "remove", routes_remove, "remove a rule").add_argument("id", type=int)

    g = group("quarantine", "objects held for an administrator")
    p = command(g, "list", quarantine_list, "list held objects")
    p.add_argument("--json", action="store_true")
    p.add_argument("--all", action="store_true", help="include released and rejected entries")
    p = command(g, "route", quarantine_route, "re-verify with a new destination and release")
    p.add_argument("id", type=int)
    p.add_argument("--to", required=True)
    p.add_argument("--admin", default=getpass.getuser())
    p = command(g, "reject", quarantine_reject, "reject a held object")
    p.add_argument("id", type=int)
    p.add_argument("--reason", required=True)
    p.add_argument("--admin", default=getpass.getuser())

    p = command(sub, "track", track, "history of an image, a study or a message")
    p.add_argument("uid", help="SOP Instance UID, Study Instance UID or Message-ID")
    p.add_argument("--json", action="store_true")
