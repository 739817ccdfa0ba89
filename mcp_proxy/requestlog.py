"""
The request log: one "McpServerRequestLog" row per logged MCP request, and
for a successful C{tools/call} one "McpServerRequestData" row with the
gzipped request and response.  See docs/requestlog.md.

The response path calls L{RequestLog.record}, which only appends a tuple to
a queue and arranges, with C{callLater(0, ...)}, for the queue to be
handled after the response has gone.  Then the rows are built (encoded and
compressed, L{buildRow}): those of small requests (at most L{INLINE_LIMIT}
bytes in and out, about 20 µs each) right there on the reactor; those of
large ones, whose serialising and gzip take longer, off the reactor thread
by a worker of the log's own thread pool (L{buildRows}).  The rows wait in
a bounded queue and are written in batches through
L{IRepository.insertRequestLogs}.

Why not every row in the worker: under the GIL, a thread running Python
code does not run in parallel with the reactor but takes turns with it,
and each turn costs the reactor a wait for the GIL after its next system
call.  Handing the worker every request made logging cost about 27 % of
the throughput at 32 concurrent calls, building small rows on the reactor
less than half of that (docs/performance.md).  zlib releases the GIL while
it compresses, so large payloads gain from the thread.

Guarantees: the queue is bounded (the oldest rows go first, and are
counted); a failed write is put back at the front of the queue and retried
with backoff; rows the database refuses for good (an instance that no
longer exists) are isolated and dropped without holding up the others;
L{RequestLog.stop} writes everything recorded before it returns, for at
most its stop timeout.  No log line carries a row's content: only counts
and error class names.
"""

from __future__ import annotations

import collections
import datetime
import json
import math
import zlib
from typing import Any, NamedTuple, Optional, Sequence

from attrs import define, field, frozen, setters, validators
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.defer import TimeoutError as DeferredTimeout
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool
from zope.interface import implementer

from mcp_proxy.errors import Conflict, InvalidInput, NotFound
from mcp_proxy.interfaces import IRepository, IRequestLog
from mcp_proxy.keys import newIds
from mcp_proxy.models import RequestLogData, RequestLogRow
from mcp_proxy.validation import notNegative, positive

log = Logger(namespace="mcp_proxy.requestlog")

#: The MCP methods that get a row.
LOGGED_METHODS = frozenset({"tools/call", "tools/list", "resources/read", "prompts/get"})

#: The method whose successful calls also get a detail ("McpServerRequestData") row.
DETAIL_METHOD = "tools/call"

DEFAULT_BATCH_SIZE = 200
DEFAULT_FLUSH_INTERVAL = 0.5
DEFAULT_MAX_QUEUE = 10_000
DEFAULT_MAX_QUEUE_BYTES = 256 * 1024 * 1024
DEFAULT_MAX_DATA_BYTES = 5 * 1024 * 1024
DEFAULT_STOP_TIMEOUT = 30.0

#: Requests whose HTTP body and result are both at most this many bytes
#: get their row built on the reactor; larger ones (or of unknown size) in
#: the worker thread.
INLINE_LIMIT = 64 * 1024

#: The first and the longest wait before a failed write is tried again.
RETRY_FIRST = 0.5
RETRY_MAX = 30.0

#: gzip level of the detail payloads (Node's default, which the origin used).
GZIP_LEVEL = 6

#: Longest stored "errorMessage" and "userAgent", in characters.
MAX_ERROR_MESSAGE = 8192
MAX_USER_AGENT = 1024

#: Largest value of an INTEGER column.
_INT_MAX = 2**31 - 1

#: Seconds between two warnings about dropped rows.
DROP_WARNING_INTERVAL = 10.0

#: Largest decompressed payload L{decodePayload} accepts.
MAX_DECODED_BYTES = 256 * 1024 * 1024

# Errors after which retrying the same rows cannot help: the batch is split
# to find the rows the database refuses.
_REFUSED = (NotFound, InvalidInput, Conflict)

#: The Unix epoch as a naive UTC datetime.
_EPOCH = datetime.datetime(1970, 1, 1)

_encoder = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False)

NEW = "new"
RUNNING = "running"
STOPPING = "stopping"
STOPPED = "stopped"


class Entry(NamedTuple):
    """
    What L{RequestLog.record} keeps of one request until a worker builds
    its row: references only, nothing computed.
    """

    instanceId: str
    organizationId: str
    transport: str
    method: str
    params: Any
    result: Any
    error: Any
    durationMs: float
    inputBytes: Optional[int]
    userAgent: Optional[str]
    at: float
    requestBytes: Optional[int] = None


@frozen
class Encoding:
    """
    How L{buildRows} stores the detail payloads.

    @ivar maxDataBytes: a request or response JSON larger than this (UTF-8
        bytes) gets no detail row.
    @ivar doubleEncode: store what the origin stored: gzip of the JSON
        string literal of the JSON text, instead of gzip of the JSON text.
    """

    maxDataBytes: int = DEFAULT_MAX_DATA_BYTES
    doubleEncode: bool = False


def _json(value: Any) -> Optional[bytes]:
    """
    Compact UTF-8 JSON of C{value} (bytes are taken as JSON already), or
    C{None} when it cannot be encoded.
    """
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    try:
        return _encoder.encode(value).encode("utf-8")
    except (TypeError, ValueError, RecursionError):
        return None


def gzipBytes(data: bytes) -> bytes:
    """
    gzip (level 6, no name, mtime 0) of C{data}, as Node's C{zlib.gzip}.

    The window and the hash table are sized to the data: zlib's set-up of a
    full 32 KiB window costs about 50 µs, more than compressing a small
    payload, and a window as large as the data loses nothing.
    """
    windowBits = min(15, max(9, len(data).bit_length()))
    compressor = zlib.compressobj(
        GZIP_LEVEL, zlib.DEFLATED, 16 + windowBits, max(1, min(8, windowBits - 7))
    )
    return compressor.compress(data) + compressor.flush()


def describeError(error: Any) -> tuple[str, str]:
    """
    The "errorMessage" and "errorCode" of a failed request: a JSON-RPC
    error's message and its code as text; another exception's message and
    class name.
    """
    if isinstance(error, Failure):
        error = error.value
    code = getattr(error, "code", None)
    if isinstance(error, BaseException):
        message = getattr(error, "message", None)
        if not isinstance(message, str):
            message = str(error)
        message = message or type(error).__name__
        if isinstance(code, int) and not isinstance(code, bool):
            return message, str(code)
        if isinstance(code, str) and code:
            return message, code
        return message, type(error).__name__
    return str(error), "UnknownError"


def _limitText(text: Optional[str], limit: int) -> Optional[str]:
    if text is None or len(text) <= limit:
        return text
    return text[: limit - 1] + "\N{HORIZONTAL ELLIPSIS}"


def _int(value: Optional[float]) -> Optional[int]:
    if value is None:
        return None
    if not math.isfinite(value):
        return 0
    return max(0, min(_INT_MAX, round(value)))


def formatLimit(limit: int) -> str:
    """
    A byte count as the skip note shows it: C{"5 MB"}, C{"64 KB"}, C{"10 bytes"}.
    """
    for unit, size in (("MB", 1024 * 1024), ("KB", 1024)):
        if limit and limit % size == 0:
            return f"{limit // size} {unit}"
    return f"{limit} bytes"


def skipNote(size: int, limit: int) -> str:
    """
    The "errorMessage" of a successful call whose detail was not stored.
    """
    return f"detail skipped: payload of {size} bytes over the {formatLimit(limit)} limit"


def compressPair(
    request: bytes, response: bytes, encoding: Encoding, id: Optional[str] = None
) -> RequestLogData:
    """
    The detail row of a request and a response JSON text.

    @param id: the row's id (a new one by default).
    """
    if encoding.doubleEncode:
        request = _encoder.encode(request.decode("utf-8")).encode("utf-8")
        response = _encoder.encode(response.decode("utf-8")).encode("utf-8")
    compressedIn = gzipBytes(request)
    compressedOut = gzipBytes(response)
    total = len(request) + len(response)
    ratio = (len(compressedIn) + len(compressedOut)) / total if total else 1.0
    return RequestLogData(
        id=id if id is not None else newIds(1)[0],
        inputDataCompressed=compressedIn,
        outputDataCompressed=compressedOut,
        originalInputSize=len(request),
        originalOutputSize=len(response),
        compressedInputSize=len(compressedIn),
        compressedOutputSize=len(compressedOut),
        compressionRatio=ratio,
    )


def buildRow(
    entry: Sequence[Any], encoding: Encoding, ids: Optional[Sequence[str]] = None
) -> RequestLogRow:
    """
    The row (with its detail row, if any) of one recorded request.

    @param entry: an L{Entry}, or a plain tuple of its fields.
    @param ids: two new ids for the rows (made here by default).
    """
    (
        instanceId,
        organizationId,
        transport,
        method,
        params,
        result,
        error,
        durationMs,
        inputBytes,
        userAgent,
        at,
    ) = entry[:11]
    logId, dataId = ids if ids is not None else newIds(2)
    if params is None:
        params = {}
    paramsJson = _json(params)
    if inputBytes is None and paramsJson is not None:
        inputBytes = len(paramsJson)
    toolName = method
    if method == DETAIL_METHOD and isinstance(params, dict):
        name = params.get("name")
        if isinstance(name, str) and name:
            toolName = name
    outputBytes: Optional[int] = None
    errorMessage: Optional[str] = None
    errorCode: Optional[str] = None
    data: Optional[RequestLogData] = None
    if error is None:
        resultJson = _json(result)
        if resultJson is not None:
            outputBytes = len(resultJson)
        if method == DETAIL_METHOD and resultJson is not None and paramsJson is not None:
            requestJson = b'{"method":"tools/call","params":' + paramsJson + b"}"
            largest = max(len(requestJson), len(resultJson))
            if largest > encoding.maxDataBytes:
                errorMessage = skipNote(largest, encoding.maxDataBytes)
            else:
                data = compressPair(requestJson, resultJson, encoding, dataId)
    else:
        errorMessage, errorCode = describeError(error)
        errorMessage = _limitText(errorMessage, MAX_ERROR_MESSAGE)
        errorCode = _limitText(errorCode, MAX_ERROR_MESSAGE)
    return RequestLogRow(
        id=logId,
        instanceId=instanceId,
        organizationId=organizationId,
        toolName=toolName,
        transportType=transport,
        method=method,
        responseStatus="200" if error is None else "500",
        durationMs=_int(durationMs) or 0,
        errorMessage=errorMessage,
        errorCode=errorCode,
        inputBytes=_int(inputBytes),
        outputBytes=_int(outputBytes),
        userAgent=_limitText(userAgent, MAX_USER_AGENT),
        createdAt=_EPOCH + datetime.timedelta(milliseconds=int(at * 1000)),
        data=data,
    )


def buildRows(
    entries: Sequence[Sequence[Any]], encoding: Encoding
) -> list[tuple[Optional[RequestLogRow], Optional[str]]]:
    """
    The rows of recorded requests, in order (run in a worker thread).

    @param entries: L{Entry}s, or plain tuples of their fields.
    @return: for each entry, its row and C{None}, or C{None} and the class
        name of the error that prevented building it.
    """
    built: list[tuple[Optional[RequestLogRow], Optional[str]]] = []
    ids = newIds(2 * len(entries))
    for n, entry in enumerate(entries):
        try:
            built.append((buildRow(entry, encoding, ids[2 * n : 2 * n + 2]), None))
        except Exception as e:
            built.append((None, type(e).__name__))
    return built


def rowWeight(row: RequestLogRow) -> int:
    """
    The bytes a queued row is counted for against C{maxQueueBytes}: its
    compressed payloads and texts.
    """
    weight = len(row.errorMessage or "")
    if row.data is not None:
        weight += len(row.data.inputDataCompressed) + len(row.data.outputDataCompressed)
    return weight


def decodePayload(blob: bytes) -> tuple[Any, str]:
    """
    Read a stored detail payload, plain or double-encoded.

    @return: the JSON value, and C{"plain"} or C{"double"} (when the
        stored JSON was a string holding JSON text, as the origin wrote).
    @raise ValueError: when C{blob} is not gzip of JSON.
    """
    inflater = zlib.decompressobj(wbits=47)
    try:
        text = inflater.decompress(bytes(blob), MAX_DECODED_BYTES + 1)
    except zlib.error as e:
        raise ValueError(f"not gzip data: {e}") from None
    if len(text) > MAX_DECODED_BYTES or inflater.unconsumed_tail:
        raise ValueError(f"payload over {formatLimit(MAX_DECODED_BYTES)} decompressed")
    value = json.loads(text.decode("utf-8"))
    if isinstance(value, str):
        try:
            return json.loads(value), "double"
        except ValueError:
            pass
    return value, "plain"


@define
class _Outcome:
    """
    What writing one batch came to.

    @ivar remaining: the rows not written because of a passing failure, to
        be tried again.
    @ivar error: that failure's class name.
    """

    written: int = 0
    refused: int = 0
    remaining: list[RequestLogRow] = field(factory=list)
    error: str = ""


@implementer(IRequestLog)
@define(eq=False, on_setattr=setters.NO_OP)
class RequestLog:
    """
    The request log of one proxy.

    @ivar repository: where the rows go.
    @ivar reactor: the real reactor, for the thread pool's results.
    @ivar clock: for the timers (flush interval, retries, stop timeout);
        the reactor by default.
    @ivar batchSize: rows per C{insertRequestLogs} call.
    @ivar flushInterval: seconds a row waits at most for a batch to fill.
    @ivar maxQueue: rows that may wait; beyond it the oldest are dropped.
    @ivar maxQueueBytes: compressed bytes that may wait; beyond it the
        oldest rows are dropped.
    @ivar maxDataBytes: larger request or response JSON gets no detail row.
    @ivar doubleEncode: store the detail payloads double-encoded, as the
        origin did (for the origin's readers).
    @ivar stopTimeout: seconds L{stop} waits for the last rows.

    The options are validated when the log is made, not when set later:
    attrs' checks on every assignment cost the response path (L{record}).

    @ivar queued: rows recorded.
    @ivar written: rows written.
    @ivar dropped: rows dropped: the queue was full, or they were still
        waiting when the stop timeout passed.
    @ivar refused: rows the database refused for good (an unknown
        instance) or that could not be built.
    @ivar failedWrites: inserts that failed and were retried.
    @ivar batches: inserts that succeeded.
    """

    repository: IRepository
    reactor: Any
    clock: IReactorTime = field(default=None)
    batchSize: int = field(default=DEFAULT_BATCH_SIZE, validator=positive)
    flushInterval: float = field(default=DEFAULT_FLUSH_INTERVAL, validator=positive)
    maxQueue: int = field(default=DEFAULT_MAX_QUEUE, validator=positive)
    maxQueueBytes: int = field(default=DEFAULT_MAX_QUEUE_BYTES, validator=positive)
    maxDataBytes: int = field(default=DEFAULT_MAX_DATA_BYTES, validator=notNegative)
    doubleEncode: bool = field(default=False, validator=validators.instance_of(bool))
    stopTimeout: float = field(default=DEFAULT_STOP_TIMEOUT, validator=positive)

    queued: int = field(default=0, init=False)
    written: int = field(default=0, init=False)
    dropped: int = field(default=0, init=False)
    refused: int = field(default=0, init=False)
    failedWrites: int = field(default=0, init=False)
    batches: int = field(default=0, init=False)

    _state: str = field(default=NEW, init=False, repr=False)
    _pool: Optional[ThreadPool] = field(default=None, init=False, repr=False)
    _shutdownTrigger: Any = field(default=None, init=False, repr=False)
    # Recorded, not yet handed to a worker.
    _incoming: collections.deque[tuple[Any, ...]] = field(
        factory=collections.deque, init=False, repr=False
    )
    _drainCall: Optional[IDelayedCall] = field(default=None, init=False, repr=False)
    # Recorded large requests, waiting for the worker.
    _pending: collections.deque[tuple[Any, ...]] = field(
        factory=collections.deque, init=False, repr=False
    )
    # The worker's job: its entries, and how many of its oldest rows were
    # dropped meanwhile.
    _job: Optional[Deferred[Any]] = field(default=None, init=False, repr=False)
    _jobSize: int = field(default=0, init=False, repr=False)
    _jobDropped: int = field(default=0, init=False, repr=False)
    # Built rows waiting to be written, oldest first.
    _queue: collections.deque[RequestLogRow] = field(
        factory=collections.deque, init=False, repr=False
    )
    _queueBytes: int = field(default=0, init=False, repr=False)
    _flushCall: Optional[IDelayedCall] = field(default=None, init=False, repr=False)
    # The insert running, and its rows.
    _writing: Optional[Deferred[Any]] = field(default=None, init=False, repr=False)
    _inflight: int = field(default=0, init=False, repr=False)
    _retryCall: Optional[IDelayedCall] = field(default=None, init=False, repr=False)
    _retryDelay: float = field(default=RETRY_FIRST, init=False, repr=False)
    _failing: bool = field(default=False, init=False, repr=False)
    _urgent: bool = field(default=False, init=False, repr=False)
    _idleWaiters: list[Deferred[None]] = field(factory=list, init=False, repr=False)
    _settledWaiters: list[Deferred[None]] = field(factory=list, init=False, repr=False)
    _stopWaiters: list[Deferred[None]] = field(factory=list, init=False, repr=False)
    _unreportedDrops: int = field(default=0, init=False, repr=False)
    _dropReportedAt: Optional[float] = field(default=None, init=False, repr=False)

    def __attrs_post_init__(self) -> None:
        if self.clock is None:
            self.clock = self.reactor

    # -- the response path --------------------------------------------------

    def record(
        self,
        ctx: Any,
        method: str,
        params: Any,
        result: Any,
        error: Any,
        durationMs: float,
        inputBytes: Optional[int] = None,
        userAgent: Optional[str] = None,
        validationMode: bool = False,
        requestBytes: Optional[int] = None,
        at: Optional[float] = None,
    ) -> None:
        """
        Log one answered request, later: this only queues references and
        arranges for them to be handled once the reactor is free.  The
        objects passed must not be changed afterwards.

        @param ctx: the request's L{mcp_proxy.dispatch.CallContext} (its
            C{instanceId}, C{organizationId} and C{transport} are read).
        @param method: the MCP method; others than L{LOGGED_METHODS} are
            not logged.
        @param params: the request's params (a C{dict}, or C{None}).
        @param result: the result on success: a JSON value, or C{bytes}
            holding its JSON text already (such as L{jsonrpc.RawJSON}),
            which spares encoding it again.
        @param error: C{None} on success; else the error (a
            L{jsonrpc.JsonRpcError}, another exception, or a L{Failure}).
        @param durationMs: the handler's wall time in milliseconds.
        @param inputBytes: the size of the params' JSON when the caller
            knows it; measured otherwise.
        @param userAgent: the client's C{User-Agent}, or C{None}.
        @param validationMode: true for a request with
            C{x-validation-mode: true}, which is not logged.
        @param requestBytes: the size of the HTTP body that carried the
            request (at least that of its params' JSON), or C{None} when
            unknown; a row is built on the reactor only when this and the
            result's size are known and small (L{INLINE_LIMIT}).
        @param at: when the request was answered (POSIX seconds); now by
            default.
        """
        if validationMode or method not in LOGGED_METHODS or not ctx.instanceId:
            return
        if self._state == STOPPED:
            self.queued += 1
            self.dropped += 1
            return
        # A plain tuple in the order of Entry's fields: the worker makes
        # the Entry (a NamedTuple costs 1 us more to make here).
        self._incoming.append(
            (
                ctx.instanceId,
                ctx.organizationId,
                ctx.transport,
                method,
                params,
                result,
                error,
                durationMs,
                inputBytes,
                userAgent,
                self.clock.seconds() if at is None else at,
                requestBytes,
            )
        )
        self.queued += 1
        if (
            len(self._incoming) + len(self._pending) + self._jobSize + len(self._queue)
            > self.maxQueue
        ):
            self._dropOldest()
        if self._drainCall is None and self._state != NEW:
            self._drainCall = self.clock.callLater(0, self._drain)

    @property
    def queueDepth(self) -> int:
        """
        Rows recorded and neither written nor dropped yet (including those
        of an insert that is running).
        """
        return self._waiting() + self._inflight

    def _waiting(self) -> int:
        """
        Rows recorded, not dropped, and not in an insert.
        """
        return len(self._incoming) + len(self._pending) + self._jobSize + len(self._queue)

    # -- life cycle ---------------------------------------------------------

    def start(self) -> None:
        """
        Start the worker thread pool and handle what was recorded before.
        """
        if self._state != NEW:
            return
        self._state = RUNNING
        self._pool = ThreadPool(minthreads=0, maxthreads=1, name="mcp_proxy.requestlog")
        self._pool.start()
        # If the process ends without stop(), the worker must not keep it
        # alive.
        self._shutdownTrigger = self.reactor.addSystemEventTrigger(
            "during", "shutdown", self._pool.stop
        )
        if self._incoming and self._drainCall is None:
            self._drainCall = self.clock.callLater(0, self._drain)

    def stop(self) -> Deferred[None]:
        """
        Write everything recorded (including rows still being compressed)
        and stop the worker.  Requests recorded meanwhile are written too.

        @return: a Deferred firing when done, or after C{stopTimeout}
            seconds, when the rows still waiting are counted as dropped and
            logged (their number only).
        """
        return Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        if self._state == NEW:
            self._state = STOPPED
            if self._incoming:
                self.dropped += len(self._incoming)
                log.error(
                    "request log: {count} rows were recorded but the log never started",
                    count=len(self._incoming),
                )
                self._incoming.clear()
            return
        if self._state == STOPPING:
            await self._waiter(self._stopWaiters)
            return
        if self._state != RUNNING:
            return
        self._state = STOPPING
        idle = self.flush()
        idle.addTimeout(self.stopTimeout, self.clock)
        try:
            await idle
        except DeferredTimeout:
            self._abandon()
        finally:
            self._state = STOPPED
            for call in (self._drainCall, self._flushCall, self._retryCall):
                if call is not None and call.active():
                    call.cancel()
            self._drainCall = self._flushCall = self._retryCall = None
            self._stopPool()
            waiters, self._stopWaiters = self._stopWaiters, []
            for d in waiters:
                d.callback(None)

    def _abandon(self) -> None:
        waiting = self._waiting()
        self.dropped += waiting
        log.error(
            "request log: {count} rows could not be written within {timeout} s of the stop"
            " ({inflight} more are in an insert still running); {written} rows were written",
            count=waiting,
            timeout=self.stopTimeout,
            inflight=self._inflight,
            written=self.written,
        )
        self._incoming.clear()
        self._pending.clear()
        self._queue.clear()
        self._queueBytes = 0
        # The worker's result, when it comes, is ignored.
        self._job = None
        self._jobSize = self._jobDropped = 0

    def _stopPool(self) -> None:
        pool, self._pool = self._pool, None
        if self._shutdownTrigger is not None:
            self.reactor.removeSystemEventTrigger(self._shutdownTrigger)
            self._shutdownTrigger = None
        if pool is not None:
            pool.stop()

    def flush(self) -> Deferred[None]:
        """
        Write what is queued now, without waiting for a batch to fill (but
        respecting the retry delay of a failing database).

        @return: a Deferred firing once nothing is left to write.
        """
        self._urgent = True
        idle = self.whenIdle()
        if self._state != NEW:
            if self._drainCall is not None and self._drainCall.active():
                self._drainCall.cancel()
            self._drainCall = None
            self._drain()
            self._kick()
        self._checkWaiters()
        return idle

    def whenIdle(self) -> Deferred[None]:
        """
        A Deferred firing once every recorded row is written or dropped.
        """
        return self._waiter(self._idleWaiters)

    def whenSettled(self) -> Deferred[None]:
        """
        A Deferred firing once neither a worker nor an insert is running:
        what remains waits for a timer (a batch to fill, a retry).
        """
        return self._waiter(self._settledWaiters)

    def _waiter(self, waiters: list[Deferred[None]]) -> Deferred[None]:
        def cancel(d: Deferred[None]) -> None:
            if d in waiters:
                waiters.remove(d)

        d: Deferred[None] = Deferred(cancel)
        waiters.append(d)
        self._checkWaiters()
        return d

    def _checkWaiters(self) -> None:
        if self._job is not None or self._writing is not None:
            return
        settled, self._settledWaiters = self._settledWaiters, []
        for d in settled:
            d.callback(None)
        if self.queueDepth == 0:
            self._urgent = False
            idle, self._idleWaiters = self._idleWaiters, []
            for d in idle:
                d.callback(None)

    # -- bounding -----------------------------------------------------------

    def _dropOldest(self) -> None:
        """
        Drop one row, the oldest one waiting (not one being written).
        """
        if self._queue:
            self._queueBytes -= rowWeight(self._queue.popleft())
        elif self._jobSize:
            self._jobSize -= 1
            self._jobDropped += 1
        elif self._pending:
            self._pending.popleft()
        elif self._incoming:
            self._incoming.popleft()
        else:
            return
        self.dropped += 1
        self._unreportedDrops += 1
        now = self.clock.seconds()
        if self._dropReportedAt is None or now - self._dropReportedAt >= DROP_WARNING_INTERVAL:
            self._dropReportedAt = now
            log.warn(
                "request log full ({limit} rows, {bytes} bytes): dropped {count} oldest rows"
                " ({total} in all)",
                limit=self.maxQueue,
                bytes=self.maxQueueBytes,
                count=self._unreportedDrops,
                total=self.dropped,
            )
            self._unreportedDrops = 0

    def _bound(self) -> None:
        while self._waiting() > self.maxQueue:
            self._dropOldest()
        while self._queueBytes > self.maxQueueBytes and len(self._queue) > 1:
            self._dropOldest()

    # -- building rows ------------------------------------------------------

    def _drain(self) -> None:
        """
        Build the rows of the small requests recorded since the last turn
        here, and give the large ones to the worker.
        """
        self._drainCall = None
        if self._pool is None:
            return
        incoming = self._incoming
        if incoming:
            encoding = Encoding(maxDataBytes=self.maxDataBytes, doubleEncode=self.doubleEncode)
            errors: dict[str, int] = {}
            ids = newIds(2 * len(incoming))
            n = 0
            while incoming:
                entry = incoming.popleft()
                if not _small(entry):
                    self._pending.append(entry)
                    continue
                try:
                    row = buildRow(entry, encoding, ids[n : n + 2])
                    n += 2
                except Exception as e:
                    self.refused += 1
                    errors[type(e).__name__] = errors.get(type(e).__name__, 0) + 1
                    continue
                self._queue.append(row)
                self._queueBytes += rowWeight(row)
            _reportBuildErrors(errors)
            self._bound()
        self._startJob()
        self._kick()
        self._checkWaiters()

    def _startJob(self) -> None:
        """
        Give the waiting large requests to the worker, unless it is busy.
        """
        if self._job is not None or not self._pending or self._pool is None:
            return
        entries = list(self._pending)
        self._pending.clear()
        self._jobSize = len(entries)
        self._jobDropped = 0
        encoding = Encoding(maxDataBytes=self.maxDataBytes, doubleEncode=self.doubleEncode)
        job: Deferred[Any] = deferToThreadPool(
            self.reactor, self._pool, buildRows, entries, encoding
        )
        self._job = job
        job.addCallback(self._built, job)
        job.addErrback(self._buildFailed, job, len(entries))

    def _built(self, built: list[tuple[Optional[RequestLogRow], Optional[str]]], job: Any) -> None:
        if job is not self._job:
            return
        skip = self._jobDropped
        self._job = None
        self._jobSize = self._jobDropped = 0
        errors: dict[str, int] = {}
        for row, error in built[skip:]:
            if row is None:
                self.refused += 1
                errors[error or "Exception"] = errors.get(error or "Exception", 0) + 1
                continue
            self._queue.append(row)
            self._queueBytes += rowWeight(row)
        _reportBuildErrors(errors)
        self._bound()
        self._afterJob()

    def _buildFailed(self, failure: Failure, job: Any, count: int) -> None:
        if job is not self._job:
            return
        lost = self._jobSize
        self._job = None
        self._jobSize = self._jobDropped = 0
        self.refused += lost
        log.error(
            "request log: building {count} rows failed ({error})",
            count=lost,
            error=type(failure.value).__name__,
        )
        self._afterJob()

    def _afterJob(self) -> None:
        if self._state != STOPPED:
            self._startJob()
        self._kick()
        self._checkWaiters()

    # -- writing ------------------------------------------------------------

    def _kick(self) -> None:
        """
        Start an insert if one is due, or the flush timer.
        """
        if self._writing is not None or self._retryCall is not None or self._state == NEW:
            return
        if self._state == STOPPED or not self._queue:
            if self._flushCall is not None and self._flushCall.active():
                self._flushCall.cancel()
            self._flushCall = None
            return
        if self._urgent or len(self._queue) >= self.batchSize:
            self._write()
        elif self._flushCall is None:
            self._flushCall = self.clock.callLater(self.flushInterval, self._flushTimer)

    def _flushTimer(self) -> None:
        self._flushCall = None
        if self._writing is None and self._retryCall is None and self._queue:
            self._write()

    def _retry(self) -> None:
        self._retryCall = None
        if self._queue:
            self._write()
        else:
            self._kick()
            self._checkWaiters()

    def _write(self) -> None:
        if self._flushCall is not None and self._flushCall.active():
            self._flushCall.cancel()
        self._flushCall = None
        batch = [self._queue.popleft() for _ in range(min(self.batchSize, len(self._queue)))]
        for row in batch:
            self._queueBytes -= rowWeight(row)
        self._inflight = len(batch)
        writing = Deferred.fromCoroutine(self._insert(batch))
        self._writing = writing
        writing.addCallback(self._written)

    async def _insert(self, batch: list[RequestLogRow]) -> _Outcome:
        """
        Write C{batch}; when the database refuses it for good, split it in
        halves until the refused rows are found, and write the others.
        """
        outcome = _Outcome()
        pending = [batch]
        while pending:
            rows = pending.pop()
            try:
                await self.repository.insertRequestLogs(rows)
            except Conflict:
                if len(rows) > 1:
                    pending.extend(_halves(rows))
                    continue
                # The one row exists already: an earlier insert of it was
                # committed but its answer was lost.
                outcome.written += 1
                continue
            except _REFUSED as e:
                if len(rows) > 1:
                    pending.extend(_halves(rows))
                    continue
                outcome.refused += 1
                log.error(
                    "request log: the database refused a row ({error}); dropped it",
                    error=type(e).__name__,
                )
                continue
            except (Exception, CancelledError) as e:
                outcome.remaining = rows + [r for chunk in reversed(pending) for r in chunk]
                outcome.error = type(e).__name__
                return outcome
            self.batches += 1
            outcome.written += len(rows)
        return outcome

    def _written(self, outcome: _Outcome) -> None:
        self._writing = None
        self._inflight = 0
        self.written += outcome.written
        self.refused += outcome.refused
        if self._state == STOPPED:
            # The stop timeout passed during this insert.
            self.dropped += len(outcome.remaining)
            self._checkWaiters()
            return
        if outcome.remaining:
            self.failedWrites += 1
            self._queue.extendleft(reversed(outcome.remaining))
            self._queueBytes += sum(rowWeight(r) for r in outcome.remaining)
            self._bound()
            delay = self._retryDelay
            self._retryDelay = min(self._retryDelay * 2, RETRY_MAX)
            self._failing = True
            log.warn(
                "request log: writing {count} rows failed ({error}); retrying in {delay} s"
                " ({waiting} rows waiting)",
                count=len(outcome.remaining),
                error=outcome.error,
                delay=delay,
                waiting=self.queueDepth,
            )
            self._retryCall = self.clock.callLater(delay, self._retry)
        else:
            if self._failing:
                log.info(
                    "request log: writing works again ({written} rows written in all)",
                    written=self.written,
                )
            self._failing = False
            self._retryDelay = RETRY_FIRST
            self._kick()
        self._checkWaiters()


def isSmall(requestBytes: Optional[int], result: Any) -> bool:
    """
    Whether a request is known to be small enough (L{INLINE_LIMIT}) to
    handle on the reactor: the size of the body that carried it, and its
    result (C{None}, or the bytes of its JSON).
    """
    if requestBytes is None or requestBytes > INLINE_LIMIT:
        return False
    if result is None:
        return True
    return isinstance(result, (bytes, bytearray)) and len(result) <= INLINE_LIMIT


def _small(entry: tuple[Any, ...]) -> bool:
    """
    L{isSmall} of a recorded request (a tuple of L{Entry}'s fields).
    """
    return isSmall(entry[11], entry[5])


def _reportBuildErrors(errors: dict[str, int]) -> None:
    for name, count in errors.items():
        log.error("request log: {count} rows could not be built ({error})", count=count, error=name)


def _halves(rows: list[RequestLogRow]) -> list[list[RequestLogRow]]:
    """
    The two halves of C{rows}, the first to be popped last (a stack).
    """
    middle = len(rows) // 2
    return [rows[middle:], rows[:middle]]
