"""
Service wiring: one L{ProxyService} owns every reactor-bound part of a
proxy (repository, caches, authenticator, sessions, upstream pool, HTTP
front, listening ports) and starts and stops them in dependency order.

Nothing here is module-level state, so a test can run two proxies in one
process.
"""

from __future__ import annotations

from typing import Any, Optional

from twisted.application.service import MultiService, Service
from twisted.internet.defer import Deferred, DeferredList, TimeoutError, maybeDeferred
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IListeningPort, IReactorCore, IReactorTime
from twisted.internet.task import deferLater
from twisted.logger import Logger

from mcp_proxy import __version__
from mcp_proxy.auth import Authenticator, ConfigLoader, RepositoryKeyLookup
from mcp_proxy.cacheplugins import closeCache, openCache
from mcp_proxy.changes import PostgresChangeListener, RedisChangeListener, redisCacheOf
from mcp_proxy.config import Settings
from mcp_proxy.dispatch import CallContext
from mcp_proxy.httpserver import makeSite
from mcp_proxy.interfaces import IRepository, IRequestLog
from mcp_proxy.invalidation import InvalidatingRepository, Invalidator
from mcp_proxy.logwriter import ProcessRequestLog
from mcp_proxy.metrics import MeteredDispatcher, Metrics, instrumentFront, metricsResource
from mcp_proxy.relay import RelayHub
from mcp_proxy.repository import openRepository
from mcp_proxy.requestlog import RequestLog
from mcp_proxy.router import Router
from mcp_proxy.session import SessionTable
from mcp_proxy.transport import McpFront
from mcp_proxy.upstream._spawn import setSubreaper
from mcp_proxy.upstream.pool import UpstreamPool

log = Logger(namespace="mcp_proxy.service")

CONFIG_CACHE_SIZE = 10_000
HEALTH_DB_TIMEOUT = 5.0
HEALTH_CACHE_SECONDS = 1.0
DB_RETRY_MAX = 30.0


class ProxyService(MultiService):
    """
    A whole proxy.

    Start order: the database connects (retrying with backoff while it is
    unreachable) and migrates; then the change listeners make their first
    attempt (L{mcp_proxy.changes}: PostgreSQL LISTEN, Redis SUBSCRIBE; they
    keep retrying in the background), and the session sweeper, the
    upstream pool and finally the listening ports start.  A port that
    cannot be bound stops the process.

    @ivar ports: the listening ports, once started.  Stop order: the ports close,
    the change listeners stop, streams and sessions end, the upstream
    processes stop (no orphans), and the database closes last.
    """

    def __init__(
        self,
        settings: Settings,
        reactor: Any,
        repository: Optional[IRepository] = None,
    ) -> None:
        super().__init__()
        self.settings = settings
        self.reactor = reactor
        clock: IReactorTime = reactor
        self.repository: IRepository = (
            repository if repository is not None else openRepository(settings.database, reactor)
        )
        lookup = RepositoryKeyLookup(self.repository)
        self.authCache = openCache(
            settings.cache,
            reactor,
            maxSize=settings.authCacheSize,
            defaultTtl=settings.authCacheTtl,
        )
        self.configCache = openCache(
            settings.cache, reactor, maxSize=CONFIG_CACHE_SIZE, defaultTtl=settings.configCacheTtl
        )
        self.authenticator = Authenticator(
            lookup=lookup,
            cache=self.authCache,
            clock=clock,
            salt=settings.keySalt,
            ttl=settings.authCacheTtl,
            negativeTtl=settings.authNegativeTtl,
        )
        self.configs = ConfigLoader(
            lookup=lookup, cache=self.configCache, ttl=settings.configCacheTtl, clock=clock
        )
        self.sessions = SessionTable(
            clock=clock, timeout=settings.sessionTimeout, maxSessions=settings.maxSessions
        )
        self.metrics = Metrics()
        self.hub = RelayHub(onListChanged=self._listChanged)
        self.pool = UpstreamPool(
            reactor=reactor,
            processesPerUpstream=settings.upstreamProcesses,
            idleTtl=settings.upstreamIdleTtl,
            onMessage=self.hub.onUpstreamMessage,
        )
        self.router = Router(
            callUpstream=self.metrics.instrumentUpstreamCall(self.pool.call),
            clock=clock,
            timeout=settings.upstreamTimeout,
            catalogTtl=settings.configCacheTtl,
            upstreamCapabilities=self.pool.capabilities,
            hub=self.hub,
        )
        self.requestLog: Optional[IRequestLog] = (
            self._makeRequestLog(settings, reactor, repository is None)
            if settings.requestLog
            else None
        )
        self.dispatcher = MeteredDispatcher(
            metrics=self.metrics,
            loadConfig=self.configs.load,
            router=self.router,
            onRequest=self._answered,
            clock=clock,
        )
        self.front = McpFront(
            authenticator=self.authenticator,
            dispatcher=self.dispatcher,
            sessions=self.sessions,
            clock=clock,
            healthCheck=lambda: Deferred.fromCoroutine(self.health()),
            sseKeepalive=settings.sseKeepalive,
            clientTimeout=settings.clientTimeout,
            maxConcurrentRequests=settings.maxConcurrentRequests,
            allowedHosts=settings.hostPolicy(),
            allowedOrigins=(None if settings.allowedOrigins is None else settings.allowedOrigins),
            hub=self.hub,
            onSubscriptionsEmptied=self._unsubscribeUpstream,
        )
        self.invalidator = Invalidator(
            authenticator=self.authenticator,
            configs=self.configs,
            configCache=self.configCache,
            authCache=self.authCache,
            router=self.router,
            sessions=self.sessions,
        )
        # Admin work done in this process goes through here, so that the
        # caches drop what it makes stale at once.
        self.admin: IRepository = InvalidatingRepository(self.repository, self.invalidator)
        # Changes made by other processes (mcpproxy-admin, other programs
        # writing the database) arrive as PostgreSQL notifications, and as
        # Redis messages when the cache is Redis (mcp_proxy.changes).
        self.changeListeners: list[PostgresChangeListener | RedisChangeListener] = []
        if self.repository.kind == "postgresql":
            self.changeListeners.append(
                PostgresChangeListener(
                    dsn=getattr(self.repository, "dsn", settings.database.dsn),
                    reactor=reactor,
                    invalidator=self.invalidator,
                )
            )
        sharedCache = redisCacheOf(self.authCache)
        if sharedCache is not None:
            self.changeListeners.append(
                RedisChangeListener(
                    cache=sharedCache, reactor=reactor, invalidator=self.invalidator
                )
            )
        self.metrics.watch(
            repository=self.repository,
            authenticator=self.authenticator,
            configLoader=self.configs,
            authCache=self.authCache,
            configCache=self.configCache,
            sessions=self.sessions,
            pool=self.pool,
            requestLog=self.requestLog,
        )
        front = instrumentFront(
            self.front.resource(),
            self.metrics,
            token=settings.metricsToken,
            serveMetrics=settings.metricsListen is None,
            requestLog=(
                Logger(namespace="mcp_proxy.requests") if settings.logLevel == "debug" else None
            ),
        )
        self.site = makeSite(front, settings.maxBodySize, clock=clock)
        self.metricsSite = (
            makeSite(metricsResource(self.metrics, settings.metricsToken), 64 * 1024, clock=clock)
            if settings.metricsListen is not None
            else None
        )
        self.sessions.sweeperService(settings.sessionSweep).setServiceParent(self)
        self.pool.service().setServiceParent(self)
        self.ports: list[IListeningPort] = []
        self._childrenStarted = False
        self._starting: Optional[Deferred[None]] = None
        self._ready = False
        self._readyWaiters: list[Deferred[None]] = []
        self._healthCache: Optional[tuple[float, str]] = None

    # -- lifecycle --------------------------------------------------------

    def _makeRequestLog(self, settings: Settings, reactor: Any, ownDatabase: bool) -> IRequestLog:
        """
        The request log: written by a writer process of its own (unless
        told otherwise, or the database is one only this process can open:
        an in-memory SQLite one, or a repository given by the caller).
        """
        options: dict[str, Any] = dict(
            batchSize=settings.requestLogBatchSize,
            flushInterval=settings.requestLogFlushInterval,
            maxQueue=settings.requestLogMaxQueue,
            maxDataBytes=settings.requestLogMaxData,
            doubleEncode=settings.requestLogDoubleEncode,
        )
        database = settings.database
        if settings.requestLogWriter == "process" and ownDatabase and database.path != ":memory:":
            return ProcessRequestLog(database=database, reactor=reactor, **options)
        return RequestLog(repository=self.repository, reactor=reactor, **options)

    def startService(self) -> None:
        Service.startService(self)
        # Orphans of an upstream's process group are reparented to the proxy
        # and reaped by it, instead of staying zombies under an init that
        # does not reap.
        setSubreaper(True)
        self._starting = Deferred.fromCoroutine(self._start())
        self._starting.addErrback(self._startFailed)

    async def _start(self) -> None:
        delay = 0.5
        database = self.settings.database.redacted()
        while self.running:
            try:
                await self.repository.start()
                break
            except Exception as e:
                log.error(
                    "database {database} not ready ({error}); retrying in {delay}s",
                    database=database,
                    error=str(e) or e.__class__.__name__,
                    delay=delay,
                )
                await deferLater(self.reactor, delay)
                delay = min(delay * 2, DB_RETRY_MAX)
        if not self.running:
            return
        for listener in self.changeListeners:
            await listener.start()
        if self.requestLog is not None:
            self.requestLog.start()
        self._childrenStarted = True
        for child in self:
            child.startService()
        for description in self.settings.listen:
            endpoint = serverFromString(self.reactor, description)
            self.ports.append(await endpoint.listen(self.site))
        if self.metricsSite is not None and self.settings.metricsListen is not None:
            endpoint = serverFromString(self.reactor, self.settings.metricsListen)
            self.ports.append(await endpoint.listen(self.metricsSite))
        self._ready = True
        waiters, self._readyWaiters = self._readyWaiters, []
        for waiter in waiters:
            waiter.callback(None)
        log.info(
            "mcp-proxy {version} serving on {listen} (database {kind})",
            version=__version__,
            listen=", ".join(self.settings.listen),
            kind=self.repository.kind,
        )

    def whenReady(self) -> Deferred[None]:
        """
        A Deferred firing once the database is ready and every port listens.
        """
        d: Deferred[None] = Deferred()
        if self._ready:
            d.callback(None)
        else:
            self._readyWaiters.append(d)
        return d

    def _startFailed(self, failure: Any) -> None:
        log.failure("mcp-proxy could not start", failure)
        reactor: IReactorCore = self.reactor
        if reactor.running:
            reactor.stop()

    def stopService(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        Service.stopService(self)
        self._ready = False
        ports, self.ports = self.ports, []
        await DeferredList(
            [maybeDeferred(port.stopListening) for port in ports], consumeErrors=True
        )
        for listener in self.changeListeners:
            try:
                await listener.stop()
            except Exception:
                log.failure("stopping a change listener failed")
        if self._childrenStarted:
            self._childrenStarted = False
            stops = [
                d
                for d in (child.stopService() for child in reversed(list(self)))
                if isinstance(d, Deferred)
            ]
            await DeferredList(stops, consumeErrors=True)
        self.front.closeStreams()
        self.sessions.closeAll()
        try:
            await self.pool.stopAll()
        except Exception:
            log.failure("stopping the upstream processes failed")
        if self.requestLog is not None:
            try:
                await self.requestLog.stop()
            except Exception:
                log.failure("flushing the request log failed")
        try:
            await self.repository.stop()
        except Exception:
            log.failure("closing the database failed")
        for cache in (self.authCache, self.configCache):
            try:
                await closeCache(cache)
            except Exception:
                log.failure("closing the cache failed")
        log.info("mcp-proxy stopped")

    # -- per request ------------------------------------------------------

    def _answered(
        self,
        ctx: CallContext,
        method: str,
        params: Any,
        result: Any,
        error: Any,
        durationMs: float,
    ) -> None:
        """
        A routed request was answered: log it (without waiting).
        """
        if self.requestLog is not None:
            self.requestLog.record(
                ctx,
                method,
                params,
                result,
                error,
                durationMs,
                userAgent=ctx.userAgent,
                validationMode=ctx.validationMode,
                requestBytes=ctx.requestBytes,
            )

    # -- relaying ---------------------------------------------------------

    def _listChanged(self, instanceId: str, configId: str, kind: str) -> None:
        """
        An upstream's C{kind} list changed: drop the instance's cached
        aggregate and tell its open sessions.
        """
        self.router.listChanged(instanceId, kind)
        self.front.notifyInstance(
            instanceId, {"jsonrpc": "2.0", "method": f"notifications/{kind}/list_changed"}
        )

    def _unsubscribeUpstream(self, emptied: list[Any]) -> None:
        """
        Tell upstreams about subscriptions that no session holds any more
        (not while stopping: the upstreams are stopping too).
        """
        if not self.running:
            return
        for instanceId, target, uri in emptied:
            d = self.pool.call(
                instanceId,
                target,
                "resources/unsubscribe",
                {"uri": uri},
                self.settings.upstreamTimeout,
            )
            d.addErrback(self._unsubscribeFailed, uri)

    def _unsubscribeFailed(self, failure: Any, uri: str) -> None:
        log.warn(
            "unsubscribing {uri} upstream failed: {error}",
            uri=uri,
            error=failure.getErrorMessage(),
        )

    # -- health -----------------------------------------------------------

    async def health(self) -> tuple[int, dict[str, Any]]:
        """
        The state of the proxy: 200 when the database answers, else 503
        naming the failing part.  The database check is reused for a
        second, so that a flood of health checks cannot load the database;
        sessions and upstreams are read fresh each time.
        """
        now = self.reactor.seconds()
        if self._healthCache is not None and now - self._healthCache[0] < HEALTH_CACHE_SECONDS:
            database = self._healthCache[1]
        else:
            database = await self._pingDatabase()
            self._healthCache = (now, database)
        ok = database == "ok"
        body: dict[str, Any] = {
            "status": "ok" if ok else "unavailable",
            "version": __version__,
            "database": database,
            "databaseKind": self.repository.kind,
            "sessions": self.sessions.counts(),
            "upstreams": self.pool.health(),
        }
        if not ok:
            body["failing"] = ["database"]
        return (200 if ok else 503), body

    async def _pingDatabase(self) -> str:
        try:
            d = self.repository.ping()
            d.addTimeout(HEALTH_DB_TIMEOUT, self.reactor)
            await d
        except TimeoutError:
            return "timeout"
        except Exception as e:
            return f"unavailable: {e.__class__.__name__}"
        return "ok"
