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

import secrets
from typing import Any, Callable, Optional
from urllib.parse import urlsplit

from attrs import define, field
from klein import Klein
from twisted.internet.defer import CancelledError, Deferred, fail, gatherResults
from twisted.internet.interfaces import IPushProducer, IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest
from werkzeug.exceptions import HTTPException
from zope.interface import implementer

from mcp_proxy import __version__, jsonrpc
from mcp_proxy.auth import Authenticator, AuthError, Principal, extractApiKey
from mcp_proxy.dispatch import (
    SUPPORTED_VERSIONS,
    CallContext,
    Dispatcher,
    errorFromException,
)
from mcp_proxy.logs import bindRequest
from mcp_proxy.relay import Downstream, RelayHub
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


class ResponseChannel:
    """
    The answer to one POSTed request.  It is plain JSON, unless something
    must reach the client before the response (progress, a log message, a
    request to the client) and the client accepts an event stream: then the
    response becomes an SSE stream, with the response as its last event.
    """

    def __init__(self, request: IRequest) -> None:
        self.request = request
        accept = (_header(request, b"accept") or "").lower()
        self.canStream = "text/event-stream" in accept
        self.streaming = False
        self.finished = False
        self.gone = False
        request.notifyFinish().addErrback(self._lost)  # type: ignore[attr-defined]

    def _lost(self, reason: Any) -> None:
        self.gone = True

    def send(self, message: dict[str, Any]) -> bool:
        """
        Send a message before the response.

        @return: whether it could be sent on this request's stream.
        """
        if self.finished or self.gone:
            return False
        if not self.streaming:
            if not self.canStream:
                return False
            self.streaming = True
            self.request.setResponseCode(200)
            self.request.setHeader(b"content-type", b"text/event-stream")
            self.request.setHeader(b"cache-control", b"no-cache")
            self.request.setHeader(b"x-accel-buffering", b"no")
        self.request.write(b"event: message\ndata: " + jsonrpc.encode(message) + b"\n\n")
        return True

    def final(self, body: bytes) -> bytes:
        """
        The last bytes of the response, which carry C{body}.
        """
        self.finished = True
        if self.streaming or _acceptsOnlyEventStream(self.request):
            if not self.streaming:
                self.request.setHeader(b"content-type", b"text/event-stream")
                self.request.setHeader(b"cache-control", b"no-cache")
            return b"event: message\ndata: " + body + b"\n\n"
        self.request.setHeader(b"content-type", b"application/json")
        return body


def _detached(d: Deferred[Any]) -> Deferred[Any]:
    """
    A Deferred with the result of C{d} whose cancellation does not cancel
    C{d}: a client closing its POST does not cancel the request upstream
    (the spec says so; it cancels with C{notifications/cancelled}).
    """
    out: Deferred[Any] = Deferred()

    def forward(result: Any) -> None:
        if not out.called:
            if isinstance(result, Failure):
                out.errback(result)
            else:
                out.callback(result)

    d.addBoth(forward)
    return out


def _hostname(hostHeader: str) -> str:
    host = hostHeader.strip().lower()
    if host.startswith("["):
        return host[1 : host.find("]")] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})


@define
class McpFront:
    """
    The Klein application of the proxy.

    @ivar healthCheck: returns a Deferred firing with C{(status, body)}.
    @ivar clientTimeout: seconds a client may take to answer a request
        relayed from an upstream (sampling, elicitation, roots).
    @ivar allowedHosts: the host names a request's C{Host} may name
        (C{None}: any); the default for a loopback listener is loopback
        names only, against DNS rebinding.
    @ivar allowedOrigins: the C{Origin}s a browser request may come from
        (C{None}: the request's own host, or loopback).
    """

    authenticator: Authenticator
    dispatcher: Dispatcher
    sessions: SessionTable
    clock: IReactorTime
    healthCheck: Callable[[], Deferred[tuple[int, dict[str, Any]]]]
    sseKeepalive: float = 30.0
    clientTimeout: float = 60.0
    allowedHosts: Optional[frozenset[str]] = None
    allowedOrigins: Optional[frozenset[str]] = None
    hub: Optional[RelayHub] = None
    maxConcurrentRequests: int = 256
    onSubscriptionsEmptied: Optional[Callable[[list[Any]], None]] = None
    _getStreams: dict[str, SseStream] = field(factory=dict)
    _sseStreams: dict[str, SseStream] = field(factory=dict)
    _askedClients: dict[str, tuple[str, Deferred[Any]]] = field(factory=dict)
    _inflight: dict[tuple[str, str], Deferred[Any]] = field(factory=dict)
    _busy: int = 0

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

    @app.handle_errors(HTTPException)
    def _routingError(self, request: IRequest, failure: Failure) -> bytes:
        error: HTTPException = failure.value  # type: ignore[assignment]
        status = error.code or 500
        message = "Not Found" if status == 404 else (error.name or "HTTP error")
        code = jsonrpc.METHOD_NOT_FOUND if status in (404, 405) else jsonrpc.SERVER_ERROR
        return self._errorBody(request, status, code, message)

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

    # -- Host and Origin, relaying --------------------------------------------

    def _checkOrigin(self, request: IRequest) -> None:
        """
        Refuse a foreign C{Host} (421) or C{Origin} (403), against DNS
        rebinding and cross-site requests from browsers.
        """
        host = _header(request, b"host") or ""
        hostname = _hostname(host)
        if self.allowedHosts is not None and hostname not in self.allowedHosts:
            raise HttpError(421, jsonrpc.SERVER_ERROR, "Misdirected Request: invalid Host header")
        origin = _header(request, b"origin")
        if origin is None or (origin == "null" and self.allowedOrigins is None):
            if origin == "null":
                raise HttpError(403, jsonrpc.SERVER_ERROR, "Forbidden: invalid Origin header")
            return
        if self.allowedOrigins is not None:
            if "*" in self.allowedOrigins or origin.lower() in self.allowedOrigins:
                return
            raise HttpError(403, jsonrpc.SERVER_ERROR, "Forbidden: invalid Origin header")
        parts = urlsplit(origin)
        originHost = (parts.hostname or "").lower()
        if originHost and (originHost == hostname or originHost in LOOPBACK_HOSTS):
            return
        raise HttpError(403, jsonrpc.SERVER_ERROR, "Forbidden: invalid Origin header")

    def _sessionStream(self, sessionId: str) -> Optional[SseStream]:
        return self._getStreams.get(sessionId) or self._sseStreams.get(sessionId)

    def _notifier(self, sessionId: str) -> Callable[[dict[str, Any]], None]:
        def notify(message: dict[str, Any]) -> None:
            stream = self._sessionStream(sessionId)
            if stream is not None:
                stream.event(jsonrpc.encode(message))

        return notify

    def notifyInstance(self, instanceId: str, message: dict[str, Any]) -> int:
        """
        Send a notification to every open session stream of an instance
        (e.g. a list change).

        @return: how many sessions it went to.
        """
        body = jsonrpc.encode(message)
        sent = 0
        for sessionId, stream in list(self._getStreams.items()) + list(self._sseStreams.items()):
            session = self.sessions.get(sessionId)
            if session is not None and session.instanceId == instanceId:
                stream.event(body)
                sent += 1
        return sent

    def _downstream(
        self,
        keyId: str,
        session: Optional[Session],
        send: Callable[[dict[str, Any]], bool],
    ) -> Downstream:
        """
        Where the messages related to one request go: C{send} (its own
        stream) first, then the session's stream.
        """
        notifySession = self._notifier(session.id) if session is not None else None

        def related(message: dict[str, Any]) -> None:
            if not send(message) and notifySession is not None:
                notifySession(message)

        def ask(method: str, params: dict[str, Any]) -> Deferred[Any]:
            return self._askClient(keyId, session, send, method, params)

        return Downstream(
            sessionId=session.id if session is not None else None,
            capabilities=session.clientCapabilities if session is not None else {},
            notifyRelated=related,
            notifySession=notifySession,
            requestClient=ask,
        )

    def _askClient(
        self,
        keyId: str,
        session: Optional[Session],
        send: Callable[[dict[str, Any]], bool],
        method: str,
        params: dict[str, Any],
    ) -> Deferred[Any]:
        """
        Send a request from an upstream to the client, with a fresh id, and
        fire with the client's answer.
        """
        requestId = "mcpp-" + secrets.token_hex(12)
        message = jsonrpc.request(requestId, method, params)
        d: Deferred[Any] = Deferred()
        if not send(message):
            stream = self._sessionStream(session.id) if session is not None else None
            if stream is None:
                return fail(
                    jsonrpc.JsonRpcError(
                        jsonrpc.INTERNAL_ERROR, f"the client cannot be reached for {method}"
                    )
                )
            stream.event(jsonrpc.encode(message))
        self._askedClients[requestId] = (keyId, d)
        d.addTimeout(self.clientTimeout, self.clock)

        def done(result: Any) -> Any:
            self._askedClients.pop(requestId, None)
            return result

        return d.addBoth(done)

    def _clientAnswered(self, keyId: str, message: dict[str, Any]) -> None:
        entry = self._askedClients.get(str(message.get("id")))
        if entry is None or entry[0] != keyId:
            return
        d = entry[1]
        error = message.get("error")
        if isinstance(error, dict):
            d.errback(
                jsonrpc.JsonRpcError(
                    int(error.get("code", jsonrpc.INTERNAL_ERROR)),
                    str(error.get("message", "")),
                    error.get("data"),
                )
            )
        else:
            d.callback(message.get("result"))

    def _clientNotification(self, session: Optional[Session], message: dict[str, Any]) -> None:
        if message.get("method") != "notifications/cancelled" or session is None:
            return
        params = message.get("params")
        if not isinstance(params, dict):
            return
        d = self._inflight.get((session.id, repr(params.get("requestId"))))
        if d is not None:
            d.cancel()

    def _dispatch(
        self,
        ctx: CallContext,
        message: dict[str, Any],
        downstream: Downstream,
        session: Optional[Session],
    ) -> Deferred[bytes]:
        """
        Hand a request to the dispatcher, keeping it cancellable by the
        client's C{notifications/cancelled} while it runs.
        """
        d = self.dispatcher.handle(ctx, message, downstream)
        if session is not None:
            key = (session.id, repr(message["id"]))
            self._inflight[key] = d

            def done(result: Any) -> Any:
                if self._inflight.get(key) is d:
                    del self._inflight[key]
                return result

            d.addBoth(done)
        return _detached(d)

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
            return self._admitted(self._post, request, instanceId)
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

    def _readBody(self, request: IRequest) -> tuple[Any, int]:
        """
        The decoded JSON body, and its size in bytes.
        """
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
            return jsonrpc.decode(body), len(body)
        except jsonrpc.JsonRpcError as e:
            raise HttpError(400, e.code, e.message) from None

    async def _post(self, request: IRequest, instanceId: Optional[str]) -> bytes:
        self._checkOrigin(request)
        principal = await self._authenticate(request, instanceId)
        message, size = self._readBody(request)
        session = self._session(request, principal)
        bindRequest(
            request,
            principal.instanceId,
            session.id if session is not None else None,
            _methodOf(message),
        )
        if isinstance(message, list):
            return await self._batch(request, principal, session, message, size)
        kind = jsonrpc.classify(message)
        if kind == "invalid":
            raise HttpError(400, jsonrpc.INVALID_REQUEST, "Invalid Request")
        if kind == "request" and message["method"] == "initialize":
            return await self._initialize(request, principal, session, message)
        version = self._checkProtocolVersion(request)
        if session is not None:
            self.sessions.touch(session)
            version = session.protocolVersion
        if kind == "response":
            self._clientAnswered(principal.keyId, message)
        if kind != "request":
            if kind == "notification":
                self._clientNotification(session, message)
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
            userAgent=_header(request, b"user-agent"),
            validationMode=_validationMode(request),
            requestBytes=size,
        )
        channel = ResponseChannel(request)
        downstream = self._downstream(principal.keyId, session, channel.send)
        body = await self._dispatch(ctx, message, downstream, session)
        return channel.final(body)

    def _respond(self, request: IRequest, body: bytes) -> bytes:
        if _acceptsOnlyEventStream(request):
            request.setHeader(b"content-type", b"text/event-stream")
            request.setHeader(b"cache-control", b"no-cache")
            return b"event: message\ndata: " + body + b"\n\n"
        request.setHeader(b"content-type", b"application/json")
        return body

    async def _initialize(
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
        if len(self.sessions) >= self.sessions.maxSessions:
            self.sessions.sweep()
            if len(self.sessions) >= self.sessions.maxSessions:
                raise HttpError(503, jsonrpc.SERVER_ERROR, "Server at capacity")
        ctx = CallContext(
            instanceId=principal.instanceId,
            organizationId=principal.organizationId,
            keyId=principal.keyId,
            sessionId=None,
            transport=STREAMABLE,
        )
        capabilities = _dict(params.get("capabilities"))
        probe = Downstream(None, capabilities, lambda message: None)
        version, result = await self.dispatcher.initialize(ctx, params, probe)
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
        created.onClose(lambda reason: self._sessionClosed(created.id))
        request.setHeader(b"mcp-session-id", created.id.encode("ascii"))
        return self._respond(request, jsonrpc.encode(jsonrpc.response(requestId, result)))

    def _sessionClosed(self, sessionId: str) -> None:
        for key in [k for k in self._inflight if k[0] == sessionId]:
            d = self._inflight.pop(key)
            d.cancel()
        if self.hub is not None and self.onSubscriptionsEmptied is not None:
            emptied = self.hub.dropSession(sessionId)
            if emptied:
                self.onSubscriptionsEmptied(emptied)

    async def _batch(
        self,
        request: IRequest,
        principal: Principal,
        session: Optional[Session],
        messages: list[Any],
        size: int,
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
            userAgent=_header(request, b"user-agent"),
            validationMode=_validationMode(request),
            requestBytes=size,
        )
        requests = [m for k, m in zip(kinds, messages) if k == "request"]
        if not requests:
            request.setResponseCode(202)
            return b""
        downstream = self._downstream(principal.keyId, session, lambda message: False)
        bodies = await gatherResults(
            [self._dispatch(ctx, m, downstream, session) for m in requests]
        )
        request.setHeader(b"content-type", b"application/json")
        return b"[" + b",".join(bodies) + b"]"

    async def _openGetStream(self, request: IRequest, instanceId: Optional[str]) -> None:
        self._checkOrigin(request)
        principal = await self._authenticate(request, instanceId)
        session = self._session(request, principal)
        bindRequest(request, principal.instanceId, session.id if session is not None else None)
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
        self._checkOrigin(request)
        principal = await self._authenticate(request, instanceId)
        session = self._session(request, principal)
        bindRequest(request, principal.instanceId, session.id if session is not None else None)
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
        self._checkOrigin(request)
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
        session.onClose(lambda reason: self._sessionClosed(session.id))
        endpoint = f"/messages/{principal.instanceId}?sessionId={session.id}"
        stream.event(endpoint.encode("ascii"), b"endpoint")
        await stream.done

    @app.route("/messages", methods=["POST"])
    def messagesDefault(self, request: IRequest) -> Any:
        return self._admitted(self._legacyMessage, request, None)

    @app.route("/messages/<string:instanceId>", methods=["POST"])
    def messagesInstance(self, request: IRequest, instanceId: str) -> Any:
        return self._admitted(self._legacyMessage, request, instanceId)

    def _admitted(
        self,
        handler: Callable[[IRequest, Optional[str]], Any],
        request: IRequest,
        instanceId: Optional[str],
    ) -> Deferred[Any]:
        """
        Run a POST handler unless L{maxConcurrentRequests} are being served
        already: beyond capacity, requests are shed at once with 503 and
        C{Retry-After}, instead of queueing until everything is slow.
        """
        if self._busy >= self.maxConcurrentRequests:
            raise HttpError(
                503,
                jsonrpc.SERVER_ERROR,
                "Server busy, retry later",
                (("Retry-After", "1"),),
            )
        self._busy += 1

        def done(result: Any) -> Any:
            self._busy -= 1
            return result

        return Deferred.fromCoroutine(handler(request, instanceId)).addBoth(done)

    async def _legacyMessage(self, request: IRequest, instanceId: Optional[str]) -> bytes:
        self._checkOrigin(request)
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
        message, size = self._readBody(request)
        bindRequest(request, session.instanceId, session.id, _methodOf(message))
        kind = jsonrpc.classify(message)
        if kind == "invalid":
            raise HttpError(400, jsonrpc.INVALID_REQUEST, "Invalid Request")
        self.sessions.touch(session)
        if kind == "request":
            Deferred.fromCoroutine(
                self._answerOnStream(
                    session,
                    stream,
                    message,
                    _header(request, b"user-agent"),
                    _validationMode(request),
                    size,
                )
            ).addErrback(lambda f: log.failure("answering on the SSE stream failed", f))
        elif kind == "response":
            self._clientAnswered(session.keyId, message)
        else:
            self._clientNotification(session, message)
        request.setResponseCode(202)
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        return b"Accepted"

    async def _answerOnStream(
        self,
        session: Session,
        stream: SseStream,
        message: dict[str, Any],
        userAgent: Optional[str],
        validationMode: bool,
        requestBytes: int,
    ) -> None:
        ctx = CallContext(
            instanceId=session.instanceId,
            organizationId=session.organizationId,
            keyId=session.keyId,
            sessionId=session.id,
            transport=LEGACY_SSE,
            protocolVersion=session.protocolVersion,
            userAgent=userAgent,
            validationMode=validationMode,
            requestBytes=requestBytes,
        )

        def send(related: dict[str, Any]) -> bool:
            if stream.closed:
                return False
            stream.event(jsonrpc.encode(related))
            return True

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
                session.clientCapabilities = _dict(params.get("capabilities"))
                probe = Downstream(None, session.clientCapabilities, lambda m: None)
                try:
                    version, result = await self.dispatcher.initialize(ctx, params, probe)
                except Exception as e:
                    error = errorFromException(e, "initialize")
                    body = jsonrpc.encode(
                        jsonrpc.errorResponse(message["id"], error.code, error.message)
                    )
                else:
                    session.protocolVersion = version
                    session.clientInfo = _dict(params.get("clientInfo"))
                    session.initialized = True
                    body = jsonrpc.encode(jsonrpc.response(message["id"], result))
            stream.event(body)
            return
        downstream = self._downstream(session.keyId, session, send)
        body = await self._dispatch(ctx, message, downstream, session)
        stream.event(body)


def _validationMode(request: IRequest) -> bool:
    """
    Whether the request says C{x-validation-mode: true} (not logged).
    """
    return (_header(request, b"x-validation-mode") or "").strip().lower() == "true"


def _methodOf(message: Any) -> Optional[str]:
    """
    The method of a decoded message, for the logs; C{None} for a batch or
    a message without one.
    """
    method = message.get("method") if isinstance(message, dict) else None
    return method if isinstance(method, str) else None


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}
