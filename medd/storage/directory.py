"""Central's directory: imaging centres and how they are recognised, viewers
with their credentials and authorisations, administrators, routing rules.

The :class:`Directory` connector is what the services, the admin API and the
CLI use; the functions of a connection below are its internals, and the
routing and outbox connectors call them inside their own transactions.
Credentials are random tokens shown once and stored as SHA-256 hashes; they
carry 256 bits of entropy, so a slow password hash would add nothing.
"""
from __future__ import annotations

import hashlib
import hmac
import ipaddress
import secrets
import threading
from dataclasses import dataclass
from datetime import datetime
from functools import partial
from urllib.parse import urlsplit

from sqlalchemy import and_, bindparam, delete, false, func, or_, select, update
from sqlalchemy.engine import Connection
from twisted.internet.defer import Deferred

from medd.storage.connector import Connector
from medd.storage.routing_tables import (admins, authorisations, centre_aliases, centres, readers, routing_decisions,
                                         routing_rules, viewers)
from medd.storage.schema import objects

PUSH_SCHEMES = ("smtp", "tls", "http", "https", "mailto")
# What a reader's credential may do: "read" is DICOMweb QIDO-RS and WADO-RS.
READER_SCOPES = ("read",)


class DirectoryError(ValueError):
    """A directory change that cannot be made (unknown name, duplicate, bad URL)."""


@dataclass(frozen=True)
class Viewer:
    id: int
    address: str
    mode: str
    push_url: str | None
    authorisations: tuple[str, ...] = ()  # "CENTRE" or "CENTRE:MODALITY"


@dataclass(frozen=True)
class Centre:
    id: int
    name: str
    aliases: tuple[tuple[str, str], ...] = ()  # ("ae" | "address" | "network", value), oldest first
    has_token: bool = False
    client_cert_sha256: str | None = None

    def _values(self, kind: str) -> tuple[str, ...]:
        return tuple(v for k, v in self.aliases if k == kind)

    @property
    def address(self) -> str | None:
        """Its first package address: where central queues its status packages and results."""
        return next(iter(self._values("address")), None)

    @property
    def addresses(self) -> tuple[str, ...]:
        return self._values("address")

    @property
    def networks(self) -> tuple[str, ...]:
        return self._values("network")


@dataclass(frozen=True)
class NewCentre:
    """A centre just added or changed, with its new token if one was issued (shown once)."""

    centre: Centre
    token: str | None = None


@dataclass(frozen=True)
class OutboxOwner:
    """Whose outbox a bearer token opens: a pull viewer or a centre, by its delivery address."""

    kind: str  # "viewer" | "centre"
    name: str  # the viewer's address or the centre's name
    address: str


@dataclass(frozen=True)
class CentreClaim:
    """Who a package from a centre's address claims to be, and who its token proves."""

    named: Centre | None  # the registered centre one of whose addresses is the package's origin
    authenticated: Centre | None  # the centre whose token came with it


@dataclass(frozen=True)
class Rule:
    id: int
    centre: str
    modality: str
    object_type: str
    destination: str


@dataclass(frozen=True)
class NewViewer:
    """A viewer just registered, with its token (shown once, stored only hashed)."""

    viewer: Viewer
    token: str


@dataclass(frozen=True)
class Claimants:
    """Who a package from a viewer claims to be, and who its credentials prove."""

    named: Viewer | None  # the registered viewer at the package's origin address
    authenticated: Viewer | None  # the viewer whose token came with it


@dataclass(frozen=True)
class Reader:
    name: str
    scope: str
    has_token: bool
    client_cert_sha256: str | None
    created_at: datetime


@dataclass(frozen=True)
class NewReader:
    """A reader just registered, with its token if one was issued (shown once, stored only hashed)."""

    reader: Reader
    token: str | None


@dataclass(frozen=True)
class Principal:
    """Who a credential (a bearer token or a TLS client certificate) proves the caller to be.

    ``kind`` is ``"admin"``, ``"reader"``, ``"centre"`` or ``"viewer"``; ``name`` the
    administrator's, reader's or centre's name, or the viewer's address; ``addresses`` the
    package addresses it may send as (a centre's; a viewer's own)."""

    kind: str
    name: str
    scope: str = ""
    addresses: tuple[str, ...] = ()


@dataclass(frozen=True)
class SenderFacts:
    """What central knows about a package's sender: whose addresses its From is, who its
    connection proves it to be (token, or TLS client certificate CN), and whether the study
    an overlay or report is about is the proven centre's own."""

    named_centre: Centre | None  # the registered centre one of whose addresses is the From
    centre: Centre | None  # the centre the connection proves
    named_viewer: Viewer | None  # the registered viewer at the From
    viewer: Viewer | None  # the viewer the connection proves
    own_study: bool = False  # the study has images that came from ``centre``


def new_token() -> str:
    return secrets.token_urlsafe(32)


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def split_scope(scope: str) -> tuple[str, str]:
    """``CENTRE[:MODALITY]`` -> (centre, modality or "")."""
    centre, _, modality = scope.partition(":")
    if not centre:
        raise DirectoryError(f"not CENTRE[:MODALITY]: {scope!r}")
    return centre, modality.upper()


def check_push_url(urls: str) -> None:
    """One push URL, or several separated by spaces: tried in order, failing over after
    ``[delivery] failover_after`` attempts on each."""
    if not urls.split():
        raise DirectoryError("a push URL is needed")
    for url in urls.split():
        _check_one_push_url(url)


def _check_one_push_url(url: str) -> None:
    parts = urlsplit(url)
    if parts.scheme == "mailto":
        from medd.mail.settings import mailto_address

        try:
            mailto_address(url)
        except ValueError as e:
            raise DirectoryError(str(e)) from e
        return
    if parts.scheme not in PUSH_SCHEMES or not parts.hostname or (parts.scheme in ("smtp", "tls") and not parts.port):
        raise DirectoryError(f"push URL must be smtp://host:port, tls://host:port, http(s)://host[:port]/path "
                             f"or mailto:address, not {url!r}")


# -- centres ---------------------------------------------------------------------------------------


def _alias_value(kind: str, value: str) -> str:
    if kind == "ae":
        return value.strip()
    if kind == "network":
        try:
            return str(ipaddress.ip_network(value.strip(), strict=False))
        except ValueError as e:
            raise DirectoryError(f"not a network (CIDR such as 10.1.2.0/24): {value!r}") from e
    return value.strip().lower()


def add_centre(conn: Connection, name: str, aes=(), addresses=(), networks=(), *, at: datetime) -> Centre:
    row = conn.execute(select(centres).where(centres.c.name == name)).first()
    centre_id = row.id if row else conn.execute(centres.insert().values(name=name, created_at=at)).inserted_primary_key[0]
    for kind, values in (("ae", aes), ("address", addresses), ("network", networks)):
        for value in values:
            value = _alias_value(kind, value)
            if kind == "address" and "@" not in value:
                raise DirectoryError(f"a centre address looks like name@domain, not {value!r}")
            if kind == "address" and conn.execute(select(viewers.c.id).where(viewers.c.address == value)).first():
                raise DirectoryError(f"address {value} is a viewer's; a centre needs its own")
            owner = conn.execute(
                select(centre_aliases.c.centre_id).where(and_(centre_aliases.c.kind == kind, centre_aliases.c.value == value))
            ).scalar()
            if owner is not None and owner != centre_id:
                raise DirectoryError(f"{kind} {value!r} already identifies another centre")
            if owner is None:
                conn.execute(centre_aliases.insert().values(centre_id=centre_id, kind=kind, value=value))
    return get_centre(conn, name)


def get_centre(conn: Connection, name: str) -> Centre | None:
    row = conn.execute(select(centres).where(centres.c.name == name)).first()
    if row is None:
        return None
    aliases = conn.execute(
        select(centre_aliases.c.kind, centre_aliases.c.value).where(centre_aliases.c.centre_id == row.id).order_by(centre_aliases.c.id)
    ).all()
    return Centre(row.id, row.name, tuple((k, v) for k, v in aliases), row.token_hash is not None,
                  row.client_cert_sha256)


def _centre_row(conn: Connection, name: str):
    row = conn.execute(select(centres).where(centres.c.name == name)).first()
    if row is None:
        raise DirectoryError(f"no imaging centre {name}")
    return row


def issue_centre_token(conn: Connection, name: str, token: str | None = None) -> str:
    """Give a centre a new bearer token (replacing any it had); returns it, to be shown once."""
    row = _centre_row(conn, name)
    token = token or new_token()
    conn.execute(centres.update().where(centres.c.id == row.id).values(token_hash=hash_token(token)))
    return token


def revoke_centre_token(conn: Connection, name: str) -> None:
    """The centre's bearer token stops working (it may still have a client certificate)."""
    row = _centre_row(conn, name)
    if row.token_hash is None:
        raise DirectoryError(f"centre {name} has no token")
    conn.execute(centres.update().where(centres.c.id == row.id).values(token_hash=None))


def remove_centre(conn: Connection, name: str) -> None:
    """Remove a centre: its names, credentials and the viewers' authorisations for it; refused while a
    routing rule names it (remove the rule first, or it would match nothing silently)."""
    row = _centre_row(conn, name)
    rule = conn.execute(select(routing_rules.c.id).where(routing_rules.c.centre == name)).scalar()
    if rule is not None:
        raise DirectoryError(f"routing rule {rule} names centre {name}: remove it first")
    conn.execute(delete(authorisations).where(authorisations.c.centre_id == row.id))
    conn.execute(delete(centre_aliases).where(centre_aliases.c.centre_id == row.id))
    conn.execute(delete(centres).where(centres.c.id == row.id))


def record_centre_certificate(conn: Connection, name: str, fingerprint: str | None) -> None:
    """Remember (hashed) the TLS client certificate issued to a centre (None: it no longer has one)."""
    row = _centre_row(conn, name)
    conn.execute(centres.update().where(centres.c.id == row.id).values(client_cert_sha256=fingerprint))


def centre_by_token(conn: Connection, token: str) -> Centre | None:
    row = conn.execute(select(centres.c.name, centres.c.token_hash).where(centres.c.token_hash == hash_token(token))).first()
    if row is None or not hmac.compare_digest(row.token_hash, hash_token(token)):
        return None
    return get_centre(conn, row.name)


def centre_at_address(conn: Connection, address: str) -> Centre | None:
    """The registered centre one of whose package addresses ``address`` is."""
    name = centre_of(conn, address, "address")
    return get_centre(conn, name) if name else None


def outbox_owner_by_token(conn: Connection, token: str) -> OutboxOwner | None:
    """The viewer or centre whose outbox ``token`` opens (a centre's is at its first address)."""
    viewer = viewer_by_token(conn, token)
    if viewer is not None:
        return OutboxOwner("viewer", viewer.address, viewer.address)
    centre = centre_by_token(conn, token)
    if centre is not None and centre.address:
        return OutboxOwner("centre", centre.name, centre.address)
    return None


def outbox_owner_by_certificate(conn: Connection, common_name: str, sha256: str) -> OutboxOwner | None:
    """The viewer or centre whose outbox a verified client certificate opens: the one registered at
    its CN with this very certificate (the SHA-256 recorded when ``--client-cert`` issued it, so a
    certificate issued again replaces the old one)."""
    address = common_name.strip().lower()
    row = conn.execute(select(viewers.c.address, viewers.c.client_cert_sha256).where(viewers.c.address == address)).first()
    if row is not None and row.client_cert_sha256 and hmac.compare_digest(row.client_cert_sha256, sha256.lower()):
        return OutboxOwner("viewer", row.address, row.address)
    centre = centre_at_address(conn, address)
    if (centre is not None and centre.address and centre.client_cert_sha256
            and hmac.compare_digest(centre.client_cert_sha256, sha256.lower())):
        return OutboxOwner("centre", centre.name, centre.address)
    return None


def outbox_owner_of(conn: Connection, credential) -> OutboxOwner | None:
    """Whose outbox ``credential`` opens: a bearer token (str), or a verified client certificate
    (anything with ``common_name`` and ``sha256``, e.g. :class:`medd.webresource.PeerCertificate`)."""
    if isinstance(credential, str):
        return outbox_owner_by_token(conn, credential)
    return outbox_owner_by_certificate(conn, credential.common_name, credential.sha256)


def list_centres(conn: Connection) -> list[Centre]:
    names = conn.execute(select(centres.c.name).order_by(centres.c.name)).scalars().all()
    return [get_centre(conn, n) for n in names]


# Asked by every routing pass: built once, so SQLAlchemy compiles and keys it once.
_CENTRE_BY_ALIAS = (
    select(centres.c.name)
    .join(centre_aliases, centre_aliases.c.centre_id == centres.c.id)
    .where(and_(centre_aliases.c.kind == bindparam("kind"), centre_aliases.c.value == bindparam("value")))
)


def centre_of(conn: Connection, origin: str, transport: str) -> str | None:
    """The centre a sender belongs to: by calling AE title for DICOM, else by package origin address."""
    kind = "ae" if transport == "dicom" else "address"
    value = origin.strip() if kind == "ae" else origin.strip().lower()
    row = conn.execute(_CENTRE_BY_ALIAS, {"kind": kind, "value": value}).first()
    return row.name if row else None


# -- viewers ---------------------------------------------------------------------------------------


def add_viewer(conn: Connection, address: str, push_url: str | None = None, scopes=(), token: str | None = None, *,
               at: datetime) -> tuple[Viewer, str]:
    """Register a viewer (pull if no push URL); returns it and its new token (shown once).

    ``token`` is for the demo site only, whose viewer config ships with a fixed token.
    """
    address = address.strip().lower()
    if "@" not in address:
        raise DirectoryError(f"a viewer address looks like name@domain, not {address!r}")
    if centre_of(conn, address, "address") is not None:
        raise DirectoryError(f"address {address} is a centre's; a viewer needs its own")
    if conn.execute(select(viewers.c.id).where(viewers.c.address == address)).first():
        raise DirectoryError(f"viewer {address} already exists")
    if push_url is not None:
        check_push_url(push_url)
    token = token or new_token()
    conn.execute(
        viewers.insert().values(
            address=address, mode="push" if push_url else "pull", push_url=push_url,
            token_hash=hash_token(token), created_at=at,
        )
    )
    for scope in scopes:
        authorise(conn, address, scope)
    return get_viewer(conn, address), token


def issue_viewer_token(conn: Connection, address: str) -> str:
    """Give a viewer a new bearer token (the old one stops working); returns it, to be shown once."""
    viewer = _viewer_row(conn, address)
    token = new_token()
    conn.execute(viewers.update().where(viewers.c.id == viewer.id).values(token_hash=hash_token(token)))
    return token


def record_client_certificate(conn: Connection, address: str, fingerprint: str | None) -> None:
    """Remember (hashed) the client certificate issued to a viewer (None: it no longer has one)."""
    viewer = _viewer_row(conn, address)
    conn.execute(viewers.update().where(viewers.c.id == viewer.id).values(client_cert_sha256=fingerprint))


def remove_viewer(conn: Connection, address: str) -> None:
    viewer = _viewer_row(conn, address)
    conn.execute(delete(authorisations).where(authorisations.c.viewer_id == viewer.id))
    conn.execute(delete(viewers).where(viewers.c.id == viewer.id))


def _viewer_row(conn: Connection, address: str):
    row = conn.execute(select(viewers).where(viewers.c.address == address.strip().lower())).first()
    if row is None:
        raise DirectoryError(f"no viewer {address}")
    return row


def get_viewer(conn: Connection, address: str) -> Viewer | None:
    row = conn.execute(select(viewers).where(viewers.c.address == address.strip().lower())).first()
    if row is None:
        return None
    scopes = conn.execute(
        select(centres.c.name, authorisations.c.modality)
        .join(centres, centres.c.id == authorisations.c.centre_id)
        .where(authorisations.c.viewer_id == row.id)
        .order_by(centres.c.name, authorisations.c.modality)
    ).all()
    return Viewer(row.id, row.address, row.mode, row.push_url, tuple(f"{c}:{m}" if m else c for c, m in scopes))


def list_viewers(conn: Connection) -> list[Viewer]:
    return [get_viewer(conn, a) for a in conn.execute(select(viewers.c.address).order_by(viewers.c.address)).scalars()]


def viewer_by_token(conn: Connection, token: str) -> Viewer | None:
    row = conn.execute(select(viewers.c.address, viewers.c.token_hash).where(viewers.c.token_hash == hash_token(token))).first()
    if row is None or not hmac.compare_digest(row.token_hash, hash_token(token)):
        return None
    return get_viewer(conn, row.address)


def client_certificate_of(conn: Connection, address: str) -> str | None:
    """SHA-256 of the client certificate issued to a viewer, if one was."""
    return _viewer_row(conn, address).client_cert_sha256


def _authorisation(conn: Connection, address: str, scope: str, missing_centre: str):
    """The condition matching a viewer's authorisation for ``scope``, and that row's values."""
    viewer = _viewer_row(conn, address)
    centre_name, modality = split_scope(scope)
    centre = get_centre(conn, centre_name)
    if centre is None:
        raise DirectoryError(f"no imaging centre {centre_name}{missing_centre}")
    return and_(authorisations.c.viewer_id == viewer.id, authorisations.c.centre_id == centre.id,
                authorisations.c.modality == modality), dict(viewer_id=viewer.id, centre_id=centre.id, modality=modality)


def authorise(conn: Connection, address: str, scope: str) -> None:
    match, values = _authorisation(conn, address, scope, " (add it with `medd centres add`)")
    if not conn.execute(select(authorisations.c.id).where(match)).first():
        conn.execute(authorisations.insert().values(**values))


def revoke(conn: Connection, address: str, scope: str) -> None:
    match, _ = _authorisation(conn, address, scope, "")
    if conn.execute(delete(authorisations).where(match)).rowcount == 0:
        raise DirectoryError(f"{address} has no authorisation {scope}")


def is_authorised(conn: Connection, address: str, centre: str, modality: str) -> bool:
    """Authorised for the centre with every modality, or for exactly this modality."""
    row = conn.execute(
        select(authorisations.c.id)
        .join(viewers, viewers.c.id == authorisations.c.viewer_id)
        .join(centres, centres.c.id == authorisations.c.centre_id)
        .where(
            and_(
                viewers.c.address == address.strip().lower(),
                centres.c.name == centre,
                or_(authorisations.c.modality == "", authorisations.c.modality == (modality or "").upper()),
            )
        )
    ).first()
    return row is not None


def authorised_viewers(conn: Connection, centre: str | None, modality: str | None) -> list[str]:
    """Addresses of the viewers authorised for ``centre`` and ``modality`` (what a route may be corrected to)."""
    if not centre:
        return []
    rows = conn.execute(
        select(viewers.c.address).distinct()
        .join(authorisations, authorisations.c.viewer_id == viewers.c.id)
        .join(centres, centres.c.id == authorisations.c.centre_id)
        .where(centres.c.name == centre,
               or_(authorisations.c.modality == "", authorisations.c.modality == (modality or "").upper()))
        .order_by(viewers.c.address))
    return [r.address for r in rows]


# -- administrators --------------------------------------------------------------------------------


def add_admin(conn: Connection, name: str, *, at: datetime) -> str:
    if conn.execute(select(admins.c.id).where(admins.c.name == name)).first():
        raise DirectoryError(f"administrator {name} already exists")
    token = new_token()
    conn.execute(admins.insert().values(name=name, token_hash=hash_token(token), created_at=at))
    return token


def admin_by_token(conn: Connection, token: str) -> str | None:
    return conn.execute(select(admins.c.name).where(admins.c.token_hash == hash_token(token))).scalar()


def list_admins(conn: Connection) -> list[str]:
    return list(conn.execute(select(admins.c.name).order_by(admins.c.name)).scalars())


def issue_admin_token(conn: Connection, name: str) -> str:
    """A new token for administrator ``name`` (the old one stops working), to be shown once."""
    token = new_token()
    if conn.execute(admins.update().where(admins.c.name == name).values(token_hash=hash_token(token))).rowcount == 0:
        raise DirectoryError(f"no administrator {name}")
    return token


def remove_admin(conn: Connection, name: str) -> None:
    """Remove an administrator (token and password); refused for the last one, which nobody could replace
    from the console."""
    if name not in list_admins(conn):
        raise DirectoryError(f"no administrator {name}")
    if len(list_admins(conn)) == 1:
        raise DirectoryError(f"{name} is the last administrator")
    conn.execute(delete(admins).where(admins.c.name == name))


def set_admin_password(conn: Connection, name: str, password_hash: str) -> None:
    if conn.execute(admins.update().where(admins.c.name == name).values(password_hash=password_hash)).rowcount == 0:
        raise DirectoryError(f"no administrator {name}")


def admin_password_hash(conn: Connection, name: str) -> str | None:
    return conn.execute(select(admins.c.password_hash).where(admins.c.name == name)).scalar()


def sender_facts(conn: Connection, origin: str, token: str | None, study_uid: str | None,
                 certificate_cn: str | None, memo: dict | None = None) -> SenderFacts:
    """``own_study`` is looked up only for a ``study_uid`` (the sender policy gives one for an
    overlay or report). ``memo`` keeps the directory's answers for other lookups in the same
    transaction (see :meth:`Directory.sender_facts`)."""
    memo = {} if memo is None else memo

    def remembered(kind, look_up, key):
        if (kind, key) not in memo:
            memo[kind, key] = look_up(conn, key)
        return memo[kind, key]

    cn = (certificate_cn or "").strip().lower() or None
    centre = remembered("centre-token", centre_by_token, token) if token else None
    viewer = remembered("viewer-token", viewer_by_token, token) if token else None
    if cn is not None:
        centre = centre or remembered("centre", centre_at_address, cn)
        viewer = viewer or remembered("viewer", get_viewer, cn)
    own = bool(centre is not None and study_uid and study_of_centre(conn, study_uid, centre))
    return SenderFacts(remembered("centre", centre_at_address, origin), centre, remembered("viewer", get_viewer, origin),
                       viewer, own)


def set_smime_certificate(conn: Connection, address: str, pem: str) -> str:
    """Register ``pem`` as the S/MIME certificate of the centre or viewer at ``address``; which one it was."""
    address = address.strip().lower()
    centre = centre_at_address(conn, address)
    if centre is not None:
        conn.execute(update(centres).where(centres.c.name == centre.name).values(smime_cert=pem))
        return f"centre {centre.name}"
    if get_viewer(conn, address) is not None:
        conn.execute(update(viewers).where(func.lower(viewers.c.address) == address).values(smime_cert=pem))
        return f"viewer {address}"
    raise DirectoryError(f"no centre or viewer has the address {address}")


def smime_certificate_of(conn: Connection, address: str) -> str | None:
    """The S/MIME certificate (PEM) registered for the centre or viewer at ``address``, or None."""
    address = address.strip().lower()
    centre = centre_at_address(conn, address)
    if centre is not None:
        return conn.execute(select(centres.c.smime_cert).where(centres.c.name == centre.name)).scalar()
    return conn.execute(select(viewers.c.smime_cert).where(func.lower(viewers.c.address) == address)).scalar()


def study_of_centre(conn: Connection, study_uid: str, centre: Centre) -> bool:
    """Whether ``study_uid`` has an image from ``centre``: routed as the centre's, or received from one
    of its package addresses."""
    found = conn.execute(
        select(objects.c.id)
        .select_from(objects.outerjoin(routing_decisions, routing_decisions.c.uid == objects.c.sop_instance_uid))
        .where(and_(objects.c.study_instance_uid == study_uid, objects.c.object_type == "image",
                    or_(routing_decisions.c.centre == centre.name,
                        func.lower(objects.c.origin).in_(centre.addresses) if centre.addresses else false())))
        .limit(1)
    ).first()
    return found is not None


# -- readers -----------------------------------------------------------------------------------------


def _reader(row) -> Reader:
    return Reader(row.name, row.scope, row.token_hash is not None, row.client_cert_sha256, row.created_at)


def add_reader(conn: Connection, name: str, scope: str, *, token: bool, client_certificate: str | None,
               at: datetime) -> NewReader:
    if scope not in READER_SCOPES:
        raise DirectoryError(f"unknown scope {scope!r}; scopes: {', '.join(READER_SCOPES)}")
    if not (token or client_certificate):
        raise DirectoryError("a reader needs a credential: --token, --client-cert, or both")
    if conn.execute(select(readers.c.id).where(readers.c.name == name)).first():
        raise DirectoryError(f"reader {name} already exists")
    issued = new_token() if token else None
    conn.execute(readers.insert().values(name=name, scope=scope, token_hash=hash_token(issued) if issued else None,
                                         client_cert_sha256=client_certificate, created_at=at))
    row = conn.execute(select(readers).where(readers.c.name == name)).one()
    return NewReader(_reader(row), issued)


def list_readers(conn: Connection) -> list[Reader]:
    return [_reader(row) for row in conn.execute(select(readers).order_by(readers.c.name))]


def revoke_reader(conn: Connection, name: str) -> None:
    if conn.execute(delete(readers).where(readers.c.name == name)).rowcount == 0:
        raise DirectoryError(f"no reader {name}")


def principal_by_token(conn: Connection, token: str) -> Principal | None:
    """Whose bearer token this is: an administrator, a reader, a centre or a viewer."""
    admin = admin_by_token(conn, token)
    if admin is not None:
        return Principal("admin", admin)
    row = conn.execute(select(readers).where(readers.c.token_hash == hash_token(token))).first()
    if row is not None:
        return Principal("reader", row.name, row.scope)
    centre = centre_by_token(conn, token)
    if centre is not None:
        return Principal("centre", centre.name, addresses=centre.addresses)
    viewer = viewer_by_token(conn, token)
    if viewer is not None:
        return Principal("viewer", viewer.address, addresses=(viewer.address,))
    return None


def principal_by_certificate(conn: Connection, fingerprint: str) -> Principal | None:
    """Whose TLS client certificate (SHA-256 of its DER) this is: a reader, a centre or a viewer."""
    row = conn.execute(select(readers).where(readers.c.client_cert_sha256 == fingerprint)).first()
    if row is not None:
        return Principal("reader", row.name, row.scope)
    name = conn.execute(select(centres.c.name).where(centres.c.client_cert_sha256 == fingerprint)).scalar()
    if name is not None:
        return Principal("centre", name, addresses=get_centre(conn, name).addresses)
    address = conn.execute(select(viewers.c.address).where(viewers.c.client_cert_sha256 == fingerprint)).scalar()
    if address is not None:
        return Principal("viewer", address, addresses=(address,))
    return None


# -- routing rules ---------------------------------------------------------------------------------


def add_rule(conn: Connection, destination: str, centre: str = "", modality: str = "", object_type: str = "", *,
             at: datetime) -> Rule:
    if not (centre or modality or object_type):
        raise DirectoryError("a rule needs at least one of centre, modality, object type")
    rule_id = conn.execute(
        routing_rules.insert().values(
            centre=centre, modality=modality.upper(), object_type=object_type,
            destination=destination.strip().lower(), created_at=at,
        )
    ).inserted_primary_key[0]
    return Rule(rule_id, centre, modality.upper(), object_type, destination.strip().lower())


def remove_rule(conn: Connection, rule_id: int) -> None:
    if conn.execute(delete(routing_rules).where(routing_rules.c.id == rule_id)).rowcount == 0:
        raise DirectoryError(f"no rule {rule_id}")


_RULES = select(routing_rules).order_by(routing_rules.c.id)


def list_rules(conn: Connection) -> list[Rule]:
    return [Rule(r.id, r.centre, r.modality, r.object_type, r.destination) for r in conn.execute(_RULES)]


def matching_rules(conn: Connection, centre: str | None, modality: str, object_type: str) -> list[str]:
    """Destinations of the rules matching, most specific first, then oldest first."""
    found = []
    for rule in list_rules(conn):
        if rule.centre and rule.centre != centre:
            continue
        if rule.modality and rule.modality != (modality or "").upper():
            continue
        if rule.object_type and rule.object_type != object_type:
            continue
        specificity = bool(rule.centre) + bool(rule.modality) + bool(rule.object_type)
        found.append((-specificity, rule.id, rule.destination))
    found.sort()
    seen, out = set(), []
    for _, _, dest in found:
        if dest not in seen:
            seen.add(dest)
            out.append(dest)
    return out


class Directory(Connector):
    """The directory of a central node. Every method returns a Deferred; one
    method is one transaction, and a :class:`DirectoryError` rolls it back."""

    def __init__(self, database, clock):
        super().__init__(database, clock)
        # Senders to look up in the next batch (see sender_facts): (arguments, Deferred).
        self._facts_wanted: list = []
        self._facts_lock = threading.Lock()

    # centres

    def add_centre(self, name: str, aes=(), addresses=(), networks=(), *, token: bool | str = False,
                   client_certificate: str | None = None):
        """Deferred :class:`NewCentre`: added, or given more aliases if it exists; with ``token`` it gets a
        new bearer token (a string: that token, for the demo site), with ``client_certificate`` the
        SHA-256 of a certificate issued to it is kept."""
        at = self.now()

        def thd(conn) -> NewCentre:
            centre = add_centre(conn, name, list(aes), list(addresses), list(networks), at=at)
            if (token or client_certificate) and not centre.address:
                raise DirectoryError("a centre's credential authenticates its package address: give an address")
            issued = None
            if token:
                issued = issue_centre_token(conn, name, token if isinstance(token, str) else None)
            if client_certificate:
                record_centre_certificate(conn, name, client_certificate)
            return NewCentre(get_centre(conn, centre.name), issued)

        return self.db.run(thd)

    def issue_centre_token(self, name: str):
        """Deferred new bearer token of a centre (the old one stops working)."""
        return self.db.run(lambda conn: issue_centre_token(conn, name))

    def revoke_centre_token(self, name: str):
        return self.db.run(lambda conn: revoke_centre_token(conn, name))

    def centre_certificate(self, name: str, fingerprint: str | None):
        """Record the SHA-256 of the certificate now issued to a centre (the older one stops working), or
        with None revoke it."""
        return self.db.run(lambda conn: record_centre_certificate(conn, name, fingerprint))

    def remove_centre(self, name: str):
        return self.db.run(lambda conn: remove_centre(conn, name))

    def centre_claim(self, origin: str, token: str | None):
        """Deferred :class:`CentreClaim`, both looked up in one transaction."""

        def thd(conn) -> CentreClaim:
            return CentreClaim(centre_at_address(conn, origin), centre_by_token(conn, token) if token else None)

        return self.db.run(thd)

    def outbox_owner(self, credential):
        """Deferred :class:`OutboxOwner` whose outbox ``credential`` (a token, or a verified client
        certificate) opens, or None."""
        return self.db.run(lambda conn: outbox_owner_of(conn, credential))

    def centre(self, name: str):
        """Deferred :class:`Centre` or None."""
        return self.db.run(lambda conn: get_centre(conn, name))

    def centres(self):
        """Deferred list of :class:`Centre`, by name."""
        return self.db.run(list_centres)

    # viewers

    def add_viewer(self, address: str, push_url: str | None = None, scopes=(), *, token: str | None = None,
                   client_certificate: str | None = None):
        """Deferred :class:`NewViewer`; ``client_certificate`` is the SHA-256 of one issued to it."""
        at = self.now()

        def thd(conn) -> NewViewer:
            viewer, new = add_viewer(conn, address, push_url, list(scopes), token, at=at)
            if client_certificate:
                record_client_certificate(conn, viewer.address, client_certificate)
            return NewViewer(viewer, new)

        return self.db.run(thd)

    def remove_viewer(self, address: str):
        return self.db.run(lambda conn: remove_viewer(conn, address))

    def issue_viewer_token(self, address: str):
        """Deferred new bearer token of a viewer (the old one stops working)."""
        return self.db.run(lambda conn: issue_viewer_token(conn, address))

    def viewer_certificate(self, address: str, fingerprint: str | None):
        """Record the SHA-256 of the certificate now issued to a viewer (the older one stops working), or
        with None revoke it."""
        return self.db.run(lambda conn: record_client_certificate(conn, address, fingerprint))

    def viewer(self, address: str):
        """Deferred :class:`Viewer` or None."""
        return self.db.run(lambda conn: get_viewer(conn, address))

    def authorised_viewers(self, centre: str | None, modality: str | None):
        """Deferred addresses of the viewers authorised for ``centre`` and ``modality``."""
        return self.db.run(lambda conn: authorised_viewers(conn, centre, modality))

    def viewers(self):
        """Deferred list of :class:`Viewer`, by address."""
        return self.db.run(list_viewers)

    def viewer_by_token(self, token: str):
        """Deferred :class:`Viewer` whose token this is, or None."""
        return self.db.run(lambda conn: viewer_by_token(conn, token))

    def claimants(self, origin: str, token: str | None):
        """Deferred :class:`Claimants`, both looked up in one transaction."""

        def thd(conn) -> Claimants:
            return Claimants(get_viewer(conn, origin), viewer_by_token(conn, token) if token else None)

        return self.db.run(thd)

    def sender_facts(self, origin: str, token: str | None, study_uid: str | None = None,
                     certificate_cn: str | None = None):
        """Deferred :class:`SenderFacts` of a package's sender.

        The senders asked about while the database is busy are looked up together, in one
        transaction that asks the directory once per distinct origin, token or certificate
        name: a gateway pipelines its packages, all from the same address. Nothing outlives
        that transaction, so a change to the directory counts from the next lookup on."""
        if self.db.inline:
            return self.db.run(lambda conn: sender_facts(conn, origin, token, study_uid, certificate_cn))
        d = Deferred()
        with self._facts_lock:
            self._facts_wanted.append(((origin, token, study_uid, certificate_cn), d))
            first = len(self._facts_wanted) == 1
        if first:
            taken: list = []
            self.db.run(partial(self._look_up_senders, taken)).addCallbacks(
                self._facts_found, self._facts_failed, errbackArgs=(taken,))
        return d

    def _look_up_senders(self, taken: list, conn) -> list:
        # On the database thread: takes what was asked so far (once: a re-run after a rollback looks
        # the same senders up again); what is asked from now on starts the next batch.
        if not taken:
            with self._facts_lock:
                taken.extend(self._facts_wanted)
                self._facts_wanted = []
        memo: dict = {}
        return [(d, sender_facts(conn, *asked, memo=memo)) for asked, d in taken]

    @staticmethod
    def _facts_found(found: list) -> None:
        for d, facts in found:
            d.callback(facts)

    def _facts_failed(self, failure, taken: list) -> None:
        if not taken:  # failed before it took its questions: they fail with it, not wait forever
            with self._facts_lock:
                taken.extend(self._facts_wanted)
                self._facts_wanted = []
        for _, d in taken:
            d.errback(failure)

    def set_smime_certificate(self, address: str, pem: str):
        """Deferred: which centre or viewer (by address) now has ``pem`` as its S/MIME certificate."""
        return self.db.run(lambda conn: set_smime_certificate(conn, address, pem))

    def smime_certificate(self, address: str):
        """Deferred PEM of the S/MIME certificate registered for ``address``, or None."""
        return self.db.run(lambda conn: smime_certificate_of(conn, address))

    def client_certificate(self, address: str):
        """Deferred SHA-256 of the client certificate issued to a viewer, or None."""
        return self.db.run(lambda conn: client_certificate_of(conn, address))

    def authorise(self, address: str, scope: str):
        return self.db.run(lambda conn: authorise(conn, address, scope))

    def revoke(self, address: str, scope: str):
        return self.db.run(lambda conn: revoke(conn, address, scope))

    # administrators

    def add_admin(self, name: str):
        """Deferred token of the new administrator (shown once)."""
        at = self.now()
        return self.db.run(lambda conn: add_admin(conn, name, at=at))

    def admin_by_token(self, token: str):
        """Deferred name of the administrator whose token this is, or None."""
        return self.db.run(lambda conn: admin_by_token(conn, token))

    def admins(self):
        """Deferred names of the administrators."""
        return self.db.run(list_admins)

    def issue_admin_token(self, name: str):
        """Deferred new token of an administrator (the old one stops working)."""
        return self.db.run(lambda conn: issue_admin_token(conn, name))

    def remove_admin(self, name: str):
        return self.db.run(lambda conn: remove_admin(conn, name))

    def set_admin_password(self, name: str, password_hash: str):
        """Give an administrator a password (its hash, :func:`medd.viewer.users.hash_password`) for the console."""
        return self.db.run(lambda conn: set_admin_password(conn, name, password_hash))

    def admin_password_hash(self, name: str):
        """Deferred password hash of an administrator, or None (none set, or no such administrator)."""
        return self.db.run(lambda conn: admin_password_hash(conn, name))

    # readers

    def add_reader(self, name: str, scope: str, *, token: bool = False, client_certificate: str | None = None):
        """Deferred :class:`NewReader`; ``client_certificate`` is the SHA-256 of one issued to it."""
        at = self.now()
        return self.db.run(lambda conn: add_reader(conn, name, scope, token=token,
                                                   client_certificate=client_certificate, at=at))

    def readers(self):
        """Deferred list of :class:`Reader`, by name."""
        return self.db.run(list_readers)

    def revoke_reader(self, name: str):
        """Remove a reader: its token and certificate stop working at once."""
        return self.db.run(lambda conn: revoke_reader(conn, name))

    # who a credential is

    def principal(self, token: str | None, certificate: str | None = None):
        """Deferred :class:`Principal` of a bearer token or, failing that, of a client
        certificate's SHA-256; None when neither is anyone's."""

        def thd(conn) -> Principal | None:
            found = principal_by_token(conn, token) if token else None
            if found is None and certificate:
                found = principal_by_certificate(conn, certificate)
            return found

        return self.db.run(thd)

    # routing rules

    def add_rule(self, destination: str, centre: str = "", modality: str = "", object_type: str = ""):
        """Deferred :class:`Rule`."""
        at = self.now()
        return self.db.run(lambda conn: add_rule(conn, destination, centre, modality, object_type, at=at))

    def remove_rule(self, rule_id: int):
        return self.db.run(lambda conn: remove_rule(conn, rule_id))

    def rules(self):
        """Deferred list of :class:`Rule`, oldest first."""
        return self.db.run(list_rules)
