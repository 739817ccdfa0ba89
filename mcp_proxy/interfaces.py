"""
The zope.interface interfaces of mcp-proxy.

Every interface here has, or is expected to have, more than one provider:
the repository (SQLite, PostgreSQL), the cache (memory, Redis), the upstream
connection (stdio process, remote HTTP), the request log (in the proxy's
process, or through a writer process).  Each provider is checked with
C{verifyObject} and run through the interface's shared contract tests.
"""

from __future__ import annotations

from zope.interface import Attribute, Interface

# Methods of zope interfaces take no "self"; mypy-zope understands that.
# Every method returning a Deferred is documented with what it fires with.


class IRepository(Interface):
    """
    The persistent store: organizations, servers, configs, tools, tool
    groups, instances, API keys and the request log.

    Every method returns a L{Deferred}.  Database failures errback with
    L{mcp_proxy.errors.DatabaseUnavailable}; bad references with
    L{mcp_proxy.errors.NotFound}; duplicates with
    L{mcp_proxy.errors.Conflict}.  Each admin operation is one transaction.
    """

    queryCounts = Attribute(
        """
        A C{dict} mapping a query kind (C{"lookupApiKey"},
        C{"loadInstanceConfig"}, C{"admin"}, ...) to the number of
        statements sent to the database for it.  Read by the metrics.
        """
    )

    kind = Attribute("""C{"sqlite"} or C{"postgresql"}.""")

    originSchema = Attribute(
        """
        True when the database was created by the origin (Prisma) and is
        used as it is, without mcp-proxy's migrations.
        """
    )

    def start():
        """
        Connect and run pending migrations.

        @return: a Deferred firing with C{None} when the store is usable.
        """

    def stop():
        """
        Close every connection.

        @return: a Deferred firing when closed.
        """

    def migrate():
        """
        Apply pending schema migrations.

        @return: a Deferred firing with the list of applied version names.
        """

    def ping():
        """
        Check that the database answers (C{SELECT 1}).

        @return: a Deferred firing with C{None}, or failing with
            L{DatabaseUnavailable}.
        """

    # -- the request path ---------------------------------------------------

    def lookupApiKey(keyHash):
        """
        Resolve an API key hash, in one query, to the key, its instance and
        its tool group's state.

        @param keyHash: the SHA-256 hex digest of the (salted) key.
        @type keyHash: C{str}
        @return: a Deferred firing with an L{ApiKeyRecord}, or C{None} when
            no key has that hash.
        """

    def loadInstanceConfig(instanceId):
        """
        Load an instance's whole upstream configuration in one query.

        @return: a Deferred firing with an L{InstanceConfig}, or C{None}
            when the instance does not exist or is deleted.
        """

    def touchApiKey(keyId, when):
        """
        Set "lastUsedAt" of a key.

        @return: a Deferred firing with C{None}.
        """

    def insertRequestLogs(rows):
        """
        Write request-log rows (and their data rows) in one transaction with
        multi-row INSERTs.

        @param rows: a sequence of L{RequestLogRow}.
        @return: a Deferred firing with the number of rows written.
        """

    def listRequestLogs(instanceId, since, limit, withData):
        """
        Read request-log rows, newest first.

        @param instanceId: C{None} for every instance.
        @param since: a naive UTC C{datetime}, or C{None}.
        @param limit: the maximum number of rows.
        @param withData: also read the compressed data rows.
        @return: a Deferred firing with a list of L{RequestLogRow}.
        """

    # -- administration -----------------------------------------------------

    def createOrganization(name):
        """@return: Deferred firing with the new L{Organization}."""

    def listOrganizations():
        """@return: Deferred firing with a list of L{Organization}."""

    def getOrganization(orgId):
        """@return: Deferred firing with the L{Organization} or failing with NotFound."""

    def createServer(name, transportType, command, args, url, envVars, authType, organizationId):
        """@return: Deferred firing with the new L{McpServer}."""

    def listServers():
        """@return: Deferred firing with a list of L{McpServer}."""

    def getServer(serverId):
        """@return: Deferred firing with the L{McpServer} or failing with NotFound."""

    def deleteServer(serverId):
        """
        Delete a server with its configs, tools and their tool-group entries.

        @return: Deferred firing with C{None}.
        """

    def createConfig(serverId, name, description, envVars, organizationId):
        """@return: Deferred firing with the new L{ServerConfig}."""

    def listConfigs(organizationId):
        """@return: Deferred firing with a list of L{ServerConfig} (all when C{None})."""

    def getConfig(configId):
        """@return: Deferred firing with the L{ServerConfig} or failing with NotFound."""

    def updateConfigEnv(configId, envVars):
        """@return: Deferred firing with the updated L{ServerConfig}."""

    def deleteConfig(configId):
        """@return: Deferred firing with C{None}."""

    def syncTools(serverId, tools):
        """
        Make the "Tool" rows of a server match C{tools}: insert new names,
        update descriptions and schemas, keep the others.

        @param tools: a sequence of C{(name, description, inputSchema)}.
        @return: Deferred firing with the server's list of L{Tool}.
        """

    def listTools(serverId):
        """@return: Deferred firing with the server's list of L{Tool}, by name."""

    def createToolGroup(organizationId, name, description, tools):
        """
        @param tools: a sequence of C{(configId, toolName)}; each name must
            be a "Tool" of that config's server.
        @return: Deferred firing with the new L{ToolGroup}.
        """

    def setToolGroupTools(toolGroupId, tools):
        """
        Replace the whitelist of a tool group.

        @return: Deferred firing with the updated L{ToolGroup}.
        """

    def setToolGroupEnabled(toolGroupId, enabled):
        """@return: Deferred firing with the updated L{ToolGroup}."""

    def getToolGroup(toolGroupId):
        """@return: Deferred firing with the L{ToolGroup} or failing with NotFound."""

    def listToolGroups(organizationId):
        """@return: Deferred firing with a list of L{ToolGroup} (all when C{None})."""

    def createInstance(organizationId, name, description, toolGroupId, authType):
        """@return: Deferred firing with the new L{Instance}."""

    def getInstance(instanceId):
        """
        @return: Deferred firing with the L{Instance} (deleted ones too) or
            failing with NotFound.
        """

    def listInstances(organizationId, includeDeleted):
        """@return: Deferred firing with a list of L{Instance}."""

    def deleteInstance(instanceId):
        """
        Soft-delete: set "deletedAt".

        @return: Deferred firing with the key hashes of the instance's keys,
            so that callers can invalidate cached entries.
        """

    def createApiKey(instanceId, name, keyHash, display, expiresAt):
        """@return: Deferred firing with the new L{ApiKey}."""

    def listApiKeys(instanceId):
        """@return: Deferred firing with a list of L{ApiKey} (all when C{None})."""

    def revokeApiKey(keyId):
        """
        Set "isActive" to false.

        @return: Deferred firing with the key's hash.
        """

    def setApiKeyExpiry(keyId, expiresAt):
        """
        @param expiresAt: naive UTC C{datetime}, or C{None} for never.
        @return: Deferred firing with the key's hash.
        """


class ICache(Interface):
    """
    A key/value cache with a time to live, shared by the authenticator and
    the configuration loader.  Providers: in-memory LRU+TTL, Redis.

    Keys are C{str}.  Values are frozen attrs objects, C{dict}s, lists and
    scalars; a shared provider must encode them.  A value of C{None} cannot
    be stored (a miss reads as C{None}).
    """

    stats = Attribute(
        """
        A C{dict} with the counters C{"hits"}, C{"misses"}, C{"sets"},
        C{"evictions"}, C{"deletes"}.
        """
    )

    def get(key):
        """
        @return: a Deferred firing with the value, or C{None} on a miss or
            an expired entry.
        """

    def set(key, value, ttl):
        """
        Store C{value} for C{ttl} seconds (C{None}: the provider's default).

        @return: a Deferred firing with C{None}.
        """

    def delete(keys):
        """
        Remove entries.

        @param keys: an iterable of C{str}.
        @return: a Deferred firing with C{None}.
        """

    def clear():
        """
        Remove every entry.

        @return: a Deferred firing with C{None}.
        """


class IUpstream(Interface):
    """
    One connection to one upstream MCP server (a stdio process, or a remote
    Streamable HTTP / SSE session), after its initialize handshake.  Many
    requests may be in flight at once.
    """

    name = Attribute("""The config name, for logs and errors.""")
    serverCapabilities = Attribute("""The upstream's capabilities C{dict}.""")
    serverInfo = Attribute("""The upstream's serverInfo C{dict}.""")
    protocolVersion = Attribute("""The negotiated protocol version.""")
    alive = Attribute("""False once the connection or process has ended.""")
    inFlight = Attribute("""The number of requests awaiting a response.""")

    def start():
        """
        Connect (or spawn) and run the initialize handshake.

        @return: a Deferred firing with C{None}, or failing with
            L{mcp_proxy.upstream.UpstreamError}.
        """

    def request(method, params, timeout):
        """
        Send a request.  Cancelling the returned Deferred, or its timeout,
        sends C{notifications/cancelled} upstream.

        @param params: a C{dict} or C{None}.
        @param timeout: seconds.
        @return: a Deferred firing with the result C{dict}, or failing with
            L{mcp_proxy.upstream.UpstreamError} (which carries an upstream
            JSON-RPC error code when there is one).
        """

    def notify(method, params):
        """
        Send a notification.
        """

    def stop():
        """
        Close the connection; for a process: close stdin, then terminate,
        then kill its whole process group.

        @return: a Deferred firing once it has ended.
        """


class IRequestLog(Interface):
    """
    The request log: one row per logged MCP request, written later, in
    batches (L{mcp_proxy.requestlog.RequestLog} in the proxy's process,
    L{mcp_proxy.logwriter.ProcessRequestLog} through a writer process).
    """

    queued = Attribute("Rows recorded.")
    written = Attribute("Rows written.")
    dropped = Attribute("Rows dropped (queue full, writer gone, stop timeout).")
    refused = Attribute("Rows the database refused for good, or that could not be built.")
    failedWrites = Attribute("Inserts that failed and were retried.")
    batches = Attribute("Inserts that succeeded.")
    queueDepth = Attribute("Rows recorded and neither written nor dropped yet.")

    def record(
        ctx,
        method,
        params,
        result,
        error,
        durationMs,
        inputBytes=None,
        userAgent=None,
        validationMode=False,
        requestBytes=None,
    ):
        """
        Log one answered request, later; this only queues references (it
        is called on the response path).  Methods other than tools/call,
        tools/list, resources/read and prompts/get, and requests in
        validation mode, are not logged.
        """

    def start():
        """
        Start writing (rows recorded before are kept).
        """

    def flush():
        """
        Write what was recorded so far without waiting for a batch to fill.

        @return: a Deferred firing once it is written (or dropped).
        """

    def stop():
        """
        Write everything recorded, for at most the stop timeout, and stop.

        @return: a Deferred firing when done; it never fails.
        """
