"""
Tests for the HTTP limits under the front, over real loopback sockets: 413
for a body over the limit (declared or chunked), 408 for headers that do not
arrive in time.
"""

from __future__ import annotations

import json
from typing import Any

import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock, deferLater
from twisted.web.resource import Resource

from mcp_proxy.httpserver import makeSite


class Echo(Resource):
    isLeaf = True

    def render_POST(self, request: Any) -> bytes:
        return str(len(request.content.read())).encode()


class Collect(Protocol):
    def __init__(self) -> None:
        self.data = b""
        self.done: Deferred[bytes] = Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def connectionLost(self, reason: Any = None) -> None:
        self.done.callback(self.data)


async def _serve(limit: int, headerDeadline: float = 10.0, clock: Any = None) -> Any:
    site = makeSite(Echo(), limit, clock=clock, headerDeadline=headerDeadline)
    return await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(site)


async def _exchange(port: Any, chunks: list[bytes], pause: float = 0.0) -> bytes:
    proto = Collect()
    endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port)
    await endpoint.connect(Factory.forProtocol(lambda: proto))
    for chunk in chunks:
        proto.transport.write(chunk)
    return await proto.done


def _status(response: bytes) -> int:
    return int(response.split(b" ", 2)[1])


@pytest_twisted.ensureDeferred
async def test_bodyWithinLimit() -> None:
    """
    A body within the limit reaches the resource.
    """
    port = await _serve(1000)
    try:
        body = b"x" * 1000
        response = await _exchange(
            port,
            [
                b"POST / HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: 1000\r\n\r\n"
                + body
            ],
        )
        assert _status(response) == 200
        assert response.endswith(b"1000")
    finally:
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_declaredLengthOverLimit() -> None:
    """
    A declared length over the limit gets 413 with a JSON-RPC error, before
    the body is sent.
    """
    port = await _serve(1000)
    try:
        response = await _exchange(
            port, [b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 1001\r\n\r\n"]
        )
        assert _status(response) == 413
        error = json.loads(response.split(b"\r\n\r\n", 1)[1])
        assert error["error"]["code"] == -32600
        assert error["id"] is None
    finally:
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_chunkedOverLimit() -> None:
    """
    A chunked body is counted as it arrives: 413 once past the limit.
    """
    port = await _serve(1000)
    try:
        chunk = b"400\r\n" + b"y" * 1024 + b"\r\n"
        response = await _exchange(
            port,
            [b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n", chunk],
        )
        assert _status(response) == 413
    finally:
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_headerDeadline() -> None:
    """
    Headers that do not complete within the deadline get 408 and the
    connection closes.
    """
    clock = Clock()
    port = await _serve(1000, headerDeadline=5, clock=clock)
    try:
        proto = Collect()
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port)
        await endpoint.connect(Factory.forProtocol(lambda: proto))
        proto.transport.write(b"POST / HTTP/1.1\r\nHost: x\r\n")
        while not clock.getDelayedCalls():
            await deferLater(reactor, 0)
        clock.advance(4)
        assert not proto.done.called
        clock.advance(1)
        response = await proto.done
        assert _status(response) == 408
    finally:
        await port.stopListening()
