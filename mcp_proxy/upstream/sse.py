"""
An upstream reached with the legacy HTTP+SSE transport (2024-11-05).

The upstream GETs the SSE URL and keeps that event stream open.  The server
first sends an C{endpoint} event: the URL (usually relative, with the
session in its query: C{/messages/?session_id=...} from the Python SDK,
C{/message?sessionId=...} from the TypeScript SDK) to POST messages to.
Each POST is accepted with 202, and every answer comes back on the stream as
a C{message} event, matched to its request by id.  When the stream ends,
the session is over: the upstream ends, and the calls in flight fail.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping, Optional
from urllib.parse import urljoin, urlsplit, urlunsplit

from attrs import define, field
from twisted.internet.defer import CancelledError, Deferred, TimeoutError
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IAgentEndpointFactory

from mcp_proxy.upstream import UpstreamError, UpstreamTimeout, UpstreamUnavailable
from mcp_proxy.upstream._peer import DEFAULT_MAX_MESSAGE_SIZE, ENDED, STOPPING, factoryFor
from mcp_proxy.upstream._sseparse import ServerSentEvent
from mcp_proxy.upstream.http import (
    DEFAULT_CONNECT_TIMEOUT,
    EVENT_STREAM_TYPE,
    JSON_TYPE,
    RemoteUpstream,
    SessionGone,
    _Pending,
    connectionProblem,
)

if TYPE_CHECKING:
    from mcp_proxy.upstream.pool import UpstreamFactory

log = Logger()

_DEFAULT_PORTS = {"http": 80, "https": 443}


def _origin(url: str) -> tuple[str, str, int]:
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    port = parts.port
    return scheme, (parts.hostname or "").lower(), port or _DEFAULT_PORTS.get(scheme, 0)


def resolveEndpoint(sseUrl: str, data: str) -> str:
    """
    The URL to POST messages to, from the data of an C{endpoint} event:
    resolved against the SSE URL, and on the same origin (scheme, host and
    port) as it.

    @raise ValueError: when it is not a URL, carries credentials, or is on
        another origin.
    """
    text = data.strip()
    if not text or any(c.isspace() or ord(c) < 0x20 or ord(c) == 0x7F for c in text):
        raise ValueError("the endpoint is not a URL")
    url = urljoin(sseUrl, text)
    try:
        parts = urlsplit(url)
        same = _origin(url) == _origin(sseUrl)
    except ValueError:
        raise ValueError("the endpoint is not a URL")
    if parts.username is not None or parts.password is not None:
        raise ValueError("the endpoint carries credentials")
    if not same:
        raise ValueError("the endpoint is on another origin than the event stream")
    return urlunsplit(parts._replace(fragment=""))


@define(eq=False)
class SseUpstream(RemoteUpstream):
    """
    One session with a legacy HTTP+SSE server at C{config.url} (the SSE
    URL).  Constructed like L{StreamableHttpUpstream
    <mcp_proxy.upstream.http.StreamableHttpUpstream>}.
    """

    _endpoint: Optional[str] = field(init=False, default=None, repr=False)
    _endpointWaiter: Optional[Deferred[str]] = field(init=False, default=None)

    @property
    def endpointPath(self) -> Optional[str]:
        """
        The path of the message endpoint (without its query, which holds
        the session), once known.
        """
        if self._endpoint is None:
            return None
        return urlsplit(self._endpoint).path

    # -- the event stream ----------------------------------------------------

    async def _connect(self, deadline: Optional[float]) -> None:
        waiter: Deferred[str] = Deferred()
        self._endpointWaiter = waiter
        stream = self._track(Deferred.fromCoroutine(self._readStream()))
        stream.addBoth(self._streamEnded)
        timeout = self._remaining(deadline)
        if timeout is not None:
            waiter.addTimeout(timeout, self._clock)
        self._track(waiter)
        try:
            self._endpoint = await waiter
        except TimeoutError:
            raise UpstreamTimeout(f"upstream {self.name} did not send its message endpoint in time")

    async def _readStream(self) -> None:
        assert self.config.url is not None
        headers = dict(self._headers)
        headers["Accept"] = EVENT_STREAM_TYPE
        headers["Cache-Control"] = "no-cache"
        response = await self._httpRequest("GET", self.config.url, headers)
        if response.code != 200:
            raise await self._httpError(response, "the event stream request")
        await self._checkType(response, "the event stream request", EVENT_STREAM_TYPE)
        await self._readEvents(response, self._eventReceived)

    def _eventReceived(self, event: ServerSentEvent) -> None:
        if event.event == "endpoint":
            waiter = self._endpointWaiter
            if waiter is None or waiter.called:
                log.debug("upstream {upstream} sent another endpoint", upstream=self.name)
                return
            assert self.config.url is not None
            try:
                endpoint = resolveEndpoint(self.config.url, event.data)
            except ValueError as e:
                # Ends the stream, and with it the start.
                raise UpstreamUnavailable(f"upstream {self.name}: {e}; refused")
            waiter.callback(endpoint)
        elif event.event == "message":
            if event.data.strip():
                self._dataReceived(event.data)
        else:
            log.debug("upstream {upstream}: ignored an event of another type", upstream=self.name)

    def _streamEnded(self, result: object) -> None:
        if self._state in (STOPPING, ENDED):
            return
        if isinstance(result, Failure):
            if result.check(CancelledError):
                return
            problem = connectionProblem(result)
            if isinstance(result.value, UpstreamError):
                error = result.value
            elif problem is not None:
                error = UpstreamUnavailable(f"upstream {self.name}: event stream lost: {problem}")
            else:
                log.failure("upstream {upstream}: event stream", result, upstream=self.name)
                error = UpstreamUnavailable(f"upstream {self.name}: event stream failed")
        else:
            error = UpstreamUnavailable(f"upstream {self.name} closed its event stream")
        waiter = self._endpointWaiter
        if waiter is not None and not waiter.called:
            waiter.errback(Failure(error))
            return
        if not isinstance(error, UpstreamUnavailable):
            error = UpstreamUnavailable(error.message)
        self._die(error)

    # -- messages ------------------------------------------------------------

    async def _deliver(self, entry: _Pending) -> None:
        await self._postMessage(entry.body)

    async def _postMessage(self, body: bytes) -> None:
        if self._endpoint is None:
            raise UpstreamError(f"upstream {self.name} has not sent its message endpoint yet")
        headers = dict(self._headers)
        headers["Content-Type"] = JSON_TYPE
        response = await self._httpRequest("POST", self._endpoint, headers, body)
        if 200 <= response.code < 300:
            await self._discard(response)
            return
        if response.code == 404:
            await self._discard(response)
            raise SessionGone(f"upstream {self.name} does not know its session any more")
        raise await self._httpError(response, "a message")


def sseFactory(
    reactor: Any,
    clock: Optional[IReactorTime] = None,
    clientCapabilities: Optional[Mapping[str, Any]] = None,
    startTimeout: float = 30.0,
    connectTimeout: float = DEFAULT_CONNECT_TIMEOUT,
    stopTimeout: float = 2.0,
    maxMessageSize: int = DEFAULT_MAX_MESSAGE_SIZE,
    maxPersistentPerHost: int = 10,
    endpointFactory: Optional[IAgentEndpointFactory] = None,
) -> UpstreamFactory:
    """
    A factory (an L{UpstreamFactory<mcp_proxy.upstream.pool.UpstreamFactory>})
    of L{SseUpstream}s with these settings.
    """

    return factoryFor(
        SseUpstream,
        reactor,
        clock,
        clientCapabilities,
        startTimeout=startTimeout,
        connectTimeout=connectTimeout,
        stopTimeout=stopTimeout,
        maxMessageSize=maxMessageSize,
        maxPersistentPerHost=maxPersistentPerHost,
        endpointFactory=endpointFactory,
    )
