"""
Tests of L{mcp_proxy.changes}: the change payloads, the PostgreSQL
triggers, and the listeners of a real L{ProxyService} (in this process) on a
throwaway PostgreSQL database and on the test Redis: a change made by
another connection reaches the proxy's caches and sessions.

Nothing sleeps to synchronise: conditions are polled until a deadline.
"""

from __future__ import annotations

import json
import secrets
import select
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, Optional, Union

import pytest
import pytest_twisted
from conftest import TEST_QUERY_TIMEOUT, PostgresServer
from test_cache_redis import newCache, requireRedis
from test_repository import ORIGIN_SCHEMA
from test_repository import apiKey as originApiKey
from test_service import makeData
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater

from mcp_proxy.admin import buildParser, resolveOptions
from mcp_proxy.admin import run as runAdmin
from mcp_proxy.auth import AUTH_CACHE_PREFIX, CONFIG_CACHE_PREFIX, AuthError
from mcp_proxy.cache_redis import RedisCache
from mcp_proxy.changes import (
    ALL,
    Change,
    PostgresChangeListener,
    RedisChangeListener,
    RedisChangePublisher,
    encodeChange,
    instanceChange,
    keyChange,
    parseChange,
    redisCacheOf,
)
from mcp_proxy.config import DatabaseURL, resolveSettings
from mcp_proxy.keys import hashApiKey
from mcp_proxy.repository import openRepository
from mcp_proxy.repository.schema import CHANGE_CHANNEL, MIGRATIONS, splitStatements
from mcp_proxy.service import ProxyService
from mcp_proxy.session import SSE, STREAMABLE_HTTP, Session

#: Seconds a test waits for what should happen much sooner.
PATIENCE = 10.0


async def until(
    condition: Callable[[], Union[bool, Awaitable[bool]]], what: str, within: float = PATIENCE
) -> float:
    """
    Poll C{condition} until it holds.

    @return: the seconds it took.
    @raise AssertionError: when it does not hold within C{within} seconds.
    """
    start = time.monotonic()
    while True:
        result = condition()
        if not isinstance(result, bool):
            result = await result
        if result:
            return time.monotonic() - start
        if time.monotonic() - start > within:
            raise AssertionError(f"{what}: not within {within:g} s")
        await deferLater(reactor, 0.002, lambda: None)


# -- payloads ------------------------------------------------------------------


def test_payloadsRoundTrip() -> None:
    """
    Every change survives its JSON payload.
    """
    for change in (
        ALL,
        keyChange("k1", "a" * 64, end=True),
        keyChange("k1", None, end=False),
        instanceChange("i1", ["h1", "h2"], end=False),
        instanceChange("i1"),
        Change("key", keyIds=("k2", "k1"), keyHashes=("h2", "h1"), end=True),
    ):
        assert parseChange(encodeChange(change)) == change
        assert parseChange(encodeChange(change).encode()) == change


def test_payloadsAsTheTriggersWriteThem() -> None:
    """
    The triggers' payloads (jsonb text: spaces, any key order) are read; a
    missing "end" ends sessions.
    """
    assert parseChange('{"t": "key", "end": false, "keyId": "k1", "keyHash": "h1"}') == (
        Change("key", keyIds=("k1",), keyHashes=("h1",), end=False)
    )
    assert parseChange('{"t": "key", "keyId": "k1", "keyHash": null}') == Change(
        "key", keyIds=("k1",), end=True
    )
    assert parseChange(
        '{"t": "key", "end": true, "keyId": "k2", "keyHash": "h2", '
        '"oldKeyId": "k1", "oldKeyHash": "h1"}'
    ) == Change("key", keyIds=("k2", "k1"), keyHashes=("h2", "h1"), end=True)
    assert parseChange('{"t": "instance", "instanceId": "i1"}') == instanceChange("i1", (), True)
    assert parseChange('{"t": "all"}') is ALL


@pytest.mark.parametrize(
    "payload",
    [
        "",
        "garbage",
        "[]",
        '"all"',
        "{}",
        '{"t": "nope"}',
        '{"t": "key"}',
        '{"t": "key", "keyId": ""}',
        '{"t": "key", "keyId": 5}',
        '{"t": "key", "keyId": "k", "end": "yes"}',
        '{"t": "instance"}',
        '{"t": "instance", "instanceId": "i", "keyHashes": "h"}',
        '{"t": "instance", "instanceId": "i", "keyHashes": [1]}',
        b"\xff\xfe",
        '{"t": "all", "pad": "' + "x" * 70_000 + '"}',
    ],
)
def test_badPayloads(payload: Any) -> None:
    """
    Anything else is refused with a C{ValueError}.
    """
    with pytest.raises(ValueError):
        parseChange(payload)


def test_migrationSplitting() -> None:
    """
    Function bodies stay whole; the SQLite side of the triggers' migration
    records its version only; every migration has both dialects.
    """
    assert splitStatements("SELECT 1;\nCREATE FUNCTION f() AS $x$\nA;\nB;\n$x$;\nSELECT 2;\n") == [
        "SELECT 1",
        "CREATE FUNCTION f() AS $x$\nA;\nB;\n$x$",
        "SELECT 2",
    ]
    notifications = {m.version: m for m in MIGRATIONS}["0002_change_notifications"]
    assert notifications.statements("sqlite") == []
    assert all(
        f"pg_notify('{CHANGE_CHANNEL}'" in s
        for s in notifications.statements("postgresql")
        if "RETURNS trigger" in s and "mcpproxy_notify_all" in s
    )


# -- the triggers ------------------------------------------------------------------


class Notifications:
    """
    A raw psycopg2 connection LISTENing on the change channel.
    """

    def __init__(self, server: PostgresServer, database: str) -> None:
        self.connection = server.connect(database)
        with self.connection.cursor() as cursor:
            cursor.execute(f"LISTEN {CHANGE_CHANNEL}")

    def take(self, count: int) -> list[dict[str, Any]]:
        """
        The next C{count} payloads, waiting for them.
        """
        deadline = time.monotonic() + PATIENCE
        while len(self.connection.notifies) < count:
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"{len(self.connection.notifies)} of {count} notifications"
            select.select([self.connection], [], [], remaining)
            self.connection.poll()
        taken = self.connection.notifies[:count]
        del self.connection.notifies[:count]
        return [json.loads(n.payload) for n in taken]

    def close(self) -> None:
        self.connection.close()


@pytest_twisted.ensureDeferred
async def test_triggerPayloads(postgresServer: PostgresServer, postgresDatabase: str) -> None:
    """
    Each change of a cached table, by any connection, notifies what it
    makes stale; "lastUsedAt" and other uncached columns notify nothing.
    """
    repo = openRepository(
        DatabaseURL(kind="postgresql", dsn=postgresServer.dsnFor(postgresDatabase)),
        reactor=reactor,
        queryTimeout=TEST_QUERY_TIMEOUT,
    )
    await repo.start()
    try:
        org = await repo.createOrganization("org")
        server = await repo.createServer("s", "STDIO", "true", [], None, [], "NONE", org.id)
        config = await repo.createConfig(server.id, "c", "", {}, org.id)
        await repo.syncTools(server.id, [("t1", "", {}), ("t2", "", {})])
        group = await repo.createToolGroup(org.id, "g", "", [(config.id, "t1")])
        instance = await repo.createInstance(org.id, "i", "", group.id, "API_KEY")
    finally:
        await repo.stop()
    raw = postgresServer.connect(postgresDatabase)
    listen = Notifications(postgresServer, postgresDatabase)
    h1, h2 = "1" * 64, "2" * 64

    def sql(statement: str, *params: Any) -> None:
        with raw.cursor() as cursor:
            cursor.execute(statement, params)

    try:
        sql(
            'INSERT INTO "McpApiKey" (id, name, "apiKey", "apiKeyHash", "userId", '
            '"userMcpServerInstanceId", "updatedAt") VALUES (%s, %s, %s, %s, %s, %s, now())',
            "k1",
            "k",
            "display",
            h1,
            "mcp-proxy",
            instance.id,
        )
        assert listen.take(1) == [{"t": "key", "keyId": "k1", "keyHash": h1, "end": False}]
        # Quiet: the request path's touch, and columns nothing caches.
        sql('UPDATE "McpApiKey" SET "lastUsedAt" = now(), name = %s', "renamed")
        sql('UPDATE "Tool" SET description = %s', "new")
        sql('UPDATE "UserMcpServerInstance" SET name = %s, "updatedAt" = now()', "x")
        sql('UPDATE "McpApiKey" SET "isActive" = false')
        assert listen.take(1) == [{"t": "key", "keyId": "k1", "keyHash": h1, "end": True}]
        sql('UPDATE "McpApiKey" SET "isActive" = true')
        assert listen.take(1)[0]["end"] is False
        sql('UPDATE "McpApiKey" SET "expiresAt" = now() + interval %s', "1 day")
        assert listen.take(1)[0]["end"] is True
        sql('UPDATE "McpApiKey" SET "apiKeyHash" = %s', h2)
        assert listen.take(1) == [
            {"t": "key", "keyId": "k1", "keyHash": h2, "oldKeyHash": h1, "end": True}
        ]
        sql('UPDATE "UserToolGroup" SET "isEnabled" = false')
        assert listen.take(1) == [
            {"t": "instance", "instanceId": instance.id, "keyHashes": [h2], "end": True}
        ]
        sql('UPDATE "UserToolGroup" SET "isEnabled" = true')
        assert listen.take(1)[0]["end"] is False
        # A whole set-tools transaction notifies once per instance.
        sql(
            'BEGIN; DELETE FROM "UserToolGroupTool"; INSERT INTO "UserToolGroupTool" '
            '("toolGroupId", "userMcpServerConfigId", "toolId") '
            'SELECT %s, %s, id FROM "Tool"; COMMIT',
            group.id,
            config.id,
        )
        assert listen.take(1) == [
            {"t": "instance", "instanceId": instance.id, "keyHashes": [], "end": False}
        ]
        sql('UPDATE "UserMcpServerConfig" SET "envVars" = %s', '{"A": "b"}')
        assert listen.take(1) == [{"t": "all"}]
        sql('UPDATE "McpServer" SET args = %s', ["-v"])
        assert listen.take(1) == [{"t": "all"}]
        sql('UPDATE "Tool" SET name = %s WHERE name = %s', "t3", "t2")
        assert listen.take(1) == [{"t": "all"}]
        sql('UPDATE "UserMcpServerInstance" SET "authType" = %s', "OAUTH")
        assert listen.take(1) == [
            {"t": "instance", "instanceId": instance.id, "keyHashes": [h2], "end": True}
        ]
        sql('UPDATE "UserMcpServerInstance" SET "deletedAt" = now()')
        assert listen.take(1)[0]["end"] is True
        sql('DELETE FROM "McpApiKey"')
        assert listen.take(1) == [{"t": "key", "keyId": "k1", "keyHash": h2, "end": True}]
        sql('TRUNCATE "UserToolGroupTool"')
        assert listen.take(1) == [{"t": "all"}]
        # Nothing else was sent.
        sql("SELECT pg_notify(%s, %s)", CHANGE_CHANNEL, "marker")
        assert [n.payload for n in _drain(listen)] == ["marker"]
    finally:
        listen.close()
        raw.close()


def _drain(listen: Notifications) -> list[Any]:
    deadline = time.monotonic() + PATIENCE
    while not listen.connection.notifies and time.monotonic() < deadline:
        select.select([listen.connection], [], [], 0.5)
        listen.connection.poll()
    taken = list(listen.connection.notifies)
    del listen.connection.notifies[:]
    return taken


@pytest_twisted.ensureDeferred
async def test_manyKeysNotifyEverything(
    postgresServer: PostgresServer, postgresDatabase: str
) -> None:
    """
    An instance with more key hashes than a notification can carry is
    announced without them, together with "drop everything".
    """
    repo = openRepository(
        DatabaseURL(kind="postgresql", dsn=postgresServer.dsnFor(postgresDatabase)),
        reactor=reactor,
        queryTimeout=TEST_QUERY_TIMEOUT,
    )
    await repo.start()
    try:
        org = await repo.createOrganization("org")
        group = await repo.createToolGroup(org.id, "g", "", [])
        instance = await repo.createInstance(org.id, "i", "", group.id, "API_KEY")
        for n in range(150):
            key = secrets.token_hex(8)
            await repo.createApiKey(instance.id, "k", hashApiKey(key), f"mcpp_{n}", None)
    finally:
        await repo.stop()
    raw = postgresServer.connect(postgresDatabase)
    listen = Notifications(postgresServer, postgresDatabase)
    try:
        with raw.cursor() as cursor:
            cursor.execute('UPDATE "UserMcpServerInstance" SET "deletedAt" = now()')
        assert listen.take(2) == [
            {"t": "all"},
            {"t": "instance", "instanceId": instance.id, "keyHashes": [], "end": True},
        ]
    finally:
        listen.close()
        raw.close()


# -- a proxy listening on PostgreSQL -------------------------------------------------


def proxyService(tmp_path: Path, dsn: Optional[str], cache: str = "memory") -> ProxyService:
    """
    A proxy on PostgreSQL (C{dsn}) or, without one, on a SQLite file.
    """
    settings = resolveSettings(
        {
            "database": f"sqlite:///{tmp_path}/proxy.sqlite3",
            "cache": cache,
            "request-log": "off",
        },
        ("tcp:0:interface=127.0.0.1",),
        environ={},
    )
    repository = None
    if dsn is not None:
        repository = openRepository(
            DatabaseURL(kind="postgresql", dsn=dsn),
            reactor=reactor,
            queryTimeout=TEST_QUERY_TIMEOUT,
        )
    return ProxyService(settings, reactor, repository=repository)


@pytest_twisted.async_yield_fixture
async def pgProxy(
    postgresServer: PostgresServer, postgresDatabase: str, tmp_path: Path
) -> AsyncIterator[ProxyService]:
    service = proxyService(tmp_path, postgresServer.dsnFor(postgresDatabase))
    service.startService()
    await service.whenReady()
    try:
        yield service
    finally:
        await service.stopService()


@pytest.fixture
def raw(postgresServer: PostgresServer, postgresDatabase: str) -> Any:
    """
    Another connection to the proxy's database (autocommit).
    """
    connection = postgresServer.connect(postgresDatabase)
    try:
        yield connection
    finally:
        connection.close()


def execute(connection: Any, statement: str, *params: Any) -> list[Any]:
    with connection.cursor() as cursor:
        cursor.execute(statement, params)
        return list(cursor.fetchall()) if cursor.description is not None else []


def pgListener(service: ProxyService) -> PostgresChangeListener:
    (listener,) = [
        lis for lis in service.changeListeners if isinstance(lis, PostgresChangeListener)
    ]
    return listener


async def cached(service: ProxyService, key: str) -> Any:
    value: Any = await service.authCache.get(AUTH_CACHE_PREFIX + key)
    return value


async def warm(service: ProxyService, key: str, instanceId: str) -> tuple[Session, str]:
    """
    Authenticate a key and load its instance's configuration (both get
    cached), and open a session of that key.

    @return: the session and the key's id.
    """
    principal = await service.authenticator.authenticate(key, instanceId)
    await service.configs.load(instanceId)
    assert await cached(service, hashApiKey(key)) is not None
    assert await service.configCache.get(CONFIG_CACHE_PREFIX + instanceId) is not None
    session = service.sessions.create(
        transport=SSE,
        instanceId=instanceId,
        keyId=principal.keyId,
        organizationId=principal.organizationId,
    )
    return session, principal.keyId


async def settle(service: ProxyService, raw: Any) -> None:
    """
    Wait until the proxy has handled every notification sent so far (the
    test's setup fires triggers too): send one that ends a session of a
    made-up instance, and wait for that session to end.
    """
    marker = f"marker-{secrets.token_hex(4)}"
    session = service.sessions.create(transport=SSE, instanceId=marker, keyId=marker)
    payload = encodeChange(instanceChange(marker, (), end=True))
    execute(raw, "SELECT pg_notify(%s, %s)", CHANGE_CHANNEL, payload)
    await until(lambda: not isOpen(service, session), "the marker notification")


def isOpen(service: ProxyService, session: Session) -> bool:
    return service.sessions.get(session.id) is not None


async def configCached(service: ProxyService, instanceId: str) -> bool:
    return await service.configCache.get(CONFIG_CACHE_PREFIX + instanceId) is not None


@pytest_twisted.ensureDeferred
async def test_revokedByAnotherConnection(pgProxy: ProxyService, raw: Any) -> None:
    """
    A key revoked with plain SQL by another connection is refused within a
    second, and its session ends; an unrelated UPDATE of the key changes
    nothing.
    """
    key, instanceId, _ = await makeData(pgProxy)
    await settle(pgProxy, raw)
    session, keyId = await warm(pgProxy, key, instanceId)
    listener = pgListener(pgProxy)
    assert listener.listening and listener.stats["connects"] == 1

    received = listener.stats["received"]
    execute(raw, 'UPDATE "McpApiKey" SET "lastUsedAt" = now() WHERE id = %s', keyId)
    await settle(pgProxy, raw)
    assert listener.stats["received"] == received + 1
    assert await cached(pgProxy, hashApiKey(key)) is not None and isOpen(pgProxy, session)

    execute(raw, 'UPDATE "McpApiKey" SET "isActive" = false WHERE id = %s', keyId)
    took = await until(
        lambda: not isOpen(pgProxy, session), "the session of the revoked key ending", 1.0
    )
    assert await cached(pgProxy, hashApiKey(key)) is None
    with pytest.raises(AuthError) as refused:
        await pgProxy.authenticator.authenticate(key, instanceId)
    assert refused.value.status == 401
    assert listener.stats["received"] == received + 2 and listener.stats["invalid"] == 0
    print(f"PostgreSQL trigger -> proxy invalidated in {took * 1000:.1f} ms")


@pytest_twisted.ensureDeferred
async def test_instanceChanges(pgProxy: ProxyService, raw: Any) -> None:
    """
    Changing the tools of an instance's group drops its configuration and
    keeps its sessions; disabling the group, or deleting the instance,
    ends them.
    """
    key, instanceId, groupId = await makeData(pgProxy)
    await settle(pgProxy, raw)
    session, _ = await warm(pgProxy, key, instanceId)
    execute(raw, 'DELETE FROM "UserToolGroupTool" WHERE "toolGroupId" = %s', groupId)
    await until(
        lambda: Deferred.fromCoroutine(configCached(pgProxy, instanceId)).addCallback(
            lambda c: not c
        ),
        "the configuration dropped",
    )
    assert isOpen(pgProxy, session)
    config = await pgProxy.configs.load(instanceId)
    assert config is not None and config.upstreams == ()

    execute(raw, 'UPDATE "UserToolGroup" SET "isEnabled" = false WHERE id = %s', groupId)
    await until(lambda: not isOpen(pgProxy, session), "the session ending")
    assert await cached(pgProxy, hashApiKey(key)) is None
    execute(raw, 'UPDATE "UserToolGroup" SET "isEnabled" = true WHERE id = %s', groupId)
    await settle(pgProxy, raw)

    session, _ = await warm(pgProxy, key, instanceId)
    execute(raw, 'UPDATE "UserMcpServerInstance" SET "deletedAt" = now() WHERE id = %s', instanceId)
    await until(lambda: not isOpen(pgProxy, session), "the session ending")
    assert await cached(pgProxy, hashApiKey(key)) is None
    assert await pgProxy.configs.load(instanceId) is None


@pytest_twisted.ensureDeferred
async def test_configChangeDropsEverything(pgProxy: ProxyService, raw: Any) -> None:
    """
    A config's change drops every cached key result and configuration, and
    no session ends.
    """
    key, instanceId, _ = await makeData(pgProxy)
    await settle(pgProxy, raw)
    session, _ = await warm(pgProxy, key, instanceId)
    execute(raw, 'UPDATE "UserMcpServerConfig" SET "envVars" = %s', '{"X": "1"}')
    await until(
        lambda: Deferred.fromCoroutine(cached(pgProxy, hashApiKey(key))).addCallback(
            lambda v: v is None
        ),
        "the key's entry dropped",
    )
    assert not await configCached(pgProxy, instanceId)
    assert isOpen(pgProxy, session)


@pytest_twisted.ensureDeferred
async def test_unreadableNotification(pgProxy: ProxyService, raw: Any) -> None:
    """
    A notification that cannot be read drops everything.
    """
    key, instanceId, _ = await makeData(pgProxy)
    await settle(pgProxy, raw)
    session, _ = await warm(pgProxy, key, instanceId)
    listener = pgListener(pgProxy)
    execute(raw, "SELECT pg_notify(%s, %s)", CHANGE_CHANNEL, "{nope")
    await until(lambda: listener.stats["invalid"] == 1, "the bad notification read")
    await until(
        lambda: Deferred.fromCoroutine(cached(pgProxy, hashApiKey(key))).addCallback(
            lambda v: v is None
        ),
        "everything dropped",
    )
    assert isOpen(pgProxy, session)


@pytest_twisted.ensureDeferred
async def test_listenerReconnects(pgProxy: ProxyService, raw: Any) -> None:
    """
    When the server ends the listener's connection, it connects again,
    drops everything once (notifications may have been missed), and later
    changes arrive.
    """
    key, instanceId, _ = await makeData(pgProxy)
    await settle(pgProxy, raw)
    listener = pgListener(pgProxy)
    pid = listener.backendPid
    assert pid is not None
    session, keyId = await warm(pgProxy, key, instanceId)
    assert execute(raw, "SELECT pg_terminate_backend(%s)", pid) == [(True,)]
    await until(lambda: listener.stats["flushes"] == 1, "the listener reconnecting")
    assert listener.listening and listener.backendPid not in (None, pid)
    assert listener.stats["connects"] == 2
    assert await cached(pgProxy, hashApiKey(key)) is None
    assert isOpen(pgProxy, session)
    rows = execute(
        raw,
        "SELECT application_name, query FROM pg_stat_activity WHERE pid = %s",
        listener.backendPid,
    )
    assert rows and rows[0][0] == "mcp-proxy listener"

    await pgProxy.authenticator.authenticate(key, instanceId)
    execute(raw, 'UPDATE "McpApiKey" SET "isActive" = false WHERE id = %s', keyId)
    await until(lambda: not isOpen(pgProxy, session), "the session ending after a reconnection")
    assert await cached(pgProxy, hashApiKey(key)) is None


@pytest_twisted.ensureDeferred
async def test_listenerRetriesUntilTheServerAnswers(
    postgresServer: PostgresServer, postgresDatabase: str, tmp_path: Path
) -> None:
    """
    A listener whose database refuses connections keeps retrying with
    backoff, and listens (dropping everything once) when it may connect.
    """
    service = proxyService(tmp_path, postgresServer.dsnFor(postgresDatabase))
    service.startService()
    await service.whenReady()
    key, instanceId, _ = await makeData(service)
    admin = postgresServer.connect()
    raw = postgresServer.connect(postgresDatabase)
    await settle(service, raw)
    raw.close()
    await service.authenticator.authenticate(key, instanceId)
    listener = PostgresChangeListener(
        dsn=postgresServer.dsnFor(postgresDatabase),
        reactor=reactor,
        invalidator=service.invalidator,
        reconnectDelay=0.05,
        reconnectMaxDelay=0.2,
        heartbeatInterval=0.05,
    )
    try:
        execute(admin, f'ALTER DATABASE "{postgresDatabase}" ALLOW_CONNECTIONS false')
        await listener.start()
        assert not listener.listening and listener.stats["failures"] == 1
        await until(lambda: listener.stats["failures"] >= 3, "retries")
        execute(admin, f'ALTER DATABASE "{postgresDatabase}" ALLOW_CONNECTIONS true')
        await until(lambda: listener.stats["flushes"] == 1, "listening once allowed")
        assert listener.listening
        assert await cached(service, hashApiKey(key)) is None
        # The heartbeat (every 0.05 s here) is answered on a live connection.
        connects = listener.stats["connects"]
        await until(lambda: listener.stats["heartbeats"] >= 3, "heartbeats")
        assert listener.listening and listener.stats["connects"] == connects
    finally:
        execute(admin, f'ALTER DATABASE "{postgresDatabase}" ALLOW_CONNECTIONS true')
        admin.close()
        await listener.stop()
        await service.stopService()
    assert not listener.listening


# -- the origin's schema: mcpproxy-admin notifies ---------------------------------------


async def admin(database: str, *args: str, cache: Optional[str] = None) -> tuple[int, str, str]:
    """
    Run mcpproxy-admin in this process (on this reactor).
    """
    import io

    argv = ["--database", database, "--json", *args]
    if cache is not None:
        argv[2:2] = ["--cache", cache]
    parsed = buildParser().parse_args(argv)
    resolveOptions(parsed, {})
    stdout, stderr = io.StringIO(), io.StringIO()
    code = await runAdmin(reactor, parsed, {}, stdout, stderr)
    return code, stdout.getvalue(), stderr.getvalue()


def urlFor(server: PostgresServer, database: str) -> str:
    import psycopg2.extensions

    parts = psycopg2.extensions.parse_dsn(server.dsnFor(database))
    user = parts.get("user", "")
    password = f":{parts['password']}" if parts.get("password") else ""
    host = parts.get("host", "127.0.0.1")
    port = parts.get("port", "5432")
    return f"postgresql://{user}{password}@{host}:{port}/{database}"


@pytest_twisted.ensureDeferred
async def test_originSchemaAdminNotifies(
    postgresServer: PostgresServer, postgresDatabase: str, tmp_path: Path
) -> None:
    """
    On a database with the origin's schema no trigger exists (no DDL runs
    there): the proxy still listens, a change made with plain SQL is not
    announced, and mcpproxy-admin announces its own changes.
    """
    key = originApiKey(1)
    origin = postgresServer.connect(postgresDatabase)
    try:
        execute(origin, ORIGIN_SCHEMA.replace("%(hash)s", "%s"), hashApiKey(key))
        service = proxyService(tmp_path, postgresServer.dsnFor(postgresDatabase))
        service.startService()
        await service.whenReady()
        try:
            assert service.repository.originSchema
            assert execute(origin, "SELECT count(*) FROM pg_trigger WHERE NOT tgisinternal") == [
                (0,)
            ]
            listener = pgListener(service)
            assert listener.listening
            await service.authenticator.authenticate(key, "i1")
            session = service.sessions.create(
                transport=STREAMABLE_HTTP, instanceId="i1", keyId="k1", organizationId="o1"
            )
            execute(origin, 'UPDATE "McpApiKey" SET name = %s', "changed by SQL")
            execute(
                origin, "SELECT pg_notify(%s, %s)", CHANGE_CHANNEL, '{"t": "key", "keyId": "z"}'
            )
            await until(lambda: listener.stats["received"] == 1, "the marker")
            assert await cached(service, hashApiKey(key)) is not None

            url = urlFor(postgresServer, postgresDatabase)
            code, out, err = await admin(url, "key", "revoke", "k1")
            assert code == 0, err
            assert json.loads(out)["state"] == "revoked"
            await until(lambda: not isOpen(service, session), "the session ending")
            assert listener.stats["received"] == 2
            assert await cached(service, hashApiKey(key)) is None
            with pytest.raises(AuthError):
                await service.authenticator.authenticate(key, "i1")
            code, out, err = await admin(url, "key", "expire", "k1", "--at", "never")
            assert code == 0, err
            await until(lambda: listener.stats["received"] == 3, "the expiry change")
            assert execute(origin, "SELECT count(*) FROM pg_trigger WHERE NOT tgisinternal") == [
                (0,)
            ]
        finally:
            await service.stopService()
    finally:
        origin.close()


# -- Redis ------------------------------------------------------------------------------


def redisSpec(prefix: str) -> str:
    return requireRedis() + f"?prefix={prefix}"


def redisListener(service: ProxyService) -> RedisChangeListener:
    (listener,) = [lis for lis in service.changeListeners if isinstance(lis, RedisChangeListener)]
    return listener


@pytest_twisted.async_yield_fixture
async def redisProxy(tmp_path: Path) -> AsyncIterator[ProxyService]:
    """
    A proxy on SQLite whose cache is the test Redis, under a fresh prefix.
    """
    prefix = f"mcpproxy-test:{secrets.token_hex(6)}:"
    service = proxyService(tmp_path, None, cache=redisSpec(prefix))
    service.startService()
    await service.whenReady()
    try:
        yield service
    finally:
        await service.stopService()
        cleaner = newCache(prefix=prefix)
        await cleaner.clear()
        await cleaner.close()


@pytest_twisted.ensureDeferred
async def test_redisListener(redisProxy: ProxyService) -> None:
    """
    Changes published on the cache's Redis channel reach the proxy: the
    shared entry goes, the session of a revoked key ends; after its
    connection is killed, the listener subscribes again, drops
    everything once, and hears later changes.
    """
    service = redisProxy
    assert not any(isinstance(lis, PostgresChangeListener) for lis in service.changeListeners)
    listener = redisListener(service)
    shared = redisCacheOf(service.authCache)
    assert isinstance(shared, RedisCache)
    assert listener.listening and listener.channel == shared.prefix + "invalidate"
    key, instanceId, _ = await makeData(service)
    session, keyId = await warm(service, key, instanceId)
    assert await shared.execute("EXISTS", shared.keyFor(AUTH_CACHE_PREFIX + hashApiKey(key))) == 1

    publisher = RedisChangePublisher(newCache(prefix=shared.prefix))
    try:
        await publisher.publish([keyChange("other", "f" * 64, end=True)])
        await until(lambda: listener.stats["received"] == 1, "the first message")
        assert isOpen(service, session)

        await service.repository.revokeApiKey(keyId)
        await publisher.publish([keyChange(keyId, hashApiKey(key), end=True)])
        took = await until(lambda: not isOpen(service, session), "the session ending", 1.0)
        assert await cached(service, hashApiKey(key)) is None
        print(f"Redis PUBLISH -> proxy invalidated in {took * 1000:.1f} ms")

        await shared.execute("PUBLISH", listener.channel, "{garbage")
        await until(lambda: listener.stats["invalid"] == 1, "the unreadable message")

        key2, _, _ = await _secondKey(service, instanceId)
        session2, keyId2 = await warm(service, key2, instanceId)
        killed = listener.clientId
        assert killed is not None
        await shared.execute("CLIENT", "KILL", "ID", str(killed))
        await until(lambda: listener.stats["flushes"] == 1, "the listener reconnecting")
        assert listener.clientId not in (None, killed) and listener.stats["connects"] == 2
        assert await cached(service, hashApiKey(key2)) is None

        await service.authenticator.authenticate(key2, instanceId)
        await publisher.publish([keyChange(keyId2, hashApiKey(key2), end=True)])
        await until(lambda: not isOpen(service, session2), "the session ending after reconnecting")
    finally:
        await publisher.close()


async def _secondKey(service: ProxyService, instanceId: str) -> tuple[str, str, str]:
    from mcp_proxy.keys import displayApiKey, generateApiKey

    key = generateApiKey()
    record = await service.repository.createApiKey(
        instanceId, "second", hashApiKey(key), displayApiKey(key), None
    )
    return key, record.id, instanceId


@pytest_twisted.ensureDeferred
async def test_adminPublishesOnRedis(redisProxy: ProxyService, tmp_path: Path) -> None:
    """
    mcpproxy-admin with a Redis --cache publishes its changes and deletes
    the shared entries itself; with the memory cache it publishes nothing.
    """
    service = redisProxy
    shared = redisCacheOf(service.authCache)
    assert shared is not None
    listener = redisListener(service)
    database = f"sqlite:///{tmp_path}/proxy.sqlite3"
    key, instanceId, groupId = await makeData(service)
    session, keyId = await warm(service, key, instanceId)
    redisKey = shared.keyFor(AUTH_CACHE_PREFIX + hashApiKey(key))

    code, _, err = await admin(database, "key", "expire", keyId, "--at", "2099-01-01")
    assert code == 0, err
    assert listener.stats["received"] == 0

    spec = redisSpec(shared.prefix)
    code, _, err = await admin(database, "toolgroup", "set-tools", groupId, "--clear", cache=spec)
    assert code == 0, err
    await until(lambda: listener.stats["received"] == 1, "the tool group change")
    assert isOpen(service, session)
    config = await service.configs.load(instanceId)
    assert config is not None and config.upstreams == ()

    await service.authenticator.authenticate(key, instanceId)
    assert await shared.execute("EXISTS", redisKey) == 1
    code, _, err = await admin(database, "key", "revoke", keyId, cache=spec)
    assert code == 0, err
    assert await shared.execute("EXISTS", redisKey) == 0
    await until(lambda: not isOpen(service, session), "the session ending")
    with pytest.raises(AuthError):
        await service.authenticator.authenticate(key, instanceId)


@pytest_twisted.ensureDeferred
async def test_adminWarnsWhenRedisIsDown(tmp_path: Path) -> None:
    """
    When the change cannot be published, mcpproxy-admin keeps the change
    and says so.
    """
    database = f"sqlite:///{tmp_path}/proxy.sqlite3"
    code, _, err = await admin(database, "init")
    assert code == 0, err
    code, out, _ = await admin(database, "org", "list")
    orgId = json.loads(out)[0]["id"]
    code, out, err = await admin(database, "toolgroup", "create", "g", "--org", orgId)
    assert code == 0, err
    groupId = json.loads(out)["id"]
    code, out, err = await admin(database, "instance", "create", "i", "--toolgroup", groupId)
    assert code == 0, err
    code, out, err = await admin(
        database, "instance", "delete", json.loads(out)["id"], cache="redis://127.0.0.1:1/0"
    )
    assert code == 0, err
    assert "warning: the change is saved, but running proxies were not told (Redis PUBLISH" in err


@pytest_twisted.ensureDeferred
async def test_adminRefusesAnUnknownCache(tmp_path: Path) -> None:
    """
    A --cache that names no backend is refused before the command runs.
    """
    database = f"sqlite:///{tmp_path}/proxy.sqlite3"
    code, _, err = await admin(database, "init")
    assert code == 0, err
    code, out, err = await admin(database, "org", "create", "second", cache="nope:x")
    assert code == 2 and out == ""
    assert "unknown cache backend 'nope'" in err
    code, out, _ = await admin(database, "org", "list", cache="memory")
    assert [o["name"] for o in json.loads(out)] == ["default"]


def test_redisCacheOf(tmp_path: Path) -> None:
    """
    The shared part of a cache: the Redis cache itself, or the default of a
    routed one; none for the memory cache.
    """
    from mcp_proxy.cacheplugins import openCache

    assert redisCacheOf(openCache("memory", reactor)) is None
    routed = openCache("redis://127.0.0.1:6379/0?prefix=p:", reactor)
    shared = openCache("redis://127.0.0.1:6379/0?prefix=p:&configs=shared", reactor)
    assert isinstance(redisCacheOf(routed), RedisCache)
    assert redisCacheOf(shared) is shared
