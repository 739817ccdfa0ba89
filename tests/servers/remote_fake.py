"""
A small MCP server on twisted.web for the remote upstream tests, run in the
test's own reactor on a loopback port.  It records every request (headers
included) and can misbehave on purpose.

Streamable HTTP at C{/mcp}: POST (sessions, answers as JSON or as an event
stream, per C{answerWith}), GET (405), DELETE.  Tools: C{echo}, C{fail}
(JSON-RPC error -32042 with data), C{http500}, C{html}, C{notjson},
C{big} (a text of C{size} bytes), C{noanswer} (an event stream that ends
without the response), C{lingering} (the response on an event stream left
open), C{askclient} (sends C{ping} and C{roots/list} to
the client before its response; the client's answers are POSTed back).  L{FakeMcp.forgetSessions} makes it forget every
session, as a restarted server would.

Legacy SSE at C{/sse}: an C{endpoint} event built from C{endpointTemplate}
(C{{sid}} and C{{port}} are filled in; none when it is C{None}), then the answers to what is POSTed
to C{/message?sessionId=...} as C{message} events, among keep-alive
comments.  L{FakeMcp.closeStreams} ends the streams.

C{/redirect} answers 302 (and C{/redirect303} 303) to C{/target}, which
records that it was reached.
"""

from __future__ import annotations

import json
import uuid
from typing import Any, Optional

from attrs import define, field
from twisted.internet.interfaces import IListeningPort
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

PROTOCOL_VERSION = "2025-11-25"


@define
class Recorded:
    """
    One request as the fake saw it.

    @ivar headers: lower-case name to the list of values.
    """

    method: str
    path: str
    headers: dict[str, list[str]]
    body: Any


@define(eq=False)
class FakeMcp:
    """
    The server's state and behaviour.

    @ivar answerWith: C{"json"} or C{"sse"} for Streamable HTTP answers.
    @ivar endpointTemplate: the data of the legacy C{endpoint} event.
    @ivar keepSessions: when false, new Streamable HTTP sessions are
        forgotten at once.
    @ivar getStream: answer GET C{/mcp} with an event stream that sends
        C{notifications/tools/list_changed} (else 405).
    """

    answerWith: str = "json"
    endpointTemplate: Optional[str] = "/message?sessionId={sid}"
    keepSessions: bool = True
    getStream: bool = False
    requests: list[Recorded] = field(factory=list)
    sessions: set[str] = field(factory=set)
    initializeCount: int = 0
    targetHits: int = 0
    streams: dict[str, Request] = field(factory=dict)
    getStreams: list[Request] = field(factory=list)
    port: Optional[IListeningPort] = None

    @property
    def base(self) -> str:
        assert self.port is not None
        return f"http://127.0.0.1:{self.port.getHost().port}"

    def forgetSessions(self) -> None:
        """
        Forget every session: later requests with one get 404.
        """
        self.sessions.clear()

    def closeStreams(self) -> None:
        """
        End every event stream (legacy and GET).
        """
        streams, self.streams = self.streams, {}
        getStreams, self.getStreams = self.getStreams, []
        for request in [*streams.values(), *getStreams]:
            if not request.finished and not request._disconnected:
                request.finish()

    def recorded(self, method: str) -> list[Recorded]:
        """
        The POSTed JSON-RPC messages with this method.
        """
        return [
            r for r in self.requests if isinstance(r.body, dict) and r.body.get("method") == method
        ]

    def resource(self) -> Resource:
        root = Resource()
        root.putChild(b"mcp", _Mcp(self))
        root.putChild(b"sse", _Sse(self))
        root.putChild(b"message", _Message(self))
        root.putChild(b"redirect", _Redirect(self, 302))
        root.putChild(b"redirect303", _Redirect(self, 303))
        root.putChild(b"target", _Target(self))
        return root

    def site(self) -> Site:
        site = Site(self.resource())
        site.displayTracebacks = False
        return site

    # -- recording and answering ---------------------------------------------

    def record(self, request: Request) -> Any:
        raw = request.content.read() if request.content is not None else b""
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = raw
        headers = {
            name.decode("latin-1").lower(): [v.decode("latin-1") for v in values]
            for name, values in request.requestHeaders.getAllRawHeaders()
        }
        self.requests.append(
            Recorded(request.method.decode(), request.uri.decode("latin-1"), headers, body)
        )
        return body

    def initialize(self, message: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        """
        A new Streamable HTTP session, and the initialize response.
        """
        sid = uuid.uuid4().hex
        if self.keepSessions:
            self.sessions.add(sid)
        self.initializeCount += 1
        return sid, initializeResponse(message)


def initializeResponse(message: dict[str, Any]) -> dict[str, Any]:
    return _result(
        message["id"],
        {
            "protocolVersion": PROTOCOL_VERSION,
            "capabilities": {"tools": {}},
            "serverInfo": {"name": "fake", "version": "1"},
        },
    )


def answer(message: dict[str, Any]) -> dict[str, Any]:
    """
    The response to a request.
    """
    method = message.get("method")
    params = message.get("params") or {}
    requestId = message["id"]
    if method == "tools/list":
        return _result(requestId, {"tools": [{"name": "echo", "inputSchema": {}}]})
    if method == "tools/call":
        name = params.get("name")
        arguments = params.get("arguments") or {}
        if name == "echo":
            return _result(requestId, _text(arguments.get("text", "")))
        if name == "big":
            return _result(requestId, _text("x" * int(arguments.get("size", 0))))
        if name == "fail":
            return _error(requestId, -32042, "needs a URL", {"url": "u"})
        return _error(requestId, -32602, f"Unknown tool: {name}")
    return _error(requestId, -32601, "Method not found")


def _result(requestId: Any, result: dict[str, Any]) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": requestId, "result": result}


def _error(requestId: Any, code: int, message: str, data: Any = None) -> dict[str, Any]:
    error: dict[str, Any] = {"code": code, "message": message}
    if data is not None:
        error["data"] = data
    return {"jsonrpc": "2.0", "id": requestId, "error": error}


def _text(text: str) -> dict[str, Any]:
    return {"content": [{"type": "text", "text": text}], "isError": False}


def _jsonError(request: Request, status: int, code: int, message: str) -> bytes:
    request.setResponseCode(status)
    request.setHeader(b"content-type", b"application/json")
    return json.dumps(_error(None, code, message)).encode()


class _Mcp(Resource):
    isLeaf = True

    def __init__(self, fake: FakeMcp) -> None:
        super().__init__()
        self.fake = fake

    def render_GET(self, request: Request) -> Any:
        self.fake.record(request)
        if not self.fake.getStream:
            request.setResponseCode(405)
            return b""
        changed = {"jsonrpc": "2.0", "method": "notifications/tools/list_changed"}
        request.setHeader(b"content-type", b"text/event-stream")
        request.write(b": open\n\nevent: message\ndata: " + json.dumps(changed).encode() + b"\n\n")
        request.notifyFinish().addErrback(lambda _: None)
        self.fake.getStreams.append(request)
        return NOT_DONE_YET

    def render_DELETE(self, request: Request) -> bytes:
        self.fake.record(request)
        sid = request.getHeader(b"mcp-session-id")
        self.fake.sessions.discard(sid.decode() if sid else "")
        return b""

    def render_POST(self, request: Request) -> Any:
        fake = self.fake
        message = fake.record(request)
        if not isinstance(message, dict):
            return _jsonError(request, 400, -32700, "Parse error")
        if message.get("method") == "initialize":
            sid, response = fake.initialize(message)
            request.setHeader(b"mcp-session-id", sid.encode())
            return self._send(request, response)
        sid = request.getHeader(b"mcp-session-id")
        if sid is None:
            return _jsonError(request, 400, -32600, "Missing session ID")
        if sid.decode() not in fake.sessions:
            return _jsonError(request, 404, -32600, "Session not found")
        if "id" not in message or "method" not in message:
            request.setResponseCode(202)
            return b""
        name = (message.get("params") or {}).get("name")
        if name == "http500":
            return _jsonError(request, 500, -32603, "kaput\r\nX-Injected: 1")
        if name == "html":
            request.setHeader(b"content-type", b"text/html")
            return b"<html>hello</html>"
        if name == "notjson":
            request.setHeader(b"content-type", b"application/json")
            return b"{not json"
        if name == "lingering":
            # The response, on a stream left open.
            request.setHeader(b"content-type", b"text/event-stream")
            data = json.dumps(_result(message["id"], _text("said")))
            request.write(b"event: message\ndata: " + data.encode() + b"\n\n")
            request.notifyFinish().addErrback(lambda _: None)
            return NOT_DONE_YET
        if name == "noanswer":
            request.setHeader(b"content-type", b"text/event-stream")
            return b": nothing to say\n\n"
        response = answer(message)
        if name == "askclient":
            # Two requests to the client before the response.
            asks = [
                {"jsonrpc": "2.0", "id": "srv-ping", "method": "ping"},
                {"jsonrpc": "2.0", "id": "srv-roots", "method": "roots/list"},
            ]
            return self._send(request, _result(message["id"], _text("asked")), asks)
        return self._send(request, response)

    def _send(
        self, request: Request, response: dict[str, Any], before: Optional[list[Any]] = None
    ) -> Any:
        if self.fake.answerWith == "json" and before is None:
            request.setHeader(b"content-type", b"application/json")
            return json.dumps(response).encode()
        request.setHeader(b"content-type", b"text/event-stream")
        log = {
            "jsonrpc": "2.0",
            "method": "notifications/message",
            "params": {"level": "info", "data": "working"},
        }
        # A priming event, a comment, a notification, then the response
        # split over writes and with CRLF line ends.
        request.write(b"id: 1\ndata:\n\n: keep-alive\n\n")
        for message in [log, *(before or [])]:
            request.write(b"event: message\ndata: " + json.dumps(message).encode() + b"\n\n")
        data = json.dumps(response).encode()
        request.write(b"event: mess")
        request.write(b"age\r\ndata: " + data[:10])
        request.write(data[10:] + b"\r")
        request.write(b"\n\r\n")
        request.finish()
        return NOT_DONE_YET


class _Sse(Resource):
    isLeaf = True

    def __init__(self, fake: FakeMcp) -> None:
        super().__init__()
        self.fake = fake

    def render_GET(self, request: Request) -> Any:
        fake = self.fake
        fake.record(request)
        sid = uuid.uuid4().hex
        fake.sessions.add(sid)
        fake.streams[sid] = request
        assert fake.port is not None
        request.setHeader(b"content-type", b"text/event-stream")
        request.write(b": keep-alive\n\n")
        if fake.endpointTemplate is not None:
            endpoint = fake.endpointTemplate.format(sid=sid, port=fake.port.getHost().port)
            request.write(b"event: endpoint\ndata: " + endpoint.encode() + b"\n\n")
        request.write(b": keep-alive\n\n")
        request.notifyFinish().addErrback(lambda _: None)
        return NOT_DONE_YET


class _Message(Resource):
    isLeaf = True

    def __init__(self, fake: FakeMcp) -> None:
        super().__init__()
        self.fake = fake

    def render_POST(self, request: Request) -> bytes:
        fake = self.fake
        message = fake.record(request)
        sid = (request.args.get(b"sessionId") or [b""])[0].decode()
        stream = fake.streams.get(sid)
        if sid not in fake.sessions or stream is None:
            request.setResponseCode(404)
            return b"Could not find session"
        request.setResponseCode(202)
        if isinstance(message, dict) and "id" in message and "method" in message:
            if message["method"] == "initialize":
                response = initializeResponse(message)
            else:
                response = answer(message)
            stream.write(b"event: message\ndata: " + json.dumps(response).encode() + b"\n\n")
            stream.write(b": keep-alive\n\n")
        return b"Accepted"


class _Redirect(Resource):
    isLeaf = True

    def __init__(self, fake: FakeMcp, status: int) -> None:
        super().__init__()
        self.fake = fake
        self.status = status

    def render(self, request: Request) -> bytes:
        self.fake.record(request)
        request.setResponseCode(self.status)
        request.setHeader(b"location", self.fake.base.encode() + b"/target")
        return b""


class _Target(Resource):
    isLeaf = True

    def __init__(self, fake: FakeMcp) -> None:
        super().__init__()
        self.fake = fake

    def render(self, request: Request) -> bytes:
        self.fake.record(request)
        self.fake.targetHits += 1
        request.setHeader(b"content-type", b"text/event-stream")
        return b"event: endpoint\ndata: /message\n\n"
