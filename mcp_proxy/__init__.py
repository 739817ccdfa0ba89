"""
mcp-proxy: an MCP proxy server on Twisted.

Clients connect over HTTP with one API key and see one MCP server whose tools
are gathered from several upstream MCP servers.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
