"""
End-to-end: what upstreams send on their own crosses the proxy to the right
client.  Two SDK client sessions are open at once on one instance, served
by ONE upstream process; each gets only its own progress, log messages,
sampling requests and resource updates.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import json
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any, Iterator

import pytest
from _proxyharness import ProxyProcess, startProxy

pytestmark = pytest.mark.skipif(
    importlib.metadata.version("mcp").startswith("2."),
    reason="the relay test server is built on the mcp 1.x FastMCP",
)

SERVER = Path(__file__).resolve().parent / "servers" / "relay_server.py"


@pytest.fixture(scope="module")
def proxy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxyProcess]:
    running = startProxy(
        tmp_path_factory.mktemp("relay"),
        servers={"relay": {"command": sys.executable, "args": [str(SERVER)]}},
    )
    try:
        yield running
    finally:
        log = running.stop()
        assert "Traceback" not in log, log


class Client:
    """
    One SDK client session that records everything it receives.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self.logs: list[Any] = []
        self.samplings: list[Any] = []
        self.notifications: list[Any] = []

    async def sampling(self, context: Any, params: Any) -> Any:
        from mcp import types

        self.samplings.append(params)
        return types.CreateMessageResult(
            role="assistant",
            content=types.TextContent(type="text", text=f"answer for {self.name}"),
            model="test-model",
        )

    async def logging(self, params: Any) -> None:
        self.logs.append(params)

    async def messages(self, message: Any) -> None:
        root = getattr(message, "root", None)
        if root is not None:
            self.notifications.append(root)

    async def open(self, stack: AsyncExitStack, proxy: ProxyProcess) -> Any:
        from mcp import ClientSession
        from mcp.client.streamable_http import streamablehttp_client

        read, write, _ = await stack.enter_async_context(
            streamablehttp_client(proxy.url, headers={"X-API-Key": proxy.key})
        )
        session = await stack.enter_async_context(
            ClientSession(
                read,
                write,
                sampling_callback=self.sampling,
                logging_callback=self.logging,
                message_handler=self.messages,
            )
        )
        await session.initialize()
        return session


def _text(result: Any) -> str:
    return str(result.content[0].text)


def test_twoSessionsGetOnlyTheirOwnMessages(proxy: ProxyProcess) -> None:
    """
    Progress, log messages, sampling and a resource update each reach only
    the session they belong to.
    """

    async def main() -> None:
        a, b = Client("a"), Client("b")
        async with AsyncExitStack() as stack:
            sa = await a.open(stack, proxy)
            sb = await b.open(stack, proxy)

            # Progress: only A asked, only A hears, with its own token.
            seen: list[tuple[float, Any]] = []

            async def onProgress(progress: float, total: Any, message: Any) -> None:
                seen.append((progress, total))

            result = await sa.call_tool("progress", {"steps": 3}, progress_callback=onProgress)
            assert _text(result) == "progressed"
            assert seen == [(1.0, 3.0), (2.0, 3.0), (3.0, 3.0)], seen

            # Log messages go to the session whose call caused them.
            await sa.set_logging_level("debug")
            await sb.set_logging_level("debug")
            assert _text(await sb.call_tool("chatty", {"label": "from-b"})) == "from-b"
            assert _text(await sa.call_tool("chatty", {"label": "from-a"})) == "from-a"
            assert [p.data for p in a.logs] == ["log from from-a"], a.logs
            assert [p.data for p in b.logs] == ["log from from-b"], b.logs

            # Sampling: the request is relayed to the calling client only.
            assert _text(await sb.call_tool("ask", {"prompt": "hi"})) == "answer for b"
            assert len(b.samplings) == 1 and a.samplings == []

            # Resource updates go to subscribers only, whoever caused them.
            await sa.subscribe_resource("test://watched")
            assert _text(await sb.call_tool("touch", {"uri": "test://watched"})) == "touched"
            for _ in range(500):
                if any(_isUpdate(n) for n in a.notifications):
                    break
                await asyncio.sleep(0.02)
            assert any(_isUpdate(n) for n in a.notifications)
            assert not any(_isUpdate(n) for n in b.notifications)

    asyncio.run(main())
    _status, health = proxy.request("GET", "/health")
    pids = [pid for entry in health["upstreams"] for pid in entry["pids"]]
    assert len(pids) == 1, json.dumps(health)


def _isUpdate(notification: Any) -> bool:
    return getattr(notification, "method", None) == "notifications/resources/updated"


def test_cancellation(proxy: ProxyProcess) -> None:
    """
    A client's notifications/cancelled reaches the upstream call: the
    upstream request ends long before its 30 s, the POST is answered, and
    the session keeps working.
    """
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
    request = urllib.request.Request(
        proxy.url,
        data=json.dumps(initialize).encode(),
        headers={"X-API-Key": proxy.key, "Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        sessionId = response.headers["Mcp-Session-Id"]
    headers = {"X-API-Key": proxy.key, "Mcp-Session-Id": sessionId}
    call = {
        "jsonrpc": "2.0",
        "id": 77,
        "method": "tools/call",
        "params": {"name": "slow", "arguments": {"seconds": 30}},
    }
    with ThreadPoolExecutor(1) as pool:
        answer = pool.submit(proxy.request, "POST", f"/mcp/{proxy.instanceId}", call, headers)
        deadline = time.monotonic() + 10
        while _inFlight(proxy) != 1 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert _inFlight(proxy) == 1
        cancel = {
            "jsonrpc": "2.0",
            "method": "notifications/cancelled",
            "params": {"requestId": 77, "reason": "changed my mind"},
        }
        status, _ = proxy.request("POST", f"/mcp/{proxy.instanceId}", cancel, headers)
        assert status == 202
        status, body = answer.result(timeout=10)
    assert status == 200
    assert body["error"]["code"] == -32800
    deadline = time.monotonic() + 5
    while _inFlight(proxy) != 0 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert _inFlight(proxy) == 0
    ping = {"jsonrpc": "2.0", "id": 78, "method": "ping"}
    assert proxy.request("POST", f"/mcp/{proxy.instanceId}", ping, headers)[0] == 200


def _inFlight(proxy: ProxyProcess) -> int:
    _, health = proxy.request("GET", "/health")
    return sum(entry["inFlight"] for entry in health["upstreams"])
