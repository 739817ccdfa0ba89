"""
Tests for L{mcp_proxy.cache}: the L{ICache} contract, run against every
provider, then what only L{MemoryCache} promises (LRU order, exact
counters, synchronous results) and L{SingleFlight}.

To run the contract against another provider, add one line to
L{CACHE_PROVIDERS}: a C{pytest.param} of a function
C{(defaultTtl) -> CacheHarness} (it may return a Deferred).  Size limits
are not part of the contract: a shared cache may bound itself otherwise.
"""

from __future__ import annotations

from typing import Any, AsyncIterator, Callable

import pytest
import pytest_twisted
from twisted.internet.defer import CancelledError, Deferred, maybeDeferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from mcp_proxy.cache import MemoryCache, SingleFlight
from mcp_proxy.interfaces import ICache
from mcp_proxy.models import InstanceConfig, UpstreamConfig
from mcp_proxy.testing import CacheHarness, memoryCacheHarness, redisCacheHarness

CACHE_PROVIDERS = [
    pytest.param(memoryCacheHarness, id="memory"),
    pytest.param(redisCacheHarness, id="redis"),
]

HarnessFactory = Callable[..., "Deferred[CacheHarness]"]


@pytest_twisted.async_yield_fixture(params=CACHE_PROVIDERS)
async def cacheFactory(request: Any) -> AsyncIterator[HarnessFactory]:
    """
    A factory of harnesses of one provider; every harness made is closed
    after the test.
    """
    made: list[CacheHarness] = []

    async def make(defaultTtl: float = 300.0) -> CacheHarness:
        harness: CacheHarness = await maybeDeferred(request.param, defaultTtl)
        made.append(harness)
        return harness

    yield lambda **kw: Deferred.fromCoroutine(make(**kw))
    for harness in made:
        await maybeDeferred(harness.close)


def sampleConfig() -> InstanceConfig:
    """
    An instance configuration like the one the config loader caches.
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
                args=("-y", "server-files"),
                url=None,
                env={"TOKEN": "secret"},
                authType="NONE",
                toolNames=frozenset({"read", "write"}),
            ),
        ),
    )


# -- the contract: every provider -------------------------------------------


@pytest_twisted.ensureDeferred
async def test_providesICache(cacheFactory: HarnessFactory) -> None:
    """The provider fully implements L{ICache}."""
    h = await cacheFactory()
    assert verifyObject(ICache, h.cache)
    for name in ("hits", "misses", "sets", "evictions", "deletes"):
        assert isinstance(h.cache.stats[name], int)


@pytest_twisted.ensureDeferred
async def test_missIsNone(cacheFactory: HarnessFactory) -> None:
    """Reading a key never set gives C{None}."""
    h = await cacheFactory()
    assert await h.cache.get("auth:nothing") is None


@pytest.mark.parametrize(
    "value",
    [
        {"found": True, "keyId": "k1", "expiresAt": 1234.5, "tags": ["a", "b"]},
        ["a", 1, 2.5, True, None],
        "text",
        42,
        2.5,
        True,
    ],
    ids=["dict", "list", "str", "int", "float", "bool"],
)
@pytest_twisted.ensureDeferred
async def test_roundTrip(cacheFactory: HarnessFactory, value: Any) -> None:
    """A stored value reads back equal."""
    h = await cacheFactory()
    assert await h.cache.set("k", value, None) is None
    assert await h.cache.get("k") == value


@pytest_twisted.ensureDeferred
async def test_roundTripFrozenAttrs(cacheFactory: HarnessFactory) -> None:
    """An L{InstanceConfig}, nested frozen attrs included, reads back equal."""
    h = await cacheFactory()
    await h.cache.set("config:inst1", sampleConfig(), None)
    assert await h.cache.get("config:inst1") == sampleConfig()


@pytest_twisted.ensureDeferred
async def test_setReplaces(cacheFactory: HarnessFactory) -> None:
    """Setting a key again replaces its value."""
    h = await cacheFactory()
    await h.cache.set("k", "old", None)
    await h.cache.set("k", "new", None)
    assert await h.cache.get("k") == "new"


@pytest_twisted.ensureDeferred
async def test_keysAreDistinct(cacheFactory: HarnessFactory) -> None:
    """Keys that share a prefix are separate entries."""
    h = await cacheFactory()
    await h.cache.set("auth:ab", "short", None)
    await h.cache.set("auth:abc", "long", None)
    assert await h.cache.get("auth:ab") == "short"
    assert await h.cache.get("auth:abc") == "long"
    assert await h.cache.get("auth:a") is None


@pytest_twisted.ensureDeferred
async def test_ttlExpires(cacheFactory: HarnessFactory) -> None:
    """An entry lives for its ttl, then reads as a miss."""
    h = await cacheFactory()
    await h.cache.set("k", "v", 2)
    await maybeDeferred(h.advance, 1)
    assert await h.cache.get("k") == "v"
    await maybeDeferred(h.advance, 1.5)
    assert await h.cache.get("k") is None


@pytest_twisted.ensureDeferred
async def test_defaultTtl(cacheFactory: HarnessFactory) -> None:
    """A ttl of C{None} means the provider's default ttl."""
    h = await cacheFactory(defaultTtl=2)
    await h.cache.set("k", "v", None)
    await maybeDeferred(h.advance, 1)
    assert await h.cache.get("k") == "v"
    await maybeDeferred(h.advance, 1.5)
    assert await h.cache.get("k") is None


@pytest_twisted.ensureDeferred
async def test_setRenewsTtl(cacheFactory: HarnessFactory) -> None:
    """Setting a key again starts its ttl again."""
    h = await cacheFactory()
    await h.cache.set("k", "v", 2)
    await maybeDeferred(h.advance, 1.5)
    await h.cache.set("k", "v2", 2)
    await maybeDeferred(h.advance, 1.5)
    assert await h.cache.get("k") == "v2"


@pytest_twisted.ensureDeferred
async def test_zeroTtlStoresNothing(cacheFactory: HarnessFactory) -> None:
    """A ttl of 0 stores nothing and removes the previous entry."""
    h = await cacheFactory()
    await h.cache.set("k", "v", None)
    await h.cache.set("k", "v2", 0)
    assert await h.cache.get("k") is None


@pytest_twisted.ensureDeferred
async def test_noneRejected(cacheFactory: HarnessFactory) -> None:
    """Storing C{None} fails with C{ValueError}: it would read as a miss."""
    h = await cacheFactory()
    with pytest.raises(ValueError):
        await h.cache.set("k", None, None)


@pytest_twisted.ensureDeferred
async def test_delete(cacheFactory: HarnessFactory) -> None:
    """C{delete} removes the given keys, ignores absent ones, keeps others."""
    h = await cacheFactory()
    for k in ("a", "b", "c"):
        await h.cache.set(k, k.upper(), None)
    assert await h.cache.delete(["a", "b", "absent"]) is None
    assert await h.cache.get("a") is None
    assert await h.cache.get("b") is None
    assert await h.cache.get("c") == "C"


@pytest_twisted.ensureDeferred
async def test_deleteAcceptsAnyIterable(cacheFactory: HarnessFactory) -> None:
    """C{delete} takes a generator or a set as well as a list."""
    h = await cacheFactory()
    await h.cache.set("a", 1, None)
    await h.cache.set("b", 2, None)
    await h.cache.delete(k for k in ["a"])
    await h.cache.delete({"b"})
    assert await h.cache.get("a") is None
    assert await h.cache.get("b") is None


@pytest_twisted.ensureDeferred
async def test_deleteRejectsStr(cacheFactory: HarnessFactory) -> None:
    """C{delete} refuses a bare C{str}, which would be read as its characters."""
    h = await cacheFactory()
    await h.cache.set("ab", 1, None)
    with pytest.raises(TypeError):
        await h.cache.delete("ab")
    assert await h.cache.get("ab") == 1


@pytest_twisted.ensureDeferred
async def test_clear(cacheFactory: HarnessFactory) -> None:
    """C{clear} removes every entry."""
    h = await cacheFactory()
    await h.cache.set("a", 1, None)
    await h.cache.set("b", 2, None)
    assert await h.cache.clear() is None
    assert await h.cache.get("a") is None
    assert await h.cache.get("b") is None


@pytest_twisted.ensureDeferred
async def test_statsCount(cacheFactory: HarnessFactory) -> None:
    """Hits, misses, sets and deletes are counted."""
    h = await cacheFactory()
    before = dict(h.cache.stats)
    await h.cache.set("a", 1, None)
    await h.cache.get("a")
    await h.cache.get("a")
    await h.cache.get("b")
    await h.cache.delete(["a"])
    after = h.cache.stats
    assert after["sets"] - before["sets"] == 1
    assert after["hits"] - before["hits"] == 2
    assert after["misses"] - before["misses"] == 1
    assert after["deletes"] - before["deletes"] == 1


# -- MemoryCache only ----------------------------------------------------------


class MemoryCacheTests(SynchronousTestCase):
    """
    What L{MemoryCache} promises beyond the contract.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.cache = MemoryCache(self.clock, maxSize=3, defaultTtl=10)

    def test_resultsAlreadyFired(self) -> None:
        """Every operation returns an already-fired Deferred."""
        self.assertIsNone(self.successResultOf(self.cache.set("a", 1)))
        self.assertEqual(self.successResultOf(self.cache.get("a")), 1)
        self.assertIsNone(self.successResultOf(self.cache.delete(["a"])))
        self.assertIsNone(self.successResultOf(self.cache.clear()))

    def test_evictsLeastRecentlyUsed(self) -> None:
        """The entry evicted is the least recently read or written."""
        for k in "abc":
            self.cache.set(k, k)
        self.cache.get("a")
        self.cache.set("d", "d")
        self.assertIsNone(self.successResultOf(self.cache.get("b")))
        for k in "acd":
            self.assertEqual(self.successResultOf(self.cache.get(k)), k)
        self.assertEqual(self.cache.stats["evictions"], 1)
        self.assertEqual(len(self.cache), 3)

    def test_setRefreshesRecency(self) -> None:
        """Writing an existing key makes it the most recently used."""
        for k in "abc":
            self.cache.set(k, k)
        self.cache.set("a", "A")
        self.cache.set("d", "d")
        self.assertIsNone(self.successResultOf(self.cache.get("b")))
        self.assertEqual(self.successResultOf(self.cache.get("a")), "A")

    def test_replaceDoesNotEvict(self) -> None:
        """Writing an existing key of a full cache evicts nothing."""
        for k in "abc":
            self.cache.set(k, k)
        self.cache.set("b", "B")
        self.assertEqual(len(self.cache), 3)
        self.assertEqual(self.cache.stats["evictions"], 0)

    def test_expiredDroppedOnRead(self) -> None:
        """An expired entry read is dropped and counted as an expiration."""
        self.cache.set("a", 1, 5)
        self.clock.advance(5)
        self.assertIsNone(self.successResultOf(self.cache.get("a")))
        self.assertEqual(len(self.cache), 0)
        self.assertEqual(self.cache.stats["expirations"], 1)
        self.assertEqual(self.cache.stats["misses"], 1)

    def test_expiresExactlyAtTtl(self) -> None:
        """An entry is alive just before its ttl and gone at it."""
        self.cache.set("a", 1, 5)
        self.clock.advance(4.999)
        self.assertEqual(self.successResultOf(self.cache.get("a")), 1)
        self.clock.advance(0.001)
        self.assertIsNone(self.successResultOf(self.cache.get("a")))

    def test_expiredVictimCountsAsExpiration(self) -> None:
        """Pushing out an already expired entry is an expiration, not an eviction."""
        self.cache.set("a", 1, 1)
        self.cache.set("b", 2)
        self.cache.set("c", 3)
        self.clock.advance(2)
        self.cache.set("d", 4)
        self.assertEqual(self.cache.stats["expirations"], 1)
        self.assertEqual(self.cache.stats["evictions"], 0)

    def test_readDoesNotExtendTtl(self) -> None:
        """The ttl is absolute from the write: reads do not extend it."""
        self.cache.set("a", 1, 5)
        for _ in range(4):
            self.clock.advance(1)
            self.successResultOf(self.cache.get("a"))
        self.clock.advance(1)
        self.assertIsNone(self.successResultOf(self.cache.get("a")))

    def test_deleteCountsOnlyPresent(self) -> None:
        """C{deletes} counts entries actually removed."""
        self.cache.set("a", 1)
        self.cache.delete(["a", "b"])
        self.assertEqual(self.cache.stats["deletes"], 1)

    def test_maxSizeValidated(self) -> None:
        """A C{maxSize} under 1 is refused."""
        self.assertRaises(ValueError, MemoryCache, self.clock, maxSize=0)

    def test_statsHaveExpirations(self) -> None:
        """The counters include C{expirations} besides the interface's."""
        self.assertEqual(
            set(self.cache.stats),
            {"hits", "misses", "sets", "evictions", "deletes", "expirations"},
        )


class SingleFlightTests(SynchronousTestCase):
    """
    L{SingleFlight} shares one load among concurrent callers.
    """

    def setUp(self) -> None:
        self.flights: SingleFlight[str, Any] = SingleFlight()
        self.loads: list[Deferred[Any]] = []

    def load(self) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        self.loads.append(d)
        return d

    def test_oneLoadForConcurrentCallers(self) -> None:
        """Callers of a key in flight wait for its one load."""
        d1 = self.flights.run("k", self.load)
        d2 = self.flights.run("k", self.load)
        self.assertEqual(len(self.loads), 1)
        self.assertIn("k", self.flights)
        self.loads[0].callback({"v": 1})
        self.assertEqual(self.successResultOf(d1), {"v": 1})
        self.assertEqual(self.successResultOf(d2), {"v": 1})
        self.assertNotIn("k", self.flights)

    def test_eachCallerOwnDeferred(self) -> None:
        """One caller's callbacks do not change what another receives."""
        d1 = self.flights.run("k", self.load)
        d2 = self.flights.run("k", self.load)
        self.assertIsNot(d1, d2)
        d1.addCallback(lambda _: "changed by d1")
        self.loads[0].callback("value")
        self.assertEqual(self.successResultOf(d1), "changed by d1")
        self.assertEqual(self.successResultOf(d2), "value")

    def test_failureToEveryCaller(self) -> None:
        """A failed load fails every caller, each with its own Failure."""
        d1 = self.flights.run("k", self.load)
        d2 = self.flights.run("k", self.load)
        self.loads[0].errback(ZeroDivisionError("boom"))
        f1 = self.failureResultOf(d1, ZeroDivisionError)
        f2 = self.failureResultOf(d2, ZeroDivisionError)
        self.assertIsNot(f1, f2)

    def test_cancelOneCaller(self) -> None:
        """Cancelling one caller leaves the others waiting for the load."""
        d1 = self.flights.run("k", self.load)
        d2 = self.flights.run("k", self.load)
        d1.cancel()
        self.failureResultOf(d1, CancelledError)
        self.assertNoResult(d2)
        self.loads[0].callback(7)
        self.assertEqual(self.successResultOf(d2), 7)

    def test_newLoadAfterLanding(self) -> None:
        """Once a load has landed, the next caller starts a new one."""
        self.flights.run("k", self.load)
        self.loads[0].callback(1)
        d = self.flights.run("k", self.load)
        self.assertEqual(len(self.loads), 2)
        self.assertNoResult(d)

    def test_keysIndependent(self) -> None:
        """Different keys load separately."""
        self.flights.run("a", self.load)
        self.flights.run("b", self.load)
        self.assertEqual(len(self.loads), 2)
        self.assertEqual(len(self.flights), 2)

    def test_synchronousLoad(self) -> None:
        """A load that returns a plain value or raises is accepted."""
        self.assertEqual(self.successResultOf(self.flights.run("a", lambda: 5)), 5)
        self.failureResultOf(self.flights.run("b", lambda: 1 / 0), ZeroDivisionError)
        self.assertEqual(len(self.flights), 0)

    def test_reentrantCallerStartsNewLoad(self) -> None:
        """A caller's callback asking for the same key again starts a new load."""
        again: list[Deferred[Any]] = []
        d = self.flights.run("k", self.load)
        d.addCallback(lambda _: again.append(self.flights.run("k", self.load)))
        self.loads[0].callback(1)
        self.assertEqual(len(self.loads), 2)
        self.assertNoResult(again[0])
