"""
Cache backends as plugins, chosen with C{--cache}.

A backend is an L{ICacheFactory} plugin: an object providing C{IPlugin}
and L{ICacheFactory}, in a module of a C{twisted/plugins/} folder (with no
C{__init__.py}) of any C{sys.path} entry.  mcp-proxy ships two, in
C{twisted/plugins/mcpproxy_caches.py}: C{"memory"} and C{"redis"}.

L{openCache} turns a C{--cache} value into an L{ICache}:

  - C{"memory"} (or nothing): the in-memory LRU+TTL cache of this process;
  - C{"redis://..."}, C{"rediss://..."}: the backend named C{"redis"},
    given the whole URL (any other C{SCHEME://...} goes likewise to the
    backend named SCHEME);
  - C{"NAME:ARGS"} or C{"NAME"}: the backend named NAME, given ARGS.

This module is imported by the plugin modules, so it imports nothing heavy;
the backends' own modules are imported when a cache is built.
"""

from __future__ import annotations

import importlib
import re
import types
from typing import Any, Iterable, Optional

from attrs import define, frozen
from twisted.internet.defer import (
    Deferred,
    FirstError,
    fail,
    gatherResults,
    maybeDeferred,
    succeed,
)
from twisted.plugin import IPlugin, getPlugins, pluginPackagePaths
from twisted.python.failure import Failure
from twisted.python.reflect import fullyQualifiedName
from zope.interface import Attribute, Interface, implementer

from mcp_proxy.config import SettingsError
from mcp_proxy.interfaces import ICache

#: The backend of a C{--cache} value that names none.
DEFAULT_BACKEND = "memory"

#: URL schemes that go to a backend of another name.
URL_SCHEMES = {"rediss": "redis"}

_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")


class ICacheFactory(Interface):
    """
    Makes the caches of one backend.  Provided, together with
    C{twisted.plugin.IPlugin}, by the objects of a plugin module.
    """

    name = Attribute(
        """
        The backend's name in C{--cache NAME:ARGS} (C{str}, without
        C{":"}); also the URL scheme it takes.
        """
    )

    description = Attribute("""One line about the backend, for listings (C{str}).""")

    def build(args, reactor, defaults):  # type: ignore[misc,no-untyped-def]
        """
        Make a cache.  Do no I/O here: connect lazily, at the first
        operation, and fail operations (not C{build}) while the backend is
        unreachable.

        @param args: what follows C{NAME:} in the C{--cache} value, or the
            whole value when it is a URL (C{"redis://..."}); C{""} when
            there is nothing.  It may hold secrets: never log it.
        @type args: C{str}
        @param reactor: the reactor (C{IReactorTime}, C{IReactorTCP}, ...).
        @param defaults: a L{CacheDefaults}: the size and ttl the proxy's
            options ask for.
        @return: an L{ICache} provider, which may also have a C{close()}
            method (see L{closeCache}).
        @raise ValueError: when C{args} cannot be used; the message is shown
            to the user, so it must not contain a secret.
        """


@frozen
class CacheDefaults:
    """
    What the proxy's options ask of a cache; a backend applies what fits.

    @ivar maxSize: the most entries held (for bounded, in-process caches).
    @ivar defaultTtl: seconds an entry lives when C{set} is given C{None}.
    """

    maxSize: int = 1000
    defaultTtl: float = 300.0


class CacheSpecError(SettingsError):
    """
    A C{--cache} value names no backend, or its backend refused its
    arguments.
    """


@implementer(IPlugin, ICacheFactory)
@frozen
class CacheFactoryPlugin:
    """
    An L{ICacheFactory} that imports its backend only when a cache is
    built (like C{twisted.application.service.ServiceMaker}), so that a
    plugin module imports nothing but this module.

    @ivar name: the backend's name.
    @ivar module: the dotted name of the module with the build function.
    @ivar function: the name, in that module, of a function
        C{(args, reactor, defaults) -> ICache}, as L{ICacheFactory.build}.
    @ivar description: one line about the backend.
    """

    name: str
    module: str
    function: str
    description: str

    def build(self, args: str, reactor: Any, defaults: CacheDefaults) -> ICache:
        builder = getattr(importlib.import_module(self.module), self.function)
        cache: ICache = builder(args, reactor, defaults)
        return cache


def parseCacheSpec(spec: str) -> tuple[str, str]:
    """
    Split a C{--cache} value into a backend name and its arguments.

    @return: C{(name, args)}: C{("memory", "")} for C{""};
        C{("redis", spec)} for C{"redis://..."} and C{"rediss://..."};
        C{(NAME, ARGS)} for C{"NAME:ARGS"}; C{(NAME, "")} for C{"NAME"}.
    """
    spec = spec.strip()
    if not spec:
        return DEFAULT_BACKEND, ""
    url = _URL.match(spec)
    if url is not None:
        scheme = url.group(1).lower()
        return URL_SCHEMES.get(scheme, scheme), spec
    name, _, args = spec.partition(":")
    return name.strip(), args


def _pluginPackage() -> types.ModuleType:
    """
    C{twisted.plugins}, its search path brought up to date with
    C{sys.path}: Twisted fills it in only when C{twisted.plugins} is first
    imported, so that folders put on C{sys.path} later would be missed.
    """
    import twisted.plugins

    paths = twisted.plugins.__path__
    for path in pluginPackagePaths(twisted.plugins.__name__):
        if path not in paths:
            paths.append(path)
    return twisted.plugins


def discoverCacheFactories(
    package: Optional[types.ModuleType] = None,
) -> dict[str, list[ICacheFactory]]:
    """
    Every L{ICacheFactory} plugin, by name.

    @param package: the plugin package to search; by default
        C{twisted.plugins}, which covers the C{twisted/plugins/} folders of
        every C{sys.path} entry.
    @return: name to the factories of that name (more than one when
        plugins clash).
    """
    found: dict[str, list[ICacheFactory]] = {}
    for factory in getPlugins(ICacheFactory, _pluginPackage() if package is None else package):
        found.setdefault(factory.name, []).append(factory)
    return found


def openCache(
    spec: str,
    reactor: Any,
    maxSize: int = 1000,
    defaultTtl: float = 300.0,
    package: Optional[types.ModuleType] = None,
) -> ICache:
    """
    Make the cache a C{--cache} value asks for; see L{parseCacheSpec}.

    @param reactor: given to the backend.
    @param maxSize: the most entries of a bounded (in-process) cache.
    @param defaultTtl: seconds an entry lives when C{set} is given C{None}.
    @param package: where to look for plugins (see
        L{discoverCacheFactories}).
    @return: an L{ICache} provider; give it to L{closeCache} at the
        service's stop.
    @raise CacheSpecError: when no backend has the name, several have it,
        or the backend refuses the arguments (the message never repeats
        the arguments, which may hold a password).
    """
    name, args = parseCacheSpec(spec)
    factories = discoverCacheFactories(package)
    candidates = factories.get(name, [])
    if not candidates:
        available = ", ".join(sorted(factories)) or "none"
        raise CacheSpecError(
            f"--cache: unknown cache backend {name!r}; available: {available} "
            "(a backend is an ICacheFactory plugin in a twisted/plugins folder)"
        )
    if len(candidates) > 1:
        owners = ", ".join(sorted(fullyQualifiedName(type(f)) for f in candidates))
        raise CacheSpecError(f"--cache: several plugins are named {name!r}: {owners}")
    try:
        return candidates[0].build(args, reactor, CacheDefaults(maxSize, defaultTtl))
    except CacheSpecError:
        raise
    except (ValueError, TypeError) as e:
        raise CacheSpecError(f"--cache: the {name!r} cache backend: {e}") from e


def closeCache(cache: object) -> Deferred[None]:
    """
    Release a cache made by L{openCache}: call its C{close()} when it has
    one (a shared backend's connections), else nothing.

    @return: a Deferred firing with C{None} when done.
    """
    close = getattr(cache, "close", None)
    if not callable(close):
        return succeed(None)
    return maybeDeferred(close).addCallback(lambda _: None)


# -- the built-in in-memory backend ----------------------------------------------


def buildMemoryCache(args: str, reactor: Any, defaults: CacheDefaults) -> ICache:
    """
    The C{"memory"} backend: a L{mcp_proxy.cache.MemoryCache} of
    C{defaults.maxSize} entries, per process.  It takes no arguments.
    """
    from mcp_proxy.cache import MemoryCache

    if args.strip():
        raise ValueError("the memory cache takes no arguments")
    return MemoryCache(reactor, maxSize=defaults.maxSize, defaultTtl=defaults.defaultTtl)


# -- composing backends -----------------------------------------------------------


@implementer(ICache)
@define
class RoutedCache:
    """
    An L{ICache} that sends each key to the cache of the first route whose
    prefix the key starts with, or else to a default cache.  E.g. the
    C{"redis"} backend's C{configs=local} keeps C{"config:"} keys (which
    hold upstream secrets) in this process and shares the others.

    @ivar routes: C{(key prefix, cache)} pairs, tried in order.
    @ivar default: the cache of the other keys.
    """

    routes: tuple[tuple[str, ICache], ...]
    default: ICache

    @property
    def caches(self) -> list[ICache]:
        """
        Every distinct cache, the default first.
        """
        caches: list[ICache] = [self.default]
        for _, cache in self.routes:
            if all(cache is not c for c in caches):
                caches.append(cache)
        return caches

    @property
    def stats(self) -> dict[str, int]:
        """
        The sums of the counters of every cache (a new C{dict} each time).
        """
        total: dict[str, int] = {}
        for cache in self.caches:
            for name, count in cache.stats.items():
                total[name] = total.get(name, 0) + count
        return total

    def cacheFor(self, key: str) -> ICache:
        """
        The cache that holds C{key}.
        """
        for prefix, cache in self.routes:
            if key.startswith(prefix):
                return cache
        return self.default

    def get(self, key: str) -> Deferred[Any]:
        result: Deferred[Any] = maybeDeferred(self.cacheFor(key).get, key)
        return result

    def set(self, key: str, value: Any, ttl: Optional[float] = None) -> Deferred[None]:
        result: Deferred[None] = maybeDeferred(self.cacheFor(key).set, key, value, ttl)
        return result

    def delete(self, keys: Iterable[str]) -> Deferred[None]:
        if isinstance(keys, str):
            return fail(TypeError("delete() takes an iterable of keys, not a str"))
        groups: dict[int, tuple[ICache, list[str]]] = {}
        for key in keys:
            cache = self.cacheFor(key)
            groups.setdefault(id(cache), (cache, []))[1].append(key)
        return self._all(maybeDeferred(cache.delete, group) for cache, group in groups.values())

    def clear(self) -> Deferred[None]:
        return self._all(maybeDeferred(cache.clear) for cache in self.caches)

    def close(self) -> Deferred[None]:
        """
        Close every cache that has a C{close()}; see L{closeCache}.
        """
        return self._all(closeCache(cache) for cache in self.caches)

    @staticmethod
    def _all(results: Iterable[Deferred[Any]]) -> Deferred[None]:
        def firstFailure(failure: Failure) -> Failure:
            # gatherResults wraps the first failure in a FirstError.
            error = failure.value
            return error.subFailure if isinstance(error, FirstError) else failure

        done = gatherResults(list(results), consumeErrors=True)
        return done.addCallbacks(lambda _: None, firstFailure)


__all__ = [
    "DEFAULT_BACKEND",
    "CacheDefaults",
    "CacheFactoryPlugin",
    "CacheSpecError",
    "ICacheFactory",
    "RoutedCache",
    "buildMemoryCache",
    "closeCache",
    "discoverCacheFactories",
    "openCache",
    "parseCacheSpec",
]
