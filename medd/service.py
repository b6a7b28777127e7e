"""Assembling a node: config -> plugins -> storage -> the role's services."""
from __future__ import annotations

from twisted.application.service import MultiService
from twisted.logger import Logger

from medd.audit import AuditTrail, SyslogForwarder, tls_connector
from medd.blobsweep import BlobSweep
from medd.central.access import CentralAccess
from medd.central.archiving import make_archiving
from medd.central.routing import RoutingService, SenderPolicy
from medd.central.storage import CentralStorage
from medd.config import Config
from medd.health import Readiness
from medd.metrics import MetricsPage, NodeMetrics
from medd.ingest import Ingest
from medd.plugins.api import IndexQueries, TLSSettings, TransportAPI, WebMounts
from medd.plugins.hookspecs import hookimpl
from medd.plugins.host import Plugins, check_storage, load_plugins
from medd.storage.audit import AuditLog
from medd.storage.database import Database
from medd.storage.index import ObjectIndex
from medd.validation import NodeSettings, validate


class NodeService(MultiService):
    """A node's storage and thread pools, parent of its role's services and its listeners."""

    log = Logger()

    def __init__(self, reactor, settings: NodeSettings, *, clock=None):
        super().__init__()
        config, plugins = settings.config, settings.plugins
        self.reactor = reactor
        # The node's one time source (the reactor; a test's Clock).
        self.clock = clock or reactor
        self.config = config
        self.plugins = plugins
        config.storage_path.mkdir(parents=True, exist_ok=True)
        self.database = Database(reactor, config.database_url)
        backend = config.section("storage").get("backend", "file")
        self.blobs = plugins.storage[("blobstore", backend)](config)
        check_storage(plugins, "blobstore", self.blobs, backend)
        self.index = ObjectIndex(self.database, self.clock)
        self.audit = AuditTrail(AuditLog(self.database, self.clock, config.name))
        audit_settings = settings.audit
        if audit_settings is not None and audit_settings.syslog_host:
            self.syslog = SyslogForwarder(self.audit, audit_settings, tls_connector(reactor, audit_settings), self.clock)
            self.syslog.setName("audit-syslog")
            self.syslog.setServiceParent(self)
        self.archiving = make_archiving(reactor, config, plugins, self.database, self.blobs, clock=self.clock)
        if self.archiving is not None:
            self.archiving.setServiceParent(self)
        record_status = admit = index_with = None
        if config.role == "central":
            self.central_storage = CentralStorage.over(self.database, self.clock, audit=self.audit)
            plugins.manager.register(SenderPolicy(self.central_storage.directory), name="medd-central-sender-policy")
            plugins.manager.register(CentralAccess(self.central_storage.directory), name="medd-central-access")
            record_status = self.central_storage.deliveries.record_status
        elif config.role == "gateway":
            from medd.gateway.forwarding import Spool, message_ids
            from medd.storage.forwarding import Forwarding, queue_new_object

            self.forwarding = Forwarding(self.database, self.clock)
            self.spool = Spool(settings.gateway.max_spool)
            record_status, admit = self.forwarding.record_receipt, self.spool.admit
            # The object and its place in the queue (for central, or a result for the PACS) in one commit.
            index_with = queue_new_object(message_ids(settings.gateway), results=settings.gateway.results_to is not None)
        self.metrics = NodeMetrics(reactor, engine=self.database.engine, role=config.role,
                                   archiving=self.archiving is not None)
        self.database.observe_transaction = self.metrics.database_seconds.observe
        if hasattr(self.blobs, "observe_fsync"):
            self.blobs.observe_fsync = self.metrics.fsync_seconds.observe
        self.ingest = Ingest(
            reactor, self.index, self.blobs, plugins, max_object_size=config.max_object_size,
            part_limits=config.part_limits,
            record_status=record_status, admit=admit, index_with=index_with,
            restore=self.archiving.restore_digest if self.archiving is not None else None, audit=self.audit,
            delivery_facts=config.role == "viewer",
            metrics=self.metrics,
            smime=smime_opener(settings.mail.mail, plugins),
        )
        self.mailbox = None
        if settings.mail.mailbox is not None:
            from medd.mail.mailbox import mailbox_service  # Twisted's IMAP client only where it is used

            self.mailbox = mailbox_service(reactor, settings.mail.mailbox, self.ingest, self.clock,
                                           config.storage_path, config.max_object_size)
            self.mailbox.setServiceParent(self)
        self.blob_sweep = BlobSweep(self.clock, self.index, self.blobs, self.ingest.run_blocking,
                                    interval=config.sweep_interval, min_age=config.sweep_grace,
                                    writing=self.ingest.writing)
        self.blob_sweep.setName("blob-sweep")
        self.blob_sweep.setServiceParent(self)
        self.web = WebMounts()
        #: The node's listener services by transport name (filled below; the readiness checks look at them).
        self.listeners: dict = {}
        self.readiness = Readiness(
            reactor, database=self.database, run_blocking=self.ingest.run_blocking,
            storage_path=config.storage_path, min_free_space=config.min_free_space, listeners=self.listeners,
            archive=self.archiving.archive if self.archiving is not None else None,
        )
        for name, resource in self.readiness.resources().items():
            self.web.mount(name, resource)
        if config.role == "viewer":
            from medd.viewer.access import ViewerAccess
            from medd.viewer.node import ViewerServices
            from medd.viewer.web import reading_room_resources

            self.viewer = ViewerServices(self, settings.mail.for_senders())
            self.viewer.setName("viewer")
            self.viewer.setServiceParent(self)
            self.reading_room = self.viewer.reading_room
            plugins.manager.register(ViewerAccess(self.reading_room, self.viewer.settings.push_token,
                                                  metadata_cache=self.viewer.metadata_cache),
                                     name="medd-viewer-access")
            from medd.viewer.settings import reading_room_settings

            ohif_dist = reading_room_settings(config).ohif_dist
            for name, resource in reading_room_resources(self.reading_room, self.ingest, ohif_dist).items():
                self.web.mount(name, resource)
        elif config.role == "gateway":
            from medd.gateway.node import GatewayServices

            self.gateway = GatewayServices(self, settings.gateway, sender_settings=settings.mail.for_senders())
            self.gateway.setName("gateway")
            self.gateway.setServiceParent(self)
        else:
            from medd.central.webapi import central_resources

            self.routing = RoutingService(reactor, config, plugins, self.central_storage, self.ingest,
                                          settings=settings.central, metrics=self.metrics,
                                          sender_settings=settings.mail.for_senders())
            self.routing.setName("routing")
            self.routing.setServiceParent(self)
            client_ca = ((config.tls_client_ca, config.tls_client_ca_key)
                         if config.tls_client_ca and config.tls_client_ca_key else None)
            for name, resource in central_resources(self.central_storage, self.routing, self.ingest, self.audit,
                                                    client_ca).items():
                self.web.mount(name, resource)
        web_resources = self.web.freeze()
        tls = TLSSettings(config.tls_certificate, config.tls_private_key, config.tls_client_ca)
        queries = IndexQueries(self.index, self.ingest,
                               metadata_cache=self.viewer.metadata_cache if config.role == "viewer" else None)
        metrics_page = MetricsPage(self.metrics)
        for key, endpoint in sorted(config.listen.items()):
            transport = plugins.transports[key]
            # A transport may share another's section (dicom_tls reads [dicom]).
            section = getattr(transport, "settings_section", key)
            api = TransportAPI(
                reactor, self.ingest, transport=key, node_name=config.name, settings=config.section(section),
                tls=tls, web_resources=web_resources, queries=queries, limits=config.connection_limits,
                audit=self.audit, clock=self.clock, metrics_page=metrics_page,
            )
            listener = transport.listener(endpoint, api)
            listener.setName(f"listen-{key}")
            self.listeners[key] = listener
            listener.setServiceParent(self)

    def startService(self) -> None:
        # Blocking, but once at start-up and before any listener accepts.
        self.database.create_schema()
        self.database.start()
        self.ingest.start()
        self.log.info(
            "medd {role} node {name} starting; database {db}; storage {storage}",
            role=self.config.role, name=self.config.name,
            db=self.database.engine.url.render_as_string(hide_password=True), storage=str(self.config.storage_path),
        )
        super().startService()

    def stopService(self):
        d = super().stopService()

        def stop_pools(result):
            self.ingest.stop()
            self.database.stop()
            return result

        return d.addBoth(stop_pools) if d is not None else stop_pools(None)


def smime_opener(mail, plugins):
    """The ingest's S/MIME opener when ``[mail]`` names this node's S/MIME identity (read once, at
    assembly): a package over IMAP must then be signed and encrypted."""
    if mail is None or mail.smime_certificate is None:
        return None
    import shutil

    from medd.mail.smime import OPENSSL, SmimeIdentity, SmimeOpener
    from medd.plugins.host import hook_value

    if shutil.which(OPENSSL) is None:
        raise ValueError("[mail] smime_certificate: S/MIME signatures are verified by the openssl command, "
                         "which is not installed (Debian: apt-get install openssl)")

    async def certificate_of(address: str):
        return await hook_value(plugins.manager.hook.medd_smime_certificate(address=address))

    if mail.smime_recipient is not None:
        # A gateway or viewer takes mail from central only: whatever its From, a package must be
        # signed with central's key (the certificate it also encrypts to).
        plugins.manager.register(CentralCertificate(mail.smime_recipient), name="medd-mail-central-certificate")
    identity = SmimeIdentity.from_files(mail.smime_certificate, mail.smime_private_key)
    return SmimeOpener(identity, certificate_of, required=("imap",))


class CentralCertificate:
    """``medd_smime_certificate`` on a node whose only correspondent is central (read once, at start)."""

    def __init__(self, path: str):
        from pathlib import Path

        self.pem = Path(path).read_bytes()

    @hookimpl
    def medd_smime_certificate(self, address: str):
        return self.pem


def check_against_plugins(config: Config, plugins: Plugins) -> None:
    """The part of config validation that needs to know the loaded plugins (see medd/validation.py)."""
    validate(config, plugins)


def make_node(reactor, config: Config, plugins: Plugins | None = None, *, clock=None) -> NodeService:
    """A node for ``config``, validated whole first (:class:`ConfigError` lists every problem).

    ``clock`` is the node's one time source (default: the reactor).
    """
    plugins = plugins or load_plugins(config.disabled_plugins)
    return NodeService(reactor, validate(config, plugins), clock=clock)
