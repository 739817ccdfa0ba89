"""
A Redis L{ICache} provider, shared by every mcp-proxy process that points
at the same Redis and prefix.

Built on txredisapi's connection pool, with what it lacks for a cache on
the request path:

  - B{Deadlines.}  txredisapi has no timeouts by default, and while it has
    no connection a command waits for one forever.  Here every command has
    a reply timeout (txredisapi's C{replyTimeout}, which also drops the
    connection) and an overall deadline of C{connectTimeout +
    replyTimeout}; it then fails with L{RedisTimeout}.
  - B{Failing fast.}  After a command failed for want of Redis (refused,
    lost, timed out), further commands fail at once with
    L{RedisUnavailable} while the pool has no connection, and for at least
    C{retryInterval} seconds: an outage costs one deadline, not one per
    request.  The pool keeps reconnecting in the background (with
    txredisapi's backoff, up to 10 s apart).
  - B{Recovering.}  txredisapi stops reconnecting for good when the
    handshake (AUTH, SELECT) fails or times out; such a pool is replaced
    by a new one, at most every C{rebuildInterval} seconds.
  - B{Certificate checks.}  C{rediss://} connections verify the server's
    certificate and host name (txredisapi's own TLS option does not).

The values are encoded with L{mcp_proxy.cachecodec}.  Keys are namespaced
with a prefix (default C{"mcpproxy:"}); L{RedisCache.clear} removes only
the keys under it (C{SCAN} + C{DEL}, never C{FLUSHDB}).

txredisapi schedules its reply timeouts and reconnections on the global
reactor; the C{reactor} given here connects and runs the deadlines.  In a
server they are the same reactor.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Iterable, Optional
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit, urlunsplit

import txredisapi
from attrs import define, field
from twisted.internet import error as netError
from twisted.internet.defer import CancelledError, Deferred, fail, succeed
from twisted.internet.defer import TimeoutError as DeadlineExceeded
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.ssl import Certificate, optionsForClientTLS
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from mcp_proxy.auth import CONFIG_CACHE_PREFIX
from mcp_proxy.cache import STAT_NAMES, MemoryCache
from mcp_proxy.cachecodec import CacheCodec, UndecodableEntry, defaultCodec
from mcp_proxy.errors import ProxyError
from mcp_proxy.interfaces import ICache

if TYPE_CHECKING:
    from mcp_proxy.cacheplugins import CacheDefaults

log = Logger()

DEFAULT_PREFIX = "mcpproxy:"
DEFAULT_PORT = 6379

#: Keys per C{DEL} command, and the C{COUNT} hint of C{SCAN}.
BATCH = 500

#: The counters of L{RedisCache.stats}: L{mcp_proxy.cache.STAT_NAMES}
#: (C{evictions} and C{expirations} stay 0: Redis expires entries itself),
#: plus C{errors} (operations that failed) and C{undecodable} (entries read
#: as misses because they could not be decoded).
REDIS_STAT_NAMES = (*STAT_NAMES, "errors", "undecodable")

# Query parameters of a redis:// URL, to RedisCache attributes.
_URL_OPTIONS = {
    "prefix": "prefix",
    "pool_size": "poolSize",
    "connect_timeout": "connectTimeout",
    "reply_timeout": "replyTimeout",
    "retry_interval": "retryInterval",
    "ca": "caCertificate",
}


class RedisCacheError(ProxyError):
    """
    A Redis cache operation failed.
    """


class RedisUnavailable(RedisCacheError):
    """
    Redis cannot be reached: the connection was refused or lost, the cache
    is failing fast after such an error, or it is closed.
    """


class RedisTimeout(RedisUnavailable):
    """
    Redis did not answer in time.
    """


class RedisCommandError(RedisCacheError):
    """
    Redis answered a command with an error (C{NOAUTH}, C{READONLY}, ...).
    """


def _newStats() -> dict[str, int]:
    return dict.fromkeys(REDIS_STAT_NAMES, 0)


def _positive(instance: object, attribute: Any, value: float) -> None:
    if not value > 0 or math.isinf(value):
        raise ValueError(f"{attribute.name} must be a positive number of seconds, not {value!r}")


def _nonNegative(instance: object, attribute: Any, value: float) -> None:
    if not value >= 0 or math.isinf(value):
        raise ValueError(f"{attribute.name} must be 0 or more seconds, not {value!r}")


def _poolSize(instance: object, attribute: Any, value: int) -> None:
    if value < 1:
        raise ValueError(f"poolSize must be at least 1, not {value!r}")


def _prefix(instance: object, attribute: Any, value: str) -> None:
    # An empty prefix would make clear() empty the whole database.
    if not value:
        raise ValueError("the key prefix of a Redis cache must not be empty")


def _globEscape(text: str) -> str:
    """
    C{text} as a literal in a Redis glob pattern (C{SCAN ... MATCH}).
    """
    return "".join("\\" + c if c in "*?[]\\^-" else c for c in text)


def _isZeroCursor(cursor: Any) -> bool:
    return cursor in (b"0", "0", 0)


class _Protocol(txredisapi.RedisProtocol):  # type: ignore[misc]
    """
    txredisapi's protocol, telling its factory's C{lostBecause} why a
    connection was lost (txredisapi keeps only "Lost connection", which
    hides e.g. a refused TLS certificate).
    """

    def connectionLost(self, why: Failure) -> None:
        report = getattr(self.factory, "lostBecause", None)
        if report is not None:
            report(why)
        super().connectionLost(why)


@implementer(ICache)
@define
class RedisCache:
    """
    An L{ICache} in Redis.

    Nothing connects until the first operation; then a pool of
    L{poolSize} connections is kept, and reconnected when lost.

    @ivar reactor: provides C{IReactorTCP} and C{IReactorTime}: connects,
        and runs the deadlines.
    @ivar host: the Redis host name or address.
    @ivar port: the Redis port.
    @ivar db: the database number (C{SELECT}ed on connection unless 0).
    @ivar username: the ACL user of C{AUTH}, or C{None}.
    @ivar password: the password of C{AUTH}, or C{None}.  Secret.
    @ivar tls: connect with TLS and verify the server's certificate for
        L{host}.
    @ivar caCertificate: with L{tls}, the path of a PEM file of the one CA
        to trust instead of the platform's trust store.
    @ivar prefix: prepended to every key; L{clear} removes only keys under
        it.  Never empty.
    @ivar defaultTtl: seconds an entry lives when C{set} is given C{None}.
    @ivar poolSize: the number of connections; commands are pipelined on
        them.
    @ivar connectTimeout: seconds a connection attempt may take.
    @ivar replyTimeout: seconds Redis may take to answer a command.
    @ivar retryInterval: after a failure for want of Redis, commands fail
        at once for at least this many seconds (and while there is no
        connection).
    @ivar rebuildInterval: seconds between two replacements of a pool that
        stopped reconnecting (after a failed handshake).
    @ivar codec: encodes the values.
    @ivar stats: the counters of L{REDIS_STAT_NAMES}.  C{deletes} counts
        the keys C{DEL} actually removed.
    """

    reactor: Any = field(repr=False)
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    db: int = 0
    username: Optional[str] = None
    password: Optional[str] = field(default=None, repr=False)
    tls: bool = False
    caCertificate: Optional[str] = None
    prefix: str = field(default=DEFAULT_PREFIX, validator=_prefix)
    defaultTtl: float = 300.0
    poolSize: int = field(default=2, validator=_poolSize)
    connectTimeout: float = field(default=2.0, validator=_positive)
    replyTimeout: float = field(default=2.0, validator=_positive)
    retryInterval: float = field(default=1.0, validator=_nonNegative)
    rebuildInterval: float = field(default=5.0, validator=_nonNegative)
    codec: CacheCodec = field(factory=defaultCodec, repr=False)
    stats: dict[str, int] = field(factory=_newStats, init=False)
    _factory: Any = field(default=None, init=False, repr=False)
    _builtAt: float = field(default=0.0, init=False, repr=False)
    # When the last command failed for want of Redis, and why.
    _failedAt: Optional[float] = field(default=None, init=False, repr=False)
    _lastError: str = field(default="", init=False, repr=False)
    # Why the current pool stopped reconnecting, if it did.
    _poolError: Optional[str] = field(default=None, init=False, repr=False)
    # Why the last connection was lost.
    _lostBecause: str = field(default="", init=False, repr=False)
    _closed: bool = field(default=False, init=False, repr=False)
    # The commands not answered yet, and whether close() is cancelling them.
    _pending: set[Deferred[Any]] = field(factory=set, init=False, repr=False)
    _closing: bool = field(default=False, init=False, repr=False)
    _trustRoot: Optional[Certificate] = field(default=None, init=False, repr=False)

    def __attrs_post_init__(self) -> None:
        if self.caCertificate is None:
            return
        if not self.tls:
            raise ValueError("a CA certificate is only used with TLS (rediss://)")
        try:
            with open(self.caCertificate, "rb") as pem:
                self._trustRoot = Certificate.loadPEM(pem.read())
        except Exception as e:
            raise ValueError(f"cannot read the CA certificate {self.caCertificate!r}: {e}")

    @classmethod
    def fromURL(cls, url: str, reactor: Any, **kwargs: Any) -> RedisCache:
        """
        A cache for a URL C{redis://[[USER]:PASSWORD@]HOST[:PORT][/DB]}, or
        C{rediss://...} for TLS.  Its query may set C{prefix},
        C{pool_size}, C{connect_timeout}, C{reply_timeout},
        C{retry_interval} and (C{rediss} only) C{ca}, which win over
        C{kwargs}.

        @param kwargs: other attributes of L{RedisCache} (C{prefix},
            C{defaultTtl}, C{codec}, ...).
        @raise ValueError: when the URL is not a usable Redis URL; the
            message never contains the password.
        """
        parts = urlsplit(url.strip())
        scheme = parts.scheme.lower()
        if scheme not in ("redis", "rediss"):
            raise ValueError(f"a Redis URL starts with redis:// or rediss://, not {scheme!r}")
        try:
            port = parts.port
        except ValueError:
            raise ValueError("the port of the Redis URL is not a number from 0 to 65535")
        path = parts.path.strip("/")
        if path and not path.isdigit():
            raise ValueError(f"the path of a Redis URL is a database number, not {path!r}")
        if parts.fragment:
            raise ValueError("a Redis URL has no #fragment")
        options: dict[str, Any] = {}
        for name, value in parse_qsl(parts.query, keep_blank_values=True, strict_parsing=False):
            attribute = _URL_OPTIONS.get(name)
            if attribute is None:
                known = ", ".join(sorted(_URL_OPTIONS))
                raise ValueError(f"unknown Redis URL option {name!r} (known: {known})")
            if attribute == "poolSize":
                options[attribute] = _number(name, value, int)
            elif attribute in ("connectTimeout", "replyTimeout", "retryInterval"):
                options[attribute] = _number(name, value, float)
            else:
                options[attribute] = value
        settings: dict[str, Any] = {**kwargs, **options}
        settings.update(
            host=parts.hostname or "127.0.0.1",
            port=DEFAULT_PORT if port is None else port,
            db=int(path) if path else 0,
            username=unquote(parts.username) if parts.username else None,
            password=unquote(parts.password) if parts.password else None,
            tls=scheme == "rediss",
        )
        return cls(reactor, **settings)

    @property
    def url(self) -> str:
        """
        The URL of the server, without the password: for logs and errors.
        """
        scheme = "rediss" if self.tls else "redis"
        user = self.username or ""
        credentials = f"{user}:***@" if self.password is not None else (f"{user}@" if user else "")
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{scheme}://{credentials}{host}:{self.port}/{self.db}"

    def keyFor(self, key: str) -> str:
        """
        The Redis key of a cache key: the prefix and the key.
        """
        return self.prefix + key

    # -- ICache -----------------------------------------------------------------

    def get(self, key: str) -> Deferred[Any]:
        """
        Read an entry.

        @return: a Deferred firing with the value, or C{None} on a miss or
            an entry that cannot be decoded (another format version, an
            unregistered class); failing with L{RedisCacheError} when
            Redis is unavailable or times out.
        """
        d = self.execute("GET", self.keyFor(key))
        return d.addCallback(self._decoded, key)

    def _decoded(self, raw: Optional[bytes], key: str) -> Any:
        if raw is None:
            self.stats["misses"] += 1
            return None
        try:
            value = self.codec.decode(raw)
        except UndecodableEntry as e:
            self.stats["misses"] += 1
            self.stats["undecodable"] += 1
            # The key holds a key hash or an instance id: log its kind only.
            log.warn(
                "Redis cache entry of kind {kind} read as a miss: {error}",
                kind=key.partition(":")[0],
                error=str(e),
            )
            return None
        self.stats["hits"] += 1
        return value

    def set(self, key: str, value: Any, ttl: Optional[float] = None) -> Deferred[None]:
        """
        Store C{value} for C{ttl} seconds (C{None}: L{defaultTtl}; infinity:
        no expiry), with C{SET ... PX}.  A C{ttl} of 0 or less stores
        nothing and removes any entry for C{key}.

        @return: a Deferred firing with C{None}; failing with C{ValueError}
            when C{value} is C{None} or C{ttl} is not a number,
            L{mcp_proxy.cachecodec.UnencodableValue} when C{value} cannot
            be encoded, L{RedisCacheError} when Redis fails.
        """
        if value is None:
            return fail(ValueError("a cache cannot store None"))
        if ttl is None:
            ttl = self.defaultTtl
        if math.isnan(ttl):
            return fail(ValueError("a cache ttl must be a number of seconds, not NaN"))
        redisKey = self.keyFor(key)
        if ttl <= 0:
            return self.execute("DEL", redisKey).addCallback(lambda _: None)
        try:
            data = self.codec.encode(value)
        except ValueError as e:
            return fail(e)
        expiry: tuple[Any, ...] = () if math.isinf(ttl) else ("PX", max(1, round(ttl * 1000)))
        return self.execute("SET", redisKey, data, *expiry).addCallback(self._stored)

    def _stored(self, reply: Any) -> None:
        self.stats["sets"] += 1

    def delete(self, keys: Iterable[str]) -> Deferred[None]:
        """
        Remove the entries for C{keys} (in C{DEL}s of up to L{BATCH} keys);
        absent ones are ignored.

        @param keys: an iterable of keys, not a single C{str}.
        @return: a Deferred firing with C{None}; failing with C{TypeError}
            when C{keys} is a C{str}, L{RedisCacheError} when Redis fails.
        """
        if isinstance(keys, str):
            return fail(TypeError("delete() takes an iterable of keys, not a str"))
        try:
            redisKeys = [self.keyFor(key) for key in keys]
        except TypeError as e:
            return fail(e)
        if not redisKeys:
            return succeed(None)
        return Deferred.fromCoroutine(self._delete(redisKeys))

    async def _delete(self, redisKeys: list[Any]) -> None:
        for start in range(0, len(redisKeys), BATCH):
            removed = await self.execute("DEL", *redisKeys[start : start + BATCH])
            self.stats["deletes"] += int(removed)

    def clear(self) -> Deferred[None]:
        """
        Remove every entry under L{prefix}, with C{SCAN ... MATCH} and
        C{DEL}; other keys of the database are left alone.  The counters
        are kept.

        @return: a Deferred firing with C{None}; failing with
            L{RedisCacheError} when Redis fails.
        """
        return Deferred.fromCoroutine(self._clear())

    async def _clear(self) -> None:
        cursor: Any = b"0"
        while True:
            cursor, found = await self._scan(cursor)
            if found:
                await self.execute("DEL", *found)
            if _isZeroCursor(cursor):
                return

    def _scan(self, cursor: Any) -> Deferred[Any]:
        pattern = _globEscape(self.prefix) + "*"
        return self.execute("SCAN", cursor, "MATCH", pattern, "COUNT", BATCH)

    # -- beyond ICache --------------------------------------------------------------

    def ping(self) -> Deferred[None]:
        """
        Check that Redis answers (C{PING}), e.g. for a health check.

        @return: a Deferred firing with C{None}, or failing with
            L{RedisCacheError}.
        """
        return self.execute("PING").addCallback(lambda _: None)

    def ownKeys(self) -> Deferred[list[bytes]]:
        """
        The Redis keys under L{prefix} (found with C{SCAN}, which does not
        block Redis), e.g. for tests and tools.

        @return: a Deferred firing with a list of keys (no duplicates), or
            failing with L{RedisCacheError}.
        """
        return Deferred.fromCoroutine(self._ownKeys())

    async def _ownKeys(self) -> list[bytes]:
        keys: dict[bytes, None] = {}
        cursor: Any = b"0"
        while True:
            cursor, found = await self._scan(cursor)
            keys.update(dict.fromkeys(found))
            if _isZeroCursor(cursor):
                return list(keys)

    def execute(self, command: str, *args: Any) -> Deferred[Any]:
        """
        Run a raw command on the pool, with the deadlines and the failing
        fast of the cache operations.  Keys are not prefixed: see
        L{keyFor}.

        @return: a Deferred firing with the reply (bulk strings as
            C{bytes}); failing with L{RedisUnavailable} (L{RedisTimeout})
            or L{RedisCommandError}.
        """
        if self._closed:
            self.stats["errors"] += 1
            return fail(RedisUnavailable(f"the Redis cache for {self.url} is closed"))
        try:
            factory = self._pool()
        except Exception as e:
            self.stats["errors"] += 1
            log.failure("cannot set up the Redis connections of {url}", url=self.url)
            return fail(RedisCacheError(f"Redis at {self.url}: cannot connect: {e}"))
        if self._failedAt is not None and (
            factory.size == 0 or self.reactor.seconds() < self._failedAt + self.retryInterval
        ):
            self.stats["errors"] += 1
            return fail(
                RedisUnavailable(
                    f"Redis at {self.url}: {command} not sent: failing fast after "
                    f"{self._lastError}; reconnecting in the background"
                )
            )
        d: Deferred[Any] = factory.handler.execute_command(command, *args)
        self._pending.add(d)
        deadline = self.connectTimeout + self.replyTimeout
        d.addTimeout(deadline, self.reactor)
        d.addCallbacks(self._succeeded, self._failed, errbackArgs=(command, deadline, factory))
        return d.addBoth(self._settled, d)

    def close(self) -> Deferred[None]:
        """
        Disconnect, for the service's stop; later operations fail with
        L{RedisUnavailable}.

        Commands not answered yet fail with L{RedisUnavailable}.

        @return: a Deferred firing with C{None} once the connections are
            closed (or after L{connectTimeout}, whatever happens).
        """
        self._closed = True
        pending, self._pending = self._pending, set()
        self._closing = True
        try:
            for d in pending:
                d.cancel()
        finally:
            self._closing = False
        factory, self._factory = self._factory, None
        if factory is None:
            return succeed(None)
        return self._discard(factory)

    # -- the pool ----------------------------------------------------------------

    def _pool(self) -> Any:
        """
        The connection pool: made at the first use, and replaced when it
        has stopped reconnecting.
        """
        factory = self._factory
        now = self.reactor.seconds()
        if factory is not None and factory.stopped and now - self._builtAt >= self.rebuildInterval:
            log.warn(
                "the Redis connection pool of {url} stopped reconnecting ({error}); "
                "starting a new one",
                url=self.url,
                error=self._poolError or "no reason given",
            )
            self._discard(factory)
            factory = None
        if factory is None:
            self._poolError = None
            factory = self._factory = self._newPool()
            self._builtAt = now
        return factory

    def _newPool(self) -> Any:
        factory = txredisapi.RedisFactory(
            f"{self.host}:{self.port}",
            self.db or None,
            self.poolSize,
            isLazy=True,
            handler=txredisapi.ConnectionHandler,
            charset=None,
            password=self.password,
            replyTimeout=self.replyTimeout,
            convertNumbers=False,
            username=self.username,
        )
        factory.reconnect = True
        factory.protocol = _Protocol
        factory.lostBecause = self._connectionLost
        # Fails when a handshake fails (then the pool stops reconnecting);
        # nobody else waits for it.
        factory.deferred.addCallbacks(lambda _: None, self._poolFailed, errbackArgs=(factory,))
        factory.startConnecting(self._endpoint())
        return factory

    def endpoint(self) -> IStreamClientEndpoint:
        """
        A client endpoint to this cache's Redis server, with the TLS and
        certificate checks of the cache's own connections: for a dedicated
        connection, e.g. a subscriber's (L{mcp_proxy.changes}).
        """
        return self._endpoint()

    def _endpoint(self) -> IStreamClientEndpoint:
        endpoint: IStreamClientEndpoint = HostnameEndpoint(
            self.reactor, self.host, self.port, timeout=self.connectTimeout
        )
        if not self.tls:
            return endpoint
        return wrapClientTLS(optionsForClientTLS(self.host, trustRoot=self._trustRoot), endpoint)

    def _poolFailed(self, failure: Failure, factory: Any) -> None:
        if factory is not self._factory:
            return
        self._poolError = failure.getErrorMessage()
        self._failedAt = self.reactor.seconds()
        self._lastError = self._poolError
        log.error(
            "the Redis connection pool of {url} failed: {error}",
            url=self.url,
            error=self._poolError,
        )

    def _connectionLost(self, why: Failure) -> None:
        self._lostBecause = why.getErrorMessage()

    def _discard(self, factory: Any) -> Deferred[None]:
        d: Deferred[Any] = factory.disconnect()
        d.addTimeout(self.connectTimeout, self.reactor)

        def closed(result: Any) -> None:
            if isinstance(result, Failure):
                log.failure("closing the Redis connections of {url}", result, url=self.url)

        return d.addBoth(closed)

    # -- results -----------------------------------------------------------------

    def _settled(self, result: Any, d: Deferred[Any]) -> Any:
        self._pending.discard(d)
        return result

    def _succeeded(self, reply: Any) -> Any:
        self._failedAt = None
        return reply

    def _failed(self, failure: Failure, command: str, deadline: float, factory: Any) -> Failure:
        if failure.check(CancelledError):
            if self._closing:
                self.stats["errors"] += 1
                return Failure(RedisUnavailable(f"Redis at {self.url}: {command}: closed"))
            # Cancelled by the caller: neither Redis's fault nor ours.
            return failure
        self.stats["errors"] += 1
        if failure.check(DeadlineExceeded):
            if factory.size == 0:
                what = f"no connection within {deadline:g} s"
                if self._poolError is not None and factory is self._factory:
                    what += f" ({self._poolError})"
            else:
                what = f"no answer within {deadline:g} s"
            return self._unavailable(command, what, timeout=True)
        if failure.check(txredisapi.TimeoutError):
            what = f"no reply within {self.replyTimeout:g} s"
            return self._unavailable(command, what, timeout=True)
        if failure.check(txredisapi.ResponseError):
            return Failure(
                RedisCommandError(
                    f"Redis at {self.url} refused {command}: {failure.getErrorMessage()}"
                )
            )
        if failure.check(
            txredisapi.ConnectionError, netError.ConnectError, netError.ConnectionLost
        ):
            what = failure.getErrorMessage()
            if what == "Lost connection" and self._lostBecause:
                what += f": {self._lostBecause}"
            return self._unavailable(command, what)
        if failure.check(txredisapi.RedisError):
            return Failure(
                RedisCacheError(f"Redis at {self.url}: {command}: {failure.getErrorMessage()}")
            )
        log.failure("Redis command {command} failed unexpectedly", failure, command=command)
        return failure

    def _unavailable(self, command: str, what: str, timeout: bool = False) -> Failure:
        self._failedAt = self.reactor.seconds()
        self._lastError = f"{command}: {what}"
        kind = RedisTimeout if timeout else RedisUnavailable
        return Failure(kind(f"Redis at {self.url}: {command}: {what}"))


#: The C{configs} option of the C{"redis"} backend: keep the cached
#: instance configurations (which hold upstream secrets) in each process
#: (the default), or share them in Redis.
CONFIGS_LOCAL = "local"
CONFIGS_SHARED = "shared"


def buildRedisCache(args: str, reactor: Any, defaults: CacheDefaults) -> ICache:
    """
    The C{"redis"} cache backend (see L{mcp_proxy.cacheplugins}): a
    L{RedisCache} for the URL C{args} (see L{RedisCache.fromURL}), whose
    default ttl is C{defaults.defaultTtl}.

    The URL may also carry C{configs=local} (the default) or
    C{configs=shared}.  With C{local}, the keys under
    L{mcp_proxy.auth.CONFIG_CACHE_PREFIX} (instance configurations, which
    hold upstream secrets) stay in an in-process L{MemoryCache} of
    C{defaults.maxSize} entries, through a L{RoutedCache}, and only the
    other keys (API-key lookups) go to Redis: secrets are not copied into
    Redis, and reading a configuration costs no round trip and no
    decoding.  With C{shared}, everything goes to Redis.

    @raise ValueError: when the URL or an option is not usable.
    """
    if not args.strip().lower().startswith(("redis://", "rediss://")):
        raise ValueError("expected a redis:// or rediss:// URL")
    url, configs = _takeOption(args, "configs", CONFIGS_LOCAL)
    if configs not in (CONFIGS_SHARED, CONFIGS_LOCAL):
        raise ValueError(
            f"configs must be {CONFIGS_SHARED!r} or {CONFIGS_LOCAL!r}, not {configs!r}"
        )
    shared = RedisCache.fromURL(url, reactor, defaultTtl=defaults.defaultTtl)
    if configs == CONFIGS_SHARED:
        return shared
    from mcp_proxy.cacheplugins import RoutedCache

    local = MemoryCache(reactor, maxSize=defaults.maxSize, defaultTtl=defaults.defaultTtl)
    return RoutedCache(routes=((CONFIG_CACHE_PREFIX, local),), default=shared)


def _takeOption(url: str, name: str, default: str) -> tuple[str, str]:
    """
    Remove the query parameter C{name} from C{url}.

    @return: the URL without it, and its (last) value or C{default}.
    """
    parts = urlsplit(url.strip())
    value = default
    kept = []
    for key, item in parse_qsl(parts.query, keep_blank_values=True):
        if key == name:
            value = item
        else:
            kept.append((key, item))
    return urlunsplit(parts._replace(query=urlencode(kept))), value


def _number(name: str, value: str, kind: type[float] | type[int]) -> Any:
    try:
        return kind(value)
    except ValueError:
        raise ValueError(f"the Redis URL option {name!r} is not a number: {value!r}")


__all__ = [
    "CONFIGS_LOCAL",
    "CONFIGS_SHARED",
    "DEFAULT_PREFIX",
    "REDIS_STAT_NAMES",
    "RedisCache",
    "RedisCacheError",
    "RedisCommandError",
    "RedisTimeout",
    "RedisUnavailable",
    "buildRedisCache",
]
