"""
Tests for the request log (L{mcp_proxy.requestlog}).

The rows go to the real SQLite and PostgreSQL repositories (the
C{repository} fixture runs each test on both); the log's timers run on a
L{Clock}, so that batching, retries and timeouts happen exactly when a test
advances it, while the worker thread and the database run for real.  The
outages come from L{FlakyRepository}, a wrapper of the real repository that
fails or loses inserts while told to.
"""

from __future__ import annotations

import datetime
import gzip
import json
import math
from typing import Any, AsyncIterator, Optional, Sequence

import pytest
import pytest_twisted
from attrs import define, field
from twisted.internet import reactor
from twisted.internet.defer import Deferred, fail
from twisted.internet.task import Clock, deferLater
from twisted.logger import formatEvent, globalLogPublisher
from twisted.python.failure import Failure

from mcp_proxy import jsonrpc
from mcp_proxy.dispatch import CallContext
from mcp_proxy.errors import DatabaseUnavailable
from mcp_proxy.models import AUTH_API_KEY, SSE, STREAMABLE_HTTPS, RequestLogRow
from mcp_proxy.requestlog import (
    DEFAULT_MAX_DATA_BYTES,
    RETRY_MAX,
    Encoding,
    Entry,
    RequestLog,
    buildRow,
    decodePayload,
    describeError,
    skipNote,
)

SECRET = "s3cr3t-argument-that-must-not-be-logged"
#: The clock's time when a test starts: 2023-11-14T22:13:20.250Z.
START = 1_700_000_000.25
START_TIME = datetime.datetime(2023, 11, 14, 22, 13, 20, 250000)


def compact(value: Any) -> bytes:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode()


@define
class FlakyRepository:
    """
    The real repository, whose C{insertRequestLogs} fails while C{down}
    (as an unreachable database does), or commits and then fails while
    C{loseAnswers} (as a connection lost after the commit does).
    """

    real: Any
    down: bool = False
    loseAnswers: bool = False
    attempts: int = 0

    @property
    def queryCounts(self) -> dict[str, int]:
        counts: dict[str, int] = self.real.queryCounts
        return counts

    def insertRequestLogs(self, rows: Sequence[RequestLogRow]) -> Deferred[int]:
        self.attempts += 1
        if self.down:
            return fail(DatabaseUnavailable("PostgreSQL connection failed: refused"))
        d: Deferred[int] = self.real.insertRequestLogs(rows)
        if self.loseAnswers:

            def lost(_: int) -> int:
                raise DatabaseUnavailable("the connection was lost")

            d.addCallback(lost)
        return d

    def listRequestLogs(self, *args: Any) -> Deferred[list[RequestLogRow]]:
        rows: Deferred[list[RequestLogRow]] = self.real.listRequestLogs(*args)
        return rows


@define
class Harness:
    """
    An instance to log for, a clock, and the request logs made, stopped
    after the test.
    """

    repository: Any
    ctx: CallContext
    clock: Clock
    made: list[RequestLog] = field(factory=list)

    def log(self, repository: Any = None, start: bool = True, **options: Any) -> RequestLog:
        requestLog = RequestLog(
            repository=repository if repository is not None else self.repository,
            reactor=reactor,
            clock=self.clock,
            **options,
        )
        if start:
            requestLog.start()
        self.made.append(requestLog)
        return requestLog

    def call(
        self, requestLog: RequestLog, n: int, ctx: Optional[CallContext] = None, **kw: Any
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """
        Record a successful tools/call of tool C{tool<n>}.

        @return: its params and result.
        """
        params = {"name": f"tool{n}", "arguments": {"n": n, "token": SECRET}}
        result = {"content": [{"type": "text", "text": f"answer {n}"}], "isError": False}
        requestLog.record(ctx or self.ctx, "tools/call", params, result, None, n, **kw)
        return params, result

    async def rows(self, limit: int = 10_000) -> list[RequestLogRow]:
        rows: list[RequestLogRow] = await self.repository.listRequestLogs(None, None, limit, True)
        return rows

    async def settle(self, requestLog: RequestLog, advance: float = 0.0) -> None:
        """
        Advance the clock, then wait for the worker and the inserts.
        """
        self.clock.advance(advance)
        await requestLog.whenSettled()


async def makeContext(repository: Any, transport: str = STREAMABLE_HTTPS) -> CallContext:
    org = await repository.createOrganization("org")
    group = await repository.createToolGroup(org.id, "group", "", [])
    instance = await repository.createInstance(org.id, "main", "", group.id, AUTH_API_KEY)
    return CallContext(
        instanceId=instance.id,
        organizationId=org.id,
        keyId="key-id",
        sessionId=None,
        transport=transport,
    )


@pytest_twisted.async_yield_fixture
async def harness(repository: Any) -> AsyncIterator[Harness]:
    clock = Clock()
    clock.advance(START)
    made = Harness(repository, await makeContext(repository), clock)
    yield made
    for requestLog in made.made:
        stopped = requestLog.stop()
        for _ in range(1000):
            if stopped.called:
                break
            clock.advance(1)
            await deferLater(reactor, 0.01)
        assert stopped.called
        accounted = requestLog.written + requestLog.dropped + requestLog.refused
        assert requestLog.queued == accounted + requestLog.queueDepth


@pytest.fixture
def logged() -> Any:
    """
    The text of every log event emitted during the test.
    """
    events: list[str] = []

    def observe(event: Any) -> None:
        events.append(formatEvent(event) + " " + repr(event))

    globalLogPublisher.addObserver(observe)
    yield events
    globalLogPublisher.removeObserver(observe)


def assertNoSecret(events: list[str]) -> None:
    assert events, "expected log events"
    for text in events:
        assert SECRET not in text
        assert "tool1" not in text


# -- what is written -------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_rowsAndFields(harness: Harness) -> None:
    """
    Each logged method gets one row with the origin's columns; a successful
    tools/call also gets a detail row with the gzipped request and result;
    other methods, and validation-mode requests, get none.
    """
    log = harness.log()
    ctx = harness.ctx
    sse = CallContext(ctx.instanceId, ctx.organizationId, "k", "s", SSE)
    params, result = harness.call(log, 7, userAgent="claude-code/1.0")
    tools = jsonrpc.RawJSON(b'{"tools":[{"name":"echo"}]}')
    log.record(ctx, "tools/list", None, tools, None, 1.4)
    log.record(
        sse,
        "tools/call",
        {"name": "bad"},
        None,
        jsonrpc.JsonRpcError(-32603, "Unknown tool: bad"),
        2,
    )
    log.record(ctx, "tools/call", {"name": "boom"}, None, Failure(ValueError("it broke")), 3)
    log.record(ctx, "resources/read", {"uri": "file:///a"}, {"contents": []}, None, 4, inputBytes=0)
    log.record(ctx, "prompts/get", {"name": "p"}, {"messages": []}, None, 5)
    log.record(ctx, "ping", {}, {}, None, 6)
    log.record(ctx, "initialize", {}, {}, None, 6)
    log.record(ctx, "tools/call", params, result, None, 8, validationMode=True)
    assert log.queued == 6
    await log.flush()
    assert (log.written, log.dropped, log.refused, log.failedWrites) == (6, 0, 0, 0)
    rows = {row.toolName: row for row in await harness.rows()}
    assert sorted(rows) == ["bad", "boom", "prompts/get", "resources/read", "tool7", "tools/list"]
    for row in rows.values():
        assert row.instanceId == ctx.instanceId
        assert row.organizationId == ctx.organizationId
        assert row.createdAt == START_TIME

    call = rows["tool7"]
    assert (call.method, call.transportType, call.responseStatus) == (
        "tools/call",
        STREAMABLE_HTTPS,
        "200",
    )
    assert (call.durationMs, call.errorMessage, call.errorCode) == (7, None, None)
    assert call.inputBytes == len(compact(params))
    assert call.outputBytes == len(compact(result))
    assert call.userAgent == "claude-code/1.0"
    data = call.data
    assert data is not None
    request = compact({"method": "tools/call", "params": params})
    response = compact(result)
    assert gzip.decompress(data.inputDataCompressed) == request
    assert gzip.decompress(data.outputDataCompressed) == response
    assert (data.originalInputSize, data.originalOutputSize) == (len(request), len(response))
    assert data.compressedInputSize == len(data.inputDataCompressed)
    assert data.compressedOutputSize == len(data.outputDataCompressed)
    assert math.isclose(
        data.compressionRatio,
        (data.compressedInputSize + data.compressedOutputSize) / (len(request) + len(response)),
    )
    assert decodePayload(data.inputDataCompressed) == (
        {"method": "tools/call", "params": params},
        "plain",
    )

    listed = rows["tools/list"]
    assert (listed.method, listed.responseStatus, listed.durationMs) == ("tools/list", "200", 1)
    assert (listed.inputBytes, listed.outputBytes) == (2, len(tools))
    assert listed.data is None and listed.userAgent is None

    bad = rows["bad"]
    assert (bad.transportType, bad.responseStatus) == (SSE, "500")
    assert (bad.errorMessage, bad.errorCode) == ("Unknown tool: bad", "-32603")
    assert bad.outputBytes is None and bad.data is None

    boom = rows["boom"]
    assert (boom.errorMessage, boom.errorCode, boom.data) == ("it broke", "ValueError", None)

    read = rows["resources/read"]
    assert (read.method, read.inputBytes, read.outputBytes) == ("resources/read", 0, 15)
    assert read.data is None
    assert rows["prompts/get"].method == "prompts/get"


@pytest_twisted.ensureDeferred
async def test_manyRecordsExactRows(harness: Harness) -> None:
    """
    N recorded calls are N rows and N detail rows, each with its own
    request and response.
    """
    log = harness.log(batchSize=64)
    for n in range(300):
        harness.call(log, n)
    await log.flush()
    rows = await harness.rows()
    assert len(rows) == 300 == log.written
    assert len({row.id for row in rows}) == 300
    for row in rows:
        n = int(row.toolName[4:])
        assert row.durationMs == n
        assert row.data is not None
        request, form = decodePayload(row.data.inputDataCompressed)
        assert form == "plain" and request["params"]["arguments"]["n"] == n
        response, _ = decodePayload(row.data.outputDataCompressed)
        assert response["content"][0]["text"] == f"answer {n}"


# -- the response path ------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_recordOnlyQueues(harness: Harness) -> None:
    """
    record() returns at once without touching the repository or the
    worker: it keeps the very objects it was given and schedules one call
    for the next reactor turn, whatever the number of records.
    """
    log = harness.log()
    before = dict(harness.repository.queryCounts)
    params, result = harness.call(log, 1)
    for n in range(2, 50):
        harness.call(log, n)
    assert dict(harness.repository.queryCounts) == before
    assert len(harness.clock.getDelayedCalls()) == 1
    assert log.queueDepth == 49 and log.written == 0
    kept = log._incoming[0]
    assert kept[4] is params and kept[5] is result
    assert log._job is None
    harness.clock.advance(0)
    # The rows are built in the worker thread: not yet.
    assert log._job is not None and not log._job.called
    assert dict(harness.repository.queryCounts) == before
    await log.flush()
    assert log.written == 49


# -- batching ---------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_batching(harness: Harness) -> None:
    """
    Full batches are written at once, one insert each; the rest waits for
    the flush interval.  Rows without detail take one statement per batch.
    """
    log = harness.log(batchSize=200, flushInterval=0.5)
    before = harness.repository.queryCounts.get("insertRequestLogs", 0)
    tools = jsonrpc.RawJSON(b'{"tools":[]}')
    for n in range(450):
        log.record(harness.ctx, "tools/list", {}, tools, None, n)
    await harness.settle(log)
    assert harness.repository.queryCounts["insertRequestLogs"] - before == 2
    assert (log.written, log.batches, log.queueDepth) == (400, 2, 50)
    await harness.settle(log, 0.25)
    assert log.written == 400
    await harness.settle(log, 0.25)
    assert harness.repository.queryCounts["insertRequestLogs"] - before == math.ceil(450 / 200)
    assert (log.written, log.batches, log.queueDepth) == (450, 3, 0)
    assert len(await harness.rows()) == 450


@pytest_twisted.ensureDeferred
async def test_flushInterval(harness: Harness) -> None:
    """
    A lone row is written one flush interval after it was built.
    """
    log = harness.log(flushInterval=2.0)
    harness.call(log, 1)
    await harness.settle(log)
    await harness.settle(log, 1.5)
    assert log.written == 0 and log.queueDepth == 1
    await harness.settle(log, 0.5)
    assert log.written == 1 and log.queueDepth == 0


# -- bounds -----------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_boundDropsOldest(harness: Harness) -> None:
    """
    Beyond maxQueue rows, the oldest are dropped and counted.
    """
    log = harness.log(maxQueue=100)
    for n in range(150):
        harness.call(log, n)
    assert (log.queued, log.dropped, log.queueDepth) == (150, 50, 100)
    await log.flush()
    names = sorted(int(row.toolName[4:]) for row in await harness.rows())
    assert names == list(range(50, 150))
    assert (log.written, log.dropped) == (100, 50)


@pytest_twisted.ensureDeferred
async def test_boundWhileBuilding(harness: Harness) -> None:
    """
    Rows being built count against the bound; when they are the oldest,
    they are the ones dropped.
    """
    flaky = FlakyRepository(harness.repository, down=True)
    log = harness.log(repository=flaky, maxQueue=10)
    for n in range(10):
        harness.call(log, n)
    harness.clock.advance(0)
    assert log._jobSize == 10
    for n in range(10, 14):
        harness.call(log, n)
    assert log.dropped == 4 and log.queueDepth == 10
    await harness.settle(log)
    flaky.down = False
    await log.flush()
    names = sorted(int(row.toolName[4:]) for row in await harness.rows())
    assert names == list(range(4, 14))


@pytest_twisted.ensureDeferred
async def test_byteBound(harness: Harness) -> None:
    """
    Beyond maxQueueBytes of compressed payloads, the oldest rows are
    dropped too.
    """
    flaky = FlakyRepository(harness.repository, down=True)
    log = harness.log(repository=flaky, maxQueueBytes=2000)
    for n in range(40):
        harness.call(log, n)
    await harness.settle(log)
    assert log.dropped > 0
    assert log._queueBytes <= 2000
    kept = log.queueDepth
    flaky.down = False
    await log.flush()
    names = sorted(int(row.toolName[4:]) for row in await harness.rows())
    assert names == list(range(40 - kept, 40))


# -- failures ---------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_outageRetriedWithBackoff(harness: Harness, logged: list[str]) -> None:
    """
    While the database is down, rows wait (within the bound, dropping the
    oldest) and the write is retried after 0.5 s, doubling up to 30 s;
    when it is back, the waiting rows are written.  The log lines say how
    many rows, never what is in them.
    """
    flaky = FlakyRepository(harness.repository, down=True)
    log = harness.log(repository=flaky, batchSize=100, maxQueue=300)
    for n in range(100):
        harness.call(log, n)
    await harness.settle(log, 0.5)
    assert (log.failedWrites, log.written, log.queueDepth) == (1, 0, 100)
    delays = []
    for _ in range(8):
        [retry] = harness.clock.getDelayedCalls()
        delays.append(retry.getTime() - harness.clock.seconds())
        await harness.settle(log, delays[-1])
    assert delays == [0.5, 1, 2, 4, 8, 16, RETRY_MAX, RETRY_MAX]
    assert (log.failedWrites, log.written) == (9, 0)
    # Meanwhile more requests come: the newest 300 are kept.
    for n in range(100, 400):
        harness.call(log, n)
    await harness.settle(log)
    assert (log.queueDepth, log.dropped) == (300, 100)
    flaky.down = False
    [retry] = harness.clock.getDelayedCalls()
    await harness.settle(log, retry.getTime() - harness.clock.seconds())
    assert (log.written, log.dropped, log.queueDepth) == (300, 100, 0)
    names = sorted(int(row.toolName[4:]) for row in await harness.rows())
    assert names == list(range(100, 400))
    assert harness.clock.getDelayedCalls() == []
    assert any("retrying in" in text for text in logged)
    assert any("writing works again" in text for text in logged)
    assertNoSecret(logged)


@pytest_twisted.ensureDeferred
async def test_refusedRowIsolated(harness: Harness, logged: list[str]) -> None:
    """
    A row the database refuses for good (its instance is unknown) is
    found by splitting the batch, dropped and counted; the others of its
    batch are written, and nothing is retried.
    """
    log = harness.log(batchSize=50)
    ghost = CallContext("no-such-instance", harness.ctx.organizationId, "k", None, SSE)
    for n in range(50):
        harness.call(log, n, ctx=ghost if n == 17 else None)
    await log.flush()
    assert (log.written, log.refused, log.failedWrites) == (49, 1, 0)
    names = sorted(int(row.toolName[4:]) for row in await harness.rows())
    assert names == [n for n in range(50) if n != 17]
    assert harness.clock.getDelayedCalls() == []
    assert any("refused a row" in text for text in logged)
    assertNoSecret(logged)


@pytest_twisted.ensureDeferred
async def test_lostAnswerNotWrittenTwice(harness: Harness) -> None:
    """
    An insert whose commit succeeded but whose answer was lost is retried;
    the rows already there are counted as written, once.
    """
    flaky = FlakyRepository(harness.repository, loseAnswers=True)
    log = harness.log(repository=flaky)
    for n in range(5):
        harness.call(log, n)
    await harness.settle(log)
    await harness.settle(log, 0.5)
    assert log.failedWrites == 1
    flaky.loseAnswers = False
    [retry] = harness.clock.getDelayedCalls()
    await harness.settle(log, retry.getTime() - harness.clock.seconds())
    assert (log.written, log.refused, log.queueDepth) == (5, 0, 0)
    assert len(await harness.rows()) == 5


# -- stopping ---------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_stopWritesEverything(harness: Harness) -> None:
    """
    stop() writes every row: those waiting for a batch, those still
    being built, those recorded before the worker ran, and those recorded
    while it stops.
    """
    log = harness.log(batchSize=200, flushInterval=60.0)
    for n in range(250):
        harness.call(log, n)
    await harness.settle(log)
    assert log.written == 200
    for n in range(250, 300):
        harness.call(log, n)
    harness.clock.advance(0)
    assert log._job is not None
    for n in range(300, 320):
        harness.call(log, n)
    stopped = log.stop()
    harness.call(log, 320)
    harness.clock.advance(0)
    await stopped
    assert (log.written, log.dropped, log.queueDepth) == (321, 0, 0)
    assert len(await harness.rows()) == 321
    assert harness.clock.getDelayedCalls() == []
    harness.call(log, 321)
    assert log.dropped == 1 and log.queued == 322


@pytest_twisted.ensureDeferred
async def test_stopTimeout(harness: Harness, logged: list[str]) -> None:
    """
    When the database stays down, stop() gives up after its timeout and
    reports how many rows it could not write.
    """
    flaky = FlakyRepository(harness.repository, down=True)
    log = harness.log(repository=flaky, stopTimeout=5.0)
    for n in range(10):
        harness.call(log, n)
    stopped = log.stop()
    await log.whenSettled()
    for _ in range(5):
        assert not stopped.called
        await harness.settle(log, 1.0)
    await stopped
    assert (log.written, log.dropped, log.queueDepth) == (0, 10, 0)
    assert harness.clock.getDelayedCalls() == []
    assert any("10 rows could not be written" in text for text in logged)
    assertNoSecret(logged)


@pytest_twisted.ensureDeferred
async def test_stopBeforeStart(harness: Harness) -> None:
    """
    Rows recorded before start() are written once it runs; a log that
    never started drops them on stop().
    """
    log = harness.log(start=False)
    harness.call(log, 1)
    assert harness.clock.getDelayedCalls() == []
    log.start()
    await log.flush()
    assert log.written == 1
    never = harness.log(start=False)
    harness.call(never, 2)
    await never.stop()
    assert never.dropped == 1


# -- options ----------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_largePayloadSkipsDetail(harness: Harness) -> None:
    """
    A request or response over maxDataBytes gets its row without detail,
    and the row says why.
    """
    log = harness.log(maxDataBytes=1000)
    harness.call(log, 1)
    big = {"content": [{"type": "text", "text": "x" * 2000}]}
    log.record(harness.ctx, "tools/call", {"name": "big"}, big, None, 1)
    await log.flush()
    rows = {row.toolName: row for row in await harness.rows()}
    assert rows["tool1"].data is not None
    skipped = rows["big"]
    assert skipped.data is None
    assert (skipped.responseStatus, skipped.errorCode) == ("200", None)
    size = len(compact(big))
    assert skipped.outputBytes == size
    assert (
        skipped.errorMessage == f"detail skipped: payload of {size} bytes over the 1000 bytes limit"
    )


def test_skipNote() -> None:
    assert skipNote(6_000_000, DEFAULT_MAX_DATA_BYTES) == (
        "detail skipped: payload of 6000000 bytes over the 5 MB limit"
    )
    assert skipNote(70_000, 64 * 1024).endswith("over the 64 KB limit")


@pytest_twisted.ensureDeferred
async def test_doubleEncoded(harness: Harness) -> None:
    """
    With doubleEncode, the payloads are stored as the origin stored them:
    gzip of the JSON string literal of the JSON text; the reader undoes
    both forms.
    """
    log = harness.log(doubleEncode=True)
    params = {"name": "say", "arguments": {"text": 'こんにちは "quoted" \\ \n\t'}}
    result = {"content": [{"type": "text", "text": "été ✓"}]}
    log.record(harness.ctx, "tools/call", params, result, None, 1)
    await log.flush()
    [row] = await harness.rows()
    assert row.data is not None
    request = compact({"method": "tools/call", "params": params})
    stored = gzip.decompress(row.data.inputDataCompressed)
    assert stored == compact(request.decode())
    assert json.loads(json.loads(stored)) == {"method": "tools/call", "params": params}
    assert row.data.originalInputSize == len(stored)
    assert row.data.originalOutputSize == len(compact(compact(result).decode()))
    assert row.inputBytes == len(compact(params))
    assert decodePayload(row.data.inputDataCompressed) == (
        {"method": "tools/call", "params": params},
        "double",
    )
    assert decodePayload(row.data.outputDataCompressed) == (result, "double")


def test_decodePayloadRefusesGarbage() -> None:
    with pytest.raises(ValueError):
        decodePayload(b"not gzip")
    assert decodePayload(gzip.compress(b'"just text"')) == ("just text", "plain")


def test_options() -> None:
    """
    Impossible options are refused when the log is made.
    """
    for bad in (
        {"batchSize": 0},
        {"flushInterval": 0},
        {"maxQueue": -1},
        {"maxQueueBytes": 0},
        {"maxDataBytes": -1},
        {"stopTimeout": 0},
        {"doubleEncode": "yes"},
    ):
        with pytest.raises((ValueError, TypeError)):
            RequestLog(repository=None, reactor=reactor, **bad)  # type: ignore[arg-type]


def test_describeError() -> None:
    class UpstreamError(Exception):
        code = -32001
        message = "timed out"

    assert describeError(jsonrpc.JsonRpcError(-32602, "bad")) == ("bad", "-32602")
    assert describeError(Failure(KeyError("k"))) == ("'k'", "KeyError")
    assert describeError(RuntimeError()) == ("RuntimeError", "RuntimeError")
    assert describeError(UpstreamError()) == ("timed out", "-32001")
    assert describeError("odd") == ("odd", "UnknownError")


def test_buildRowEdges() -> None:
    """
    Values that cannot be encoded leave the sizes empty instead of losing
    the row; sizes and durations stay within an INTEGER column.
    """
    entry = Entry(
        "i",
        "o",
        STREAMABLE_HTTPS,
        "tools/call",
        {"name": "x", "arguments": {"f": float("nan")}},
        {"ok": object()},
        None,
        float("inf"),
        None,
        "a" * 5000,
        START,
    )
    row = buildRow(entry, Encoding())
    assert (row.inputBytes, row.outputBytes, row.data, row.durationMs) == (None, None, None, 0)
    assert row.userAgent is not None and len(row.userAgent) == 1024
    assert row.createdAt == START_TIME
    huge = buildRow(entry._replace(durationMs=1e12, params={}, result={}), Encoding())
    assert huge.durationMs == 2**31 - 1 and huge.data is not None
