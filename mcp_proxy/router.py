"""
The routing core: which upstream serves which tool, and the aggregated
C{tools/list}.

Nothing here knows about HTTP or sessions: it takes an instance's
L{InstanceConfig} and a request, and answers from the upstreams.  That keeps
it usable unchanged by the stateless 2026-07-28 protocol revision.

Tool names are decided from the instance's whitelist alone (the "Tool" rows
of its tool group), never from what an upstream happens to answer, so a
C{tools/call} needs no C{tools/list} first, and a failing upstream never
renames another upstream's tools.  A name stays as the upstream spells it,
unless an earlier config (in config-name order) already uses it; then it
becomes C{<config name>__<tool>}, sanitised to C{[A-Za-z0-9_-]} and at most
64 characters.
"""

from __future__ import annotations

import hashlib
import re
from typing import Any, Callable, Mapping, Optional, Protocol

from attrs import define, field, frozen
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from mcp_proxy import jsonrpc
from mcp_proxy.models import InstanceConfig, UpstreamConfig

MAX_TOOL_NAME = 64
MAX_LIST_PAGES = 100

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
    What the router needs of the upstream pool.
    """

    def __call__(
        self,
        instanceId: str,
        config: UpstreamConfig,
        method: str,
        params: Optional[dict[str, Any]],
        timeout: float,
    ) -> Deferred[Any]: ...


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


@define
class _CatalogEntry:
    config: InstanceConfig
    catalog: ToolCatalog
    expires: float


@define
class Router:
    """
    Routes tool requests of an instance to its upstreams, and aggregates
    their tool lists.

    @ivar callUpstream: sends one request to one upstream of an instance
        (the upstream pool's C{call}).
    @ivar clock: for the catalog's time to live.
    @ivar timeout: seconds an upstream request may take.
    @ivar catalogTtl: seconds a complete catalog is reused.
    @ivar onUpstreamFailure: called with the config name for every failed
        listing (metrics).
    """

    callUpstream: CallUpstream
    clock: IReactorTime
    timeout: float = 30.0
    catalogTtl: float = 300.0
    onUpstreamFailure: Optional[Callable[[str], None]] = None
    _routeTables: dict[str, RouteTable] = field(factory=dict)
    _catalogs: dict[str, _CatalogEntry] = field(factory=dict)
    _listing: dict[str, list[Deferred[ToolCatalog]]] = field(factory=dict)
    _log: Logger = field(factory=lambda: Logger(namespace="mcp_proxy.router"))

    def routeTable(self, config: InstanceConfig) -> RouteTable:
        """
        The route table of C{config}, built once per configuration.
        """
        table = self._routeTables.get(config.instanceId)
        if table is None or (table.config is not config and table.config != config):
            table = RouteTable.build(config)
            self._routeTables[config.instanceId] = table
        return table

    def invalidate(self, instanceId: str) -> None:
        """
        Forget the cached routes and catalog of an instance.
        """
        self._routeTables.pop(instanceId, None)
        self._catalogs.pop(instanceId, None)

    def invalidateAll(self) -> None:
        """
        Forget every cached route table and catalog.
        """
        self._routeTables.clear()
        self._catalogs.clear()

    def callTool(self, config: InstanceConfig, params: Mapping[str, Any]) -> Deferred[Any]:
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
        return self.callUpstream(
            config.instanceId, route.upstream, "tools/call", upstreamParams, self.timeout
        )

    def catalog(self, config: InstanceConfig) -> Deferred[ToolCatalog]:
        """
        The aggregated tool list of an instance: cached while complete and
        fresh; concurrent requests for a missing one share one listing.
        """
        entry = self._catalogs.get(config.instanceId)
        now = self.clock.seconds()
        if entry is not None:
            if entry.expires > now and (entry.config is config or entry.config == config):
                return _fired(entry.catalog)
            del self._catalogs[config.instanceId]
        waiters = self._listing.get(config.instanceId)
        if waiters is not None:
            waiter: Deferred[ToolCatalog] = Deferred()
            waiters.append(waiter)
            return waiter
        first: Deferred[ToolCatalog] = Deferred()
        waiters = self._listing[config.instanceId] = [first]

        def done(result: Any) -> None:
            del self._listing[config.instanceId]
            if isinstance(result, ToolCatalog) and not result.failed:
                self._catalogs[config.instanceId] = _CatalogEntry(
                    config, result, self.clock.seconds() + self.catalogTtl
                )
            for waiter in waiters:
                if isinstance(result, Failure):
                    waiter.errback(result)
                else:
                    waiter.callback(result)

        Deferred.fromCoroutine(self._list(config)).addBoth(done)
        return first

    async def _list(self, config: InstanceConfig) -> ToolCatalog:
        table = self.routeTable(config)
        upstreams = [u for u in config.upstreams if u.toolNames]
        results = await DeferredList(
            [Deferred.fromCoroutine(self._listOne(config, u)) for u in upstreams],
            consumeErrors=True,
        )
        tools: list[dict[str, Any]] = []
        failed: list[str] = []
        for upstream, (ok, value) in zip(upstreams, results, strict=True):
            if not ok:
                failed.append(upstream.name)
                self._log.warn(
                    "tools/list of upstream {upstream} failed: {error}",
                    upstream=upstream.name,
                    instance=config.instanceId,
                    error=_describe(value),
                )
                if self.onUpstreamFailure is not None:
                    self.onUpstreamFailure(upstream.name)
                continue
            names = table.exposed.get(upstream.configId, {})
            listed = {t["name"]: t for t in value if isinstance(t, dict) and "name" in t}
            for toolName in sorted(upstream.toolNames):
                tool = listed.get(toolName)
                if tool is None:
                    continue
                out = dict(tool)
                out["name"] = names.get(toolName, toolName)
                description = tool.get("description")
                out["description"] = (
                    f"[{upstream.name}] {description}"
                    if isinstance(description, str) and description
                    else f"[{upstream.name}]"
                )
                tools.append(out)
        return ToolCatalog(tuple(tools), jsonrpc.encode(tools), tuple(failed))

    async def _listOne(self, config: InstanceConfig, upstream: UpstreamConfig) -> list[Any]:
        tools: list[Any] = []
        cursor: Optional[str] = None
        seen: set[str] = set()
        for _ in range(MAX_LIST_PAGES):
            params = {"cursor": cursor} if cursor is not None else None
            result = await self.callUpstream(
                config.instanceId, upstream, "tools/list", params, self.timeout
            )
            page = result.get("tools") if isinstance(result, dict) else None
            if not isinstance(page, list):
                raise jsonrpc.JsonRpcError(
                    jsonrpc.INTERNAL_ERROR, f"upstream {upstream.name} sent a bad tools/list"
                )
            tools.extend(page)
            cursor = result.get("nextCursor")
            if not isinstance(cursor, str) or not cursor or cursor in seen:
                return tools
            seen.add(cursor)
        return tools


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
