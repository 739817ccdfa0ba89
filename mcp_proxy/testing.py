"""
Working fakes for tests of mcp-proxy and of code built on it.

These are small real implementations of narrow interfaces, not mocks:
L{FakeKeyLookup} provides L{IKeyLookup} from dicts, L{FailingCache} is an
L{ICache} whose backend is down, and L{CacheHarness} wraps an L{ICache}
provider with a way to let time pass, for the shared cache contract tests.
"""

from __future__ import annotations

import datetime
import os
import secrets
import unittest
from typing import Any, Callable, Iterable, Optional, TypeVar

from attrs import define, field
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from zope.interface import implementer

from mcp_proxy.auth import IKeyLookup
from mcp_proxy.cache import MemoryCache
from mcp_proxy.interfaces import ICache
from mcp_proxy.jsonrpc import JsonRpcError, encode
from mcp_proxy.keys import hashApiKey
from mcp_proxy.models import ApiKeyRecord, InstanceConfig, UpstreamConfig

T = TypeVar("T")


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


#: The environment variable naming the Redis of the tests, and its default.
REDIS_TEST_URL_VARIABLE = "MCPPROXY_TEST_REDIS_URL"
DEFAULT_REDIS_TEST_URL = "redis://127.0.0.1:6379/0"


def redisTestURL() -> str:
    """
    The URL of the Redis the tests use: C{$MCPPROXY_TEST_REDIS_URL}, or
    C{redis://127.0.0.1:6379/0}.
    """
    return os.environ.get(REDIS_TEST_URL_VARIABLE) or DEFAULT_REDIS_TEST_URL


def redisCacheHarness(defaultTtl: float = 300.0) -> Deferred[CacheHarness]:
    """
    A L{mcp_proxy.cache_redis.RedisCache} on the test Redis (see
    L{redisTestURL}), under a fresh key prefix, for the cache contract
    tests.

    Redis expires entries by its own clock, which a test cannot move, so
    C{advance(seconds)} moves every entry under the prefix C{seconds}
    closer to its expiry (C{PTTL}, then C{PEXPIRE}, or C{DEL} when none is
    left).  C{close()} removes the entries and disconnects.

    @return: a Deferred firing with the harness.  When Redis does not
        answer, it fails with C{unittest.SkipTest} (a skip for pytest and
        trial), or, when the environment has C{CI=true}, with
        L{mcp_proxy.cache_redis.RedisUnavailable}.
    """
    return Deferred.fromCoroutine(_redisCacheHarness(defaultTtl))


# Redis URL to why it could not be reached (None: it answered).
_redisProbes: dict[str, Optional[str]] = {}


async def _redisCacheHarness(defaultTtl: float) -> CacheHarness:
    from twisted.internet import reactor

    from mcp_proxy.cache_redis import RedisCache, RedisCacheError, RedisUnavailable

    url = redisTestURL()
    cache = RedisCache.fromURL(
        url,
        reactor,
        prefix=f"mcpproxy-test:{secrets.token_hex(6)}:",
        defaultTtl=defaultTtl,
        connectTimeout=5.0,
        replyTimeout=5.0,
    )
    # One probe per URL and process, so that an absent Redis costs its
    # deadline once, not once per test.
    if url not in _redisProbes:
        probe = RedisCache.fromURL(url, reactor, connectTimeout=1.0, replyTimeout=2.0)
        try:
            await probe.ping()
        except RedisCacheError as e:
            _redisProbes[url] = str(e)
        else:
            _redisProbes[url] = None
        finally:
            await probe.close()
    unreachable = _redisProbes[url]
    if unreachable is not None:
        await cache.close()
        if os.environ.get("CI", "").lower() == "true":
            raise RedisUnavailable(f"{unreachable} (not skipped: CI=true)")
        raise unittest.SkipTest(f"Redis is unreachable: {unreachable}")

    async def advance(seconds: float) -> None:
        for key in await cache.ownKeys():
            left = await cache.execute("PTTL", key)
            if left < 0:
                continue
            rest = left - round(seconds * 1000)
            if rest > 0:
                await cache.execute("PEXPIRE", key, rest)
            else:
                await cache.execute("DEL", key)

    async def close() -> None:
        try:
            await cache.clear()
        finally:
            await cache.close()

    return CacheHarness(
        cache,
        lambda seconds: Deferred.fromCoroutine(advance(seconds)),
        lambda: Deferred.fromCoroutine(close()),
    )


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


@implementer(IKeyLookup)
@define
class FakeKeyLookup:
    """
    An L{IKeyLookup} backed by dicts.

    @ivar records: key hash to L{ApiKeyRecord}.
    @ivar configs: instance id to L{InstanceConfig}.
    @ivar calls: how many times each method was called.
    @ivar touches: the C{(keyId, when)} of every C{touchApiKey} call.
    @ivar error: when set, C{lookupApiKey} and C{loadInstanceConfig} fail
        with it (e.g. L{mcp_proxy.errors.DatabaseUnavailable}).
    @ivar touchError: when set, C{touchApiKey} fails with it.
    @ivar hold: when true, lookups do not answer until L{release}; the
        answer is computed then, from the state at that time.
    """

    records: dict[str, ApiKeyRecord] = field(factory=dict)
    configs: dict[str, InstanceConfig] = field(factory=dict)
    calls: dict[str, int] = field(
        factory=lambda: dict.fromkeys(("lookupApiKey", "loadInstanceConfig", "touchApiKey"), 0)
    )
    touches: list[tuple[str, datetime.datetime]] = field(factory=list)
    error: Optional[Exception] = None
    touchError: Optional[Exception] = None
    hold: bool = False
    _pending: list[tuple[Deferred[Any], Callable[[], Any]]] = field(factory=list, init=False)

    def addKey(self, apiKey: str, record: ApiKeyRecord, salt: str = "") -> str:
        """
        Store C{record} under the hash of C{apiKey}.

        @return: the key hash.
        """
        keyHash = hashApiKey(apiKey, salt)
        self.records[keyHash] = record
        return keyHash

    @property
    def pending(self) -> int:
        """
        The number of held lookups.
        """
        return len(self._pending)

    def release(self) -> None:
        """
        Answer every held lookup, oldest first.
        """
        pending, self._pending = self._pending, []
        for d, answer in pending:
            try:
                value = answer()
            except Exception as e:
                d.errback(e)
            else:
                d.callback(value)

    def _answer(self, answer: Callable[[], T]) -> Deferred[T]:
        if self.hold:
            d: Deferred[T] = Deferred()
            self._pending.append((d, answer))
            return d
        try:
            return succeed(answer())
        except Exception as e:
            return fail(e)

    def _checked(self, value: T) -> T:
        if self.error is not None:
            raise self.error
        return value

    def lookupApiKey(self, keyHash: str) -> Deferred[Optional[ApiKeyRecord]]:
        self.calls["lookupApiKey"] += 1
        return self._answer(lambda: self._checked(self.records.get(keyHash)))

    def loadInstanceConfig(self, instanceId: str) -> Deferred[Optional[InstanceConfig]]:
        self.calls["loadInstanceConfig"] += 1
        return self._answer(lambda: self._checked(self.configs.get(instanceId)))

    def touchApiKey(self, keyId: str, when: datetime.datetime) -> Deferred[None]:
        self.calls["touchApiKey"] += 1
        if self.touchError is not None:
            return fail(self.touchError)
        self.touches.append((keyId, when))
        return succeed(None)


@define
class FakeUpstreams:
    """
    Stands in for the upstream pool's C{call}: answers C{tools/list} from a
    table of tools per config id (in pages of C{pageSize}, with
    C{nextCursor}) and C{tools/call} with a text content echoing the call's
    parameters; records every call.

    @ivar failing: config names whose calls fail.
    @ivar pending: when a list, C{tools/list} answers wait in it until the
        test fires them.
    """

    tools: dict[str, list[dict[str, Any]]]
    pageSize: int = 100
    failing: set[str] = field(factory=set)
    pending: Optional[list[Deferred[Any]]] = None
    calls: list[tuple[str, str, Any]] = field(factory=list)

    def __call__(
        self,
        instanceId: str,
        config: UpstreamConfig,
        method: str,
        params: Optional[dict[str, Any]],
        timeout: float,
    ) -> Deferred[Any]:
        self.calls.append((config.name, method, params))
        if config.name in self.failing:
            return fail(JsonRpcError(-32603, f"{config.name} is down"))
        if method == "tools/list":
            start = int((params or {}).get("cursor") or 0)
            page = self.tools.get(config.configId, [])[start : start + self.pageSize]
            result: dict[str, Any] = {"tools": page}
            if start + self.pageSize < len(self.tools.get(config.configId, [])):
                result["nextCursor"] = str(start + self.pageSize)
            if self.pending is not None:
                d: Deferred[Any] = Deferred()
                self.pending.append(d)
                d.addCallback(lambda _: result)
                return d
            return succeed(result)
        return succeed({"content": [{"type": "text", "text": encode(params).decode()}]})


__all__ = [
    "CacheHarness",
    "FailingCache",
    "FakeKeyLookup",
    "FakeUpstreams",
    "memoryCacheHarness",
    "redisCacheHarness",
    "redisTestURL",
]
