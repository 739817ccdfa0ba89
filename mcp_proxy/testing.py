"""
Working fakes for tests of mcp-proxy and of code built on it.

These are small real implementations of narrow interfaces, not mocks:
L{FailingCache} is an L{ICache} whose backend is down, and L{CacheHarness}
wraps an L{ICache} provider with a way to let time pass, for the shared cache contract tests.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Optional

from attrs import define, field
from twisted.internet.defer import Deferred, fail
from twisted.internet.task import Clock
from zope.interface import implementer

from mcp_proxy.cache import MemoryCache
from mcp_proxy.interfaces import ICache


@define
class CacheHarness:
    """
    An L{ICache} provider under test, with its own control of time.

    @ivar cache: the provider.
    @ivar advance: lets C{seconds} pass for the provider's expiry; may
        return a Deferred (a provider with server-side expiry waits).
    @ivar close: releases the provider; may return a Deferred.
    """

    cache: ICache
    advance: Callable[[float], Optional[Deferred[None]]]
    close: Callable[[], Optional[Deferred[None]]] = lambda: None


def memoryCacheHarness(defaultTtl: float = 300.0, maxSize: int = 1000) -> CacheHarness:
    """
    A L{MemoryCache} on a fresh L{Clock}, for the cache contract tests.
    """
    clock = Clock()
    return CacheHarness(MemoryCache(clock, maxSize=maxSize, defaultTtl=defaultTtl), clock.advance)


@implementer(ICache)
@define
class FailingCache:
    """
    An L{ICache} whose backend is unreachable: every call fails with
    C{error}.
    """

    error: Exception = field(factory=lambda: ConnectionError("cache backend unreachable"))
    stats: dict[str, int] = field(
        factory=lambda: dict.fromkeys(("hits", "misses", "sets", "evictions", "deletes"), 0)
    )

    def get(self, key: str) -> Deferred[Any]:
        return fail(self.error)

    def set(self, key: str, value: Any, ttl: Optional[float] = None) -> Deferred[None]:
        return fail(self.error)

    def delete(self, keys: Iterable[str]) -> Deferred[None]:
        return fail(self.error)

    def clear(self) -> Deferred[None]:
        return fail(self.error)


__all__ = [
    "CacheHarness",
    "FailingCache",
    "memoryCacheHarness",
]
