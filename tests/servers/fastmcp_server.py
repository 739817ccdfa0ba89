"""
An stdio MCP server built on the official C{mcp} SDK 1.x (FastMCP), to
check that the proxy's upstream side talks to it.
"""

from mcp.server.fastmcp import FastMCP

server = FastMCP("fastmcp-test")


@server.tool()
def echo(text: str) -> str:
    """Return the given text."""
    return text


@server.tool()
def add(a: int, b: int) -> int:
    """Add two numbers."""
    return a + b


if __name__ == "__main__":
    server.run("stdio")
