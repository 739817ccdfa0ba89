"""
Tests for L{mcp_proxy.cachecodec} and L{mcp_proxy.cache_redis}.

The L{ICache} contract runs on L{RedisCache} in C{tests/test_cache.py};
here is what only the codec and the Redis provider promise.  The Redis
tests use the Redis of L{mcp_proxy.testing.redisTestURL}; they are skipped
when it cannot be reached, or fail when C{CI=true}.
"""

from __future__ import annotations

import datetime
import functools
import json
import os
import secrets
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Any, AsyncIterator, Iterator, Optional
from urllib.parse import quote, urlsplit

import attrs
import pytest
import pytest_twisted
from twisted.internet import defer, reactor
from twisted.internet.defer import Deferred
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import deferLater
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from mcp_proxy.auth import Authenticator, Principal
from mcp_proxy.cache import STAT_NAMES
from mcp_proxy.cache_redis import (
    REDIS_STAT_NAMES,
    RedisCache,
    RedisCommandError,
    RedisTimeout,
    RedisUnavailable,
)
from mcp_proxy.cachecodec import (
    CODEC_VERSION,
    DEFAULT_CLASSES,
    CacheCodec,
    UndecodableEntry,
    UnencodableValue,
    UnknownTag,
    className,
    defaultCodec,
)
from mcp_proxy.cacheplugins import closeCache, openCache
from mcp_proxy.interfaces import ICache
from mcp_proxy.models import (
    ApiKeyRecord,
    InstanceConfig,
    RequestLogData,
    RequestLogRow,
    ToolGroup,
    ToolGroupTool,
    UpstreamConfig,
)
from mcp_proxy.testing import FakeKeyLookup, redisTestURL


def sampleConfig() -> InstanceConfig:
    """
    An instance configuration with two upstreams, as the config loader
    caches it.
    """
    return InstanceConfig(
        instanceId="inst1",
        organizationId="org1",
        toolGroupId="tg1",
        toolGroupEnabled=True,
        upstreams=(
            UpstreamConfig(
                configId="cfg1",
                name="files",
                transportType="STDIO",
                command="npx",
                args=("-y", "server-files", "--root=/tmp/ü"),
                url=None,
                env={"TOKEN": "secret", "EMPTY": ""},
                authType="NONE",
                toolNames=frozenset({"read", "write", "list"}),
                serverId="srv1",
            ),
            UpstreamConfig(
                configId="cfg2",
                name="remote",
                transportType="STREAMABLE_HTTPS",
                command=None,
                args=(),
                url="https://mcp.example/mcp",
                env={},
                authType="API_KEY",
                toolNames=frozenset(),
            ),
        ),
    )


@attrs.frozen
class Point:
    x: int
    y: int = 0


@attrs.frozen
class Hidden:
    _secret: str
    derived: int = attrs.field(init=False, default=7)


class CacheCodecTests(SynchronousTestCase):
    """
    L{CacheCodec} encodes values as versioned JSON and rebuilds only
    registered classes.
    """

    def setUp(self) -> None:
        self.codec = defaultCodec()

    def roundTrip(self, value: Any) -> Any:
        return self.codec.decode(self.codec.encode(value))

    def test_instanceConfigRoundTrip(self) -> None:
        """An L{InstanceConfig} with nested upstreams reads back equal, types included."""
        config = sampleConfig()
        back = self.roundTrip(config)
        self.assertEqual(back, config)
        self.assertIsInstance(back.upstreams, tuple)
        self.assertIsInstance(back.upstreams[0], UpstreamConfig)
        self.assertIsInstance(back.upstreams[0].args, tuple)
        self.assertIsInstance(back.upstreams[0].toolNames, frozenset)
        self.assertEqual(dict(back.upstreams[0].env), {"TOKEN": "secret", "EMPTY": ""})

    def test_scalarsAndContainers(self) -> None:
        """JSON values, tuples, sets, datetimes and bytes read back equal and of their type."""
        values: list[Any] = [
            {"found": True, "keyId": "k1", "expiresAt": 1234.5, "tags": ["a", "b"]},
            ["a", 1, 2.5, True, None],
            "text ü \u2603",
            42,
            10**30,
            2.5,
            -0.0,
            True,
            False,
            (1, (2, 3)),
            frozenset({1, "1", (1,)}),
            {3, 4},
            datetime.datetime(2026, 11, 28, 11, 41, 24, 123000),
            datetime.datetime(2026, 11, 28, 11, 41, 24, tzinfo=datetime.UTC),
            b"\x00\xffbytes",
            {"nested": {"list": [(1, 2), frozenset({"x"})]}},
        ]
        for value in values:
            back = self.roundTrip(value)
            self.assertEqual(back, value)
            self.assertIs(type(back), type(value))

    def test_dictsOfOtherKeys(self) -> None:
        """Dicts with non-str keys, or a C{"$t"} key, read back as they were."""
        for value in ({1: "a", (2, 3): "b"}, {"$t": "tuple", "items": [1]}, {"a": 1, 2: 3}):
            self.assertEqual(self.roundTrip(value), value)

    def test_dictOrderKept(self) -> None:
        """A dict reads back with its keys in the same order."""
        value = {"b": 1, "a": 2, "c": 3}
        self.assertEqual(list(self.roundTrip(value)), ["b", "a", "c"])

    def test_mappingAsDict(self) -> None:
        """Any other mapping is stored as a dict, which compares equal."""
        from types import MappingProxyType

        value = MappingProxyType({"a": 1})
        self.assertEqual(self.roundTrip(value), {"a": 1})

    def test_everyDefaultClass(self) -> None:
        """The records the proxy may cache round-trip, datetimes and bytes included."""
        when = datetime.datetime(2026, 1, 2, 3, 4, 5, 6000)
        values = [
            ApiKeyRecord("k", "i", "o", "API_KEY", True, when, False, True),
            ApiKeyRecord("k", "i", "o", "API_KEY", True, None, False, True),
            Principal("k", "hash", "i", "o", "API_KEY"),
            ToolGroup("t", "n", "d", True, "o", (ToolGroupTool("c", "t", "n", 2),), when),
            RequestLogRow(
                "r",
                "i",
                "o",
                "tool",
                "STDIO",
                "tools/call",
                "SUCCESS",
                12,
                None,
                None,
                3,
                4,
                "curl",
                when,
                RequestLogData("d", b"\x01\x02", b"", 2, 0, 2, 0, 1.0),
            ),
        ]
        for value in values:
            self.assertEqual(self.roundTrip(value), value)
        self.assertIn(InstanceConfig, DEFAULT_CLASSES)
        self.assertIn(Principal, DEFAULT_CLASSES)

    def test_versionedJson(self) -> None:
        """The bytes are UTF-8 JSON in an envelope naming the format version."""
        document = json.loads(self.codec.encode({"a": (1,)}).decode("utf-8"))
        self.assertEqual(
            document,
            {"mcpcache": CODEC_VERSION, "value": {"a": {"$t": "tuple", "items": [1]}}},
        )

    def test_setsCanonical(self) -> None:
        """Equal sets encode to the same bytes, whatever their iteration order."""
        a = frozenset(f"tool{i}" for i in range(50))
        b = frozenset(sorted(a, reverse=True))
        self.assertEqual(self.codec.encode(a), self.codec.encode(b))

    def test_unregisteredClassRefused(self) -> None:
        """An instance of an attrs class not registered cannot be encoded."""
        self.assertRaises(UnencodableValue, self.codec.encode, Point(1, 2))
        self.assertRaises(UnencodableValue, self.codec.encode, {"p": [Point(1, 2)]})

    def test_otherTypesRefused(self) -> None:
        """Objects the codec does not know cannot be encoded (no pickle fallback)."""
        for value in (object(), 1 + 2j, datetime.date(2026, 1, 1), bytearray(b"x")):
            self.assertRaises(UnencodableValue, self.codec.encode, value)

    def test_registeredClass(self) -> None:
        """A registered frozen attrs class round-trips, private and init=False fields too."""
        codec = CacheCodec()
        codec.register(Point)
        codec.register(Hidden, "test.Hidden")
        self.assertEqual(codec.decode(codec.encode(Point(1, 2))), Point(1, 2))
        hidden = codec.decode(codec.encode(Hidden("s")))
        self.assertEqual(hidden, Hidden("s"))
        self.assertEqual(codec.classes["test.Hidden"], Hidden)

    def test_registerRefusesNonFrozen(self) -> None:
        """Only frozen attrs classes can be registered."""

        @attrs.define
        class Mutable:
            x: int

        class Plain:
            pass

        self.assertRaises(TypeError, CacheCodec().register, Mutable)
        self.assertRaises(TypeError, CacheCodec().register, Plain)

    def test_registerRefusesNameClash(self) -> None:
        """A name taken by one class cannot be given to another."""
        codec = CacheCodec()
        codec.register(Point, "p")
        codec.register(Point, "p")
        self.assertRaises(ValueError, codec.register, Hidden, "p")

    def test_unknownClassIsUnknownTag(self) -> None:
        """An entry naming a class that is not registered is refused."""
        codec = CacheCodec()
        codec.register(Point)
        data = codec.encode(Point(1))
        with self.assertRaises(UnknownTag):
            defaultCodec().decode(data)

    def test_unknownTagRefused(self) -> None:
        """An entry with a tag the codec does not know is refused."""
        data = json.dumps({"mcpcache": 1, "value": {"$t": "pickle", "data": "gASV"}})
        self.assertRaises(UnknownTag, self.codec.decode, data.encode())

    def test_otherVersionRefused(self) -> None:
        """An entry of another format version is refused."""
        for version in (2, 0, True, "1"):
            data = json.dumps({"mcpcache": version, "value": 1}).encode()
            self.assertRaises(UndecodableEntry, self.codec.decode, data)

    def test_garbageRefused(self) -> None:
        """Bytes that are not an entry are refused, never crash the reader."""
        nested = b'{"mcpcache":1,"value":' + b"[" * 100_000 + b"]" * 100_000 + b"}"
        for data in (
            b"",
            b"\x80\x04\x95",  # a pickle
            b"not json",
            b"[1, 2]",
            b'{"value": 1}',
            b'{"mcpcache": 1, "value": 1, "extra": 2}',
            b'{"mcpcache":1,"value":{"$t":"tuple","items":5}}',
            b'{"mcpcache":1,"value":{"$t":"frozenset","items":[[1]]}}',
            b'{"mcpcache":1,"value":{"$t":"dict","items":[[1]]}}',
            b'{"mcpcache":1,"value":{"$t":"datetime","iso":"yesterday"}}',
            b'{"mcpcache":1,"value":{"$t":"bytes","b64":"!!"}}',
            nested,
        ):
            self.assertRaises(UndecodableEntry, self.codec.decode, data)

    def test_fieldsMustFit(self) -> None:
        """An entry whose fields do not fit the class (another version of it) is refused."""
        name = className(UpstreamConfig)
        good = json.loads(self.codec.encode(sampleConfig().upstreams[0]))
        missing = json.loads(json.dumps(good))
        del missing["value"]["fields"]["configId"]
        extra = json.loads(json.dumps(good))
        extra["value"]["fields"]["newField"] = 1
        for document in (missing, extra):
            self.assertEqual(document["value"]["class"], name)
            with self.assertRaises(UndecodableEntry):
                self.codec.decode(json.dumps(document).encode())


# -- the Redis provider: what needs no server --------------------------------------


class RedisURLTests(SynchronousTestCase):
    """
    L{RedisCache.fromURL} reads the server, the credentials and the options
    of a C{redis://} URL, and never shows the password.
    """

    def test_defaults(self) -> None:
        """A bare URL means 127.0.0.1:6379, database 0, no credentials, the default prefix."""
        cache = RedisCache.fromURL("redis://", reactor)
        self.assertEqual(
            (cache.host, cache.port, cache.db, cache.username, cache.password, cache.tls),
            ("127.0.0.1", 6379, 0, None, None, False),
        )
        self.assertEqual(cache.prefix, "mcpproxy:")
        self.assertEqual((cache.connectTimeout, cache.replyTimeout), (2.0, 2.0))

    def test_everything(self) -> None:
        """Host, port, database, user, password (unquoted) and options are read."""
        cache = RedisCache.fromURL(
            "rediss://alice:p%40ss%3Aword@Redis.Example:6380/3"
            "?prefix=app:&pool_size=4&connect_timeout=0.5&reply_timeout=1.5"
            "&retry_interval=0",
            reactor,
            defaultTtl=60,
        )
        self.assertEqual(
            (cache.host, cache.port, cache.db, cache.username, cache.password, cache.tls),
            ("redis.example", 6380, 3, "alice", "p@ss:word", True),
        )
        self.assertEqual(cache.prefix, "app:")
        self.assertEqual(cache.poolSize, 4)
        self.assertEqual((cache.connectTimeout, cache.replyTimeout), (0.5, 1.5))
        self.assertEqual(cache.retryInterval, 0)
        self.assertEqual(cache.defaultTtl, 60)

    def test_passwordOnly(self) -> None:
        """C{redis://:PASSWORD@HOST} gives a password and no user."""
        cache = RedisCache.fromURL("redis://:secret@[::1]:7000", reactor)
        self.assertEqual((cache.host, cache.port), ("::1", 7000))
        self.assertEqual((cache.username, cache.password), (None, "secret"))

    def test_queryWinsOverKeywords(self) -> None:
        """The URL's options win over the caller's keyword arguments."""
        cache = RedisCache.fromURL("redis://h/0?prefix=fromurl:", reactor, prefix="fromcode:")
        self.assertEqual(cache.prefix, "fromurl:")
        self.assertEqual(RedisCache.fromURL("redis://h", reactor, prefix="c:").prefix, "c:")

    def test_redactedURL(self) -> None:
        """The C{url} of a cache, for logs and errors, hides the password."""
        cache = RedisCache.fromURL("redis://bob:hunter2@h:1/2", reactor)
        self.assertEqual(cache.url, "redis://bob:***@h:1/2")
        self.assertNotIn("hunter2", repr(cache))
        self.assertEqual(RedisCache.fromURL("rediss://[::1]", reactor).url, "rediss://[::1]:6379/0")

    def test_badURLs(self) -> None:
        """Unusable URLs are refused with a message that never holds the password."""
        for url in (
            "http://:pw1234@h",
            "redis://:pw1234@h:notaport",
            "redis://:pw1234@h:99999",
            "redis://:pw1234@h/zero",
            "redis://:pw1234@h/0/1",
            "redis://:pw1234@h/0?unknown=1",
            "redis://:pw1234@h/0?pool_size=many",
            "redis://:pw1234@h/0?pool_size=0",
            "redis://:pw1234@h/0?reply_timeout=0",
            "redis://:pw1234@h/0?connect_timeout=-1",
            "redis://:pw1234@h/0?prefix=",
            "redis://:pw1234@h/0?ca=/x.pem",
            "rediss://:pw1234@h/0?ca=/no/such/ca.pem",
            "redis://:pw1234@h/0#frag",
        ):
            with self.assertRaises(ValueError, msg=url) as caught:
                RedisCache.fromURL(url, reactor)
            self.assertNotIn("pw1234", str(caught.exception))

    def test_emptyPrefixRefused(self) -> None:
        """An empty prefix is refused: C{clear} would empty the database."""
        self.assertRaises(ValueError, RedisCache, reactor, prefix="")

    def test_noConnectionUntilUsed(self) -> None:
        """Making a cache connects nothing; closing an unused one is immediate."""
        cache = RedisCache(reactor, port=1)
        self.assertIsNone(cache._factory)
        self.successResultOf(cache.close())

    def test_providesICache(self) -> None:
        """L{RedisCache} provides L{ICache} and has the counters of L{MemoryCache}."""
        cache = RedisCache(reactor)
        self.assertTrue(verifyObject(ICache, cache))
        self.assertEqual(set(cache.stats), set(REDIS_STAT_NAMES))
        self.assertTrue(set(STAT_NAMES) <= set(cache.stats))

    def test_refusedBeforeRedis(self) -> None:
        """None values, NaN ttls, unencodable values and a str of keys fail at once."""
        cache = RedisCache(reactor, port=1)
        self.failureResultOf(cache.set("k", None), ValueError)
        self.failureResultOf(cache.set("k", 1, float("nan")), ValueError)
        self.failureResultOf(cache.set("k", object()), UnencodableValue)
        self.failureResultOf(cache.delete("ab"), TypeError)
        self.assertIsNone(self.successResultOf(cache.delete([])))
        self.assertIsNone(cache._factory)


# -- the Redis provider on a real Redis --------------------------------------------

#: Seconds a test waits for something that should happen much sooner.
PATIENCE = 10.0


@functools.lru_cache(maxsize=1)
def _probeRedis() -> Optional[str]:
    """
    Why the test Redis cannot be reached, or C{None} when it answers.
    """
    parts = urlsplit(redisTestURL())
    try:
        with socket.create_connection((parts.hostname or "127.0.0.1", parts.port or 6379), 2):
            pass
    except OSError as e:
        return f"Redis ({RedisCache.fromURL(redisTestURL(), reactor).url}) is unreachable: {e}"
    return None


def requireRedis() -> str:
    """
    The URL of the test Redis; skip the test (fail it when C{CI=true}) when
    it cannot be reached.
    """
    problem = _probeRedis()
    if problem is not None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(problem)
        pytest.skip(problem)
    return redisTestURL()


def newCache(**kwargs: Any) -> RedisCache:
    """
    A cache on the test Redis under a fresh prefix (or C{kwargs["prefix"]}).
    """
    kwargs.setdefault("prefix", f"mcpproxy-test:{secrets.token_hex(6)}:")
    return RedisCache.fromURL(requireRedis(), reactor, **kwargs)


@pytest_twisted.async_yield_fixture
async def redisCache() -> AsyncIterator[RedisCache]:
    """
    A L{RedisCache} on the test Redis under a fresh prefix; its keys are
    removed after the test.
    """
    cache = newCache()
    yield cache
    await cache.clear()
    await cache.close()


@pytest_twisted.async_yield_fixture
async def observer() -> AsyncIterator[RedisCache]:
    """
    A second, independent connection to the test Redis, to look at what a
    cache wrote and to run administrative commands.
    """
    cache = newCache(prefix="mcpproxy-test-observer:", poolSize=1)
    yield cache
    await cache.close()


def sleep(seconds: float) -> Deferred[None]:
    return deferLater(reactor, seconds, lambda: None)


@pytest_twisted.ensureDeferred
async def test_keysNamespacedAndEncoded(redisCache: RedisCache, observer: RedisCache) -> None:
    """An entry is the codec's bytes under the prefixed key."""
    await redisCache.set("config:inst1", sampleConfig(), 30)
    raw = await observer.execute("GET", redisCache.prefix + "config:inst1")
    assert raw == defaultCodec().encode(sampleConfig())
    assert await observer.execute("EXISTS", "config:inst1") == 0
    assert await redisCache.get("config:inst1") == sampleConfig()
    assert await redisCache.ownKeys() == [(redisCache.prefix + "config:inst1").encode()]


@pytest_twisted.ensureDeferred
async def test_setUsesMillisecondExpiry(redisCache: RedisCache, observer: RedisCache) -> None:
    """C{set} sends the ttl in milliseconds (C{PX}); infinity means no expiry."""
    cases: list[tuple[Optional[float], int, int]] = [
        # Generous lower bounds: a loaded machine may be slow between SET and PTTL.
        (2, 1500, 2000),
        (1.5, 1000, 1500),
        (None, 295_000, 300_000),
    ]
    for ttl, low, high in cases:
        await redisCache.set("k", "v", ttl)
        pttl = await observer.execute("PTTL", redisCache.keyFor("k"))
        assert low < pttl <= high, (ttl, pttl)
    await redisCache.set("k", "v", float("inf"))
    assert await observer.execute("PTTL", redisCache.keyFor("k")) == -1


@pytest_twisted.ensureDeferred
async def test_redisExpiresEntries(redisCache: RedisCache) -> None:
    """Redis itself drops an entry when its ttl has passed: it then reads as a miss."""
    await redisCache.set("k", "v", 0.3)
    started = time.monotonic()
    assert await redisCache.get("k") == "v"
    while await redisCache.get("k") is not None:
        assert time.monotonic() - started < PATIENCE, "the entry never expired"
        await sleep(0.05)
    assert time.monotonic() - started >= 0.25


@pytest_twisted.ensureDeferred
async def test_zeroTtlDeletes(redisCache: RedisCache, observer: RedisCache) -> None:
    """A ttl of 0 or less removes the key from Redis."""
    await redisCache.set("k", "v", None)
    await redisCache.set("k", "v2", -1)
    assert await observer.execute("EXISTS", redisCache.keyFor("k")) == 0


@pytest_twisted.ensureDeferred
async def test_clearOnlyOwnPrefix(observer: RedisCache) -> None:
    """C{clear} removes the keys of its prefix, in batches, and no other key."""
    token = secrets.token_hex(4)
    # The prefix holds glob characters; unescaped, its pattern would also
    # match the neighbours below.
    cache = newCache(prefix=f"mcpproxy-test:{token}:[a]*?\\:")
    neighbours = [
        f"mcpproxy-test:{token}:a-x:k",
        f"mcpproxy-test:{token}:[a]x?\\:k",
        f"mcpproxy-test:{token}:k",
    ]
    try:
        for name in neighbours:
            await observer.execute("SET", name, b"keep", "PX", 60_000)
        await defer.gatherResults([cache.set(f"k{i}", i, 60) for i in range(1200)])
        assert len(await cache.ownKeys()) == 1200
        await cache.clear()
        assert await cache.ownKeys() == []
        for name in neighbours:
            assert await observer.execute("GET", name) == b"keep", name
    finally:
        await observer.execute("DEL", *neighbours)
        await cache.clear()
        await cache.close()


@pytest_twisted.ensureDeferred
async def test_deleteMany(redisCache: RedisCache) -> None:
    """C{delete} removes many keys (several C{DEL}s) and counts those that existed."""
    keys = [f"auth:{i}" for i in range(1100)]
    await defer.gatherResults([redisCache.set(k, {"n": 1}, 60) for k in keys])
    await redisCache.delete([*keys, "auth:absent"])
    assert redisCache.stats["deletes"] == 1100
    assert await redisCache.ownKeys() == []


@pytest_twisted.ensureDeferred
async def test_undecodableIsMiss(redisCache: RedisCache, observer: RedisCache) -> None:
    """Bytes the codec refuses (garbage, an unknown tag, another version) read as misses."""
    entries = [
        b"\x80\x04\x95garbage",
        b'{"mcpcache":1,"value":{"$t":"attrs","class":"os.system","fields":{}}}',
        b'{"mcpcache":2,"value":1}',
    ]
    for raw in entries:
        await observer.execute("SET", redisCache.keyFor("auth:x"), raw, "PX", 60_000)
        assert await redisCache.get("auth:x") is None
    assert redisCache.stats["undecodable"] == 3
    assert redisCache.stats["misses"] == 3
    assert redisCache.stats["hits"] == 0


@pytest_twisted.ensureDeferred
async def test_concurrentOperations(redisCache: RedisCache) -> None:
    """Many operations in flight at once (pipelined on the pool) all get their own answer."""
    await defer.gatherResults([redisCache.set(f"k{i}", {"i": i}, 60) for i in range(500)])
    values = await defer.gatherResults([redisCache.get(f"k{i}") for i in range(500)])
    assert values == [{"i": i} for i in range(500)]


@pytest_twisted.ensureDeferred
async def test_pingAndClose() -> None:
    """C{ping} answers; after C{close}, operations fail with L{RedisUnavailable}."""
    cache = newCache()
    assert await cache.ping() is None
    await cache.close()
    with pytest.raises(RedisUnavailable, match="closed"):
        await cache.get("k")
    assert await cache.close() is None


@pytest_twisted.ensureDeferred
async def test_commandErrors(redisCache: RedisCache, observer: RedisCache) -> None:
    """An error answered by Redis fails with L{RedisCommandError}, and does not fail fast."""
    await observer.execute("LPUSH", redisCache.keyFor("list"), b"x")
    with pytest.raises(RedisCommandError, match="WRONGTYPE"):
        await redisCache.get("list")
    assert await redisCache.get("other") is None


@pytest_twisted.ensureDeferred
async def test_reconnectAfterKill(observer: RedisCache) -> None:
    """After Redis drops the connection (C{CLIENT KILL}), the cache reconnects by itself."""
    cache = newCache(poolSize=1, retryInterval=0.1)
    try:
        await cache.set("k", "v", 60)
        before = await cache.execute("CLIENT", "ID")
        assert await observer.execute("CLIENT", "KILL", "ID", before) == 1
        started = time.monotonic()
        while True:
            try:
                value = await cache.get("k")
                break
            except RedisUnavailable:
                assert time.monotonic() - started < PATIENCE, "never reconnected"
                await sleep(0.1)
        assert value == "v"
        assert await cache.execute("CLIENT", "ID") != before
    finally:
        await cache.clear()
        await cache.close()


@pytest_twisted.ensureDeferred
async def test_rebuildAfterHandshakeFailure(observer: RedisCache) -> None:
    """
    When C{AUTH} fails, txredisapi stops reconnecting; the cache reports it
    and starts a new pool later, which works once the user exists.
    """
    user, password = f"mcpproxy-test-{secrets.token_hex(4)}", secrets.token_hex(8)
    parts = urlsplit(requireRedis())
    url = f"redis://{user}:{password}@{parts.hostname}:{parts.port or 6379}/0"
    cache = RedisCache.fromURL(
        f"{url}?connect_timeout=0.5&reply_timeout=0.5&retry_interval=0.1",
        reactor,
        prefix=f"mcpproxy-test:{secrets.token_hex(6)}:",
        rebuildInterval=0.2,
    )
    try:
        with pytest.raises(RedisUnavailable, match="could not auth") as caught:
            await cache.get("k")
        assert password not in str(caught.value)
        with pytest.raises(RedisUnavailable, match="could not auth"):
            await cache.get("k")
        try:
            await observer.execute("ACL", "SETUSER", user, "on", f">{password}", "~*", "+@all")
        except RedisCommandError as e:
            pytest.skip(f"the test Redis does not allow ACL SETUSER: {e}")
        started = time.monotonic()
        while True:
            try:
                await cache.set("k", "v", 60)
                break
            except RedisUnavailable:
                assert time.monotonic() - started < PATIENCE, "never recovered"
                await sleep(0.1)
        assert await cache.get("k") == "v"
    finally:
        await observer.execute("ACL", "DELUSER", user)
        await cache.close()
        cleanup = newCache(prefix=cache.prefix)
        await cleanup.clear()
        await cleanup.close()


# -- unreachable and silent servers --------------------------------------------------


class BlackHole(Protocol):
    """
    Accepts a connection and never answers.
    """

    def connectionMade(self) -> None:
        self.factory.transports.append(self.transport)  # type: ignore[attr-defined]


@pytest_twisted.async_yield_fixture
async def blackHole() -> AsyncIterator[int]:
    """
    The port of a TCP server on loopback that accepts connections, reads
    what it is sent, and never answers.
    """
    factory = Factory.forProtocol(BlackHole)
    factory.transports = []  # type: ignore[attr-defined]
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")
    yield port.getHost().port
    await port.stopListening()
    for transport in factory.transports:  # type: ignore[attr-defined]
        transport.abortConnection()


def closedPort() -> int:
    """
    A loopback port on which nothing listens.
    """
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def timed(d: Deferred[Any]) -> tuple[Any, float]:
    """
    The failure (or result) of C{d}, and how many seconds it took.
    """
    started = time.monotonic()
    try:
        result = await d
    except Exception as e:
        result = e
    return result, time.monotonic() - started


@pytest_twisted.ensureDeferred
async def test_silentServerTimesOut(blackHole: int) -> None:
    """
    A server that never answers makes C{get} fail with L{RedisTimeout}
    within the reply timeout; then operations fail at once for a while.
    """
    cache = RedisCache(
        reactor, port=blackHole, connectTimeout=1.0, replyTimeout=0.3, retryInterval=5
    )
    try:
        error, took = await timed(cache.get("k"))
        assert isinstance(error, RedisTimeout), error
        assert "no reply within 0.3 s" in str(error)
        assert 0.25 <= took < 0.3 + 0.7
        error, took = await timed(cache.set("k", "v", 10))
        assert isinstance(error, RedisUnavailable), error
        assert "SET not sent: failing fast after GET: no reply" in str(error)
        assert took < 0.1
        assert cache.stats["errors"] == 2
    finally:
        await cache.close()


@pytest_twisted.ensureDeferred
async def test_silentServerDuringHandshake(blackHole: int) -> None:
    """A server that never answers the C{SELECT} of the handshake cannot hold C{get} either."""
    cache = RedisCache(reactor, port=blackHole, db=3, connectTimeout=0.3, replyTimeout=0.3)
    try:
        error, took = await timed(cache.get("k"))
        assert isinstance(error, RedisTimeout), error
        assert took < 0.6 + 0.7
    finally:
        await cache.close()


@pytest_twisted.ensureDeferred
async def test_downServerFailsFast() -> None:
    """
    With nothing listening, the first operation fails after the connect
    deadline, the next ones at once, each with a clear error.
    """
    cache = RedisCache.fromURL(
        f"redis://:pw5678@127.0.0.1:{closedPort()}/0?connect_timeout=0.3&reply_timeout=0.3",
        reactor,
    )
    try:
        error, took = await timed(cache.get("k"))
        assert isinstance(error, RedisTimeout), error
        assert "no connection within 0.6 s" in str(error)
        assert "redis://:***@127.0.0.1" in str(error)
        assert "pw5678" not in str(error)
        assert took < 0.6 + 0.7
        for operation in (cache.get("k"), cache.set("k", 1), cache.delete(["k"]), cache.clear()):
            error, took = await timed(operation)
            assert isinstance(error, RedisUnavailable), error
            assert took < 0.1
    finally:
        await cache.close()


@pytest_twisted.ensureDeferred
async def test_authenticatorSurvivesRedisDown() -> None:
    """
    With Redis down, the authenticator treats the cache failures as misses
    and still authenticates from the database (then from the copy it keeps
    in the process).
    """
    cache = RedisCache(reactor, port=closedPort(), connectTimeout=0.2, replyTimeout=0.2)
    lookup = FakeKeyLookup()
    lookup.addKey(
        "mcp_key", ApiKeyRecord("key1", "inst1", "org1", "API_KEY", True, None, False, True)
    )
    authenticator = Authenticator(lookup=lookup, cache=cache, clock=reactor)
    try:
        for _ in range(3):
            principal = await authenticator.authenticate("mcp_key", "inst1")
            assert principal.keyId == "key1"
            authenticator.clearLocal()
        assert lookup.calls["lookupApiKey"] == 3
    finally:
        await cache.close()


# -- TLS -------------------------------------------------------------------------------


def writeCertificates(directory: Path) -> tuple[Path, Path, Path]:
    """
    A CA, and a server certificate it signed for the name C{localhost}
    only, as PEM files.

    @return: the paths of the CA certificate, the server certificate and
        the server key.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)

    def name(text: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, text)])

    caKey = ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder()
        .subject_name(name("mcp-proxy test CA"))
        .issuer_name(name("mcp-proxy test CA"))
        .public_key(caKey.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(caKey, hashes.SHA256())
    )
    serverKey = ec.generate_private_key(ec.SECP256R1())
    server = (
        x509.CertificateBuilder()
        .subject_name(name("localhost"))
        .issuer_name(ca.subject)
        .public_key(serverKey.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
        .sign(caKey, hashes.SHA256())
    )
    paths = (directory / "ca.pem", directory / "server.pem", directory / "server.key")
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(server.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(
        serverKey.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return paths


@pytest.fixture
def tlsRedis(tmp_path: Path) -> Iterator[tuple[int, Path]]:
    """
    A Redis server of our own speaking only TLS on a loopback port, with a
    certificate for C{localhost}; skipped when C{redis-server} is missing
    or was built without TLS.

    @return: its port and the path of its CA certificate.
    """
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("redis-server is not installed")
    caPath, certPath, keyPath = writeCertificates(tmp_path)
    port = closedPort()
    process = subprocess.Popen(
        [
            binary,
            "--port",
            "0",
            "--bind",
            "127.0.0.1",
            "--tls-port",
            str(port),
            "--tls-cert-file",
            str(certPath),
            "--tls-key-file",
            str(keyPath),
            "--tls-ca-cert-file",
            str(caPath),
            "--tls-auth-clients",
            "no",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(tmp_path),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + PATIENCE
        while True:
            if process.poll() is not None:
                output = process.stdout.read().decode(errors="replace") if process.stdout else ""
                pytest.skip(f"redis-server cannot serve TLS here: {output[-300:]}")
            try:
                socket.create_connection(("127.0.0.1", port), 0.5).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "redis-server did not start listening"
                time.sleep(0.05)
        yield port, caPath
    finally:
        process.terminate()
        process.wait(PATIENCE)
        if process.stdout is not None:
            process.stdout.close()


@pytest_twisted.ensureDeferred
async def test_tlsWithCA(tlsRedis: tuple[int, Path]) -> None:
    """C{rediss://} with the server's CA connects, and the cache works through TLS."""
    port, ca = tlsRedis
    cache = RedisCache.fromURL(f"rediss://localhost:{port}/0?ca={ca}", reactor)
    try:
        await cache.set("config:inst1", sampleConfig(), 30)
        assert await cache.get("config:inst1") == sampleConfig()
    finally:
        await cache.close()


@pytest_twisted.ensureDeferred
async def test_tlsVerifiesCertificate(tlsRedis: tuple[int, Path]) -> None:
    """
    C{rediss://} refuses a server whose certificate is not signed by a
    trusted CA, or is not for the host name of the URL.
    """
    port, ca = tlsRedis
    for url, why in (
        (f"rediss://localhost:{port}/0", "certificate verify failed"),
        (f"rediss://127.0.0.1:{port}/0?ca={ca}", "IPAddressMismatch"),
    ):
        cache = RedisCache.fromURL(
            url, reactor, connectTimeout=1.0, replyTimeout=1.0, retryInterval=0
        )
        try:
            with pytest.raises(RedisUnavailable, match=why):
                await cache.ping()
        finally:
            await cache.close()


# -- the "redis" backend of --cache ---------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_backendKeepsConfigsLocal(observer: RedisCache) -> None:
    """
    Through C{--cache redis://...}, API-key entries go to Redis while the
    instance configurations (with their secrets) never do, unless
    C{configs=shared}.
    """
    prefix = f"mcpproxy-test:{secrets.token_hex(6)}:"
    url = f"{requireRedis()}?prefix={quote(prefix)}"
    entry = {"v": 1, "found": False}
    local = openCache(url, reactor)
    shared = openCache(f"{url}&configs=shared", reactor)
    try:
        await local.set("config:inst1", sampleConfig(), 60)
        await local.set("auth:hash1", entry, 60)
        assert await local.get("config:inst1") == sampleConfig()
        assert await observer.execute("EXISTS", prefix + "config:inst1") == 0
        assert await observer.execute("EXISTS", prefix + "auth:hash1") == 1
        assert await shared.get("auth:hash1") == entry
        assert await shared.get("config:inst1") is None
        await shared.set("config:inst1", sampleConfig(), 60)
        assert await observer.execute("EXISTS", prefix + "config:inst1") == 1
    finally:
        await shared.clear()
        await closeCache(local)
        await closeCache(shared)


@pytest_twisted.ensureDeferred
async def test_closeFailsWaitingCommands() -> None:
    """C{close} fails the commands still waiting for Redis at once, and leaves no timer."""
    cache = RedisCache(reactor, port=closedPort(), connectTimeout=5, replyTimeout=5)
    waiting = cache.get("k")
    started = time.monotonic()
    await cache.close()
    error, _ = await timed(waiting)
    assert isinstance(error, RedisUnavailable), error
    assert "closed" in str(error)
    assert time.monotonic() - started < 1.0
    assert cache._pending == set()


@pytest_twisted.ensureDeferred
async def test_callerMayCancel(blackHole: int) -> None:
    """A caller may cancel an operation: it fails with C{CancelledError}, not counted as an error."""
    cache = RedisCache(reactor, port=blackHole, connectTimeout=5, replyTimeout=5)
    try:
        waiting = cache.get("k")
        await sleep(0.1)
        waiting.cancel()
        with pytest.raises(defer.CancelledError):
            await waiting
        assert cache.stats["errors"] == 0
        assert cache._pending == set()
    finally:
        await cache.close()
