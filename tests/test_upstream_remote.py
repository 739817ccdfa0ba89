"""
Tests for the remote upstreams (L{mcp_proxy.upstream.http},
L{mcp_proxy.upstream.sse}) and their parts: real MCP servers (the official
SDK's FastMCP) in subprocesses on loopback ports, and a small twisted.web
server in the test's reactor for what FastMCP will not do on purpose.
"""

from __future__ import annotations

import inspect
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable, Optional

import attrs
import pytest
import pytest_twisted
import upstreamhelpers
from servers.remote_fake import FakeMcp
from twisted.internet import reactor
from twisted.internet.defer import CancelledError, Deferred, gatherResults
from twisted.internet.task import Clock, deferLater
from upstreamhelpers import SERVERS, Started, callTool, within
from zope.interface.verify import verifyObject

from mcp_proxy.interfaces import IUpstream
from mcp_proxy.models import SSE, STREAMABLE_HTTPS, UpstreamConfig
from mcp_proxy.upstream import (
    UpstreamError,
    UpstreamPool,
    UpstreamTimeout,
    UpstreamUnavailable,
    discoverTools,
)
from mcp_proxy.upstream._sseparse import EventStreamParser, EventTooLarge, ServerSentEvent
from mcp_proxy.upstream.headers import upstreamHeaders
from mcp_proxy.upstream.http import (
    RemoteUpstream,
    StreamableHttpUpstream,
    _Pending,
    checkUrl,
    httpFactory,
)
from mcp_proxy.upstream.sse import SseUpstream, resolveEndpoint, sseFactory

FASTMCP = str(SERVERS / "remote_fastmcp.py")

# The FastMCP servers: Streamable HTTP answering with JSON or with event
# streams, and legacy SSE.
KINDS = {
    "http-json": (STREAMABLE_HTTPS, ["streamable-http", "--json"], "/mcp"),
    "http-sse": (STREAMABLE_HTTPS, ["streamable-http"], "/mcp"),
    "sse": (SSE, ["sse"], "/sse"),
}


def makeConfig(
    url: Optional[str],
    transportType: str = STREAMABLE_HTTPS,
    env: Optional[dict[str, str]] = None,
    name: str = "remote",
) -> UpstreamConfig:
    return upstreamhelpers.makeConfig(
        command=None, url=url, transportType=transportType, env=env, name=name
    )


async def eventually(check: Callable[[], Any], seconds: float = 10) -> Any:
    """
    Poll C{check} on the reactor until it returns something true.
    """
    deadline = time.monotonic() + seconds
    while True:
        value = check()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await deferLater(reactor, 0.02)


def freePort() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """
    A FastMCP server in its own process group on a free loopback port,
    waited for until the port accepts.
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.transportType, args, path = KINDS[kind]
        self.port = freePort()
        self.url = f"http://127.0.0.1:{self.port}{path}"
        self.stderr = tempfile.TemporaryFile()
        self.process = subprocess.Popen(
            [sys.executable, FASTMCP, args[0], str(self.port), *args[1:]],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=self.stderr,
            start_new_session=True,
        )
        deadline = time.monotonic() + 30
        while True:
            if self.process.poll() is not None:
                self.stderr.seek(0)
                raise RuntimeError(f"{kind} server exited: {self.stderr.read()[-2000:]!r}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                if time.monotonic() > deadline:
                    self.kill()
                    raise RuntimeError(f"{kind} server did not listen in time")
                time.sleep(0.05)

    def config(self, **kw: Any) -> UpstreamConfig:
        return makeConfig(self.url, self.transportType, **kw)

    def kill(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()
        self.stderr.close()


@pytest.fixture(scope="module")
def servers():
    """
    The FastMCP servers of this module, started on first use.
    """
    running: dict[str, ServerProcess] = {}

    def get(kind: str) -> ServerProcess:
        if kind not in running:
            running[kind] = ServerProcess(kind)
        return running[kind]

    yield get
    for server in running.values():
        server.kill()


@pytest.fixture
def ownServer():
    """
    FastMCP servers of one test (to be killed by it).
    """
    made: list[ServerProcess] = []

    def make(kind: str) -> ServerProcess:
        made.append(ServerProcess(kind))
        return made[-1]

    yield make
    for server in made:
        server.kill()


def assertClean(upstream: RemoteUpstream) -> None:
    """
    Nothing of an ended upstream is left: no HTTP operation, no timer, no
    pooled connection.
    """
    assert upstream.state == "ended"
    assert not upstream.alive
    assert upstream._ops == set()
    assert upstream._timers == set()
    assert upstream._connectionPool._connections == {}


@pytest_twisted.async_yield_fixture
async def connect():
    """
    Start remote upstreams; stop them all after the test.
    """

    def make(reactor: Any, config: UpstreamConfig, **kw: Any) -> RemoteUpstream:
        cls = SseUpstream if config.transportType == SSE else StreamableHttpUpstream
        return cls(reactor, config, **kw)

    started = Started(make)
    yield started
    for upstream in await started.stopAll():
        assertClean(upstream)


@pytest_twisted.async_yield_fixture
async def fake():
    """
    The twisted.web fake server, listening on a loopback port.
    """
    server = FakeMcp()
    server.port = reactor.listenTCP(0, server.site(), interface="127.0.0.1")
    yield server
    server.closeStreams()
    await server.port.stopListening()


def textOf(result: dict[str, Any]) -> str:
    return result["content"][0]["text"]


# -- the event stream parser -------------------------------------------------------


class TestEventStreamParser:
    def feedAll(self, parser: EventStreamParser, *chunks: bytes) -> list[ServerSentEvent]:
        events: list[ServerSentEvent] = []
        for chunk in chunks:
            events += parser.feed(chunk)
        return events

    def test_lineEnds(self) -> None:
        """LF, CRLF and CR end lines, also when a CRLF is split between reads."""
        parser = EventStreamParser(1000)
        events = self.feedAll(
            parser, b"data: a\r", b"\ndata: b\r\r", b"event: e\ndata:c\n", b"\n", b"data: d\r\n\r\n"
        )
        assert events == [
            ServerSentEvent("message", "a\nb"),
            ServerSentEvent("e", "c"),
            ServerSentEvent("message", "d"),
        ]

    def test_byteByByte(self) -> None:
        """The same events come out when every byte is a read of its own."""
        stream = b"\xef\xbb\xbf: hi\r\nevent: endpoint\r\ndata: /m?x=1\r\n\r\nid: 7\ndata: {}\n\n"
        parser = EventStreamParser(1000)
        events = self.feedAll(parser, *[stream[i : i + 1] for i in range(len(stream))])
        assert events == [
            ServerSentEvent("endpoint", "/m?x=1"),
            ServerSentEvent("message", "{}", "7"),
        ]

    def test_fields(self) -> None:
        """
        Comments and events without data lines are skipped, one space after
        the colon is dropped, retry and id are kept.
        """
        parser = EventStreamParser(1000)
        events = parser.feed(
            b": keep-alive\n\nid: 3\nevent: e\n\ndata:\n\nretry: 1500\nretry: x\ndata:  two\nunknown: u\n\n"
        )
        assert events == [
            ServerSentEvent("message", "", "3"),
            ServerSentEvent("message", " two", "3"),
        ]
        assert parser.retry == 1500 and parser.lastEventId == "3"

    def test_tooLarge(self) -> None:
        """A line or an event past the limit raises, keeping the events before it."""
        parser = EventStreamParser(10)
        with pytest.raises(EventTooLarge) as e:
            parser.feed(b"data: ok\n\ndata: 0123456789")
        assert e.value.events == [ServerSentEvent("message", "ok")]
        parser = EventStreamParser(10)
        with pytest.raises(EventTooLarge):
            parser.feed(b"data: 1234\ndata: 5678\n")

    def test_largeEventFast(self) -> None:
        """A 20 MiB event fed in 8 KiB reads is parsed in linear time."""
        data = b"data: " + b"x" * (20 * 1024 * 1024) + b"\n\n"
        parser = EventStreamParser(64 * 1024 * 1024)
        started = time.perf_counter()
        events = self.feedAll(parser, *[data[i : i + 8192] for i in range(0, len(data), 8192)])
        assert len(events) == 1 and len(events[0].data) == 20 * 1024 * 1024
        assert time.perf_counter() - started < 5


# -- headers, URLs, endpoints ------------------------------------------------------------


def test_headerMapping() -> None:
    """Env entries become headers as the origin meant; other entries are not headers."""
    env = {
        "API_KEY": "k1",
        "BEARER_TOKEN": "tok",
        "HEADER_X_FOO": "foo",
        "X-DeepL-API-Key": "deepl",
        "NODE_ENV": "production",
        "EMPTY-ONE": "",
    }
    assert upstreamHeaders(makeConfig("http://h/", env=env)) == {
        "X-API-Key": "k1",
        "Authorization": "Bearer tok",
        "X-Foo": "foo",
        "X-DeepL-API-Key": "deepl",
    }
    assert upstreamHeaders(makeConfig("http://h/", env={"AUTHORIZATION": "Basic eA=="})) == {
        "Authorization": "Basic eA=="
    }
    same = {"API_KEY": "k", "X_API_KEY": "k", "AUTHORIZATION_TOKEN": "t"}
    assert upstreamHeaders(makeConfig("http://h/", env=same)) == {
        "X-API-Key": "k",
        "Authorization": "Bearer t",
    }
    assert upstreamHeaders(makeConfig("http://h/")) == {}


@pytest.mark.parametrize(
    "env, match",
    [
        ({"API_KEY": "sec\r\nret"}, "'API_KEY' contains a line break or NUL"),
        ({"X-Token": "sec\x00ret"}, "'X-Token' contains a line break or NUL"),
        ({"HEADER_HOST": "secret"}, "header Host, which the proxy sets itself"),
        ({"Mcp-Session-Id": "secret"}, "header Mcp-Session-Id, which the proxy sets itself"),
        ({"API_KEY": "secret1", "X_API_KEY": "secret2"}, "different values"),
        ({"BEARER_TOKEN": "secret", "AUTHORIZATION": "secret"}, "different values"),
        ({"HEADER_": "secret"}, "does not name a valid header"),
        ({"HEADER_X__Y": "secret"}, "does not name a valid header"),
        ({"Bad Name-X": "secret"}, "is not a valid header name"),
    ],
)
def test_headerRefused(env: dict[str, str], match: str) -> None:
    """Bad entries are refused with a message that names the entry, never its value."""
    with pytest.raises(UpstreamError, match=match) as e:
        upstreamHeaders(makeConfig("http://h/", env=env))
    assert "secret" not in e.value.message and "sec" not in e.value.message.split("'")[0]


def test_checkUrl() -> None:
    """Only http(s) URLs with a host and without credentials are used; messages hide them."""
    assert checkUrl("n", "https://example.com/mcp?k=1") == "https://example.com/mcp?k=1"
    for url, match in [
        (None, "has no URL"),
        ("ftp://example.com/", "must be http or https"),
        ("http:///path", "must be http or https"),
        ("http://user:secret@example.com/", "must not contain credentials"),
        ("http://example.com:99999/", "invalid URL"),
    ]:
        with pytest.raises(UpstreamUnavailable, match=match) as e:
            checkUrl("n", url)
        assert "secret" not in e.value.message


def test_resolveEndpoint() -> None:
    """Both SDKs' endpoint shapes resolve against the SSE URL, on its origin only."""
    sse = "http://127.0.0.1:8000/sse"
    assert resolveEndpoint(sse, "/messages/?session_id=ab12") == (
        "http://127.0.0.1:8000/messages/?session_id=ab12"
    )
    assert resolveEndpoint(sse, " /message?sessionId=e461 ") == (
        "http://127.0.0.1:8000/message?sessionId=e461"
    )
    assert resolveEndpoint("https://h.example/base/sse", "msg?s=1#frag") == (
        "https://h.example/base/msg?s=1"
    )
    assert (
        resolveEndpoint("http://H.example/sse", "http://h.example:80/m") == "http://h.example:80/m"
    )
    for data in [
        "//evil.example/messages",
        "http://localhost:8000/messages",
        "http://127.0.0.1:8001/messages",
        "https://127.0.0.1:8000/messages",
        "http://user:pw@127.0.0.1:8000/messages",
        "/messages with space",
        "",
    ]:
        with pytest.raises(ValueError):
            resolveEndpoint(sse, data)


# -- against FastMCP -------------------------------------------------------------------------

ALL_KINDS = pytest.mark.parametrize("kind", ["http-json", "http-sse", "sse"])
STREAMING_KINDS = pytest.mark.parametrize("kind", ["http-sse", "sse"])


@ALL_KINDS
@pytest_twisted.ensureDeferred
async def test_handshake(servers, connect, kind: str) -> None:
    """start() runs initialize; the server's answer is kept."""
    upstream = await connect(servers(kind).config(), clientCapabilities={"roots": {}})
    verifyObject(IUpstream, upstream)
    assert upstream.alive and upstream.ready and upstream.inFlight == 0
    assert upstream.protocolVersion == "2025-11-25"
    assert upstream.serverInfo["name"] == "remote-test"
    assert upstream.instructions == "remote test server"
    assert "tools" in upstream.serverCapabilities
    if kind == "sse":
        assert upstream.endpointPath == "/messages/"
    else:
        assert upstream.hasSession


@ALL_KINDS
@pytest_twisted.ensureDeferred
async def test_toolsListAndCall(servers, connect, kind: str) -> None:
    """tools/list and tools/call answer over every transport."""
    upstream = await connect(servers(kind).config())
    listed = await within(upstream.request("tools/list", None, 20))
    assert [t["name"] for t in listed["tools"]] == ["echo", "add", "slow", "running", "cancelled"]
    assert textOf(await callTool(upstream, "echo", text="héllo")) == "héllo"
    assert (await callTool(upstream, "add", a=2, b=40))["structuredContent"] == {"result": 42}


@ALL_KINDS
@pytest_twisted.ensureDeferred
async def test_concurrentCalls(servers, connect, kind: str) -> None:
    """Fifty calls in flight at once are each answered with their own result."""
    upstream = await connect(servers(kind).config())
    calls = [
        upstream.request("tools/call", {"name": "add", "arguments": {"a": i, "b": 1000}}, 20)
        for i in range(50)
    ]
    assert upstream.inFlight == 50
    results = await within(gatherResults(calls))
    assert [r["structuredContent"]["result"] for r in results] == [i + 1000 for i in range(50)]
    assert upstream.inFlight == 0
    # Idle connections are kept for reuse, up to the limit.
    cached = upstream._connectionPool._connections.values()
    assert 0 < sum(len(c) for c in cached) <= upstream.maxPersistentPerHost


@ALL_KINDS
@pytest_twisted.ensureDeferred
async def test_errorCodeKept(servers, connect, kind: str) -> None:
    """An upstream JSON-RPC error keeps its code; the upstream stays usable."""
    upstream = await connect(servers(kind).config())
    with pytest.raises(UpstreamError) as e:
        await within(upstream.request("logging/setLevel", {"level": "info"}, 20))
    assert (e.value.code, e.value.message, e.value.fromUpstream) == (
        -32601,
        "Method not found",
        True,
    )
    with pytest.raises(UpstreamError) as e:
        await within(upstream.request("no/such-method", None, 20))
    assert e.value.code == -32602 and e.value.fromUpstream
    assert upstream.alive
    assert textOf(await callTool(upstream, "echo", text="still")) == "still"


@STREAMING_KINDS
@pytest_twisted.ensureDeferred
async def test_notificationsBeforeResponse(servers, connect, kind: str) -> None:
    """Progress and log notifications sent during a call reach onMessage before its result."""
    seen: list[dict[str, Any]] = []
    upstream = await connect(servers(kind).config(), onMessage=lambda u, m: seen.append(m))
    d = upstream.request(
        "tools/call",
        {"name": "slow", "arguments": {"steps": 2, "delay": 0}, "_meta": {"progressToken": "p1"}},
        20,
    )
    countAtResult: list[int] = []
    d.addCallback(lambda r: (countAtResult.append(len(seen)), r)[1])
    result = await within(d)
    assert textOf(result) == "done after 2 steps"
    assert countAtResult == [4]
    assert [m["method"] for m in seen] == ["notifications/progress", "notifications/message"] * 2
    assert seen[2]["params"] == {
        "progressToken": "p1",
        "progress": 2.0,
        "total": 2.0,
        "message": "step 2",
    }
    assert seen[1]["params"]["data"] == "step 1 of 2"


@ALL_KINDS
@pytest.mark.parametrize("how", ["timeout", "cancel"])
@pytest_twisted.ensureDeferred
async def test_timeoutAndCancel(servers, connect, kind: str, how: str) -> None:
    """
    A timeout, or the caller's cancel, fails the call at once and sends
    notifications/cancelled, which stops the tool upstream.
    """
    clock = Clock()
    upstream = await connect(servers(kind).config(), clock=clock)
    d = upstream.request("tools/call", {"name": "slow", "arguments": {"steps": 1, "delay": 60}}, 5)
    requestId = str(upstream._nextId)
    assert upstream.inFlight == 1

    async def toolList(name: str) -> list[str]:
        return (await callTool(upstream, name))["structuredContent"]["result"]

    async def runningUpstream() -> bool:
        return requestId in await toolList("running")

    await eventually(runningUpstream)
    if how == "timeout":
        clock.advance(5)
        with pytest.raises(UpstreamTimeout, match="did not answer tools/call within 5 s") as e:
            await d
        assert e.value.code == -32001
    else:
        d.cancel()
        with pytest.raises(CancelledError):
            await d
    assert upstream.inFlight == 0

    async def cancelledUpstream() -> bool:
        return requestId in await toolList("cancelled")

    await eventually(cancelledUpstream)
    assert upstream.alive


@STREAMING_KINDS
@pytest_twisted.ensureDeferred
async def test_serverKilled(ownServer, connect, kind: str) -> None:
    """
    When the server dies, the calls in flight fail with
    UpstreamUnavailable, the upstream ends, and onEnded is told once.
    """
    server = ownServer(kind)
    progressed: Deferred[None] = Deferred()
    ended: list[Any] = []

    def onMessage(upstream: Any, message: dict[str, Any]) -> None:
        if message["method"] == "notifications/progress" and not progressed.called:
            progressed.callback(None)

    upstream = await connect(
        server.config(), onMessage=onMessage, onEnded=lambda u, e: ended.append(e)
    )
    call = upstream.request(
        "tools/call",
        {"name": "slow", "arguments": {"steps": 2, "delay": 60}, "_meta": {"progressToken": 1}},
        30,
    )
    await within(progressed)
    server.kill()
    with pytest.raises(UpstreamUnavailable) as e:
        await within(call)
    assert not upstream.alive
    assert upstream.name in e.value.message
    assert len(ended) == 1 and isinstance(ended[0], UpstreamUnavailable)
    with pytest.raises(UpstreamUnavailable):
        await upstream.request("tools/list", None, 5)


@pytest_twisted.ensureDeferred
async def test_unreachable() -> None:
    """A server that is not there fails start() with UpstreamUnavailable."""
    upstream = StreamableHttpUpstream(reactor, makeConfig(f"http://127.0.0.1:{freePort()}/mcp"))
    with pytest.raises(UpstreamUnavailable, match="unreachable: connection refused"):
        await within(upstream.start())
    assertClean(upstream)


# -- the pool -------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_poolCall(servers) -> None:
    """The pool's default factory serves Streamable HTTP and SSE configs."""
    pool = UpstreamPool(reactor)
    pool.start()
    try:
        for kind in ["http-json", "sse"]:
            config = servers(kind).config(name=kind)
            result = await within(
                pool.call(
                    "inst", config, "tools/call", {"name": "echo", "arguments": {"text": kind}}, 20
                )
            )
            assert textOf(result) == kind
        health = {h["name"]: h for h in pool.health()}
        assert health["http-json"]["alive"] and health["http-json"]["transport"] == STREAMABLE_HTTPS
        assert health["sse"]["alive"] and health["sse"]["transport"] == SSE
    finally:
        await within(pool.stop())


@pytest.mark.parametrize(
    "factory, kind", [(httpFactory, StreamableHttpUpstream), (sseFactory, SseUpstream)]
)
def test_factorySettings(factory: Any, kind: type) -> None:
    """
    httpFactory and sseFactory pass their settings on, and merge their client
    capabilities with the config's (which win).
    """
    make = factory(reactor, clientCapabilities={"roots": {}, "sampling": {"a": 1}}, stopTimeout=7)
    config = attrs.evolve(
        makeConfig("http://127.0.0.1:1/mcp"),
        clientCapabilities={"sampling": {}, "elicitation": {}},
    )
    upstream = make(config, None, None)
    assert type(upstream) is kind and upstream.state == "new"
    assert upstream.clientCapabilities == {"roots": {}, "sampling": {}, "elicitation": {}}
    assert upstream.stopTimeout == 7 and upstream.config is config


@pytest_twisted.ensureDeferred
async def test_poolFactories(servers) -> None:
    """httpFactory and sseFactory plug into the pool with their own settings."""
    made: list[Any] = []

    def recording(factory: Any) -> Any:
        def make(config: UpstreamConfig, onMessage: Any, onEnded: Any) -> Any:
            made.append(factory(config, onMessage, onEnded))
            return made[-1]

        return make

    from mcp_proxy.upstream import byTransport

    pool = UpstreamPool(
        reactor,
        upstreamFactory=byTransport(
            {
                STREAMABLE_HTTPS: recording(
                    httpFactory(reactor, listen=False, maxPersistentPerHost=3)
                ),
                SSE: recording(sseFactory(reactor, startTimeout=10)),
            }
        ),
    )
    try:
        for kind in ["http-sse", "sse"]:
            config = servers(kind).config(name=kind)
            await within(pool.call("inst", config, "tools/list", None, 20))
        assert [type(u) for u in made] == [StreamableHttpUpstream, SseUpstream]
        assert made[0].maxPersistentPerHost == 3 and not made[0].listen
        assert made[1].startTimeout == 10
    finally:
        await within(pool.stop())
    for upstream in made:
        assertClean(upstream)


@pytest.mark.parametrize("kind", ["http-json", "sse"])
@pytest_twisted.ensureDeferred
async def test_discoverTools(servers, kind: str) -> None:
    """discoverTools lists a remote server's tools with the default factory."""
    tools = await within(discoverTools(reactor, servers(kind).config(), 20))
    assert [t["name"] for t in tools] == ["echo", "add", "slow", "running", "cancelled"]
    assert tools[0]["inputSchema"]["required"] == ["text"]


# -- against the fake server -------------------------------------------------------------------

ENV = {
    "API_KEY": "key-1",
    "BEARER_TOKEN": "tok-2",
    "HEADER_X_FOO": "foo-3",
    "X-DeepL-API-Key": "deepl-4",
    "NODE_ENV": "not-a-header",
}
CONFIG_HEADERS = {
    "x-api-key": ["key-1"],
    "authorization": ["Bearer tok-2"],
    "x-foo": ["foo-3"],
    "x-deepl-api-key": ["deepl-4"],
}
TRANSPORT_HEADERS = {
    "host",
    "accept",
    "accept-encoding",
    "content-type",
    "content-length",
    "mcp-session-id",
    "mcp-protocol-version",
    "cache-control",
}


@pytest.mark.parametrize("transportType", [STREAMABLE_HTTPS, SSE])
@pytest_twisted.ensureDeferred
async def test_headersSent(fake, connect, transportType: str) -> None:
    """
    Every request carries the config's headers, the MCP headers where they
    belong, and nothing else.
    """
    path = "/mcp" if transportType == STREAMABLE_HTTPS else "/sse"
    upstream = await connect(makeConfig(fake.base + path, transportType, env=ENV))
    await callTool(upstream, "echo", text="x")
    await within(upstream.stop())
    methods = [
        (r.method, r.body.get("method") if isinstance(r.body, dict) else None)
        for r in fake.requests
    ]
    if transportType == STREAMABLE_HTTPS:
        assert methods == [
            ("POST", "initialize"),
            ("POST", "notifications/initialized"),
            ("GET", None),
            ("POST", "tools/call"),
            ("DELETE", None),
        ] or methods == [
            ("POST", "initialize"),
            ("POST", "notifications/initialized"),
            ("POST", "tools/call"),
            ("GET", None),
            ("DELETE", None),
        ]
    else:
        assert methods == [
            ("GET", None),
            ("POST", "initialize"),
            ("POST", "notifications/initialized"),
            ("POST", "tools/call"),
        ]
    for recorded in fake.requests:
        assert {k: v for k, v in recorded.headers.items() if k in CONFIG_HEADERS} == CONFIG_HEADERS
        assert set(recorded.headers) <= TRANSPORT_HEADERS | set(CONFIG_HEADERS), recorded
        hasSession = "mcp-session-id" in recorded.headers
        if transportType == SSE or (recorded.body and recorded.body.get("method") == "initialize"):
            assert not hasSession and "mcp-protocol-version" not in recorded.headers
        else:
            assert hasSession
            assert recorded.headers["mcp-protocol-version"] == ["2025-11-25"]
    initialize = fake.recorded("initialize")[0]
    assert initialize.body["params"]["clientInfo"] == {"name": "mcp-proxy", "version": "0.1.0"}
    assert initialize.body["params"]["protocolVersion"] == "2025-11-25"


@pytest_twisted.ensureDeferred
async def test_badHeaderValue(fake) -> None:
    """A header value with a line break fails start() before any request."""
    upstream = StreamableHttpUpstream(
        reactor, makeConfig(fake.base + "/mcp", env={"API_KEY": "a\nX-Evil: 1"})
    )
    with pytest.raises(UpstreamUnavailable, match="'API_KEY' contains a line break") as e:
        await within(upstream.start())
    assert "Evil" not in e.value.message
    assert fake.requests == []
    assertClean(upstream)


@pytest.mark.parametrize("path", ["/redirect", "/redirect303"])
@pytest_twisted.ensureDeferred
async def test_redirectNotFollowed(fake, path: str) -> None:
    """A 3xx answer is an error; its Location is never requested."""
    upstream = StreamableHttpUpstream(reactor, makeConfig(fake.base + path, env=ENV))
    status = path[-3:] if path != "/redirect" else "302"
    with pytest.raises(UpstreamUnavailable, match=f"HTTP {status} .*not followed"):
        await within(upstream.start())
    assert fake.targetHits == 0
    assertClean(upstream)


@pytest_twisted.ensureDeferred
async def test_redirectNotFollowedSse(fake) -> None:
    """The SSE GET is not redirected either."""
    upstream = SseUpstream(reactor, makeConfig(fake.base + "/redirect", SSE, env=ENV))
    with pytest.raises(UpstreamUnavailable, match="event stream request with HTTP 302"):
        await within(upstream.start())
    assert fake.targetHits == 0
    assertClean(upstream)


@pytest.mark.parametrize("answerWith", ["json", "sse"])
@pytest_twisted.ensureDeferred
async def test_errorData(fake, connect, answerWith: str) -> None:
    """An upstream error keeps its code and data, in a JSON body or an event stream."""
    fake.answerWith = answerWith
    upstream = await connect(makeConfig(fake.base + "/mcp"))
    with pytest.raises(UpstreamError) as e:
        await callTool(upstream, "fail")
    assert (e.value.code, e.value.message, e.value.data) == (-32042, "needs a URL", {"url": "u"})
    assert e.value.fromUpstream


@pytest.mark.parametrize(
    "tool, match",
    [
        ("http500", "answered tools/call with HTTP 500: kaputX-Injected: 1$"),
        ("html", "answered tools/call with content type 'text/html' \\(HTTP 200\\)"),
        ("notjson", "answered tools/call with a body that is not JSON \\(HTTP 200\\)"),
        ("noanswer", "ended its answer to tools/call without a response"),
        ("big", "sent a message larger than 2000 bytes"),
    ],
)
@pytest_twisted.ensureDeferred
async def test_httpErrors(fake, connect, tool: str, match: str) -> None:
    """A bad HTTP answer fails only its call, with a message that shows the status."""
    upstream = await connect(makeConfig(fake.base + "/mcp", env=ENV), maxMessageSize=2000)
    with pytest.raises(UpstreamError, match=match) as e:
        await callTool(upstream, tool, size=5000)
    assert not e.value.fromUpstream
    assert "key-1" not in e.value.message and "tok-2" not in e.value.message
    assert upstream.alive
    assert textOf(await callTool(upstream, "echo", text="ok")) == "ok"


@pytest.mark.parametrize("answerWith", ["json", "sse"])
@pytest_twisted.ensureDeferred
async def test_sessionExpired(fake, connect, answerWith: str) -> None:
    """
    A 404 with a session runs initialize again and sends the request again;
    concurrent requests share one new session.
    """
    fake.answerWith = answerWith
    upstream = await connect(makeConfig(fake.base + "/mcp"), listen=False)
    assert textOf(await callTool(upstream, "echo", text="1")) == "1"
    fake.forgetSessions()
    assert textOf(await callTool(upstream, "echo", text="2")) == "2"
    assert fake.initializeCount == 2
    fake.forgetSessions()
    calls = [Deferred.fromCoroutine(callTool(upstream, "echo", text=str(i))) for i in range(10)]
    results = await within(gatherResults(calls))
    assert [textOf(r) for r in results] == [str(i) for i in range(10)]
    assert fake.initializeCount == 3
    assert len(fake.recorded("notifications/initialized")) == 3
    assert len(fake.sessions) == 1 and upstream.alive


@pytest_twisted.ensureDeferred
async def test_sessionLostAgain(fake, connect) -> None:
    """When the new session fails too, the upstream ends and the call fails."""
    ended: list[Any] = []
    upstream = await connect(makeConfig(fake.base + "/mcp"), onEnded=lambda u, e: ended.append(e))
    fake.forgetSessions()
    fake.keepSessions = False
    with pytest.raises(UpstreamUnavailable, match="lost its session and could not start a new one"):
        await within(callTool(upstream, "echo", text="x"))
    assert not upstream.alive and len(ended) == 1
    assert fake.initializeCount == 2


@pytest_twisted.ensureDeferred
async def test_getStream(fake, connect) -> None:
    """The GET stream is tried once; a 405 leaves the upstream working."""
    upstream = await connect(makeConfig(fake.base + "/mcp"))
    await eventually(lambda: [r for r in fake.requests if r.method == "GET"])
    await eventually(lambda: upstream._listening is None)
    assert upstream.alive
    get = next(r for r in fake.requests if r.method == "GET")
    assert get.headers["accept"] == ["text/event-stream"]
    assert "mcp-session-id" in get.headers


@pytest_twisted.ensureDeferred
async def test_stop(fake, connect) -> None:
    """stop() fails calls in flight, ends the session with DELETE, and tells onEnded once."""
    ended: list[Any] = []
    upstream = await connect(makeConfig(fake.base + "/mcp"), onEnded=lambda u, e: ended.append(e))
    [session] = fake.sessions
    stopped = upstream.stop()
    assert not upstream.alive
    assert upstream.stop() is not stopped
    await within(stopped)
    assert fake.sessions == set()
    delete = next(r for r in fake.requests if r.method == "DELETE")
    assert delete.headers["mcp-session-id"] == [session]
    assert ended == [None]
    assertClean(upstream)
    with pytest.raises(UpstreamUnavailable, match="is not running"):
        await upstream.request("tools/list", None, 5)


@pytest_twisted.ensureDeferred
async def test_sseTsShape(fake, connect) -> None:
    """The TypeScript SDK's endpoint shape (/message?sessionId=...) works too."""
    upstream = await connect(makeConfig(fake.base + "/sse", SSE))
    assert upstream.endpointPath == "/message"
    assert textOf(await callTool(upstream, "echo", text="ts")) == "ts"
    posted = fake.recorded("tools/call")[0]
    assert posted.path.startswith("/message?sessionId=")


@pytest.mark.parametrize(
    "template",
    ["http://localhost:{port}/message?sessionId={sid}", "//evil.example/message?sessionId={sid}"],
)
@pytest_twisted.ensureDeferred
async def test_sseOtherOrigin(fake, template: str) -> None:
    """An endpoint on another origin is refused, and nothing is POSTed."""
    fake.endpointTemplate = template
    upstream = SseUpstream(reactor, makeConfig(fake.base + "/sse", SSE))
    with pytest.raises(UpstreamUnavailable, match="another origin than the event stream; refused"):
        await within(upstream.start())
    assert [r.method for r in fake.requests] == ["GET"]
    assertClean(upstream)


@pytest_twisted.ensureDeferred
async def test_sseStreamClosed(fake, connect) -> None:
    """When the event stream ends, the upstream ends: the pool will start another."""
    ended: Deferred[Any] = Deferred()
    upstream = await connect(
        makeConfig(fake.base + "/sse", SSE), onEnded=lambda u, e: ended.callback(e)
    )
    fake.closeStreams()
    error = await within(ended)
    assert isinstance(error, UpstreamUnavailable)
    assert error.message == "upstream remote closed its event stream"
    assert not upstream.alive
    with pytest.raises(UpstreamUnavailable, match="closed its event stream"):
        await upstream.request("tools/list", None, 5)


@pytest_twisted.ensureDeferred
async def test_sseNoEndpoint(fake) -> None:
    """A stream without an endpoint event fails start() at the start timeout."""
    fake.endpointTemplate = None
    clock = Clock()
    upstream = SseUpstream(
        reactor, makeConfig(fake.base + "/sse", SSE), clock=clock, startTimeout=3
    )
    d = upstream.start()
    await eventually(lambda: fake.requests)
    clock.advance(3)
    with pytest.raises(UpstreamUnavailable, match="did not start in time"):
        await within(d)
    await within(upstream.stop())
    assert clock.getDelayedCalls() == []


@pytest.mark.parametrize("transportType", [STREAMABLE_HTTPS, SSE])
@pytest_twisted.ensureDeferred
async def test_stopDuringStart(fake, transportType: str) -> None:
    """stop() during start() fails the start with UpstreamUnavailable and cleans up."""
    fake.endpointTemplate = None
    path = "/mcp" if transportType == STREAMABLE_HTTPS else "/sse"
    upstream = (StreamableHttpUpstream if transportType == STREAMABLE_HTTPS else SseUpstream)(
        reactor, makeConfig(fake.base + path, transportType)
    )
    started = upstream.start()
    await within(upstream.stop())
    with pytest.raises(UpstreamUnavailable, match="stopped"):
        await within(started)
    assertClean(upstream)


@pytest.mark.parametrize("transportType", [STREAMABLE_HTTPS, SSE])
@pytest_twisted.ensureDeferred
async def test_startCancelled(fake, transportType: str) -> None:
    """Cancelling start() stays a cancellation (so addTimeout works), and cleans up."""
    fake.endpointTemplate = None
    path = "/mcp" if transportType == STREAMABLE_HTTPS else "/sse"
    upstream = (StreamableHttpUpstream if transportType == STREAMABLE_HTTPS else SseUpstream)(
        reactor, makeConfig(fake.base + path, transportType)
    )
    started = upstream.start()
    started.cancel()
    with pytest.raises(CancelledError):
        await within(started)
    await within(upstream.stop())
    assertClean(upstream)


@pytest.mark.parametrize("answerWith", ["json", "sse"])
@pytest_twisted.ensureDeferred
async def test_serverRequests(fake, connect, answerWith: str) -> None:
    """
    Requests from the server during a call are answered with POSTs: ping
    here, the others by onMessage.
    """
    fake.answerWith = answerWith
    asked: list[dict[str, Any]] = []

    def onMessage(upstream: Any, message: dict[str, Any]) -> Any:
        asked.append(message)
        return {"roots": []} if message.get("method") == "roots/list" else None

    upstream = await connect(makeConfig(fake.base + "/mcp", env=ENV), onMessage=onMessage)
    asked.clear()
    assert textOf(await callTool(upstream, "askclient")) == "asked"
    assert [m["method"] for m in asked] == ["notifications/message", "roots/list"]

    def answers() -> dict[Any, Any]:
        return {
            r.body["id"]: r.body.get("result")
            for r in fake.requests
            if isinstance(r.body, dict) and "method" not in r.body and "id" in r.body
        }

    await eventually(lambda: len(answers()) == 2)
    assert answers() == {"srv-ping": {}, "srv-roots": {"roots": []}}
    replies = [r for r in fake.requests if isinstance(r.body, dict) and "method" not in r.body]
    for reply in replies:
        assert reply.headers["x-api-key"] == ["key-1"]
        assert "mcp-session-id" in reply.headers


@pytest_twisted.ensureDeferred
async def test_getStreamMessages(fake, connect) -> None:
    """Messages on the GET stream reach onMessage; stop() closes the stream."""
    fake.getStream = True
    seen: Deferred[dict[str, Any]] = Deferred()
    upstream = await connect(
        makeConfig(fake.base + "/mcp"),
        onMessage=lambda u, m: None if seen.called else seen.callback(m),
    )
    message = await within(seen)
    assert message == {"jsonrpc": "2.0", "method": "notifications/tools/list_changed"}
    assert upstream._listening is not None
    await within(upstream.stop())
    assertClean(upstream)


@pytest_twisted.ensureDeferred
async def test_lingeringStream(fake, connect) -> None:
    """An answer's stream left open after the response is closed after lingerTimeout."""
    clock = Clock()
    upstream = await connect(
        makeConfig(fake.base + "/mcp"), clock=clock, lingerTimeout=3, listen=False
    )
    assert textOf(await callTool(upstream, "lingering")) == "said"
    assert len(upstream._ops) == 1 and len(upstream._timers) == 1
    clock.advance(3)
    assert upstream._ops == set() and upstream._timers == set()
    assert textOf(await callTool(upstream, "echo", text="after")) == "after"


def test_booleanIdsNeverMatch() -> None:
    """A response with id true is not the answer to request 1."""
    upstream = StreamableHttpUpstream(reactor, makeConfig("http://127.0.0.1:1/mcp"))
    entry = _Pending(1, "tools/list", b"")
    upstream._pending[1] = entry
    upstream._messageReceived({"jsonrpc": "2.0", "id": True, "result": {}})
    assert upstream.inFlight == 1 and upstream.droppedResponses == 1
    upstream._messageReceived({"jsonrpc": "2.0", "id": 1, "result": {"ok": 1}})
    assert upstream.inFlight == 0
    assert entry.deferred.result == {"ok": 1}
