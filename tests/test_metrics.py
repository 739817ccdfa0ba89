"""
Tests for L{mcp_proxy.metrics}.

The end-to-end test builds a proxy from its real parts (a SQLite
repository, memory caches, the authenticator, a session table on a
L{Clock}, the upstream pool running examples/echo_server.py, the router,
the front), talks to it over a loopback port and reads exact counter
values from C{/metrics}.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path
from typing import Any, AsyncIterator, Optional

import pytest
import pytest_twisted
from attrs import define, field
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families
from treq.client import HTTPClient
from treq.testing import StubTreq
from twisted.internet import reactor
from twisted.internet.defer import CancelledError, Deferred, fail, succeed
from twisted.internet.task import Clock, deferLater
from twisted.logger import Logger, LogLevel, globalLogPublisher
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.resource import IResource
from zope.interface.verify import verifyObject

from mcp_proxy.auth import Authenticator, ConfigLoader, RepositoryKeyLookup
from mcp_proxy.cache import MemoryCache
from mcp_proxy.config import DatabaseURL
from mcp_proxy.dispatch import CallContext
from mcp_proxy.httpserver import makeSite
from mcp_proxy.interfaces import ICache, IRepository
from mcp_proxy.keys import displayApiKey, generateApiKey, hashApiKey
from mcp_proxy.metrics import (
    LATENCY_BUCKETS,
    MeteredDispatcher,
    Metrics,
    instrumentFront,
    metricsResource,
    metricsResponse,
    responseOutcome,
    tokenMatches,
)
from mcp_proxy.models import AUTH_API_KEY, STDIO, UpstreamConfig
from mcp_proxy.repository import openRepository
from mcp_proxy.router import Router
from mcp_proxy.session import SessionTable
from mcp_proxy.transport import McpFront
from mcp_proxy.upstream import UpstreamPool, UpstreamTimeout, UpstreamUnavailable

ROOT = Path(__file__).resolve().parent.parent
ECHO = str(ROOT / "examples" / "echo_server.py")
TOKEN = "metrics-token-0123456789"

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: bytes) -> Samples:
    """
    Every sample of a Prometheus text exposition, by name and labels.
    """
    samples: Samples = {}
    for family in text_string_to_metric_families(text.decode("utf-8")):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> Optional[float]:
    return samples.get((name, frozenset(labels.items())))


def scrape(metrics: Metrics) -> Samples:
    body, contentType = metrics.render()
    assert contentType.startswith("text/plain")
    return parse(body)


# -- the request path ---------------------------------------------------------------


def test_observeRequestCountsAndBuckets() -> None:
    """
    Each observation lands in the first bucket whose bound is not below
    it, in the sum, and in the counter of its outcome.
    """
    metrics = Metrics(processCollector=False)
    metrics.observeRequest("tools/call", "STREAMABLE_HTTPS", "ok", 0.0004)
    metrics.observeRequest("tools/call", "STREAMABLE_HTTPS", "ok", 0.0005)
    metrics.observeRequest("tools/call", "STREAMABLE_HTTPS", "error", 0.2)
    metrics.observeRequest("tools/call", "streamable-http", "ok", 31.0)
    samples = scrape(metrics)
    labels = {"method": "tools/call", "transport": "streamable-http"}
    bucket = "mcpproxy_request_duration_seconds_bucket"
    assert value(samples, bucket, le="0.0005", **labels) == 2
    assert value(samples, bucket, le="0.1", **labels) == 2
    assert value(samples, bucket, le="0.25", **labels) == 3
    assert value(samples, bucket, le="30.0", **labels) == 3
    assert value(samples, bucket, le="+Inf", **labels) == 4
    assert value(samples, "mcpproxy_request_duration_seconds_count", **labels) == 4
    assert value(samples, "mcpproxy_request_duration_seconds_sum", **labels) == pytest.approx(
        0.0004 + 0.0005 + 0.2 + 31.0
    )
    assert value(samples, "mcpproxy_requests_total", outcome="ok", status="", **labels) == 3
    assert value(samples, "mcpproxy_requests_total", outcome="error", status="", **labels) == 1
    assert len(LATENCY_BUCKETS) == 15


def test_labelsAreBounded() -> None:
    """
    Method names that are not MCP methods count as C{other}, an unknown
    method as C{none}, an unknown transport as C{other}; the status label
    is set for HTTP errors only, so one label set is one sample.
    """
    metrics = Metrics(processCollector=False)
    for i in range(50):
        metrics.observeRequest(f"made/up/{i}", "SSE", "error", 0.001)
    metrics.observeRequest(None, "STREAMABLE_HTTPS", "http_error", 0.001, 401)
    metrics.observeRequest(None, "STREAMABLE_HTTPS", "http_error", 0.001, 404)
    metrics.observeRequest("ping", "carrier-pigeon", "ok", 0.001)
    metrics.observeRequest("ping", "SSE", "ok", 0.001, 200)
    metrics.observeRequest("ping", "SSE", "ok", 0.001)
    samples = scrape(metrics)
    total = "mcpproxy_requests_total"
    assert value(samples, total, method="other", transport="sse", outcome="error", status="") == 50
    for status in ("401", "404"):
        assert (
            value(
                samples,
                total,
                method="none",
                transport="streamable-http",
                outcome="http_error",
                status=status,
            )
            == 1
        )
    assert value(samples, total, method="ping", transport="other", outcome="ok", status="") == 1
    assert value(samples, total, method="ping", transport="sse", outcome="ok", status="") == 2
    assert len([key for key in samples if key[0] == total]) == 5


def test_badOutcomeAndStatus() -> None:
    metrics = Metrics(processCollector=False)
    with pytest.raises(ValueError):
        metrics.observeRequest("ping", "SSE", "fine", 0.1)
    with pytest.raises(ValueError):
        metrics.observeRequest(None, "SSE", "http_error", 0.1, 999)
    with pytest.raises(ValueError):
        metrics.observeUpstreamCall("echo", "tools/call", "meh", 0.1)


def test_twoProxiesDoNotShare() -> None:
    """
    Each L{Metrics} has its own registry (process metrics included), and
    the global registry is left alone.
    """
    one, two = Metrics(), Metrics()
    one.observeRequest("ping", "SSE", "ok", 0.01)
    assert value(scrape(one), "mcpproxy_requests_total", method="ping", transport="sse",
                 outcome="ok", status="") == 1  # fmt: skip
    assert not any(name.startswith("mcpproxy_requests") for name, _ in scrape(two))
    assert REGISTRY.get_sample_value("mcpproxy_build_info", {"version": "0.1.0"}) is None


def test_processMetrics() -> None:
    """
    The RSS and the open descriptors of this process are exported.
    """
    samples = scrape(Metrics())
    fds = value(samples, "process_open_fds")
    assert fds is not None and fds >= 3
    rss = value(samples, "process_resident_memory_bytes")
    assert rss is not None and rss > 1024 * 1024
    assert value(scrape(Metrics(processCollector=False)), "process_open_fds") is None


@pytest.mark.parametrize(
    "body, outcome",
    [
        (b'{"jsonrpc":"2.0","id":1,"result":{}}', "ok"),
        (b'{"jsonrpc":"2.0","id":1,"error":{"code":-32601,"message":"x"}}', "error"),
        (b'{"jsonrpc":"2.0","id":null,"error":{"code":-32600,"message":"x"}}', "error"),
        (b'{"jsonrpc":"2.0","id":"a\\",\\"error\\":","result":{}}', "ok"),
        (b'{"jsonrpc":"2.0","id":"a\\\\\\",\\"result\\":","error":{}}', "error"),
        (b'{"jsonrpc":"2.0","id":"\xc3\xa9,","result":{"error":1}}', "ok"),
        (b'{"jsonrpc":"2.0","id":"x,","error":{"message":",\\"result\\":"}}', "error"),
        (b'{"jsonrpc":"2.0","id":"\\\\","result":1}', "ok"),
        (b'{"jsonrpc":"2.0","id":"unterminated', "error"),
        (b"", "error"),
        (b"[]", "error"),
    ],
)
def test_responseOutcome(body: bytes, outcome: str) -> None:
    """
    The outcome of an encoded response is read from the member after the
    id, whatever the id or the result contain.
    """
    if body.startswith(b'{"') and not body.endswith(b"unterminated"):
        json.loads(body)
    assert responseOutcome(body) == outcome


def test_responseOutcomeOfEncodedResponses() -> None:
    from mcp_proxy import jsonrpc

    for requestId in (0, -7, 10**20, "x", 'q","error":{', "\\", '\\"', "é,", ',"', None):
        assert responseOutcome(jsonrpc.encode(jsonrpc.response(requestId, {"error": 1}))) == "ok"
        raw = jsonrpc.encodeResponseRaw(requestId, jsonrpc.RawJSON(b'{"tools":[]}'))
        assert responseOutcome(raw) == "ok"
        encoded = jsonrpc.encode(jsonrpc.errorResponse(requestId, -32000, "result"))
        assert responseOutcome(encoded) == "error"


def test_upstreamCallOutcomes() -> None:
    """
    L{Metrics.instrumentUpstreamCall} times each call on the timer and
    tells ok, error, timeout and cancelled apart; results and failures
    pass through.
    """
    clock = Clock()
    metrics = Metrics(timer=clock.seconds, processCollector=False)
    pending: list[Deferred[Any]] = []

    def call(instanceId: str, config: UpstreamConfig, method: str, params: Any, timeout: float):
        d: Deferred[Any] = Deferred()
        pending.append(d)
        return d

    timed = metrics.instrumentUpstreamCall(call)
    config = upstreamConfig("github")
    results: list[Any] = []
    for _ in range(4):
        timed("i", config, "tools/call", {}, 5.0).addBoth(results.append)
    clock.advance(0.2)
    pending[0].callback({"content": []})
    pending[1].errback(UpstreamUnavailable("down"))
    pending[2].errback(UpstreamTimeout("slow"))
    pending[3].cancel()
    assert results[0] == {"content": []}
    assert results[1].check(UpstreamUnavailable)
    assert results[2].check(UpstreamTimeout)
    assert results[3].check(CancelledError)
    for failure in results[1:]:
        failure.trap(Exception)
    samples = scrape(metrics)
    labels = {"upstream": "github", "method": "tools/call"}
    for outcome in ("ok", "error", "timeout", "cancelled"):
        assert value(samples, "mcpproxy_upstream_calls_total", outcome=outcome, **labels) == 1
    assert value(samples, "mcpproxy_upstream_call_duration_seconds_count", **labels) == 4
    assert value(samples, "mcpproxy_upstream_call_duration_seconds_bucket", le="0.1",
                 **labels) == 0  # fmt: skip
    assert value(samples, "mcpproxy_upstream_call_duration_seconds_bucket", le="0.25",
                 **labels) == 4  # fmt: skip


def test_meteredDispatcherTimesEachAnswer() -> None:
    """
    An answer given at once and one given later are both timed, from the
    call to the answer, and counted by their outcome.
    """
    clock = Clock()
    metrics = Metrics(timer=clock.seconds, processCollector=False)
    loads: list[Deferred[Any]] = []

    def loadConfig(instanceId: str) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        loads.append(d)
        return d

    dispatcher = MeteredDispatcher(
        loadConfig=loadConfig,
        router=Router(callUpstream=lambda *a: fail(AssertionError()), clock=clock),
        metrics=metrics,
    )
    ctx = CallContext("i", "o", "k", None, "SSE")
    answers: list[bytes] = []
    dispatcher.handle(ctx, {"jsonrpc": "2.0", "id": 1, "method": "ping"}).addCallback(
        answers.append
    )
    dispatcher.handle(ctx, {"jsonrpc": "2.0", "id": 2, "method": "tools/list"}).addCallback(
        answers.append
    )
    clock.advance(0.3)
    loads[0].callback(None)
    assert [json.loads(a)["id"] for a in answers] == [1, 2]
    assert "error" in json.loads(answers[1])
    samples = scrape(metrics)
    total = "mcpproxy_requests_total"
    assert value(samples, total, method="ping", transport="sse", outcome="ok", status="") == 1
    assert (
        value(samples, total, method="tools/list", transport="sse", outcome="error", status="") == 1
    )
    bucket = "mcpproxy_request_duration_seconds_bucket"
    assert value(samples, bucket, le="0.0005", method="ping", transport="sse") == 1
    assert value(samples, bucket, le="0.25", method="tools/list", transport="sse") == 0
    assert value(samples, bucket, le="0.5", method="tools/list", transport="sse") == 1
    assert value(
        samples, "mcpproxy_request_duration_seconds_sum", method="tools/list", transport="sse"
    ) == pytest.approx(0.3)


def test_meteredDispatcherWithoutMetrics() -> None:
    """
    With no L{Metrics}, the dispatcher answers as the plain one does.
    """
    dispatcher = MeteredDispatcher(
        loadConfig=lambda instanceId: succeed(None),
        router=Router(callUpstream=lambda *a: fail(AssertionError()), clock=Clock()),
    )
    ctx = CallContext("i", "o", "k", None, "SSE")
    result: list[bytes] = []
    dispatcher.handle(ctx, {"jsonrpc": "2.0", "id": 3, "method": "ping"}).addCallback(result.append)
    assert json.loads(result[0]) == {"jsonrpc": "2.0", "id": 3, "result": {}}


# -- sources ------------------------------------------------------------------------


@define
class RequestLogCounters:
    """
    The counters of a request log, as L{mcp_proxy.requestlog} keeps them.
    """

    queued: int = 0
    written: int = 0
    dropped: int = 0
    failedWrites: int = 0
    waiting: list[int] = field(factory=list)

    @property
    def queueDepth(self) -> int:
        return len(self.waiting)


def test_requestLogCounters() -> None:
    metrics = Metrics(processCollector=False)
    assert value(scrape(metrics), "mcpproxy_requestlog_queue_depth") is None
    requestLog = RequestLogCounters(queued=12, written=7, dropped=2, failedWrites=1, waiting=[1, 2])
    metrics.watch(requestLog=requestLog)
    samples = scrape(metrics)
    assert value(samples, "mcpproxy_requestlog_queue_depth") == 2
    assert value(samples, "mcpproxy_requestlog_queued_total") == 12
    assert value(samples, "mcpproxy_requestlog_written_total") == 7
    assert value(samples, "mcpproxy_requestlog_dropped_total") == 2
    assert value(samples, "mcpproxy_requestlog_failed_writes_total") == 1
    requestLog.written += 3
    assert value(scrape(metrics), "mcpproxy_requestlog_written_total") == 10


def test_cacheEvictionsAndSessions() -> None:
    """
    Cache counters and open sessions are read from the real objects at
    scrape time.
    """
    clock = Clock()
    cache = MemoryCache(clock=clock, maxSize=2, defaultTtl=10)
    verifyObject(ICache, cache)
    sessions = SessionTable(clock=clock, timeout=60)
    metrics = Metrics(processCollector=False)
    metrics.watch(authCache=cache, sessions=sessions)
    for key in ("a", "b", "c"):
        cache.set(key, 1)
    cache.get("c")
    cache.get("a")
    clock.advance(11)
    cache.get("b")
    sessions.create("streamable-http", "i", "k")
    sessions.create("streamable-http", "i", "k")
    sse = sessions.create("sse", "i", "k")
    sessions.close(sse.id)
    samples = scrape(metrics)
    assert value(samples, "mcpproxy_cache_sets_total", cache="auth") == 3
    assert value(samples, "mcpproxy_cache_evictions_total", cache="auth") == 1
    assert value(samples, "mcpproxy_cache_hits_total", cache="auth") == 1
    assert value(samples, "mcpproxy_cache_misses_total", cache="auth") == 2
    assert value(samples, "mcpproxy_cache_expirations_total", cache="auth") == 1
    assert value(samples, "mcpproxy_cache_entries", cache="auth") == 1
    assert value(samples, "mcpproxy_sessions_open", transport="streamable-http") == 2
    assert value(samples, "mcpproxy_sessions_open", transport="sse") == 0
    assert value(samples, "mcpproxy_sessions_created_total") == 3
    assert value(samples, "mcpproxy_sessions_closed_total") == 1


def test_failingSourceIsLeftOut() -> None:
    """
    A source that raises is logged and left out; the rest of the scrape
    is served and the failure is counted.
    """

    @define
    class BrokenPool:
        counters: dict[str, dict[str, int]] = field(factory=dict)

        def health(self) -> list[dict[str, Any]]:
            raise RuntimeError("broken")

    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    try:
        metrics = Metrics(processCollector=False)
        metrics.watch(pool=BrokenPool(), sessions=SessionTable(clock=Clock()))
        samples = scrape(metrics)
    finally:
        globalLogPublisher.removeObserver(events.append)
    assert value(samples, "mcpproxy_metrics_collect_errors_total", source="pool") == 1
    assert value(samples, "mcpproxy_sessions_open", transport="sse") == 0
    assert value(samples, "mcpproxy_upstream_running", upstream="x") is None
    failures = [e for e in events if e.get("log_failure") is not None]
    assert [e["source"] for e in failures] == ["pool"]
    failures[0]["log_failure"].trap(RuntimeError)


# -- access -------------------------------------------------------------------------


def test_tokenMatches() -> None:
    assert tokenMatches(None, None)
    assert tokenMatches("", "anything")
    assert tokenMatches(TOKEN, f"Bearer {TOKEN}")
    assert tokenMatches(TOKEN, f"bearer  {TOKEN} ")
    assert not tokenMatches(TOKEN, None)
    assert not tokenMatches(TOKEN, TOKEN)
    assert not tokenMatches(TOKEN, f"Basic {TOKEN}")
    assert not tokenMatches(TOKEN, f"Bearer {TOKEN}x")
    assert not tokenMatches(TOKEN, "Bearer ")
    assert not tokenMatches(TOKEN, "Bearer é")


def test_metricsResponse() -> None:
    metrics = Metrics(processCollector=False)
    status, headers, body = metricsResponse(metrics, TOKEN, None)
    assert status == 401
    assert ("WWW-Authenticate", 'Bearer realm="metrics"') in headers
    assert b"mcpproxy" not in body
    status, headers, body = metricsResponse(metrics, TOKEN, f"Bearer {TOKEN}")
    assert status == 200
    assert dict(headers)["Content-Type"].startswith("text/plain; version=")
    assert b"mcpproxy_build_info" in body


@pytest_twisted.ensureDeferred
async def test_metricsResource() -> None:
    """
    The resource of a separate endpoint: 401 without the token, 200 with
    it, 404 elsewhere, 405 for other methods.
    """
    metrics = Metrics(processCollector=False)
    resource = metricsResource(metrics, TOKEN)
    verifyObject(IResource, resource)
    stub = StubTreq(resource)
    response = await stub.get("http://metrics.test/metrics")
    assert response.code == 401
    assert response.headers.getRawHeaders("www-authenticate") == ['Bearer realm="metrics"']
    await response.content()
    response = await stub.get(
        "http://metrics.test/metrics", headers={"Authorization": "Bearer wrong"}
    )
    assert response.code == 401
    await response.content()
    response = await stub.get(
        "http://metrics.test/metrics", headers={"Authorization": f"Bearer {TOKEN}"}
    )
    assert response.code == 200
    assert b"# TYPE mcpproxy_requests_total counter" in await response.content()
    response = await stub.get("http://metrics.test/other")
    assert response.code == 404
    await response.content()
    response = await stub.post(
        "http://metrics.test/metrics", headers={"Authorization": f"Bearer {TOKEN}"}
    )
    assert response.code == 405
    await response.content()
    open_ = StubTreq(metricsResource(metrics))
    response = await open_.get("http://metrics.test/metrics")
    assert response.code == 200
    await response.content()


# -- a whole proxy ---------------------------------------------------------------------


def upstreamConfig(name: str) -> UpstreamConfig:
    return UpstreamConfig(
        configId="c-" + name,
        name=name,
        transportType=STDIO,
        command=sys.executable,
        args=(ECHO,),
        url=None,
        env={},
        authType="NONE",
        toolNames=frozenset({"echo"}),
    )


async def makeData(repo: IRepository) -> tuple[str, str]:
    """
    An instance whose tool group has the echo server's tools, and a key.
    """
    org = await repo.createOrganization("org")
    server = await repo.createServer(
        "echo", STDIO, sys.executable, [ECHO], None, [], "NONE", org.id
    )
    config = await repo.createConfig(server.id, "echo", "", {}, org.id)
    await repo.syncTools(
        server.id,
        [("echo", "Return the text.", {"type": "object"}), ("add", "Add.", {"type": "object"})],
    )
    group = await repo.createToolGroup(org.id, "all", "", [(config.id, "echo"), (config.id, "add")])
    instance = await repo.createInstance(org.id, "demo", "", group.id, AUTH_API_KEY)
    key = generateApiKey()
    await repo.createApiKey(instance.id, "test", hashApiKey(key), displayApiKey(key), None)
    return key, instance.id


@define
class Stack:
    metrics: Metrics
    repository: IRepository
    pool: UpstreamPool
    sessions: SessionTable
    base: str
    key: str
    instanceId: str
    http: Any
    requestEvents: list[dict[str, Any]]

    async def post(
        self, body: Any, key: Optional[str] = None, headers: Optional[dict[str, str]] = None
    ) -> tuple[int, Any, Any]:
        response = await self.http.post(
            f"{self.base}/mcp/{self.instanceId}",
            data=json.dumps(body).encode(),
            headers={
                "X-API-Key": key or self.key,
                "Content-Type": "application/json",
                "Accept": "application/json, text/event-stream",
                **(headers or {}),
            },
        )
        content = await response.content()
        return response.code, json.loads(content) if content else None, response.headers

    async def rpc(self, method: str, params: Optional[dict[str, Any]] = None) -> Any:
        message: dict[str, Any] = {"jsonrpc": "2.0", "id": 1, "method": method}
        if params is not None:
            message["params"] = params
        code, body, _ = await self.post(message)
        assert code == 200, body
        return body

    async def scrape(self, token: Optional[str] = TOKEN) -> tuple[int, bytes]:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        response = await self.http.get(f"{self.base}/metrics", headers=headers)
        return response.code, await response.content()


@pytest_twisted.async_yield_fixture
async def stack(tmp_path: Path) -> AsyncIterator[Stack]:
    repository = openRepository(
        DatabaseURL(kind="sqlite", path=str(tmp_path / "metrics.sqlite3")), reactor=reactor
    )
    await repository.start()
    key, instanceId = await makeData(repository)
    clock = Clock()
    lookup = RepositoryKeyLookup(repository)
    # Room for one key only: a second key evicts the first.
    authCache = MemoryCache(clock=clock, maxSize=1, defaultTtl=300)
    configCache = MemoryCache(clock=clock, maxSize=10, defaultTtl=300)
    authenticator = Authenticator(lookup=lookup, cache=authCache, clock=clock)
    configs = ConfigLoader(lookup=lookup, cache=configCache)
    sessions = SessionTable(clock=clock, timeout=600)
    pool = UpstreamPool(reactor=reactor)
    metrics = Metrics()
    router = Router(
        callUpstream=metrics.instrumentUpstreamCall(pool.call), clock=clock, timeout=20.0
    )
    dispatcher = MeteredDispatcher(loadConfig=configs.load, router=router, metrics=metrics)
    front = McpFront(
        authenticator=authenticator,
        dispatcher=dispatcher,
        sessions=sessions,
        clock=clock,
        healthCheck=lambda: succeed((200, {"status": "ok"})),
    )
    metrics.watch(
        repository=repository,
        authenticator=authenticator,
        configLoader=configs,
        authCache=authCache,
        configCache=configCache,
        sessions=sessions,
        pool=pool,
    )
    requestEvents: list[dict[str, Any]] = []
    requestLog = Logger(namespace="mcp_proxy.requests", observer=requestEvents.append)
    site = makeSite(
        instrumentFront(front.resource(), metrics, TOKEN, requestLog=requestLog), 1024 * 1024
    )
    port = reactor.listenTCP(0, site, interface="127.0.0.1")
    pool.start()
    connections = HTTPConnectionPool(reactor, persistent=False)
    http = HTTPClient(Agent(reactor, pool=connections))
    try:
        yield Stack(
            metrics,
            repository,
            pool,
            sessions,
            f"http://127.0.0.1:{port.getHost().port}",
            key,
            instanceId,
            http,
            requestEvents,
        )
    finally:
        await port.stopListening()
        front.closeStreams()
        await pool.stop()
        await connections.closeCachedConnections()
        await repository.stop()


@pytest_twisted.ensureDeferred
async def test_wholeProxy(stack: Stack) -> None:
    """
    After real requests, C{/metrics} shows exactly what happened: requests
    by method and outcome, HTTP errors by status, the caches, the
    database queries, the session, the upstream and its calls.
    """
    verifyObject(IRepository, stack.repository)
    code, body, headers = await stack.post(
        {
            "jsonrpc": "2.0",
            "id": 0,
            "method": "initialize",
            "params": {"protocolVersion": "2025-03-26", "capabilities": {}, "clientInfo": {}},
        }
    )
    assert code == 200, body
    assert headers.getRawHeaders("mcp-session-id")
    [requestId] = headers.getRawHeaders("x-request-id")
    assert len(requestId) == 16
    # What initialize did to the configurations and the database depends
    # on what the front announces; from here on, deltas are exact.
    code, text = await stack.scrape()
    before = parse(text)
    queriesBefore = dict(stack.repository.queryCounts)

    def delta(name: str, **labels: str) -> float:
        after = value(samples, name, **labels)
        assert after is not None, (name, labels)
        return after - (value(before, name, **labels) or 0)

    listed = await stack.rpc("tools/list")
    assert sorted(t["name"] for t in listed["result"]["tools"]) == ["add", "echo"]
    for word in ("one", "two"):
        called = await stack.rpc("tools/call", {"name": "echo", "arguments": {"text": word}})
        assert called["result"]["content"][0]["text"] == word
    code, body, headers = await stack.post(
        {"jsonrpc": "2.0", "id": 1, "method": "ping"}, headers={"X-Request-Id": "trace-42"}
    )
    assert code == 200 and "result" in body
    assert headers.getRawHeaders("x-request-id") == ["trace-42"]
    assert "error" in await stack.rpc("made/up")
    assert "error" in await stack.rpc("tools/call", {"name": "nope", "arguments": {}})
    code, body, _ = await stack.post(
        {"jsonrpc": "2.0", "id": 1, "method": "ping"}, key="mcpp_not_a_valid_key_000000000000000"
    )
    assert code == 401

    # One debug event per request, with its id, status and duration.
    events = stack.requestEvents
    assert [e["status"] for e in events] == [200] * 7 + [401]
    assert all(e["log_level"] == LogLevel.debug for e in events)
    assert all(e["transport"] == "streamable-http" for e in events)
    assert all(e["duration"] >= 0 for e in events)
    assert events[0]["requestId"] == requestId
    assert events[4]["requestId"] == "trace-42"
    assert len({e["requestId"] for e in events}) == 8

    code, _ = await stack.scrape(token=None)
    assert code == 401
    code, _ = await stack.scrape(token="wrong")
    assert code == 401
    code, text = await stack.scrape()
    assert code == 200
    samples = parse(text)

    def requests(method: str, outcome: str, status: str = "") -> Optional[float]:
        return value(
            samples,
            "mcpproxy_requests_total",
            method=method,
            transport="streamable-http",
            outcome=outcome,
            status=status,
        )

    assert requests("initialize", "ok") == 1
    assert requests("tools/list", "ok") == 1
    assert requests("tools/call", "ok") == 2
    assert requests("tools/call", "error") == 1
    assert requests("ping", "ok") == 1
    assert requests("other", "error") == 1
    assert requests("none", "http_error", "401") == 1
    assert len([k for k in samples if k[0] == "mcpproxy_requests_total"]) == 7
    assert (
        value(
            samples,
            "mcpproxy_request_duration_seconds_count",
            method="tools/call",
            transport="streamable-http",
        )
        == 3
    )

    # Authentication: the first request looked the key up, the next six
    # were cache hits (served by the copy the authenticator keeps in the
    # process, so the cache itself was not read), the bad key was looked
    # up, refused, and its negative entry evicted the good key's.
    assert value(samples, "mcpproxy_auth_requests_total") == 8
    assert value(samples, "mcpproxy_auth_cache_hits_total") == 6
    assert value(samples, "mcpproxy_auth_db_lookups_total") == 2
    assert value(samples, "mcpproxy_auth_refused_total") == 1
    assert value(samples, "mcpproxy_cache_hits_total", cache="auth") == 0
    assert value(samples, "mcpproxy_cache_misses_total", cache="auth") == 2
    assert value(samples, "mcpproxy_cache_sets_total", cache="auth") == 2
    assert value(samples, "mcpproxy_cache_evictions_total", cache="auth") == 1
    # Configurations: tools/list and the three tools/call load one (ping
    # and unknown methods do not), from the database once.
    configLoaded = value(before, "mcpproxy_config_db_lookups_total") == 1
    assert delta("mcpproxy_config_requests_total") == 4
    assert delta("mcpproxy_config_db_lookups_total") == (0 if configLoaded else 1)
    assert delta("mcpproxy_config_cache_hits_total") == (4 if configLoaded else 3)
    assert delta("mcpproxy_cache_misses_total", cache="config") == (0 if configLoaded else 1)
    assert delta("mcpproxy_cache_hits_total", cache="config") == (4 if configLoaded else 3)
    assert value(samples, "mcpproxy_cache_evictions_total", cache="config") == 0
    # The database: the bad key's lookup, and the config load when
    # initialize did not load it; the same in the exposition.
    queries = stack.repository.queryCounts
    assert queries["lookupApiKey"] - queriesBefore["lookupApiKey"] == 1
    assert delta("mcpproxy_db_queries_total", kind="lookupApiKey") == 1
    assert delta("mcpproxy_db_queries_total", kind="loadInstanceConfig") == (
        0 if configLoaded else 1
    )
    for kind, count in queries.items():
        # The touch of lastUsedAt may land between the scrape and now.
        if kind != "touchApiKey":
            assert value(samples, "mcpproxy_db_queries_total", kind=kind) == count
    # The session of initialize.
    assert value(samples, "mcpproxy_sessions_open", transport="streamable-http") == 1
    assert value(samples, "mcpproxy_sessions_open", transport="sse") == 0
    assert value(samples, "mcpproxy_sessions_created_total") == 1
    # The upstream: one process, started once; one tools/list and two
    # tools/call went to it (the unknown tool did not).
    assert value(samples, "mcpproxy_upstream_running", upstream="echo") == 1
    assert value(samples, "mcpproxy_upstream_in_flight", upstream="echo") == 0
    assert value(samples, "mcpproxy_upstream_starts_total", upstream="echo") == 1
    assert value(samples, "mcpproxy_upstream_restarts_total", upstream="echo") == 0
    assert value(samples, "mcpproxy_upstream_failures_total", upstream="echo") == 0
    calls = "mcpproxy_upstream_calls_total"
    assert value(samples, calls, upstream="echo", method="tools/list", outcome="ok") == 1
    assert value(samples, calls, upstream="echo", method="tools/call", outcome="ok") == 2
    assert (
        value(
            samples,
            "mcpproxy_upstream_call_duration_seconds_count",
            upstream="echo",
            method="tools/call",
        )
        == 2
    )
    fds = value(samples, "process_open_fds")
    assert fds is not None and fds > 0
    assert value(samples, "mcpproxy_metrics_collect_errors_total", source="pool") is None

    # A crash of the upstream, and its restart on the next call.
    [pid] = [pid for entry in stack.pool.health() for pid in entry["pids"]]
    os.kill(pid, signal.SIGKILL)
    for _ in range(200):
        if stack.pool.counters["echo"]["failures"]:
            break
        await deferLater(reactor, 0.05)
    called = await stack.rpc("tools/call", {"name": "echo", "arguments": {"text": "again"}})
    assert called["result"]["content"][0]["text"] == "again"
    code, text = await stack.scrape()
    samples = parse(text)
    assert value(samples, "mcpproxy_upstream_failures_total", upstream="echo") == 1
    assert value(samples, "mcpproxy_upstream_restarts_total", upstream="echo") == 1
    assert value(samples, "mcpproxy_upstream_starts_total", upstream="echo") == 2
    assert value(samples, "mcpproxy_upstream_running", upstream="echo") == 1
    assert value(samples, calls, upstream="echo", method="tools/call", outcome="ok") == 3
    assert requests("tools/call", "ok") == 3
