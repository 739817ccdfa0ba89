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
import shutil
import signal
from typing import Any, Mapping, Optional

from attrs import define, field
from twisted.internet.defer import CancelledError
from twisted.internet.interfaces import IDelayedCall, IProcessTransport
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from mcp_proxy import jsonrpc
from mcp_proxy.interfaces import IUpstream
from mcp_proxy.upstream import (
    UpstreamError,
    UpstreamExited,
    UpstreamTimeout,
    UpstreamUnavailable,
    _spawn,
)
from mcp_proxy.upstream._peer import (
    DEFAULT_MAX_MESSAGE_SIZE,
    ENDED,
    LATEST_PROTOCOL_VERSION,
    NEW,
    READY,
    STARTING,
    STOPPING,
    SUPPORTED_PROTOCOL_VERSIONS,
    EndedHook,
    JsonRpcPeer,
    MessageHook,
    PendingCall,
    cleanText,
)

log = Logger()
stderrLog = Logger(namespace="mcp_proxy.upstream.stderr")

# The environment variables passed from the proxy to every child, as the
# MCP SDKs do; everything else comes from the config.
SAFE_ENV_NAMES = ("HOME", "LOGNAME", "PATH", "SHELL", "TERM", "USER")

STDERR_LINE_LIMIT = 4096

# The state of a StdioUpstream whose process has exited, while its group
# and pipes are cleaned up (the others are those of every upstream).
EXITED = "exited"

# The public names: with those of every upstream (from _peer), which were
# defined here before and are still importable from here.
__all__ = [
    "DEFAULT_MAX_MESSAGE_SIZE",
    "ENDED",
    "EXITED",
    "LATEST_PROTOCOL_VERSION",
    "NEW",
    "READY",
    "SAFE_ENV_NAMES",
    "STARTING",
    "STOPPING",
    "SUPPORTED_PROTOCOL_VERSIONS",
    "CappedLines",
    "EndedHook",
    "LineSplitter",
    "MessageHook",
    "MessageTooLarge",
    "StdioUpstream",
    "childEnvironment",
    "cleanText",
    "describeExit",
    "resolveCommand",
]


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


def describeExit(status: Optional[int], sig: Optional[int]) -> str:
    """
    C{"status 3"} or C{"signal 9"}.
    """
    if sig is not None:
        return f"signal {sig}"
    return f"status {status}"


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
class StdioUpstream(JsonRpcPeer[PendingCall]):
    """
    One MCP server process.  Settings, hooks and the request table are
    those of L{JsonRpcPeer}, with:

    @ivar reactor: spawns the process (C{IReactorProcess}).
    @ivar config: what to run (C{command}, C{args}, C{env}) and its name.
    @ivar clock: timeouts and the stop grace periods (default: C{reactor}).
    @ivar onEnded: called once when the process exits: C{error} is C{None}
        after L{stop}, else the L{UpstreamError} that failed the in-flight
        calls.
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

    _log = log

    stopGrace: float = 2.0
    maxMessageSize: int = DEFAULT_MAX_MESSAGE_SIZE
    environ: Optional[Mapping[str, str]] = field(default=None, repr=False)
    cwd: Optional[str] = None
    stderrLinesPerSecond: int = 100

    pid: Optional[int] = field(init=False, default=None)
    exitStatus: Optional[int] = field(init=False, default=None)
    exitSignal: Optional[int] = field(init=False, default=None)

    _transport: Optional[IProcessTransport] = field(init=False, default=None)
    _splitter: LineSplitter = field(init=False)
    _stderr: CappedLines = field(init=False)
    _stderrWindow: int = field(init=False, default=-1)
    _stderrCount: int = field(init=False, default=0)
    _stderrSuppressed: int = field(init=False, default=0)
    _timers: dict[str, IDelayedCall] = field(init=False, factory=dict)
    _pipesClosed: bool = field(init=False, default=False)
    _exitExpected: bool = field(init=False, default=False)
    _groupDone: bool = field(init=False, default=False)
    _groupStage: str = field(init=False, default="")
    _groupDeadline: float = field(init=False, default=0.0)

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        self._splitter = LineSplitter(self.maxMessageSize)
        self._stderr = CappedLines(STDERR_LINE_LIMIT)

    # -- stop ----------------------------------------------------------------

    def _beginStop(self) -> None:
        """
        Close stdin; after C{stopGrace} seconds SIGTERM the process group;
        after as many again SIGKILL it.  Members of the group that outlive
        the process are signalled the same way; L{stop} fires once the
        process and its group have ended.
        """
        if not self._stopRequested:
            self._stopRequested = True
            if self._state in (STARTING, READY):
                self._state = STOPPING
                self.alive = False
                assert self._transport is not None
                self._transport.closeStdin()
                self._timers["term"] = self._callLater(self.stopGrace, self._terminate)

    # -- sending -------------------------------------------------------------

    def _notRunning(self) -> UpstreamUnavailable:
        if self._fatal is None and self._state in (EXITED, ENDED) and not self._stopRequested:
            how = describeExit(self.exitStatus, self.exitSignal)
            return UpstreamUnavailable(f"upstream {self.name} exited ({how})")
        return super()._notRunning()

    def _sendMessage(self, message: dict[str, Any]) -> None:
        # Once stopping, stdin is closed (or the process is being killed).
        if self._transport is not None and self._state in (STARTING, READY):
            self._transport.write(jsonrpc.encode(message) + b"\n")

    def _newEntry(self, requestId: int, method: str, body: bytes) -> PendingCall:
        return PendingCall(requestId, method)

    def _transmit(self, entry: PendingCall, body: bytes) -> None:
        assert self._transport is not None
        self._transport.write(body + b"\n")

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
            await self._initialize(self.startTimeout)
        except Exception as e:
            await self.stop()
            if isinstance(e, CancelledError):
                raise
            raise self._startError(e)
        if self._state != STARTING:
            await self.stop()
            raise self._notRunning()
        self._state = READY
        self._sendMessage(jsonrpc.notification("notifications/initialized"))
        log.info(
            "upstream {upstream} ready (pid {pid}, protocol {protocolVersion})",
            upstream=self.name,
            pid=self.pid,
            protocolVersion=self.protocolVersion,
        )

    def _initializeError(self, problem: str) -> UpstreamError:
        # _startError names the upstream.
        return UpstreamError(problem)

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
        if not self._dispatch(message):
            log.warn(
                "upstream {upstream} wrote a line that is not a JSON-RPC message: {preview}",
                upstream=self.name,
                preview=cleanText(line[:200]),
            )

    def _stderrReceived(self, data: bytes) -> None:
        for raw, truncated in self._stderr.feed(data):
            self._stderrLine(raw, truncated)

    def _stderrClosed(self) -> None:
        for raw, truncated in self._stderr.flush():
            self._stderrLine(raw, truncated)

    def _stderrLine(self, raw: bytes, truncated: bool) -> None:
        window = int(self._clock.seconds())
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
            self._cancelTimer(timer)

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
        if self._endedReported:
            return
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
        self._reportEnded(ended)
        self._abandonAll(error)

    def _checkGroup(self) -> None:
        """
        After the process has exited, end what is left of its group: SIGTERM,
        then SIGKILL after C{stopGrace}, polling until it is empty.
        """
        self._timers.pop("group", None)
        assert self.pid is not None
        now = self._clock.seconds()
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
            self._cancelTimers()
            self._ended()
