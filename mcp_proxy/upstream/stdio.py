"""
A stdio upstream: one local MCP server process, spoken to with
newline-delimited JSON-RPC on its stdin and stdout.

One process serves many requests at once.  Requests carry the proxy's own
integer ids, so answers may come back in any order; each is matched to the
Deferred of its caller.  The process runs in its own session and process
group, with only a safe set of the proxy's environment variables, and is
stopped by closing its stdin, then signalling its whole group.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
from typing import Any, Callable, Mapping, Optional, Union

from attrs import Factory, define, field
from twisted.internet.defer import CancelledError, Deferred, fail, maybeDeferred, succeed
from twisted.internet.interfaces import (
    IDelayedCall,
    IProcessTransport,
    IReactorProcess,
    IReactorTime,
)
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

import mcp_proxy
from mcp_proxy import jsonrpc
from mcp_proxy.interfaces import IUpstream
from mcp_proxy.models import UpstreamConfig
from mcp_proxy.upstream import (
    UpstreamError,
    UpstreamExited,
    UpstreamTimeout,
    UpstreamUnavailable,
    _spawn,
)

log = Logger()
stderrLog = Logger(namespace="mcp_proxy.upstream.stderr")

# The environment variables passed from the proxy to every child, as the
# MCP SDKs do; everything else comes from the config.
SAFE_ENV_NAMES = ("HOME", "LOGNAME", "PATH", "SHELL", "TERM", "USER")

SUPPORTED_PROTOCOL_VERSIONS = ("2024-11-05", "2025-03-26", "2025-06-18", "2025-11-25")
LATEST_PROTOCOL_VERSION = "2025-11-25"

DEFAULT_MAX_MESSAGE_SIZE = 64 * 1024 * 1024
STDERR_LINE_LIMIT = 4096

_CONTROL_CHARS = re.compile(r"[\x00-\x1f\x7f-\x9f]")

# States of a StdioUpstream.
NEW = "new"
STARTING = "starting"
READY = "ready"
STOPPING = "stopping"
EXITED = "exited"
ENDED = "ended"

MessageHook = Callable[[Any, dict[str, Any]], Any]
EndedHook = Callable[[Any, Optional[UpstreamError]], None]


def childEnvironment(
    configEnv: Mapping[str, str], environ: Optional[Mapping[str, str]] = None
) -> dict[str, str]:
    """
    The environment of a child: L{SAFE_ENV_NAMES} from the proxy's
    environment, then the config's env (which wins).  C{PATH} is always set.

    @param environ: the proxy's environment (default: C{os.environ}).
    """
    source = os.environ if environ is None else environ
    env = {
        name: source[name]
        for name in SAFE_ENV_NAMES
        if name in source and not source[name].startswith("()")
    }
    env.update({str(k): str(v) for k, v in configEnv.items()})
    env.setdefault("PATH", os.defpath)
    return env


def resolveCommand(
    name: str, command: Optional[str], env: Mapping[str, str], cwd: Optional[str] = None
) -> str:
    """
    Find the absolute path of C{command} with the I{child's} C{PATH}.

    @param name: the config name, for the error message.
    @param cwd: the child's working directory, for relative paths.
    @raise UpstreamUnavailable: when there is no such executable.
    """
    if not command:
        raise UpstreamUnavailable(f"upstream {name} has no command")
    base = cwd or os.getcwd()
    if os.sep in command:
        candidate = os.path.join(base, command)
        if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return os.path.abspath(candidate)
        raise UpstreamUnavailable(f"upstream {name}: executable {command!r} not found")
    found = shutil.which(command, path=env.get("PATH", os.defpath))
    if found is None:
        raise UpstreamUnavailable(f"upstream {name}: executable {command!r} not found on PATH")
    return os.path.abspath(os.path.join(base, found))


class MessageTooLarge(Exception):
    """
    A line longer than the limit arrived.

    @ivar lines: the complete lines that came before it in the same read.
    """

    def __init__(self, size: int, limit: int, lines: list[bytes]) -> None:
        super().__init__(f"message of more than {limit} bytes ({size} so far)")
        self.size = size
        self.limit = limit
        self.lines = lines


class LineSplitter:
    """
    Split a byte stream at newlines.  A partial line is kept as a list of
    chunks and only new data is searched, so a long line costs linear time.
    """

    def __init__(self, maxLength: int) -> None:
        self.maxLength = maxLength
        self._chunks: list[bytes] = []
        self._size = 0

    def feed(self, data: bytes) -> list[bytes]:
        """
        @return: the lines completed by C{data}, without their newlines.
        @raise MessageTooLarge: when a line exceeds C{maxLength}.
        """
        lines: list[bytes] = []
        start = 0
        find = data.find
        while True:
            end = find(b"\n", start)
            if end < 0:
                break
            if self._chunks:
                self._chunks.append(data[start:end])
                line = b"".join(self._chunks)
                self._chunks = []
                self._size = 0
            else:
                line = data[start:end]
            if len(line) > self.maxLength:
                raise MessageTooLarge(len(line), self.maxLength, lines)
            lines.append(line)
            start = end + 1
        if start < len(data):
            rest = data[start:] if start else data
            self._size += len(rest)
            if self._size > self.maxLength:
                raise MessageTooLarge(self._size, self.maxLength, lines)
            self._chunks.append(rest)
        return lines


class CappedLines:
    """
    Split a byte stream at newlines, keeping at most C{limit} bytes of each
    line (the rest of a long line is dropped).
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._buffer = bytearray()
        self._truncated = False

    def feed(self, data: bytes) -> list[tuple[bytes, bool]]:
        """
        @return: C{(line, truncated)} for each line completed by C{data}.
        """
        out: list[tuple[bytes, bool]] = []
        start = 0
        while True:
            end = data.find(b"\n", start)
            piece = data[start:] if end < 0 else data[start:end]
            room = self.limit - len(self._buffer)
            if len(piece) > room:
                self._buffer += piece[: max(room, 0)]
                self._truncated = True
            else:
                self._buffer += piece
            if end < 0:
                return out
            out.append(self._take())
            start = end + 1

    def flush(self) -> list[tuple[bytes, bool]]:
        """
        @return: the last, unterminated line, if any.
        """
        if self._buffer or self._truncated:
            return [self._take()]
        return []

    def _take(self) -> tuple[bytes, bool]:
        line = (bytes(self._buffer), self._truncated)
        self._buffer = bytearray()
        self._truncated = False
        return line


def cleanText(raw: bytes) -> str:
    """
    Untrusted bytes as one printable line: UTF-8 (invalid bytes replaced),
    tabs as spaces, other control characters removed.
    """
    text = raw.decode("utf-8", "replace").replace("\t", " ")
    return _CONTROL_CHARS.sub("", text)


def describeExit(status: Optional[int], sig: Optional[int]) -> str:
    """
    C{"status 3"} or C{"signal 9"}.
    """
    if sig is not None:
        return f"signal {sig}"
    return f"status {status}"


class _Pending:
    """
    A request awaiting its response.
    """

    __slots__ = ("deferred", "method", "timer")

    def __init__(self, method: str) -> None:
        self.method = method
        self.deferred: Deferred[Any] = Deferred()
        self.timer: Optional[IDelayedCall] = None


class _UpstreamProcessProtocol(ProcessProtocol):
    """
    Hands the events of one child process to its L{StdioUpstream}.
    """

    def __init__(self, upstream: StdioUpstream) -> None:
        self.upstream = upstream

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        if childFD == 1:
            self.upstream._stdoutReceived(data)
        elif childFD == 2:
            self.upstream._stderrReceived(data)

    def childConnectionLost(self, childFD: int) -> None:
        if childFD == 2:
            self.upstream._stderrClosed()

    def processExited(self, reason: Failure) -> None:
        self.upstream._processExited(reason)

    def processEnded(self, reason: Failure) -> None:
        self.upstream._processEnded()


@implementer(IUpstream)
@define(eq=False)
class StdioUpstream:
    """
    One MCP server process.

    @ivar reactor: spawns the process.
    @ivar config: what to run (C{command}, C{args}, C{env}) and its name.
    @ivar clock: timeouts and the stop grace periods (default: C{reactor}).
    @ivar clientCapabilities: the capabilities sent in C{initialize}.
    @ivar onMessage: called as C{onMessage(upstream, message)} for each
        notification and each request from the server except C{ping} (which
        is answered C{{}} here).  For a request, its result (or a Deferred
        of it) is sent back as the response; C{None} answers "Method not
        found"; a L{JsonRpcError<mcp_proxy.jsonrpc.JsonRpcError>} answers
        that error.  A C{notifications/cancelled} for such a request cancels
        that Deferred.
    @ivar onEnded: called once as C{onEnded(upstream, error)} when the
        process exits: C{error} is C{None} after L{stop}, else the
        L{UpstreamError} that failed the in-flight calls.
    @ivar startTimeout: seconds the C{initialize} handshake may take.
    @ivar stopGrace: seconds between closing stdin, SIGTERM and SIGKILL.
    @ivar maxMessageSize: the longest stdout line; a longer one kills the
        process.
    @ivar environ: the proxy's environment (default: C{os.environ}); only
        L{SAFE_ENV_NAMES} are taken from it.
    @ivar cwd: the child's working directory (default: the proxy's).
    @ivar stderrLinesPerSecond: stderr lines logged per second; more are
        counted and dropped.
    """

    reactor: IReactorProcess
    config: UpstreamConfig
    clock: Optional[IReactorTime] = None
    clientCapabilities: Mapping[str, Any] = Factory(dict)
    onMessage: Optional[MessageHook] = None
    onEnded: Optional[EndedHook] = None
    startTimeout: Optional[float] = 30.0
    stopGrace: float = 2.0
    maxMessageSize: int = DEFAULT_MAX_MESSAGE_SIZE
    environ: Optional[Mapping[str, str]] = field(default=None, repr=False)
    cwd: Optional[str] = None
    stderrLinesPerSecond: int = 100

    serverCapabilities: dict[str, Any] = field(init=False, factory=dict)
    serverInfo: dict[str, Any] = field(init=False, factory=dict)
    protocolVersion: Optional[str] = field(init=False, default=None)
    instructions: Optional[str] = field(init=False, default=None)
    alive: bool = field(init=False, default=False)
    pid: Optional[int] = field(init=False, default=None)
    exitStatus: Optional[int] = field(init=False, default=None)
    exitSignal: Optional[int] = field(init=False, default=None)
    droppedResponses: int = field(init=False, default=0)

    _state: str = field(init=False, default=NEW)
    _transport: Optional[IProcessTransport] = field(init=False, default=None)
    _nextId: int = field(init=False, default=0)
    _pending: dict[int, _Pending] = field(init=False, factory=dict)
    _serverRequests: dict[Union[str, int], Deferred[Any]] = field(init=False, factory=dict)
    _splitter: LineSplitter = field(init=False)
    _stderr: CappedLines = field(init=False)
    _stderrWindow: int = field(init=False, default=-1)
    _stderrCount: int = field(init=False, default=0)
    _stderrSuppressed: int = field(init=False, default=0)
    _fatal: Optional[UpstreamError] = field(init=False, default=None)
    _stopRequested: bool = field(init=False, default=False)
    _timers: dict[str, IDelayedCall] = field(init=False, factory=dict)
    _pipesClosed: bool = field(init=False, default=False)
    _exitDone: bool = field(init=False, default=False)
    _exitExpected: bool = field(init=False, default=False)
    _groupDone: bool = field(init=False, default=False)
    _groupStage: str = field(init=False, default="")
    _groupDeadline: float = field(init=False, default=0.0)
    _stopWaiters: list[Deferred[None]] = field(init=False, factory=list)

    def __attrs_post_init__(self) -> None:
        if self.clock is None:
            self.clock = IReactorTime(self.reactor)
        self._splitter = LineSplitter(self.maxMessageSize)
        self._stderr = CappedLines(STDERR_LINE_LIMIT)

    # -- IUpstream -----------------------------------------------------------

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def inFlight(self) -> int:
        return len(self._pending)

    @property
    def ready(self) -> bool:
        """
        Whether the handshake is done and requests are accepted.
        """
        return self._state == READY

    @property
    def state(self) -> str:
        return self._state

    def start(self) -> Deferred[None]:
        """
        Spawn the process and run the C{initialize} handshake.

        @return: a Deferred firing with C{None}, or failing with
            L{UpstreamUnavailable} (the process is then stopped).
        """
        if self._state != NEW:
            return fail(UpstreamError(f"upstream {self.name} was already started"))
        return Deferred.fromCoroutine(self._start())

    def request(
        self, method: str, params: Optional[dict[str, Any]], timeout: Optional[float]
    ) -> Deferred[Any]:
        """
        Send a request.

        @param timeout: seconds, or C{None} for none.
        @return: a Deferred firing with the result, or failing with
            L{UpstreamError} (the upstream's error, with its code and data),
            L{UpstreamTimeout} or L{UpstreamUnavailable}.  Cancelling it, or
            its timeout, sends C{notifications/cancelled} upstream and drops
            a late answer.
        """
        if self._state != READY:
            return fail(self._notRunning())
        return self._request(method, params, timeout)

    def notify(self, method: str, params: Optional[dict[str, Any]]) -> None:
        """
        Send a notification; dropped when the process is not running.
        """
        if self._state in (STARTING, READY):
            self._write(jsonrpc.notification(method, params))

    def stop(self) -> Deferred[None]:
        """
        Close stdin; after C{stopGrace} seconds SIGTERM the process group;
        after as many again SIGKILL it.  Members of the group that outlive
        the process are signalled the same way.

        @return: a Deferred firing with C{None} once the process and its
            group have ended.  Calling it again is harmless.
        """
        if self._state == NEW:
            self._state = ENDED
        if self._state == ENDED:
            return succeed(None)
        waiter: Deferred[None] = Deferred()
        self._stopWaiters.append(waiter)
        if not self._stopRequested:
            self._stopRequested = True
            if self._state in (STARTING, READY):
                self._state = STOPPING
                self.alive = False
                assert self._transport is not None
                self._transport.closeStdin()
                self._timers["term"] = self._callLater(self.stopGrace, self._terminate)
        return waiter

    # -- sending -------------------------------------------------------------

    def _callLater(self, delay: float, f: Callable[..., Any], *args: Any) -> IDelayedCall:
        assert self.clock is not None
        return self.clock.callLater(delay, f, *args)

    def _notRunning(self) -> UpstreamUnavailable:
        if self._fatal is not None:
            return UpstreamUnavailable(self._fatal.message)
        if self._state in (EXITED, ENDED) and not self._stopRequested:
            how = describeExit(self.exitStatus, self.exitSignal)
            return UpstreamUnavailable(f"upstream {self.name} exited ({how})")
        return UpstreamUnavailable(f"upstream {self.name} is not running")

    def _write(self, message: dict[str, Any]) -> None:
        # Once stopping, stdin is closed (or the process is being killed).
        if self._transport is not None and self._state in (STARTING, READY):
            self._transport.write(jsonrpc.encode(message) + b"\n")

    def _request(
        self, method: str, params: Optional[dict[str, Any]], timeout: Optional[float]
    ) -> Deferred[Any]:
        self._nextId += 1
        requestId = self._nextId
        try:
            data = jsonrpc.encode(jsonrpc.request(requestId, method, params)) + b"\n"
        except (TypeError, ValueError) as e:
            return fail(UpstreamError(f"cannot encode {method} request: {e}"))
        entry = _Pending(method)
        entry.deferred = Deferred(lambda d: self._cancelled(requestId))
        if timeout is not None:
            entry.timer = self._callLater(timeout, self._timedOut, requestId, timeout)
        self._pending[requestId] = entry
        assert self._transport is not None
        self._transport.write(data)
        return entry.deferred

    def _sendCancelled(self, requestId: int, method: str, reason: str) -> None:
        if method != "initialize":
            self._write(
                jsonrpc.notification(
                    "notifications/cancelled", {"requestId": requestId, "reason": reason}
                )
            )

    def _timedOut(self, requestId: int, timeout: float) -> None:
        entry = self._pending.pop(requestId, None)
        if entry is None:
            return
        entry.timer = None
        self._sendCancelled(requestId, entry.method, f"timed out after {timeout:g} s")
        entry.deferred.errback(
            UpstreamTimeout(
                f"upstream {self.name} did not answer {entry.method} within {timeout:g} s"
            )
        )

    def _cancelled(self, requestId: int) -> None:
        entry = self._pending.pop(requestId, None)
        if entry is None:
            return
        if entry.timer is not None and entry.timer.active():
            entry.timer.cancel()
        self._sendCancelled(requestId, entry.method, "cancelled by the client")
        # Deferred.cancel now fails the Deferred with CancelledError.

    def _failPending(self, error: UpstreamError) -> None:
        pending, self._pending = self._pending, {}
        for entry in pending.values():
            if entry.timer is not None and entry.timer.active():
                entry.timer.cancel()
            entry.deferred.errback(Failure(error))

    # -- start ---------------------------------------------------------------

    async def _start(self) -> None:
        self._state = STARTING
        try:
            env = childEnvironment(self.config.env, self.environ)
            executable = resolveCommand(self.name, self.config.command, env, self.cwd)
        except UpstreamError:
            self._state = ENDED
            raise
        assert self.config.command is not None
        argv = _spawn.wrapperArgv(executable, [self.config.command, *self.config.args], env)
        try:
            self._transport = self.reactor.spawnProcess(
                _UpstreamProcessProtocol(self),
                argv[0],
                argv,
                env=env,
                path=self.cwd,
                childFDs={0: "w", 1: "r", 2: "r"},
            )
        except (OSError, ValueError, TypeError) as e:
            self._state = ENDED
            reason = getattr(e, "strerror", None) or str(e)
            raise UpstreamUnavailable(f"upstream {self.name} could not be started: {reason}")
        self.pid = self._transport.pid
        self.alive = self._state == STARTING
        log.info(
            "upstream {upstream} started (pid {pid}, {command})",
            upstream=self.name,
            pid=self.pid,
            command=os.path.basename(executable),
        )
        try:
            result = await self._request(
                "initialize",
                {
                    "protocolVersion": LATEST_PROTOCOL_VERSION,
                    "capabilities": dict(self.clientCapabilities),
                    "clientInfo": {"name": "mcp-proxy", "version": mcp_proxy.__version__},
                },
                self.startTimeout,
            )
            self._accept(result)
        except Exception as e:
            await self.stop()
            if isinstance(e, CancelledError):
                raise
            raise self._startError(e)
        if self._state != STARTING:
            await self.stop()
            raise self._notRunning()
        self._state = READY
        self._write(jsonrpc.notification("notifications/initialized"))
        log.info(
            "upstream {upstream} ready (pid {pid}, protocol {protocolVersion})",
            upstream=self.name,
            pid=self.pid,
            protocolVersion=self.protocolVersion,
        )

    def _accept(self, result: Any) -> None:
        if not isinstance(result, dict):
            raise UpstreamError("initialize result is not an object")
        version = result.get("protocolVersion")
        if version not in SUPPORTED_PROTOCOL_VERSIONS:
            raise UpstreamError(f"unsupported protocol version {version!r}")
        capabilities = result.get("capabilities")
        serverInfo = result.get("serverInfo")
        instructions = result.get("instructions")
        self.protocolVersion = version
        self.serverCapabilities = capabilities if isinstance(capabilities, dict) else {}
        self.serverInfo = serverInfo if isinstance(serverInfo, dict) else {}
        self.instructions = instructions if isinstance(instructions, str) else None

    def _startError(self, e: Exception) -> UpstreamUnavailable:
        if isinstance(e, UpstreamExited):
            message = e.message
            if e.status in (_spawn.EXIT_NOT_FOUND, _spawn.EXIT_NOT_EXECUTABLE):
                message += ": the command could not be executed"
            return UpstreamUnavailable(f"{message} during start")
        if isinstance(e, UpstreamUnavailable):
            return e
        if isinstance(e, UpstreamError):
            if e.fromUpstream:
                return UpstreamUnavailable(
                    f"upstream {self.name} refused initialize: {e.message}", data=e.data
                )
            if isinstance(e, UpstreamTimeout):
                return UpstreamUnavailable(
                    f"upstream {self.name} did not answer initialize in time"
                )
            return UpstreamUnavailable(f"upstream {self.name} failed to start: {e.message}")
        log.failure("upstream {upstream} failed to start", Failure(e), upstream=self.name)
        return UpstreamUnavailable(f"upstream {self.name} failed to start")

    # -- receiving -----------------------------------------------------------

    def _stdoutReceived(self, data: bytes) -> None:
        if self._fatal is not None:
            return
        try:
            lines = self._splitter.feed(data)
        except MessageTooLarge as e:
            for line in e.lines:
                self._lineReceived(line)
            self._messageTooLarge(e.limit)
            return
        for line in lines:
            self._lineReceived(line)

    def _messageTooLarge(self, limit: int) -> None:
        self._fatal = UpstreamUnavailable(
            f"upstream {self.name} sent a message larger than {limit} bytes; the process was killed"
        )
        log.error("{message}", message=self._fatal.message, upstream=self.name, pid=self.pid)
        self.alive = False
        if self._state in (STARTING, READY):
            self._state = STOPPING
        self._failPending(self._fatal)
        if self.pid is not None:
            _spawn.signalGroup(self.pid, signal.SIGKILL)

    def _lineReceived(self, line: bytes) -> None:
        if not line.strip():
            return
        try:
            message = json.loads(line)
        except (ValueError, RecursionError):
            log.warn(
                "upstream {upstream} wrote a line that is not JSON ({size} bytes): {preview}",
                upstream=self.name,
                size=len(line),
                preview=cleanText(line[:200]),
            )
            return
        kind = jsonrpc.classify(message)
        if kind == "response":
            self._responseReceived(message)
        elif kind == "request":
            self._serverRequest(message)
        elif kind == "notification":
            self._serverNotification(message)
        else:
            log.warn(
                "upstream {upstream} wrote a line that is not a JSON-RPC message: {preview}",
                upstream=self.name,
                preview=cleanText(line[:200]),
            )

    def _responseReceived(self, message: dict[str, Any]) -> None:
        requestId = message.get("id")
        entry = None
        if isinstance(requestId, int) and not isinstance(requestId, bool):
            entry = self._pending.pop(requestId, None)
        if entry is None:
            self.droppedResponses += 1
            log.debug(
                "upstream {upstream} answered unknown or cancelled request {requestId}",
                upstream=self.name,
                requestId=requestId,
            )
            return
        if entry.timer is not None and entry.timer.active():
            entry.timer.cancel()
        if "error" in message:
            error = message["error"]
            if not isinstance(error, dict):
                error = {}
            code = error.get("code")
            text = error.get("message")
            entry.deferred.errback(
                Failure(
                    UpstreamError(
                        text if isinstance(text, str) else "upstream error",
                        code if isinstance(code, int) and not isinstance(code, bool) else None,
                        error.get("data"),
                        fromUpstream=True,
                    )
                )
            )
        else:
            entry.deferred.callback(message.get("result"))

    def _serverRequest(self, message: dict[str, Any]) -> None:
        requestId = message["id"]
        if message["method"] == "ping":
            self._write(jsonrpc.response(requestId, {}))
            return
        if self.onMessage is None:
            self._write(
                jsonrpc.errorResponse(requestId, jsonrpc.METHOD_NOT_FOUND, "Method not found")
            )
            return
        d = maybeDeferred(self.onMessage, self, message)
        if not d.called:
            self._serverRequests[requestId] = d

        def answered(result: Any) -> None:
            self._serverRequests.pop(requestId, None)
            if result is None:
                self._write(
                    jsonrpc.errorResponse(requestId, jsonrpc.METHOD_NOT_FOUND, "Method not found")
                )
            else:
                self._write(jsonrpc.response(requestId, result))

        def failed(f: Failure) -> None:
            self._serverRequests.pop(requestId, None)
            if f.check(CancelledError):
                return
            if isinstance(f.value, jsonrpc.JsonRpcError):
                e = f.value
                self._write(jsonrpc.errorResponse(requestId, e.code, e.message, e.data))
                return
            log.failure(
                "handling request {method} from upstream {upstream} failed",
                f,
                method=message["method"],
                upstream=self.name,
            )
            self._write(jsonrpc.errorResponse(requestId, jsonrpc.INTERNAL_ERROR, "Internal error"))

        d.addCallbacks(answered, failed)

    def _serverNotification(self, message: dict[str, Any]) -> None:
        if message["method"] == "notifications/cancelled":
            params = message.get("params")
            requestId = params.get("requestId") if isinstance(params, dict) else None
            handler = None
            if isinstance(requestId, (str, int)):
                handler = self._serverRequests.get(requestId)
            if handler is not None:
                handler.cancel()
                return
        if self.onMessage is not None:
            try:
                self.onMessage(self, message)
            except Exception:
                log.failure(
                    "handling notification {method} from upstream {upstream} failed",
                    method=message["method"],
                    upstream=self.name,
                )

    def _stderrReceived(self, data: bytes) -> None:
        for raw, truncated in self._stderr.feed(data):
            self._stderrLine(raw, truncated)

    def _stderrClosed(self) -> None:
        for raw, truncated in self._stderr.flush():
            self._stderrLine(raw, truncated)

    def _stderrLine(self, raw: bytes, truncated: bool) -> None:
        assert self.clock is not None
        window = int(self.clock.seconds())
        if window != self._stderrWindow:
            if self._stderrSuppressed:
                stderrLog.warn(
                    "upstream {upstream}: {count} stderr lines not logged",
                    upstream=self.name,
                    count=self._stderrSuppressed,
                )
            self._stderrWindow = window
            self._stderrCount = 0
            self._stderrSuppressed = 0
        self._stderrCount += 1
        if self._stderrCount > self.stderrLinesPerSecond:
            self._stderrSuppressed += 1
            return
        text = cleanText(raw)
        if truncated:
            text += " [truncated]"
        stderrLog.info(
            "[{upstream}] {line}", upstream=self.name, line=text, pid=self.pid, stream="stderr"
        )

    # -- ending --------------------------------------------------------------

    def _cancelTimers(self) -> None:
        timers, self._timers = self._timers, {}
        for timer in timers.values():
            if timer.active():
                timer.cancel()

    def _terminate(self) -> None:
        self._timers.pop("term", None)
        if self.pid is not None and self._state == STOPPING:
            log.info("upstream {upstream} did not exit; SIGTERM", upstream=self.name)
            _spawn.signalGroup(self.pid, signal.SIGTERM)
            self._timers["kill"] = self._callLater(self.stopGrace, self._kill)

    def _kill(self) -> None:
        self._timers.pop("kill", None)
        if self.pid is not None and self._state == STOPPING:
            log.warn("upstream {upstream} did not exit; SIGKILL", upstream=self.name)
            _spawn.signalGroup(self.pid, signal.SIGKILL)

    def _processExited(self, reason: Failure) -> None:
        self.exitStatus = getattr(reason.value, "exitCode", None)
        self.exitSignal = getattr(reason.value, "signal", None)
        self.alive = False
        self._state = EXITED
        self._cancelTimers()
        self._exitExpected = self._stopRequested
        if self._fatal is None and not self._stopRequested:
            log.warn(
                "upstream {upstream} (pid {pid}) exited ({how})",
                upstream=self.name,
                pid=self.pid,
                how=describeExit(self.exitStatus, self.exitSignal),
            )
        else:
            log.info("upstream {upstream} (pid {pid}) ended", upstream=self.name, pid=self.pid)
        self._checkGroup()

    def _exitReported(self) -> None:
        """
        Once the process has exited and its output has been read: fail what
        is still in flight and tell C{onEnded}.
        """
        if self._exitDone:
            return
        self._exitDone = True
        ended: Optional[UpstreamError]
        if self._fatal is not None:
            ended = error = self._fatal
        elif self._exitExpected:
            ended = None
            error = UpstreamUnavailable(f"upstream {self.name} was stopped")
        else:
            how = describeExit(self.exitStatus, self.exitSignal)
            ended = error = UpstreamExited(
                f"upstream {self.name} exited ({how})", self.exitStatus, self.exitSignal
            )
        if self.onEnded is not None:
            try:
                self.onEnded(self, ended)
            except Exception:
                log.failure("onEnded hook of upstream {upstream} failed", upstream=self.name)
        self._failPending(error)
        for handler in list(self._serverRequests.values()):
            handler.cancel()
        self._serverRequests.clear()

    def _checkGroup(self) -> None:
        """
        After the process has exited, end what is left of its group: SIGTERM,
        then SIGKILL after C{stopGrace}, polling until it is empty.
        """
        self._timers.pop("group", None)
        assert self.clock is not None and self.pid is not None
        now = self.clock.seconds()
        if not _spawn.groupAlive(self.pid):
            self._groupFinished()
            return
        if not self._groupStage or now >= self._groupDeadline:
            if not self._groupStage:
                self._groupStage = "term"
                _spawn.signalGroup(self.pid, signal.SIGTERM)
            elif self._groupStage == "term":
                self._groupStage = "kill"
                log.warn("upstream {upstream}: process group survives; SIGKILL", upstream=self.name)
                _spawn.signalGroup(self.pid, signal.SIGKILL)
            else:
                log.error(
                    "upstream {upstream}: process group {pgid} survives SIGKILL",
                    upstream=self.name,
                    pgid=self.pid,
                )
                self._groupFinished()
                return
            self._groupDeadline = now + self.stopGrace
        self._timers["group"] = self._callLater(0.02, self._checkGroup)

    def _groupFinished(self) -> None:
        self._groupDone = True
        if not self._pipesClosed:
            # The output is normally drained at once; a process that left
            # the group may hold the pipes open, so close them after a while.
            self._timers["close"] = self._callLater(self.stopGrace, self._closePipes)
        self._maybeEnded()

    def _closePipes(self) -> None:
        self._timers.pop("close", None)
        if not self._pipesClosed and self._transport is not None:
            log.warn("upstream {upstream}: output pipes still open; closing", upstream=self.name)
            self._transport.loseConnection()

    def _processEnded(self) -> None:
        self._pipesClosed = True
        self._exitReported()
        self._maybeEnded()

    def _maybeEnded(self) -> None:
        if self._pipesClosed and self._groupDone and self._state != ENDED:
            self._state = ENDED
            self._cancelTimers()
            waiters, self._stopWaiters = self._stopWaiters, []
            for waiter in waiters:
                waiter.callback(None)
