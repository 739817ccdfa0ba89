"""
The data of mcp-proxy as frozen attrs classes.

The names follow the origin's tables ("McpServer", "UserMcpServerConfig",
"UserToolGroup", "UserMcpServerInstance", "McpApiKey", ...), so that a row
and its class read alike.  Timestamps are naive C{datetime}s in UTC, as the
origin stores them (C{TIMESTAMP(3)} without time zone).
"""

from __future__ import annotations

import datetime
from typing import Any, Mapping, Optional

from attrs import field, frozen

# Transport types of an upstream server ("TransportType" in the origin).
STDIO = "STDIO"
SSE = "SSE"
STREAMABLE_HTTPS = "STREAMABLE_HTTPS"
TRANSPORT_TYPES = (STDIO, SSE, STREAMABLE_HTTPS)

# Authentication types of an instance ("AuthType" in the origin).
AUTH_NONE = "NONE"
AUTH_API_KEY = "API_KEY"
AUTH_OAUTH = "OAUTH"
AUTH_CLOUD_RUN_IAM = "CLOUD_RUN_IAM"
AUTH_TYPES = (AUTH_NONE, AUTH_API_KEY, AUTH_OAUTH, AUTH_CLOUD_RUN_IAM)


def utcnow() -> datetime.datetime:
    """
    The current time as the database stores it: naive UTC, millisecond
    precision.
    """
    now = datetime.datetime.now(datetime.UTC).replace(tzinfo=None)
    return now.replace(microsecond=(now.microsecond // 1000) * 1000)


@frozen
class Organization:
    id: str
    name: str
    createdAt: datetime.datetime


@frozen
class McpServer:
    """
    An upstream MCP server definition: how to reach it, not its secrets.

    @ivar envVars: the I{names} of the environment variables (stdio) or
        headers (remote) that a config must supply.
    """

    id: str
    name: str
    transportType: str
    command: Optional[str]
    args: tuple[str, ...]
    url: Optional[str]
    envVars: tuple[str, ...]
    authType: str
    organizationId: Optional[str]
    createdAt: datetime.datetime


@frozen
class ServerConfig:
    """
    A "UserMcpServerConfig": a server plus the values of its environment.

    @ivar envVars: variable name to value.  Secret: never log or print it.
    """

    id: str
    name: str
    description: str
    envVars: Mapping[str, str] = field(repr=False)
    mcpServerId: str
    organizationId: str
    createdAt: datetime.datetime


@frozen
class Tool:
    id: str
    name: str
    description: str
    inputSchema: Mapping[str, Any]
    mcpServerId: str


@frozen
class ToolGroupTool:
    """
    One whitelisted tool of a tool group, as served through one config.
    """

    configId: str
    toolId: str
    toolName: str
    sortOrder: int = 0


@frozen
class ToolGroup:
    id: str
    name: str
    description: str
    isEnabled: bool
    organizationId: str
    tools: tuple[ToolGroupTool, ...]
    createdAt: datetime.datetime


@frozen
class Instance:
    """
    A "UserMcpServerInstance": what a client connects to.
    """

    id: str
    name: str
    description: str
    toolGroupId: str
    authType: str
    organizationId: str
    createdAt: datetime.datetime
    deletedAt: Optional[datetime.datetime] = None


@frozen
class ApiKey:
    """
    An API key as stored: never the key itself.

    @ivar display: the non-secret display form kept in the "apiKey" column
        (the prefix and the last four characters).
    """

    id: str
    name: str
    display: str
    instanceId: str
    isActive: bool
    expiresAt: Optional[datetime.datetime]
    lastUsedAt: Optional[datetime.datetime]
    createdAt: datetime.datetime


@frozen
class ApiKeyRecord:
    """
    What one query tells about an API key hash: the key and the state of its
    instance and tool group.  The authenticator decides from it.
    """

    keyId: str
    instanceId: str
    organizationId: str
    authType: str
    isActive: bool
    expiresAt: Optional[datetime.datetime]
    instanceDeleted: bool
    toolGroupEnabled: bool


@frozen
class UpstreamConfig:
    """
    Everything needed to reach one upstream of an instance, and which of its
    tools the instance's tool group allows.

    @ivar name: the config's name: the label in tool descriptions.
    @ivar env: config env values.  Secret.
    @ivar toolNames: the whitelist.
    @ivar clientCapabilities: the client capabilities to announce to the
        upstream (C{sampling}, C{elicitation}, C{roots}): the proxy relays
        those requests only for clients that have them, so upstreams of
        clients with different capabilities are separate.
    """

    configId: str
    name: str
    transportType: str
    command: Optional[str]
    args: tuple[str, ...]
    url: Optional[str]
    env: Mapping[str, str] = field(repr=False)
    authType: str
    toolNames: frozenset[str]
    serverId: str = ""
    clientCapabilities: Mapping[str, Any] = field(factory=dict)


@frozen
class InstanceConfig:
    """
    An instance's whole upstream configuration, loaded in one query.

    @ivar upstreams: in a deterministic order (config name, then id).
    """

    instanceId: str
    organizationId: str
    toolGroupId: str
    toolGroupEnabled: bool
    upstreams: tuple[UpstreamConfig, ...]


@frozen
class RequestLogRow:
    """
    One "McpServerRequestLog" row, with its optional "McpServerRequestData".
    """

    id: str
    instanceId: str
    organizationId: str
    toolName: str
    transportType: str
    method: str
    responseStatus: str
    durationMs: int
    errorMessage: Optional[str]
    errorCode: Optional[str]
    inputBytes: Optional[int]
    outputBytes: Optional[int]
    userAgent: Optional[str]
    createdAt: datetime.datetime
    data: Optional[RequestLogData] = None


@frozen
class RequestLogData:
    id: str
    inputDataCompressed: bytes = field(repr=False)
    outputDataCompressed: bytes = field(repr=False)
    originalInputSize: int
    originalOutputSize: int
    compressedInputSize: int
    compressedOutputSize: int
    compressionRatio: float
