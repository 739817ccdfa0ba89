"""
An in-memory L{ICache}: least-recently-used eviction plus a time to live.

Every operation is O(1): the entries sit in an C{OrderedDict} in order of
use, so the eviction victim is always at the front.  Expired entries are
not swept by a timer; they read as misses and are dropped when they are
read, or when they reach the front and are evicted.

L{SingleFlight} lets concurrent misses for one key share one load.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Callable, Generic, Hashable, Iterable, Optional, TypeVar, cast

from attrs import define, field
from twisted.internet.defer import Deferred, fail, maybeDeferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure
from zope.interface import implementer

from mcp_proxy.interfaces import ICache

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")

STAT_NAMES = ("hits", "misses", "sets", "evictions", "deletes", "expirations")


def _newStats() -> dict[str, int]:
    return dict.fromkeys(STAT_NAMES, 0)


def _positiveSize(instance: object, attribute: object, value: int) -> None:
    if value < 1:
        raise ValueError(f"maxSize must be at least 1, not {value!r}")


@implementer(ICache)
@define
class MemoryCache:
    """
    A bounded LRU cache whose entries expire after a time to live.

    @ivar clock: the source of time (its C{seconds()}).
    @ivar maxSize: the most entries held; setting a new key beyond it
        evicts the least recently used entry.
    @ivar defaultTtl: seconds an entry lives when C{set} is given C{None}.
    @ivar stats: the counters C{hits}, C{misses}, C{sets}, C{evictions},
        C{deletes} and C{expirations} (expired entries found on a read or
        at eviction).
    """

    clock: IReactorTime
    maxSize: int = field(default=1000, validator=_positiveSize)
    defaultTtl: float = 300.0
    stats: dict[str, int] = field(factory=_newStats, init=False)
    # key -> (expiry time, value), least recently used first.
    _entries: OrderedDict[str, tuple[float, Any]] = field(factory=OrderedDict, init=False)

    def __len__(self) -> int:
        """
        The number of entries held, expired ones not yet dropped included.
        """
        return len(self._entries)

    def get(self, key: str) -> Deferred[Any]:
        """
        Read an entry and mark it as recently used.

        @return: an already-fired Deferred with the value, or C{None} on a
            miss or an expired entry (which is dropped).
        """
        entry = self._entries.get(key)
        if entry is None:
            self.stats["misses"] += 1
            return succeed(None)
        expiresAt, value = entry
        if expiresAt <= self.clock.seconds():
            del self._entries[key]
            self.stats["expirations"] += 1
            self.stats["misses"] += 1
            return succeed(None)
        self._entries.move_to_end(key)
        self.stats["hits"] += 1
        return succeed(value)

    def set(self, key: str, value: Any, ttl: Optional[float] = None) -> Deferred[None]:
        """
        Store C{value} for C{ttl} seconds (C{None}: L{defaultTtl}).  A C{ttl}
        of 0 or less stores nothing and removes any entry for C{key}.

        @return: an already-fired Deferred with C{None}; failed with
            C{ValueError} when C{value} is C{None}.
        """
        if value is None:
            return fail(ValueError("a cache cannot store None"))
        if ttl is None:
            ttl = self.defaultTtl
        if ttl <= 0:
            self._entries.pop(key, None)
            return succeed(None)
        self.stats["sets"] += 1
        entries = self._entries
        if key in entries:
            entries.move_to_end(key)
        elif len(entries) >= self.maxSize:
            _, (victimExpiresAt, _) = entries.popitem(last=False)
            if victimExpiresAt <= self.clock.seconds():
                self.stats["expirations"] += 1
            else:
                self.stats["evictions"] += 1
        entries[key] = (self.clock.seconds() + ttl, value)
        return succeed(None)

    def delete(self, keys: Iterable[str]) -> Deferred[None]:
        """
        Remove the entries for C{keys}; absent ones are ignored.

        @param keys: an iterable of keys, not a single C{str}.
        @return: an already-fired Deferred with C{None}; failed with
            C{TypeError} when C{keys} is a C{str}.
        """
        if isinstance(keys, str):
            return fail(TypeError("delete() takes an iterable of keys, not a str"))
        for key in keys:
            if self._entries.pop(key, None) is not None:
                self.stats["deletes"] += 1
        return succeed(None)

    def clear(self) -> Deferred[None]:
        """
        Remove every entry.  The counters are kept.

        @return: an already-fired Deferred with C{None}.
        """
        self._entries.clear()
        return succeed(None)


@define
class SingleFlight(Generic[K, V]):
    """
    Runs at most one load per key at a time: callers that ask for a key
    while its load is in flight wait for that load instead of starting
    another.

    Every caller gets its own fresh Deferred, fed from the one load, so
    that one caller's callbacks (or its cancellation) never change what the
    others see.  A failure is given to each caller as its own L{Failure}
    around the same exception.
    """

    _waiters: dict[K, list[Deferred[V]]] = field(factory=dict, init=False)

    def __contains__(self, key: K) -> bool:
        """
        Whether a load for C{key} is in flight.
        """
        return key in self._waiters

    def __len__(self) -> int:
        """
        The number of loads in flight.
        """
        return len(self._waiters)

    def run(self, key: K, load: Callable[[], Deferred[V] | V]) -> Deferred[V]:
        """
        Wait for the load of C{key} in flight, or start one with C{load}.

        @param load: called with no arguments only when no load of C{key}
            is in flight; it may return a Deferred, a value, or raise.
        @return: a new Deferred firing with the load's result or failure.
        """
        mine: Deferred[V] = Deferred()
        waiters = self._waiters.get(key)
        if waiters is not None:
            waiters.append(mine)
            return mine
        self._waiters[key] = [mine]
        # maybeDeferred takes a value, a Deferred, or an exception alike.
        started: Deferred[V] = maybeDeferred(cast(Callable[[], Deferred[V]], load))
        started.addBoth(self._land, key)
        return mine

    def _land(self, result: V | Failure, key: K) -> None:
        waiters = self._waiters.pop(key)
        for waiter in waiters:
            if waiter.called:
                # Cancelled by its caller.
                continue
            if isinstance(result, Failure):
                waiter.errback(Failure(result.value, result.type, result.tb))
            else:
                waiter.callback(result)


@define
class LocalEntries:
    """
    A small in-process layer in front of an L{ICache}, read synchronously on
    the request path: after warm-up a hit costs a dict lookup, not a
    Deferred chain (nor, with a shared backend, a network round trip).

    Whoever fills it must drop entries when the shared cache's are
    invalidated.

    @ivar clock: gives the time entries expire by.
    @ivar ttl: seconds an entry is kept.
    @ivar maxSize: entries kept at most; the oldest go first.
    """

    clock: IReactorTime
    ttl: float
    maxSize: int = 10_000
    _entries: OrderedDict[str, tuple[Any, float]] = field(factory=OrderedDict, init=False)

    def get(self, key: str) -> Any:
        """
        The value, or C{None} when absent or expired.
        """
        entry = self._entries.get(key)
        if entry is None:
            return None
        if entry[1] <= self.clock.seconds():
            del self._entries[key]
            return None
        return entry[0]

    def put(self, key: str, value: Any) -> None:
        """
        Keep C{value} for L{ttl} seconds.
        """
        self._entries[key] = (value, self.clock.seconds() + self.ttl)
        self._entries.move_to_end(key)
        while len(self._entries) > self.maxSize:
            self._entries.popitem(last=False)

    def drop(self, keys: Iterable[str]) -> None:
        """
        Forget these entries.
        """
        for key in keys:
            self._entries.pop(key, None)

    def clear(self) -> None:
        """
        Forget every entry.
        """
        self._entries.clear()
