"""
The client end of an MCP session, whatever carries its messages.

L{JsonRpcPeer} is what every upstream shares: its life (start, ready,
stop), the JSON-RPC request table (ids, timeouts on the injected clock,
cancellation that sends C{notifications/cancelled}, late answers dropped),
what the server sends on its own (given to C{onMessage}; C{ping} answered
here), the C{initialize} handshake, and the ending (every call in flight
failed, C{onEnded} told once).  A subclass moves the bytes: a process's
stdin and stdout (L{StdioUpstream<mcp_proxy.upstream.stdio.StdioUpstream>}),
or HTTP (L{RemoteUpstream<mcp_proxy.upstream.http.RemoteUpstream>}).
"""

from __future__ import annotations

import re
from abc import ABCMeta, abstractmethod
from typing import (
    TYPE_CHECKING,
    Any,
    Callable,
    ClassVar,
    Coroutine,
    Generic,
    Mapping,
    Optional,
    TypeVar,
    Union,
)

from attrs import Factory, define, field
from twisted.internet.defer import CancelledError, Deferred, fail, maybeDeferred, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

import mcp_proxy
from mcp_proxy import jsonrpc
from mcp_proxy.interfaces import IUpstream
from mcp_proxy.models import UpstreamConfig
from mcp_proxy.upstream import UpstreamError, UpstreamTimeout, UpstreamUnavailable

if TYPE_CHECKING:
    from mcp_proxy.upstream.pool import UpstreamFactory

SUPPORTED_PROTOCOL_VERSIONS = ("2024-11-05", "2025-03-26", "2025-06-18", "2025-11-25")
LATEST_PROTOCOL_VERSION = "2025-11-25"

DEFAULT_MAX_MESSAGE_SIZE = 64 * 1024 * 1024

# States of an upstream (a stdio one also has "exited").
NEW = "new"
STARTING = "starting"
READY = "ready"
STOPPING = "stopping"
ENDED = "ended"

MessageHook = Callable[[Any, dict[str, Any]], Any]
EndedHook = Callable[[Any, Optional[UpstreamError]], None]

_CONTROL_CHARS = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def cleanText(raw: bytes) -> str:
    """
    Untrusted bytes as one printable line: UTF-8 (invalid bytes replaced),
    tabs as spaces, other control characters removed.
    """
    text = raw.decode("utf-8", "replace").replace("\t", " ")
    return _CONTROL_CHARS.sub("", text)


class PendingCall:
    """
    A request awaiting its response.
    """

    __slots__ = ("deferred", "method", "requestId", "timer")

    def __init__(self, requestId: int, method: str) -> None:
        self.requestId = requestId
        self.method = method
        self.deferred: Deferred[Any] = Deferred()
        self.timer: Optional[IDelayedCall] = None


EntryT = TypeVar("EntryT", bound=PendingCall)


@define(eq=False)
class JsonRpcPeer(Generic[EntryT], metaclass=ABCMeta):
    """
    An upstream, but for how its messages travel.  A subclass provides:

      - L{_start}: spawn or connect, then L{_initialize}; the state is
        C{STARTING} meanwhile, and C{READY} after;
      - L{_newEntry} and L{_transmit}: the record of a request in flight,
        and the sending of its encoded message;
      - L{_sendMessage}: the sending of a notification or reply;
      - L{_beginStop}: the stop, ended by L{_ended};

    and may extend the timers (L{_callLater}, L{_cancelTimer}), what
    happens to a settled call's transmission (L{_abandon},
    L{_responseArrived}), and the ending (L{_abandonAll}, L{_notRunning}).

    @ivar reactor: what the transport needs (spawning, connecting).
    @ivar config: the upstream's config; its C{name} names it.
    @ivar clock: timeouts (default: C{reactor}).
    @ivar clientCapabilities: the capabilities sent in C{initialize}.
    @ivar onMessage: called as C{onMessage(upstream, message)} for each
        notification and each request from the server except C{ping} (which
        is answered C{{}} here).  For a request, its result (or a Deferred
        of it) is sent back as the response; C{None} answers "Method not
        found"; a L{JsonRpcError<mcp_proxy.jsonrpc.JsonRpcError>} answers
        that error.  A C{notifications/cancelled} for such a request cancels
        that Deferred.
    @ivar onEnded: called once as C{onEnded(upstream, error)} when the
        upstream ends: C{error} is C{None} after L{stop}, else the
        L{UpstreamError} that failed the in-flight calls.
    @ivar startTimeout: seconds the start may take.
    @ivar droppedResponses: answers to no request in flight (unknown,
        timed out or cancelled ones).
    """

    # The subclass's module logger, so that its events keep their namespace.
    _log: ClassVar[Logger] = Logger()

    reactor: Any
    config: UpstreamConfig
    clock: Optional[IReactorTime] = None
    clientCapabilities: Mapping[str, Any] = Factory(dict)
    onMessage: Optional[MessageHook] = None
    onEnded: Optional[EndedHook] = None
    startTimeout: Optional[float] = 30.0

    serverCapabilities: dict[str, Any] = field(init=False, factory=dict)
    serverInfo: dict[str, Any] = field(init=False, factory=dict)
    protocolVersion: Optional[str] = field(init=False, default=None)
    instructions: Optional[str] = field(init=False, default=None)
    alive: bool = field(init=False, default=False)
    droppedResponses: int = field(init=False, default=0)

    _state: str = field(init=False, default=NEW)
    _nextId: int = field(init=False, default=0)
    _pending: dict[int, EntryT] = field(init=False, factory=dict)
    _serverRequests: dict[Union[str, int], Deferred[Any]] = field(init=False, factory=dict)
    _fatal: Optional[UpstreamError] = field(init=False, default=None)
    _stopRequested: bool = field(init=False, default=False)
    _endedReported: bool = field(init=False, default=False)
    _stopWaiters: list[Deferred[None]] = field(init=False, factory=list)

    def __attrs_post_init__(self) -> None:
        if self.clock is None:
            self.clock = IReactorTime(self.reactor)

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
        Spawn or connect, and run the C{initialize} handshake.

        @return: a Deferred firing with C{None}, or failing with
            L{UpstreamUnavailable} (the upstream is then stopped).
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
            L{UpstreamError} (the upstream's JSON-RPC error with its code
            and data, or a transport failure), L{UpstreamTimeout} or
            L{UpstreamUnavailable}.  Cancelling it, or its timeout, sends
            C{notifications/cancelled} upstream and drops a late answer.
        """
        if self._state != READY:
            return fail(self._notRunning())
        return self._request(method, params, timeout)

    def notify(self, method: str, params: Optional[dict[str, Any]]) -> None:
        """
        Send a notification; dropped when not running.
        """
        self._sendMessage(jsonrpc.notification(method, params))

    def stop(self) -> Deferred[None]:
        """
        Stop (see L{_beginStop} of each transport): what is in flight fails
        with L{UpstreamUnavailable}.

        @return: a Deferred firing with C{None} once ended.  Calling it
            again is harmless.
        """
        if self._state == NEW:
            self._state = ENDED
        if self._state == ENDED:
            return succeed(None)
        waiter: Deferred[None] = Deferred()
        self._stopWaiters.append(waiter)
        self._beginStop()
        return waiter

    # -- what a transport provides -------------------------------------------

    @abstractmethod
    def _start(self) -> Coroutine[Any, Any, None]:
        """
        Spawn or connect, and run L{_initialize}.
        """

    @abstractmethod
    def _newEntry(self, requestId: int, method: str, body: bytes) -> EntryT:
        """
        The record of a request about to be sent.
        """

    @abstractmethod
    def _transmit(self, entry: EntryT, body: bytes) -> None:
        """
        Send the request of C{entry}, encoded as C{body}.  Its response
        comes back through L{_dispatch}.
        """

    @abstractmethod
    def _sendMessage(self, message: dict[str, Any]) -> None:
        """
        Send a notification or a reply; dropped when not running.
        """

    @abstractmethod
    def _beginStop(self) -> None:
        """
        Begin stopping (L{stop} was called, not for the first time perhaps);
        call L{_ended} once done.
        """

    # -- timers --------------------------------------------------------------

    @property
    def _clock(self) -> IReactorTime:
        assert self.clock is not None
        return self.clock

    def _callLater(self, delay: float, f: Callable[..., Any], *args: Any) -> IDelayedCall:
        return self._clock.callLater(delay, f, *args)

    def _cancelTimer(self, call: Optional[IDelayedCall]) -> None:
        if call is not None and call.active():
            call.cancel()

    # -- requests ------------------------------------------------------------

    def _notRunning(self) -> UpstreamUnavailable:
        if self._fatal is not None:
            return UpstreamUnavailable(self._fatal.message)
        return UpstreamUnavailable(f"upstream {self.name} is not running")

    def _request(
        self, method: str, params: Optional[dict[str, Any]], timeout: Optional[float]
    ) -> Deferred[Any]:
        self._nextId += 1
        requestId = self._nextId
        try:
            body = jsonrpc.encode(jsonrpc.request(requestId, method, params))
        except (TypeError, ValueError) as e:
            return fail(UpstreamError(f"cannot encode {method} request: {e}"))
        entry = self._newEntry(requestId, method, body)
        entry.deferred = Deferred(lambda d: self._cancelled(requestId))
        if timeout is not None:
            entry.timer = self._callLater(timeout, self._timedOut, requestId, timeout)
        self._pending[requestId] = entry
        self._transmit(entry, body)
        return entry.deferred

    def _settle(self, requestId: int) -> Optional[EntryT]:
        """
        Take a request out of the table, with its timer.
        """
        entry = self._pending.pop(requestId, None)
        if entry is None:
            return None
        self._cancelTimer(entry.timer)
        entry.timer = None
        return entry

    def _abandon(self, entry: EntryT) -> None:
        """
        Give up the transmission of a request that timed out or was
        cancelled.
        """

    def _sendCancelled(self, requestId: int, method: str, reason: str) -> None:
        if method != "initialize":
            self._sendMessage(
                jsonrpc.notification(
                    "notifications/cancelled", {"requestId": requestId, "reason": reason}
                )
            )

    def _timedOut(self, requestId: int, timeout: float) -> None:
        entry = self._pending.get(requestId)
        if entry is None:
            return
        entry.timer = None
        self._settle(requestId)
        self._abandon(entry)
        self._sendCancelled(requestId, entry.method, f"timed out after {timeout:g} s")
        entry.deferred.errback(
            UpstreamTimeout(
                f"upstream {self.name} did not answer {entry.method} within {timeout:g} s"
            )
        )

    def _cancelled(self, requestId: int) -> None:
        entry = self._settle(requestId)
        if entry is None:
            return
        self._abandon(entry)
        self._sendCancelled(requestId, entry.method, "cancelled by the client")
        # Deferred.cancel now fails the Deferred with CancelledError.

    def _failPending(self, error: UpstreamError) -> None:
        pending, self._pending = self._pending, {}
        for entry in pending.values():
            self._cancelTimer(entry.timer)
            entry.deferred.errback(Failure(error))

    # -- the handshake -------------------------------------------------------

    async def _initialize(self, timeout: Optional[float]) -> None:
        """
        Send C{initialize} and take in its result.
        """
        result = await self._request(
            "initialize",
            {
                "protocolVersion": LATEST_PROTOCOL_VERSION,
                "capabilities": dict(self.clientCapabilities),
                "clientInfo": {"name": "mcp-proxy", "version": mcp_proxy.__version__},
            },
            timeout,
        )
        self._accept(result)

    def _accept(self, result: Any) -> None:
        if not isinstance(result, dict):
            raise self._initializeError("the initialize result is not an object")
        version = result.get("protocolVersion")
        if version not in SUPPORTED_PROTOCOL_VERSIONS:
            shown = cleanText(str(version).encode("utf-8", "replace")[:40])
            raise self._initializeError(f"unsupported protocol version {shown!r}")
        capabilities = result.get("capabilities")
        serverInfo = result.get("serverInfo")
        instructions = result.get("instructions")
        self.protocolVersion = version
        self.serverCapabilities = capabilities if isinstance(capabilities, dict) else {}
        self.serverInfo = serverInfo if isinstance(serverInfo, dict) else {}
        self.instructions = instructions if isinstance(instructions, str) else None

    def _initializeError(self, problem: str) -> UpstreamError:
        """
        The error for an unacceptable C{initialize} result.
        """
        return UpstreamError(f"upstream {self.name}: {problem}")

    # -- messages from the server --------------------------------------------

    def _dispatch(self, message: Any) -> bool:
        """
        Handle one decoded message.

        @return: whether it was a JSON-RPC message (the caller says what
            else it was).
        """
        kind = jsonrpc.classify(message)
        if kind == "response":
            self._responseReceived(message)
        elif kind == "request":
            self._serverRequest(message)
        elif kind == "notification":
            self._serverNotification(message)
        else:
            return False
        return True

    def _responseArrived(self, entry: EntryT) -> None:
        """
        The response of C{entry} came, before its Deferred fires.
        """

    def _responseReceived(self, message: dict[str, Any]) -> None:
        requestId = message.get("id")
        entry = None
        if isinstance(requestId, int) and not isinstance(requestId, bool):
            entry = self._settle(requestId)
        if entry is None:
            self.droppedResponses += 1
            self._log.debug(
                "upstream {upstream} answered unknown or cancelled request {requestId}",
                upstream=self.name,
                requestId=requestId,
            )
            return
        self._responseArrived(entry)
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
            self._sendMessage(jsonrpc.response(requestId, {}))
            return
        if self.onMessage is None:
            self._sendMessage(
                jsonrpc.errorResponse(requestId, jsonrpc.METHOD_NOT_FOUND, "Method not found")
            )
            return
        d = maybeDeferred(self.onMessage, self, message)
        if not d.called:
            self._serverRequests[requestId] = d

        def answered(result: Any) -> None:
            self._serverRequests.pop(requestId, None)
            if result is None:
                self._sendMessage(
                    jsonrpc.errorResponse(requestId, jsonrpc.METHOD_NOT_FOUND, "Method not found")
                )
            else:
                self._sendMessage(jsonrpc.response(requestId, result))

        def failed(f: Failure) -> None:
            self._serverRequests.pop(requestId, None)
            if f.check(CancelledError):
                return
            if isinstance(f.value, jsonrpc.JsonRpcError):
                e = f.value
                self._sendMessage(jsonrpc.errorResponse(requestId, e.code, e.message, e.data))
                return
            self._log.failure(
                "handling request {method} from upstream {upstream} failed",
                f,
                method=message["method"],
                upstream=self.name,
            )
            self._sendMessage(
                jsonrpc.errorResponse(requestId, jsonrpc.INTERNAL_ERROR, "Internal error")
            )

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
                self._log.failure(
                    "handling notification {method} from upstream {upstream} failed",
                    method=message["method"],
                    upstream=self.name,
                )

    # -- ending --------------------------------------------------------------

    def _reportEnded(self, error: Optional[UpstreamError]) -> None:
        """
        Tell C{onEnded}, once.
        """
        if self._endedReported:
            return
        self._endedReported = True
        if self.onEnded is not None:
            try:
                self.onEnded(self, error)
            except Exception:
                self._log.failure("onEnded hook of upstream {upstream} failed", upstream=self.name)

    def _abandonAll(self, error: UpstreamError) -> None:
        """
        Fail every call in flight with C{error}; cancel the handling of
        every request from the server.
        """
        self._failPending(error)
        for handler in list(self._serverRequests.values()):
            handler.cancel()
        self._serverRequests.clear()

    def _ended(self) -> None:
        """
        All is over: fire what L{stop} returned.
        """
        self._state = ENDED
        self.alive = False
        waiters, self._stopWaiters = self._stopWaiters, []
        for waiter in waiters:
            waiter.callback(None)


def factoryFor(
    upstreamType: Callable[..., IUpstream],
    reactor: Any,
    clock: Optional[IReactorTime],
    clientCapabilities: Optional[Mapping[str, Any]],
    **settings: Any,
) -> UpstreamFactory:
    """
    An L{UpstreamFactory<mcp_proxy.upstream.pool.UpstreamFactory>} of
    C{upstreamType(reactor, config, ...)} with C{clock}, C{settings}, and
    C{clientCapabilities} merged with the config's own (which win).
    """

    def make(
        config: UpstreamConfig,
        onMessage: Optional[MessageHook],
        onEnded: Optional[EndedHook],
    ) -> IUpstream:
        return upstreamType(
            reactor,
            config,
            clock=clock,
            clientCapabilities={**(clientCapabilities or {}), **config.clientCapabilities},
            onMessage=onMessage,
            onEnded=onEnded,
            **settings,
        )

    return make
