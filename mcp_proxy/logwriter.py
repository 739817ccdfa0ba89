"""
The request log written by a process of its own.

The proxy's reactor thread is its bottleneck, and under the GIL any Python
work done for the log, in that thread or in another, is taken from it:
building a row (JSON, gzip, ids) and inserting it cost about 50 µs, about
12 % of a request's CPU.  L{ProcessRequestLog} keeps only L{record} in the
proxy: every L{HANDOFF_INTERVAL} it frames the recorded requests (their
params as JSON, the result's bytes as they are) and writes them to a child
process, C{python -m mcp_proxy.logwriter}, whose own reactor runs an
ordinary L{RequestLog} on its own database connection: building, batching,
retries while the database is down, the queue bound, and the flush on
stop all happen there, on another core.

The pipe carries length-prefixed frames (L{Int32StringReceiver}) both ways.
To the child: an entry is the JSON array of L{Entry}'s fields (the result
left out), a NUL byte, and the result's JSON bytes (nothing for none); an
object C{{"flush": N}} asks for everything sent so far to be written.  From
the child, JSON objects: C{{"ready": true}}, C{{"stats": {...}}} with its
counters (at most every L{STATS_INTERVAL} while they change) and
C{{"flushed": N, "stats": {...}}}.  The child stops when its stdin closes:
it writes what it has (for at most its stop timeout), reports, and exits.

The proxy bounds what it has sent but the child has not written yet to
C{maxQueue} rows: beyond it, rows wait in the proxy (and the oldest are
dropped, counted) until the child catches up.  If the child dies, the rows
it had not reported written are counted as dropped, and a new child starts
after a backoff.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import deque
from typing import Any, Optional

from attrs import define, field, setters, validators
from twisted.internet import protocol
from twisted.internet.defer import Deferred
from twisted.internet.error import ProcessDone, ProcessExitedAlready
from twisted.internet.interfaces import (
    IDelayedCall,
    IHalfCloseableProtocol,
    IProcessTransport,
    IReactorTime,
)
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.protocols.basic import Int32StringReceiver
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool
from zope.interface import implementer

from mcp_proxy.config import DatabaseURL
from mcp_proxy.interfaces import IRequestLog
from mcp_proxy.requestlog import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_FLUSH_INTERVAL,
    DEFAULT_MAX_DATA_BYTES,
    DEFAULT_MAX_QUEUE,
    DEFAULT_STOP_TIMEOUT,
    LOGGED_METHODS,
    RequestLog,
    describeError,
    isSmall,
)
from mcp_proxy.validation import notNegative, positive

log = Logger(namespace="mcp_proxy.logwriter")

#: Largest frame, either way.
MAX_FRAME = 512 * 1024 * 1024

#: Seconds recorded requests wait to be sent to the writer: one write to
#: its pipe per interval, not per reactor turn (a write to a pipe costs the
#: reactor two epoll_ctl calls and an iteration).
HANDOFF_INTERVAL = 0.01

#: Seconds between two stats reports of the child while its counters change.
STATS_INTERVAL = 0.1

#: The first and the longest wait before a dead child is started again.
RESTART_FIRST = 0.5
RESTART_MAX = 30.0

#: The child's counters, as its stats report them.
STAT_NAMES = ("queued", "written", "dropped", "refused", "failedWrites", "batches", "queueDepth")

_encoder = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False)

NEW = "new"
RUNNING = "running"
STOPPING = "stopping"
STOPPED = "stopped"


def encodeEntry(
    ctx: Any,
    method: str,
    params: Any,
    result: Any,
    error: Any,
    durationMs: float,
    inputBytes: Optional[int],
    userAgent: Optional[str],
    at: float,
    requestBytes: Optional[int],
) -> Optional[bytes]:
    """
    The frame of one recorded request, or C{None} when its params or result
    cannot be encoded as JSON.
    """
    described = list(describeError(error)) if error is not None else None
    try:
        head = _encoder.encode(
            [
                ctx.instanceId,
                ctx.organizationId,
                ctx.transport,
                method,
                params,
                described,
                durationMs,
                inputBytes,
                userAgent,
                at,
                requestBytes,
            ]
        ).encode("utf-8")
        if result is None:
            body = b""
        elif isinstance(result, (bytes, bytearray, memoryview)):
            body = bytes(result)
        else:
            body = _encoder.encode(result).encode("utf-8")
    except (TypeError, ValueError, RecursionError):
        return None
    return head + b"\x00" + body


def _encodeEntries(entries: list[tuple[Any, ...]]) -> list[Optional[bytes]]:
    return [encodeEntry(*entry) for entry in entries]


@define(eq=False)
class _Origin:
    """
    The part of a L{mcp_proxy.dispatch.CallContext} the log reads.
    """

    instanceId: str
    organizationId: str
    transport: str


@define(eq=False)
class LoggedError(Exception):
    """
    A failed request's error as the proxy described it: its message and
    code (L{describeError} reads them as they are).
    """

    message: str
    code: str

    def __str__(self) -> str:
        return self.message


def decodeEntry(frame: bytes) -> tuple[Any, ...]:
    """
    The arguments of L{RequestLog.record} for an entry frame.

    @raise ValueError: for a frame that is not one.
    """
    head, sep, body = frame.partition(b"\x00")
    if not sep:
        raise ValueError("not an entry frame")
    fields = json.loads(head)
    if not isinstance(fields, list) or len(fields) != 11:
        raise ValueError("not an entry frame")
    (
        instanceId,
        organizationId,
        transport,
        method,
        params,
        described,
        durationMs,
        inputBytes,
        userAgent,
        at,
        requestBytes,
    ) = fields
    error = LoggedError(str(described[0]), str(described[1])) if described else None
    return (
        _Origin(instanceId, organizationId, transport),
        method,
        params,
        (body if body else None) if error is None else None,
        error,
        durationMs,
        inputBytes,
        userAgent,
        at,
        requestBytes,
    )


# -- the proxy's side ---------------------------------------------------------------


class _Frames(Int32StringReceiver):
    MAX_LENGTH = MAX_FRAME

    def __init__(self, received: Any) -> None:
        self._received = received

    def stringReceived(self, string: bytes) -> None:
        self._received(string)

    def lengthLimitExceeded(self, length: int) -> None:
        log.error("request log writer: a frame of {length} bytes is too long", length=length)


class _ChildProtocol(protocol.ProcessProtocol):
    def __init__(self, owner: ProcessRequestLog) -> None:
        self.owner = owner
        self.frames = _Frames(self._frame)
        self.ended: Deferred[None] = Deferred()
        self._stderr = b""

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        if childFD == 1:
            self.frames.dataReceived(data)
        elif childFD == 2:
            self._stderr += data
            *lines, self._stderr = self._stderr.split(b"\n")
            for line in lines:
                if line.strip():
                    log.warn(
                        "request log writer: {line}", line=line.decode("utf-8", "replace")[:2000]
                    )

    def _frame(self, frame: bytes) -> None:
        try:
            message = json.loads(frame)
        except ValueError:
            log.error("request log writer: a frame that is not JSON")
            return
        if isinstance(message, dict):
            self.owner._childMessage(self, message)

    def processEnded(self, reason: Failure) -> None:
        self.owner._childEnded(self, reason)
        self.ended.callback(None)


def _sendFrame(transport: IProcessTransport, frames: list[bytes]) -> None:
    transport.write(b"".join(len(f).to_bytes(4, "big") + f for f in frames))


@implementer(IRequestLog)
@define(eq=False, on_setattr=setters.NO_OP)
class ProcessRequestLog:
    """
    The request log of one proxy, written by a child process (see the
    module's docstring); the same options and counters as L{RequestLog}.

    @ivar database: the database the child writes to (not an in-memory
        SQLite one, which the child could not open).
    @ivar queryTimeout: the child's repository's query timeout.
    @ivar python: the interpreter that runs the child.
    """

    database: DatabaseURL
    reactor: Any
    clock: IReactorTime = field(default=None)
    batchSize: int = field(default=DEFAULT_BATCH_SIZE, validator=positive)
    flushInterval: float = field(default=DEFAULT_FLUSH_INTERVAL, validator=positive)
    maxQueue: int = field(default=DEFAULT_MAX_QUEUE, validator=positive)
    maxDataBytes: int = field(default=DEFAULT_MAX_DATA_BYTES, validator=notNegative)
    doubleEncode: bool = field(default=False, validator=validators.instance_of(bool))
    stopTimeout: float = field(default=DEFAULT_STOP_TIMEOUT, validator=positive)
    queryTimeout: float = field(default=30.0, validator=positive)
    python: str = sys.executable

    queued: int = field(default=0, init=False)
    #: Rows dropped here: not sent because the child was behind or away.
    droppedHere: int = field(default=0, init=False)
    #: Rows sent to a child that died before it reported them.
    lost: int = field(default=0, init=False)
    #: Children started (1 unless one died).
    starts: int = field(default=0, init=False)

    _state: str = field(default=NEW, init=False, repr=False)
    _incoming: deque[tuple[Any, ...]] = field(factory=deque, init=False, repr=False)
    _drainCall: Optional[IDelayedCall] = field(default=None, init=False, repr=False)
    _child: Optional[_ChildProtocol] = field(default=None, init=False, repr=False)
    _ready: bool = field(default=False, init=False, repr=False)
    _restartCall: Optional[IDelayedCall] = field(default=None, init=False, repr=False)
    _restartDelay: float = field(default=RESTART_FIRST, init=False, repr=False)
    # What the current child was sent, and its last report.
    _sent: int = field(default=0, init=False, repr=False)
    _stats: dict[str, int] = field(factory=dict, init=False, repr=False)
    # Counters of children that ended.
    _past: dict[str, int] = field(factory=dict, init=False, repr=False)
    _flushes: int = field(default=0, init=False, repr=False)
    _flushSent: int = field(default=0, init=False, repr=False)
    _flushWaiters: list[tuple[int, Deferred[None]]] = field(factory=list, init=False, repr=False)
    _pool: Optional[ThreadPool] = field(default=None, init=False, repr=False)
    _shutdownTrigger: Any = field(default=None, init=False, repr=False)
    _encoding: int = field(default=0, init=False, repr=False)

    def __attrs_post_init__(self) -> None:
        if self.clock is None:
            self.clock = self.reactor

    # -- counters -----------------------------------------------------------

    def _stat(self, name: str) -> int:
        return self._past.get(name, 0) + self._stats.get(name, 0)

    @property
    def written(self) -> int:
        return self._stat("written")

    @property
    def dropped(self) -> int:
        return self._stat("dropped") + self.droppedHere + self.lost

    @property
    def refused(self) -> int:
        return self._stat("refused")

    @property
    def failedWrites(self) -> int:
        return self._stat("failedWrites")

    @property
    def batches(self) -> int:
        return self._stat("batches")

    def _behind(self) -> int:
        """
        Rows the current child was sent and has not reported done.
        """
        done = sum(self._stats.get(n, 0) for n in ("written", "dropped", "refused"))
        return max(0, self._sent - done)

    @property
    def queueDepth(self) -> int:
        return len(self._incoming) + self._encoding + self._behind()

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
    ) -> None:
        """
        See L{RequestLog.record}.
        """
        if validationMode or method not in LOGGED_METHODS or not ctx.instanceId:
            return
        self.queued += 1
        if self._state == STOPPED:
            self.droppedHere += 1
            return
        self._incoming.append(
            (
                ctx,
                method,
                params,
                result,
                error,
                durationMs,
                inputBytes,
                userAgent,
                self.clock.seconds(),
                requestBytes,
            )
        )
        if len(self._incoming) > self.maxQueue:
            self._incoming.popleft()
            self._dropHere(1)
        if self._drainCall is None and self._state != NEW:
            self._drainCall = self.clock.callLater(HANDOFF_INTERVAL, self._drain)

    def _dropHere(self, count: int) -> None:
        first = self.droppedHere == 0
        self.droppedHere += count
        if first or self.droppedHere % 1000 < count:
            log.warn(
                "request log: the writer process is behind or away; dropped {count} rows here"
                " ({total} in all)",
                count=count,
                total=self.droppedHere,
            )

    def _drain(self) -> None:
        """
        Send what was recorded to the child, as far as it keeps up; large
        requests are framed in a worker thread first.
        """
        self._drainCall = None
        child = self._child
        if child is None or not self._ready or child.transport is None:
            return
        room = self.maxQueue - self._behind() - self._encoding
        if room <= 0:
            return
        small: list[bytes] = []
        large: list[tuple[Any, ...]] = []
        incoming = self._incoming
        while incoming and room > 0:
            entry = incoming.popleft()
            room -= 1
            if isSmall(entry[9], entry[3]):
                frame = encodeEntry(*entry)
                if frame is None:
                    self._dropHere(1)
                else:
                    small.append(frame)
            else:
                large.append(entry)
        if small:
            self._send(small)
        if large:
            self._encodeLarge(large)

    def _send(self, frames: list[bytes]) -> None:
        child = self._child
        if child is None or child.transport is None:
            self._dropHere(len(frames))
            return
        self._sent += len(frames)
        _sendFrame(child.transport, frames)

    def _encodeLarge(self, entries: list[tuple[Any, ...]]) -> None:
        assert self._pool is not None
        self._encoding += len(entries)
        d = deferToThreadPool(self.reactor, self._pool, _encodeEntries, entries)

        def encoded(frames: list[Optional[bytes]]) -> None:
            self._encoding -= len(entries)
            good = [f for f in frames if f is not None]
            if len(good) < len(frames):
                self._dropHere(len(frames) - len(good))
            if good:
                self._send(good)
            self._checkFlushes()

        def failed(reason: Failure) -> None:
            self._encoding -= len(entries)
            self._dropHere(len(entries))
            log.failure("request log: framing large requests failed", reason)

        d.addCallbacks(encoded, failed)

    # -- the child ----------------------------------------------------------

    def _spawn(self) -> None:
        self._restartCall = None
        if self._state not in (RUNNING, STOPPING):
            return
        env = dict(os.environ)
        env["MCPPROXY_LOGWRITER_DATABASE"] = (
            self.database.kind
            + ":"
            + (self.database.path if self.database.kind == "sqlite" else self.database.dsn)
        )
        args = [
            self.python,
            "-m",
            "mcp_proxy.logwriter",
            "--batch-size",
            str(self.batchSize),
            "--flush-interval",
            repr(self.flushInterval),
            "--max-queue",
            str(self.maxQueue),
            "--max-data",
            str(self.maxDataBytes),
            "--stop-timeout",
            repr(self.stopTimeout),
            "--query-timeout",
            repr(self.queryTimeout),
        ]
        if self.doubleEncode:
            args.append("--double-encode")
        child = _ChildProtocol(self)
        self._child = child
        self._ready = False
        self._sent = 0
        self._stats = {}
        self._flushSent = 0
        self.starts += 1
        self.reactor.spawnProcess(
            child, self.python, args, env=env, childFDs={0: "w", 1: "r", 2: "r"}
        )

    def _childMessage(self, child: _ChildProtocol, message: dict[str, Any]) -> None:
        if child is not self._child:
            return
        stats = message.get("stats")
        if isinstance(stats, dict):
            self._stats = {n: int(stats.get(n, 0)) for n in STAT_NAMES}
            if self._stats.get("written", 0) and self._restartDelay != RESTART_FIRST:
                self._restartDelay = RESTART_FIRST
        if message.get("ready") is True:
            self._ready = True
            log.debug("request log writer ready")
        flushed = message.get("flushed")
        if isinstance(flushed, int):
            waiters, self._flushWaiters = self._flushWaiters, []
            for number, d in waiters:
                if number <= flushed:
                    d.callback(None)
                else:
                    self._flushWaiters.append((number, d))
        if self._flushWaiters:
            self._checkFlushes()
        elif self._incoming and self._drainCall is None and self._state != STOPPED:
            self._drainCall = self.clock.callLater(0, self._drain)

    def _childEnded(self, child: _ChildProtocol, reason: Failure) -> None:
        if child is not self._child:
            return
        lost = self._behind()
        for name in STAT_NAMES:
            if name != "queueDepth":
                self._past[name] = self._past.get(name, 0) + self._stats.get(name, 0)
        self._stats = {}
        self._sent = 0
        self._child = None
        self._ready = False
        self.lost += lost
        if self._state == RUNNING:
            delay = self._restartDelay
            self._restartDelay = min(self._restartDelay * 2, RESTART_MAX)
            log.error(
                "request log writer ended ({reason}); {lost} rows it had not written are lost;"
                " starting another in {delay} s",
                reason=reason.getErrorMessage(),
                lost=lost,
                delay=delay,
            )
            self._restartCall = self.clock.callLater(delay, self._spawn)
        elif lost or not reason.check(ProcessDone):
            log.error(
                "request log writer ended ({reason}); {lost} rows were not written",
                reason=reason.getErrorMessage(),
                lost=lost,
            )
        waiters, self._flushWaiters = self._flushWaiters, []
        for _, d in waiters:
            d.callback(None)

    # -- life cycle ---------------------------------------------------------

    def start(self) -> None:
        """
        Start the writer process.
        """
        if self._state != NEW:
            return
        self._state = RUNNING
        self._pool = ThreadPool(minthreads=0, maxthreads=1, name="mcp_proxy.logwriter")
        self._pool.start()
        self._shutdownTrigger = self.reactor.addSystemEventTrigger(
            "during", "shutdown", self._pool.stop
        )
        self._spawn()

    def flush(self) -> Deferred[None]:
        """
        A Deferred firing once every row recorded so far is written (or
        dropped, or the child ended).
        """
        self._flushes += 1
        number = self._flushes
        d: Deferred[None] = Deferred()
        self._flushWaiters.append((number, d))
        self._checkFlushes()
        return d

    def _checkFlushes(self) -> None:
        """
        Send the flush request once everything recorded before it was sent.
        """
        if not self._flushWaiters:
            return
        if self._drainCall is not None and self._drainCall.active():
            self._drainCall.cancel()
            self._drainCall = None
        self._drain()
        child = self._child
        if self._incoming or self._encoding or child is None or not self._ready:
            if child is None and not self._incoming and not self._encoding:
                waiters, self._flushWaiters = self._flushWaiters, []
                for _, d in waiters:
                    d.callback(None)
            return
        assert child.transport is not None
        number = max(n for n, _ in self._flushWaiters)
        if number > self._flushSent:
            self._flushSent = number
            _sendFrame(child.transport, [_encoder.encode({"flush": number}).encode("utf-8")])

    def stop(self) -> Deferred[None]:
        """
        Send everything recorded, let the child write it and end (for at
        most C{stopTimeout} seconds, then it is killed).
        """
        return Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        if self._state in (STOPPING, STOPPED):
            return
        if self._state == NEW:
            self._state = STOPPED
            self.droppedHere += len(self._incoming)
            self._incoming.clear()
            return
        self._state = STOPPING
        if self._restartCall is not None and self._restartCall.active():
            self._restartCall.cancel()
            self._restartCall = None
        if self._child is None:
            self._spawn()
        deadline = self.clock.seconds() + self.stopTimeout
        # Everything recorded goes to the child first.
        flushed = self.flush()
        flushed.addTimeout(self.stopTimeout, self.clock)
        try:
            await flushed
        except Exception:
            pass
        child = self._child
        if child is not None and child.transport is not None:
            child.transport.closeStdin()
            ended = child.ended
            remaining = max(1.0, deadline - self.clock.seconds() + 5.0)
            timer = self.clock.callLater(remaining, self._kill, child)
            await ended
            if timer.active():
                timer.cancel()
        self._state = STOPPED
        if self._incoming:
            self.droppedHere += len(self._incoming)
            log.error(
                "request log: {count} rows could not be sent to the writer before the stop",
                count=len(self._incoming),
            )
            self._incoming.clear()
        if self._drainCall is not None and self._drainCall.active():
            self._drainCall.cancel()
        self._drainCall = None
        pool, self._pool = self._pool, None
        if self._shutdownTrigger is not None:
            self.reactor.removeSystemEventTrigger(self._shutdownTrigger)
            self._shutdownTrigger = None
        if pool is not None:
            pool.stop()

    def _kill(self, child: _ChildProtocol) -> None:
        if child.transport is None:
            return
        log.error("request log writer did not end in time; killing it")
        try:
            child.transport.signalProcess("KILL")
        except ProcessExitedAlready:
            pass

    @property
    def pid(self) -> Optional[int]:
        """
        The writer process's pid, while there is one.
        """
        child = self._child
        transport = child.transport if child is not None else None
        return getattr(transport, "pid", None)


# -- the child's side ---------------------------------------------------------------


@implementer(IHalfCloseableProtocol)
class _Inbox(Int32StringReceiver):
    """
    The child's stdin (entry and flush frames from the proxy) and stdout
    (its reports), which stays open when stdin closes.
    """

    MAX_LENGTH = MAX_FRAME

    def __init__(self, requestLog: RequestLog, clock: IReactorTime) -> None:
        self.requestLog = requestLog
        self.clock = clock
        #: Fires when stdin closes (the proxy's stop), and when stdout has
        #: been flushed and closed.
        self.closed: Deferred[None] = Deferred()
        self.finished: Deferred[None] = Deferred()
        self._statsCall: Optional[IDelayedCall] = None
        self._reported: tuple[int, ...] = ()
        self._bad = 0

    def connectionMade(self) -> None:
        self._send({"ready": True, "stats": self._stats()})

    def _stats(self) -> dict[str, int]:
        return {name: int(getattr(self.requestLog, name)) for name in STAT_NAMES}

    def _send(self, message: dict[str, Any]) -> None:
        frame = _encoder.encode(message).encode("utf-8")
        assert self.transport is not None
        self.transport.write(len(frame).to_bytes(4, "big") + frame)

    def stringReceived(self, frame: bytes) -> None:
        if frame.startswith(b"{"):
            try:
                number = json.loads(frame)["flush"]
            except (ValueError, KeyError, TypeError):
                self._bad += 1
                return
            d = self.requestLog.flush()
            d.addCallback(lambda _: self._send({"flushed": number, "stats": self._stats()}))
            return
        try:
            args = decodeEntry(frame)
        except (ValueError, TypeError, IndexError):
            self._bad += 1
            if self._bad == 1 or self._bad % 1000 == 0:
                sys.stderr.write(f"bad entry frames: {self._bad}\n")
            return
        ctx, method, params, result, error, durationMs, inputBytes, userAgent, at, size = args
        self.requestLog.record(
            ctx,
            method,
            params,
            result,
            error,
            durationMs,
            inputBytes=inputBytes,
            userAgent=userAgent,
            requestBytes=size,
            at=at,
        )
        self._scheduleStats()

    def _scheduleStats(self) -> None:
        if self._statsCall is None:
            self._statsCall = self.clock.callLater(STATS_INTERVAL, self._report)

    def _report(self) -> None:
        self._statsCall = None
        stats = self._stats()
        values = tuple(stats.values())
        if values != self._reported:
            self._reported = values
            self._send({"stats": stats})
        if self.requestLog.queueDepth:
            self._scheduleStats()

    def lengthLimitExceeded(self, length: int) -> None:
        sys.stderr.write(f"a frame of {length} bytes is too long; stopping\n")
        assert self.transport is not None
        self.transport.loseConnection()

    def readConnectionLost(self) -> None:
        if self._statsCall is not None and self._statsCall.active():
            self._statsCall.cancel()
        self._statsCall = None
        if not self.closed.called:
            self.closed.callback(None)

    def writeConnectionLost(self) -> None:
        pass

    def finish(self) -> Deferred[None]:
        """
        Send the last report and close stdout.
        """
        self._send({"stats": self._stats()})
        assert self.transport is not None
        self.transport.loseConnection()
        return self.finished

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        self.readConnectionLost()
        if not self.finished.called:
            self.finished.callback(None)


def _parseArgs(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m mcp_proxy.logwriter")
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE)
    parser.add_argument("--flush-interval", type=float, default=DEFAULT_FLUSH_INTERVAL)
    parser.add_argument("--max-queue", type=int, default=DEFAULT_MAX_QUEUE)
    parser.add_argument("--max-data", type=int, default=DEFAULT_MAX_DATA_BYTES)
    parser.add_argument("--stop-timeout", type=float, default=DEFAULT_STOP_TIMEOUT)
    parser.add_argument("--query-timeout", type=float, default=30.0)
    parser.add_argument("--double-encode", action="store_true")
    return parser.parse_args(argv)


def _database() -> DatabaseURL:
    value = os.environ.get("MCPPROXY_LOGWRITER_DATABASE", "")
    kind, _, rest = value.partition(":")
    if kind == "sqlite" and rest:
        return DatabaseURL(kind="sqlite", path=rest)
    if kind == "postgresql" and rest:
        return DatabaseURL(kind="postgresql", dsn=rest)
    raise SystemExit("MCPPROXY_LOGWRITER_DATABASE is not set (the proxy starts this program)")


async def _run(reactor: Any, args: argparse.Namespace) -> None:
    from twisted.internet import stdio

    from mcp_proxy.repository import openRepository

    repository = openRepository(
        _database(), reactor=reactor, queryTimeout=args.query_timeout, poolSize=1
    )
    await repository.start()
    requestLog = RequestLog(
        repository=repository,
        reactor=reactor,
        batchSize=args.batch_size,
        flushInterval=args.flush_interval,
        maxQueue=args.max_queue,
        maxDataBytes=args.max_data,
        doubleEncode=args.double_encode,
        stopTimeout=args.stop_timeout,
    )
    requestLog.start()
    inbox = _Inbox(requestLog, reactor)
    stdio.StandardIO(inbox, reactor=reactor)
    await inbox.closed
    await requestLog.stop()
    await repository.stop()
    await inbox.finish()


def main(argv: Optional[list[str]] = None) -> None:
    """
    The writer process (started by L{ProcessRequestLog}).

    It ignores SIGINT and SIGTERM: a Ctrl-C in a terminal, or a service
    manager's SIGTERM, reaches the whole process group, and the writer must
    outlive the proxy's stop to write what the proxy sends last.  It ends
    when its stdin closes (the proxy stopped, or died), or by SIGKILL.
    """
    import signal

    from twisted.internet import reactor

    args = _parseArgs(sys.argv[1:] if argv is None else argv)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    status = [0]

    def failed(reason: Failure) -> None:
        status[0] = 1
        sys.stderr.write(f"the request log writer failed: {reason.getErrorMessage()}\n")

    def run() -> None:
        d = Deferred.fromCoroutine(_run(reactor, args))
        d.addErrback(failed)
        d.addBoth(lambda _: reactor.stop())  # type: ignore[attr-defined]

    reactor.callWhenRunning(run)  # type: ignore[attr-defined]
    reactor.run(installSignalHandlers=False)  # type: ignore[attr-defined,call-arg]
    sys.exit(status[0])


if __name__ == "__main__":
    main()
