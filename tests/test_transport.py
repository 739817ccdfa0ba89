"""
Tests for the HTTP front, in memory with C{StubTreq}: Streamable HTTP and
legacy SSE semantics, authentication and session ownership, and the error
statuses.  The upstreams are a fake pool; time is a L{Clock}.
"""

from __future__ import annotations

import json
from typing import Any, Optional

from treq.testing import StubTreq
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from mcp_proxy.auth import Authenticator, ConfigLoader
from mcp_proxy.cache import MemoryCache
from mcp_proxy.dispatch import Dispatcher
from mcp_proxy.models import AUTH_API_KEY, STDIO, ApiKeyRecord, InstanceConfig, UpstreamConfig
from mcp_proxy.router import Router
from mcp_proxy.session import SessionTable
from mcp_proxy.testing import FakeKeyLookup, FakeUpstreams
from mcp_proxy.transport import McpFront

KEY_A = "mcpp_keyA_0123456789abcdefghijklmnopqrstuvwxyzABCD"
KEY_A2 = "mcpp_keyA2_0123456789abcdefghijklmnopqrstuvwxyzABC"
KEY_B = "mcpp_keyB_0123456789abcdefghijklmnopqrstuvwxyzABCD"
BASE = "http://proxy.test"


def record(keyId: str, instanceId: str) -> ApiKeyRecord:
    return ApiKeyRecord(
        keyId=keyId,
        instanceId=instanceId,
        organizationId="org",
        authType=AUTH_API_KEY,
        isActive=True,
        expiresAt=None,
        instanceDeleted=False,
        toolGroupEnabled=True,
    )


def config(instanceId: str) -> InstanceConfig:
    return InstanceConfig(
        instanceId=instanceId,
        organizationId="org",
        toolGroupId="tg",
        toolGroupEnabled=True,
        upstreams=(
            UpstreamConfig(
                configId="c1",
                name="echo",
                transportType=STDIO,
                command="x",
                args=(),
                url=None,
                env={},
                authType="NONE",
                toolNames=frozenset({"echo"}),
            ),
        ),
    )


class FrontTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.lookup = FakeKeyLookup()
        self.lookup.addKey(KEY_A, record("kA", "instA"))
        self.lookup.addKey(KEY_A2, record("kA2", "instA"))
        self.lookup.addKey(KEY_B, record("kB", "instB"))
        self.lookup.configs["instA"] = config("instA")
        self.lookup.configs["instB"] = config("instB")
        self.upstreams = FakeUpstreams(
            {"c1": [{"name": "echo", "description": "Echo", "inputSchema": {"type": "object"}}]}
        )
        cache = MemoryCache(clock=self.clock)
        self.sessions = SessionTable(clock=self.clock, timeout=600, maxSessions=3)
        self.front = McpFront(
            authenticator=Authenticator(lookup=self.lookup, cache=cache, clock=self.clock),
            dispatcher=Dispatcher(
                loadConfig=ConfigLoader(
                    lookup=self.lookup, cache=MemoryCache(clock=self.clock)
                ).load,
                router=Router(callUpstream=self.upstreams, clock=self.clock),
            ),
            sessions=self.sessions,
            clock=self.clock,
            healthCheck=lambda: _fired((200, {"status": "ok"})),
            sseKeepalive=30,
        )
        self.stub = StubTreq(self.front.resource())

    # helpers

    def post(
        self,
        path: str,
        body: Any,
        key: Optional[str] = KEY_A,
        session: Optional[str] = None,
        headers: Optional[dict[str, str]] = None,
    ) -> tuple[int, Any, Any]:
        h = {"Content-Type": "application/json", "Accept": "application/json, text/event-stream"}
        if key is not None:
            h["X-API-Key"] = key
        if session is not None:
            h["Mcp-Session-Id"] = session
        h.update(headers or {})
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        response = self.successResultOf(self.stub.post(BASE + path, data=data, headers=h))
        content = self.successResultOf(response.content())
        parsed = json.loads(content) if content and content[:1] in b"{[" else content
        return response.code, parsed, response.headers

    def initialize(
        self, path: str = "/mcp/instA", key: str = KEY_A, version: str = "2025-06-18"
    ) -> str:
        code, body, headers = self.post(
            path,
            {
                "jsonrpc": "2.0",
                "id": 0,
                "method": "initialize",
                "params": {
                    "protocolVersion": version,
                    "capabilities": {},
                    "clientInfo": {"name": "t"},
                },
            },
            key=key,
        )
        self.assertEqual(code, 200, body)
        return headers.getRawHeaders(b"mcp-session-id")[0].decode()

    # tests

    def test_index(self) -> None:
        """
        C{GET /} describes the service in JSON.
        """
        response = self.successResultOf(self.stub.get(BASE + "/"))
        self.assertEqual(response.code, 200)
        body = self.successResultOf(response.json())
        self.assertEqual(body["name"], "mcp-proxy")

    def test_noKey(self) -> None:
        """
        A request without a key is refused with 401 and a JSON-RPC error.
        """
        code, body, _ = self.post("/mcp", {"jsonrpc": "2.0", "id": 1, "method": "ping"}, key=None)
        self.assertEqual(code, 401)
        self.assertEqual(body["error"]["code"], -32000)
        self.assertIsNone(body["id"])

    def test_badKey(self) -> None:
        """
        An unknown key is refused with 401.
        """
        code, body, _ = self.post(
            "/mcp", {"jsonrpc": "2.0", "id": 1, "method": "ping"}, key="mcpp_unknown"
        )
        self.assertEqual(code, 401)
        self.assertEqual(body["error"]["message"], "Invalid or expired API key")

    def test_keyOfAnotherInstance(self) -> None:
        """
        A key for instance A on C{/mcp/B} is refused with the same answer
        whether B exists or not.
        """
        ping = {"jsonrpc": "2.0", "id": 1, "method": "ping"}
        existing = self.post("/mcp/instB", ping)
        missing = self.post("/mcp/doesNotExist", ping)
        self.assertEqual(existing[0], 401)
        self.assertEqual(existing[:2], missing[:2])

    def test_initializeCreatesSession(self) -> None:
        """
        C{initialize} creates a session, echoes a supported version, and
        advertises tools.
        """
        code, body, headers = self.post(
            "/mcp/instA",
            {
                "jsonrpc": "2.0",
                "id": 0,
                "method": "initialize",
                "params": {"protocolVersion": "2025-03-26", "capabilities": {}, "clientInfo": {}},
            },
        )
        self.assertEqual(code, 200)
        self.assertEqual(body["result"]["protocolVersion"], "2025-03-26")
        self.assertIn("tools", body["result"]["capabilities"])
        sessionId = headers.getRawHeaders(b"mcp-session-id")[0].decode()
        self.assertGreaterEqual(len(sessionId), 32)
        self.assertEqual(self.sessions.counts()["streamable-http"], 1)

    def test_unsupportedVersionNegotiated(self) -> None:
        """
        An unknown requested version is answered with the latest one.
        """
        _code, body, _ = self.post(
            "/mcp",
            {
                "jsonrpc": "2.0",
                "id": 0,
                "method": "initialize",
                "params": {"protocolVersion": "1999-01-01", "capabilities": {}, "clientInfo": {}},
            },
        )
        self.assertEqual(body["result"]["protocolVersion"], "2025-11-25")

    def test_toolsThroughSession(self) -> None:
        """
        tools/list and tools/call work in a session.
        """
        session = self.initialize()
        code, body, _ = self.post(
            "/mcp/instA", {"jsonrpc": "2.0", "id": 1, "method": "tools/list"}, session=session
        )
        self.assertEqual(code, 200)
        self.assertEqual([t["name"] for t in body["result"]["tools"]], ["echo"])
        self.assertEqual(body["result"]["tools"][0]["description"], "[echo] Echo")
        code, body, _ = self.post(
            "/mcp/instA",
            {"jsonrpc": "2.0", "id": "x", "method": "tools/call", "params": {"name": "echo"}},
            session=session,
        )
        self.assertEqual(body["id"], "x")
        self.assertIn("content", body["result"])

    def test_stateless(self) -> None:
        """
        A request without a session is served statelessly, the instance
        taken from the key on C{/mcp}.
        """
        code, body, _ = self.post("/mcp", {"jsonrpc": "2.0", "id": 1, "method": "tools/list"})
        self.assertEqual(code, 200)
        self.assertEqual(len(body["result"]["tools"]), 1)

    def test_discoverProbeFallsBack(self) -> None:
        """
        The mcp 2.x probe C{server/discover} without a session gets a 400,
        which makes the client fall back to C{initialize}.
        """
        code, body, _ = self.post(
            "/mcp", {"jsonrpc": "2.0", "id": 1, "method": "server/discover", "params": {}}
        )
        self.assertEqual(code, 400)
        self.assertNotEqual(body["error"]["code"], -32022)

    def test_unknownSession(self) -> None:
        """
        An unknown session id gets 404.
        """
        code, _body, _ = self.post(
            "/mcp", {"jsonrpc": "2.0", "id": 1, "method": "ping"}, session="nope"
        )
        self.assertEqual(code, 404)

    def test_sessionOfAnotherKey(self) -> None:
        """
        A session is usable only by the key that created it, even a key of
        the same instance.
        """
        session = self.initialize()
        code, _, _ = self.post(
            "/mcp/instA", {"jsonrpc": "2.0", "id": 1, "method": "ping"}, key=KEY_A2, session=session
        )
        self.assertEqual(code, 404)

    def test_deleteEndsSession(self) -> None:
        """
        DELETE ends the session at once; its id then gets 404.
        """
        session = self.initialize()
        response = self.successResultOf(
            self.stub.delete(
                BASE + "/mcp/instA", headers={"X-API-Key": KEY_A, "Mcp-Session-Id": session}
            )
        )
        self.assertEqual(response.code, 200)
        self.assertEqual(len(self.sessions), 0)
        code, _, _ = self.post(
            "/mcp/instA", {"jsonrpc": "2.0", "id": 1, "method": "ping"}, session=session
        )
        self.assertEqual(code, 404)

    def test_expiredSession(self) -> None:
        """
        A session idle past the timeout is gone.
        """
        session = self.initialize()
        self.clock.advance(601)
        code, _, _ = self.post(
            "/mcp/instA", {"jsonrpc": "2.0", "id": 1, "method": "ping"}, session=session
        )
        self.assertEqual(code, 404)

    def test_capacity(self) -> None:
        """
        Beyond the session cap, C{initialize} gets 503 "Server at capacity".
        """
        for _ in range(3):
            self.initialize()
        code, body, _ = self.post(
            "/mcp",
            {
                "jsonrpc": "2.0",
                "id": 0,
                "method": "initialize",
                "params": {"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {}},
            },
        )
        self.assertEqual(code, 503)
        self.assertEqual(body["error"]["message"], "Server at capacity")

    def test_methodNotAllowed(self) -> None:
        """
        Other HTTP methods get 405 with a JSON-RPC error.
        """
        response = self.successResultOf(
            self.stub.put(BASE + "/mcp", data=b"{}", headers={"X-API-Key": KEY_A})
        )
        self.assertEqual(response.code, 405)
        body = self.successResultOf(response.json())
        self.assertEqual(body["error"]["code"], -32601)

    def test_parseError(self) -> None:
        """
        A body that is not JSON gets 400 with -32700.
        """
        code, body, _ = self.post("/mcp", b"{not json")
        self.assertEqual(code, 400)
        self.assertEqual(body["error"]["code"], -32700)

    def test_wrongContentType(self) -> None:
        """
        A body that is not declared as JSON gets 415.
        """
        code, _, _ = self.post(
            "/mcp",
            {"jsonrpc": "2.0", "id": 1, "method": "ping"},
            headers={"Content-Type": "text/plain"},
        )
        self.assertEqual(code, 415)

    def test_invalidRequest(self) -> None:
        """
        JSON that is not a JSON-RPC message gets 400 with -32600.
        """
        code, body, _ = self.post("/mcp", {"hello": "world"})
        self.assertEqual(code, 400)
        self.assertEqual(body["error"]["code"], -32600)

    def test_unsupportedProtocolHeader(self) -> None:
        """
        An unsupported C{MCP-Protocol-Version} header gets 400.
        """
        session = self.initialize()
        code, _, _ = self.post(
            "/mcp",
            {"jsonrpc": "2.0", "id": 1, "method": "ping"},
            session=session,
            headers={"MCP-Protocol-Version": "1999-01-01"},
        )
        self.assertEqual(code, 400)

    def test_notificationAccepted(self) -> None:
        """
        A notification gets 202 with no body.
        """
        session = self.initialize()
        code, body, _ = self.post(
            "/mcp", {"jsonrpc": "2.0", "method": "notifications/initialized"}, session=session
        )
        self.assertEqual(code, 202)
        self.assertEqual(body, b"")

    def test_unknownMethod(self) -> None:
        """
        An unknown method is a -32601 error response.
        """
        code, body, _ = self.post("/mcp", {"jsonrpc": "2.0", "id": 3, "method": "nope/nope"})
        self.assertEqual(code, 200)
        self.assertEqual(body["error"]["code"], -32601)
        self.assertEqual(body["id"], 3)

    def test_unknownTool(self) -> None:
        """
        An unknown tool is a -32602 error response.
        """
        _, body, _ = self.post(
            "/mcp",
            {"jsonrpc": "2.0", "id": 3, "method": "tools/call", "params": {"name": "nope"}},
        )
        self.assertEqual(body["error"]["code"], -32602)

    def test_batchOnlyFor20250326(self) -> None:
        """
        Batches are refused unless the session negotiated 2025-03-26; there
        they get an array of responses.
        """
        batch = [
            {"jsonrpc": "2.0", "id": 1, "method": "ping"},
            {"jsonrpc": "2.0", "method": "notifications/initialized"},
            {"jsonrpc": "2.0", "id": 2, "method": "tools/list"},
        ]
        modern = self.initialize(version="2025-06-18")
        code, _, _ = self.post("/mcp", batch, session=modern)
        self.assertEqual(code, 400)
        old = self.initialize(version="2025-03-26")
        code, body, _ = self.post("/mcp", batch, session=old)
        self.assertEqual(code, 200)
        self.assertEqual([r["id"] for r in body], [1, 2])

    def test_getStreamOnePerSession(self) -> None:
        """
        GET opens the session's SSE stream; a second GET gets 409; closing
        the session ends the stream.
        """
        session = self.initialize()
        headers = {"X-API-Key": KEY_A, "Mcp-Session-Id": session, "Accept": "text/event-stream"}
        first = self.successResultOf(self.stub.get(BASE + "/mcp/instA", headers=headers))
        self.assertEqual(first.code, 200)
        self.assertEqual(first.headers.getRawHeaders(b"content-type"), [b"text/event-stream"])
        chunks: list[bytes] = []
        done = first.collect(chunks.append)
        second = self.successResultOf(self.stub.get(BASE + "/mcp/instA", headers=headers))
        self.assertEqual(second.code, 409)
        self.clock.advance(30)
        self.stub.flush()
        self.assertIn(b": keepalive\n\n", b"".join(chunks))
        self.successResultOf(self.sessions.close(session))
        self.stub.flush()
        self.successResultOf(done)

    def test_legacySse(self) -> None:
        """
        The legacy transport: GET /sse sends the endpoint event; a POST to
        it gets 202 and the response arrives on the stream.
        """
        response = self.successResultOf(
            self.stub.get(BASE + "/sse/instA", headers={"X-API-Key": KEY_A})
        )
        self.assertEqual(response.code, 200)
        chunks: list[bytes] = []
        response.collect(chunks.append)
        self.stub.flush()
        text = b"".join(chunks).decode()
        self.assertTrue(text.startswith("event: endpoint\ndata: /messages/instA?sessionId="), text)
        endpoint = text.split("data: ", 1)[1].split("\n", 1)[0]
        post = self.successResultOf(
            self.stub.post(
                BASE + endpoint,
                data=json.dumps(
                    {
                        "jsonrpc": "2.0",
                        "id": 7,
                        "method": "initialize",
                        "params": {
                            "protocolVersion": "2024-11-05",
                            "capabilities": {},
                            "clientInfo": {},
                        },
                    }
                ).encode(),
                headers={"Content-Type": "application/json"},
            )
        )
        self.assertEqual(post.code, 202)
        self.stub.flush()
        events = b"".join(chunks).decode().split("\n\n")
        message = json.loads(events[1].split("data: ", 1)[1])
        self.assertEqual(message["id"], 7)
        self.assertEqual(message["result"]["protocolVersion"], "2024-11-05")

    def test_legacyUnknownSession(self) -> None:
        """
        A POST to /messages with an unknown or missing session id gets
        404 or 400.
        """
        response = self.successResultOf(
            self.stub.post(BASE + "/messages?sessionId=nope", data=b"{}", headers={})
        )
        self.assertEqual(response.code, 404)
        response = self.successResultOf(self.stub.post(BASE + "/messages", data=b"{}"))
        self.assertEqual(response.code, 400)

    def test_unknownPath(self) -> None:
        """
        A path the front does not serve gets 404 with a JSON-RPC error, not
        a 500.
        """
        response = self.successResultOf(self.stub.get(BASE + "/nowhere"))
        self.assertEqual(response.code, 404)
        body = self.successResultOf(response.json())
        self.assertEqual(body["error"]["code"], -32601)

    def test_wrongMethodOnLegacyEndpoint(self) -> None:
        """
        A GET on the legacy POST endpoint gets 405.
        """
        response = self.successResultOf(self.stub.get(BASE + "/messages"))
        self.assertEqual(response.code, 405)

    def test_foreignHostAndOrigin(self) -> None:
        """
        With loopback-only hosts allowed, a foreign Host gets 421 and a
        foreign Origin 403; loopback ones pass.
        """
        self.front.allowedHosts = frozenset({"127.0.0.1", "localhost", "::1"})
        ping = {"jsonrpc": "2.0", "id": 1, "method": "ping"}
        code, _, _ = self.post(
            "/mcp", ping, headers={"Host": "evil.example.com", "Origin": "http://evil.example.com"}
        )
        self.assertEqual(code, 421)
        code, _, _ = self.post(
            "/mcp", ping, headers={"Host": "127.0.0.1:8080", "Origin": "http://evil.example.com"}
        )
        self.assertEqual(code, 403)
        code, _, _ = self.post(
            "/mcp", ping, headers={"Host": "127.0.0.1:8080", "Origin": "http://127.0.0.1:8080"}
        )
        self.assertEqual(code, 200)

    def test_shedsBeyondCapacity(self) -> None:
        """
        Beyond the concurrent-request limit, a POST is shed at once with 503
        and Retry-After; once the load drops, requests are served again.
        """
        self.front.maxConcurrentRequests = 1
        self.upstreams.pending = []
        listing = {"jsonrpc": "2.0", "id": 1, "method": "tools/list"}
        headers = {"X-API-Key": KEY_A, "Content-Type": "application/json"}
        first = self.stub.post(BASE + "/mcp", data=json.dumps(listing).encode(), headers=headers)
        self.assertNoResult(first)
        code, body, responseHeaders = self.post("/mcp", listing)
        self.assertEqual(code, 503)
        self.assertEqual(body["error"]["message"], "Server busy, retry later")
        self.assertEqual(responseHeaders.getRawHeaders(b"retry-after"), [b"1"])
        for d in self.upstreams.pending:
            d.callback(None)
        self.stub.flush()
        self.assertEqual(self.successResultOf(first).code, 200)
        self.upstreams.pending = None
        code, _, _ = self.post("/mcp", listing)
        self.assertEqual(code, 200)


def _fired(value: Any) -> Any:
    from twisted.internet.defer import succeed

    return succeed(value)
