"""
Tests for the routing core: tool names, the aggregated catalog, routing of
C{tools/call}.  The upstreams are a small fake that answers like an upstream
pool, driven synchronously.
"""

from __future__ import annotations

import json
from typing import Any, Optional

import pytest
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from mcp_proxy import jsonrpc
from mcp_proxy.models import STDIO, InstanceConfig, UpstreamConfig
from mcp_proxy.router import MAX_TOOL_NAME, Router, RouteTable, prefixedName
from mcp_proxy.testing import FakeUpstreams


def upstream(configId: str, name: str, tools: set[str]) -> UpstreamConfig:
    return UpstreamConfig(
        configId=configId,
        name=name,
        transportType=STDIO,
        command="x",
        args=(),
        url=None,
        env={},
        authType="NONE",
        toolNames=frozenset(tools),
    )


def instance(*upstreams: UpstreamConfig) -> InstanceConfig:
    return InstanceConfig(
        instanceId="inst",
        organizationId="org",
        toolGroupId="tg",
        toolGroupEnabled=True,
        upstreams=tuple(upstreams),
    )


def tool(name: str, description: Optional[str] = "does things") -> dict[str, Any]:
    t: dict[str, Any] = {"name": name, "inputSchema": {"type": "object"}}
    if description is not None:
        t["description"] = description
    return t


class RouteTableTests(SynchronousTestCase):
    def test_namesKeptWhenUnique(self) -> None:
        """
        Tool names stay as the upstream spells them when no other config
        uses them.
        """
        table = RouteTable.build(
            instance(upstream("c1", "alpha", {"a", "b"}), upstream("c2", "beta", {"c"}))
        )
        self.assertEqual(sorted(table.routes), ["a", "b", "c"])
        self.assertEqual(table.routes["c"].upstream.name, "beta")

    def test_collisionPrefixesLaterConfig(self) -> None:
        """
        When two configs expose the same name, the later one (in config
        order) gets C{<config>__<tool>}.
        """
        table = RouteTable.build(
            instance(upstream("c1", "alpha", {"search"}), upstream("c2", "be ta!", {"search"}))
        )
        self.assertEqual(table.routes["search"].upstream.name, "alpha")
        self.assertEqual(table.routes["be_ta___search"].toolName, "search")
        self.assertEqual(table.exposed["c2"]["search"], "be_ta___search")

    def test_longNamesStableAndBounded(self) -> None:
        """
        A prefixed name is at most 64 characters, and the same input always
        gives the same name.
        """
        name = prefixedName("c" * 50, "t" * 50)
        self.assertLessEqual(len(name), MAX_TOOL_NAME)
        self.assertEqual(name, prefixedName("c" * 50, "t" * 50))
        self.assertNotEqual(name, prefixedName("c" * 50, "t" * 49 + "u"))


class CatalogTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.config = instance(
            upstream("c1", "alpha", {"a", "shared"}),
            upstream("c2", "beta", {"shared", "z"}),
        )
        self.fake = FakeUpstreams(
            {
                "c1": [tool("shared"), tool("a"), tool("not-whitelisted")],
                "c2": [tool("z", None), tool("shared")],
            }
        )
        self.router = Router(callUpstream=self.fake, clock=self.clock, catalogTtl=60)

    def test_aggregate(self) -> None:
        """
        The catalog is the whitelisted tools of every config, in config
        order then name order, descriptions prefixed with the config name.
        """
        catalog = self.successResultOf(self.router.catalog(self.config))
        names = [t["name"] for t in catalog.tools]
        self.assertEqual(names, ["a", "shared", "beta__shared", "z"])
        self.assertEqual(catalog.tools[0]["description"], "[alpha] does things")
        self.assertEqual(catalog.tools[3]["description"], "[beta]")
        self.assertEqual(json.loads(catalog.toolsJson), list(catalog.tools))

    def test_cachedUntilTtl(self) -> None:
        """
        A complete catalog is reused until its time to live passes.
        """
        self.successResultOf(self.router.catalog(self.config))
        self.successResultOf(self.router.catalog(self.config))
        self.assertEqual(len(self.fake.calls), 2)
        self.clock.advance(61)
        self.successResultOf(self.router.catalog(self.config))
        self.assertEqual(len(self.fake.calls), 4)

    def test_failingUpstreamSkippedNotCached(self) -> None:
        """
        A failing upstream is skipped, never fails the whole list, and the
        partial catalog is not cached.
        """
        failures: list[str] = []
        self.router.onUpstreamFailure = failures.append
        self.fake.failing.add("beta")
        catalog = self.successResultOf(self.router.catalog(self.config))
        self.assertEqual([t["name"] for t in catalog.tools], ["a", "shared"])
        self.assertEqual(catalog.failed, ("beta",))
        self.assertEqual(failures, ["beta"])
        self.fake.failing.clear()
        catalog = self.successResultOf(self.router.catalog(self.config))
        self.assertEqual(len(catalog.tools), 4)
        self.flushLoggedErrors()

    def test_paginationFollowed(self) -> None:
        """
        Upstream pages are followed through C{nextCursor}.
        """
        self.fake.tools["c1"] = [tool(f"t{i:03}") for i in range(250)]
        config = instance(upstream("c1", "alpha", {f"t{i:03}" for i in range(250)}))
        self.fake.pageSize = 100
        catalog = self.successResultOf(self.router.catalog(config))
        self.assertEqual(len(catalog.tools), 250)
        self.assertEqual(len(self.fake.calls), 3)

    def test_concurrentListingsShareOne(self) -> None:
        """
        Concurrent requests for a missing catalog share one listing, and
        each gets its own Deferred.
        """
        self.fake.pending = []
        d1 = self.router.catalog(self.config)
        d2 = self.router.catalog(self.config)
        self.assertIsNot(d1, d2)
        self.assertEqual(len(self.fake.pending), 2)
        for d in self.fake.pending:
            d.callback(None)
        self.assertEqual(self.successResultOf(d1), self.successResultOf(d2))
        self.assertEqual(len(self.fake.calls), 2)

    def test_changedConfigRebuilds(self) -> None:
        """
        A different configuration of the instance gets a new catalog.
        """
        self.successResultOf(self.router.catalog(self.config))
        changed = instance(upstream("c1", "alpha", {"a"}))
        catalog = self.successResultOf(self.router.catalog(changed))
        self.assertEqual([t["name"] for t in catalog.tools], ["a"])


class CallToolTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.fake = FakeUpstreams({"c1": [], "c2": []})
        self.router = Router(callUpstream=self.fake, clock=Clock())
        self.config = instance(
            upstream("c1", "alpha", {"shared"}), upstream("c2", "beta", {"shared", "b"})
        )

    def test_routesToOwnerOnly(self) -> None:
        """
        A call goes only to the config that owns the tool, with the
        upstream's own tool name, and without listing tools first.
        """
        self.successResultOf(
            self.router.callTool(self.config, {"name": "beta__shared", "arguments": {"x": 1}})
        )
        self.assertEqual(
            self.fake.calls, [("beta", "tools/call", {"name": "shared", "arguments": {"x": 1}})]
        )

    def test_metaForwarded(self) -> None:
        """
        C{_meta} (the progress token) is forwarded; missing arguments
        become an empty object.
        """
        self.successResultOf(
            self.router.callTool(self.config, {"name": "b", "_meta": {"progressToken": 5}})
        )
        self.assertEqual(
            self.fake.calls[0][2], {"name": "b", "arguments": {}, "_meta": {"progressToken": 5}}
        )

    def test_unknownTool(self) -> None:
        """
        An unknown tool is a -32602 error.
        """
        with pytest.raises(jsonrpc.JsonRpcError) as e:
            self.router.callTool(self.config, {"name": "nope"})
        self.assertEqual(e.value.code, jsonrpc.INVALID_PARAMS)
        self.assertEqual(self.fake.calls, [])

    def test_badArguments(self) -> None:
        """
        Arguments that are not an object are refused.
        """
        with pytest.raises(jsonrpc.JsonRpcError):
            self.router.callTool(self.config, {"name": "b", "arguments": [1]})
