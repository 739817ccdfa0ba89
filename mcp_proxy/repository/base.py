"""
What the two repository providers share: the L{IRepository} methods (each
one a plan from L{mcp_proxy.repository.plans}), running state, timeouts,
cancellation and the draining of operations on stop.
"""

from __future__ import annotations

import datetime
from abc import ABCMeta, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Optional, TypeVar

from twisted.internet.defer import CancelledError, Deferred, fail
from twisted.internet.defer import TimeoutError as DeferredTimeout
from twisted.python.failure import Failure

from mcp_proxy import models as m
from mcp_proxy.errors import DatabaseUnavailable, ProxyError
from mcp_proxy.repository import plans
from mcp_proxy.repository.plans import Operation
from mcp_proxy.repository.schema import Migration

T = TypeVar("T")

NEW = "new"
STARTING = "starting"
RUNNING = "running"
STOPPING = "stopping"
STOPPED = "stopped"


def cancellable(inner: Deferred[T], cancel: Callable[[], object]) -> Deferred[T]:
    """
    A Deferred that fires with C{inner}'s result and, when cancelled, calls
    C{cancel} instead of cancelling C{inner}: it fails at once with
    L{CancelledError}, and C{inner}'s late result is dropped.

    This is the wrapper of twisted-notes section 3.3: txpostgres must finish
    a cancelled query before its connection is used again, so C{inner} is
    left to end on its own.
    """

    def canceller(_: Deferred[T]) -> None:
        cancel()

    outer: Deferred[T] = Deferred(canceller)

    def forward(result: Any) -> None:
        if not outer.called:
            if isinstance(result, Failure):
                outer.errback(result)
            else:
                outer.callback(result)

    inner.addBoth(forward)
    return outer


class RepositoryBase(metaclass=ABCMeta):
    """
    The provider-independent part of a repository.  A subclass (an attrs
    class) provides the attributes below and L{_submit}, L{_translate},
    L{_open} and L{_close}.
    """

    kind: str
    reactor: Any
    queryTimeout: float
    queryCounts: dict[str, int]
    originSchema: bool
    migrations: tuple[Migration, ...]
    _state: str
    _inflight: set[Deferred[Any]]
    _drainWaiters: list[Deferred[None]]

    # -- provider hooks -------------------------------------------------------

    @abstractmethod
    def _submit(self, op: Operation[T]) -> tuple[Deferred[T], Callable[[], object]]:
        """
        Start running C{op}.

        @return: its Deferred and a function that cancels it.
        """

    @abstractmethod
    def _translate(self, error: BaseException, sql: str = "") -> Optional[BaseException]:
        """
        The mcp-proxy error for a driver error, or C{None} to keep it.

        @param sql: the failed statement, when known.
        """

    @abstractmethod
    async def _open(self) -> None:
        """
        Connect.
        """

    @abstractmethod
    def _close(self) -> None:
        """
        Close every connection.
        """

    # -- running operations ---------------------------------------------------

    def _count(self, kind: str) -> None:
        self.queryCounts[kind] = self.queryCounts.get(kind, 0) + 1

    def _run(self, op: Operation[T]) -> Deferred[T]:
        """
        Run an operation with a timeout, mapping its errors.
        """
        if self._state not in (STARTING, RUNNING):
            op.steps.close()
            return fail(DatabaseUnavailable(f"the {self.kind} repository is {self._state}"))
        inner, cancel = self._submit(op)
        self._inflight.add(inner)
        inner.addBoth(self._finished, inner)
        outer = cancellable(inner, cancel)
        timeout = op.timeout if op.timeout is not None else self.queryTimeout
        outer.addTimeout(timeout, self.reactor)
        outer.addErrback(self._failed, op.name, timeout)
        return outer

    def _finished(self, result: object, inner: Deferred[Any]) -> object:
        self._inflight.discard(inner)
        if not self._inflight:
            waiters, self._drainWaiters = self._drainWaiters, []
            for waiter in waiters:
                waiter.callback(None)
        return result

    def _failed(self, failure: Failure, name: str, timeout: float) -> Failure:
        error = failure.value
        assert error is not None
        if isinstance(error, DeferredTimeout):
            return Failure(DatabaseUnavailable(f"{name} timed out after {timeout:g} s"))
        if isinstance(error, (ProxyError, CancelledError)):
            return failure
        mapped = self._translate(error)
        if mapped is None:
            return failure
        mapped.__cause__ = error
        return Failure(mapped)

    # -- life cycle -----------------------------------------------------------

    def start(self) -> Deferred[None]:
        """
        Connect and run pending migrations.
        """
        return Deferred.fromCoroutine(self._start())

    async def _start(self) -> None:
        if self._state == RUNNING:
            return
        if self._state != NEW:
            raise DatabaseUnavailable(f"the {self.kind} repository is {self._state}")
        self._state = STARTING
        try:
            await self._open()
            await self.migrate()
        except BaseException:
            self._state = STOPPED
            self._close()
            raise
        self._state = RUNNING

    def stop(self) -> Deferred[None]:
        """
        Refuse new operations, let running ones end (for at most the query
        timeout) and close every connection.
        """
        return Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        if self._state in (NEW, STOPPED):
            self._state = STOPPED
            return
        if self._state == STOPPING:
            raise DatabaseUnavailable(f"the {self.kind} repository is stopping already")
        self._state = STOPPING
        if self._inflight:
            drained: Deferred[None] = Deferred()
            self._drainWaiters.append(drained)
            drained.addTimeout(self.queryTimeout, self.reactor)
            try:
                await drained
            except DeferredTimeout:
                pass
        self._close()
        self._state = STOPPED

    def migrate(self) -> Deferred[list[str]]:
        """
        Apply pending migrations, each in its own transaction; none on an
        origin database.
        """
        return Deferred.fromCoroutine(self._migrate())

    async def _migrate(self) -> list[str]:
        state = await self._run(plans.inspectSchema(self.kind))
        if state.origin:
            self.originSchema = True
            return []
        applied = []
        for migration in self.migrations:
            if migration.version in state.applied:
                continue
            if await self._run(plans.applyMigration(self.kind, migration)):
                applied.append(migration.version)
        return applied

    def ping(self) -> Deferred[None]:
        """
        C{SELECT 1}.
        """
        return self._run(plans.ping())

    # -- the request path -----------------------------------------------------

    def lookupApiKey(self, keyHash: str) -> Deferred[Optional[m.ApiKeyRecord]]:
        """
        See L{IRepository.lookupApiKey}.
        """
        return self._run(plans.lookupApiKey(keyHash))

    def loadInstanceConfig(self, instanceId: str) -> Deferred[Optional[m.InstanceConfig]]:
        """
        See L{IRepository.loadInstanceConfig}.
        """
        return self._run(plans.loadInstanceConfig(instanceId))

    def touchApiKey(self, keyId: str, when: datetime.datetime) -> Deferred[None]:
        """
        See L{IRepository.touchApiKey}.
        """
        return self._run(plans.touchApiKey(keyId, when))

    def insertRequestLogs(self, rows: Sequence[m.RequestLogRow]) -> Deferred[int]:
        """
        See L{IRepository.insertRequestLogs}.
        """
        return self._run(plans.insertRequestLogs(rows, self.kind))

    def listRequestLogs(
        self,
        instanceId: Optional[str],
        since: Optional[datetime.datetime],
        limit: int,
        withData: bool,
    ) -> Deferred[list[m.RequestLogRow]]:
        """
        See L{IRepository.listRequestLogs}.
        """
        return self._run(plans.listRequestLogs(instanceId, since, limit, withData))

    # -- administration -------------------------------------------------------

    def createOrganization(self, name: str) -> Deferred[m.Organization]:
        """
        See L{IRepository.createOrganization}.
        """
        return self._run(plans.createOrganization(name))

    def listOrganizations(self) -> Deferred[list[m.Organization]]:
        """
        See L{IRepository.listOrganizations}.
        """
        return self._run(plans.listOrganizations())

    def getOrganization(self, orgId: str) -> Deferred[m.Organization]:
        """
        See L{IRepository.getOrganization}.
        """
        return self._run(plans.getOrganization(orgId))

    def createServer(
        self,
        name: str,
        transportType: str,
        command: Optional[str],
        args: Sequence[str],
        url: Optional[str],
        envVars: Sequence[str],
        authType: str,
        organizationId: Optional[str],
    ) -> Deferred[m.McpServer]:
        """
        See L{IRepository.createServer}.
        """
        return self._run(
            plans.createServer(
                name, transportType, command, args, url, envVars, authType, organizationId
            )
        )

    def listServers(self) -> Deferred[list[m.McpServer]]:
        """
        See L{IRepository.listServers}.
        """
        return self._run(plans.listServers())

    def getServer(self, serverId: str) -> Deferred[m.McpServer]:
        """
        See L{IRepository.getServer}.
        """
        return self._run(plans.getServer(serverId))

    def deleteServer(self, serverId: str) -> Deferred[None]:
        """
        See L{IRepository.deleteServer}.
        """
        return self._run(plans.deleteServer(serverId))

    def createConfig(
        self,
        serverId: str,
        name: str,
        description: Optional[str],
        envVars: Mapping[str, str],
        organizationId: str,
    ) -> Deferred[m.ServerConfig]:
        """
        See L{IRepository.createConfig}.
        """
        return self._run(plans.createConfig(serverId, name, description, envVars, organizationId))

    def listConfigs(self, organizationId: Optional[str]) -> Deferred[list[m.ServerConfig]]:
        """
        See L{IRepository.listConfigs}.
        """
        return self._run(plans.listConfigs(organizationId))

    def getConfig(self, configId: str) -> Deferred[m.ServerConfig]:
        """
        See L{IRepository.getConfig}.
        """
        return self._run(plans.getConfig(configId))

    def updateConfigEnv(
        self, configId: str, envVars: Mapping[str, str]
    ) -> Deferred[m.ServerConfig]:
        """
        See L{IRepository.updateConfigEnv}.
        """
        return self._run(plans.updateConfigEnv(configId, envVars))

    def deleteConfig(self, configId: str) -> Deferred[None]:
        """
        See L{IRepository.deleteConfig}.
        """
        return self._run(plans.deleteConfig(configId))

    def syncTools(
        self, serverId: str, tools: Sequence[tuple[str, str, Mapping[str, Any]]]
    ) -> Deferred[list[m.Tool]]:
        """
        See L{IRepository.syncTools}.
        """
        return self._run(plans.syncTools(serverId, tools))

    def listTools(self, serverId: str) -> Deferred[list[m.Tool]]:
        """
        See L{IRepository.listTools}.
        """
        return self._run(plans.listTools(serverId))

    def createToolGroup(
        self,
        organizationId: str,
        name: str,
        description: Optional[str],
        tools: Sequence[tuple[str, str]],
    ) -> Deferred[m.ToolGroup]:
        """
        See L{IRepository.createToolGroup}.
        """
        return self._run(plans.createToolGroup(organizationId, name, description, tools))

    def setToolGroupTools(
        self, toolGroupId: str, tools: Sequence[tuple[str, str]]
    ) -> Deferred[m.ToolGroup]:
        """
        See L{IRepository.setToolGroupTools}.
        """
        return self._run(plans.setToolGroupTools(toolGroupId, tools))

    def setToolGroupEnabled(self, toolGroupId: str, enabled: bool) -> Deferred[m.ToolGroup]:
        """
        See L{IRepository.setToolGroupEnabled}.
        """
        return self._run(plans.setToolGroupEnabled(toolGroupId, enabled))

    def getToolGroup(self, toolGroupId: str) -> Deferred[m.ToolGroup]:
        """
        See L{IRepository.getToolGroup}.
        """
        return self._run(plans.getToolGroup(toolGroupId))

    def listToolGroups(self, organizationId: Optional[str]) -> Deferred[list[m.ToolGroup]]:
        """
        See L{IRepository.listToolGroups}.
        """
        return self._run(plans.listToolGroups(organizationId))

    def createInstance(
        self,
        organizationId: str,
        name: str,
        description: Optional[str],
        toolGroupId: str,
        authType: str,
    ) -> Deferred[m.Instance]:
        """
        See L{IRepository.createInstance}.
        """
        return self._run(
            plans.createInstance(organizationId, name, description, toolGroupId, authType)
        )

    def getInstance(self, instanceId: str) -> Deferred[m.Instance]:
        """
        See L{IRepository.getInstance}.
        """
        return self._run(plans.getInstance(instanceId))

    def listInstances(
        self, organizationId: Optional[str], includeDeleted: bool
    ) -> Deferred[list[m.Instance]]:
        """
        See L{IRepository.listInstances}.
        """
        return self._run(plans.listInstances(organizationId, includeDeleted))

    def deleteInstance(self, instanceId: str) -> Deferred[list[str]]:
        """
        See L{IRepository.deleteInstance}.
        """
        return self._run(plans.deleteInstance(instanceId))

    def createApiKey(
        self,
        instanceId: str,
        name: str,
        keyHash: str,
        display: str,
        expiresAt: Optional[datetime.datetime],
    ) -> Deferred[m.ApiKey]:
        """
        See L{IRepository.createApiKey}.
        """
        return self._run(plans.createApiKey(instanceId, name, keyHash, display, expiresAt))

    def listApiKeys(self, instanceId: Optional[str]) -> Deferred[list[m.ApiKey]]:
        """
        See L{IRepository.listApiKeys}.
        """
        return self._run(plans.listApiKeys(instanceId))

    def revokeApiKey(self, keyId: str) -> Deferred[Optional[str]]:
        """
        See L{IRepository.revokeApiKey}.
        """
        return self._run(plans.revokeApiKey(keyId))

    def setApiKeyExpiry(
        self, keyId: str, expiresAt: Optional[datetime.datetime]
    ) -> Deferred[Optional[str]]:
        """
        See L{IRepository.setApiKeyExpiry}.
        """
        return self._run(plans.setApiKeyExpiry(keyId, expiresAt))
