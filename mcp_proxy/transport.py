"""
The HTTP front: MCP Streamable HTTP at C{/mcp[/<instanceId>]}, the legacy
HTTP+SSE transport at C{/sse[/<instanceId>]} and C{/messages[/<instanceId>]},
and the service routes C{/} and C{/health}.

Every error is a JSON-RPC error object with the HTTP status that fits it,
written before any other byte of the response.  Sessions are a layer of
their own (L{mcp_proxy.session}): a POST without C{Mcp-Session-Id} that is
not C{initialize} is served statelessly, so curl and the stateless protocol
revision need no handshake.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

from attrs import define, field
from klein import Klein
from twisted.internet.defer import CancelledError, Deferred, gatherResults
from twisted.internet.interfaces import IPushProducer, IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest
from zope.interface import implementer

from mcp_proxy import __version__, jsonrpc
from mcp_proxy.auth import Authenticator, AuthError, Principal, extractApiKey
from mcp_proxy.dispatch import (
    SUPPORTED_VERSIONS,
    CallContext,
    Dispatcher,
)
from mcp_proxy.session import SSE, STREAMABLE_HTTP, Session, SessionCapacityError, SessionTable

log = Logger(namespace="mcp_proxy.transport")

STREAMABLE = "STREAMABLE_HTTPS"
LEGACY_SSE = "SSE"

SSE_MAX_QUEUED_EVENTS = 1000
SSE_MAX_QUEUED_BYTES = 1024 * 1024


class HttpError(Exception):
    """
    A request ends with an HTTP error status and a JSON-RPC error body.
    """

    def __init__(
        self,
        status: int,
        code: int,
        message: str,
        headers: tuple[tuple[str, str], ...] = (),
        requestId: Optional[jsonrpc.RequestId] = None,
    ) -> None:
        super().__init__(status, code, message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers
        self.requestId = requestId


def _header(request: IRequest, name: bytes) -> Optional[str]:
    value = request.getHeader(name)
    if value is None:
        return None
    return value.decode("latin-1") if isinstance(value, bytes) else value


def _queryValue(request: IRequest, *names: bytes) -> Optional[str]:
    args = request.args or {}
    for name in names:
        values = args.get(name)
        if values:
            return values[0].decode("utf-8", "replace")
    return None


def _acceptsOnlyEventStream(request: IRequest) -> bool:
    accept = (_header(request, b"accept") or "").lower()
    return (
        "text/event-stream" in accept and "application/json" not in accept and "*/*" not in accept
    )


@implementer(IPushProducer)
class SseStream:
    """
    An open C{text/event-stream} response.

    Writes are queued while the client does not read (the transport paused
    us); a client that falls more than L{SSE_MAX_QUEUED_EVENTS} events or
    L{SSE_MAX_QUEUED_BYTES} bytes behind is disconnected instead of growing
    memory.

    @ivar done: the Deferred to return to Klein.  It fires when the server
        ends the stream, and is cancelled by Klein when the client goes.
    """

    def __init__(
        self,
        request: IRequest,
        clock: IReactorTime,
        keepalive: float,
        onKeepalive: Optional[Callable[[], None]] = None,
    ) -> None:
        self.request = request
        self.closed = False
        self._paused = False
        self._queue: list[bytes] = []
        self._queued = 0
        self._closeCallbacks: list[Callable[[], object]] = []
        self._onKeepalive = onKeepalive
        self.done: Deferred[None] = Deferred()
        self.done.addBoth(self._ended)
        request.setResponseCode(200)
        request.setHeader(b"content-type", b"text/event-stream")
        request.setHeader(b"cache-control", b"no-cache")
        request.setHeader(b"x-accel-buffering", b"no")
        request.registerProducer(self, True)  # type: ignore[attr-defined]
        self._keepalive = LoopingCall(self._tick)
        self._keepalive.clock = clock
        self._keepalive.start(keepalive, now=False)

    def onClose(self, callback: Callable[[], object]) -> None:
        """
        Run C{callback} once when the stream ends, whichever side ends it.
        """
        if self.closed:
            callback()
        else:
            self._closeCallbacks.append(callback)

    def _tick(self) -> None:
        self._write(b": keepalive\n\n")
        if self._onKeepalive is not None:
            self._onKeepalive()

    def comment(self, text: str) -> None:
        """
        Send an SSE comment line (ignored by clients).
        """
        self._write(b": " + text.encode("utf-8") + b"\n\n")

    def event(self, data: bytes, event: Optional[bytes] = b"message") -> None:
        """
        Send one event whose C{data} is one line (compact JSON).
        """
        if event is None:
            self._write(b"data: " + data + b"\n\n")
        else:
            self._write(b"event: " + event + b"\ndata: " + data + b"\n\n")

    def _write(self, data: bytes) -> None:
        if self.closed:
            return
        if self._paused:
            self._queue.append(data)
            self._queued += len(data)
            if len(self._queue) > SSE_MAX_QUEUED_EVENTS or self._queued > SSE_MAX_QUEUED_BYTES:
                log.warn("SSE client too slow: closing its stream")
                self._abort()
            return
        self.request.write(data)

    def close(self) -> None:
        """
        End the stream from the server side.
        """
        if not self.done.called:
            self.done.callback(None)

    def _abort(self) -> None:
        transport = getattr(self.request, "transport", None)
        self.close()
        if transport is not None:
            transport.abortConnection()

    def _ended(self, result: Any) -> None:
        self.closed = True
        if self._keepalive.running:
            self._keepalive.stop()
        try:
            self.request.unregisterProducer()  # type: ignore[attr-defined]
        except Exception:
            pass
        callbacks, self._closeCallbacks = self._closeCallbacks, []
        for callback in callbacks:
            try:
                callback()
            except Exception:
                log.failure("SSE close callback failed")
        if isinstance(result, Failure):
            result.trap(CancelledError)
        return None

    # IPushProducer
    def pauseProducing(self) -> None:
        self._paused = True

    def resumeProducing(self) -> None:
        self._paused = False
        queue, self._queue, self._queued = self._queue, [], 0
        for data in queue:
            if self._paused:
                self._write(data)
            elif not self.closed:
                self.request.write(data)

    def stopProducing(self) -> None:
        self.close()


@define
class McpFront:
    """
    The Klein application of the proxy.

    @ivar healthCheck: returns a Deferred firing with C{(status, body)}.
    """

    authenticator: Authenticator
    dispatcher: Dispatcher
    sessions: SessionTable
    clock: IReactorTime
    healthCheck: Callable[[], Deferred[tuple[int, dict[str, Any]]]]
    sseKeepalive: float = 30.0
    _getStreams: dict[str, SseStream] = field(factory=dict)
    _sseStreams: dict[str, SseStream] = field(factory=dict)

    app = Klein()

    def resource(self) -> Any:
        """
        The twisted.web resource of this front.
        """
        return self.app.resource()

    def closeStreams(self) -> None:
        """
        End every open stream (at shutdown).
        """
        for stream in list(self._getStreams.values()) + list(self._sseStreams.values()):
            stream.close()

    # -- errors -----------------------------------------------------------

    @app.handle_errors(HttpError)
    def _httpError(self, request: IRequest, failure: Failure) -> bytes:
        error: HttpError = failure.value  # type: ignore[assignment]
        return self._errorBody(
            request, error.status, error.code, error.message, error.headers, error.requestId
        )

    @app.handle_errors(Exception)
    def _unexpectedError(self, request: IRequest, failure: Failure) -> bytes:
        log.failure("unexpected error serving {path}", failure, path=request.path)
        return self._errorBody(request, 500, jsonrpc.INTERNAL_ERROR, "Internal error")

    def _errorBody(
        self,
        request: IRequest,
        status: int,
        code: int,
        message: str,
        headers: tuple[tuple[str, str], ...] = (),
        requestId: Optional[jsonrpc.RequestId] = None,
    ) -> bytes:
        request.setResponseCode(status)
        request.setHeader(b"content-type", b"application/json")
        for name, value in headers:
            request.setHeader(name.encode("latin-1"), value.encode("latin-1"))
        return jsonrpc.encode(jsonrpc.errorResponse(requestId, code, message))

    # -- service routes ---------------------------------------------------

    @app.route("/", methods=["GET"])
    def index(self, request: IRequest) -> bytes:
        request.setHeader(b"content-type", b"application/json")
        return jsonrpc.encode(
            {
                "name": "mcp-proxy",
                "version": __version__,
                "description": "MCP proxy: one authenticated endpoint in front of many "
                "upstream MCP servers.",
                "endpoints": {
                    "streamableHttp": "/mcp/{instanceId} (or /mcp, instance from the key)",
                    "sse": "/sse/{instanceId} (legacy HTTP+SSE)",
                    "health": "/health",
                },
                "protocolVersions": list(SUPPORTED_VERSIONS),
                "authentication": "X-API-Key header (or api-key header, ?api-key=, "
                "Authorization: Bearer <key>)",
            }
        )

    @app.route("/health", methods=["GET"])
    async def health(self, request: IRequest) -> bytes:
        status, body = await self.healthCheck()
        request.setResponseCode(status)
        request.setHeader(b"content-type", b"application/json")
        request.setHeader(b"cache-control", b"no-store")
        return jsonrpc.encode(body)

    # -- Streamable HTTP --------------------------------------------------

    @app.route("/mcp", branch=False)
    def mcpDefault(self, request: IRequest) -> Any:
        return self._streamable(request, None)

    @app.route("/mcp/<string:instanceId>", branch=False)
    def mcpInstance(self, request: IRequest, instanceId: str) -> Any:
        return self._streamable(request, instanceId)

    def _streamable(self, request: IRequest, instanceId: Optional[str]) -> Any:
        method = request.method
        if method == b"POST":
            return Deferred.fromCoroutine(self._post(request, instanceId))
        if method == b"GET":
            return Deferred.fromCoroutine(self._openGetStream(request, instanceId))
        if method == b"DELETE":
            return Deferred.fromCoroutine(self._delete(request, instanceId))
        raise HttpError(
            405,
            jsonrpc.METHOD_NOT_FOUND,
            f"Method {method.decode('latin-1', 'replace')} not allowed",
            (("Allow", "GET, POST, DELETE"),),
        )

    async def _authenticate(self, request: IRequest, instanceId: Optional[str]) -> Principal:
        key = extractApiKey(request.requestHeaders, request.args or {})
        if key is None:
            raise HttpError(
                401,
                jsonrpc.SERVER_ERROR,
                "API key authentication required for this server",
            )
        try:
            return await self.authenticator.authenticate(key, instanceId)
        except AuthError as e:
            raise HttpError(e.status, e.code, e.message, tuple(e.headers)) from None

    def _session(self, request: IRequest, principal: Principal) -> Optional[Session]:
        """
        The session named by C{Mcp-Session-Id}, checked to belong to the
        principal; C{None} when the request names none.
        """
        values = request.requestHeaders.getRawHeaders(b"mcp-session-id")
        if not values:
            return None
        if len(values) > 1:
            raise HttpError(
                400,
                jsonrpc.SERVER_ERROR,
                "Bad Request: Mcp-Session-Id header must be a single value",
            )
        sessionId = values[0].decode("latin-1")
        session = self.sessions.get(sessionId)
        if (
            session is None
            or session.transport != STREAMABLE_HTTP
            or not session.belongsTo(principal.keyId, principal.instanceId)
        ):
            raise HttpError(404, jsonrpc.REQUEST_TIMEOUT, "Session not found")
        return session

    def _checkProtocolVersion(self, request: IRequest) -> Optional[str]:
        version = _header(request, b"mcp-protocol-version")
        if version is not None and version not in SUPPORTED_VERSIONS:
            raise HttpError(
                400,
                jsonrpc.SERVER_ERROR,
                f"Bad Request: Unsupported protocol version: {version} "
                f"(supported versions: {', '.join(SUPPORTED_VERSIONS)})",
            )
        return version

    def _readBody(self, request: IRequest) -> Any:
        contentType = _header(request, b"content-type")
        if contentType is not None:
            mime = contentType.split(";", 1)[0].strip().lower()
            if mime != "application/json":
                raise HttpError(
                    415,
                    jsonrpc.SERVER_ERROR,
                    "Unsupported Media Type: Content-Type must be application/json",
                )
        content = request.content
        body = content.read() if content is not None else b""
        try:
            return jsonrpc.decode(body)
        except jsonrpc.JsonRpcError as e:
            raise HttpError(400, e.code, e.message) from None

    async def _post(self, request: IRequest, instanceId: Optional[str]) -> bytes:
        principal = await self._authenticate(request, instanceId)
        message = self._readBody(request)
        session = self._session(request, principal)
        if isinstance(message, list):
            return await self._batch(request, principal, session, message)
        kind = jsonrpc.classify(message)
        if kind == "invalid":
            raise HttpError(400, jsonrpc.INVALID_REQUEST, "Invalid Request")
        if kind == "request" and message["method"] == "initialize":
            return self._initialize(request, principal, session, message)
        version = self._checkProtocolVersion(request)
        if session is not None:
            self.sessions.touch(session)
            version = session.protocolVersion
        if kind != "request":
            # Notifications and responses: accepted.
            request.setResponseCode(202)
            return b""
        if session is None and message["method"] == "server/discover":
            # The dual-era probe of newer clients: an error that makes them
            # fall back to the initialize handshake.
            raise HttpError(
                400,
                jsonrpc.INVALID_REQUEST,
                "Bad Request: Missing session ID (this server speaks the "
                "2024-11-05 to 2025-11-25 protocol: send initialize)",
            )
        ctx = CallContext(
            instanceId=principal.instanceId,
            organizationId=principal.organizationId,
            keyId=principal.keyId,
            sessionId=session.id if session is not None else None,
            transport=STREAMABLE,
            protocolVersion=version or "2025-03-26",
        )
        body = await self.dispatcher.handle(ctx, message)
        return self._respond(request, body)

    def _respond(self, request: IRequest, body: bytes) -> bytes:
        if _acceptsOnlyEventStream(request):
            request.setHeader(b"content-type", b"text/event-stream")
            request.setHeader(b"cache-control", b"no-cache")
            return b"event: message\ndata: " + body + b"\n\n"
        request.setHeader(b"content-type", b"application/json")
        return body

    def _initialize(
        self,
        request: IRequest,
        principal: Principal,
        session: Optional[Session],
        message: dict[str, Any],
    ) -> bytes:
        requestId = message["id"]
        if session is not None:
            raise HttpError(
                400,
                jsonrpc.INVALID_REQUEST,
                "Invalid Request: Server already initialized",
                requestId=requestId,
            )
        params = message.get("params")
        if not isinstance(params, dict):
            raise HttpError(
                400, jsonrpc.INVALID_PARAMS, "initialize needs params", requestId=requestId
            )
        version, result = self.dispatcher.initializeResult(params)
        try:
            created = self.sessions.create(
                transport=STREAMABLE_HTTP,
                instanceId=principal.instanceId,
                keyId=principal.keyId,
                protocolVersion=version,
                clientInfo=_dict(params.get("clientInfo")),
                clientCapabilities=_dict(params.get("capabilities")),
                organizationId=principal.organizationId,
                initialized=True,
            )
        except SessionCapacityError:
            raise HttpError(503, jsonrpc.SERVER_ERROR, "Server at capacity") from None
        request.setHeader(b"mcp-session-id", created.id.encode("ascii"))
        return self._respond(request, jsonrpc.encode(jsonrpc.response(requestId, result)))

    async def _batch(
        self,
        request: IRequest,
        principal: Principal,
        session: Optional[Session],
        messages: list[Any],
    ) -> bytes:
        version = (
            session.protocolVersion if session is not None else self._checkProtocolVersion(request)
        )
        if version != "2025-03-26":
            raise HttpError(
                400,
                jsonrpc.INVALID_REQUEST,
                f"Invalid Request: batches are not supported in protocol version "
                f"{version or 'negotiated'} (only in 2025-03-26)",
            )
        if not messages:
            raise HttpError(400, jsonrpc.INVALID_REQUEST, "Invalid Request: empty batch")
        kinds = [jsonrpc.classify(m) for m in messages]
        if "invalid" in kinds:
            raise HttpError(400, jsonrpc.INVALID_REQUEST, "Invalid Request")
        if any(k == "request" and m["method"] == "initialize" for k, m in zip(kinds, messages)):
            raise HttpError(
                400,
                jsonrpc.INVALID_REQUEST,
                "Invalid Request: initialize must not be part of a batch",
            )
        if session is not None:
            self.sessions.touch(session)
        ctx = CallContext(
            instanceId=principal.instanceId,
            organizationId=principal.organizationId,
            keyId=principal.keyId,
            sessionId=session.id if session is not None else None,
            transport=STREAMABLE,
            protocolVersion=version,
        )
        requests = [m for k, m in zip(kinds, messages) if k == "request"]
        if not requests:
            request.setResponseCode(202)
            return b""
        bodies = await gatherResults([self.dispatcher.handle(ctx, m) for m in requests])
        request.setHeader(b"content-type", b"application/json")
        return b"[" + b",".join(bodies) + b"]"

    async def _openGetStream(self, request: IRequest, instanceId: Optional[str]) -> None:
        principal = await self._authenticate(request, instanceId)
        session = self._session(request, principal)
        if session is None:
            raise HttpError(
                400, jsonrpc.INVALID_REQUEST, "Bad Request: Mcp-Session-Id header is required"
            )
        self._checkProtocolVersion(request)
        if session.id in self._getStreams:
            raise HttpError(
                409, jsonrpc.SERVER_ERROR, "Conflict: Only one SSE stream is allowed per session"
            )
        self.sessions.touch(session)
        stream = SseStream(
            request, self.clock, self.sseKeepalive, lambda: self.sessions.touch(session)
        )
        self._getStreams[session.id] = stream
        stream.onClose(lambda: self._getStreams.pop(session.id, None))
        session.onClose(lambda reason: stream.close())
        stream.comment("stream open")
        await stream.done

    async def _delete(self, request: IRequest, instanceId: Optional[str]) -> bytes:
        principal = await self._authenticate(request, instanceId)
        session = self._session(request, principal)
        if session is None:
            raise HttpError(
                400, jsonrpc.INVALID_REQUEST, "Bad Request: Mcp-Session-Id header is required"
            )
        self.sessions.close(session.id, "deleted by the client")
        request.setResponseCode(200)
        return b""

    # -- legacy HTTP+SSE --------------------------------------------------

    @app.route("/sse", methods=["GET"])
    def sseDefault(self, request: IRequest) -> Any:
        return Deferred.fromCoroutine(self._openLegacyStream(request, None))

    @app.route("/sse/<string:instanceId>", methods=["GET"])
    def sseInstance(self, request: IRequest, instanceId: str) -> Any:
        return Deferred.fromCoroutine(self._openLegacyStream(request, instanceId))

    async def _openLegacyStream(self, request: IRequest, instanceId: Optional[str]) -> None:
        principal = await self._authenticate(request, instanceId)
        try:
            session = self.sessions.create(
                transport=SSE,
                instanceId=principal.instanceId,
                keyId=principal.keyId,
                protocolVersion="2024-11-05",
                organizationId=principal.organizationId,
            )
        except SessionCapacityError:
            raise HttpError(503, jsonrpc.SERVER_ERROR, "Server at capacity") from None
        stream = SseStream(
            request, self.clock, self.sseKeepalive, lambda: self.sessions.touch(session)
        )
        self._sseStreams[session.id] = stream
        stream.onClose(lambda: self._sseStreams.pop(session.id, None))
        stream.onClose(lambda: self.sessions.close(session.id, "SSE stream closed"))
        session.onClose(lambda reason: stream.close())
        endpoint = f"/messages/{principal.instanceId}?sessionId={session.id}"
        stream.event(endpoint.encode("ascii"), b"endpoint")
        await stream.done

    @app.route("/messages", methods=["POST"])
    def messagesDefault(self, request: IRequest) -> Any:
        return Deferred.fromCoroutine(self._legacyMessage(request, None))

    @app.route("/messages/<string:instanceId>", methods=["POST"])
    def messagesInstance(self, request: IRequest, instanceId: str) -> Any:
        return Deferred.fromCoroutine(self._legacyMessage(request, instanceId))

    async def _legacyMessage(self, request: IRequest, instanceId: Optional[str]) -> bytes:
        sessionId = _queryValue(request, b"sessionId", b"session_id")
        if not sessionId:
            raise HttpError(400, jsonrpc.INVALID_REQUEST, "Missing sessionId parameter")
        session = self.sessions.get(sessionId)
        stream = self._sseStreams.get(sessionId)
        if (
            session is None
            or stream is None
            or session.transport != SSE
            or (instanceId is not None and session.instanceId != instanceId)
        ):
            raise HttpError(404, jsonrpc.REQUEST_TIMEOUT, "Session not found")
        if extractApiKey(request.requestHeaders, request.args or {}) is not None:
            principal = await self._authenticate(request, session.instanceId)
            if principal.keyId != session.keyId:
                raise HttpError(404, jsonrpc.REQUEST_TIMEOUT, "Session not found")
        message = self._readBody(request)
        kind = jsonrpc.classify(message)
        if kind == "invalid":
            raise HttpError(400, jsonrpc.INVALID_REQUEST, "Invalid Request")
        self.sessions.touch(session)
        if kind == "request":
            self._answerOnStream(session, stream, message)
        request.setResponseCode(202)
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        return b"Accepted"

    def _answerOnStream(self, session: Session, stream: SseStream, message: dict[str, Any]) -> None:
        if message["method"] == "initialize":
            params = message.get("params")
            if not isinstance(params, dict):
                body = jsonrpc.encode(
                    jsonrpc.errorResponse(
                        message["id"], jsonrpc.INVALID_PARAMS, "initialize needs params"
                    )
                )
            elif session.initialized:
                body = jsonrpc.encode(
                    jsonrpc.errorResponse(
                        message["id"], jsonrpc.INVALID_REQUEST, "Server already initialized"
                    )
                )
            else:
                version, result = self.dispatcher.initializeResult(params)
                session.protocolVersion = version
                session.clientInfo = _dict(params.get("clientInfo"))
                session.clientCapabilities = _dict(params.get("capabilities"))
                session.initialized = True
                body = jsonrpc.encode(jsonrpc.response(message["id"], result))
            stream.event(body)
            return
        ctx = CallContext(
            instanceId=session.instanceId,
            organizationId=session.organizationId,
            keyId=session.keyId,
            sessionId=session.id,
            transport=LEGACY_SSE,
            protocolVersion=session.protocolVersion,
        )
        self.dispatcher.handle(ctx, message).addCallback(stream.event)


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}
