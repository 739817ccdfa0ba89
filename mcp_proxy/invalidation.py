"""
Keeping a running proxy's caches true to the database.

L{Invalidator} drops what a change makes stale: cached API-key results,
instance configurations, routes and tool catalogs, and the sessions of a
revoked key or a deleted instance.  L{InvalidatingRepository} is an
L{IRepository} for admin work done inside the proxy's process: after each
change it commits, the affected entries are invalidated at once.
"""

from __future__ import annotations

from typing import Any, Iterable, Optional

from attrs import define
from twisted.internet.defer import Deferred, gatherResults
from twisted.logger import Logger
from zope.interface import implementer

from mcp_proxy.auth import Authenticator, ConfigLoader
from mcp_proxy.interfaces import ICache, IRepository
from mcp_proxy.router import Router
from mcp_proxy.session import SessionTable

log = Logger(namespace="mcp_proxy.invalidation")


@define
class Invalidator:
    """
    Drops stale cached state of one proxy.
    """

    authenticator: Authenticator
    configs: ConfigLoader
    configCache: ICache
    authCache: ICache
    router: Router
    sessions: SessionTable

    def keys(
        self, keyHashes: Iterable[Optional[str]], keyIds: Iterable[str] = ()
    ) -> Deferred[None]:
        """
        Forget the cached results of these keys, and end their sessions.
        """
        hashes = [h for h in keyHashes if h]
        ids = set(keyIds)
        steps = [self.authenticator.invalidateKeyHashes(hashes)]
        if ids:
            steps.append(
                self.sessions.closeWhere(lambda s: s.keyId in ids, "API key revoked or expired")
            )
        return _all(steps)

    def instance(
        self, instanceId: str, keyHashes: Iterable[str] = (), endSessions: bool = True
    ) -> Deferred[None]:
        """
        Forget everything cached about an instance, and end its sessions
        (unless C{endSessions} is false: its tools changed, not whether it
        may be used).
        """
        self.router.invalidate(instanceId)
        steps = [
            self.authenticator.invalidateInstance(instanceId),
            self.authenticator.invalidateKeyHashes(list(keyHashes)),
            self.configs.invalidate(instanceId),
        ]
        if endSessions:
            steps.append(
                self.sessions.closeWhere(
                    lambda s: s.instanceId == instanceId, "MCP server instance deleted"
                )
            )
        return _all(steps)

    def everything(self) -> Deferred[None]:
        """
        Forget every cached key result, configuration and catalog (after a
        change whose reach is not known without a query: a tool group, a
        config, a server).
        """
        self.router.invalidateAll()
        self.authenticator.clearLocal()
        self.configs.clearLocal()
        return _all([self.authCache.clear(), self.configCache.clear()])


def _all(steps: list[Deferred[Any]]) -> Deferred[None]:
    def logged(failure: Any) -> None:
        log.failure("cache invalidation failed", failure)

    return gatherResults(steps, consumeErrors=True).addCallbacks(lambda _: None, logged)


@implementer(IRepository)
class InvalidatingRepository:
    """
    An L{IRepository} that invalidates a running proxy's caches after each
    change it makes.  Reads and the request-path methods go straight to the
    wrapped repository.
    """

    def __init__(self, repository: IRepository, invalidator: Invalidator) -> None:
        self._repository = repository
        self._invalidator = invalidator

    def __getattr__(self, name: str) -> Any:
        return getattr(self._repository, name)

    async def _then(self, d: Deferred[Any], invalidate: Any) -> Any:
        result = await d
        await invalidate(result)
        return result

    def revokeApiKey(self, keyId: str) -> Deferred[Any]:
        return Deferred.fromCoroutine(
            self._then(
                self._repository.revokeApiKey(keyId),
                lambda keyHash: self._invalidator.keys([keyHash], [keyId]),
            )
        )

    def setApiKeyExpiry(self, keyId: str, expiresAt: Any) -> Deferred[Any]:
        return Deferred.fromCoroutine(
            self._then(
                self._repository.setApiKeyExpiry(keyId, expiresAt),
                lambda keyHash: self._invalidator.keys(
                    [keyHash], [keyId] if expiresAt is not None else []
                ),
            )
        )

    def deleteInstance(self, instanceId: str) -> Deferred[Any]:
        return Deferred.fromCoroutine(
            self._then(
                self._repository.deleteInstance(instanceId),
                lambda hashes: self._invalidator.instance(instanceId, hashes),
            )
        )

    def _broad(self, d: Deferred[Any]) -> Deferred[Any]:
        return Deferred.fromCoroutine(self._then(d, lambda _: self._invalidator.everything()))

    def setToolGroupTools(self, toolGroupId: str, tools: Any) -> Deferred[Any]:
        return self._broad(self._repository.setToolGroupTools(toolGroupId, tools))

    def setToolGroupEnabled(self, toolGroupId: str, enabled: bool) -> Deferred[Any]:
        return self._broad(self._repository.setToolGroupEnabled(toolGroupId, enabled))

    def updateConfigEnv(self, configId: str, envVars: Any) -> Deferred[Any]:
        return self._broad(self._repository.updateConfigEnv(configId, envVars))

    def deleteConfig(self, configId: str) -> Deferred[Any]:
        return self._broad(self._repository.deleteConfig(configId))

    def deleteServer(self, serverId: str) -> Deferred[Any]:
        return self._broad(self._repository.deleteServer(serverId))

    def syncTools(self, serverId: str, tools: Any) -> Deferred[Any]:
        return self._broad(self._repository.syncTools(serverId, tools))
