"""
Remote upstreams over HTTP, and the Streamable HTTP one.

L{RemoteUpstream} holds what the remote transports share beyond what
every upstream does (L{mcp_proxy.upstream._peer}: the requests in flight,
what the server sends on its own, the handshake): the treq client on a
persistent connection pool (redirects never followed), the headers built
from the config alone (L{mcp_proxy.upstream.headers}), an HTTP exchange
per request, the start against a deadline, and the ending.
L{StreamableHttpUpstream} speaks the Streamable HTTP transport (one POST
per message, answers as JSON or as an event stream); L{SseUpstream
<mcp_proxy.upstream.sse.SseUpstream>} the legacy HTTP+SSE one.

A remote upstream ends (C{alive} false, C{onEnded} called, every call in
flight failed with L{UpstreamUnavailable}) when its server cannot be
reached or drops a connection during an answer, so that the pool starts a
new one on next use.  An HTTP error answer fails only its own call.
"""

from __future__ import annotations

import json
from abc import abstractmethod
from typing import TYPE_CHECKING, Any, Callable, Coroutine, Mapping, Optional, Union, cast
from urllib.parse import urlsplit

from attrs import define, field
from treq.client import HTTPClient
from twisted.internet import error as netError
from twisted.internet.defer import CancelledError, Deferred, TimeoutError, succeed
from twisted.internet.interfaces import IDelayedCall, IPushProducer, IReactorTime
from twisted.internet.protocol import Protocol, connectionDone
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import (
    Agent,
    HTTPConnectionPool,
    PotentialDataLoss,
    RequestTransmissionFailed,
    ResponseDone,
    ResponseFailed,
    ResponseNeverReceived,
)
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH, IAgentEndpointFactory, IBodyProducer, IResponse
from zope.interface import implementer

from mcp_proxy import jsonrpc
from mcp_proxy.interfaces import IUpstream
from mcp_proxy.upstream import UpstreamError, UpstreamTimeout, UpstreamUnavailable
from mcp_proxy.upstream._peer import (
    DEFAULT_MAX_MESSAGE_SIZE,
    ENDED,
    READY,
    STARTING,
    STOPPING,
    JsonRpcPeer,
    PendingCall,
    cleanText,
    factoryFor,
)
from mcp_proxy.upstream._sseparse import EventStreamParser, EventTooLarge, ServerSentEvent
from mcp_proxy.upstream.headers import upstreamHeaders

if TYPE_CHECKING:
    from mcp_proxy.upstream.pool import UpstreamFactory

log = Logger()

DEFAULT_CONNECT_TIMEOUT = 10.0
# Seconds an answer's event stream may stay open after the answer came.
DEFAULT_LINGER = 5.0
# The most read of an error answer or of a body that is thrown away.
ERROR_BODY_LIMIT = 4096
DISCARD_LIMIT = 64 * 1024
MAX_SESSION_ID_LENGTH = 1024

JSON_TYPE = "application/json"
EVENT_STREAM_TYPE = "text/event-stream"
SESSION_HEADER = "Mcp-Session-Id"
VERSION_HEADER = "MCP-Protocol-Version"


class SessionGone(UpstreamUnavailable):
    """
    The upstream answered 404: it does not know the session any more.
    """


@implementer(IBodyProducer)
class BytesProducer:
    """
    A request body that is already in memory, written at once (no
    cooperator, a known C{Content-Length}).
    """

    def __init__(self, body: bytes) -> None:
        self.body = body
        self.length = len(body)

    def startProducing(self, consumer: Any) -> Deferred[None]:
        consumer.write(self.body)
        return succeed(None)

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass


class BodyReader(Protocol):
    """
    Reads a response body: whole into memory (up to a limit), or chunk by
    chunk into C{onData}.  C{done} fires with the body (C{b""} when
    streamed) or fails; cancelling it, or a limit or C{onData} error,
    closes the connection.
    """

    def __init__(
        self,
        limit: int,
        tooLarge: Callable[[], Exception],
        onData: Optional[Callable[[bytes], None]] = None,
    ) -> None:
        self.limit = limit
        self.tooLarge = tooLarge
        self.onData = onData
        self.size = 0
        self._chunks: list[bytes] = []
        self._finished = False
        self.done: Deferred[bytes] = Deferred(self._cancel)

    def dataReceived(self, data: bytes) -> None:
        if self._finished:
            return
        if self.onData is not None:
            try:
                self.onData(data)
            except Exception as e:
                self.abort(e)
            return
        self.size += len(data)
        if self.size > self.limit:
            self.abort(self.tooLarge())
            return
        self._chunks.append(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self._finished:
            return
        self._finished = True
        if reason.check(ResponseDone, PotentialDataLoss):
            self.done.callback(b"".join(self._chunks))
        else:
            self.done.errback(reason)

    def abort(self, error: Exception) -> None:
        """
        Fail C{done} with C{error} and close the connection.
        """
        if self._finished:
            return
        self._finished = True
        self.done.errback(Failure(error))
        self._stop()

    def _cancel(self, d: Deferred[bytes]) -> None:
        self._finished = True
        self._stop()

    def _stop(self) -> None:
        if self.transport is not None:
            cast(IPushProducer, self.transport).stopProducing()


def contentType(response: IResponse) -> str:
    """
    The media type of a response, lower case, without parameters.
    """
    values = response.headers.getRawHeaders(b"content-type") or [b""]
    return values[0].split(b";", 1)[0].strip().lower().decode("latin-1")


def connectionProblem(reason: Failure) -> Optional[str]:
    """
    What went wrong with the connection, when C{reason} is a connection
    failure rather than an answer; else C{None}.
    """
    if reason.check(netError.DNSLookupError):
        return "its host name could not be resolved"
    if reason.check(netError.ConnectionRefusedError):
        return "connection refused"
    if reason.check(netError.TimeoutError, netError.TCPTimedOutError):
        return "the connection timed out"
    if reason.check(netError.ConnectError):
        return "could not connect"
    if reason.check(ResponseNeverReceived):
        return "the connection closed before an answer"
    if reason.check(RequestTransmissionFailed):
        return "the request could not be sent"
    if reason.check(ResponseFailed):
        return "the connection was lost during an answer"
    if reason.check(netError.ConnectionLost, netError.ConnectionDone):
        return "the connection was lost"
    return None


def checkUrl(name: str, url: Optional[str]) -> str:
    """
    The URL of a remote upstream: C{http} or C{https}, with a host, without
    credentials.  Messages never show the URL (its query may be secret).

    @raise UpstreamUnavailable: when it is not such a URL.
    """
    if not url:
        raise UpstreamUnavailable(f"upstream {name} has no URL")
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a bad port
    except ValueError:
        raise UpstreamUnavailable(f"upstream {name} has an invalid URL")
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
        raise UpstreamUnavailable(f"upstream {name}: the URL must be http or https with a host")
    if parts.username is not None or parts.password is not None:
        raise UpstreamUnavailable(f"upstream {name}: the URL must not contain credentials")
    if any(c.isspace() or ord(c) < 0x20 or ord(c) == 0x7F for c in url):
        raise UpstreamUnavailable(f"upstream {name} has an invalid URL")
    return url


class _Pending(PendingCall):
    """
    A request awaiting its response, with its HTTP exchange.

    @ivar body: the encoded request, to send again after a new session.
    @ivar exchange: the HTTP exchange carrying it, until it is over.
    @ivar linger: closes the exchange a while after the response came.
    @ivar retried: whether it was sent again after a new session.
    """

    __slots__ = ("body", "exchange", "linger", "retried")

    def __init__(self, requestId: int, method: str, body: bytes) -> None:
        super().__init__(requestId, method)
        self.body = body
        self.exchange: Optional[Deferred[None]] = None
        self.linger: Optional[IDelayedCall] = None
        self.retried = False


class _Waiters:
    """
    Deferreds waiting for one event; cancelling one does not affect the
    others.
    """

    def __init__(self) -> None:
        self._waiting: list[Deferred[None]] = []

    def wait(self) -> Deferred[None]:
        d: Deferred[None] = Deferred(self._waiting.remove)
        self._waiting.append(d)
        return d

    def fire(self, result: Union[Failure, None]) -> None:
        waiting, self._waiting = self._waiting, []
        for d in waiting:
            if isinstance(result, Failure):
                d.errback(result)
            else:
                d.callback(None)


@implementer(IUpstream)
@define(eq=False)
class RemoteUpstream(JsonRpcPeer[_Pending]):
    """
    What the remote transports share.  Subclasses say how a message is
    delivered (L{_deliver}), how a notification or reply is posted
    (L{_postMessage}), and what happens before the handshake
    (L{_connect}), after it (L{_afterStart}) and at stop
    (L{_closeSession}).  Settings, hooks and the request table are those
    of L{JsonRpcPeer<mcp_proxy.upstream._peer.JsonRpcPeer>}, with:

    @ivar reactor: connects (C{IReactorTCP}, C{IReactorTime}; with TLS for
        https URLs).
    @ivar config: the upstream's C{url}, name and env (whose entries give
        the headers).
    @ivar clock: request timeouts, the start deadline, retries (default:
        C{reactor}).
    @ivar onEnded: called once as C{onEnded(upstream, error)}: C{error} is
        C{None} after L{stop}, else the L{UpstreamUnavailable} that failed
        the calls in flight.
    @ivar startTimeout: seconds the connection and handshake may take.
    @ivar connectTimeout: seconds a TCP (and TLS) connection may take.
    @ivar sendTimeout: seconds the POST of a notification or of a reply to
        a server request may take.
    @ivar stopTimeout: seconds the goodbye (a DELETE) may take at stop.
    @ivar maxMessageSize: the largest JSON body or event accepted; a larger
        one fails its call.
    @ivar maxPersistentPerHost: idle connections kept for reuse.
    @ivar endpointFactory: connects instead of the plain TCP/TLS endpoints
        (an C{IAgentEndpointFactory}, e.g. one that vets addresses; its own
        connect timeout then applies).
    @ivar lingerTimeout: seconds an answer's event stream may stay open
        after the answer; then its connection is closed.
    """

    _log = log

    connectTimeout: float = DEFAULT_CONNECT_TIMEOUT
    sendTimeout: float = 10.0
    stopTimeout: float = 2.0
    maxMessageSize: int = DEFAULT_MAX_MESSAGE_SIZE
    maxPersistentPerHost: int = 10
    endpointFactory: Optional[IAgentEndpointFactory] = None
    lingerTimeout: float = DEFAULT_LINGER

    _headers: dict[str, str] = field(init=False, factory=dict, repr=False)
    _ops: set[Deferred[Any]] = field(init=False, factory=set)
    _timers: set[IDelayedCall] = field(init=False, factory=set)
    _connectionPool: HTTPConnectionPool = field(init=False, repr=False)
    _http: HTTPClient = field(init=False, repr=False)

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        self._connectionPool = HTTPConnectionPool(self.reactor, persistent=True)
        self._connectionPool.maxPersistentPerHost = self.maxPersistentPerHost
        if self.endpointFactory is not None:
            agent = Agent.usingEndpointFactory(
                self.reactor, self.endpointFactory, pool=self._connectionPool
            )
        else:
            agent = Agent(
                self.reactor, connectTimeout=self.connectTimeout, pool=self._connectionPool
            )
        self._http = HTTPClient(agent)

    def _beginStop(self) -> None:
        """
        Abandon what is in flight (failing it with L{UpstreamUnavailable}),
        end the session, and close every connection.
        """
        if self._state in (STARTING, READY):
            self._stopRequested = True
            self._state = STOPPING
            self.alive = False
            d = Deferred.fromCoroutine(self._shutdown())
            d.addErrback(
                lambda f: log.failure("stopping upstream {upstream}", f, upstream=self.name)
            )

    # -- subclass hooks ------------------------------------------------------

    @abstractmethod
    def _deliver(self, entry: _Pending) -> Coroutine[Any, Any, None]:
        """
        Send the request of C{entry}; raise if it could not be sent or
        answered.  The response itself goes through L{_messageReceived}.
        """

    @abstractmethod
    def _postMessage(self, body: bytes) -> Coroutine[Any, Any, None]:
        """
        POST a notification or a reply; raise on failure.
        """

    async def _connect(self, deadline: Optional[float]) -> None:
        """
        Whatever precedes C{initialize}.
        """

    def _afterStart(self) -> None:
        """
        Called once ready.
        """

    async def _closeSession(self) -> None:
        """
        Say goodbye at stop (best effort, within C{stopTimeout}).
        """

    def _sessionGone(self, error: SessionGone) -> None:
        """
        A notification or reply was answered 404.
        """
        self._die(error)

    # -- start ---------------------------------------------------------------

    async def _start(self) -> None:
        self._state = STARTING
        self.alive = True
        deadline = None
        if self.startTimeout is not None:
            deadline = self._clock.seconds() + self.startTimeout
        try:
            checkUrl(self.name, self.config.url)
            self._headers = upstreamHeaders(self.config)
            await self._connect(deadline)
            await self._initialize(self._remaining(deadline))
            if self._state != STARTING:
                raise self._notRunning()
            await self._withTimeout(
                self._postMessage(
                    jsonrpc.encode(jsonrpc.notification("notifications/initialized"))
                ),
                self._remaining(deadline),
                "notifications/initialized",
            )
        except Exception as e:
            # A cancelled start() stays cancelled; a stop() fails it.
            cancelled = isinstance(e, CancelledError) and not self._stopRequested
            await self.stop()
            if cancelled:
                raise
            raise self._startError(e)
        if self._state != STARTING:
            await self.stop()
            raise self._notRunning()
        self._state = READY
        self._afterStart()
        log.info(
            "upstream {upstream} ready ({transport}, protocol {protocolVersion})",
            upstream=self.name,
            transport=self.config.transportType,
            protocolVersion=self.protocolVersion,
        )

    def _remaining(self, deadline: Optional[float]) -> Optional[float]:
        if deadline is None:
            return None
        return max(deadline - self._clock.seconds(), 0.001)

    async def _withTimeout(
        self, work: Coroutine[Any, Any, None], timeout: Optional[float], what: str
    ) -> None:
        d = self._track(Deferred.fromCoroutine(work))
        if timeout is not None:
            d.addTimeout(timeout, self._clock)
        try:
            await d
        except TimeoutError:
            raise UpstreamTimeout(f"upstream {self.name} did not accept {what} in time")

    def _startError(self, e: Exception) -> UpstreamUnavailable:
        if isinstance(e, UpstreamUnavailable):
            return e
        if isinstance(e, CancelledError):
            return UpstreamUnavailable(f"upstream {self.name} was stopped during start")
        if isinstance(e, UpstreamError):
            if e.fromUpstream:
                return UpstreamUnavailable(
                    f"upstream {self.name} refused initialize: {e.message}", data=e.data
                )
            if isinstance(e, UpstreamTimeout):
                return UpstreamUnavailable(f"upstream {self.name} did not start in time")
            return UpstreamUnavailable(e.message, data=e.data)
        log.failure("upstream {upstream} failed to start", Failure(e), upstream=self.name)
        return UpstreamUnavailable(f"upstream {self.name} failed to start")

    # -- requests ------------------------------------------------------------

    def _callLater(self, delay: float, f: Callable[..., Any], *args: Any) -> IDelayedCall:
        call: Optional[IDelayedCall] = None

        def run() -> None:
            assert call is not None
            self._timers.discard(call)
            f(*args)

        call = self._clock.callLater(delay, run)
        self._timers.add(call)
        return call

    def _cancelTimer(self, call: Optional[IDelayedCall]) -> None:
        if call is not None:
            self._timers.discard(call)
            if call.active():
                call.cancel()

    def _track(self, d: Deferred[Any]) -> Deferred[Any]:
        """
        Keep C{d} (an HTTP operation) until it has fired, so that L{stop}
        can abandon it.
        """
        if d.called:
            return d
        self._ops.add(d)

        def finished(result: object) -> object:
            self._ops.discard(d)
            return result

        return d.addBoth(finished)

    def _newEntry(self, requestId: int, method: str, body: bytes) -> _Pending:
        return _Pending(requestId, method, body)

    def _transmit(self, entry: _Pending, body: bytes) -> None:
        exchange: Deferred[None] = self._track(Deferred.fromCoroutine(self._deliver(entry)))
        if not exchange.called:
            entry.exchange = exchange

        def finished(result: object) -> None:
            entry.exchange = None
            self._cancelTimer(entry.linger)
            entry.linger = None
            if isinstance(result, Failure):
                self._exchangeFailed(entry, result)

        exchange.addBoth(finished)

    def _abandon(self, entry: _Pending) -> None:
        """
        Close the exchange of a request that timed out or was cancelled, or
        whose response came C{lingerTimeout} ago (its stream was read on
        until then).
        """
        exchange, entry.exchange = entry.exchange, None
        if exchange is not None:
            exchange.cancel()

    def _exchangeFailed(self, entry: _Pending, reason: Failure) -> None:
        if self._pending.get(entry.requestId) is not entry or self._state in (STOPPING, ENDED):
            if not reason.check(CancelledError, ResponseFailed, netError.ConnectingCancelledError):
                log.debug(
                    "upstream {upstream}: late failure of {method}: {error}",
                    upstream=self.name,
                    method=entry.method,
                    error=reason.getErrorMessage(),
                )
            return
        problem = connectionProblem(reason)
        if problem is not None:
            self._die(UpstreamUnavailable(f"upstream {self.name} is unreachable: {problem}"))
            return
        if isinstance(reason.value, SessionGone):
            self._die(reason.value)
            return
        if isinstance(reason.value, UpstreamError):
            error = reason.value
        else:
            log.failure(
                "upstream {upstream}: {method} failed",
                reason,
                upstream=self.name,
                method=entry.method,
            )
            error = UpstreamError(f"upstream {self.name}: {entry.method} failed")
        self._settle(entry.requestId)
        entry.deferred.errback(Failure(error))

    # -- messages from the server ----------------------------------------------

    def _messageReceived(self, message: Any) -> None:
        if not self._dispatch(message):
            log.warn(
                "upstream {upstream} sent something that is not a JSON-RPC message",
                upstream=self.name,
            )

    def _dataReceived(self, data: Union[bytes, str]) -> None:
        """
        One message (or a batch) as JSON text.
        """
        try:
            message = json.loads(data)
        except (ValueError, RecursionError):
            log.warn(
                "upstream {upstream} sent a message that is not JSON ({size} bytes)",
                upstream=self.name,
                size=len(data),
            )
            return
        if isinstance(message, list):
            for item in message:
                self._messageReceived(item)
        else:
            self._messageReceived(message)

    def _responseArrived(self, entry: _Pending) -> None:
        if entry.exchange is not None and entry.linger is None:
            entry.linger = self._callLater(self.lingerTimeout, self._abandon, entry)

    def _sendMessage(self, message: dict[str, Any]) -> None:
        """
        POST a notification or a reply in the background.
        """
        if self._state not in (STARTING, READY):
            return
        try:
            body = jsonrpc.encode(message)
        except (TypeError, ValueError) as e:
            log.error("upstream {upstream}: cannot encode a message: {e}", upstream=self.name, e=e)
            return
        d = self._track(Deferred.fromCoroutine(self._postMessage(body)))
        d.addTimeout(self.sendTimeout, self._clock)
        what = message.get("method") or "a reply"

        def failed(f: Failure) -> None:
            if self._state not in (STARTING, READY):
                return
            if isinstance(f.value, SessionGone):
                self._sessionGone(f.value)
                return
            problem = connectionProblem(f)
            if f.check(TimeoutError):
                problem = "timed out"
            elif isinstance(f.value, UpstreamError):
                problem = f.value.message
            log.warn(
                "upstream {upstream}: sending {what} failed: {problem}",
                upstream=self.name,
                what=what,
                problem=problem or f.getErrorMessage(),
            )

        d.addErrback(failed)

    # -- HTTP ----------------------------------------------------------------

    def _httpRequest(
        self, method: str, url: str, headers: dict[str, str], body: Optional[bytes] = None
    ) -> Deferred[IResponse]:
        """
        One HTTP request: never following a redirect, never buffering.
        """
        d = self._http.request(
            method,
            url,
            headers=Headers({name: [value] for name, value in headers.items()}),
            data=BytesProducer(body) if body is not None else None,
            allow_redirects=False,
            unbuffered=True,
        )
        return cast("Deferred[IResponse]", d)

    def _tooLarge(self) -> UpstreamError:
        return UpstreamError(
            f"upstream {self.name} sent a message larger than {self.maxMessageSize} bytes"
        )

    def _readBody(self, response: IResponse) -> Deferred[bytes]:
        """
        The whole body, at most C{maxMessageSize} bytes.
        """
        reader = BodyReader(self.maxMessageSize, self._tooLarge)
        response.deliverBody(reader)
        if response.length is not UNKNOWN_LENGTH and response.length > self.maxMessageSize:
            reader.abort(self._tooLarge())
        return reader.done

    async def _discard(self, response: IResponse) -> None:
        """
        Read and drop a body (so that its connection can be reused); a long
        one closes the connection instead.
        """
        reader = BodyReader(DISCARD_LIMIT, lambda: UpstreamError("body too long"))
        response.deliverBody(reader)
        try:
            await reader.done
        except Exception:
            pass

    def _readEvents(
        self,
        response: IResponse,
        onEvent: Callable[[ServerSentEvent], None],
        parser: Optional[EventStreamParser] = None,
    ) -> Deferred[bytes]:
        """
        Parse an event stream as it arrives, calling C{onEvent} for each
        event (no event larger than C{maxMessageSize}).

        @return: a Deferred firing when the stream ends.
        """
        if parser is None:
            parser = EventStreamParser(self.maxMessageSize)

        def onData(data: bytes) -> None:
            try:
                events = parser.feed(data)
            except EventTooLarge as e:
                for event in e.events:
                    onEvent(event)
                raise self._tooLarge()
            for event in events:
                onEvent(event)

        reader = BodyReader(self.maxMessageSize, self._tooLarge, onData)
        response.deliverBody(reader)
        return reader.done

    async def _httpError(self, response: IResponse, what: str) -> UpstreamError:
        """
        The error for an unexpected HTTP answer: its status and, when the
        body is a JSON-RPC error, its message.  Never a header.
        """
        code = response.code
        if 300 <= code < 400:
            await self._discard(response)
            return UpstreamError(
                f"upstream {self.name} answered {what} with HTTP {code}"
                " (a redirect; redirects are not followed)"
            )
        detail = ""
        reader = BodyReader(ERROR_BODY_LIMIT, lambda: UpstreamError("long"))
        response.deliverBody(reader)
        try:
            body = await reader.done
        except Exception:
            body = b""
        try:
            parsed = json.loads(body) if body else None
        except (ValueError, RecursionError):
            parsed = None
        error = parsed.get("error") if isinstance(parsed, dict) else None
        if isinstance(error, dict) and isinstance(error.get("message"), str):
            detail = ": " + cleanText(error["message"].encode("utf-8", "replace")[:200])
        return UpstreamError(f"upstream {self.name} answered {what} with HTTP {code}{detail}")

    async def _checkType(self, response: IResponse, what: str, *types: str) -> str:
        kind = contentType(response)
        if kind not in types:
            await self._discard(response)
            shown = cleanText(kind.encode("utf-8", "replace")[:60]) or "none"
            raise UpstreamError(
                f"upstream {self.name} answered {what} with content type {shown!r}"
                f" (HTTP {response.code})"
            )
        return kind

    # -- ending --------------------------------------------------------------

    def _die(self, error: UpstreamError) -> None:
        """
        The connection is lost: fail everything, close, tell C{onEnded}.
        """
        if self._state in (STOPPING, ENDED):
            return
        self._fatal = error
        self.alive = False
        self._state = STOPPING
        log.warn("{message}", message=error.message, upstream=self.name)
        self._reportEnded(error)
        self._abandonAll(error)
        d = Deferred.fromCoroutine(self._close())
        d.addErrback(lambda f: log.failure("closing upstream {upstream}", f, upstream=self.name))

    async def _shutdown(self) -> None:
        self._abandonAll(UpstreamUnavailable(f"upstream {self.name} was stopped"))
        try:
            await self._closeSession()
        except Exception:
            log.failure("ending the session of upstream {upstream}", upstream=self.name)
        self._reportEnded(None)
        await self._close()

    def _abandonAll(self, error: UpstreamError) -> None:
        super()._abandonAll(error)
        for call in list(self._timers):
            self._cancelTimer(call)
        for op in list(self._ops):
            op.cancel()

    async def _close(self) -> None:
        try:
            await self._connectionPool.closeCachedConnections()
        finally:
            self._ended()


@define(eq=False)
class StreamableHttpUpstream(RemoteUpstream):
    """
    An upstream reached with the Streamable HTTP transport: every message
    is a POST to C{config.url}; a request's answer is one JSON message, or
    an event stream carrying what the server sends about the request (given
    to C{onMessage}) and then the response.

    The session id the server assigns, and the negotiated protocol version,
    go with every later request.  A 404 to a request with a session means
    the server forgot it: the upstream runs C{initialize} again (once for
    every request that saw the 404) and sends the request again, once.

    @ivar listen: open the GET stream for messages the server sends on its
        own (skipped when the server answers 405).
    @ivar listenRetry: seconds before the GET stream is opened again after
        it ended (unless the server set C{retry}).
    """

    listen: bool = True
    listenRetry: float = 2.0

    _sessionId: Optional[str] = field(init=False, default=None, repr=False)
    _renewal: Optional[Deferred[None]] = field(init=False, default=None)
    _renewalWaiters: _Waiters = field(init=False, factory=_Waiters)
    _listening: Optional[Deferred[None]] = field(init=False, default=None)

    @property
    def hasSession(self) -> bool:
        """
        Whether the server assigned a session.
        """
        return self._sessionId is not None

    # -- headers -------------------------------------------------------------

    def _sessionHeaders(self, withSession: bool = True) -> dict[str, str]:
        headers = dict(self._headers)
        if withSession:
            if self._sessionId is not None:
                headers[SESSION_HEADER] = self._sessionId
            if self.protocolVersion is not None:
                headers[VERSION_HEADER] = self.protocolVersion
        return headers

    def _postHeaders(self, withSession: bool = True) -> dict[str, str]:
        headers = self._sessionHeaders(withSession)
        headers["Accept"] = f"{JSON_TYPE}, {EVENT_STREAM_TYPE}"
        headers["Content-Type"] = JSON_TYPE
        return headers

    @property
    def _url(self) -> str:
        assert self.config.url is not None
        return self.config.url

    # -- requests ------------------------------------------------------------

    async def _deliver(self, entry: _Pending) -> None:
        initialize = entry.method == "initialize"
        while True:
            if not initialize and self._renewal is not None:
                await self._renewalWaiters.wait()
            session = self._sessionId
            response = await self._httpRequest(
                "POST", self._url, self._postHeaders(not initialize), entry.body
            )
            if response.code == 404 and session is not None and not initialize:
                await self._discard(response)
                if entry.retried:
                    raise SessionGone(
                        f"upstream {self.name} forgot its session again after a new initialize"
                    )
                entry.retried = True
                await self._renew(session)
                continue
            if initialize and 200 <= response.code < 300:
                self._takeSession(response)
            await self._readAnswer(response, entry)
            return

    async def _readAnswer(self, response: IResponse, entry: _Pending) -> None:
        what = entry.method
        if not 200 <= response.code < 300:
            raise await self._httpError(response, what)
        if response.code == 202:
            await self._discard(response)
            raise UpstreamError(
                f"upstream {self.name} answered {what} with HTTP 202 and no response"
            )
        kind = await self._checkType(response, what, JSON_TYPE, EVENT_STREAM_TYPE)
        if kind == JSON_TYPE:
            body = await self._readBody(response)
            try:
                message = json.loads(body)
            except (ValueError, RecursionError):
                raise UpstreamError(
                    f"upstream {self.name} answered {what} with a body that is not JSON"
                    f" (HTTP {response.code})"
                )
            for item in message if isinstance(message, list) else [message]:
                self._messageReceived(item)
        else:
            await self._readEvents(response, self._eventReceived)
        if self._pending.get(entry.requestId) is entry:
            raise UpstreamError(
                f"upstream {self.name} ended its answer to {what} without a response"
            )

    def _eventReceived(self, event: ServerSentEvent) -> None:
        # Events with empty data (priming events) carry no message.
        if event.event == "message" and event.data.strip():
            self._dataReceived(event.data)

    def _takeSession(self, response: IResponse) -> None:
        values = response.headers.getRawHeaders(SESSION_HEADER.encode("ascii"))
        if not values:
            self._sessionId = None
            return
        raw = values[0]
        if not 0 < len(raw) <= MAX_SESSION_ID_LENGTH or any(b < 0x21 or b > 0x7E for b in raw):
            raise UpstreamError(f"upstream {self.name} sent an invalid session id")
        self._sessionId = raw.decode("ascii")

    async def _postMessage(self, body: bytes) -> None:
        session = self._sessionId
        response = await self._httpRequest("POST", self._url, self._postHeaders(), body)
        if 200 <= response.code < 300:
            await self._discard(response)
            return
        if response.code == 404 and session is not None:
            await self._discard(response)
            raise SessionGone(f"upstream {self.name} does not know its session any more")
        raise await self._httpError(response, "a notification")

    def _sessionGone(self, error: SessionGone) -> None:
        # The next request will see the 404 too, and start a new session.
        log.info("upstream {upstream}: {message}", upstream=self.name, message=error.message)

    # -- a new session -------------------------------------------------------

    def _renew(self, oldSession: str) -> Deferred[None]:
        """
        Start a new session unless one was started since C{oldSession}
        failed; every caller waits for the same one.
        """
        if self._sessionId != oldSession and self._renewal is None:
            return succeed(None)
        waiter = self._renewalWaiters.wait()
        if self._renewal is None:
            renewal = self._renewal = self._track(Deferred.fromCoroutine(self._reinitialize()))

            def finished(result: object) -> None:
                self._renewal = None
                if isinstance(result, Failure):
                    if not result.check(CancelledError):
                        error = result.value
                        if not isinstance(error, UpstreamError):
                            error = UpstreamUnavailable(
                                f"upstream {self.name} could not start a new session"
                            )
                        self._die(
                            UpstreamUnavailable(
                                f"upstream {self.name} lost its session and could not start"
                                f" a new one: {error.message}"
                            )
                        )
                    self._renewalWaiters.fire(result)
                else:
                    self._renewalWaiters.fire(None)

            renewal.addBoth(finished)
        return waiter

    async def _reinitialize(self) -> None:
        log.info("upstream {upstream}: session expired; initializing again", upstream=self.name)
        self._stopListening()
        self._sessionId = None
        await self._initialize(self.startTimeout)
        await self._withTimeout(
            self._postMessage(jsonrpc.encode(jsonrpc.notification("notifications/initialized"))),
            self.sendTimeout,
            "notifications/initialized",
        )
        self._afterStart()

    # -- the GET stream ------------------------------------------------------

    def _afterStart(self) -> None:
        if self.listen and self._listening is None and self._state == READY:
            listening = self._listening = self._track(Deferred.fromCoroutine(self._listen()))

            def ended(result: object) -> None:
                if self._listening is listening:
                    self._listening = None
                if isinstance(result, Failure) and self._state == READY:
                    problem = connectionProblem(result)
                    if problem is not None:
                        self._die(
                            UpstreamUnavailable(f"upstream {self.name} is unreachable: {problem}")
                        )
                    elif not result.check(CancelledError):
                        log.warn(
                            "upstream {upstream}: event stream failed: {error}",
                            upstream=self.name,
                            error=getattr(result.value, "message", None)
                            or result.getErrorMessage(),
                        )

            listening.addBoth(ended)

    def _stopListening(self) -> None:
        listening, self._listening = self._listening, None
        if listening is not None:
            listening.cancel()

    async def _listen(self) -> None:
        while self._state == READY:
            session = self._sessionId
            headers = self._sessionHeaders()
            headers["Accept"] = EVENT_STREAM_TYPE
            response = await self._httpRequest("GET", self._url, headers)
            if response.code == 404 and session is not None:
                await self._discard(response)
                self._listening = None
                self._renew(session).addErrback(lambda f: None)
                return
            if response.code != 200 or contentType(response) != EVENT_STREAM_TYPE:
                await self._discard(response)
                log.info(
                    "upstream {upstream} offers no event stream (HTTP {code})",
                    upstream=self.name,
                    code=response.code,
                )
                return
            parser = EventStreamParser(self.maxMessageSize)
            try:
                await self._readEvents(response, self._eventReceived, parser)
            except ResponseFailed:
                pass
            retry = parser.retry
            delay = self.listenRetry if retry is None else retry / 1000.0
            log.debug("upstream {upstream}: event stream ended", upstream=self.name)
            await deferLater(self._clock, delay)

    # -- stop ----------------------------------------------------------------

    async def _closeSession(self) -> None:
        if self._sessionId is None:
            return
        headers = self._sessionHeaders()
        self._sessionId = None
        d = self._httpRequest("DELETE", self._url, headers)
        d.addTimeout(self.stopTimeout, self._clock)
        try:
            response = await d
            discard = Deferred.fromCoroutine(self._discard(response))
            await discard.addTimeout(self.stopTimeout, self._clock)
        except Exception as e:
            log.debug(
                "upstream {upstream}: ending the session failed: {error}",
                upstream=self.name,
                error=type(e).__name__,
            )


def httpFactory(
    reactor: Any,
    clock: Optional[IReactorTime] = None,
    clientCapabilities: Optional[Mapping[str, Any]] = None,
    startTimeout: float = 30.0,
    connectTimeout: float = DEFAULT_CONNECT_TIMEOUT,
    stopTimeout: float = 2.0,
    maxMessageSize: int = DEFAULT_MAX_MESSAGE_SIZE,
    maxPersistentPerHost: int = 10,
    endpointFactory: Optional[IAgentEndpointFactory] = None,
    listen: bool = True,
) -> UpstreamFactory:
    """
    A factory (an L{UpstreamFactory<mcp_proxy.upstream.pool.UpstreamFactory>})
    of L{StreamableHttpUpstream}s with these settings.
    """

    return factoryFor(
        StreamableHttpUpstream,
        reactor,
        clock,
        clientCapabilities,
        startTimeout=startTimeout,
        connectTimeout=connectTimeout,
        stopTimeout=stopTimeout,
        maxMessageSize=maxMessageSize,
        maxPersistentPerHost=maxPersistentPerHost,
        endpointFactory=endpointFactory,
        listen=listen,
    )
