"""
The routing core: which upstream serves which tool, prompt or resource, and
the aggregated lists (C{tools/list}, C{resources/list},
C{resources/templates/list}, C{prompts/list}).

Nothing here knows about HTTP or sessions: it takes an instance's
L{InstanceConfig} and a request, and answers from the upstreams.  That keeps
it usable unchanged by the stateless 2026-07-28 protocol revision.

Tool names are decided from the instance's whitelist alone (the "Tool" rows
of its tool group), never from what an upstream happens to answer, so a
C{tools/call} needs no C{tools/list} first, and a failing upstream never
renames another upstream's tools.  A name stays as the upstream spells it,
unless an earlier config (in config-name order) already uses it; then it
becomes C{<config name>__<tool>}, sanitised to C{[A-Za-z0-9_-]} and at most
64 characters.  Prompt names follow the same rule.  Resources keep their
URIs; a URI is routed to the upstream that listed it, or whose template
matches it.

Upstreams are reached per I{variant}: the client capabilities that the
proxy announces upstream (C{sampling}, C{elicitation}, C{roots}) are those
of the client, so clients with different capabilities use different
upstream processes, and an upstream never asks a client for something it
cannot do.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
from typing import Any, Awaitable, Callable, Mapping, Optional, Protocol

from attrs import define, evolve, field, frozen
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from mcp_proxy import jsonrpc
from mcp_proxy.models import InstanceConfig, UpstreamConfig
from mcp_proxy.relay import Downstream, RelayHub

MAX_TOOL_NAME = 64
MAX_LIST_PAGES = 100
PAGE_SIZE = 1000
RELAYED_CLIENT_CAPABILITIES = ("sampling", "elicitation", "roots")

_unsafe = re.compile(r"[^A-Za-z0-9_-]")


def _sanitise(text: str) -> str:
    return _unsafe.sub("_", text)


def prefixedName(configName: str, toolName: str) -> str:
    """
    The name a tool gets when an earlier config already uses its name:
    C{<config>__<tool>} with every character outside C{[A-Za-z0-9_-]}
    replaced by C{_}; longer than 64 characters, it is cut and ends in 8
    hex digits of a SHA-256 of the full name, so that it stays unique and
    stable.
    """
    name = _sanitise(configName) + "__" + _sanitise(toolName)
    if len(name) <= MAX_TOOL_NAME:
        return name
    digest = hashlib.sha256(f"{configName}\0{toolName}".encode()).hexdigest()[:8]
    return name[: MAX_TOOL_NAME - 9] + "_" + digest


@frozen
class Route:
    """
    Where an exposed tool name goes.

    @ivar upstream: the config that serves it.
    @ivar toolName: the name the upstream knows it by.
    """

    upstream: UpstreamConfig
    toolName: str


@frozen
class RouteTable:
    """
    The exposed tool names of one instance configuration.

    @ivar routes: exposed name to L{Route}.
    @ivar exposed: per config id, the upstream tool name to its exposed name.
    """

    config: InstanceConfig
    routes: Mapping[str, Route]
    exposed: Mapping[str, Mapping[str, str]]

    @classmethod
    def build(cls, config: InstanceConfig) -> RouteTable:
        routes: dict[str, Route] = {}
        exposed: dict[str, dict[str, str]] = {}
        for upstream in config.upstreams:
            names = exposed.setdefault(upstream.configId, {})
            for toolName in sorted(upstream.toolNames):
                name = toolName
                if name in routes:
                    name = prefixedName(upstream.name, toolName)
                    n = 2
                    while name in routes:
                        name = prefixedName(upstream.name, f"{toolName}_{n}")
                        n += 1
                routes[name] = Route(upstream, toolName)
                names[toolName] = name
        return cls(config, routes, exposed)


class CallUpstream(Protocol):
    """
    What the router needs of the upstream pool: one request to one upstream
    of an instance.
    """

    def __call__(
        self,
        instanceId: str,
        config: UpstreamConfig,
        method: str,
        params: Optional[dict[str, Any]],
        timeout: float,
    ) -> Deferred[Any]: ...


class UpstreamCapabilities(Protocol):
    """
    The server capabilities of one upstream of an instance (starting it).
    """

    def __call__(
        self, instanceId: str, config: UpstreamConfig, timeout: float
    ) -> Deferred[dict[str, Any]]: ...


@frozen
class ToolCatalog:
    """
    An instance's aggregated tool list.

    @ivar tools: the tool objects, in order.
    @ivar toolsJson: C{tools} encoded once, to be spliced into responses.
    @ivar failed: names of the configs whose listing failed; a catalog with
        failures is not cached.
    """

    tools: tuple[dict[str, Any], ...]
    toolsJson: bytes = field(repr=False)
    failed: tuple[str, ...]


@frozen
class Listing:
    """
    An aggregated list of resources, resource templates or prompts, with
    where each item came from.

    @ivar items: the items as the client sees them.
    @ivar owners: per item, the upstream that listed it.
    @ivar routes: the key (resource URI, template, exposed prompt name) to
        C{(upstream, upstream's own name or URI)}.
    """

    items: tuple[dict[str, Any], ...]
    owners: tuple[UpstreamConfig, ...]
    routes: Mapping[str, tuple[UpstreamConfig, str]]
    failed: tuple[str, ...]


@define
class _Cached:
    config: InstanceConfig
    value: Any
    expires: float


def profileOf(downstream: Optional[Downstream]) -> str:
    """
    A stable key of the client capabilities relayed upstream (C{""} for
    none).
    """
    if downstream is None:
        return ""
    relayed = {
        name: downstream.capabilities[name]
        for name in RELAYED_CLIENT_CAPABILITIES
        if isinstance(downstream.capabilities.get(name), dict)
    }
    if not relayed:
        return ""
    return hashlib.sha256(json.dumps(relayed, sort_keys=True).encode()).hexdigest()[:12]


def encodeCursor(offset: int) -> str:
    """
    The proxy's own opaque cursor for an aggregated list.
    """
    return base64.urlsafe_b64encode(json.dumps({"o": offset}).encode()).decode().rstrip("=")


def decodeCursor(cursor: Any) -> int:
    """
    The offset in a cursor made by L{encodeCursor}.

    @raise jsonrpc.JsonRpcError: -32602 for anything else.
    """
    if cursor is None:
        return 0
    try:
        text = str(cursor)
        data = json.loads(base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)))
        offset = data["o"]
        if not isinstance(offset, int) or offset < 0:
            raise ValueError(offset)
        return offset
    except (ValueError, KeyError, TypeError):
        raise jsonrpc.JsonRpcError(jsonrpc.INVALID_PARAMS, "Invalid cursor") from None


def templateMatches(template: str, uri: str) -> bool:
    """
    Whether C{uri} is an expansion of the RFC 6570 C{template} (simple
    C{{var}} and reserved C{{+var}} expressions).
    """
    pattern = ""
    for part in re.split(r"(\{[^}]*\})", template):
        if part.startswith("{") and part.endswith("}"):
            pattern += ".+" if part[1:2] in ("+", "#") else "[^/?#]+"
        else:
            pattern += re.escape(part)
    return re.fullmatch(pattern, uri) is not None


@define
class Router:
    """
    Routes the requests of an instance's clients to its upstreams, and
    aggregates their lists.

    @ivar callUpstream: sends one request to one upstream of an instance
        (the upstream pool's C{call}).
    @ivar clock: for the caches' time to live.
    @ivar timeout: seconds an upstream request may take.
    @ivar catalogTtl: seconds a complete aggregate is reused.
    @ivar onUpstreamFailure: called with the config name for every failed
        listing (metrics).
    @ivar upstreamCapabilities: the pool's C{capabilities}; without it,
        every upstream is taken to offer tools only.
    @ivar hub: relays what upstreams send on their own; without it nothing
        is relayed.
    """

    callUpstream: CallUpstream
    clock: IReactorTime
    timeout: float = 30.0
    catalogTtl: float = 300.0
    onUpstreamFailure: Optional[Callable[[str], None]] = None
    upstreamCapabilities: Optional[UpstreamCapabilities] = None
    hub: Optional[RelayHub] = None
    _routeTables: dict[str, RouteTable] = field(factory=dict)
    _cache: dict[tuple[str, str, str], _Cached] = field(factory=dict)
    _pending: dict[tuple[str, str, str], list[Deferred[Any]]] = field(factory=dict)
    _variants: dict[tuple[str, str, str], UpstreamConfig] = field(factory=dict)
    _log: Logger = field(factory=lambda: Logger(namespace="mcp_proxy.router"))

    # -- names and variants ---------------------------------------------------

    def routeTable(self, config: InstanceConfig) -> RouteTable:
        """
        The route table of C{config}, built once per configuration.
        """
        table = self._routeTables.get(config.instanceId)
        if table is None or (table.config is not config and table.config != config):
            table = RouteTable.build(config)
            self._routeTables[config.instanceId] = table
        return table

    def variant(self, upstream: UpstreamConfig, downstream: Optional[Downstream]) -> UpstreamConfig:
        """
        The config to reach C{upstream} with for this client: it announces
        the client's relayed capabilities, under a config id of its own.
        """
        profile = profileOf(downstream)
        if not profile or downstream is None:
            return upstream
        key = (upstream.configId, profile, configKey(upstream))
        found = self._variants.get(key)
        if found is None:
            relayed = {
                name: downstream.capabilities[name]
                for name in RELAYED_CLIENT_CAPABILITIES
                if isinstance(downstream.capabilities.get(name), dict)
            }
            found = evolve(
                upstream,
                configId=f"{upstream.configId}~{profile}",
                clientCapabilities=relayed,
            )
            self._variants[key] = found
        return found

    def invalidate(self, instanceId: str) -> None:
        """
        Forget the cached routes and aggregates of an instance.
        """
        self._routeTables.pop(instanceId, None)
        for key in [k for k in self._cache if k[1] == instanceId]:
            del self._cache[key]

    def invalidateAll(self) -> None:
        """
        Forget every cached route table and aggregate.
        """
        self._routeTables.clear()
        self._cache.clear()
        self._variants.clear()

    def listChanged(self, instanceId: str, kind: str) -> None:
        """
        An upstream of the instance said its C{kind} list changed: forget
        that aggregate.
        """
        for key in [k for k in self._cache if k[1] == instanceId and k[0].startswith(kind)]:
            del self._cache[key]

    # -- calls ----------------------------------------------------------------

    def _send(
        self,
        config: InstanceConfig,
        upstream: UpstreamConfig,
        method: str,
        params: dict[str, Any],
        downstream: Optional[Downstream],
    ) -> Deferred[Any]:
        """
        Send one request for a client, relaying what the upstream sends about
        it (progress with the client's own token, logs, requests).
        """
        target = self.variant(upstream, downstream)
        if self.hub is None or downstream is None:
            return self.callUpstream(config.instanceId, target, method, params, self.timeout)
        cleanups = [self.hub.begin(config.instanceId, target.configId, downstream)]
        meta = params.get("_meta")
        if isinstance(meta, dict) and "progressToken" in meta:
            token, forget = self.hub.progressToken(downstream, meta["progressToken"])
            params = {**params, "_meta": {**meta, "progressToken": token}}
            cleanups.append(forget)
        d = self.callUpstream(config.instanceId, target, method, params, self.timeout)

        def done(result: Any) -> Any:
            for cleanup in cleanups:
                cleanup()
            return result

        return d.addBoth(done)

    def callTool(
        self,
        config: InstanceConfig,
        params: Mapping[str, Any],
        downstream: Optional[Downstream] = None,
    ) -> Deferred[Any]:
        """
        Send a C{tools/call} to the upstream that owns the tool.

        @param params: the client's C{params}: C{name}, C{arguments},
            C{_meta}.
        @return: a Deferred firing with the upstream's result as it is, or
            failing with L{jsonrpc.JsonRpcError} (-32602 for an unknown
            tool) or the pool's upstream error.
        """
        name = params.get("name")
        if not isinstance(name, str):
            raise jsonrpc.JsonRpcError(jsonrpc.INVALID_PARAMS, "tools/call needs a tool name")
        arguments = params.get("arguments")
        if arguments is not None and not isinstance(arguments, dict):
            raise jsonrpc.JsonRpcError(
                jsonrpc.INVALID_PARAMS, "tools/call arguments must be an object"
            )
        route = self.routeTable(config).routes.get(name)
        if route is None:
            raise jsonrpc.JsonRpcError(jsonrpc.INVALID_PARAMS, f"Unknown tool: {name}")
        upstreamParams: dict[str, Any] = {"name": route.toolName}
        upstreamParams["arguments"] = arguments if arguments is not None else {}
        meta = params.get("_meta")
        if isinstance(meta, dict):
            upstreamParams["_meta"] = meta
        return self._send(config, route.upstream, "tools/call", upstreamParams, downstream)

    # -- cached aggregates ----------------------------------------------------

    def _aggregate(
        self,
        kind: str,
        config: InstanceConfig,
        downstream: Optional[Downstream],
        build: Callable[[], Awaitable[Any]],
        complete: Callable[[Any], bool],
    ) -> Deferred[Any]:
        """
        A cached aggregate of an instance for a client profile; concurrent
        requests for a missing one share one build; incomplete ones are not
        cached.
        """
        key = (kind, config.instanceId, profileOf(downstream))
        entry = self._cache.get(key)
        now = self.clock.seconds()
        if entry is not None:
            if entry.expires > now and (entry.config is config or entry.config == config):
                return _fired(entry.value)
            del self._cache[key]
        waiters = self._pending.get(key)
        waiter: Deferred[Any] = Deferred()
        if waiters is not None:
            waiters.append(waiter)
            return waiter
        waiters = self._pending[key] = [waiter]

        def done(result: Any) -> None:
            del self._pending[key]
            if not isinstance(result, Failure) and complete(result):
                self._cache[key] = _Cached(config, result, self.clock.seconds() + self.catalogTtl)
            for each in waiters:
                if isinstance(result, Failure):
                    each.errback(result)
                else:
                    each.callback(result)

        Deferred.fromCoroutine(build()).addBoth(done)  # type: ignore[arg-type]
        return waiter

    def catalog(
        self, config: InstanceConfig, downstream: Optional[Downstream] = None
    ) -> Deferred[ToolCatalog]:
        """
        The aggregated tool list of an instance.
        """
        return self._aggregate(
            "tools",
            config,
            downstream,
            lambda: self._listTools(config, downstream),
            lambda catalog: not catalog.failed,
        )

    async def _listTools(
        self, config: InstanceConfig, downstream: Optional[Downstream]
    ) -> ToolCatalog:
        table = self.routeTable(config)
        upstreams = [u for u in config.upstreams if u.toolNames]
        results = await self._each(
            config, upstreams, "tools/list", "tools", downstream, capability=None
        )
        tools: list[dict[str, Any]] = []
        failed: list[str] = []
        for upstream, listed in zip(upstreams, results, strict=True):
            if listed is None:
                failed.append(upstream.name)
                continue
            names = table.exposed.get(upstream.configId, {})
            byName = {t["name"]: t for t in listed if isinstance(t, dict) and "name" in t}
            for toolName in sorted(upstream.toolNames):
                tool = byName.get(toolName)
                if tool is None:
                    continue
                out = dict(tool)
                out["name"] = names.get(toolName, toolName)
                out["description"] = _prefixed(upstream.name, tool.get("description"))
                tools.append(out)
        return ToolCatalog(tuple(tools), jsonrpc.encode(tools), tuple(failed))

    async def _each(
        self,
        config: InstanceConfig,
        upstreams: list[UpstreamConfig],
        method: str,
        key: str,
        downstream: Optional[Downstream],
        capability: Optional[str],
    ) -> list[Optional[list[Any]]]:
        """
        Every page of C{method} from each upstream (that declares
        C{capability}); C{None} for an upstream that failed.
        """
        results = await DeferredList(
            [
                Deferred.fromCoroutine(
                    self._listOne(config, u, method, key, downstream, capability)
                )
                for u in upstreams
            ],
            consumeErrors=True,
        )
        out: list[Optional[list[Any]]] = []
        for upstream, (ok, value) in zip(upstreams, results, strict=True):
            if ok:
                out.append(value)
                continue
            self._log.warn(
                "{method} of upstream {upstream} failed: {error}",
                method=method,
                upstream=upstream.name,
                instance=config.instanceId,
                error=_describe(value),
            )
            if self.onUpstreamFailure is not None:
                self.onUpstreamFailure(upstream.name)
            out.append(None)
        return out

    async def _offers(
        self,
        config: InstanceConfig,
        upstream: UpstreamConfig,
        downstream: Optional[Downstream],
        capability: str,
    ) -> bool:
        if self.upstreamCapabilities is None:
            return capability == "tools"
        capabilities = await self.upstreamCapabilities(
            config.instanceId, self.variant(upstream, downstream), self.timeout
        )
        return isinstance(capabilities.get(capability), dict)

    async def _listOne(
        self,
        config: InstanceConfig,
        upstream: UpstreamConfig,
        method: str,
        key: str,
        downstream: Optional[Downstream],
        capability: Optional[str],
    ) -> list[Any]:
        if capability is not None and not await self._offers(
            config, upstream, downstream, capability
        ):
            return []
        items: list[Any] = []
        cursor: Optional[str] = None
        seen: set[str] = set()
        target = self.variant(upstream, downstream)
        for _ in range(MAX_LIST_PAGES):
            params = {"cursor": cursor} if cursor is not None else None
            result = await self.callUpstream(
                config.instanceId, target, method, params, self.timeout
            )
            page = result.get(key) if isinstance(result, dict) else None
            if not isinstance(page, list):
                raise jsonrpc.JsonRpcError(
                    jsonrpc.INTERNAL_ERROR, f"upstream {upstream.name} sent a bad {method}"
                )
            items.extend(page)
            cursor = result.get("nextCursor")
            if not isinstance(cursor, str) or not cursor or cursor in seen:
                return items
            seen.add(cursor)
        return items

    def _listing(
        self, kind: str, config: InstanceConfig, downstream: Optional[Downstream]
    ) -> Deferred[Listing]:
        return self._aggregate(
            kind,
            config,
            downstream,
            lambda: self._buildListing(kind, config, downstream),
            lambda listing: not listing.failed,
        )

    async def _buildListing(
        self, kind: str, config: InstanceConfig, downstream: Optional[Downstream]
    ) -> Listing:
        method, key, capability, field_ = {
            "resources": ("resources/list", "resources", "resources", "uri"),
            "resourceTemplates": (
                "resources/templates/list",
                "resourceTemplates",
                "resources",
                "uriTemplate",
            ),
            "prompts": ("prompts/list", "prompts", "prompts", "name"),
        }[kind]
        upstreams = list(config.upstreams)
        results = await self._each(config, upstreams, method, key, downstream, capability)
        items: list[dict[str, Any]] = []
        owners: list[UpstreamConfig] = []
        routes: dict[str, tuple[UpstreamConfig, str]] = {}
        failed: list[str] = []
        for upstream, listed in zip(upstreams, results, strict=True):
            if listed is None:
                failed.append(upstream.name)
                continue
            for item in listed:
                if not isinstance(item, dict) or not isinstance(item.get(field_), str):
                    continue
                own = item[field_]
                exposed = own
                if kind == "prompts" and exposed in routes:
                    exposed = prefixedName(upstream.name, own)
                if exposed in routes:
                    continue
                out = dict(item)
                out[field_] = exposed
                if kind == "prompts":
                    out["description"] = _prefixed(upstream.name, item.get("description"))
                routes[exposed] = (upstream, own)
                items.append(out)
                owners.append(upstream)
        return Listing(tuple(items), tuple(owners), routes, tuple(failed))

    def listPage(
        self,
        kind: str,
        config: InstanceConfig,
        params: Mapping[str, Any],
        downstream: Optional[Downstream] = None,
    ) -> Deferred[dict[str, Any]]:
        """
        A page of an aggregated list (C{"resources"},
        C{"resourceTemplates"}, C{"prompts"}) with the proxy's own cursor.
        """
        offset = decodeCursor(params.get("cursor"))

        def page(listing: Listing) -> dict[str, Any]:
            chunk = listing.items[offset : offset + PAGE_SIZE]
            result: dict[str, Any] = {kind: list(chunk)}
            if offset + PAGE_SIZE < len(listing.items):
                result["nextCursor"] = encodeCursor(offset + PAGE_SIZE)
            return result

        return self._listing(kind, config, downstream).addCallback(page)

    # -- resources, prompts, completion, logging -------------------------------

    async def _resourceOwner(
        self, config: InstanceConfig, uri: str, downstream: Optional[Downstream]
    ) -> Optional[UpstreamConfig]:
        resources = await self._listing("resources", config, downstream)
        found = resources.routes.get(uri)
        if found is not None:
            return found[0]
        templates = await self._listing("resourceTemplates", config, downstream)
        for template, (upstream, _) in templates.routes.items():
            if template == uri or templateMatches(template, uri):
                return upstream
        owners = {u.configId: u for u in resources.owners + templates.owners}
        if len(owners) == 1:
            return next(iter(owners.values()))
        return None

    def _uri(self, params: Mapping[str, Any]) -> str:
        uri = params.get("uri")
        if not isinstance(uri, str) or not uri:
            raise jsonrpc.JsonRpcError(jsonrpc.INVALID_PARAMS, "uri is required")
        return uri

    def readResource(
        self,
        config: InstanceConfig,
        params: Mapping[str, Any],
        downstream: Optional[Downstream] = None,
        method: str = "resources/read",
    ) -> Deferred[Any]:
        """
        Route C{resources/read} (or C{resources/subscribe} /
        C{unsubscribe}) by URI.  An unknown URI is -32002.
        """
        uri = self._uri(params)

        async def run() -> Any:
            owner = await self._resourceOwner(config, uri, downstream)
            if owner is None:
                raise jsonrpc.JsonRpcError(
                    jsonrpc.RESOURCE_NOT_FOUND, "Resource not found", {"uri": uri}
                )
            return await self._send(config, owner, method, dict(params), downstream)

        return Deferred.fromCoroutine(run())

    def subscribe(
        self,
        config: InstanceConfig,
        params: Mapping[str, Any],
        downstream: Downstream,
        subscribe: bool,
    ) -> Deferred[Any]:
        """
        C{resources/subscribe} or C{unsubscribe} for a session: the upstream
        is asked only for the first subscriber and told after the last.
        """
        uri = self._uri(params)
        sessionId = downstream.sessionId
        if sessionId is None or downstream.notifySession is None or self.hub is None:
            raise jsonrpc.JsonRpcError(
                jsonrpc.INVALID_REQUEST, "resource subscriptions need a session"
            )
        notify = downstream.notifySession
        hub = self.hub

        async def run() -> Any:
            owner = await self._resourceOwner(config, uri, downstream)
            if owner is None:
                raise jsonrpc.JsonRpcError(
                    jsonrpc.RESOURCE_NOT_FOUND, "Resource not found", {"uri": uri}
                )
            target = self.variant(owner, downstream)
            if subscribe:
                if hub.subscribe(config.instanceId, target, uri, sessionId, notify):
                    await self._send(config, owner, "resources/subscribe", {"uri": uri}, downstream)
            elif hub.unsubscribe(config.instanceId, target.configId, uri, sessionId):
                await self._send(config, owner, "resources/unsubscribe", {"uri": uri}, downstream)
            return {}

        return Deferred.fromCoroutine(run())

    def getPrompt(
        self,
        config: InstanceConfig,
        params: Mapping[str, Any],
        downstream: Optional[Downstream] = None,
    ) -> Deferred[Any]:
        """
        Route C{prompts/get} by the exposed prompt name.
        """
        name = params.get("name")
        if not isinstance(name, str):
            raise jsonrpc.JsonRpcError(jsonrpc.INVALID_PARAMS, "prompts/get needs a name")

        async def run() -> Any:
            prompts = await self._listing("prompts", config, downstream)
            route = prompts.routes.get(name)
            if route is None:
                raise jsonrpc.JsonRpcError(jsonrpc.INVALID_PARAMS, f"Unknown prompt: {name}")
            upstream, own = route
            return await self._send(
                config, upstream, "prompts/get", {**params, "name": own}, downstream
            )

        return Deferred.fromCoroutine(run())

    def complete(
        self,
        config: InstanceConfig,
        params: Mapping[str, Any],
        downstream: Optional[Downstream] = None,
    ) -> Deferred[Any]:
        """
        Route C{completion/complete} by its reference (a prompt name or a
        resource URI or template).
        """
        ref = params.get("ref")
        if not isinstance(ref, dict):
            raise jsonrpc.JsonRpcError(jsonrpc.INVALID_PARAMS, "completion/complete needs a ref")

        async def run() -> Any:
            if ref.get("type") == "ref/prompt":
                prompts = await self._listing("prompts", config, downstream)
                route = prompts.routes.get(str(ref.get("name")))
                if route is None:
                    raise jsonrpc.JsonRpcError(
                        jsonrpc.INVALID_PARAMS, f"Unknown prompt: {ref.get('name')}"
                    )
                upstream, own = route
                upstreamParams = {**params, "ref": {**ref, "name": own}}
                return await self._send(
                    config, upstream, "completion/complete", upstreamParams, downstream
                )
            if ref.get("type") == "ref/resource":
                owner = await self._resourceOwner(config, str(ref.get("uri")), downstream)
                if owner is None:
                    raise jsonrpc.JsonRpcError(
                        jsonrpc.INVALID_PARAMS, f"Unknown resource: {ref.get('uri')}"
                    )
                return await self._send(
                    config, owner, "completion/complete", dict(params), downstream
                )
            raise jsonrpc.JsonRpcError(jsonrpc.INVALID_PARAMS, "unknown completion ref type")

        return Deferred.fromCoroutine(run())

    def setLogLevel(
        self,
        config: InstanceConfig,
        params: Mapping[str, Any],
        downstream: Optional[Downstream] = None,
    ) -> Deferred[Any]:
        """
        Fan C{logging/setLevel} out to the upstreams that declared
        C{logging}.
        """
        if not isinstance(params.get("level"), str):
            raise jsonrpc.JsonRpcError(jsonrpc.INVALID_PARAMS, "logging/setLevel needs a level")

        async def run() -> Any:
            async def one(upstream: UpstreamConfig) -> None:
                if await self._offers(config, upstream, downstream, "logging"):
                    await self._send(config, upstream, "logging/setLevel", dict(params), downstream)

            await DeferredList(
                [Deferred.fromCoroutine(one(u)) for u in config.upstreams], consumeErrors=True
            )
            return {}

        return Deferred.fromCoroutine(run())

    def serverCapabilities(
        self, config: InstanceConfig, downstream: Optional[Downstream] = None
    ) -> Deferred[dict[str, Any]]:
        """
        The capabilities to advertise to a client: what the instance's
        upstreams offer and the proxy relays.
        """

        async def build() -> dict[str, Any]:
            offered: dict[str, Any] = {"tools": {"listChanged": True}}
            if self.upstreamCapabilities is None:
                return offered
            results = await DeferredList(
                [
                    self.upstreamCapabilities(
                        config.instanceId, self.variant(u, downstream), self.timeout
                    )
                    for u in config.upstreams
                ],
                consumeErrors=True,
            )
            for ok, capabilities in results:
                if not ok or not isinstance(capabilities, dict):
                    continue
                resources = capabilities.get("resources")
                if isinstance(resources, dict):
                    merged = offered.setdefault("resources", {"listChanged": True})
                    if resources.get("subscribe"):
                        merged["subscribe"] = True
                if isinstance(capabilities.get("prompts"), dict):
                    offered["prompts"] = {"listChanged": True}
                if isinstance(capabilities.get("completions"), dict):
                    offered["completions"] = {}
                if isinstance(capabilities.get("logging"), dict):
                    offered["logging"] = {}
            return offered

        return self._aggregate("capabilities", config, downstream, build, lambda _: True)


def configKey(upstream: UpstreamConfig) -> str:
    """
    A short digest of an upstream config, to key variants.
    """
    return hashlib.sha256(
        json.dumps(
            [
                upstream.configId,
                upstream.command,
                list(upstream.args),
                upstream.url,
                sorted(upstream.env.items()),
                sorted(upstream.toolNames),
            ],
        ).encode()
    ).hexdigest()[:16]


def _prefixed(label: str, description: Any) -> str:
    if isinstance(description, str) and description:
        return f"[{label}] {description}"
    return f"[{label}]"


def _fired(value: Any) -> Deferred[Any]:
    d: Deferred[Any] = Deferred()
    d.callback(value)
    return d


def _describe(failure: Any) -> str:
    """
    The message of a failure, for logs.
    """
    if isinstance(failure, Failure):
        return failure.getErrorMessage()
    return repr(failure)
