"""
Tests for L{mcp_proxy.cacheplugins}: the C{--cache} values, the discovery
of L{ICacheFactory} plugins (the built-in ones, and a toy backend written
into a temporary plugin folder), L{RoutedCache}, and the L{ICache} contract
suite of C{tests/test_cache.py} run on the toy backend and on
L{RoutedCache}.

To run the contract suite on a third-party backend, put its plugin on
C{sys.path} and name it in C{MCPPROXY_TEST_CACHE} (one or more
C{--cache} values, separated by spaces)::

    MCPPROXY_TEST_CACHE="mybackend:ARGS" pytest tests/test_cacheplugins.py

Its time-to-live tests then wait in real time, and C{clear()} is called
before and after each test: give it a namespace of its own.
"""

from __future__ import annotations

import inspect
import os
import sys
import textwrap
from pathlib import Path
from typing import Any, AsyncIterator, Callable, Iterator

import pytest
import pytest_twisted
import test_cache as contract
from twisted.internet import reactor
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.task import Clock, deferLater
from twisted.plugin import IPlugin
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from mcp_proxy.cache import MemoryCache
from mcp_proxy.cache_redis import RedisCache
from mcp_proxy.cacheplugins import (
    CacheDefaults,
    CacheFactoryPlugin,
    CacheSpecError,
    ICacheFactory,
    RoutedCache,
    closeCache,
    discoverCacheFactories,
    openCache,
    parseCacheSpec,
)
from mcp_proxy.config import SettingsError
from mcp_proxy.interfaces import ICache
from mcp_proxy.testing import CacheHarness, FailingCache

#: A third-party backend plugin, as its author would write it: a MemoryCache
#: behind a wrapper, sized by its arguments (C{toy:size=N}).
TOY_PLUGIN = '''
"""
A toy cache backend, for the plugin tests of mcp-proxy.
"""

from twisted.plugin import IPlugin
from zope.interface import implementer

from mcp_proxy.cacheplugins import ICacheFactory
from mcp_proxy.interfaces import ICache


@implementer(ICache)
class ToyCache:
    def __init__(self, inner, args):
        self.inner = inner
        self.args = args

    @property
    def stats(self):
        return self.inner.stats

    def get(self, key):
        return self.inner.get(key)

    def set(self, key, value, ttl=None):
        return self.inner.set(key, value, ttl)

    def delete(self, keys):
        return self.inner.delete(keys)

    def clear(self):
        return self.inner.clear()

    def close(self):
        self.closed = True


@implementer(IPlugin, ICacheFactory)
class ToyCacheFactory:
    name = "toy"
    description = "A MemoryCache behind a wrapper."

    def build(self, args, reactor, defaults):
        from mcp_proxy.cache import MemoryCache

        size = defaults.maxSize
        for option in filter(None, args.split(",")):
            key, _, value = option.partition("=")
            if key != "size":
                raise ValueError(f"unknown toy option {key!r}")
            size = int(value)
        inner = MemoryCache(reactor, maxSize=size, defaultTtl=defaults.defaultTtl)
        return ToyCache(inner, args)


toy = ToyCacheFactory()
'''


def writePlugin(root: Path, module: str, source: str) -> None:
    """
    Write a plugin module into C{root/twisted/plugins/}, a plugin folder
    once C{root} is on C{sys.path} (no C{__init__.py} in it).
    """
    folder = root / "twisted" / "plugins"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{module}.py").write_text(textwrap.dedent(source))


@pytest.fixture
def pluginRoot(tmp_path: Path) -> Iterator[Path]:
    """
    A temporary folder on C{sys.path}, holding the toy backend's plugin;
    after the test it leaves C{sys.path}, the plugin search path and
    C{sys.modules}.
    """
    import twisted.plugins

    root = tmp_path / "site"
    writePlugin(root, "toy_cache", TOY_PLUGIN)
    sys.path.insert(0, str(root))
    try:
        yield root
    finally:
        sys.path.remove(str(root))
        folder = str(root / "twisted" / "plugins")
        while folder in twisted.plugins.__path__:
            twisted.plugins.__path__.remove(folder)
        for name in [n for n in sys.modules if n.startswith("twisted.plugins.")]:
            module = sys.modules[name]
            if getattr(module, "__file__", "").startswith(str(root)):
                del sys.modules[name]


# -- --cache values ----------------------------------------------------------------


class ParseCacheSpecTests(SynchronousTestCase):
    """
    L{parseCacheSpec} finds the backend of a C{--cache} value.
    """

    def test_specs(self) -> None:
        """Names, C{NAME:ARGS}, and URLs by their scheme."""
        cases = {
            "": ("memory", ""),
            "  ": ("memory", ""),
            "memory": ("memory", ""),
            "redis://127.0.0.1:6379/0": ("redis", "redis://127.0.0.1:6379/0"),
            "REDISS://h/1": ("redis", "REDISS://h/1"),
            " redis://h ": ("redis", "redis://h"),
            "toy:size=5": ("toy", "size=5"),
            "toy:a:b": ("toy", "a:b"),
            "toy:": ("toy", ""),
            "memcached://h:11211": ("memcached", "memcached://h:11211"),
        }
        for spec, expected in cases.items():
            self.assertEqual(parseCacheSpec(spec), expected, spec)


# -- the built-in backends ---------------------------------------------------------


class BuiltInBackendTests(SynchronousTestCase):
    """
    The C{"memory"} and C{"redis"} plugins of C{twisted/plugins/mcpproxy_caches.py}.
    """

    def test_discovered(self) -> None:
        """Both built-in backends are found as plugins, and provide the interfaces."""
        factories = discoverCacheFactories()
        for name in ("memory", "redis"):
            self.assertEqual(len(factories[name]), 1)
            factory = factories[name][0]
            self.assertTrue(verifyObject(ICacheFactory, factory))
            self.assertTrue(IPlugin.providedBy(factory))
            self.assertEqual(factory.name, name)
            self.assertIsInstance(factory.description, str)

    def test_memoryDefault(self) -> None:
        """No value, or C{memory}, gives a L{MemoryCache} of the given size and ttl."""
        clock = Clock()
        for spec in ("", "memory"):
            cache = openCache(spec, clock, maxSize=7, defaultTtl=9.0)
            self.assertIsInstance(cache, MemoryCache)
            self.assertTrue(verifyObject(ICache, cache))
            assert isinstance(cache, MemoryCache)
            self.assertEqual((cache.maxSize, cache.defaultTtl), (7, 9.0))
            self.assertIs(cache.clock, clock)

    def test_memoryTakesNoArguments(self) -> None:
        """C{memory:ANYTHING} is refused."""
        self.assertRaises(CacheSpecError, openCache, "memory:big", Clock())

    def test_redisURL(self) -> None:
        """
        A C{redis://} value with C{configs=shared} gives a L{RedisCache} for
        it, with the given default ttl.
        """
        cache = openCache(
            "redis://:pw@127.0.0.1:6390/2?prefix=p:&configs=shared", reactor, defaultTtl=42
        )
        assert isinstance(cache, RedisCache)
        self.assertTrue(verifyObject(ICache, cache))
        self.assertEqual((cache.port, cache.db, cache.password), (6390, 2, "pw"))
        self.assertEqual((cache.prefix, cache.defaultTtl, cache.tls), ("p:", 42, False))
        tls = openCache("rediss://h?configs=shared", reactor)
        assert isinstance(tls, RedisCache)
        self.assertTrue(tls.tls)

    def test_redisConfigsLocal(self) -> None:
        """
        By default (C{configs=local}), the instance configurations stay in
        this process and the rest is shared through Redis.
        """
        for spec in ("redis://h/0?prefix=p:", "redis://h/0?configs=local&prefix=p:"):
            cache = openCache(spec, Clock(), maxSize=5, defaultTtl=9)
            assert isinstance(cache, RoutedCache)
            self.assertTrue(verifyObject(ICache, cache))
            local = cache.cacheFor("config:inst1")
            assert isinstance(local, MemoryCache)
            self.assertEqual((local.maxSize, local.defaultTtl), (5, 9))
            shared = cache.cacheFor("auth:hash")
            assert isinstance(shared, RedisCache)
            self.assertEqual((shared.prefix, shared.defaultTtl), ("p:", 9))

    def test_redisRefusals(self) -> None:
        """Bad Redis values are refused as settings errors that never show the password."""
        for spec in (
            "redis:127.0.0.1:6379",
            "redis://:pw1234@h/0?configs=elsewhere",
            "redis://:pw1234@h/x",
            "redis://:pw1234@h/0?nope=1",
        ):
            with self.assertRaises(CacheSpecError, msg=spec) as caught:
                openCache(spec, reactor)
            self.assertIsInstance(caught.exception, SettingsError)
            self.assertIsInstance(caught.exception, ValueError)
            self.assertNotIn("pw1234", str(caught.exception))

    def test_unknownName(self) -> None:
        """An unknown backend is refused, listing the available ones, not the arguments."""
        with self.assertRaises(CacheSpecError) as caught:
            openCache("nosuch:secretargs", reactor)
        message = str(caught.exception)
        self.assertIn("'nosuch'", message)
        self.assertIn("available: memory, redis", message)
        self.assertNotIn("secretargs", message)
        with self.assertRaises(CacheSpecError) as caught:
            openCache("memcached://h", reactor)
        self.assertIn("'memcached'", str(caught.exception))

    def test_lazyPluginModule(self) -> None:
        """The built-in plugins import their backend only when a cache is built."""
        factory = discoverCacheFactories()["redis"][0]
        self.assertIsInstance(factory, CacheFactoryPlugin)
        assert isinstance(factory, CacheFactoryPlugin)
        self.assertEqual(
            (factory.module, factory.function), ("mcp_proxy.cache_redis", "buildRedisCache")
        )


# -- third-party backends ------------------------------------------------------------


def test_toyPluginDiscovered(pluginRoot: Path) -> None:
    """A plugin in a C{twisted/plugins} folder put on C{sys.path} is found by its name."""
    factories = discoverCacheFactories()
    assert [f.name for f in factories["toy"]] == ["toy"]
    assert verifyObject(ICacheFactory, factories["toy"][0])
    assert {"memory", "redis", "toy"} <= set(factories)


def test_toyPluginOpened(pluginRoot: Path) -> None:
    """C{toy:ARGS} builds the toy backend with its arguments and the defaults."""
    clock = Clock()
    cache: Any = openCache("toy:size=2", clock, defaultTtl=5)
    assert verifyObject(ICache, cache)
    assert cache.args == "size=2"
    assert (cache.inner.maxSize, cache.inner.defaultTtl) == (2, 5)
    assert cache.inner.clock is clock
    cache.set("a", 1)
    cache.set("b", 2)
    cache.set("c", 3)
    assert len(cache.inner) == 2
    closeCache(cache)
    assert cache.closed


def test_toyArgumentsRefused(pluginRoot: Path) -> None:
    """A C{ValueError} of a plugin's C{build} becomes a L{CacheSpecError}."""
    with pytest.raises(CacheSpecError, match="the 'toy' cache backend: unknown toy option"):
        openCache("toy:colour=blue", Clock())


def test_unknownListsPlugins(pluginRoot: Path) -> None:
    """The list of available backends includes third-party ones."""
    with pytest.raises(CacheSpecError, match="available: memory, redis, toy"):
        openCache("nosuch", Clock())


def test_nameClash(pluginRoot: Path) -> None:
    """Two plugins of one name are refused by name, rather than one picked."""
    writePlugin(pluginRoot, "toy_again", TOY_PLUGIN.replace("ToyCacheFactory", "OtherToy"))
    with pytest.raises(CacheSpecError, match="several plugins are named 'toy'"):
        openCache("toy:", Clock())
    assert isinstance(openCache("memory", Clock()), MemoryCache)


def test_brokenPluginHidesNothingElse(pluginRoot: Path) -> None:
    """A plugin module that fails to import does not hide the other backends."""
    writePlugin(pluginRoot, "broken_cache", "import no_such_module_anywhere\n")
    factories = discoverCacheFactories()
    assert {"memory", "redis", "toy"} <= set(factories)


# -- RoutedCache ---------------------------------------------------------------------


class RoutedCacheTests(SynchronousTestCase):
    """
    L{RoutedCache} sends each key to the cache of its prefix.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.configs = MemoryCache(self.clock)
        self.others = MemoryCache(self.clock)
        self.cache = RoutedCache(routes=(("config:", self.configs),), default=self.others)

    def test_routes(self) -> None:
        """Keys of a route's prefix go to its cache, the others to the default."""
        self.cache.set("config:i", "c")
        self.cache.set("auth:h", "a")
        self.assertEqual(self.successResultOf(self.configs.get("config:i")), "c")
        self.assertEqual(self.successResultOf(self.others.get("auth:h")), "a")
        self.assertIsNone(self.successResultOf(self.others.get("config:i")))
        self.assertEqual(self.successResultOf(self.cache.get("config:i")), "c")

    def test_firstRouteWins(self) -> None:
        """Routes are tried in order."""
        special = MemoryCache(self.clock)
        cache = RoutedCache(routes=(("a:b", special), ("a:", self.configs)), default=self.others)
        self.assertIs(cache.cacheFor("a:bc"), special)
        self.assertIs(cache.cacheFor("a:c"), self.configs)
        self.assertIs(cache.cacheFor("b"), self.others)

    def test_deleteSplits(self) -> None:
        """C{delete} removes each key from its own cache."""
        self.cache.set("config:i", 1)
        self.cache.set("auth:h", 2)
        self.cache.set("auth:keep", 3)
        self.assertIsNone(self.successResultOf(self.cache.delete(["config:i", "auth:h"])))
        self.assertEqual(len(self.configs), 0)
        self.assertEqual(len(self.others), 1)

    def test_statsSummed(self) -> None:
        """The counters are the sums of both caches'."""
        self.cache.set("config:i", 1)
        self.cache.set("auth:h", 2)
        self.cache.get("auth:h")
        self.cache.get("config:nothing")
        self.assertEqual(self.cache.stats["sets"], 2)
        self.assertEqual(self.cache.stats["hits"], 1)
        self.assertEqual(self.cache.stats["misses"], 1)

    def test_failuresPassThrough(self) -> None:
        """A failing cache fails the operations routed to it, and C{clear}."""
        cache = RoutedCache(routes=(("config:", FailingCache()),), default=self.others)
        self.failureResultOf(cache.get("config:i"), ConnectionError)
        self.assertIsNone(self.successResultOf(cache.get("auth:h")))
        self.failureResultOf(cache.delete(["config:i", "auth:h"]), ConnectionError)
        self.failureResultOf(cache.clear(), ConnectionError)

    def test_closeClosesAll(self) -> None:
        """C{close} (through L{closeCache}) closes the caches that can be closed."""
        redis = RedisCache(self.clock, port=1)
        cache = RoutedCache(routes=(("config:", self.configs),), default=redis)
        self.assertIsNone(self.successResultOf(closeCache(cache)))
        self.failureResultOf(redis.get("k"))

    def test_closeCacheWithoutClose(self) -> None:
        """L{closeCache} of a cache without C{close} does nothing."""
        self.assertIsNone(self.successResultOf(closeCache(self.configs)))

    def test_defaults(self) -> None:
        """L{CacheDefaults} has the defaults of L{openCache}."""
        self.assertEqual(CacheDefaults(), CacheDefaults(maxSize=1000, defaultTtl=300.0))


# -- the ICache contract suite on plugin backends ---------------------------------------

HarnessMaker = Callable[[float], "Deferred[CacheHarness] | CacheHarness"]


def toyHarness(defaultTtl: float) -> CacheHarness:
    clock = Clock()
    return CacheHarness(openCache("toy:", clock, defaultTtl=defaultTtl), clock.advance)


def routedHarness(defaultTtl: float) -> CacheHarness:
    clock = Clock()
    cache = RoutedCache(
        routes=(("config:", MemoryCache(clock, defaultTtl=defaultTtl)),),
        default=MemoryCache(clock, defaultTtl=defaultTtl),
    )
    return CacheHarness(cache, clock.advance)


def specHarness(spec: str) -> HarnessMaker:
    """
    A harness maker for a C{--cache} value of a backend whose time cannot
    be moved: C{advance} waits.
    """

    async def make(defaultTtl: float) -> CacheHarness:
        cache = openCache(spec, reactor, defaultTtl=defaultTtl)
        await maybeDeferred(cache.clear)

        async def close() -> None:
            try:
                await maybeDeferred(cache.clear)
            finally:
                await closeCache(cache)

        return CacheHarness(
            cache,
            lambda seconds: deferLater(reactor, seconds, lambda: None),
            lambda: Deferred.fromCoroutine(close()),
        )

    return lambda defaultTtl: Deferred.fromCoroutine(make(defaultTtl))


PLUGIN_PROVIDERS = [
    pytest.param(toyHarness, id="toy"),
    pytest.param(routedHarness, id="routed"),
    *(
        pytest.param(specHarness(spec), id=spec.partition(":")[0])
        for spec in os.environ.get("MCPPROXY_TEST_CACHE", "").split()
    ),
]


@pytest_twisted.async_yield_fixture(params=PLUGIN_PROVIDERS)
async def cacheFactory(request: Any, pluginRoot: Path) -> AsyncIterator[Any]:
    """
    The C{cacheFactory} of the contract suite, for the backends here; the
    toy plugin is on C{sys.path}.
    """
    made: list[CacheHarness] = []

    async def make(defaultTtl: float = 300.0) -> CacheHarness:
        harness: CacheHarness = await maybeDeferred(request.param, defaultTtl)
        made.append(harness)
        return harness

    yield lambda **kw: Deferred.fromCoroutine(make(**kw))
    for harness in made:
        await maybeDeferred(harness.close)


# Every contract test of tests/test_cache.py, run here with the cacheFactory
# above.
globals().update(
    {
        name: test
        for name, test in vars(contract).items()
        if name.startswith("test_") and "cacheFactory" in inspect.signature(test).parameters
    }
)
