"""
twistd plugin for mcp-proxy: C{twistd -n mcpproxy}.

Lazy on purpose: L{ServiceMaker} imports L{mcp_proxy.tap} only when twistd
needs the options or the service, so an import error in the application is
reported instead of making the plugin disappear.
"""

from twisted.application.service import ServiceMaker

mcpproxy = ServiceMaker(
    "MCP proxy",
    "mcp_proxy.tap",
    "An MCP (Model Context Protocol) proxy: one authenticated endpoint in "
    "front of many upstream MCP servers.",
    "mcpproxy",
)
