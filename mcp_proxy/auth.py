"""
API-key authentication and the cached loading of instance configurations.

L{Authenticator} turns an API key into a L{Principal} or an L{AuthError}
carrying the origin's status and message.  It looks keys up by their salted
SHA-256 hash only (the cache key is C{"auth:" + hash}, never the key),
shares one lookup among concurrent misses for a hash, caches refusals
briefly and database errors never, and re-checks the key's expiry against
the clock on every use.

L{ConfigLoader} caches L{InstanceConfig}s behind the same L{ICache}.

Both depend on L{IKeyLookup}, the three repository calls of the request
path; L{RepositoryKeyLookup} adapts an L{IRepository} to it.
"""

from __future__ import annotations

import datetime
import re
from collections import OrderedDict
from typing import Any, Iterable, Mapping, Optional, Sequence

from attrs import define, field, frozen
from twisted.internet.defer import CancelledError, Deferred, fail, maybeDeferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http_headers import Headers
from zope.interface import Interface, implementer

from mcp_proxy.cache import LocalEntries, SingleFlight
from mcp_proxy.errors import DatabaseUnavailable, ProxyError
from mcp_proxy.interfaces import ICache, IRepository
from mcp_proxy.keys import hashApiKey
from mcp_proxy.models import (
    AUTH_API_KEY,
    AUTH_NONE,
    AUTH_OAUTH,
    ApiKeyRecord,
    InstanceConfig,
)

log = Logger()

AUTH_CACHE_PREFIX = "auth:"
CONFIG_CACHE_PREFIX = "config:"

# JSON-RPC error codes of the origin's error responses.
SERVER_ERROR = -32000
INTERNAL_ERROR = -32603

MSG_KEY_REQUIRED = "API key is required"
MSG_INVALID_KEY = "Invalid or expired API key"
MSG_INSTANCE_DELETED = "MCP server instance has been deleted"
MSG_TOOL_GROUP_DISABLED = "Tool group is disabled"
MSG_AUTH_NONE = "Authentication type NONE is not allowed for security reasons"
MSG_OAUTH_REQUIRED = "OAuth authentication required for this server"
MSG_BAD_AUTH_CONFIG = "Internal error: Invalid authentication configuration"
MSG_KEY_MISMATCH = "API key does not match the requested MCP server"
MSG_DB_UNAVAILABLE = "Database unavailable, please retry"
MSG_INTERNAL = "Internal error"

OAUTH_CHALLENGE = (("WWW-Authenticate", 'Bearer realm="MCP API"'),)

# The version of the cached entry layout; other entries read as misses.
_ENTRY_VERSION = 1


class AuthError(ProxyError):
    """
    A request cannot be authenticated.

    @ivar status: the HTTP status to answer with.
    @ivar code: the JSON-RPC error code of the response body.
    @ivar message: the origin's message, safe to show to the client.
    @ivar headers: extra response headers, as C{(name, value)} pairs.
    """

    def __init__(
        self,
        status: int,
        code: int,
        message: str,
        headers: Sequence[tuple[str, str]] = (),
    ) -> None:
        super().__init__(status, code, message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = tuple(headers)

    def __str__(self) -> str:
        return f"{self.status} ({self.code}): {self.message}"


class IKeyLookup(Interface):
    """
    The repository calls of the request path.  Every method returns a
    Deferred; database failures errback with L{DatabaseUnavailable}.
    """

    def lookupApiKey(keyHash):  # type: ignore[misc,no-untyped-def]
        """
        @param keyHash: the salted SHA-256 hex digest of a key.
        @return: a Deferred firing with an L{ApiKeyRecord}, or C{None} when
            no key has that hash.
        """

    def loadInstanceConfig(instanceId):  # type: ignore[misc,no-untyped-def]
        """
        @return: a Deferred firing with an L{InstanceConfig}, or C{None}
            when the instance does not exist or is deleted.
        """

    def touchApiKey(keyId, when):  # type: ignore[misc,no-untyped-def]
        """
        Set "lastUsedAt" of a key to C{when} (naive UTC).

        @return: a Deferred firing with C{None}.
        """


@implementer(IKeyLookup)
@frozen
class RepositoryKeyLookup:
    """
    An L{IKeyLookup} that delegates to an L{IRepository}.
    """

    repository: IRepository

    def lookupApiKey(self, keyHash: str) -> Deferred[Optional[ApiKeyRecord]]:
        result: Deferred[Optional[ApiKeyRecord]] = self.repository.lookupApiKey(keyHash)
        return result

    def loadInstanceConfig(self, instanceId: str) -> Deferred[Optional[InstanceConfig]]:
        result: Deferred[Optional[InstanceConfig]] = self.repository.loadInstanceConfig(instanceId)
        return result

    def touchApiKey(self, keyId: str, when: datetime.datetime) -> Deferred[None]:
        result: Deferred[None] = self.repository.touchApiKey(keyId, when)
        return result


@frozen
class Principal:
    """
    Who a request acts for: an accepted API key and its instance.

    @ivar keyHash: the key's lookup hash (not secret, but not for logs).
    @ivar authType: the instance's authentication type.
    """

    keyId: str
    keyHash: str
    instanceId: str
    organizationId: str
    authType: str


def _epoch(when: Optional[datetime.datetime]) -> Optional[float]:
    """
    Seconds since the epoch of a naive UTC C{datetime}.
    """
    if when is None:
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=datetime.UTC)
    return when.timestamp()


def _utcFromEpoch(seconds: float) -> datetime.datetime:
    """
    The naive UTC C{datetime} of a C{seconds()} value, as the database
    stores times.
    """
    return datetime.datetime.fromtimestamp(seconds, datetime.UTC).replace(tzinfo=None)


def _entryFor(record: Optional[ApiKeyRecord]) -> dict[str, Any]:
    """
    The cache entry of a lookup result: plain scalars, so that a shared
    cache can encode it as JSON.
    """
    if record is None:
        return {"v": _ENTRY_VERSION, "found": False}
    return {
        "v": _ENTRY_VERSION,
        "found": True,
        "keyId": record.keyId,
        "instanceId": record.instanceId,
        "organizationId": record.organizationId,
        "authType": record.authType,
        "isActive": record.isActive,
        "expiresAt": _epoch(record.expiresAt),
        "instanceDeleted": record.instanceDeleted,
        "toolGroupEnabled": record.toolGroupEnabled,
    }


_ENTRY_FIELDS = (
    "keyId",
    "instanceId",
    "organizationId",
    "authType",
    "isActive",
    "expiresAt",
    "instanceDeleted",
    "toolGroupEnabled",
)


def _validEntry(value: object) -> Optional[dict[str, Any]]:
    """
    C{value} if it is a cache entry of the current layout, else C{None}.
    """
    if not isinstance(value, dict) or value.get("v") != _ENTRY_VERSION:
        return None
    if value.get("found") is False:
        return value
    if value.get("found") is True and all(name in value for name in _ENTRY_FIELDS):
        return value
    return None


def _refusal(entry: Mapping[str, Any], now: float) -> Optional[AuthError]:
    """
    Why the key of C{entry} is refused at time C{now}, or C{None} when it
    is accepted.  The checks and messages are the origin's, in its order.
    """
    if not entry["found"] or not entry["isActive"]:
        return AuthError(401, SERVER_ERROR, MSG_INVALID_KEY)
    expiresAt = entry["expiresAt"]
    if expiresAt is not None and expiresAt <= now:
        return AuthError(401, SERVER_ERROR, MSG_INVALID_KEY)
    if entry["instanceDeleted"]:
        return AuthError(401, SERVER_ERROR, MSG_INSTANCE_DELETED)
    if not entry["toolGroupEnabled"]:
        return AuthError(401, SERVER_ERROR, MSG_TOOL_GROUP_DISABLED)
    authType = entry["authType"]
    if authType == AUTH_API_KEY:
        return None
    if authType == AUTH_NONE:
        return AuthError(403, SERVER_ERROR, MSG_AUTH_NONE)
    if authType == AUTH_OAUTH:
        return AuthError(401, SERVER_ERROR, MSG_OAUTH_REQUIRED, OAUTH_CHALLENGE)
    return AuthError(500, INTERNAL_ERROR, MSG_BAD_AUTH_CONFIG)


def _newAuthStats() -> dict[str, int]:
    return dict.fromkeys(
        ("requests", "cacheHits", "lookups", "coalesced", "refused", "dbErrors", "touches"), 0
    )


@define
class Authenticator:
    """
    Authenticates API keys, with a cache in front of the database.

    @ivar lookup: where keys are looked up and touched.
    @ivar cache: the cache of lookup results, keyed by C{"auth:" + hash}.
    @ivar clock: the source of time, for expiry and touch intervals.
    @ivar salt: appended to keys before hashing.
    @ivar ttl: seconds an accepted key's entry stays cached.
    @ivar negativeTtl: seconds a refused key's entry stays cached (0: not
        cached).  Database errors are never cached.
    @ivar touchInterval: at most one "lastUsedAt" update per key in this
        many seconds.
    @ivar stats: counters for the metrics: C{requests}, C{cacheHits},
        C{lookups}, C{coalesced} (callers that joined a lookup in flight),
        C{refused}, C{dbErrors}, C{touches}.
    """

    lookup: IKeyLookup
    cache: ICache
    clock: IReactorTime
    salt: str = ""
    ttl: float = 300.0
    negativeTtl: float = 30.0
    touchInterval: float = 60.0
    stats: dict[str, int] = field(factory=_newAuthStats, init=False)
    _flights: SingleFlight[str, Optional[dict[str, Any]]] = field(factory=SingleFlight, init=False)
    # Bumped by every invalidation; a lookup that saw a bump is not cached.
    _generation: int = field(default=0, init=False)
    _local: Optional[LocalEntries] = field(default=None, init=False)
    # instanceId -> key hashes this process cached for it.
    _hashesByInstance: dict[str, set[str]] = field(factory=dict, init=False)
    # keyId -> time of its last touch, oldest first.
    _touched: OrderedDict[str, float] = field(factory=OrderedDict, init=False)

    def authenticate(self, apiKey: str, instanceId: Optional[str] = None) -> Deferred[Principal]:
        """
        Check an API key.

        @param apiKey: the key as the client sent it.
        @param instanceId: the instance the request is for, when known
            (from the URL): a key of another instance is refused.
        @return: a Deferred firing with a L{Principal}, or failing with an
            L{AuthError}.
        """
        self.stats["requests"] += 1
        if not apiKey:
            self.stats["refused"] += 1
            return fail(AuthError(401, SERVER_ERROR, MSG_KEY_REQUIRED))
        keyHash = hashApiKey(apiKey, self.salt)
        local = self._localEntries().get(keyHash)
        if local is not None:
            # The request path after warm-up: no Deferred chain, no I/O.
            self.stats["cacheHits"] += 1
            try:
                return succeed(self._decide(local, keyHash, instanceId))
            except AuthError as e:
                return fail(e)
        if keyHash in self._flights:
            self.stats["coalesced"] += 1
        d = self._flights.run(keyHash, lambda: Deferred.fromCoroutine(self._resolve(keyHash)))
        result = d.addCallback(self._decide, keyHash, instanceId)
        result.addErrback(self._unexpected)
        return result

    async def _resolve(self, keyHash: str) -> Optional[dict[str, Any]]:
        """
        The cache entry for C{keyHash}, from the cache or from a lookup
        (then cached); C{None} when the database failed.
        """
        generation = self._generation
        cacheKey = AUTH_CACHE_PREFIX + keyHash
        try:
            cached = await maybeDeferred(self.cache.get, cacheKey)
        except Exception:
            log.failure("auth cache read failed; looking the key up", Failure())
            cached = None
        entry = _validEntry(cached)
        if entry is not None:
            self.stats["cacheHits"] += 1
            if generation == self._generation:
                self._keepLocally(keyHash, entry)
            return entry
        self.stats["lookups"] += 1
        try:
            record = await maybeDeferred(self.lookup.lookupApiKey, keyHash)
        except DatabaseUnavailable as e:
            self.stats["dbErrors"] += 1
            log.warn("API key lookup failed: database unavailable: {error}", error=str(e))
            return None
        except Exception:
            self.stats["dbErrors"] += 1
            log.failure("API key lookup failed", Failure())
            return None
        entry = _entryFor(record)
        if generation == self._generation:
            self._store(cacheKey, keyHash, entry)
            self._keepLocally(keyHash, entry)
        return entry

    def _localEntries(self) -> LocalEntries:
        if self._local is None:
            self._local = LocalEntries(clock=self.clock, ttl=self.ttl)
        return self._local

    def _keepLocally(self, keyHash: str, entry: dict[str, Any]) -> None:
        """
        Keep an accepted entry in the process, so that later requests skip
        the cache's Deferreds (and a shared cache's round trip).
        """
        if _refusal(entry, self.clock.seconds()) is None:
            self._localEntries().put(keyHash, entry)

    def clearLocal(self) -> None:
        """
        Forget the entries kept in the process (the shared cache was
        cleared).
        """
        self._generation += 1
        self._localEntries().clear()

    def _store(self, cacheKey: str, keyHash: str, entry: dict[str, Any]) -> None:
        accepted = _refusal(entry, self.clock.seconds()) is None
        ttl = self.ttl if accepted else self.negativeTtl
        if ttl <= 0:
            return
        if entry["found"]:
            self._hashesByInstance.setdefault(entry["instanceId"], set()).add(keyHash)
        stored = maybeDeferred(self.cache.set, cacheKey, entry, ttl)
        stored.addErrback(lambda f: log.failure("auth cache write failed", f))

    def _decide(
        self, entry: Optional[dict[str, Any]], keyHash: str, instanceId: Optional[str]
    ) -> Principal:
        if entry is None:
            raise AuthError(503, SERVER_ERROR, MSG_DB_UNAVAILABLE)
        refusal = _refusal(entry, self.clock.seconds())
        if refusal is not None:
            self.stats["refused"] += 1
            raise refusal
        if instanceId is not None and entry["instanceId"] != instanceId:
            self.stats["refused"] += 1
            raise AuthError(401, SERVER_ERROR, MSG_KEY_MISMATCH)
        principal = Principal(
            keyId=entry["keyId"],
            keyHash=keyHash,
            instanceId=entry["instanceId"],
            organizationId=entry["organizationId"],
            authType=entry["authType"],
        )
        self._touch(principal.keyId)
        return principal

    def _unexpected(self, failure: Failure) -> Failure:
        """
        Let L{AuthError}s and cancellation through; turn anything else (a
        bug) into a logged 500.
        """
        if failure.check(AuthError, CancelledError):
            return failure
        log.failure("authentication failed unexpectedly", failure)
        return Failure(AuthError(500, INTERNAL_ERROR, MSG_INTERNAL))

    def _touch(self, keyId: str) -> None:
        """
        Update the key's "lastUsedAt", fire-and-forget, unless that was
        done less than L{touchInterval} seconds ago.
        """
        now = self.clock.seconds()
        last = self._touched.get(keyId)
        if last is not None and 0 <= now - last < self.touchInterval:
            return
        self._touched[keyId] = now
        self._touched.move_to_end(keyId)
        # Forget keys whose interval has passed; they would be touched anyway.
        while self._touched:
            oldKey, when = next(iter(self._touched.items()))
            if 0 <= now - when < self.touchInterval:
                break
            del self._touched[oldKey]
        self.stats["touches"] += 1
        touched = maybeDeferred(self.lookup.touchApiKey, keyId, _utcFromEpoch(now))
        touched.addErrback(
            lambda f: log.failure("updating lastUsedAt of key {keyId} failed", f, keyId=keyId)
        )

    def invalidateKeyHashes(self, keyHashes: Iterable[str]) -> Deferred[None]:
        """
        Drop the cached entries of these key hashes (a key was revoked,
        changed or deleted), and keep lookups in flight from caching.

        @return: a Deferred firing when the cache has dropped them.
        """
        hashes = list(keyHashes)
        self._generation += 1
        self._localEntries().drop(hashes)
        for instanceId, cached in list(self._hashesByInstance.items()):
            cached.difference_update(hashes)
            if not cached:
                del self._hashesByInstance[instanceId]
        return self._drop(hashes)

    def invalidateInstance(self, instanceId: str) -> Deferred[None]:
        """
        Drop the cached entries this process stored for the keys of an
        instance (it was deleted, or its tool group or auth type changed).
        Other processes sharing the cache are reached only through
        L{invalidateKeyHashes} with the instance's key hashes.

        @return: a Deferred firing when the cache has dropped them.
        """
        self._generation += 1
        hashes = self._hashesByInstance.pop(instanceId, set())
        self._localEntries().drop(hashes)
        return self._drop(hashes)

    def _drop(self, keyHashes: Iterable[str]) -> Deferred[None]:
        keys = [AUTH_CACHE_PREFIX + h for h in keyHashes]
        if not keys:
            return succeed(None)
        dropped: Deferred[None] = maybeDeferred(self.cache.delete, keys)
        return dropped


# -- extracting the key from a request ---------------------------------------

_JWT = re.compile(r"^[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*$")


def isJwt(token: str) -> bool:
    """
    Whether C{token} has the shape of a compact JWS (three base64url
    segments separated by dots), i.e. is meant for OAuth, not an API key.
    """
    return _JWT.match(token) is not None


def bearerToken(headers: Headers) -> Optional[str]:
    """
    The token of an C{Authorization: Bearer <token>} header, or C{None}.
    """
    for raw in headers.getRawHeaders(b"authorization") or ():
        scheme, _, token = raw.decode("latin-1").strip().partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            return token.strip()
    return None


def _firstValue(values: Optional[Sequence[bytes]]) -> Optional[str]:
    for value in values or ():
        text = value.decode("latin-1").strip()
        if text:
            return text
    return None


def extractApiKey(headers: Headers, args: Mapping[bytes, Sequence[bytes]]) -> Optional[str]:
    """
    The API key of a request: the first non-empty of the C{X-API-Key}
    header, the C{api-key} header, the C{api-key} and C{api_key} query
    arguments, and an C{Authorization: Bearer} token that is not a JWT.

    @param headers: the request's headers (C{request.requestHeaders}).
    @param args: the request's query arguments (C{request.args}).
    @return: the key, or C{None} when there is none.
    """
    for found in (
        _firstValue(headers.getRawHeaders(b"x-api-key")),
        _firstValue(headers.getRawHeaders(b"api-key")),
        _firstValue(args.get(b"api-key")),
        _firstValue(args.get(b"api_key")),
    ):
        if found is not None:
            return found
    token = bearerToken(headers)
    if token is not None and not isJwt(token):
        return token
    return None


# -- instance configurations ----------------------------------------------------

# What the cache holds for an instance that does not exist (None cannot be
# stored).
_MISSING = {"v": _ENTRY_VERSION, "missing": True}


def _newConfigStats() -> dict[str, int]:
    return dict.fromkeys(("requests", "cacheHits", "lookups", "coalesced", "dbErrors"), 0)


@define
class ConfigLoader:
    """
    Loads instance configurations through a cache, one database query per
    instance at a time.

    @ivar lookup: where configurations are loaded from.
    @ivar cache: the cache, keyed by C{"config:" + instanceId}.
    @ivar ttl: seconds a configuration stays cached.
    @ivar negativeTtl: seconds an unknown or deleted instance stays cached
        (0: not cached).  Database errors are never cached.
    @ivar stats: counters for the metrics.
    """

    lookup: IKeyLookup
    cache: ICache
    ttl: float = 300.0
    negativeTtl: float = 5.0
    stats: dict[str, int] = field(factory=_newConfigStats, init=False)
    _flights: SingleFlight[str, Optional[InstanceConfig]] = field(factory=SingleFlight, init=False)
    _generation: int = field(default=0, init=False)
    clock: Optional[IReactorTime] = None
    _local: Optional[LocalEntries] = field(default=None, init=False)

    def load(self, instanceId: str) -> Deferred[Optional[InstanceConfig]]:
        """
        @return: a Deferred firing with the instance's L{InstanceConfig},
            or C{None} when it does not exist or is deleted; failing with
            L{DatabaseUnavailable} when the database failed.
        """
        self.stats["requests"] += 1
        if self._local is not None:
            local = self._local.get(instanceId)
            if local is not None:
                self.stats["cacheHits"] += 1
                return succeed(local)
        if instanceId in self._flights:
            self.stats["coalesced"] += 1
        return self._flights.run(
            instanceId, lambda: Deferred.fromCoroutine(self._resolve(instanceId))
        )

    async def _resolve(self, instanceId: str) -> Optional[InstanceConfig]:
        generation = self._generation
        cacheKey = CONFIG_CACHE_PREFIX + instanceId
        try:
            cached = await maybeDeferred(self.cache.get, cacheKey)
        except Exception:
            log.failure("config cache read failed; loading the config", Failure())
            cached = None
        if isinstance(cached, InstanceConfig):
            self.stats["cacheHits"] += 1
            if generation == self._generation and self._local is not None:
                self._local.put(instanceId, cached)
            return cached
        if cached == _MISSING:
            self.stats["cacheHits"] += 1
            return None
        self.stats["lookups"] += 1
        try:
            config = await maybeDeferred(self.lookup.loadInstanceConfig, instanceId)
        except DatabaseUnavailable:
            self.stats["dbErrors"] += 1
            raise
        except Exception as e:
            self.stats["dbErrors"] += 1
            log.failure("loading the config of instance {instanceId} failed", instanceId=instanceId)
            raise DatabaseUnavailable(f"loading the instance configuration failed: {e}") from e
        if generation == self._generation:
            value: object = _MISSING if config is None else config
            ttl = self.negativeTtl if config is None else self.ttl
            if ttl > 0:
                stored = maybeDeferred(self.cache.set, cacheKey, value, ttl)
                stored.addErrback(lambda f: log.failure("config cache write failed", f))
            if config is not None and self._local is not None:
                self._local.put(instanceId, config)
        return config

    def __attrs_post_init__(self) -> None:
        if self.clock is not None:
            self._local = LocalEntries(clock=self.clock, ttl=self.ttl)

    def clearLocal(self) -> None:
        """
        Forget the configurations kept in the process (the shared cache was
        cleared).
        """
        self._generation += 1
        if self._local is not None:
            self._local.clear()

    def invalidate(self, instanceId: str) -> Deferred[None]:
        """
        Drop the cached configuration of an instance, and keep loads in
        flight from caching.

        @return: a Deferred firing when the cache has dropped it.
        """
        self._generation += 1
        if self._local is not None:
            self._local.drop([instanceId])
        dropped: Deferred[None] = maybeDeferred(
            self.cache.delete, [CONFIG_CACHE_PREFIX + instanceId]
        )
        return dropped
