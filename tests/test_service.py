"""
End-to-end tests of a whole proxy in this process: L{ProxyService} on the
real reactor, a real SQLite database, real stdio upstream processes
(examples/echo_server.py), and HTTP over a loopback port.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path
from typing import Any, AsyncIterator

import pytest_twisted
from attrs import define
from treq.client import HTTPClient
from twisted.internet import reactor
from twisted.internet.defer import Deferred, DeferredList, gatherResults
from twisted.internet.task import deferLater
from twisted.web.client import Agent, HTTPConnectionPool
from zope.interface.verify import verifyObject

from mcp_proxy.config import resolveSettings
from mcp_proxy.interfaces import IRepository
from mcp_proxy.keys import displayApiKey, generateApiKey, hashApiKey
from mcp_proxy.models import AUTH_API_KEY, STDIO
from mcp_proxy.service import ProxyService

ROOT = Path(__file__).resolve().parent.parent
ECHO = str(ROOT / "examples" / "echo_server.py")


@define
class Proxy:
    service: ProxyService
    url: str
    key: str
    instanceId: str
    toolGroupId: str
    http: Any

    async def post(self, body: Any, path: str = "/mcp", key: str | None = None) -> tuple[int, Any]:
        response = await self.http.post(
            self.url + path,
            data=json.dumps(body).encode(),
            headers={"X-API-Key": key or self.key, "Content-Type": "application/json"},
        )
        content = await response.content()
        return response.code, json.loads(content) if content else None

    async def call(self, name: str, arguments: dict[str, Any], requestId: Any = 1) -> Any:
        code, body = await self.post(
            {
                "jsonrpc": "2.0",
                "id": requestId,
                "method": "tools/call",
                "params": {"name": name, "arguments": arguments},
            }
        )
        assert code == 200, body
        return body

    def pids(self) -> list[int]:
        return [pid for entry in self.service.pool.health() for pid in entry["pids"]]


async def makeData(service: ProxyService) -> tuple[str, str, str]:
    """
    An organization, the echo server, a config, a tool group with its
    tools, an instance and a key.

    @return: the key, the instance id, and a second instance's id.
    """
    repo = service.repository
    org = await repo.createOrganization("org")
    server = await repo.createServer(
        "echo", STDIO, sys.executable, [ECHO], None, [], "NONE", org.id
    )
    config = await repo.createConfig(server.id, "echo", "", {}, org.id)
    await repo.syncTools(
        server.id,
        [
            ("echo", "Return the text.", {"type": "object"}),
            ("add", "Add.", {"type": "object"}),
            ("sleep", "Sleep.", {"type": "object"}),
        ],
    )
    group = await repo.createToolGroup(
        org.id, "all", "", [(config.id, "echo"), (config.id, "add"), (config.id, "sleep")]
    )
    other = await repo.createToolGroup(org.id, "other", "", [(config.id, "echo")])
    instance = await repo.createInstance(org.id, "demo", "", group.id, AUTH_API_KEY)
    await repo.createInstance(org.id, "second", "", other.id, AUTH_API_KEY)
    key = generateApiKey()
    await repo.createApiKey(instance.id, "test", hashApiKey(key), displayApiKey(key), None)
    return key, instance.id, group.id


@pytest_twisted.async_yield_fixture
async def proxy(tmp_path: Path) -> AsyncIterator[Proxy]:
    async for running in _proxyOn(f"sqlite:///{tmp_path}/proxy.sqlite3"):
        yield running


@pytest_twisted.async_yield_fixture
async def pgProxy(postgresDatabase: str) -> AsyncIterator[Proxy]:
    async for running in _proxyOn(f"postgresql://postgres@127.0.0.1:5432/{postgresDatabase}"):
        yield running


async def _proxyOn(database: str) -> AsyncIterator[Proxy]:
    settings = resolveSettings(
        {"database": database, "upstream-timeout": "10"},
        ("tcp:0:interface=127.0.0.1",),
        environ={},
    )
    service = ProxyService(settings, reactor)
    service.startService()
    await service.whenReady()
    key, instanceId, groupId = await makeData(service)
    port = service.ports[0].getHost().port
    pool = HTTPConnectionPool(reactor, persistent=True)
    pool.maxPersistentPerHost = 128
    http = HTTPClient(Agent(reactor, pool=pool))
    try:
        yield Proxy(service, f"http://127.0.0.1:{port}", key, instanceId, groupId, http)
    finally:
        await service.stopService()
        await pool.closeCachedConnections()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still answers kill(0); read its state.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest_twisted.ensureDeferred
async def test_healthAndTools(proxy: Proxy) -> None:
    """
    /health answers, tools/list aggregates the echo server's tools, and
    tools/call returns its result.
    """
    response = await proxy.http.get(proxy.url + "/health")
    assert response.code == 200
    health = json.loads(await response.content())
    assert health["database"] == "ok"
    code, body = await proxy.post({"jsonrpc": "2.0", "id": 1, "method": "tools/list"})
    assert code == 200
    assert [t["name"] for t in body["result"]["tools"]] == ["add", "echo", "sleep"]
    body = await proxy.call("echo", {"text": "hello"})
    assert body["result"]["content"][0]["text"] == "hello"


@pytest_twisted.ensureDeferred
async def test_noDatabaseQueriesAfterWarmup(proxy: Proxy) -> None:
    """
    After the first request, tools/list and tools/call make no database
    query at all.
    """
    await proxy.call("echo", {"text": "warm"})
    await proxy.post({"jsonrpc": "2.0", "id": 1, "method": "tools/list"})
    before = dict(proxy.service.repository.queryCounts)
    for i in range(20):
        await proxy.call("echo", {"text": str(i)})
        await proxy.post({"jsonrpc": "2.0", "id": 1, "method": "tools/list"})
    assert dict(proxy.service.repository.queryCounts) == before


@pytest_twisted.ensureDeferred
async def test_hundredConcurrentCallsOneProcess(proxy: Proxy) -> None:
    """
    100 concurrent tools/call through one upstream process each get their
    own answer.
    """
    results = await gatherResults(
        [
            Deferred.fromCoroutine(proxy.call("echo", {"text": f"message {i}"}, requestId=i))
            for i in range(100)
        ]
    )
    for i, body in enumerate(results):
        assert body["id"] == i
        assert body["result"]["content"][0]["text"] == f"message {i}"
    assert len(proxy.pids()) == 1


@pytest_twisted.ensureDeferred
async def test_killedUpstreamFailsOnlyItsCalls(proxy: Proxy) -> None:
    """
    Killing the upstream process mid-call fails that call with a JSON-RPC
    error; the next call works (a new process); after the proxy stops no
    upstream process is left.
    """
    await proxy.call("echo", {"text": "start"})
    [pid] = proxy.pids()
    slow = Deferred.fromCoroutine(proxy.call("sleep", {"seconds": 30}))
    while not any(entry["inFlight"] for entry in proxy.service.pool.health()):
        await deferLater(reactor, 0.01)
    os.kill(pid, signal.SIGKILL)
    body = await slow
    assert "error" in body
    assert "exited" in body["error"]["message"] or "upstream" in body["error"]["message"]
    body = await proxy.call("echo", {"text": "again"})
    assert body["result"]["content"][0]["text"] == "again"
    [newPid] = proxy.pids()
    assert newPid != pid
    await proxy.service.stopService()
    assert not _alive(newPid)


@pytest_twisted.ensureDeferred
async def test_keyOfAnotherInstanceAndRevokedKey(proxy: Proxy) -> None:
    """
    A key on another instance's URL is refused; so is a revoked key.
    """
    instances = await proxy.service.repository.listInstances(None, False)
    other = next(i for i in instances if i.id != proxy.instanceId)
    code, body = await proxy.post({"jsonrpc": "2.0", "id": 1, "method": "ping"}, f"/mcp/{other.id}")
    assert code == 401
    assert body["error"]["message"] == "API key does not match the requested MCP server"
    revoked = generateApiKey()
    created = await proxy.service.repository.createApiKey(
        proxy.instanceId, "revoked", hashApiKey(revoked), displayApiKey(revoked), None
    )
    await proxy.service.repository.revokeApiKey(created.id)
    code, body = await proxy.post({"jsonrpc": "2.0", "id": 1, "method": "ping"}, key=revoked)
    assert code == 401


@pytest_twisted.ensureDeferred
async def test_stopLeavesNoProcess(proxy: Proxy) -> None:
    """
    Stopping the proxy stops every upstream process it started.
    """
    await DeferredList(
        [Deferred.fromCoroutine(proxy.call("echo", {"text": "x"})) for _ in range(5)]
    )
    pids = proxy.pids()
    assert pids
    await proxy.service.stopService()
    assert not any(_alive(pid) for pid in pids)


@pytest_twisted.ensureDeferred
async def test_inProcessAdminInvalidates(proxy: Proxy) -> None:
    """
    Admin changes made through the service's repository in this process
    take effect at once, despite the caches: a narrowed tool group, a
    revoked key (whose sessions end), a deleted instance.
    """
    verifyObject(IRepository, proxy.service.admin)
    ping = {"jsonrpc": "2.0", "id": 1, "method": "ping"}
    code, body = await proxy.post({"jsonrpc": "2.0", "id": 1, "method": "tools/list"})
    assert len(body["result"]["tools"]) == 3
    group = await proxy.service.repository.getToolGroup(proxy.toolGroupId)
    await proxy.service.admin.setToolGroupTools(
        proxy.toolGroupId, [(t.configId, t.toolName) for t in group.tools if t.toolName == "echo"]
    )
    code, body = await proxy.post({"jsonrpc": "2.0", "id": 1, "method": "tools/list"})
    assert [t["name"] for t in body["result"]["tools"]] == ["echo"]

    [key] = await proxy.service.repository.listApiKeys(proxy.instanceId)
    session = proxy.service.sessions.create(
        transport="streamable-http", instanceId=proxy.instanceId, keyId=key.id
    )
    assert (await proxy.post(ping))[0] == 200
    await proxy.service.admin.revokeApiKey(key.id)
    assert (await proxy.post(ping))[0] == 401
    assert proxy.service.sessions.get(session.id) is None

    other = generateApiKey()
    await proxy.service.repository.createApiKey(
        proxy.instanceId, "other", hashApiKey(other), displayApiKey(other), None
    )
    assert (await proxy.post(ping, key=other))[0] == 200
    await proxy.service.admin.deleteInstance(proxy.instanceId)
    code, body = await proxy.post(ping, key=other)
    assert code == 401
    assert body["error"]["message"] == "MCP server instance has been deleted"


@pytest_twisted.ensureDeferred
async def test_requestLogRows(proxy: Proxy) -> None:
    """
    N calls give exactly N request-log rows with their fields and readable
    data; validation-mode requests are not logged (SQLite).
    """
    await _checkRequestLog(proxy)


@pytest_twisted.ensureDeferred
async def test_requestLogRowsPostgres(pgProxy: Proxy) -> None:
    """
    The same on PostgreSQL, where the proxy also makes no query per request
    after warm-up.
    """
    await pgProxy.call("echo", {"text": "warm"})
    before = dict(pgProxy.service.repository.queryCounts)
    await _checkRequestLog(pgProxy, skipped=1)
    after = dict(pgProxy.service.repository.queryCounts)
    for kind in ("lookupApiKey", "loadInstanceConfig"):
        assert after.get(kind) == before.get(kind)


async def _checkRequestLog(proxy: Proxy, skipped: int = 0) -> None:
    from mcp_proxy.requestlog import decodePayload

    for i in range(5):
        await proxy.call("echo", {"text": f"logged {i}"})
    await proxy.post({"jsonrpc": "2.0", "id": 1, "method": "tools/list"})
    response = await proxy.http.post(
        proxy.url + "/mcp",
        data=json.dumps(
            {
                "jsonrpc": "2.0",
                "id": 9,
                "method": "tools/call",
                "params": {"name": "echo", "arguments": {"text": "not logged"}},
            }
        ).encode(),
        headers={
            "X-API-Key": proxy.key,
            "Content-Type": "application/json",
            "x-validation-mode": "true",
        },
    )
    assert response.code == 200
    await response.content()
    _, body = await proxy.post(
        {"jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": {"name": "missing"}}
    )
    assert body["error"]["code"] == -32602
    assert proxy.service.requestLog is not None
    await proxy.service.requestLog.flush()
    rows = await proxy.service.repository.listRequestLogs(proxy.instanceId, None, 100, True)
    calls = [r for r in rows if r.method == "tools/call"]
    lists = [r for r in rows if r.method == "tools/list"]
    assert len(calls) == 6 + skipped and len(lists) == 1
    ok = [r for r in calls if r.responseStatus == "200"]
    texts = []
    for row in ok:
        assert row.toolName == "echo"
        assert row.transportType == "STREAMABLE_HTTPS"
        assert row.data is not None
        request, _ = decodePayload(row.data.inputDataCompressed)
        answer, _ = decodePayload(row.data.outputDataCompressed)
        assert answer["content"][0]["text"] == request["params"]["arguments"]["text"]
        texts.append(request["params"]["arguments"]["text"])
    # createdAt has milliseconds only: calls in one millisecond do not sort.
    assert sorted(texts) == sorted(["warm"] * skipped + [f"logged {i}" for i in range(5)])
    [failed] = [r for r in calls if r.responseStatus == "500"]
    assert failed.errorCode == "-32602"
    assert failed.data is None


@pytest_twisted.ensureDeferred
async def test_requestLogWrittenOnStop(tmp_path: Path) -> None:
    """
    The proxy's stop writes every row recorded, through its writer process,
    without a flush first; a second stop is harmless.
    """
    from mcp_proxy.logwriter import ProcessRequestLog
    from mcp_proxy.repository import openRepository

    database = f"sqlite:///{tmp_path}/stop.sqlite3"
    proxy = None
    async for running in _proxyOn(database):
        proxy = running
        requestLog = running.service.requestLog
        assert isinstance(requestLog, ProcessRequestLog) and requestLog.pid is not None
        writer = requestLog.pid
        for i in range(30):
            await running.call("echo", {"text": f"at stop {i}"})
        await running.service.stopService()
        assert requestLog.pid is None and not _alive(writer)
        assert requestLog.written == 30 and requestLog.dropped == 0
    assert proxy is not None
    settings = resolveSettings({"database": database}, ("tcp:0",), environ={})
    repository = openRepository(settings.database, reactor)
    await repository.start()
    try:
        rows = await repository.listRequestLogs(proxy.instanceId, None, 100, False)
    finally:
        await repository.stop()
    assert sorted(r.toolName for r in rows) == ["echo"] * 30
