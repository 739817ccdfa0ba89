"""
MCP methods: what the proxy answers to each JSON-RPC request of a client.

The dispatcher is independent of the transport and of sessions: it is given
the instance (from the authenticated principal) and one message, and gives
back the encoded response.  The HTTP front decides how the bytes travel
(JSON body, POST SSE stream, legacy SSE stream).
"""

from __future__ import annotations

import time
from typing import Any, Callable, ClassVar, Mapping, Optional, Protocol

from attrs import define, field, frozen
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from mcp_proxy import __version__, jsonrpc
from mcp_proxy.models import InstanceConfig
from mcp_proxy.relay import Downstream
from mcp_proxy.router import Router, ToolCatalog

SUPPORTED_VERSIONS = ("2024-11-05", "2025-03-26", "2025-06-18", "2025-11-25")
LATEST_VERSION = "2025-11-25"
SERVER_INFO = {"name": "mcp-proxy", "version": __version__}
REQUEST_CANCELLED = -32800


class LoadConfig(Protocol):
    """
    Loads (through its cache) an instance's configuration.
    """

    def __call__(self, instanceId: str) -> Deferred[Optional[InstanceConfig]]: ...


@frozen
class CallContext:
    """
    Who is asking, and for which instance.

    @ivar instanceId: the instance the request is for.
    @ivar keyId: the API key's id.
    @ivar sessionId: the session, or C{None} for a sessionless request.
    @ivar transport: C{"STREAMABLE_HTTPS"} or C{"SSE"} (as the request log
        records it).
    @ivar userAgent: the client's C{User-Agent}, for the request log.
    @ivar validationMode: the request said C{x-validation-mode: true}: it
        is not logged (the origin's connection tests use it).
    @ivar requestBytes: the size of the HTTP body that carried the request
        (the whole batch for a batched one), or C{None} when unknown.
    """

    instanceId: str
    organizationId: str
    keyId: str
    sessionId: Optional[str]
    transport: str
    protocolVersion: str = LATEST_VERSION
    userAgent: Optional[str] = None
    validationMode: bool = False
    requestBytes: Optional[int] = None


def negotiateVersion(requested: Any) -> str:
    """
    The protocol version to answer an C{initialize} with: the client's when
    supported, else the latest.
    """
    if isinstance(requested, str) and requested in SUPPORTED_VERSIONS:
        return requested
    return LATEST_VERSION


def encodeResult(requestId: jsonrpc.RequestId, result: Any) -> bytes:
    """
    Encode a success response.
    """
    return jsonrpc.encode(jsonrpc.response(requestId, result))


def encodeError(requestId: Optional[jsonrpc.RequestId], error: jsonrpc.JsonRpcError) -> bytes:
    """
    Encode an error response.
    """
    return jsonrpc.encode(jsonrpc.errorResponse(requestId, error.code, error.message, error.data))


def errorFromException(exc: BaseException, method: str) -> jsonrpc.JsonRpcError:
    """
    The JSON-RPC error for a failed request: errors that carry an integer
    C{code} (a JSON-RPC error of an upstream) keep it; a cancelled call is a
    timeout; anything else is an internal error whose message does not leak
    internals.
    """
    if isinstance(exc, jsonrpc.JsonRpcError):
        return exc
    code = getattr(exc, "code", None)
    message = getattr(exc, "message", None)
    if isinstance(code, int) and not isinstance(code, bool) and isinstance(message, str):
        return jsonrpc.JsonRpcError(code, message, getattr(exc, "data", None))
    if isinstance(exc, CancelledError):
        return jsonrpc.JsonRpcError(REQUEST_CANCELLED, f"{method} was cancelled")
    if isinstance(message, str) and message:
        return jsonrpc.JsonRpcError(jsonrpc.INTERNAL_ERROR, message)
    return jsonrpc.JsonRpcError(jsonrpc.INTERNAL_ERROR, f"Internal error in {method}")


@define
class Dispatcher:
    """
    Answers the MCP requests of clients.

    @ivar loadConfig: the instance configuration loader (cached).
    @ivar router: the routing core.
    @ivar onRequest: called after each routed request with C{(context,
        method, params, result, error, durationMs)} for the request log and
        metrics: C{result} is the already-encoded result (L{RawJSON}) or
        C{None}, C{error} the L{JsonRpcError} or C{None}.  May be C{None}.
    @ivar clock: times the requests.
    """

    loadConfig: LoadConfig
    router: Router
    onRequest: Optional[Callable[..., None]] = None
    clock: Optional[IReactorTime] = None
    _log: Logger = field(factory=lambda: Logger(namespace="mcp_proxy.dispatch"))

    def initialize(
        self, ctx: CallContext, params: Mapping[str, Any], downstream: Optional[Downstream]
    ) -> Deferred[tuple[str, dict[str, Any]]]:
        """
        The answer to an C{initialize} request: the negotiated version and
        the result, whose capabilities are what the instance's upstreams
        offer and the proxy relays.
        """
        version = negotiateVersion(params.get("protocolVersion"))

        def result(capabilities: dict[str, Any]) -> tuple[str, dict[str, Any]]:
            return version, {
                "protocolVersion": version,
                "capabilities": capabilities,
                "serverInfo": SERVER_INFO,
            }

        d = self._withConfig(ctx, lambda config: self.router.serverCapabilities(config, downstream))
        return d.addCallback(result)

    def handle(
        self,
        ctx: CallContext,
        message: Mapping[str, Any],
        downstream: Optional[Downstream] = None,
    ) -> Deferred[bytes]:
        """
        Answer one request (not C{initialize}, which the session layer
        handles).

        @param downstream: where messages related to the request go
            (progress, logs, server-to-client requests); C{None} when they
            cannot be relayed.
        @return: a Deferred firing with the encoded response; it never
            fails.  Cancelling it cancels the upstream request.
        """
        requestId = message["id"]
        method = message["method"]
        params = message.get("params")
        if params is None:
            params = {}
        if not isinstance(params, dict):
            return _fired(
                encodeError(
                    requestId,
                    jsonrpc.JsonRpcError(jsonrpc.INVALID_PARAMS, "params must be an object"),
                )
            )
        if method == "ping":
            return _fired(encodeResult(requestId, {}))
        if method == "initialize":
            return _fired(
                encodeError(
                    requestId,
                    jsonrpc.JsonRpcError(jsonrpc.INVALID_REQUEST, "Server already initialized"),
                )
            )
        route = self._routes.get(method)
        if route is None:
            return _fired(
                encodeError(
                    requestId,
                    jsonrpc.JsonRpcError(jsonrpc.METHOD_NOT_FOUND, f"Method not found: {method}"),
                )
            )
        started = self._now()
        d = self._withConfig(ctx, lambda config: route(self, ctx, config, params, downstream))
        return self._finish(d, ctx, requestId, method, params, started)

    def _now(self) -> float:
        return self.clock.seconds() if self.clock is not None else time.monotonic()

    def _listTools(
        self,
        ctx: CallContext,
        config: InstanceConfig,
        params: Mapping[str, Any],
        downstream: Optional[Downstream],
    ) -> Deferred[Any]:
        if params.get("cursor") is not None:
            raise jsonrpc.JsonRpcError(jsonrpc.INVALID_PARAMS, "Invalid cursor")
        return self.router.catalog(config, downstream).addCallback(_ListResult)

    def _callTool(
        self,
        ctx: CallContext,
        config: InstanceConfig,
        params: Mapping[str, Any],
        downstream: Optional[Downstream],
    ) -> Deferred[Any]:
        return self.router.callTool(config, params, downstream)

    def _setLevel(
        self,
        ctx: CallContext,
        config: InstanceConfig,
        params: Mapping[str, Any],
        downstream: Optional[Downstream],
    ) -> Deferred[Any]:
        hub = self.router.hub
        if (
            hub is not None
            and downstream is not None
            and downstream.sessionId is not None
            and downstream.notifySession is not None
        ):
            hub.listenLogs(ctx.instanceId, downstream.sessionId, downstream.notifySession)
        return self.router.setLogLevel(config, params, downstream)

    def _subscription(subscribe: bool) -> Any:  # type: ignore[misc]
        def route(
            self: Dispatcher,
            ctx: CallContext,
            config: InstanceConfig,
            params: Mapping[str, Any],
            downstream: Optional[Downstream],
        ) -> Deferred[Any]:
            if downstream is None:
                raise jsonrpc.JsonRpcError(
                    jsonrpc.INVALID_REQUEST, "resource subscriptions need a session"
                )
            return self.router.subscribe(config, params, downstream, subscribe)

        return route

    def _page(kind: str) -> Any:  # type: ignore[misc]
        def route(
            self: Dispatcher,
            ctx: CallContext,
            config: InstanceConfig,
            params: Mapping[str, Any],
            downstream: Optional[Downstream],
        ) -> Deferred[Any]:
            return self.router.listPage(kind, config, params, downstream)

        return route

    _routes: ClassVar[dict[str, Callable[..., Deferred[Any]]]] = {
        "tools/list": _listTools,
        "tools/call": _callTool,
        "resources/list": _page("resources"),
        "resources/templates/list": _page("resourceTemplates"),
        "prompts/list": _page("prompts"),
        "resources/read": lambda self, ctx, config, params, downstream: self.router.readResource(
            config, params, downstream
        ),
        "resources/subscribe": _subscription(True),
        "resources/unsubscribe": _subscription(False),
        "prompts/get": lambda self, ctx, config, params, downstream: self.router.getPrompt(
            config, params, downstream
        ),
        "completion/complete": lambda self, ctx, config, params, downstream: self.router.complete(
            config, params, downstream
        ),
        "logging/setLevel": _setLevel,
    }

    def _withConfig(
        self, ctx: CallContext, then: Callable[[InstanceConfig], Deferred[Any]]
    ) -> Deferred[Any]:
        def loaded(config: Optional[InstanceConfig]) -> Deferred[Any]:
            if config is None:
                raise jsonrpc.JsonRpcError(jsonrpc.INTERNAL_ERROR, "MCP server instance not found")
            return then(config)

        d = self.loadConfig(ctx.instanceId)
        d.addCallback(loaded)
        return d

    def _finish(
        self,
        d: Deferred[Any],
        ctx: CallContext,
        requestId: jsonrpc.RequestId,
        method: str,
        params: Mapping[str, Any],
        started: float,
    ) -> Deferred[bytes]:
        def ok(result: Any) -> bytes:
            if isinstance(result, _ListResult):
                body = jsonrpc.RawJSON(b'{"tools":' + result.catalog.toolsJson + b"}")
            else:
                body = jsonrpc.RawJSON(jsonrpc.encode(result))
            if self.onRequest is not None:
                self.onRequest(ctx, method, params, body, None, (self._now() - started) * 1000)
            return jsonrpc.encodeResponseRaw(requestId, body)

        def failed(reason: Any) -> bytes:
            error = errorFromException(reason.value, method)
            if not isinstance(reason.value, (jsonrpc.JsonRpcError, CancelledError)) and not (
                isinstance(getattr(reason.value, "code", None), int)
            ):
                self._log.failure(
                    "{method} failed for instance {instance}",
                    reason,
                    method=method,
                    instance=ctx.instanceId,
                )
            if self.onRequest is not None:
                self.onRequest(ctx, method, params, None, error, (self._now() - started) * 1000)
            return encodeError(requestId, error)

        return d.addCallbacks(ok, failed)


@frozen
class _ListResult:
    catalog: ToolCatalog


def _fired(value: bytes) -> Deferred[bytes]:
    d: Deferred[bytes] = Deferred()
    d.callback(value)
    return d
