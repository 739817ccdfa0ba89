"""
Telling every running proxy what a change to the database makes stale.

A change is a L{Change}, sent as a small JSON text:

  - C{{"t": "key", "keyId", "keyHash", "end"}}: an API key was created,
    revoked, given an expiry, deleted...: its cached lookup result is
    dropped, and its sessions end when C{"end"} is true (optional
    C{"oldKeyId"}, C{"oldKeyHash"} when those changed);
  - C{{"t": "instance", "instanceId", "keyHashes", "end"}}: an instance (or
    its tool group, or the tools of that group) changed: its cached
    configuration, routes and catalogs are dropped with the cached results of
    the listed keys, and its sessions end when C{"end"} is true;
  - C{{"t": "all"}}: something whose reach is not known without a query
    changed (a config, a server, a tool's name): every cached key result,
    configuration and catalog is dropped.

A missing C{"end"} means true.  A payload that cannot be read drops
everything.

Where changes come from:

  - B{PostgreSQL triggers} (migration C{0002_change_notifications}) call
    C{pg_notify(CHANGE_CHANNEL, payload)} on every change of the tables the
    proxy caches, whoever writes them.  L{PostgresChangeListener} LISTENs on
    a dedicated connection, outside the repository's pool, and reconnects
    with backoff; after a reconnection it drops everything once, since
    notifications may have been missed meanwhile.
  - B{mcpproxy-admin}, through L{ChangePublishingRepository}: on a database
    with the origin's schema (no triggers: no DDL runs there) it sends the
    same notifications itself (L{PostgresChangePublisher}); and when given a
    Redis C{--cache} it PUBLISHes them on C{<prefix>invalidate} and deletes
    the changed entries from the shared cache (L{RedisChangePublisher}).
    L{RedisChangeListener} is the proxies' side of that channel.

Each proxy hands what it hears to its L{Invalidator}, whose work reaches the
shared cache too (a Redis C{DEL} of C{auth:<hash>}) and ends the sessions of
a revoked key.
"""

from __future__ import annotations

import json
import re
from typing import Any, Callable, Iterable, Optional, Sequence

import psycopg2
import psycopg2.extensions
import txredisapi
from attrs import define, field, frozen
from twisted.internet.defer import (
    CancelledError,
    Deferred,
    maybeDeferred,
    succeed,
)
from twisted.internet.defer import TimeoutError as DeadlineExceeded
from twisted.internet.protocol import Factory
from twisted.internet.task import LoopingCall, deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure
from txpostgres import txpostgres
from zope.interface import implementer

from mcp_proxy.auth import AUTH_CACHE_PREFIX, CONFIG_CACHE_PREFIX
from mcp_proxy.cache_redis import RedisCache
from mcp_proxy.interfaces import IRepository
from mcp_proxy.invalidation import Invalidator
from mcp_proxy.repository.base import cancellable
from mcp_proxy.repository.schema import CHANGE_CHANNEL

log = Logger(namespace="mcp_proxy.changes")

KEY = "key"
INSTANCE = "instance"
ALL_KINDS = "all"

#: The suffix, after the Redis cache's key prefix, of the Redis channel.
REDIS_CHANNEL_SUFFIX = "invalidate"

#: The longest payload read (PostgreSQL allows 8000 bytes).
MAX_PAYLOAD = 64 * 1024

_IDENTIFIER = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")


# -- changes and their payloads -------------------------------------------------


@frozen
class Change:
    """
    What a change to the database makes stale.

    @ivar kind: L{KEY}, L{INSTANCE} or L{ALL_KINDS}.
    @ivar keyIds: the key ids of a L{KEY} change (the new one first).
    @ivar keyHashes: the key hashes whose cached results are dropped.
    @ivar instanceId: the instance of an L{INSTANCE} change.
    @ivar end: whether the sessions of those keys, or of that instance, end.
    """

    kind: str
    keyIds: tuple[str, ...] = ()
    keyHashes: tuple[str, ...] = ()
    instanceId: Optional[str] = None
    end: bool = False


#: Drop everything.
ALL = Change(ALL_KINDS)


def keyChange(keyId: str, keyHash: Optional[str], end: bool) -> Change:
    """
    An API key changed.

    @param keyHash: its hash (C{None} for an origin key without one).
    @param end: whether its sessions end (revoked, given an expiry, deleted).
    """
    return Change(KEY, keyIds=(keyId,), keyHashes=(keyHash,) if keyHash else (), end=end)


def instanceChange(instanceId: str, keyHashes: Iterable[str] = (), end: bool = True) -> Change:
    """
    An instance changed.

    @param keyHashes: the hashes of its keys, when known.
    @param end: whether its sessions end (deleted, disabled, another
        authentication type); false when only its tools changed.
    """
    return Change(INSTANCE, keyHashes=tuple(keyHashes), instanceId=instanceId, end=end)


def encodeChange(change: Change) -> str:
    """
    The JSON payload of a change, as the triggers write it.
    """
    payload: dict[str, Any]
    if change.kind == KEY:
        payload = {
            "t": KEY,
            "keyId": change.keyIds[0],
            "keyHash": change.keyHashes[0] if change.keyHashes else None,
            "end": change.end,
        }
        if len(change.keyIds) > 1:
            payload["oldKeyId"] = change.keyIds[1]
        if len(change.keyHashes) > 1:
            payload["oldKeyHash"] = change.keyHashes[1]
    elif change.kind == INSTANCE:
        payload = {
            "t": INSTANCE,
            "instanceId": change.instanceId,
            "keyHashes": list(change.keyHashes),
            "end": change.end,
        }
    else:
        payload = {"t": ALL_KINDS}
    return json.dumps(payload, separators=(",", ":"))


def _text(data: dict[str, Any], name: str, required: bool) -> Optional[str]:
    value = data.get(name)
    if value is None and not required:
        return None
    if not isinstance(value, str) or not value:
        raise ValueError(f"{name!r} must be a non-empty string, not {value!r}")
    return value


def _end(data: dict[str, Any]) -> bool:
    value = data.get("end", True)
    if not isinstance(value, bool):
        raise ValueError(f"'end' must be true or false, not {value!r}")
    return value


def parseChange(payload: str | bytes) -> Change:
    """
    Read a change payload.

    @raise ValueError: when it is not one.
    """
    if len(payload) > MAX_PAYLOAD:
        raise ValueError(f"the payload is longer than {MAX_PAYLOAD} bytes")
    if isinstance(payload, bytes):
        payload = payload.decode("utf-8")
    data = json.loads(payload)
    if not isinstance(data, dict):
        raise ValueError("the payload is not a JSON object")
    kind = data.get("t")
    if kind == ALL_KINDS:
        return ALL
    if kind == KEY:
        ids = [_text(data, "keyId", True), _text(data, "oldKeyId", False)]
        hashes = [_text(data, "keyHash", False), _text(data, "oldKeyHash", False)]
        return Change(
            KEY,
            keyIds=tuple(i for i in ids if i),
            keyHashes=tuple(h for h in hashes if h),
            end=_end(data),
        )
    if kind == INSTANCE:
        instanceId = _text(data, "instanceId", True)
        listed = data.get("keyHashes", [])
        if not isinstance(listed, list) or not all(isinstance(h, str) and h for h in listed):
            raise ValueError("'keyHashes' must be a list of non-empty strings")
        return Change(INSTANCE, keyHashes=tuple(listed), instanceId=instanceId, end=_end(data))
    raise ValueError(f"unknown change kind {kind!r}")


def applyChange(invalidator: Invalidator, change: Change) -> Deferred[None]:
    """
    Drop what a change makes stale in one proxy.

    @return: a Deferred firing when done; it does not fail (the
        L{Invalidator} logs what failed).
    """
    if change.kind == KEY:
        return invalidator.keys(change.keyHashes, change.keyIds if change.end else ())
    if change.kind == INSTANCE and change.instanceId is not None:
        return invalidator.instance(change.instanceId, change.keyHashes, endSessions=change.end)
    return invalidator.everything()


def _newListenerStats() -> dict[str, int]:
    return dict.fromkeys(
        ("received", "invalid", "connects", "failures", "flushes", "heartbeats"), 0
    )


def _received(
    invalidator: Invalidator, payload: str | bytes, stats: dict[str, int], source: str
) -> Deferred[None]:
    stats["received"] += 1
    try:
        change = parseChange(payload)
    except ValueError as e:
        stats["invalid"] += 1
        log.warn(
            "unreadable change notification from {source} ({error}); dropping every cached entry",
            source=source,
            error=str(e),
        )
        change = ALL
    return applyChange(invalidator, change)


# -- running a listener -----------------------------------------------------------


@define
class _Reconnecting:
    """
    The loop shared by the listeners: connect and subscribe, wait for the
    connection's loss, start again, with backoff while it fails or flaps.
    After any subscription but the first one made by L{start}, everything
    is dropped once: notifications sent meanwhile were missed.
    """

    reactor: Any
    invalidator: Invalidator
    name: str
    reconnectDelay: float
    reconnectMaxDelay: float
    subscribe: Callable[[Deferred[str]], Any]
    close: Callable[[], None]
    stats: dict[str, int]
    running: bool = False
    listening: bool = False
    _loop: Optional[Deferred[None]] = None
    _firstAttempt: Optional[Deferred[None]] = None
    _waiting: Optional[Deferred[Any]] = None

    def start(self) -> Deferred[None]:
        if self.running:
            return succeed(None)
        self.running = True
        first: Deferred[None] = Deferred()
        self._firstAttempt = first
        self._loop = Deferred.fromCoroutine(self._run())
        self._loop.addErrback(lambda f: log.failure("the {name} stopped", f, name=self.name))
        return first

    def stop(self) -> Deferred[None]:
        self.running = False
        waiting, self._waiting = self._waiting, None
        if waiting is not None and not waiting.called:
            waiting.cancel()
        self.close()
        self._attempted()
        loop, self._loop = self._loop, None
        return loop if loop is not None else succeed(None)

    async def wait(self, d: Deferred[Any]) -> Any:
        """
        Await C{d}, which L{stop} cancels.
        """
        self._waiting = d
        try:
            return await d
        finally:
            if self._waiting is d:
                self._waiting = None

    def _attempted(self) -> None:
        first, self._firstAttempt = self._firstAttempt, None
        if first is not None:
            first.callback(None)

    async def _run(self) -> None:
        delay = self.reconnectDelay
        flush = False
        while self.running:
            # Fires with why the connection was lost.
            lost: Deferred[str] = Deferred()
            try:
                await self.subscribe(lost)
            except Exception as e:
                self.close()
                if not self.running:
                    self._attempted()
                    break
                self.stats["failures"] += 1
                flush = True
                self._attempted()
                log.warn(
                    "{name}: cannot listen ({error}); retrying in {delay:g} s",
                    name=self.name,
                    error=_describe(e),
                    delay=delay,
                )
                await self._sleep(delay)
                delay = min(delay * 2, self.reconnectMaxDelay)
                continue
            self.listening = True
            self.stats["connects"] += 1
            connectedAt = self.reactor.seconds()
            if flush:
                log.info(
                    "{name}: listening again; dropping every cached entry "
                    "(changes may have been missed meanwhile)",
                    name=self.name,
                )
                await self.invalidator.everything()
                self.stats["flushes"] += 1
            else:
                log.info("{name}: listening", name=self.name)
            flush = True
            self._attempted()
            try:
                reason = await self.wait(lost)
            except CancelledError:
                reason = "stopped"
            self.listening = False
            self.close()
            if not self.running:
                break
            log.warn(
                "{name}: connection lost ({error}); reconnecting",
                name=self.name,
                error=reason,
            )
            if self.reactor.seconds() - connectedAt >= self.reconnectMaxDelay:
                delay = self.reconnectDelay
            else:
                # A connection that does not last: back off.
                await self._sleep(delay)
                delay = min(delay * 2, self.reconnectMaxDelay)
        self.listening = False

    async def _sleep(self, seconds: float) -> None:
        try:
            await self.wait(deferLater(self.reactor, seconds, lambda: None))
        except CancelledError:
            pass


def _describe(error: BaseException) -> str:
    if isinstance(error, DeadlineExceeded):
        return "no answer in time"
    return " ".join(str(error).split()) or error.__class__.__name__


def _deadline(reactor: Any, d: Deferred[Any], seconds: float, onTimeout: Callable[[], None]) -> Any:
    """
    C{d}, failing after C{seconds} (then calling C{onTimeout}, which must
    end whatever C{d} waits for) or when cancelled, without cancelling
    C{d} itself (a txpostgres operation must finish on its own).
    """
    outer = cancellable(d, lambda: None)
    outer.addTimeout(seconds, reactor)

    def failed(failure: Failure) -> Failure:
        if failure.check(DeadlineExceeded):
            onTimeout()
        return failure

    return outer.addErrback(failed)


# -- PostgreSQL -------------------------------------------------------------------


class _ListenConnection(txpostgres.Connection):  # type: ignore[misc]
    """
    A txpostgres connection that reports its loss once, and whose read
    errors (the server closed the connection while it was idle) are a loss,
    not an unhandled error.
    """

    def __init__(self, reactor: Any, onLost: Callable[[Failure], None]) -> None:
        txpostgres.Connection.__init__(self, reactor)
        self._onLost: Optional[Callable[[Failure], None]] = onLost

    def doRead(self) -> Optional[BaseException]:
        try:
            txpostgres.Connection.doRead(self)
        except (psycopg2.Error, txpostgres.UnexpectedPollResult) as e:
            # The reactor gives this to connectionLost.
            return e
        return None

    def connectionLost(self, reason: Failure) -> None:
        try:
            txpostgres.Connection.connectionLost(self, reason)
        finally:
            onLost, self._onLost = self._onLost, None
            if onLost is not None:
                onLost(reason)

    def closeQuietly(self) -> None:
        if self.pollable() is None:
            onLost, self._onLost = self._onLost, None
            if onLost is not None:
                onLost(Failure(CancelledError("closed")))
            return
        try:
            self.close()
        except psycopg2.Error:
            pass


@define
class PostgresChangeListener:
    """
    LISTENs for change notifications on a PostgreSQL connection of its
    own, and hands them to an L{Invalidator}.

    The connection is checked with C{SELECT 1} every L{heartbeatInterval}
    seconds (a silently dropped connection is noticed, not only a closed
    one), and re-established with backoff when lost.

    @ivar dsn: a libpq connection string.
    @ivar channel: the notification channel.
    @ivar connectTimeout: seconds connecting and C{LISTEN} may take.
    @ivar heartbeatTimeout: seconds C{SELECT 1} may take before the
        connection is given up.
    @ivar stats: counters: C{received} notifications, C{invalid} ones,
        C{connects} (successful LISTENs), C{failures} (attempts that
        failed), C{flushes} (everything dropped after a reconnection,
        counted once done),
        C{heartbeats} answered.
    @ivar backendPid: the server process of the current connection.
    """

    dsn: str
    reactor: Any
    invalidator: Invalidator
    channel: str = CHANGE_CHANNEL
    reconnectDelay: float = 0.5
    reconnectMaxDelay: float = 10.0
    connectTimeout: float = 10.0
    heartbeatInterval: float = 30.0
    heartbeatTimeout: float = 10.0
    applicationName: str = "mcp-proxy listener"
    stats: dict[str, int] = field(factory=_newListenerStats, init=False)
    backendPid: Optional[int] = field(default=None, init=False)
    _connection: Optional[_ListenConnection] = field(default=None, init=False)
    _heartbeat: Optional[LoopingCall] = field(default=None, init=False)
    _loop: _Reconnecting = field(init=False)

    def __attrs_post_init__(self) -> None:
        if not _IDENTIFIER.match(self.channel):
            raise ValueError(f"bad notification channel {self.channel!r}")
        self._loop = _Reconnecting(
            reactor=self.reactor,
            invalidator=self.invalidator,
            name="PostgreSQL change listener",
            reconnectDelay=self.reconnectDelay,
            reconnectMaxDelay=self.reconnectMaxDelay,
            subscribe=self._listen,
            close=self._close,
            stats=self.stats,
        )

    @property
    def listening(self) -> bool:
        """
        Whether notifications are being received.
        """
        return self._loop.listening

    def start(self) -> Deferred[None]:
        """
        Start listening, in the background.

        @return: a Deferred firing once the first attempt is over, whether
            it is listening or retrying.
        """
        return self._loop.start()

    def stop(self) -> Deferred[None]:
        """
        Stop listening and close the connection.
        """
        return self._loop.stop()

    async def _listen(self, lost: Deferred[str]) -> None:
        def connectionLost(reason: Failure) -> None:
            if not lost.called:
                lost.callback(_describe(reason.value) if reason.value else "?")

        connection = _ListenConnection(self.reactor, connectionLost)
        self._connection = connection
        options = {}
        if "application_name" not in psycopg2.extensions.parse_dsn(self.dsn):
            options["application_name"] = self.applicationName
        await self._loop.wait(
            _deadline(
                self.reactor,
                connection.connect(self.dsn, **options),
                self.connectTimeout,
                connection.closeQuietly,
            )
        )
        connection.addNotifyObserver(self._notified)
        await self._loop.wait(
            _deadline(
                self.reactor,
                connection.runOperation(f'LISTEN "{self.channel}"'),
                self.connectTimeout,
                connection.closeQuietly,
            )
        )
        if lost.called:
            raise psycopg2.OperationalError("the connection was lost right after LISTEN")
        self.backendPid = connection.pollable().get_backend_pid()
        heartbeat = LoopingCall(self._beat, connection)
        heartbeat.clock = self.reactor
        self._heartbeat = heartbeat
        heartbeat.start(self.heartbeatInterval, now=False).addErrback(
            lambda f: log.failure("the PostgreSQL listener's heartbeat failed", f)
        )

    def _beat(self, connection: _ListenConnection) -> Deferred[None]:
        d = _deadline(
            self.reactor,
            maybeDeferred(connection.runQuery, "SELECT 1"),
            self.heartbeatTimeout,
            connection.closeQuietly,
        )

        def answered(_: object) -> None:
            self.stats["heartbeats"] += 1

        def failed(failure: Failure) -> None:
            if connection is self._connection:
                log.warn(
                    "the PostgreSQL change listener's connection does not answer ({error}); "
                    "reconnecting",
                    error=_describe(failure.value) if failure.value else "?",
                )
                connection.closeQuietly()

        return d.addCallbacks(answered, failed)

    def _close(self) -> None:
        heartbeat, self._heartbeat = self._heartbeat, None
        if heartbeat is not None and heartbeat.running:
            heartbeat.stop()
        connection, self._connection = self._connection, None
        self.backendPid = None
        if connection is not None:
            connection.closeQuietly()

    def _notified(self, notify: Any) -> None:
        if notify.channel == self.channel:
            _received(self.invalidator, notify.payload, self.stats, "PostgreSQL")


# -- Redis ------------------------------------------------------------------------


class _Subscriber(txredisapi.SubscriberProtocol):  # type: ignore[misc]
    """
    txredisapi's subscriber protocol, handing messages to a function and
    telling when its connection is lost.
    """

    def __init__(self, onMessage: Callable[[bytes, bytes], None], **kwargs: Any) -> None:
        txredisapi.SubscriberProtocol.__init__(self, **kwargs)
        self._onMessage = onMessage
        self._lostBecause: Optional[str] = None
        self._lostWaiters: list[Deferred[str]] = []

    def messageReceived(self, pattern: Any, channel: bytes, message: bytes) -> None:
        self._onMessage(channel, message)

    def connectionLost(self, why: Failure) -> None:
        self._lostBecause = why.getErrorMessage()
        try:
            txredisapi.SubscriberProtocol.connectionLost(self, why)
        finally:
            waiters, self._lostWaiters = self._lostWaiters, []
            for waiter in waiters:
                waiter.callback(self._lostBecause)

    def whenLost(self) -> Deferred[str]:
        """
        A Deferred firing with why the connection was lost, once it is.
        """
        if self._lostBecause is not None:
            return succeed(self._lostBecause)
        d: Deferred[str] = Deferred()
        self._lostWaiters.append(d)
        return d


class _SubscriberFactory(Factory):
    """
    Builds one L{_Subscriber}; what txredisapi's handshake asks of its
    factory when C{AUTH} or C{SELECT} fails.
    """

    isLazy = False
    noisy = False

    def __init__(self, build: Callable[[], _Subscriber]) -> None:
        self._build = build
        self.error: Optional[str] = None

    def buildProtocol(self, addr: Any) -> _Subscriber:
        protocol = self._build()
        protocol.factory = self
        return protocol

    def stopTrying(self) -> None:
        """
        The handshake failed; the listener's own loop decides about
        retrying.
        """

    def connectionError(self, message: str) -> None:
        self.error = message


@define
class RedisChangeListener:
    """
    SUBSCRIBEs to the change channel of a Redis cache (C{<prefix>invalidate})
    on a connection of its own, and hands the messages to an
    L{Invalidator}.  The connection is checked with C{PING} every
    L{heartbeatInterval} seconds and re-established with backoff when lost.

    Redis pub/sub ignores the database number: proxies of different
    deployments on one Redis need different prefixes.

    @ivar cache: the Redis cache whose server, credentials, TLS settings,
        timeouts and prefix are used (its own connections are not).
    @ivar stats: as L{PostgresChangeListener.stats}.
    @ivar clientId: the Redis C{CLIENT ID} of the current connection.
    """

    cache: RedisCache
    reactor: Any
    invalidator: Invalidator
    reconnectDelay: float = 0.5
    reconnectMaxDelay: float = 10.0
    heartbeatInterval: float = 30.0
    stats: dict[str, int] = field(factory=_newListenerStats, init=False)
    clientId: Optional[int] = field(default=None, init=False)
    _protocol: Optional[_Subscriber] = field(default=None, init=False)
    _heartbeat: Optional[LoopingCall] = field(default=None, init=False)
    _loop: _Reconnecting = field(init=False)

    def __attrs_post_init__(self) -> None:
        self._loop = _Reconnecting(
            reactor=self.reactor,
            invalidator=self.invalidator,
            name="Redis change listener",
            reconnectDelay=self.reconnectDelay,
            reconnectMaxDelay=self.reconnectMaxDelay,
            subscribe=self._subscribe,
            close=self._close,
            stats=self.stats,
        )

    @property
    def channel(self) -> str:
        """
        The Redis channel of change messages.
        """
        return redisChannel(self.cache)

    @property
    def listening(self) -> bool:
        """
        Whether messages are being received.
        """
        return self._loop.listening

    def start(self) -> Deferred[None]:
        """
        Start listening, in the background.

        @return: a Deferred firing once the first attempt is over.
        """
        return self._loop.start()

    def stop(self) -> Deferred[None]:
        """
        Stop listening and close the connection.
        """
        return self._loop.stop()

    async def _subscribe(self, lost: Deferred[str]) -> None:
        cache = self.cache
        factory = _SubscriberFactory(
            lambda: _Subscriber(
                self._message,
                charset=None,
                replyTimeout=cache.replyTimeout,
                password=cache.password,
                dbid=cache.db or None,
                convertNumbers=False,
                username=cache.username,
            )
        )
        # Cancelling an endpoint's connection attempt (at the deadline, or
        # by stop()) abandons it cleanly.
        connecting: Deferred[Any] = cache.endpoint().connect(factory)
        connecting.addTimeout(cache.connectTimeout + 1, self.reactor)
        protocol: _Subscriber = await self._loop.wait(connecting)
        self._protocol = protocol

        def connectionLost(reason: str) -> None:
            if not lost.called:
                lost.callback(reason)

        protocol.whenLost().addCallback(connectionLost)
        ready: Deferred[Any] = Deferred()

        def settle(result: Any) -> None:
            if not ready.called:
                ready.callback(result)

        def handshakeLost(reason: str) -> None:
            if not ready.called:
                ready.errback(txredisapi.ConnectionError(factory.error or reason))

        protocol.whenConnected().addBoth(settle)
        protocol.whenLost().addCallback(handshakeLost)
        await self._loop.wait(_deadline(self.reactor, ready, cache.replyTimeout * 2, self._abort))
        clientId = await self._loop.wait(
            _deadline(
                self.reactor,
                maybeDeferred(protocol.execute_command, "CLIENT", "ID"),
                cache.replyTimeout,
                self._abort,
            )
        )
        self.clientId = int(clientId)
        reply = await self._loop.wait(
            _deadline(
                self.reactor,
                maybeDeferred(protocol.subscribe, self.channel),
                cache.replyTimeout,
                self._abort,
            )
        )
        if not isinstance(reply, list) or not reply or reply[0] not in (b"subscribe", "subscribe"):
            raise txredisapi.ResponseError(f"unexpected reply to SUBSCRIBE: {reply!r}")
        if lost.called:
            raise txredisapi.ConnectionError("the connection was lost right after SUBSCRIBE")
        heartbeat = LoopingCall(self._beat, protocol)
        heartbeat.clock = self.reactor
        self._heartbeat = heartbeat
        heartbeat.start(self.heartbeatInterval, now=False).addErrback(
            lambda f: log.failure("the Redis listener's heartbeat failed", f)
        )

    def _beat(self, protocol: _Subscriber) -> Deferred[None]:
        # A subscribed connection may PING; txredisapi's reply timeout
        # drops a connection that does not answer.
        d: Deferred[Any] = maybeDeferred(protocol.execute_command, "PING")

        def answered(_: object) -> None:
            self.stats["heartbeats"] += 1

        def failed(failure: Failure) -> None:
            if protocol is self._protocol:
                log.warn(
                    "the Redis change listener's connection does not answer ({error}); "
                    "reconnecting",
                    error=failure.getErrorMessage(),
                )
                self._abort()

        return d.addCallbacks(answered, failed)

    def _abort(self) -> None:
        protocol = self._protocol
        if protocol is not None and protocol.transport is not None:
            protocol.transport.abortConnection()

    def _close(self) -> None:
        heartbeat, self._heartbeat = self._heartbeat, None
        if heartbeat is not None and heartbeat.running:
            heartbeat.stop()
        protocol, self._protocol = self._protocol, None
        self.clientId = None
        if protocol is not None and protocol.transport is not None:
            protocol.transport.loseConnection()

    def _message(self, channel: bytes, message: bytes) -> None:
        if channel in (self.channel.encode("utf-8"), self.channel):
            _received(self.invalidator, message, self.stats, "Redis")


def redisChannel(cache: RedisCache) -> str:
    """
    The Redis channel of the change messages of a cache's proxies.
    """
    return cache.prefix + REDIS_CHANNEL_SUFFIX


def redisCacheOf(cache: Any) -> Optional[RedisCache]:
    """
    The L{RedisCache} behind a cache made by
    L{mcp_proxy.cacheplugins.openCache} (itself, or the shared part of a
    routed one), or C{None} when it has none.
    """
    if isinstance(cache, RedisCache):
        return cache
    for inner in getattr(cache, "caches", ()):
        if isinstance(inner, RedisCache):
            return inner
    return None


# -- publishing changes (mcpproxy-admin) ------------------------------------------


class PostgresChangePublisher:
    """
    Sends change notifications with C{pg_notify}, on a connection of its
    own made at the first use: for a database without the triggers (the
    origin's schema).
    """

    name = "PostgreSQL NOTIFY"

    def __init__(
        self,
        dsn: str,
        reactor: Any,
        channel: str = CHANGE_CHANNEL,
        timeout: float = 10.0,
    ) -> None:
        self.dsn = dsn
        self.reactor = reactor
        self.channel = channel
        self.timeout = timeout
        self._connection: Optional[txpostgres.Connection] = None

    def publish(self, changes: Sequence[Change]) -> Deferred[None]:
        return Deferred.fromCoroutine(self._publish(changes))

    async def _publish(self, changes: Sequence[Change]) -> None:
        if self._connection is None:
            connection = txpostgres.Connection(self.reactor)
            options = {}
            if "application_name" not in psycopg2.extensions.parse_dsn(self.dsn):
                options["application_name"] = "mcpproxy-admin"
            await _deadline(
                self.reactor, connection.connect(self.dsn, **options), self.timeout, lambda: None
            )
            self._connection = connection
        for change in changes:
            await _deadline(
                self.reactor,
                self._connection.runOperation(
                    "SELECT pg_notify(%s, %s)", (self.channel, encodeChange(change))
                ),
                self.timeout,
                lambda: None,
            )

    def close(self) -> Deferred[None]:
        connection, self._connection = self._connection, None
        if connection is not None and connection.pollable() is not None:
            try:
                connection.close()
            except psycopg2.Error:
                pass
        return succeed(None)


class RedisChangePublisher:
    """
    PUBLISHes change messages on a Redis cache's channel, and deletes the
    changed keys' and instances' entries from the shared cache itself (so
    that it is true even while no proxy runs).
    """

    name = "Redis PUBLISH"

    def __init__(self, cache: RedisCache) -> None:
        self.cache = cache

    def publish(self, changes: Sequence[Change]) -> Deferred[None]:
        return Deferred.fromCoroutine(self._publish(changes))

    async def _publish(self, changes: Sequence[Change]) -> None:
        stale: list[str] = []
        for change in changes:
            stale.extend(AUTH_CACHE_PREFIX + h for h in change.keyHashes)
            if change.instanceId is not None:
                stale.append(CONFIG_CACHE_PREFIX + change.instanceId)
        if stale:
            await self.cache.delete(list(dict.fromkeys(stale)))
        channel = redisChannel(self.cache)
        for change in changes:
            await self.cache.execute("PUBLISH", channel, encodeChange(change))

    def close(self) -> Deferred[None]:
        return self.cache.close()


@implementer(IRepository)
class ChangePublishingRepository:
    """
    An L{IRepository} for mcpproxy-admin that, after each change it
    commits, publishes what the change makes stale with C{publishers}.  A
    publisher that fails is reported with C{warn}; the change stands.
    """

    def __init__(
        self,
        repository: IRepository,
        publishers: Sequence[Any],
        warn: Callable[[str], None],
    ) -> None:
        self._repository = repository
        self._publishers = list(publishers)
        self._warn = warn

    def __getattr__(self, name: str) -> Any:
        return getattr(self._repository, name)

    async def _publish(self, changes: Sequence[Change]) -> None:
        for publisher in self._publishers:
            try:
                await publisher.publish(changes)
            except Exception as e:
                self._warn(
                    f"the change is saved, but running proxies were not told ({publisher.name}: "
                    f"{_describe(e)}); they drop their cached copies when these expire"
                )

    async def _then(self, d: Deferred[Any], changes: Callable[[Any], Any]) -> Any:
        result = await d
        if self._publishers:
            made = changes(result)
            if isinstance(made, Deferred):
                made = await made
            await self._publish(made)
        return result

    def _run(self, d: Deferred[Any], changes: Callable[[Any], Any]) -> Deferred[Any]:
        return Deferred.fromCoroutine(self._then(d, changes))

    def createApiKey(self, instanceId: str, name: str, keyHash: str, *args: Any) -> Deferred[Any]:
        return self._run(
            self._repository.createApiKey(instanceId, name, keyHash, *args),
            lambda key: [keyChange(key.id, keyHash, end=False)],
        )

    def revokeApiKey(self, keyId: str) -> Deferred[Any]:
        return self._run(
            self._repository.revokeApiKey(keyId),
            lambda keyHash: [keyChange(keyId, keyHash, end=True)],
        )

    def setApiKeyExpiry(self, keyId: str, expiresAt: Any) -> Deferred[Any]:
        return self._run(
            self._repository.setApiKeyExpiry(keyId, expiresAt),
            lambda keyHash: [keyChange(keyId, keyHash, end=expiresAt is not None)],
        )

    def deleteInstance(self, instanceId: str) -> Deferred[Any]:
        return self._run(
            self._repository.deleteInstance(instanceId),
            lambda hashes: [instanceChange(instanceId, hashes, end=True)],
        )

    async def _instancesOf(self, organizationId: str, toolGroupId: str) -> list[str]:
        instances = await self._repository.listInstances(organizationId, True)
        return [i.id for i in instances if i.toolGroupId == toolGroupId]

    async def _groupChanges(self, group: Any, end: bool, everything: bool) -> list[Change]:
        ids = await self._instancesOf(group.organizationId, group.id)
        changes = [instanceChange(i, (), end=end) for i in ids]
        if everything and ids:
            # The cached key results of these instances record whether the
            # group is enabled; their hashes are not known here.
            changes.append(ALL)
        return changes

    def setToolGroupEnabled(self, toolGroupId: str, enabled: bool) -> Deferred[Any]:
        return self._run(
            self._repository.setToolGroupEnabled(toolGroupId, enabled),
            lambda group: Deferred.fromCoroutine(
                self._groupChanges(group, end=not enabled, everything=True)
            ),
        )

    def setToolGroupTools(self, toolGroupId: str, tools: Any) -> Deferred[Any]:
        return self._run(
            self._repository.setToolGroupTools(toolGroupId, tools),
            lambda group: Deferred.fromCoroutine(
                self._groupChanges(group, end=False, everything=False)
            ),
        )

    def updateConfigEnv(self, configId: str, envVars: Any) -> Deferred[Any]:
        return self._run(self._repository.updateConfigEnv(configId, envVars), lambda _: [ALL])

    def deleteConfig(self, configId: str) -> Deferred[Any]:
        return self._run(self._repository.deleteConfig(configId), lambda _: [ALL])

    def deleteServer(self, serverId: str) -> Deferred[Any]:
        return self._run(self._repository.deleteServer(serverId), lambda _: [ALL])

    def syncTools(self, serverId: str, tools: Any) -> Deferred[Any]:
        return self._run(self._repository.syncTools(serverId, tools), lambda _: [ALL])


__all__ = [
    "ALL",
    "CHANGE_CHANNEL",
    "REDIS_CHANNEL_SUFFIX",
    "Change",
    "ChangePublishingRepository",
    "PostgresChangeListener",
    "PostgresChangePublisher",
    "RedisChangeListener",
    "RedisChangePublisher",
    "applyChange",
    "encodeChange",
    "instanceChange",
    "keyChange",
    "parseChange",
    "redisCacheOf",
    "redisChannel",
]
