"""
Tests for L{mcp_proxy.upstream.pool}: real server processes on the real
reactor; a L{Clock} drives the pool's timers where they matter.
"""

from __future__ import annotations

import json
import os
from typing import Any

import attrs
import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import CancelledError, Deferred, gatherResults
from twisted.internet.task import Clock
from twisted.logger import globalLogPublisher
from upstreamhelpers import ECHO, TESTSERVER, makeConfig, nothingLeftOver, within

from mcp_proxy.interfaces import IUpstream
from mcp_proxy.models import UpstreamConfig
from mcp_proxy.upstream import (
    StdioUpstream,
    UpstreamExited,
    UpstreamPool,
    UpstreamTimeout,
    UpstreamUnavailable,
    byTransport,
    discoverTools,
    stdioFactory,
)


@pytest.fixture(autouse=True)
def noLeftovers():
    """After each test: no new child process or timer."""
    with nothingLeftOver():
        yield


@pytest_twisted.async_yield_fixture
async def pools():
    """
    Make pools; stop them all after the test.
    """
    made: list[UpstreamPool] = []

    def make(**kw: Any) -> UpstreamPool:
        pool = UpstreamPool(reactor, **kw)
        made.append(pool)
        return pool

    yield make
    for pool in made:
        await within(pool.stop())


@pytest.fixture
def events():
    seen: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(seen.append)
    yield seen
    globalLogPublisher.removeObserver(seen.append)


def recording(clock: Any = None) -> tuple[Any, list[StdioUpstream]]:
    """
    A stdio factory that keeps what it makes.
    """
    made: list[StdioUpstream] = []
    inner = stdioFactory(reactor, clock)

    def make(config: UpstreamConfig, onMessage: Any, onEnded: Any) -> IUpstream:
        upstream = inner(config, onMessage, onEnded)
        assert isinstance(upstream, StdioUpstream)
        made.append(upstream)
        return upstream

    return make, made


def waitReady(upstream: StdioUpstream) -> Deferred[None]:
    """
    Fire once C{upstream} has finished its handshake (or ended).
    """
    d: Deferred[None] = Deferred()

    def observe(event: dict[str, Any]) -> None:
        if event.get("pid") == upstream.pid and "ready" in event.get("log_format", ""):
            globalLogPublisher.removeObserver(observe)
            # The pool takes the upstream in the same call stack, after this.
            reactor.callLater(0, d.callback, None)

    if upstream.ready:
        d.callback(None)
    else:
        globalLogPublisher.addObserver(observe)
    return within(d)


def tool(
    pool: UpstreamPool,
    name: str,
    config: UpstreamConfig,
    instanceId: str = "i1",
    timeout: float = 20,
    **arguments: Any,
) -> Deferred[Any]:
    return pool.call(
        instanceId, config, "tools/call", {"name": name, "arguments": arguments}, timeout
    )


async def pid(pool: UpstreamPool, config: UpstreamConfig, instanceId: str = "i1") -> int:
    info = await within(tool(pool, "info", config, instanceId))
    return int(info["structuredContent"]["pid"])


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


# -- starting ------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_singleFlight(pools) -> None:
    """Concurrent first calls share one start and one process."""
    pool = pools()
    config = makeConfig(TESTSERVER)
    results = await within(gatherResults([tool(pool, "info", config) for _ in range(10)]))
    assert len({r["structuredContent"]["pid"] for r in results}) == 1
    assert pool.counters == {"test": {"starts": 1, "restarts": 0, "failures": 0}}
    [health] = pool.health()
    assert health["pids"] == [results[0]["structuredContent"]["pid"]]
    assert health["alive"] and health["inFlight"] == 0


@pytest_twisted.ensureDeferred
async def test_keys(pools) -> None:
    """Each (instance, config) has its own process; repeated calls reuse it."""
    pool = pools()
    a, b = makeConfig(TESTSERVER, name="a"), makeConfig(TESTSERVER, name="b")
    first = await pid(pool, a, "i1")
    assert await pid(pool, a, "i1") == first
    others = {await pid(pool, a, "i2"), await pid(pool, b, "i1")}
    assert first not in others and len(others) == 2
    health = pool.health()
    assert json.loads(json.dumps(health)) == health
    assert sorted((h["instanceId"], h["name"]) for h in health) == [
        ("i1", "a"),
        ("i1", "b"),
        ("i2", "a"),
    ]


@pytest_twisted.ensureDeferred
async def test_configChange(pools) -> None:
    """A changed env gets a new process; the old one is stopped."""
    factory, made = recording()
    pool = pools(upstreamFactory=factory)
    old = await pid(pool, makeConfig(TESTSERVER, env={"V": "1"}))
    new = await pid(pool, makeConfig(TESTSERVER, env={"V": "2"}))
    assert old != new
    await within(made[0].stop())
    assert gone(old) and not made[0].alive and made[1].alive
    assert len(pool.health()) == 1


@pytest_twisted.ensureDeferred
async def test_processesPerUpstream(pools) -> None:
    """With two processes per upstream, a second starts while the first is busy."""
    factory, made = recording()
    pool = pools(upstreamFactory=factory, processesPerUpstream=2)
    config = makeConfig(TESTSERVER)
    first = await pid(pool, config)
    assert len(made) == 1
    held = tool(pool, "hold", config, key="k")
    assert await pid(pool, config) == first
    assert len(made) == 2
    await waitReady(made[1])
    assert await pid(pool, config) != first
    held.cancel()
    with pytest.raises(CancelledError):
        await held
    assert pool.counters["test"]["starts"] == 2


@pytest_twisted.ensureDeferred
async def test_missingExecutable(pools) -> None:
    """A config whose command does not exist fails clearly."""
    pool = pools()
    with pytest.raises(UpstreamUnavailable, match="'no-such-server-xyz' not found on PATH"):
        await tool(pool, "echo", makeConfig(command="no-such-server-xyz"))
    assert pool.health()[0]["lastError"].endswith("not found on PATH")


# -- failures and restarts -----------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_restartAfterCrash(pools) -> None:
    """A crash fails the call in flight; the next call restarts the process."""
    pool = pools()
    config = makeConfig(TESTSERVER)
    first = await pid(pool, config)
    with pytest.raises(UpstreamExited, match=r"^upstream test exited \(status 3\)$"):
        await within(tool(pool, "crash", config, status=3))
    second = await pid(pool, config)
    assert second != first
    assert pool.counters["test"] == {"starts": 2, "restarts": 1, "failures": 1}
    [health] = pool.health()
    assert health["restarts"] == 1
    assert health["lastError"] == "upstream test exited (status 3)"


@pytest_twisted.ensureDeferred
async def test_backoff(pools) -> None:
    """
    Failed starts are retried at once, then after 0.5 s, 1 s, ...; meanwhile
    calls fail fast.
    """
    clock = Clock()
    pool = pools(clock=clock, backoffMax=1.0)
    config = makeConfig(TESTSERVER, "--exit-at-start", "5")
    message = r"^upstream test exited \(status 5\) during start$"
    with pytest.raises(UpstreamUnavailable, match=message):
        await within(tool(pool, "echo", config))
    with pytest.raises(UpstreamUnavailable, match=message):
        await within(tool(pool, "echo", config))
    with pytest.raises(UpstreamUnavailable) as e:
        await tool(pool, "echo", config)
    assert str(e.value) == "upstream test unavailable, retrying in 0.5s"
    assert e.value.retryAfter == 0.5
    assert pool.counters["test"] == {"starts": 0, "restarts": 0, "failures": 2}
    clock.advance(0.5)
    with pytest.raises(UpstreamUnavailable, match=message):
        await within(tool(pool, "echo", config))
    [health] = pool.health()
    assert health["retryIn"] == 1.0 and health["failures"] == 3
    clock.advance(0.4)
    with pytest.raises(UpstreamUnavailable, match=r"retrying in 0\.6s"):
        await tool(pool, "echo", config)
    clock.advance(0.6)
    with pytest.raises(UpstreamUnavailable, match=message):
        await within(tool(pool, "echo", config))
    assert pool.health()[0]["retryIn"] == 1.0  # capped by backoffMax


@pytest_twisted.ensureDeferred
async def test_startTimeout(pools) -> None:
    """The call's timeout covers the start; a server that never answers is stopped."""
    clock = Clock()
    factory, made = recording(clock)
    pool = pools(clock=clock, upstreamFactory=factory)
    call = tool(pool, "echo", makeConfig("100", command="sleep"), timeout=5)
    clock.advance(5)
    with pytest.raises(UpstreamTimeout, match="did not start within 5 s"):
        await call
    [upstream] = made
    assert upstream.alive
    clock.advance(25)  # the start's own timeout: stdin closed
    clock.advance(2)  # SIGTERM
    await within(upstream.stop())
    assert upstream.exitSignal == 15
    assert pool.health()[0]["lastError"] == "upstream test did not answer initialize in time"


@pytest_twisted.ensureDeferred
async def test_cancelCall(pools) -> None:
    """Cancelling a pool call cancels the request upstream."""
    pool = pools()
    config = makeConfig(TESTSERVER)
    await pid(pool, config)
    held = tool(pool, "hold", config, key="k")
    held.cancel()
    with pytest.raises(CancelledError):
        await held
    cancelled = await within(tool(pool, "cancellations", config))
    assert cancelled["structuredContent"] == {"ids": [3]}
    await tool(pool, "release", config, key="k")


# -- idle ------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_idleStop(pools) -> None:
    """An upstream unused for the idle TTL is stopped; the next call starts another."""
    clock = Clock()
    factory, made = recording(clock)
    pool = pools(clock=clock, upstreamFactory=factory, idleTtl=10)
    pool.start()
    config = makeConfig(ECHO)
    await within(tool(pool, "echo", config, text="x"))
    clock.advance(9.9)
    assert made[0].alive
    clock.advance(0.1)
    assert not made[0].alive
    await within(made[0].stop())
    assert pool.health() == []
    await within(tool(pool, "echo", config, text="x"))
    assert len(made) == 2 and made[1].alive
    assert pool.counters["test"] == {"starts": 2, "restarts": 0, "failures": 0}


@pytest_twisted.ensureDeferred
async def test_busyNotIdle(pools) -> None:
    """An upstream with a call in flight is not stopped as idle."""
    clock = Clock()
    factory, made = recording(clock)
    pool = pools(clock=clock, upstreamFactory=factory, idleTtl=10)
    pool.start()
    config = makeConfig(TESTSERVER)
    held = tool(pool, "hold", config, timeout=100, key="k")
    await pid(pool, config)
    clock.pump([10, 10, 10])
    assert made[0].alive
    await tool(pool, "release", config, key="k")
    await within(held)
    clock.pump([10, 10])
    assert not made[0].alive
    await within(made[0].stop())


@pytest_twisted.ensureDeferred
async def test_sweepSurvivesErrors(pools, events) -> None:
    """An error in a sweep is logged and the sweeps go on."""

    class BrokenPool(UpstreamPool):
        sweeps = 0

        def _sweep(self) -> None:
            BrokenPool.sweeps += 1
            raise RuntimeError("boom")

    clock = Clock()
    pool = BrokenPool(reactor, clock=clock, idleTtl=10)
    pool.start()
    clock.pump([10, 10, 10])
    assert BrokenPool.sweeps == 3
    failures = [e for e in events if e.get("log_format") == "upstream pool sweep failed"]
    assert len(failures) == 3
    await within(pool.stop())


# -- stopping --------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_stopAll(pools) -> None:
    """stopAll() fires once every process has ended; the pool stays usable."""
    pool = pools()
    pids = [await pid(pool, makeConfig(TESTSERVER), i) for i in ("i1", "i2", "i3")]
    await within(pool.stopAll())
    assert all(gone(p) for p in pids)
    assert pool.health() == []
    assert await pid(pool, makeConfig(TESTSERVER)) not in pids


@pytest_twisted.ensureDeferred
async def test_stopDuringStart(pools) -> None:
    """stopAll() during a start ends that process and fails its callers."""
    pool = pools()
    call = tool(pool, "echo", makeConfig(TESTSERVER))
    await within(pool.stopAll())
    with pytest.raises(UpstreamUnavailable):
        await within(call)


@pytest_twisted.ensureDeferred
async def test_service(pools) -> None:
    """The pool's service stops every process; calls fail until restarted."""
    pool = pools()
    service = pool.service()
    service.startService()
    first = await pid(pool, makeConfig(TESTSERVER))
    await within(service.stopService())
    assert gone(first)
    with pytest.raises(UpstreamUnavailable, match="the proxy is stopping"):
        await tool(pool, "echo", makeConfig(TESTSERVER))
    service.startService()
    assert await pid(pool, makeConfig(TESTSERVER)) != first


# -- pluggable transports and hooks ------------------------------------------


@pytest_twisted.ensureDeferred
async def test_unsupportedTransport(pools) -> None:
    """A transport no factory serves fails at once, every time, without backoff."""
    pool = pools()
    config = makeConfig(TESTSERVER, transportType="CARRIER_PIGEON")
    for _ in range(2):
        with pytest.raises(UpstreamUnavailable, match="transport CARRIER_PIGEON is not supported"):
            await tool(pool, "echo", config)
    assert pool.counters["test"]["failures"] == 0


@pytest_twisted.ensureDeferred
async def test_factoryByTransport(pools) -> None:
    """The factory, not the pool, decides how each transport is reached."""
    pool = pools(upstreamFactory=byTransport({"SSE": stdioFactory(reactor)}))
    assert await pid(pool, makeConfig(TESTSERVER, transportType="SSE"))
    with pytest.raises(UpstreamUnavailable, match="transport STDIO is not supported"):
        await tool(pool, "echo", makeConfig(TESTSERVER, name="other"))


def test_stdioFactorySettings() -> None:
    """
    stdioFactory passes its settings on, and merges its client capabilities
    with the config's (which win).
    """
    make = stdioFactory(
        reactor, clientCapabilities={"roots": {}, "sampling": {"a": 1}}, stopGrace=0.5
    )
    config = attrs.evolve(
        makeConfig(TESTSERVER), clientCapabilities={"sampling": {}, "elicitation": {}}
    )
    upstream = make(config, None, None)
    assert isinstance(upstream, StdioUpstream) and upstream.state == "new"
    assert upstream.clientCapabilities == {"roots": {}, "sampling": {}, "elicitation": {}}
    assert upstream.stopGrace == 0.5 and upstream.config is config


@pytest_twisted.ensureDeferred
async def test_onMessage(pools) -> None:
    """Messages an upstream sends on its own reach the pool's hook with their key."""
    seen: list[tuple[Any, ...]] = []
    pool = pools(onMessage=lambda *a: seen.append(a))
    config = makeConfig(TESTSERVER)
    await within(tool(pool, "notify", config, instanceId="inst", data="d"))
    [(instanceId, seenConfig, upstream, message)] = seen
    assert (instanceId, seenConfig) == ("inst", config)
    assert isinstance(upstream, StdioUpstream)
    assert message["params"] == {"level": "info", "data": "d"}


# -- discovery -------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_discoverTools() -> None:
    """discoverTools follows the pages of tools/list and stops the process."""
    config = makeConfig(TESTSERVER, "--extra-tools", "25", "--page-size", "7")
    tools = await within(discoverTools(reactor, config, 20))
    names = [t["name"] for t in tools]
    assert len(names) == 41 == len(set(names))
    assert names[:2] == ["echo", "initParams"] and names[-1] == "extra-24"


@pytest_twisted.ensureDeferred
async def test_discoverToolsEcho() -> None:
    """discoverTools lists the example server's tools with their schemas."""
    tools = await within(discoverTools(reactor, makeConfig(ECHO), 20))
    assert [t["name"] for t in tools] == ["echo", "add", "sleep"]
    assert tools[0]["inputSchema"]["required"] == ["text"]


@pytest_twisted.ensureDeferred
async def test_discoverToolsFailure() -> None:
    """discoverTools fails clearly for a server that cannot start or answer."""
    with pytest.raises(UpstreamUnavailable, match="not found on PATH"):
        await discoverTools(reactor, makeConfig(command="no-such-server-xyz"), 5)
    with pytest.raises(UpstreamUnavailable, match=r"exited \(status 2\) during start"):
        await within(discoverTools(reactor, makeConfig(TESTSERVER, "--exit-at-start", "2"), 5))
