"""
A stdio MCP server (mcp 1.x FastMCP) that sends everything a proxy must
relay: progress, log messages, a sampling request, resource updates.
"""

from __future__ import annotations

import asyncio
from typing import Any

from mcp import types
from mcp.server.fastmcp import Context, FastMCP
from pydantic import AnyUrl

server = FastMCP("relay")


@server.tool()
async def progress(steps: int, ctx: Context[Any, Any, Any]) -> str:
    """Report progress C{steps} times."""
    for i in range(steps):
        await ctx.report_progress(i + 1, steps, f"step {i + 1}")
    return "progressed"


@server.tool()
async def chatty(label: str, ctx: Context[Any, Any, Any]) -> str:
    """Send a log message naming C{label}."""
    await ctx.info(f"log from {label}")
    return label


@server.tool()
async def ask(prompt: str, ctx: Context[Any, Any, Any]) -> str:
    """Ask the client's LLM and return its answer."""
    result = await ctx.session.create_message(
        messages=[
            types.SamplingMessage(role="user", content=types.TextContent(type="text", text=prompt))
        ],
        max_tokens=10,
    )
    content = result.content
    return content.text if isinstance(content, types.TextContent) else "?"


@server.tool()
async def touch(uri: str, ctx: Context[Any, Any, Any]) -> str:
    """Say that the resource C{uri} changed."""
    await ctx.session.send_resource_updated(AnyUrl(uri))
    return "touched"


@server.tool()
async def slow(seconds: float) -> str:
    """Answer after C{seconds}."""
    await asyncio.sleep(seconds)
    return "slow done"


@server.resource("test://watched", name="watched", description="A watched resource.")
def watched() -> str:
    return "watched text"


lowlevel = server._mcp_server


@lowlevel.subscribe_resource()
async def subscribe(uri: AnyUrl) -> None:
    return None


@lowlevel.unsubscribe_resource()
async def unsubscribe(uri: AnyUrl) -> None:
    return None


_declared = lowlevel.get_capabilities


def _capabilities(
    options: Any, experimental: dict[str, dict[str, Any]]
) -> types.ServerCapabilities:
    result = _declared(options, experimental)
    if result.resources is not None:
        result.resources.subscribe = True
    return result


lowlevel.get_capabilities = _capabilities  # type: ignore[method-assign]

if __name__ == "__main__":
    server.run("stdio")
