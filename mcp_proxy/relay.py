"""
Relaying what upstreams send on their own to the right client: progress
notifications, log messages, resource updates, list changes, and
server-to-client requests (sampling, elicitation, roots).

One upstream process serves many clients, so every such message must be
attributed:

 - C{notifications/progress} carries a progress token.  The proxy gives each
   client request its own token upstream and maps it back: exact.
 - C{notifications/resources/updated} names a URI: it goes to the sessions
   that subscribed to that URI of that upstream: exact.
 - C{notifications/message} and server-to-client requests carry no
   correlation over stdio.  They go to the client whose request is in
   flight on that upstream; when requests of several clients are in flight
   at once, to the most recent one that can take it (for requests: that
   declared the capability).  Log messages with no request in flight go to
   the sessions that set a log level for the instance.
 - C{notifications/*/list_changed} go to L{RelayHub.onListChanged}, which
   refreshes the cached lists and tells the instance's sessions.
"""

from __future__ import annotations

import itertools
from typing import Any, Callable, Mapping, Optional

from attrs import define, field
from twisted.internet.defer import Deferred
from twisted.logger import Logger

from mcp_proxy import jsonrpc
from mcp_proxy.interfaces import IUpstream
from mcp_proxy.models import UpstreamConfig

log = Logger(namespace="mcp_proxy.relay")

CLIENT_REQUESTS = {
    "sampling/createMessage": "sampling",
    "elicitation/create": "elicitation",
    "roots/list": "roots",
}

LIST_CHANGED = {
    "notifications/tools/list_changed": "tools",
    "notifications/resources/list_changed": "resources",
    "notifications/prompts/list_changed": "prompts",
}


@define(eq=False)
class Downstream:
    """
    The client side of one request: where messages related to it go.

    @ivar sessionId: the client's session, or C{None} when sessionless.
    @ivar capabilities: the client's capabilities (from its C{initialize}).
    @ivar notifyRelated: sends a notification on this request's own stream
        (the POST's SSE stream, or the legacy SSE stream).
    @ivar notifySession: sends a notification on the session's stream (the
        GET stream or the legacy SSE stream), or C{None}.
    @ivar requestClient: sends a request to the client and fires with its
        result (or fails with L{jsonrpc.JsonRpcError}), or C{None} when
        the client cannot be asked.
    """

    sessionId: Optional[str]
    capabilities: Mapping[str, Any]
    notifyRelated: Callable[[dict[str, Any]], None]
    notifySession: Optional[Callable[[dict[str, Any]], None]] = None
    requestClient: Optional[Callable[[str, dict[str, Any]], Deferred[Any]]] = None


@define
class RelayHub:
    """
    Attributes upstream messages to clients.

    @ivar onListChanged: called with C{(instanceId, configId, kind)} when an
        upstream says its C{kind} list (C{"tools"}, C{"resources"},
        C{"prompts"}) changed.
    """

    onListChanged: Optional[Callable[[str, str, str], None]] = None
    _inflight: dict[tuple[str, str], list[Downstream]] = field(factory=dict)
    _tokens: dict[str, tuple[Downstream, Any]] = field(factory=dict)
    _subscribers: dict[tuple[str, str, str], dict[str, Callable[[dict[str, Any]], None]]] = field(
        factory=dict
    )
    _targets: dict[tuple[str, str, str], UpstreamConfig] = field(factory=dict)
    _logListeners: dict[str, dict[str, Callable[[dict[str, Any]], None]]] = field(factory=dict)
    _counter: Any = field(factory=itertools.count)
    stats: dict[str, int] = field(
        factory=lambda: dict.fromkeys(
            ("progress", "logs", "requests", "updates", "listChanged", "dropped"), 0
        )
    )

    # -- registration ---------------------------------------------------------

    def begin(self, instanceId: str, configId: str, downstream: Downstream) -> Callable[[], None]:
        """
        Note that a request of C{downstream} is in flight on an upstream.

        @return: call it when the request is over.
        """
        key = (instanceId, configId)
        self._inflight.setdefault(key, []).append(downstream)

        def end() -> None:
            current = self._inflight.get(key)
            if current is None:
                return
            try:
                current.remove(downstream)
            except ValueError:
                return
            if not current:
                del self._inflight[key]

        return end

    def progressToken(
        self, downstream: Downstream, original: Any
    ) -> tuple[str, Callable[[], None]]:
        """
        A progress token unique to this proxy for a client's token.

        @return: the token to send upstream, and a function that forgets it.
        """
        token = f"mcpp-{next(self._counter)}"
        self._tokens[token] = (downstream, original)

        def forget() -> None:
            self._tokens.pop(token, None)

        return token, forget

    def subscribe(
        self,
        instanceId: str,
        target: UpstreamConfig,
        uri: str,
        sessionId: str,
        notify: Callable[[dict[str, Any]], None],
    ) -> bool:
        """
        Record a session's subscription to a resource of an upstream.

        @param target: the upstream config (variant) the subscription went
            to.
        @return: whether it is the first subscription to it (so the upstream
            must be asked).
        """
        key = (instanceId, target.configId, uri)
        self._targets[key] = target
        subscribers = self._subscribers.setdefault(key, {})
        first = not subscribers
        subscribers[sessionId] = notify
        return first

    def unsubscribe(self, instanceId: str, configId: str, uri: str, sessionId: str) -> bool:
        """
        Forget a session's subscription.

        @return: whether no session is subscribed any more (so the upstream
            must be told).
        """
        key = (instanceId, configId, uri)
        subscribers = self._subscribers.get(key)
        if not subscribers or sessionId not in subscribers:
            return False
        del subscribers[sessionId]
        if not subscribers:
            del self._subscribers[key]
            return True
        return False

    def target(self, instanceId: str, configId: str, uri: str) -> Optional[UpstreamConfig]:
        """
        The upstream config a subscription went to.
        """
        return self._targets.get((instanceId, configId, uri))

    def listenLogs(
        self, instanceId: str, sessionId: str, notify: Callable[[dict[str, Any]], None]
    ) -> None:
        """
        Send an instance's log messages that belong to no request to this
        session (after its C{logging/setLevel}).
        """
        self._logListeners.setdefault(instanceId, {})[sessionId] = notify

    def dropSession(self, sessionId: str) -> list[tuple[str, UpstreamConfig, str]]:
        """
        Forget a closed session.

        @return: the C{(instanceId, target, uri)} subscriptions that no
            session holds any more (the upstream should be told).
        """
        emptied = []
        for key in list(self._subscribers):
            if self.unsubscribe(*key, sessionId):
                target = self._targets.pop(key, None)
                if target is not None:
                    emptied.append((key[0], target, key[2]))
        for instanceId in list(self._logListeners):
            listeners = self._logListeners[instanceId]
            listeners.pop(sessionId, None)
            if not listeners:
                del self._logListeners[instanceId]
        return emptied

    # -- the pool's hook ------------------------------------------------------

    def onUpstreamMessage(
        self, instanceId: str, config: UpstreamConfig, upstream: IUpstream, message: dict[str, Any]
    ) -> Any:
        """
        Handle a message an upstream sent on its own.  For a request, the
        return value (or Deferred) is the answer to send back upstream.
        """
        method = message.get("method")
        params = message.get("params")
        if not isinstance(params, dict):
            params = {}
        if "id" in message:
            return self._clientRequest(instanceId, config, method, params)
        if method == "notifications/progress":
            entry = self._tokens.get(str(params.get("progressToken")))
            if entry is None:
                self.stats["dropped"] += 1
                return None
            downstream, original = entry
            self.stats["progress"] += 1
            downstream.notifyRelated(
                jsonrpc.notification(method, {**params, "progressToken": original})
            )
            return None
        if method == "notifications/message":
            owner = self._owner(instanceId, config.configId, None)
            self.stats["logs"] += 1
            if owner is not None:
                owner.notifyRelated(message)
                return None
            listeners = self._logListeners.get(instanceId, {})
            if not listeners:
                self.stats["dropped"] += 1
            for notify in list(listeners.values()):
                notify(message)
            return None
        if method == "notifications/resources/updated":
            uri = params.get("uri")
            subscribers = self._subscribers.get((instanceId, config.configId, str(uri)), {})
            self.stats["updates"] += 1
            for notify in list(subscribers.values()):
                notify(message)
            return None
        kind = LIST_CHANGED.get(str(method))
        if kind is not None:
            self.stats["listChanged"] += 1
            if self.onListChanged is not None:
                self.onListChanged(instanceId, config.configId, kind)
            return None
        self.stats["dropped"] += 1
        return None

    def _owner(
        self, instanceId: str, configId: str, capability: Optional[str]
    ) -> Optional[Downstream]:
        candidates = self._inflight.get((instanceId, configId), [])
        for downstream in reversed(candidates):
            if capability is None or (
                downstream.requestClient is not None
                and isinstance(downstream.capabilities.get(capability), dict)
            ):
                return downstream
        return None

    def _clientRequest(
        self, instanceId: str, config: UpstreamConfig, method: Any, params: dict[str, Any]
    ) -> Any:
        capability = CLIENT_REQUESTS.get(str(method))
        if capability is None:
            raise jsonrpc.JsonRpcError(jsonrpc.METHOD_NOT_FOUND, f"Method not found: {method}")
        owner = self._owner(instanceId, config.configId, capability)
        if owner is None or owner.requestClient is None:
            raise jsonrpc.JsonRpcError(
                jsonrpc.INVALID_REQUEST,
                f"no client with the {capability} capability is waiting on this server",
            )
        self.stats["requests"] += 1
        return owner.requestClient(str(method), params)
