"""
End-to-end tests with the official C{mcp} Python SDK as the client, against
a real proxy process (C{twistd -n mcpproxy}) fronting a real stdio MCP
server.  The same tests run with the 1.x line (tox env py311, C{.venv}) and
the 2.x line (tox env mcp2, C{.venv-mcp2}).
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import json
import urllib.request
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, AsyncIterator, Iterator

import pytest
from _proxyharness import ProxyProcess, admin, startProxy
from mcp import ClientSession

MCP_MAJOR = int(importlib.metadata.version("mcp").split(".")[0])


@pytest.fixture(scope="module")
def proxy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxyProcess]:
    running = startProxy(tmp_path_factory.mktemp("proxy"))
    try:
        yield running
    finally:
        log = running.stop()
        assert "Traceback" not in log, log


@asynccontextmanager
async def streamable(url: str, headers: dict[str, str]) -> AsyncIterator[ClientSession]:
    """
    An initialized client session over Streamable HTTP, with either SDK line.
    """
    if MCP_MAJOR >= 2:
        import httpx2
        from mcp.client.streamable_http import streamable_http_client

        async with httpx2.AsyncClient(headers=headers, timeout=30) as http:
            async with streamable_http_client(url, http_client=http) as (read, write):
                async with ClientSession(read, write) as session:
                    await session.initialize()
                    yield session
    else:
        from mcp.client.streamable_http import streamablehttp_client

        async with streamablehttp_client(url, headers=headers) as (read, write, _):
            async with ClientSession(read, write) as session:
                await session.initialize()
                yield session


@asynccontextmanager
async def legacySse(url: str, headers: dict[str, str]) -> AsyncIterator[ClientSession]:
    """
    An initialized client session over the legacy HTTP+SSE transport.
    """
    from mcp.client.sse import sse_client

    async with sse_client(url, headers=headers) as (read, write):
        async with ClientSession(read, write) as session:
            await session.initialize()
            yield session


def _text(result: Any) -> str:
    return str(result.content[0].text)


async def _exercise(session: ClientSession) -> None:
    tools = await session.list_tools()
    assert sorted(t.name for t in tools.tools) == ["add", "echo", "sleep"]
    assert all(t.description.startswith("[echo] ") for t in tools.tools)
    result = await session.call_tool("echo", {"text": "hello"})
    assert _text(result) == "hello"
    result = await session.call_tool("add", {"a": 2, "b": 40})
    structured = getattr(result, "structured_content", None) or getattr(
        result, "structuredContent", None
    )
    assert structured == {"result": 42}
    await session.send_ping()


def test_streamableHttp(proxy: ProxyProcess) -> None:
    """
    The SDK client initializes, lists the aggregated tools and calls them
    over Streamable HTTP.
    """

    async def main() -> None:
        async with streamable(proxy.url, {"X-API-Key": proxy.key}) as session:
            await _exercise(session)

    asyncio.run(main())


def test_streamableHttpInstanceFromKey(proxy: ProxyProcess) -> None:
    """
    On C{/mcp} the instance is the key's.
    """

    async def main() -> None:
        async with streamable(proxy.base + "/mcp", {"X-API-Key": proxy.key}) as session:
            await _exercise(session)

    asyncio.run(main())


def test_legacySse(proxy: ProxyProcess) -> None:
    """
    The SDK client works over the legacy HTTP+SSE transport.
    """

    async def main() -> None:
        async with legacySse(
            f"{proxy.base}/sse/{proxy.instanceId}", {"X-API-Key": proxy.key}
        ) as session:
            await _exercise(session)

    asyncio.run(main())


def test_concurrentCalls(proxy: ProxyProcess) -> None:
    """
    Many concurrent calls in one session each get their own answer.
    """

    async def main() -> None:
        async with streamable(proxy.url, {"X-API-Key": proxy.key}) as session:
            results = await asyncio.gather(
                *(session.call_tool("echo", {"text": f"n{i}"}) for i in range(50))
            )
            assert [_text(r) for r in results] == [f"n{i}" for i in range(50)]

    asyncio.run(main())


@pytest.mark.skipif(MCP_MAJOR < 2, reason="the dual-era Client is in the mcp 2.x line")
def test_dualEraClientFallsBack(proxy: ProxyProcess) -> None:
    """
    The mcp 2.x C{Client} probes with C{server/discover}, falls back to the
    handshake, and works (the key in the query string).
    """

    async def main() -> None:
        from mcp import Client

        async with Client(f"{proxy.url}?api-key={proxy.key}") as client:
            assert client.protocol_version == "2025-11-25"
            result = await client.call_tool("echo", {"text": "dual"})
            assert _text(result) == "dual"

    asyncio.run(main())


def test_refusals(proxy: ProxyProcess, tmp_path: Path) -> None:
    """
    A key for another instance, a revoked key and a deleted session are
    refused with the documented statuses.
    """
    ping = {"jsonrpc": "2.0", "id": 1, "method": "ping"}
    orgs = admin(proxy.database, "org", "list")
    group = admin(proxy.database, "toolgroup", "create", "--org", orgs[0]["id"], "other-group")
    other = admin(
        proxy.database,
        "instance",
        "create",
        "--org",
        orgs[0]["id"],
        "--toolgroup",
        group["id"],
        "other",
    )
    status, body = proxy.request("POST", f"/mcp/{other['id']}", ping, {"X-API-Key": proxy.key})
    assert status == 401
    assert body["error"]["message"] == "API key does not match the requested MCP server"

    revoked = admin(proxy.database, "key", "create", "--instance", proxy.instanceId)
    admin(proxy.database, "key", "revoke", revoked["id"])
    status, body = proxy.request("POST", "/mcp", ping, {"X-API-Key": revoked["key"]})
    assert status == 401
    assert body["error"]["code"] == -32000

    initialize = {
        "jsonrpc": "2.0",
        "id": 0,
        "method": "initialize",
        "params": {
            "protocolVersion": "2025-11-25",
            "capabilities": {},
            "clientInfo": {"name": "t"},
        },
    }
    req = urllib.request.Request(
        proxy.url,
        data=json.dumps(initialize).encode(),
        headers={"X-API-Key": proxy.key, "Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(req, timeout=30) as response:
        sessionId = response.headers["Mcp-Session-Id"]
    headers = {"X-API-Key": proxy.key, "Mcp-Session-Id": sessionId}
    assert proxy.request("POST", f"/mcp/{proxy.instanceId}", ping, headers)[0] == 200
    assert proxy.request("DELETE", f"/mcp/{proxy.instanceId}", None, headers)[0] == 200
    status, body = proxy.request("POST", f"/mcp/{proxy.instanceId}", ping, headers)
    assert status == 404
    assert body["error"]["message"] == "Session not found"
