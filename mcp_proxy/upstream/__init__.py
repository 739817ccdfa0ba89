"""
Connections to upstream MCP servers, and the pool that owns them.

An upstream is one L{IUpstream<mcp_proxy.interfaces.IUpstream>} provider:
L{StdioUpstream} spawns a local process; remote (HTTP, SSE) upstreams plug
into L{UpstreamPool} through its C{upstreamFactory}.  Every failure is an
L{UpstreamError}.
"""

from __future__ import annotations

from typing import Any, Optional

from mcp_proxy.jsonrpc import INTERNAL_ERROR, REQUEST_TIMEOUT


class UpstreamError(Exception):
    """
    A call to an upstream failed.

    @ivar message: a human-readable message, safe to show to a client (no
        secrets: never an env value or a full command line).
    @ivar code: the JSON-RPC error code: the upstream's own when
        C{fromUpstream} is true, else one the proxy chose (or C{None}: the
        caller picks one, usually -32603).
    @ivar data: the upstream's C{error.data}, or C{None}.
    @ivar fromUpstream: true when the upstream answered with this JSON-RPC
        error; false when the proxy failed to get an answer.
    """

    defaultCode: Optional[int] = None

    def __init__(
        self,
        message: str,
        code: Optional[int] = None,
        data: Any = None,
        fromUpstream: bool = False,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.code = self.defaultCode if code is None else code
        self.data = data
        self.fromUpstream = fromUpstream

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.message!r}, code={self.code!r})"


class UpstreamTimeout(UpstreamError):
    """
    The upstream did not answer in time.  The request was cancelled upstream
    with C{notifications/cancelled}.
    """

    defaultCode = REQUEST_TIMEOUT


class UpstreamUnavailable(UpstreamError):
    """
    The upstream cannot take requests: it could not be started, it is not
    running, or it is waiting to be restarted.

    @ivar retryAfter: seconds until the next start attempt, or C{None}.
    """

    defaultCode = INTERNAL_ERROR

    def __init__(
        self,
        message: str,
        code: Optional[int] = None,
        data: Any = None,
        retryAfter: Optional[float] = None,
    ) -> None:
        super().__init__(message, code, data)
        self.retryAfter = retryAfter


class UpstreamExited(UpstreamUnavailable):
    """
    The upstream process ended while requests were in flight.

    @ivar status: the exit status, or C{None} when it was killed by a signal.
    @ivar signal: the signal number that killed it, or C{None}.
    """

    def __init__(self, message: str, status: Optional[int], signal: Optional[int]) -> None:
        super().__init__(message)
        self.status = status
        self.signal = signal


# The submodules import the errors above from this package.
from mcp_proxy.upstream._peer import (  # noqa: E402
    LATEST_PROTOCOL_VERSION,
    SUPPORTED_PROTOCOL_VERSIONS,
)
from mcp_proxy.upstream.pool import (  # noqa: E402
    UpstreamFactory,
    UpstreamPool,
    byTransport,
    discoverTools,
    stdioFactory,
)
from mcp_proxy.upstream.stdio import (  # noqa: E402
    SAFE_ENV_NAMES,
    StdioUpstream,
    childEnvironment,
    resolveCommand,
)

__all__ = [
    "LATEST_PROTOCOL_VERSION",
    "SAFE_ENV_NAMES",
    "SUPPORTED_PROTOCOL_VERSIONS",
    "StdioUpstream",
    "UpstreamError",
    "UpstreamExited",
    "UpstreamFactory",
    "UpstreamPool",
    "UpstreamTimeout",
    "UpstreamUnavailable",
    "byTransport",
    "childEnvironment",
    "discoverTools",
    "resolveCommand",
    "stdioFactory",
]
