"""
A remote MCP server on the official C{mcp} SDK 1.x (FastMCP), for the
remote upstream tests.

usage: remote_fastmcp.py TRANSPORT PORT [--json]

  TRANSPORT   "streamable-http" (endpoint /mcp) or "sse" (GET /sse, POST
              /messages/?session_id=...)
  PORT        the loopback port to listen on
  --json      Streamable HTTP: answer with application/json instead of an
              event stream

Tools: echo, add, slow (progress and log notifications while it runs),
running and cancelled (the request ids of the slow runs in progress, and of
those cancelled).
"""

import sys

import anyio
from mcp.server.fastmcp import Context, FastMCP

transport = sys.argv[1]
port = int(sys.argv[2])

server = FastMCP(
    "remote-test",
    instructions="remote test server",
    host="127.0.0.1",
    port=port,
    json_response="--json" in sys.argv,
    log_level="WARNING",
)

_running: set[str] = set()
_cancelled: list[str] = []


@server.tool()
def echo(text: str) -> str:
    """Return the given text."""
    return text


@server.tool()
def add(a: int, b: int) -> int:
    """Add two numbers."""
    return a + b


@server.tool()
async def slow(steps: int, delay: float, ctx: Context) -> str:
    """Report progress and log a line per step, sleeping between steps."""
    _running.add(str(ctx.request_id))
    try:
        for step in range(1, steps + 1):
            await ctx.report_progress(step, steps, f"step {step}")
            await ctx.info(f"step {step} of {steps}")
            await anyio.sleep(delay)
    except anyio.get_cancelled_exc_class():
        _cancelled.append(str(ctx.request_id))
        raise
    finally:
        _running.discard(str(ctx.request_id))
    return f"done after {steps} steps"


@server.tool()
def running() -> list[str]:
    """The request ids of the slow runs in progress."""
    return sorted(_running)


@server.tool()
def cancelled() -> list[str]:
    """The request ids of the slow runs that were cancelled."""
    return list(_cancelled)


if __name__ == "__main__":
    server.run(transport)
