"""
The HTTP server under the MCP front: twisted.web with the limits it lacks.

twisted.web buffers any request body and has no deadline for headers
(hardening-notes.md, sections 7 and 8).  L{LimitedRequest} answers 413 with
a JSON-RPC error as soon as a body passes the limit, before storing it;
L{DeadlineChannel} answers 408 to a client that does not finish its headers
in time.  L{makeSite} puts them together, with the access log off (the proxy
logs requests itself).
"""

from __future__ import annotations

import io
from typing import Any, Callable, Optional

from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.protocol import connectionDone
from twisted.python.failure import Failure
from twisted.web.http import HTTPChannel
from twisted.web.resource import IResource
from twisted.web.server import Request, Site

from mcp_proxy import jsonrpc

DEFAULT_HEADER_DEADLINE = 10.0
DEFAULT_IDLE_TIMEOUT = 60.0


def _closingResponse(status: bytes, code: int, message: str) -> bytes:
    body = jsonrpc.encode(jsonrpc.errorResponse(None, code, message))
    return (
        b"HTTP/1.1 "
        + status
        + b"\r\nContent-Type: application/json\r\nConnection: close\r\nContent-Length: "
        + str(len(body)).encode()
        + b"\r\n\r\n"
        + body
    )


class LimitedRequest(Request):
    """
    A request whose body may not be longer than C{maxBodySize} bytes (set on
    the class by L{makeSite}).  Bodies are kept in memory: the limit bounds
    them.
    """

    maxBodySize: int = 10 * 1024 * 1024
    _rejected = False
    _received = 0

    def gotLength(self, length: Optional[int]) -> None:
        if length is not None and length > self.maxBodySize:
            self._reject()
            return
        self.content = io.BytesIO()

    def handleContentChunk(self, data: bytes) -> None:
        if self._rejected:
            return
        self._received += len(data)
        if self._received > self.maxBodySize:
            self._reject()
            return
        content = self.content
        assert content is not None
        content.write(data)

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        if self._rejected:
            return
        super().requestReceived(command, path, version)

    def _reject(self) -> None:
        self._rejected = True
        self.content = io.BytesIO()
        transport = self.channel.transport if self.channel is not None else None
        if transport is None:
            return
        transport.write(
            _closingResponse(
                b"413 Content Too Large",
                jsonrpc.INVALID_REQUEST,
                f"Request body larger than {self.maxBodySize} bytes",
            )
        )
        transport.loseConnection()


class DeadlineChannel(HTTPChannel):
    """
    An HTTP/1.1 channel that answers 408 and closes when a request's headers
    are not complete within C{headerDeadline} seconds of its first byte (or
    of the connection).  Idle keep-alive time stays with C{timeOut}.
    """

    headerDeadline: float = DEFAULT_HEADER_DEADLINE
    _deadline: Optional[IDelayedCall] = None
    _awaitingRequest = True

    def _arm(self) -> None:
        # callLater is the site's reactor's, set by HTTPFactory.buildProtocol.
        self._disarm()
        self._deadline = self.callLater(self.headerDeadline, self._expired)

    def _disarm(self) -> None:
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
        self._deadline = None

    def _expired(self) -> None:
        self._deadline = None
        if self.transport is not None:
            self.transport.write(
                _closingResponse(
                    b"408 Request Timeout",
                    jsonrpc.INVALID_REQUEST,
                    "Request headers not received in time",
                )
            )
            self.transport.loseConnection()

    def connectionMade(self) -> None:
        super().connectionMade()
        self._awaitingRequest = False
        self._arm()

    def dataReceived(self, data: bytes) -> None:
        if self._awaitingRequest and data:
            self._awaitingRequest = False
            self._arm()
        super().dataReceived(data)

    def allHeadersReceived(self) -> None:
        self._disarm()
        super().allHeadersReceived()

    def requestDone(self, request: Any) -> None:
        super().requestDone(request)
        self._awaitingRequest = True

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._disarm()
        super().connectionLost(reason)


def makeSite(
    resource: IResource,
    maxBodySize: int,
    clock: Optional[IReactorTime] = None,
    headerDeadline: float = DEFAULT_HEADER_DEADLINE,
    idleTimeout: float = DEFAULT_IDLE_TIMEOUT,
) -> Site:
    """
    A L{Site} for C{resource} with the body limit, the header deadline and
    no access log.
    """
    requestClass: type[LimitedRequest] = type(
        "LimitedRequest", (LimitedRequest,), {"maxBodySize": maxBodySize}
    )
    channelClass: type[DeadlineChannel] = type(
        "DeadlineChannel", (DeadlineChannel,), {"headerDeadline": headerDeadline}
    )
    # MCP bodies are JSON: never parse form submissions (twisted.web would
    # parse every POST's Content-Type with the email package to find out).
    site = Site(
        resource,
        requestFactory=requestClass,
        timeout=idleTimeout,
        reactor=clock,
        parsePOSTFormSubmission=False,
    )
    site.protocol = channelClass  # type: ignore[assignment]
    noAccessLog: Callable[[Any], None] = lambda request: None  # noqa: E731
    site.log = noAccessLog  # type: ignore[method-assign,assignment]
    site.displayTracebacks = False
    site.noisy = False
    return site
