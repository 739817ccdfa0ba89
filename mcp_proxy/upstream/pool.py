"""
The pool of upstream connections, owned by the proxy service.

Upstreams are kept per (instance, config): a client's calls through one
instance reuse the same processes, which start on first use, are restarted
after a crash (with backoff), and stop when idle.  The pool does not know
transports: an C{upstreamFactory} makes each L{IUpstream}.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Callable, Mapping, Optional, Protocol

from attrs import define, field
from twisted.application.service import IService, Service
from twisted.internet.defer import (
    Deferred,
    DeferredList,
    TimeoutError,
    succeed,
)
from twisted.internet.interfaces import IReactorProcess, IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from mcp_proxy.interfaces import IUpstream
from mcp_proxy.models import SSE, STDIO, STREAMABLE_HTTPS, UpstreamConfig
from mcp_proxy.upstream import UpstreamError, UpstreamTimeout, UpstreamUnavailable
from mcp_proxy.upstream._peer import DEFAULT_MAX_MESSAGE_SIZE, EndedHook, MessageHook, factoryFor
from mcp_proxy.upstream.http import httpFactory
from mcp_proxy.upstream.sse import sseFactory
from mcp_proxy.upstream.stdio import StdioUpstream

log = Logger()


class UpstreamFactory(Protocol):
    """
    Makes an unstarted L{IUpstream} for a config.

    The upstream must call C{onMessage(upstream, message)} for the messages
    its server sends on its own (notifications, server-to-client requests;
    see C{onMessage} of L{JsonRpcPeer<mcp_proxy.upstream._peer.JsonRpcPeer>})
    and C{onEnded(upstream, error)} once when it ends (C{error} is C{None}
    after its C{stop()}).  A factory that cannot serve the config's
    transport raises L{UpstreamUnavailable}.
    """

    def __call__(
        self,
        config: UpstreamConfig,
        onMessage: Optional[MessageHook],
        onEnded: Optional[EndedHook],
    ) -> IUpstream: ...


def stdioFactory(
    reactor: IReactorProcess,
    clock: Optional[IReactorTime] = None,
    clientCapabilities: Optional[Mapping[str, Any]] = None,
    startTimeout: float = 30.0,
    stopGrace: float = 2.0,
    maxMessageSize: int = DEFAULT_MAX_MESSAGE_SIZE,
    environ: Optional[Mapping[str, str]] = None,
) -> UpstreamFactory:
    """
    A factory of L{StdioUpstream}s with these settings.
    """

    return factoryFor(
        StdioUpstream,
        reactor,
        clock,
        clientCapabilities,
        startTimeout=startTimeout,
        stopGrace=stopGrace,
        maxMessageSize=maxMessageSize,
        environ=environ,
    )


def byTransport(factories: Mapping[str, UpstreamFactory]) -> UpstreamFactory:
    """
    A factory that hands each config to the factory of its
    C{transportType} (C{"STDIO"}, C{"SSE"}, C{"STREAMABLE_HTTPS"}).  This is
    where remote transports are plugged in.
    """

    def make(
        config: UpstreamConfig,
        onMessage: Optional[MessageHook],
        onEnded: Optional[EndedHook],
    ) -> IUpstream:
        factory = factories.get(config.transportType)
        if factory is None:
            raise UpstreamUnavailable(
                f"upstream {config.name}: transport {config.transportType} is not supported"
            )
        return factory(config, onMessage, onEnded)

    return make


def defaultFactory(
    reactor: IReactorProcess, clock: Optional[IReactorTime] = None
) -> UpstreamFactory:
    """
    Every transport with default settings: stdio processes, Streamable
    HTTP and legacy SSE sessions.
    """
    return byTransport(
        {
            STDIO: stdioFactory(reactor, clock),
            SSE: sseFactory(reactor, clock),
            STREAMABLE_HTTPS: httpFactory(reactor, clock),
        }
    )


def configFingerprint(config: UpstreamConfig) -> str:
    """
    A digest of everything that decides what an upstream process is, so that
    a changed command, argument, URL or env value gets new processes.  Not
    for display: it is derived from secrets.
    """
    material = json.dumps(
        [
            config.transportType,
            config.command,
            list(config.args),
            config.url,
            sorted(config.env.items()),
            config.authType,
            config.clientCapabilities,
        ],
        separators=(",", ":"),
        sort_keys=True,
    )
    return hashlib.sha256(material.encode("utf-8")).hexdigest()


def errorMessage(reason: Any) -> str:
    """
    The message of an exception or Failure, for C{lastError}.
    """
    value = reason.value if isinstance(reason, Failure) else reason
    if isinstance(value, UpstreamError):
        return value.message
    return f"{type(value).__name__}: {value}"


@define(eq=False)
class _Slot:
    """
    One process place of an entry: at most one upstream at a time.
    """

    index: int
    upstream: Optional[IUpstream] = None
    starting: Optional[IUpstream] = None
    waiters: list[Deferred[IUpstream]] = field(factory=list)
    failures: int = 0
    nextAttempt: float = 0.0
    lastUsed: float = 0.0
    startedAt: float = 0.0
    served: int = 0
    restartPending: bool = False
    lastStartError: Optional[UpstreamError] = None


@define(eq=False)
class _Entry:
    """
    The processes of one (instance, config, fingerprint).
    """

    instanceId: str
    config: UpstreamConfig
    fingerprint: str
    slots: list[_Slot]
    restarts: int = 0
    failures: int = 0
    lastError: Optional[str] = None
    retired: bool = False

    @property
    def name(self) -> str:
        return self.config.name


@define(eq=False)
class UpstreamPool:
    """
    Upstream connections per (instance, config), started lazily.

    @ivar reactor: for the default factory (stdio processes).
    @ivar clock: idle sweeps and backoff (default: C{reactor}).
    @ivar upstreamFactory: makes each upstream; default: L{defaultFactory}
        (see L{byTransport}).
    @ivar processesPerUpstream: upstreams per (instance, config).  The first
        starts on first use; more start while all running ones are busy.
    @ivar idleTtl: seconds an unused upstream is kept.
    @ivar sweepInterval: seconds between idle sweeps (default: the smaller
        of C{idleTtl} and 30).
    @ivar backoffInitial: the delay before the second restart in a row; the
        first is immediate, later ones double up to C{backoffMax}.
    @ivar stableAfter: seconds of life (or one answered request) after which
        a crash counts as the first in a row again.
    @ivar onMessage: called as C{onMessage(instanceId, config, upstream,
        message)} for what an upstream sends on its own; its result answers
        a server-to-client request (see C{onMessage} of L{JsonRpcPeer
        <mcp_proxy.upstream._peer.JsonRpcPeer>}).
    @ivar counters: per config name, C{starts}, C{restarts} and
        C{failures}, for the metrics.
    """

    reactor: IReactorProcess
    clock: Optional[IReactorTime] = None
    upstreamFactory: Optional[UpstreamFactory] = None
    processesPerUpstream: int = 1
    idleTtl: float = 300.0
    sweepInterval: Optional[float] = None
    backoffInitial: float = 0.5
    backoffMax: float = 30.0
    stableAfter: float = 30.0
    onMessage: Optional[Callable[[str, UpstreamConfig, IUpstream, dict[str, Any]], Any]] = None

    counters: dict[str, dict[str, int]] = field(init=False, factory=dict)
    _entries: dict[tuple[str, str, str], _Entry] = field(init=False, factory=dict)
    _current: dict[tuple[str, str], str] = field(init=False, factory=dict)
    # id(config) -> (config, fingerprint): the configs come from a cache, so
    # the same objects recur and their digest is computed once.
    _fingerprints: dict[int, tuple[UpstreamConfig, str]] = field(init=False, factory=dict)
    _retired: list[_Entry] = field(init=False, factory=list)
    _stopping: set[IUpstream] = field(init=False, factory=set)
    _sweeper: Optional[LoopingCall] = field(init=False, default=None)
    _closed: bool = field(init=False, default=False)

    def __attrs_post_init__(self) -> None:
        if self.clock is None:
            self.clock = IReactorTime(self.reactor)
        if self.upstreamFactory is None:
            self.upstreamFactory = defaultFactory(self.reactor, self.clock)
        if self.processesPerUpstream < 1:
            raise ValueError("processesPerUpstream must be at least 1")

    # -- life ----------------------------------------------------------------

    def start(self) -> None:
        """
        Start the idle sweep.
        """
        if self._sweeper is not None and self._sweeper.running:
            return
        self._closed = False
        interval = self.sweepInterval or min(self.idleTtl, 30.0)
        self._sweeper = LoopingCall(self.sweep)
        self._sweeper.clock = self._clock
        self._sweeper.start(interval, now=False)

    def stop(self) -> Deferred[None]:
        """
        Stop the sweep and every upstream; later calls fail until L{start}.

        @return: a Deferred firing when every upstream has ended.
        """
        self._closed = True
        if self._sweeper is not None and self._sweeper.running:
            self._sweeper.stop()
        self._sweeper = None
        return self.stopAll()

    def service(self) -> IService:
        """
        A service for the proxy's service tree: starting it calls L{start},
        stopping it calls L{stop} (so every upstream has ended when its
        C{stopService} Deferred fires).
        """
        return _PoolService(self)

    def stopAll(self) -> Deferred[None]:
        """
        Stop every upstream, running or starting.  The pool stays usable.

        @return: a Deferred firing when every upstream has ended.
        """
        entries = list(self._entries.values()) + self._retired
        self._entries.clear()
        self._current.clear()
        self._retired = []
        for entry in entries:
            entry.retired = True
            for slot in entry.slots:
                for upstream in (slot.upstream, slot.starting):
                    if upstream is not None:
                        self._stopUpstream(upstream)
                slot.upstream = None
        waits = [upstream.stop() for upstream in list(self._stopping)]
        if not waits:
            return succeed(None)
        done = DeferredList(waits, consumeErrors=True)
        return done.addCallback(lambda _: None)

    @property
    def _clock(self) -> IReactorTime:
        assert self.clock is not None
        return self.clock

    def _stopUpstream(self, upstream: IUpstream) -> None:
        if upstream in self._stopping:
            return
        self._stopping.add(upstream)

        def stopped(result: object) -> None:
            self._stopping.discard(upstream)
            if isinstance(result, Failure):
                log.failure("stopping an upstream failed", result)

        upstream.stop().addBoth(stopped)

    # -- calls ---------------------------------------------------------------

    def call(
        self,
        instanceId: str,
        config: UpstreamConfig,
        method: str,
        params: Optional[dict[str, Any]],
        timeout: float,
    ) -> Deferred[Any]:
        """
        Send a request to an upstream of (instance, config), starting one if
        needed.  C{timeout} covers the start too.

        @return: a Deferred firing with the result, or failing with
            L{UpstreamError}.  Cancelling it cancels the request upstream.
        """
        return Deferred.fromCoroutine(self._call(instanceId, config, method, params, timeout))

    def capabilities(
        self, instanceId: str, config: UpstreamConfig, timeout: float
    ) -> Deferred[dict[str, Any]]:
        """
        The server capabilities of an upstream of (instance, config),
        starting one if needed.

        @return: a Deferred firing with the capabilities C{dict} its
            C{initialize} answered, or failing with L{UpstreamError}.
        """

        async def read() -> dict[str, Any]:
            entry = self._entryFor(instanceId, config)
            slot, upstream = await self._acquire(entry, timeout)
            slot.lastUsed = self._clock.seconds()
            capabilities = upstream.serverCapabilities
            return dict(capabilities) if isinstance(capabilities, Mapping) else {}

        return Deferred.fromCoroutine(read())

    async def _call(
        self,
        instanceId: str,
        config: UpstreamConfig,
        method: str,
        params: Optional[dict[str, Any]],
        timeout: float,
    ) -> Any:
        deadline = self._clock.seconds() + timeout
        entry = self._entryFor(instanceId, config)
        slot, upstream = await self._acquire(entry, timeout)
        remaining = deadline - self._clock.seconds()
        if remaining <= 0:
            raise UpstreamTimeout(f"upstream {entry.name} did not start within {timeout:g} s")
        slot.lastUsed = self._clock.seconds()
        try:
            result = await upstream.request(method, params, remaining)
        except UpstreamUnavailable as e:
            entry.lastError = e.message
            raise
        else:
            slot.served += 1
            return result
        finally:
            slot.lastUsed = self._clock.seconds()
            if entry.retired and slot.upstream is upstream and upstream.inFlight == 0:
                slot.upstream = None
                self._stopUpstream(upstream)

    def _entryFor(self, instanceId: str, config: UpstreamConfig) -> _Entry:
        if self._closed:
            raise UpstreamUnavailable(f"upstream {config.name} unavailable: the proxy is stopping")
        known = self._fingerprints.get(id(config))
        if known is not None and known[0] is config:
            fingerprint = known[1]
        else:
            fingerprint = configFingerprint(config)
            if len(self._fingerprints) >= 10_000:
                self._fingerprints.clear()
            self._fingerprints[id(config)] = (config, fingerprint)
        key = (instanceId, config.configId, fingerprint)
        entry = self._entries.get(key)
        if entry is not None:
            return entry
        old = self._current.get((instanceId, config.configId))
        if old is not None and old != fingerprint:
            self._retire(self._entries.pop((instanceId, config.configId, old), None))
        entry = _Entry(
            instanceId,
            config,
            fingerprint,
            [_Slot(i, lastUsed=self._clock.seconds()) for i in range(self.processesPerUpstream)],
        )
        self._entries[key] = entry
        self._current[(instanceId, config.configId)] = fingerprint
        return entry

    def _retire(self, entry: Optional[_Entry]) -> None:
        """
        The config of C{entry} changed: stop its upstreams once idle.
        """
        if entry is None:
            return
        log.info("upstream {upstream} changed; replacing its processes", upstream=entry.name)
        entry.retired = True
        self._retired.append(entry)
        for slot in entry.slots:
            if slot.starting is not None:
                self._stopUpstream(slot.starting)
            if slot.upstream is not None and slot.upstream.inFlight == 0:
                self._stopUpstream(slot.upstream)
                slot.upstream = None

    async def _acquire(self, entry: _Entry, timeout: float) -> tuple[_Slot, IUpstream]:
        now = self._clock.seconds()
        live = [s for s in entry.slots if s.upstream is not None and s.upstream.alive]
        if live:
            best = min(live, key=lambda s: s.upstream.inFlight if s.upstream else 0)
            assert best.upstream is not None
            if best.upstream.inFlight > 0:
                for spare in entry.slots:
                    if self._canStart(spare, now):
                        self._startSlot(entry, spare)
                        break
            return best, best.upstream
        slot = next((s for s in entry.slots if s.starting is not None), None)
        if slot is None:
            slot = next((s for s in entry.slots if self._canStart(s, now)), None)
            if slot is None:
                retryIn = min(s.nextAttempt for s in entry.slots) - now
                raise UpstreamUnavailable(
                    f"upstream {entry.name} unavailable, retrying in {retryIn:.1f}s",
                    retryAfter=retryIn,
                )
            self._startSlot(entry, slot)
            if slot.upstream is not None:
                return slot, slot.upstream
            if slot.starting is None:
                assert slot.lastStartError is not None
                raise slot.lastStartError
        upstream = await self._waitForStart(entry, slot, timeout)
        return slot, upstream

    def _canStart(self, slot: _Slot, now: float) -> bool:
        return (
            slot.starting is None
            and (slot.upstream is None or not slot.upstream.alive)
            and slot.nextAttempt <= now
        )

    def _waitForStart(self, entry: _Entry, slot: _Slot, timeout: float) -> Deferred[IUpstream]:
        waiter: Deferred[IUpstream] = Deferred(lambda d: slot.waiters.remove(d))
        slot.waiters.append(waiter)

        def timedOut(f: Failure) -> Failure:
            if f.check(TimeoutError):
                return Failure(
                    UpstreamTimeout(f"upstream {entry.name} did not start within {timeout:g} s")
                )
            return f

        waiter.addTimeout(timeout, self._clock)
        return waiter.addErrback(timedOut)

    def _startSlot(self, entry: _Entry, slot: _Slot) -> None:
        """
        Start an upstream in C{slot}; its waiters get it or the error.
        """
        assert self.upstreamFactory is not None
        slot.upstream = None
        counters = self._counters(entry.name)

        def onMessage(upstream: IUpstream, message: dict[str, Any]) -> Any:
            if self.onMessage is None:
                return None
            return self.onMessage(entry.instanceId, entry.config, upstream, message)

        def onEnded(upstream: IUpstream, error: Optional[UpstreamError]) -> None:
            self._ended(entry, slot, upstream, error)

        try:
            upstream = self.upstreamFactory(entry.config, onMessage, onEnded)
        except UpstreamError as e:
            # A config that cannot be served: no point in retrying later.
            slot.lastStartError = e
            entry.lastError = e.message
            self._fireWaiters(slot, e)
            return
        try:
            started = upstream.start()
        except UpstreamError as e:
            self._startFailed(entry, slot, e)
            return
        slot.starting = upstream

        def succeeded(_: object) -> None:
            slot.starting = None
            if entry.retired or self._closed:
                self._stopUpstream(upstream)
                self._fireWaiters(slot, UpstreamUnavailable(f"upstream {entry.name} was stopped"))
                return
            now = self._clock.seconds()
            slot.upstream = upstream
            slot.startedAt = slot.lastUsed = now
            slot.served = 0
            counters["starts"] += 1
            if slot.restartPending:
                slot.restartPending = False
                entry.restarts += 1
                counters["restarts"] += 1
            self._fireWaiters(slot, upstream)

        def failed(f: Failure) -> None:
            slot.starting = None
            error = f.value if isinstance(f.value, UpstreamError) else None
            if error is None:
                log.failure("upstream {upstream} failed to start", f, upstream=entry.name)
                error = UpstreamUnavailable(f"upstream {entry.name} failed to start")
            self._startFailed(entry, slot, error)

        started.addCallbacks(succeeded, failed)

    def _startFailed(self, entry: _Entry, slot: _Slot, error: UpstreamError) -> None:
        log.warn(
            "upstream {upstream} could not start: {error}",
            upstream=entry.name,
            error=error.message,
        )
        slot.lastStartError = error
        self._failed(entry, slot, error)
        self._fireWaiters(slot, error)

    def _failed(self, entry: _Entry, slot: _Slot, error: UpstreamError) -> None:
        now = self._clock.seconds()
        slot.failures += 1
        slot.restartPending = True
        if slot.failures > 1:
            delay = min(self.backoffInitial * 2 ** (slot.failures - 2), self.backoffMax)
        else:
            delay = 0.0
        slot.nextAttempt = now + delay
        entry.failures += 1
        entry.lastError = error.message
        self._counters(entry.name)["failures"] += 1

    def _fireWaiters(self, slot: _Slot, result: Any) -> None:
        waiters, slot.waiters = slot.waiters, []
        for waiter in waiters:
            if isinstance(result, Exception):
                waiter.errback(Failure(result))
            else:
                waiter.callback(result)

    def _ended(
        self,
        entry: _Entry,
        slot: _Slot,
        upstream: IUpstream,
        error: Optional[UpstreamError],
    ) -> None:
        if slot.starting is upstream:
            return  # the start's own failure is counted by _startSlot
        if slot.upstream is upstream:
            slot.upstream = None
        if error is None or entry.retired:
            return
        now = self._clock.seconds()
        if slot.served > 0 or now - slot.startedAt >= self.stableAfter:
            slot.failures = 0
        self._failed(entry, slot, error)

    def _counters(self, name: str) -> dict[str, int]:
        counters = self.counters.get(name)
        if counters is None:
            counters = self.counters[name] = {"starts": 0, "restarts": 0, "failures": 0}
        return counters

    # -- idle ----------------------------------------------------------------

    def sweep(self) -> None:
        """
        Stop upstreams unused for C{idleTtl} seconds and forget idle
        entries.  Never raises: an error is logged and the next sweep runs.
        """
        try:
            self._sweep()
        except Exception:
            log.failure("upstream pool sweep failed")

    def _sweep(self) -> None:
        now = self._clock.seconds()
        for key, entry in list(self._entries.items()):
            busy = False
            for slot in entry.slots:
                upstream = slot.upstream
                if upstream is not None and upstream.alive:
                    if upstream.inFlight == 0 and now - slot.lastUsed >= self.idleTtl:
                        log.info("upstream {upstream} idle; stopping it", upstream=entry.name)
                        slot.upstream = None
                        self._stopUpstream(upstream)
                    else:
                        busy = True
                elif slot.starting is not None or slot.waiters:
                    busy = True
                elif now - slot.lastUsed < self.idleTtl or slot.nextAttempt > now:
                    busy = True
            if not busy:
                del self._entries[key]
                if self._current.get(key[:2]) == key[2]:
                    del self._current[key[:2]]
        for entry in list(self._retired):
            for slot in entry.slots:
                if slot.upstream is not None and slot.upstream.inFlight == 0:
                    self._stopUpstream(slot.upstream)
                    slot.upstream = None
            if all(s.upstream is None and s.starting is None for s in entry.slots):
                self._retired.remove(entry)

    # -- health --------------------------------------------------------------

    def health(self) -> list[dict[str, Any]]:
        """
        A JSON-able summary per (instance, config): C{instanceId},
        C{configId}, C{name}, C{transport}, C{alive}, C{pids}, C{starting},
        C{inFlight}, C{restarts}, C{failures}, C{lastError} and C{retryIn}
        (seconds until the next start attempt, or C{None}).
        """
        now = self._clock.seconds()
        summary = []
        for entry in self._entries.values():
            running = [s.upstream for s in entry.slots if s.upstream is not None]
            waiting = [s.nextAttempt - now for s in entry.slots if s.nextAttempt > now]
            summary.append(
                {
                    "instanceId": entry.instanceId,
                    "configId": entry.config.configId,
                    "name": entry.name,
                    "transport": entry.config.transportType,
                    "alive": any(u.alive for u in running),
                    "pids": [getattr(u, "pid", None) for u in running if u.alive],
                    "starting": sum(1 for s in entry.slots if s.starting is not None),
                    "inFlight": sum(u.inFlight for u in running),
                    "restarts": entry.restarts,
                    "failures": entry.failures,
                    "lastError": entry.lastError,
                    "retryIn": round(min(waiting), 3) if waiting else None,
                }
            )
        return summary


class _PoolService(Service):
    """
    Runs an L{UpstreamPool} within a service tree.
    """

    name = "upstream-pool"

    def __init__(self, pool: UpstreamPool) -> None:
        self.pool = pool

    def startService(self) -> None:
        Service.startService(self)
        self.pool.start()

    def stopService(self) -> Deferred[None]:
        Service.stopService(self)
        return self.pool.stop()


async def _discover(
    factory: UpstreamFactory, clock: IReactorTime, config: UpstreamConfig, timeout: float
) -> list[dict[str, Any]]:
    deadline = clock.seconds() + timeout
    upstream = factory(config, None, None)
    try:
        try:
            await upstream.start().addTimeout(timeout, clock)
        except TimeoutError:
            raise UpstreamTimeout(f"upstream {config.name} did not start within {timeout:g} s")
        tools: list[dict[str, Any]] = []
        cursor: Optional[str] = None
        seen: set[str] = set()
        while True:
            remaining = deadline - clock.seconds()
            if remaining <= 0:
                raise UpstreamTimeout(f"upstream {config.name} did not list its tools in time")
            params = {"cursor": cursor} if cursor is not None else None
            result = await upstream.request("tools/list", params, remaining)
            page = result.get("tools") if isinstance(result, dict) else None
            if not isinstance(page, list):
                raise UpstreamError(f"upstream {config.name} answered tools/list without tools")
            tools.extend(t for t in page if isinstance(t, dict) and isinstance(t.get("name"), str))
            cursor = result.get("nextCursor")
            if not cursor:
                return tools
            if not isinstance(cursor, str) or cursor in seen:
                raise UpstreamError(f"upstream {config.name} repeats a tools/list cursor")
            seen.add(cursor)
    finally:
        await upstream.stop()


def discoverTools(
    reactor: IReactorProcess,
    config: UpstreamConfig,
    timeout: float,
    upstreamFactory: Optional[UpstreamFactory] = None,
) -> Deferred[list[dict[str, Any]]]:
    """
    Start a one-off upstream for C{config}, read all its tools (following
    C{nextCursor}), and stop it.  For the admin C{import} and C{tools sync}
    commands.

    @param timeout: seconds for the start and every page together.
    @param upstreamFactory: default: L{defaultFactory}.
    @return: a Deferred firing with the tool objects as the upstream sent
        them, or failing with L{UpstreamError}.
    """
    clock = IReactorTime(reactor)
    factory = upstreamFactory or defaultFactory(reactor, clock)
    return Deferred.fromCoroutine(_discover(factory, clock, config, timeout))
