"""
Tests for L{mcp_proxy.logwriter}: the request log written by a real child
process (C{python -m mcp_proxy.logwriter}) to a real database.
"""

from __future__ import annotations

import os
import signal
from typing import Any, AsyncIterator

import pytest
import pytest_twisted
from attrs import define, field
from twisted.internet import reactor
from twisted.internet.task import deferLater
from zope.interface.verify import verifyObject

from mcp_proxy import jsonrpc
from mcp_proxy.config import DatabaseURL
from mcp_proxy.dispatch import CallContext
from mcp_proxy.interfaces import IRequestLog
from mcp_proxy.logwriter import LoggedError, ProcessRequestLog, decodeEntry, encodeEntry
from mcp_proxy.models import STREAMABLE_HTTPS
from mcp_proxy.requestlog import INLINE_LIMIT, RequestLog, decodePayload


def databaseOf(repository: Any) -> DatabaseURL:
    if repository.kind == "sqlite":
        return DatabaseURL(kind="sqlite", path=repository.path)
    return DatabaseURL(kind="postgresql", dsn=repository.dsn)


async def waitFor(predicate: Any, timeout: float = 20.0) -> None:
    waited = 0.0
    while not predicate():
        if waited > timeout:
            raise AssertionError("timed out waiting")
        await deferLater(reactor, 0.05, lambda: None)
        waited += 0.05


@define
class World:
    repository: Any
    ctx: CallContext
    made: list[ProcessRequestLog] = field(factory=list)

    def log(self, **options: Any) -> ProcessRequestLog:
        made = ProcessRequestLog(database=databaseOf(self.repository), reactor=reactor, **options)
        self.made.append(made)
        return made

    def call(self, log: Any, n: int, size: int = 100) -> None:
        params = {"name": f"tool{n}", "arguments": {"n": n, "text": "é" * 3}}
        result = jsonrpc.RawJSON(
            b'{"content":[{"type":"text","text":"answer %d"}],"isError":false}' % n
        )
        log.record(self.ctx, "tools/call", params, result, None, n + 0.4, requestBytes=size)

    async def rows(self) -> list[Any]:
        rows: list[Any] = await self.repository.listRequestLogs(None, None, 100_000, True)
        return rows


@pytest_twisted.async_yield_fixture
async def world(repository: Any) -> AsyncIterator[World]:
    org = await repository.createOrganization("org")
    group = await repository.createToolGroup(org.id, "group", "", [])
    instance = await repository.createInstance(org.id, "main", "", group.id, "API_KEY")
    made = World(
        repository,
        CallContext(
            instanceId=instance.id,
            organizationId=org.id,
            keyId="key",
            sessionId=None,
            transport=STREAMABLE_HTTPS,
        ),
    )
    yield made
    for log in made.made:
        await log.stop()


def test_framesRoundTrip() -> None:
    """
    An entry frame carries the result's bytes as they are and a described
    error; the child gets back what L{RequestLog.record} takes.
    """
    ctx = CallContext(
        instanceId="i", organizationId="o", keyId="k", sessionId=None, transport="SSE"
    )
    raw = b'{ "content" : [],\n "x": 1.0 }'
    frame = encodeEntry(ctx, "tools/call", {"name": "t\x00"}, raw, None, 1.5, None, "ua", 7.25, 9)
    assert frame is not None
    origin, method, params, result, error, ms, inputBytes, ua, at, size = decodeEntry(frame)
    assert (origin.instanceId, origin.organizationId, origin.transport) == ("i", "o", "SSE")
    assert (method, params, result, error) == ("tools/call", {"name": "t\x00"}, raw, None)
    assert (ms, inputBytes, ua, at, size) == (1.5, None, "ua", 7.25, 9)
    failed = encodeEntry(
        ctx, "tools/call", {}, None, jsonrpc.JsonRpcError(-32602, "bad"), 1, None, None, 1, 2
    )
    assert failed is not None
    error = decodeEntry(failed)[4]
    assert isinstance(error, LoggedError) and (error.message, error.code) == ("bad", "-32602")
    assert encodeEntry(ctx, "tools/call", {"x": object()}, None, None, 1, None, None, 1, 2) is None
    with pytest.raises(ValueError):
        decodeEntry(b"[1,2]")


@pytest_twisted.ensureDeferred
async def test_interface(world: World) -> None:
    """
    Both request logs provide L{IRequestLog}.
    """
    log = world.log()
    verifyObject(IRequestLog, log)
    verifyObject(IRequestLog, RequestLog(repository=world.repository, reactor=reactor))


@pytest_twisted.ensureDeferred
async def test_everyRowWritten(world: World) -> None:
    """
    N recorded requests become N rows, written by the child process, with
    their fields and readable data; a large one is framed in a thread;
    stop() returns once all are written and the child has ended.
    """
    log = world.log(batchSize=50)
    log.start()
    for n in range(300):
        world.call(log, n)
    world.call(log, 300, size=INLINE_LIMIT + 1)
    log.record(
        world.ctx,
        "tools/list",
        {},
        None,
        jsonrpc.JsonRpcError(-32603, "upstream down"),
        2.0,
        requestBytes=40,
    )
    await log.flush()
    assert log.written == 302 and log.queueDepth == 0
    assert log.pid is not None
    pid = log.pid
    await log.stop()
    assert log.pid is None
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    rows = await world.rows()
    assert len(rows) == 302 and log.queued == 302 and log.dropped == 0
    byTool = {row.toolName: row for row in rows}
    row = byTool["tool7"]
    assert row.durationMs == 7 and row.responseStatus == "200"
    assert row.data is not None
    request, _ = decodePayload(row.data.inputDataCompressed)
    response, _ = decodePayload(row.data.outputDataCompressed)
    assert request == {
        "method": "tools/call",
        "params": {"name": "tool7", "arguments": {"n": 7, "text": "ééé"}},
    }
    assert response["content"][0]["text"] == "answer 7"
    assert byTool["tool300"].data is not None
    failed = byTool["tools/list"]
    assert (failed.responseStatus, failed.errorMessage, failed.errorCode) == (
        "500",
        "upstream down",
        "-32603",
    )


@pytest_twisted.ensureDeferred
async def test_recordedBeforeStart(world: World) -> None:
    """
    Rows recorded before start() are sent once the child is ready.
    """
    log = world.log()
    for n in range(5):
        world.call(log, n)
    log.start()
    await log.stop()
    assert len(await world.rows()) == 5 and log.written == 5


@pytest_twisted.ensureDeferred
async def test_childDies(world: World) -> None:
    """
    When the child is killed, what it had not written is counted as lost
    (dropped), a new child starts, and later rows are written.
    """
    log = world.log()
    log.start()
    await waitFor(lambda: log._ready)
    first = log.pid
    assert first is not None
    world.call(log, 1)
    await log.flush()
    assert log.written == 1
    os.kill(first, signal.SIGKILL)
    await waitFor(lambda: log.pid is not None and log.pid != first and log._ready)
    assert log.starts == 2
    for n in range(2, 12):
        world.call(log, n)
    await log.flush()
    await log.stop()
    assert log.written == 11 and len(await world.rows()) == 11


@pytest_twisted.ensureDeferred
async def test_boundWhileChildAway(world: World) -> None:
    """
    While no child takes rows, at most maxQueue wait in the proxy; the
    oldest are dropped and counted.
    """
    log = world.log(maxQueue=10)
    for n in range(25):
        world.call(log, n)
    assert log.queueDepth == 10 and log.dropped == 15
    log.start()
    await log.stop()
    names = sorted(int(row.toolName[4:]) for row in await world.rows())
    assert names == list(range(15, 25))


@pytest_twisted.ensureDeferred
async def test_notLoggedAndAfterStop(world: World) -> None:
    """
    Validation-mode requests and other methods are not logged; a row
    recorded after stop() is dropped.
    """
    log = world.log()
    log.start()
    log.record(world.ctx, "tools/call", {}, b"{}", None, 1, validationMode=True, requestBytes=2)
    log.record(world.ctx, "ping", {}, b"{}", None, 1, requestBytes=2)
    await log.stop()
    assert log.queued == 0
    world.call(log, 1)
    assert (log.queued, log.dropped) == (1, 1)
    assert await world.rows() == []


@pytest_twisted.ensureDeferred
async def test_childReportsStats(world: World) -> None:
    """
    The child's counters reach the proxy while it works, not only on
    flush: /metrics shows progress.
    """
    log = world.log(flushInterval=0.05)
    log.start()
    for n in range(20):
        world.call(log, n)
    await waitFor(lambda: log.written == 20)
    assert log.batches >= 1 and log.queueDepth == 0
    assert (log.refused, log.failedWrites, log.dropped) == (0, 0, 0)
    assert len(await world.rows()) == 20
    await log.stop()
    assert log.written == 20


@pytest_twisted.ensureDeferred
async def test_childOutlivesSignals(world: World) -> None:
    """
    SIGINT and SIGTERM (a Ctrl-C or a service manager reaching the whole
    process group) do not end the writer: it still writes what the proxy
    sends while it stops.
    """
    log = world.log()
    log.start()
    await waitFor(lambda: log._ready)
    pid = log.pid
    assert pid is not None
    os.kill(pid, signal.SIGINT)
    os.kill(pid, signal.SIGTERM)
    await deferLater(reactor, 0.3, lambda: None)
    assert log.pid == pid and log.starts == 1
    for n in range(3):
        world.call(log, n)
    await log.stop()
    assert log.written == 3 and len(await world.rows()) == 3


@pytest.mark.parametrize(
    "options",
    [{"batchSize": 0}, {"flushInterval": 0}, {"maxQueue": -1}, {"maxDataBytes": -1}],
)
def test_badOptions(options: dict[str, Any]) -> None:
    """
    Impossible options are refused when the log is made, as RequestLog's
    are (the writer process would refuse them too, and die at each start).
    """
    with pytest.raises(ValueError):
        ProcessRequestLog(
            database=DatabaseURL(kind="sqlite", path="unused.sqlite3"), reactor=reactor, **options
        )
