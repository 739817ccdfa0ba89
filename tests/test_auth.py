"""
Tests for L{mcp_proxy.auth}: API-key authentication, its caching, the
configuration loader, and finding the key in a request.
"""

from __future__ import annotations

import datetime
from typing import Any, Iterable, Optional

from attrs import define, field
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.http_headers import Headers
from zope.interface import implementer
from zope.interface.verify import verifyObject

from mcp_proxy.auth import (
    MSG_AUTH_NONE,
    MSG_BAD_AUTH_CONFIG,
    MSG_DB_UNAVAILABLE,
    MSG_INSTANCE_DELETED,
    MSG_INVALID_KEY,
    MSG_KEY_MISMATCH,
    MSG_KEY_REQUIRED,
    MSG_OAUTH_REQUIRED,
    MSG_TOOL_GROUP_DISABLED,
    Authenticator,
    AuthError,
    ConfigLoader,
    IKeyLookup,
    Principal,
    RepositoryKeyLookup,
    bearerToken,
    extractApiKey,
    isJwt,
)
from mcp_proxy.cache import MemoryCache
from mcp_proxy.errors import DatabaseUnavailable
from mcp_proxy.interfaces import ICache
from mcp_proxy.keys import hashApiKey
from mcp_proxy.models import (
    AUTH_API_KEY,
    AUTH_CLOUD_RUN_IAM,
    AUTH_NONE,
    AUTH_OAUTH,
    ApiKeyRecord,
    InstanceConfig,
)
from mcp_proxy.testing import FailingCache, FakeKeyLookup

KEY = "mcpp_" + "k" * 43
OTHER_KEY = "mcpp_" + "o" * 43
SALT = "pepper"


def utc(seconds: float) -> datetime.datetime:
    """
    The naive UTC datetime of C{seconds} after the epoch (where L{Clock}
    starts).
    """
    return datetime.datetime.fromtimestamp(seconds, datetime.UTC).replace(tzinfo=None)


def record(**changes: Any) -> ApiKeyRecord:
    """
    An accepted key of instance C{inst1}, with C{changes}.
    """
    values: dict[str, Any] = dict(
        keyId="key1",
        instanceId="inst1",
        organizationId="org1",
        authType=AUTH_API_KEY,
        isActive=True,
        expiresAt=None,
        instanceDeleted=False,
        toolGroupEnabled=True,
    )
    values.update(changes)
    return ApiKeyRecord(**values)


@implementer(ICache)
@define
class RecordingCache:
    """
    An L{ICache} that records the keys it is given, in front of a real one.
    """

    inner: MemoryCache
    keys: list[str] = field(factory=list)

    @property
    def stats(self) -> dict[str, int]:
        return self.inner.stats

    def get(self, key: str) -> Deferred[Any]:
        self.keys.append(key)
        return self.inner.get(key)

    def set(self, key: str, value: Any, ttl: Optional[float] = None) -> Deferred[None]:
        self.keys.append(key)
        return self.inner.set(key, value, ttl)

    def delete(self, keys: Iterable[str]) -> Deferred[None]:
        keys = list(keys)
        self.keys.extend(keys)
        return self.inner.delete(keys)

    def clear(self) -> Deferred[None]:
        return self.inner.clear()


class AuthenticatorTestsMixin:
    """
    An authenticator on a fake lookup, a memory cache and a clock.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_700_000_000)
        self.lookup = FakeKeyLookup()
        self.cache = RecordingCache(MemoryCache(self.clock))
        self.auth = Authenticator(
            self.lookup,
            self.cache,
            self.clock,
            salt=SALT,
            ttl=300,
            negativeTtl=30,
            touchInterval=60,
        )
        self.keyHash = self.lookup.addKey(KEY, record(), SALT)

    def setRecord(self, **changes: Any) -> None:
        self.lookup.records[self.keyHash] = record(**changes)


class AuthenticateTests(AuthenticatorTestsMixin, SynchronousTestCase):
    """
    L{Authenticator.authenticate} accepts good keys and refuses others with
    the origin's messages.
    """

    def assertRefused(
        self, d: Deferred[Principal], status: int, message: str, code: int = -32000
    ) -> AuthError:
        error = self.failureResultOf(d, AuthError).value
        assert isinstance(error, AuthError)
        self.assertEqual((error.status, error.code, error.message), (status, code, message))
        return error

    def test_accepted(self) -> None:
        """A valid key gives the principal of its key and instance."""
        principal = self.successResultOf(self.auth.authenticate(KEY))
        self.assertEqual(
            principal,
            Principal(
                keyId="key1",
                keyHash=hashApiKey(KEY, SALT),
                instanceId="inst1",
                organizationId="org1",
                authType=AUTH_API_KEY,
            ),
        )

    def test_saltedHashLookup(self) -> None:
        """The lookup is by the salted hash, so an unsalted hash finds nothing."""
        self.lookup.records = {hashApiKey(KEY): record()}
        self.assertRefused(self.auth.authenticate(KEY), 401, MSG_INVALID_KEY)

    def test_cacheKeyIsHash(self) -> None:
        """The cache key is C{"auth:"} + the hash; the raw key never reaches the cache."""
        self.successResultOf(self.auth.authenticate(KEY))
        self.assertEqual(set(self.cache.keys), {"auth:" + self.keyHash})
        for key in self.cache.keys:
            self.assertNotIn(KEY, key)
        entry = self.successResultOf(self.cache.inner.get("auth:" + self.keyHash))
        self.assertNotIn(KEY, repr(entry))

    def test_cacheHitNoLookup(self) -> None:
        """A cached key is accepted without a lookup."""
        self.successResultOf(self.auth.authenticate(KEY))
        self.successResultOf(self.auth.authenticate(KEY))
        self.successResultOf(self.auth.authenticate(KEY))
        self.assertEqual(self.lookup.calls["lookupApiKey"], 1)
        self.assertEqual(self.auth.stats["cacheHits"], 2)

    def test_positiveTtl(self) -> None:
        """After the positive ttl the key is looked up again, so a revocation shows."""
        self.successResultOf(self.auth.authenticate(KEY))
        self.setRecord(isActive=False)
        self.clock.advance(299)
        self.successResultOf(self.auth.authenticate(KEY))
        self.clock.advance(1)
        self.assertRefused(self.auth.authenticate(KEY), 401, MSG_INVALID_KEY)
        self.assertEqual(self.lookup.calls["lookupApiKey"], 2)

    def test_emptyKey(self) -> None:
        """An empty key is refused without a lookup."""
        self.assertRefused(self.auth.authenticate(""), 401, MSG_KEY_REQUIRED)
        self.assertEqual(self.lookup.calls["lookupApiKey"], 0)

    def test_unknownKey(self) -> None:
        """An unknown key is refused as invalid or expired."""
        self.assertRefused(self.auth.authenticate(OTHER_KEY), 401, MSG_INVALID_KEY)

    def test_inactiveKey(self) -> None:
        """An inactive (revoked) key is refused as invalid or expired."""
        self.setRecord(isActive=False)
        self.assertRefused(self.auth.authenticate(KEY), 401, MSG_INVALID_KEY)

    def test_expiredKey(self) -> None:
        """A key past its expiry is refused as invalid or expired."""
        self.setRecord(expiresAt=utc(self.clock.seconds() - 1))
        self.assertRefused(self.auth.authenticate(KEY), 401, MSG_INVALID_KEY)

    def test_expiresAtExactlyNow(self) -> None:
        """A key whose expiry is now is expired (the origin requires expiresAt > now)."""
        self.setRecord(expiresAt=utc(self.clock.seconds()))
        self.assertRefused(self.auth.authenticate(KEY), 401, MSG_INVALID_KEY)

    def test_futureExpiryAccepted(self) -> None:
        """A key expiring later is accepted."""
        self.setRecord(expiresAt=utc(self.clock.seconds() + 10))
        self.successResultOf(self.auth.authenticate(KEY))

    def test_expiresWhileCached(self) -> None:
        """A cached key is refused, without a lookup, once its expiry has passed."""
        self.setRecord(expiresAt=utc(self.clock.seconds() + 100))
        self.successResultOf(self.auth.authenticate(KEY))
        self.clock.advance(99)
        self.successResultOf(self.auth.authenticate(KEY))
        self.clock.advance(1)
        self.assertRefused(self.auth.authenticate(KEY), 401, MSG_INVALID_KEY)
        self.assertEqual(self.lookup.calls["lookupApiKey"], 1)

    def test_deletedInstance(self) -> None:
        """A key of a deleted instance is refused with the origin's message."""
        self.setRecord(instanceDeleted=True)
        self.assertRefused(self.auth.authenticate(KEY), 401, MSG_INSTANCE_DELETED)

    def test_disabledToolGroup(self) -> None:
        """A key whose tool group is disabled is refused with the origin's message."""
        self.setRecord(toolGroupEnabled=False)
        self.assertRefused(self.auth.authenticate(KEY), 401, MSG_TOOL_GROUP_DISABLED)

    def test_authTypeNone(self) -> None:
        """An instance with auth type NONE is refused with 403."""
        self.setRecord(authType=AUTH_NONE)
        self.assertRefused(self.auth.authenticate(KEY), 403, MSG_AUTH_NONE)

    def test_authTypeOAuth(self) -> None:
        """An OAUTH instance asks for OAuth, with a Bearer challenge."""
        self.setRecord(authType=AUTH_OAUTH)
        error = self.assertRefused(self.auth.authenticate(KEY), 401, MSG_OAUTH_REQUIRED)
        self.assertEqual(error.headers, (("WWW-Authenticate", 'Bearer realm="MCP API"'),))

    def test_authTypeOther(self) -> None:
        """Any other auth type is an internal configuration error, code -32603."""
        self.setRecord(authType=AUTH_CLOUD_RUN_IAM)
        self.assertRefused(self.auth.authenticate(KEY), 500, MSG_BAD_AUTH_CONFIG, -32603)

    def test_checkOrder(self) -> None:
        """Invalidity is reported before deletion, deletion before a disabled group."""
        self.setRecord(isActive=False, instanceDeleted=True, toolGroupEnabled=False)
        self.assertRefused(self.auth.authenticate(KEY), 401, MSG_INVALID_KEY)
        self.auth = Authenticator(self.lookup, MemoryCache(self.clock), self.clock, salt=SALT)
        self.setRecord(instanceDeleted=True, toolGroupEnabled=False)
        self.assertRefused(self.auth.authenticate(KEY), 401, MSG_INSTANCE_DELETED)

    def test_instanceMatch(self) -> None:
        """Given the requested instance, the key's own instance is accepted."""
        principal = self.successResultOf(self.auth.authenticate(KEY, instanceId="inst1"))
        self.assertEqual(principal.instanceId, "inst1")

    def test_instanceMismatch(self) -> None:
        """Given another instance, a valid key is refused."""
        self.assertRefused(self.auth.authenticate(KEY, instanceId="inst2"), 401, MSG_KEY_MISMATCH)

    def test_errorsAreFresh(self) -> None:
        """Each refusal is its own exception object."""
        self.setRecord(isActive=False)
        e1 = self.failureResultOf(self.auth.authenticate(KEY)).value
        e2 = self.failureResultOf(self.auth.authenticate(KEY)).value
        self.assertIsNot(e1, e2)


class NegativeCacheTests(AuthenticatorTestsMixin, SynchronousTestCase):
    """
    Refusals are cached for the negative ttl; database errors never.
    """

    def test_unknownCachedBriefly(self) -> None:
        """An unknown key is not looked up again within the negative ttl."""
        for _ in range(3):
            self.failureResultOf(self.auth.authenticate(OTHER_KEY), AuthError)
        self.assertEqual(self.lookup.calls["lookupApiKey"], 1)
        self.clock.advance(30)
        self.lookup.addKey(OTHER_KEY, record(keyId="key2"), SALT)
        principal = self.successResultOf(self.auth.authenticate(OTHER_KEY))
        self.assertEqual(principal.keyId, "key2")
        self.assertEqual(self.lookup.calls["lookupApiKey"], 2)

    def test_refusedCachedForNegativeTtl(self) -> None:
        """A refused key is cached for the negative ttl, not the positive one."""
        self.setRecord(toolGroupEnabled=False)
        self.failureResultOf(self.auth.authenticate(KEY), AuthError)
        self.setRecord()
        self.clock.advance(29)
        self.failureResultOf(self.auth.authenticate(KEY), AuthError)
        self.clock.advance(1)
        self.successResultOf(self.auth.authenticate(KEY))

    def test_authTypeRefusalCachedNegatively(self) -> None:
        """An auth-type refusal is cached for the negative ttl."""
        self.setRecord(authType=AUTH_NONE)
        self.failureResultOf(self.auth.authenticate(KEY), AuthError)
        self.setRecord()
        self.clock.advance(30)
        self.successResultOf(self.auth.authenticate(KEY))

    def test_negativeTtlZero(self) -> None:
        """With a negative ttl of 0, refusals are not cached at all."""
        self.auth.negativeTtl = 0
        self.failureResultOf(self.auth.authenticate(OTHER_KEY), AuthError)
        self.failureResultOf(self.auth.authenticate(OTHER_KEY), AuthError)
        self.assertEqual(self.lookup.calls["lookupApiKey"], 2)
        self.assertEqual(self.cache.inner.stats["sets"], 0)

    def test_databaseUnavailable(self) -> None:
        """A database failure gives 503 and is not cached."""
        self.lookup.error = DatabaseUnavailable("connection refused")
        error = self.failureResultOf(self.auth.authenticate(KEY), AuthError).value
        assert isinstance(error, AuthError)
        self.assertEqual((error.status, error.code), (503, -32000))
        self.assertEqual(error.message, MSG_DB_UNAVAILABLE)
        self.lookup.error = None
        self.successResultOf(self.auth.authenticate(KEY))
        self.assertEqual(self.lookup.calls["lookupApiKey"], 2)
        self.assertEqual(self.auth.stats["dbErrors"], 1)

    def test_anyLookupFailure(self) -> None:
        """Any other lookup failure also gives 503, is logged and not cached."""
        self.lookup.error = RuntimeError("driver bug")
        error = self.failureResultOf(self.auth.authenticate(KEY), AuthError).value
        assert isinstance(error, AuthError)
        self.assertEqual(error.status, 503)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.lookup.error = None
        self.successResultOf(self.auth.authenticate(KEY))

    def test_dbErrorMessageNotLeaked(self) -> None:
        """The database's own message is not shown to the client."""
        self.lookup.error = DatabaseUnavailable("password=hunter2 host=db")
        error = self.failureResultOf(self.auth.authenticate(KEY), AuthError).value
        self.assertNotIn("hunter2", str(error))


class SingleFlightAuthTests(AuthenticatorTestsMixin, SynchronousTestCase):
    """
    Concurrent misses for one key share one lookup.
    """

    def setUp(self) -> None:
        super().setUp()
        self.lookup.hold = True

    def test_oneLookup(self) -> None:
        """Three concurrent requests for one key make one lookup, and all succeed."""
        ds = [self.auth.authenticate(KEY) for _ in range(3)]
        self.assertEqual(self.lookup.calls["lookupApiKey"], 1)
        self.assertEqual(self.auth.stats["coalesced"], 2)
        for d in ds:
            self.assertNoResult(d)
        self.lookup.release()
        principals = [self.successResultOf(d) for d in ds]
        self.assertEqual({p.keyId for p in principals}, {"key1"})

    def test_ownDeferreds(self) -> None:
        """Each waiter has its own Deferred: one's callbacks do not reach another."""
        d1 = self.auth.authenticate(KEY)
        d2 = self.auth.authenticate(KEY)
        self.assertIsNot(d1, d2)
        d1.addCallback(lambda _: "replaced")
        self.lookup.release()
        self.assertEqual(self.successResultOf(d1), "replaced")
        self.assertIsInstance(self.successResultOf(d2), Principal)

    def test_differentKeysSeparate(self) -> None:
        """Different keys are looked up separately."""
        self.auth.authenticate(KEY)
        self.auth.authenticate(OTHER_KEY)
        self.assertEqual(self.lookup.calls["lookupApiKey"], 2)

    def test_sharedFailureEachOwnError(self) -> None:
        """A database error reaches every waiter, each with its own error; nothing is cached."""
        ds = [self.auth.authenticate(KEY) for _ in range(2)]
        self.lookup.error = DatabaseUnavailable("down")
        self.lookup.release()
        errors = [self.failureResultOf(d, AuthError).value for d in ds]
        self.assertIsNot(errors[0], errors[1])
        self.assertEqual({e.status for e in errors if isinstance(e, AuthError)}, {503})
        self.lookup.error = None
        d = self.auth.authenticate(KEY)
        self.assertEqual(self.lookup.calls["lookupApiKey"], 2)
        self.lookup.release()
        self.successResultOf(d)

    def test_cancelOneWaiter(self) -> None:
        """Cancelling one waiter leaves the others to complete."""
        d1 = self.auth.authenticate(KEY)
        d2 = self.auth.authenticate(KEY)
        d1.cancel()
        self.failureResultOf(d1, CancelledError)
        self.lookup.release()
        self.successResultOf(d2)

    def test_waitersDecideSeparately(self) -> None:
        """Waiters sharing a lookup still get their own instance check."""
        d1 = self.auth.authenticate(KEY, instanceId="inst1")
        d2 = self.auth.authenticate(KEY, instanceId="inst2")
        self.lookup.release()
        self.successResultOf(d1)
        self.failureResultOf(d2, AuthError)

    def test_newLookupAfterFailure(self) -> None:
        """After a failed lookup lands, the next request starts a new one."""
        d = self.auth.authenticate(KEY)
        self.lookup.error = DatabaseUnavailable("down")
        self.lookup.release()
        self.failureResultOf(d, AuthError)
        self.lookup.error = None
        self.auth.authenticate(KEY)
        self.assertEqual(self.lookup.calls["lookupApiKey"], 2)


class TouchTests(AuthenticatorTestsMixin, SynchronousTestCase):
    """
    "lastUsedAt" is updated at most once per touch interval per key,
    fire-and-forget.
    """

    def test_touchedOnSuccess(self) -> None:
        """An accepted key is touched with the clock's time, as naive UTC."""
        self.successResultOf(self.auth.authenticate(KEY))
        self.assertEqual(self.lookup.touches, [("key1", utc(self.clock.seconds()))])

    def test_notTouchedOnRefusal(self) -> None:
        """A refused key is not touched."""
        self.setRecord(isActive=False)
        self.failureResultOf(self.auth.authenticate(KEY), AuthError)
        self.assertEqual(self.lookup.touches, [])

    def test_atMostOncePerInterval(self) -> None:
        """Within the interval, cache hits do not touch again; after it they do."""
        self.successResultOf(self.auth.authenticate(KEY))
        self.clock.advance(59)
        self.successResultOf(self.auth.authenticate(KEY))
        self.assertEqual(len(self.lookup.touches), 1)
        self.clock.advance(1)
        self.successResultOf(self.auth.authenticate(KEY))
        self.assertEqual(len(self.lookup.touches), 2)
        self.assertEqual(self.lookup.calls["lookupApiKey"], 1)

    def test_perKey(self) -> None:
        """Each key has its own interval."""
        self.lookup.addKey(OTHER_KEY, record(keyId="key2"), SALT)
        self.successResultOf(self.auth.authenticate(KEY))
        self.successResultOf(self.auth.authenticate(OTHER_KEY))
        self.assertEqual([k for k, _ in self.lookup.touches], ["key1", "key2"])

    def test_touchFailureLoggedNotRaised(self) -> None:
        """A failing touch is logged; the request still succeeds."""
        self.lookup.touchError = DatabaseUnavailable("down")
        self.successResultOf(self.auth.authenticate(KEY))
        self.assertEqual(len(self.flushLoggedErrors(DatabaseUnavailable)), 1)

    def test_touchRaisingSynchronously(self) -> None:
        """A touch that raises at once is logged too."""

        class RaisingTouch(FakeKeyLookup):
            def touchApiKey(self, keyId: str, when: datetime.datetime) -> Deferred[None]:
                raise ValueError("bad")

        lookup = RaisingTouch()
        lookup.addKey(KEY, record(), SALT)
        auth = Authenticator(lookup, MemoryCache(self.clock), self.clock, salt=SALT)
        self.successResultOf(auth.authenticate(KEY))
        self.assertEqual(len(self.flushLoggedErrors(ValueError)), 1)

    def test_touchBookkeepingBounded(self) -> None:
        """Keys whose interval has passed are forgotten."""
        for i in range(100):
            key = f"mcpp_{i:043d}"
            self.lookup.addKey(key, record(keyId=f"k{i}"), SALT)
            self.successResultOf(self.auth.authenticate(key))
        self.clock.advance(61)
        self.successResultOf(self.auth.authenticate(KEY))
        self.assertEqual(len(self.auth._touched), 1)


class InvalidationTests(AuthenticatorTestsMixin, SynchronousTestCase):
    """
    Admin-side invalidation drops cached entries at once.
    """

    def test_invalidateKeyHashes(self) -> None:
        """After invalidating its hash, a revoked key is refused at once."""
        self.successResultOf(self.auth.authenticate(KEY))
        self.setRecord(isActive=False)
        self.successResultOf(self.auth.invalidateKeyHashes([self.keyHash]))
        self.failureResultOf(self.auth.authenticate(KEY), AuthError)

    def test_invalidateNegativeEntry(self) -> None:
        """Invalidating a refused key's hash lets it in at once when fixed."""
        self.setRecord(toolGroupEnabled=False)
        self.failureResultOf(self.auth.authenticate(KEY), AuthError)
        self.setRecord()
        self.successResultOf(self.auth.invalidateKeyHashes([self.keyHash]))
        self.successResultOf(self.auth.authenticate(KEY))

    def test_invalidateInstance(self) -> None:
        """Invalidating an instance drops its keys' entries and keeps others."""
        self.lookup.addKey(OTHER_KEY, record(keyId="key2", instanceId="inst2"), SALT)
        self.successResultOf(self.auth.authenticate(KEY))
        self.successResultOf(self.auth.authenticate(OTHER_KEY))
        self.setRecord(instanceDeleted=True)
        self.successResultOf(self.auth.invalidateInstance("inst1"))
        self.failureResultOf(self.auth.authenticate(KEY), AuthError)
        self.successResultOf(self.auth.authenticate(OTHER_KEY))
        self.assertEqual(self.lookup.calls["lookupApiKey"], 3)

    def test_invalidateUnknownInstance(self) -> None:
        """Invalidating an instance with nothing cached does nothing."""
        self.successResultOf(self.auth.invalidateInstance("nope"))

    def test_invalidateDuringLookup(self) -> None:
        """A lookup in flight during an invalidation is not cached."""
        self.lookup.hold = True
        d = self.auth.authenticate(KEY)
        self.successResultOf(self.auth.invalidateKeyHashes([self.keyHash]))
        self.lookup.release()
        self.successResultOf(d)
        self.lookup.hold = False
        self.successResultOf(self.auth.authenticate(KEY))
        self.assertEqual(self.lookup.calls["lookupApiKey"], 2)

    def test_invalidationFailurePropagates(self) -> None:
        """A cache that cannot delete reports it to the admin caller."""
        auth = Authenticator(self.lookup, FailingCache(), self.clock, salt=SALT)
        self.failureResultOf(auth.invalidateKeyHashes(["abc"]), ConnectionError)


class CacheTroubleTests(AuthenticatorTestsMixin, SynchronousTestCase):
    """
    A cache that fails or holds foreign entries does not break authentication.
    """

    def test_failingCache(self) -> None:
        """
        With the cache down, a key is looked up and accepted; the copy kept
        in the process serves the next requests.
        """
        auth = Authenticator(self.lookup, FailingCache(), self.clock, salt=SALT)
        self.successResultOf(auth.authenticate(KEY))
        self.successResultOf(auth.authenticate(KEY))
        self.assertEqual(self.lookup.calls["lookupApiKey"], 1)
        # The first request logs a failed read and a failed write.
        self.assertEqual(len(self.flushLoggedErrors(ConnectionError)), 2)
        auth.clearLocal()
        self.successResultOf(auth.authenticate(KEY))
        self.assertEqual(self.lookup.calls["lookupApiKey"], 2)
        self.flushLoggedErrors(ConnectionError)

    def test_localCopyDroppedOnInvalidation(self) -> None:
        """
        The copy kept in the process is dropped with the key's cache entry:
        a revoked key is refused at once.
        """
        self.successResultOf(self.auth.authenticate(KEY))
        self.successResultOf(self.auth.authenticate(KEY))
        self.assertEqual(self.lookup.calls["lookupApiKey"], 1)
        self.setRecord(isActive=False)
        self.successResultOf(self.auth.invalidateKeyHashes([self.keyHash]))
        self.failureResultOf(self.auth.authenticate(KEY), AuthError)

    def test_localCopyExpires(self) -> None:
        """
        The copy kept in the process lives no longer than the cache TTL.
        """
        self.successResultOf(self.auth.authenticate(KEY))
        self.clock.advance(self.auth.ttl + 1)
        self.successResultOf(self.auth.authenticate(KEY))
        self.assertEqual(self.lookup.calls["lookupApiKey"], 2)

    def test_foreignEntryIsMiss(self) -> None:
        """An entry of another layout under the key reads as a miss."""
        self.successResultOf(self.cache.set("auth:" + self.keyHash, {"valid": True}, 100))
        self.setRecord(isActive=False)
        self.failureResultOf(self.auth.authenticate(KEY), AuthError)
        self.assertEqual(self.lookup.calls["lookupApiKey"], 1)

    def test_unexpectedBugIs500(self) -> None:
        """A bug (here: a lookup answering nonsense) gives a logged 500, not a hang."""
        self.lookup.records[self.keyHash] = "not a record"  # type: ignore[assignment]
        error = self.failureResultOf(self.auth.authenticate(KEY), AuthError).value
        assert isinstance(error, AuthError)
        self.assertEqual((error.status, error.code), (500, -32603))
        self.assertEqual(len(self.flushLoggedErrors(AttributeError)), 1)
        self.lookup.records[self.keyHash] = record()
        self.successResultOf(self.auth.authenticate(KEY))


class ConfigLoaderTests(SynchronousTestCase):
    """
    L{ConfigLoader} caches instance configurations with single flight.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.lookup = FakeKeyLookup()
        self.cache = RecordingCache(MemoryCache(self.clock))
        self.loader = ConfigLoader(self.lookup, self.cache, ttl=300, negativeTtl=5)
        self.config = InstanceConfig(
            instanceId="inst1",
            organizationId="org1",
            toolGroupId="tg1",
            toolGroupEnabled=True,
            upstreams=(),
        )
        self.lookup.configs["inst1"] = self.config

    def test_loadAndCache(self) -> None:
        """The config is loaded once, then read from C{"config:" + id}."""
        self.assertEqual(self.successResultOf(self.loader.load("inst1")), self.config)
        self.assertEqual(self.successResultOf(self.loader.load("inst1")), self.config)
        self.assertEqual(self.lookup.calls["loadInstanceConfig"], 1)
        self.assertEqual(set(self.cache.keys), {"config:inst1"})

    def test_ttl(self) -> None:
        """After the ttl the config is loaded again."""
        self.successResultOf(self.loader.load("inst1"))
        self.clock.advance(300)
        self.successResultOf(self.loader.load("inst1"))
        self.assertEqual(self.lookup.calls["loadInstanceConfig"], 2)

    def test_singleFlight(self) -> None:
        """Concurrent loads of one instance share one query; each gets its own Deferred."""
        self.lookup.hold = True
        d1 = self.loader.load("inst1")
        d2 = self.loader.load("inst1")
        self.assertIsNot(d1, d2)
        self.assertEqual(self.lookup.calls["loadInstanceConfig"], 1)
        self.lookup.release()
        self.assertEqual(self.successResultOf(d1), self.config)
        self.assertEqual(self.successResultOf(d2), self.config)
        self.assertEqual(self.loader.stats["coalesced"], 1)

    def test_unknownCachedBriefly(self) -> None:
        """An unknown instance reads as C{None}, cached for the negative ttl."""
        self.assertIsNone(self.successResultOf(self.loader.load("nope")))
        self.assertIsNone(self.successResultOf(self.loader.load("nope")))
        self.assertEqual(self.lookup.calls["loadInstanceConfig"], 1)
        self.clock.advance(5)
        self.assertIsNone(self.successResultOf(self.loader.load("nope")))
        self.assertEqual(self.lookup.calls["loadInstanceConfig"], 2)

    def test_negativeTtlZero(self) -> None:
        """With a negative ttl of 0, unknown instances are not cached."""
        self.loader.negativeTtl = 0
        self.successResultOf(self.loader.load("nope"))
        self.successResultOf(self.loader.load("nope"))
        self.assertEqual(self.lookup.calls["loadInstanceConfig"], 2)

    def test_databaseErrorNotCached(self) -> None:
        """A database failure reaches the caller and is not cached."""
        self.lookup.error = DatabaseUnavailable("down")
        self.failureResultOf(self.loader.load("inst1"), DatabaseUnavailable)
        self.lookup.error = None
        self.assertEqual(self.successResultOf(self.loader.load("inst1")), self.config)

    def test_otherErrorBecomesDatabaseUnavailable(self) -> None:
        """Any other load failure is logged and reported as L{DatabaseUnavailable}."""
        self.lookup.error = KeyError("column")
        self.failureResultOf(self.loader.load("inst1"), DatabaseUnavailable)
        self.assertEqual(len(self.flushLoggedErrors(KeyError)), 1)

    def test_sharedFailure(self) -> None:
        """A failure reaches every waiter of the shared load."""
        self.lookup.hold = True
        ds = [self.loader.load("inst1") for _ in range(2)]
        self.lookup.error = DatabaseUnavailable("down")
        self.lookup.release()
        for d in ds:
            self.failureResultOf(d, DatabaseUnavailable)

    def test_invalidate(self) -> None:
        """After C{invalidate} the config is loaded again."""
        self.successResultOf(self.loader.load("inst1"))
        self.successResultOf(self.loader.invalidate("inst1"))
        self.successResultOf(self.loader.load("inst1"))
        self.assertEqual(self.lookup.calls["loadInstanceConfig"], 2)

    def test_invalidateDuringLoad(self) -> None:
        """A load in flight during an invalidation is not cached."""
        self.lookup.hold = True
        d = self.loader.load("inst1")
        self.successResultOf(self.loader.invalidate("inst1"))
        self.lookup.release()
        self.successResultOf(d)
        self.lookup.hold = False
        self.successResultOf(self.loader.load("inst1"))
        self.assertEqual(self.lookup.calls["loadInstanceConfig"], 2)

    def test_failingCache(self) -> None:
        """With the cache down, configs are still loaded."""
        loader = ConfigLoader(self.lookup, FailingCache())
        self.assertEqual(self.successResultOf(loader.load("inst1")), self.config)
        self.assertEqual(len(self.flushLoggedErrors(ConnectionError)), 2)


class ExtractApiKeyTests(SynchronousTestCase):
    """
    L{extractApiKey} finds the key in the origin's order.
    """

    JWT = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJ4In0.c2lnbmF0dXJl"

    def extract(
        self, headers: dict[str, str], args: Optional[dict[str, str]] = None
    ) -> Optional[str]:
        h = Headers({k.encode(): [v.encode()] for k, v in headers.items()})
        a = {k.encode(): [v.encode()] for k, v in (args or {}).items()}
        return extractApiKey(h, a)

    def test_order(self) -> None:
        """X-API-Key, then api-key, then ?api-key=, then ?api_key=, then Bearer."""
        headers = {"X-API-Key": "a", "api-key": "b", "Authorization": "Bearer e"}
        args = {"api-key": "c", "api_key": "d"}
        self.assertEqual(self.extract(headers, args), "a")
        del headers["X-API-Key"]
        self.assertEqual(self.extract(headers, args), "b")
        del headers["api-key"]
        self.assertEqual(self.extract(headers, args), "c")
        del args["api-key"]
        self.assertEqual(self.extract(headers, args), "d")
        del args["api_key"]
        self.assertEqual(self.extract(headers, args), "e")

    def test_emptySkipped(self) -> None:
        """An empty value does not win; the next one does."""
        self.assertEqual(self.extract({"X-API-Key": "  ", "api-key": "b"}), "b")

    def test_bearerJwtIsNotKey(self) -> None:
        """A Bearer JWT is for OAuth, not an API key."""
        self.assertIsNone(self.extract({"Authorization": "Bearer " + self.JWT}))

    def test_bearerCaseInsensitive(self) -> None:
        """The Bearer scheme name is case-insensitive."""
        self.assertEqual(self.extract({"Authorization": "bearer " + KEY}), KEY)

    def test_otherScheme(self) -> None:
        """A non-Bearer Authorization header gives no key."""
        self.assertIsNone(self.extract({"Authorization": "Basic dXNlcjpwdw=="}))

    def test_nothing(self) -> None:
        """A request without a key gives C{None}."""
        self.assertIsNone(self.extract({}))

    def test_bearerToken(self) -> None:
        """L{bearerToken} gives the token, JWT or not."""
        h = Headers({b"Authorization": [b"Bearer " + self.JWT.encode()]})
        self.assertEqual(bearerToken(h), self.JWT)
        self.assertIsNone(bearerToken(Headers({b"Authorization": [b"Bearer "]})))

    def test_isJwt(self) -> None:
        """Three base64url segments make a JWT; our keys and junk do not."""
        self.assertTrue(isJwt(self.JWT))
        self.assertTrue(isJwt("a.b."))
        self.assertFalse(isJwt(KEY))
        self.assertFalse(isJwt("a.b"))
        self.assertFalse(isJwt("a.b.c.d"))
        self.assertFalse(isJwt("a b.c.d"))


class KeyLookupTests(SynchronousTestCase):
    """
    The L{IKeyLookup} providers.
    """

    def test_fakeProvides(self) -> None:
        """L{FakeKeyLookup} provides L{IKeyLookup}."""
        self.assertTrue(verifyObject(IKeyLookup, FakeKeyLookup()))

    def test_repositoryAdapter(self) -> None:
        """L{RepositoryKeyLookup} provides L{IKeyLookup} by delegating to a repository."""
        inner = FakeKeyLookup()
        inner.addKey(KEY, record())
        inner.configs["inst1"] = InstanceConfig("inst1", "org1", "tg1", True, ())
        adapter = RepositoryKeyLookup(inner)  # type: ignore[arg-type]
        self.assertTrue(verifyObject(IKeyLookup, adapter))
        self.assertEqual(self.successResultOf(adapter.lookupApiKey(hashApiKey(KEY))), record())
        config = self.successResultOf(adapter.loadInstanceConfig("inst1"))
        self.assertEqual(config, inner.configs["inst1"])
        when = datetime.datetime(2025, 1, 1)
        self.successResultOf(adapter.touchApiKey("key1", when))
        self.assertEqual(inner.touches, [("key1", when)])
