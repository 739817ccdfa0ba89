"""
The contract of L{IRepository}, run against both providers (SQLite and
PostgreSQL) through the C{repository} fixture, plus the tests that only
make sense for one of them.
"""

from __future__ import annotations

import datetime
import gzip
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import pytest
import pytest_twisted
from attrs import evolve, frozen
from conftest import TEST_QUERY_TIMEOUT, Databases, PostgresServer, RawDatabase
from twisted.internet import reactor
from twisted.internet.defer import CancelledError, Deferred, gatherResults
from twisted.internet.task import deferLater
from zope.interface.verify import verifyObject

from mcp_proxy import models as m
from mcp_proxy.config import DatabaseURL, SettingsError
from mcp_proxy.errors import (
    Conflict,
    DatabaseUnavailable,
    InvalidInput,
    NotFound,
    SchemaError,
)
from mcp_proxy.interfaces import IRepository
from mcp_proxy.keys import displayApiKey, hashApiKey, newId
from mcp_proxy.repository import (
    MIGRATIONS,
    SYSTEM_USER_ID,
    EncryptedValueError,
    PostgresRepository,
    SqliteRepository,
    openRepository,
)
from mcp_proxy.repository.postgres import ADMIN_LOCK_KEY
from mcp_proxy.repository.schema import MIGRATIONS_TABLE, Migration

T = TypeVar("T")

UTC_2030 = datetime.datetime(2030, 1, 1, 12, 0, 0)
UTC_2020 = datetime.datetime(2020, 1, 1, 12, 0, 0)


def apiKey(n: int) -> str:
    """
    A deterministic API key whose display form is unique per C{n}.
    """
    return f"mcpp_{'k' * 38}{n:05d}"


@frozen
class World:
    """
    A small but complete set of objects: two organizations, a stdio and a
    remote server with tools, two configs, a tool group, an instance and
    its key.
    """

    org: m.Organization
    other: m.Organization
    files: m.McpServer
    web: m.McpServer
    zeta: m.ServerConfig
    alpha: m.ServerConfig
    group: m.ToolGroup
    instance: m.Instance
    key: m.ApiKey
    keyHash: str


async def makeWorld(repo: Any) -> World:
    org = await repo.createOrganization("acme")
    other = await repo.createOrganization("other")
    files = await repo.createServer(
        "files", m.STDIO, "npx", ["-y", "files"], None, ["ROOT"], m.AUTH_NONE, None
    )
    web = await repo.createServer(
        "web",
        m.STREAMABLE_HTTPS,
        None,
        [],
        "https://example.com/mcp",
        ["X-Token"],
        m.AUTH_CLOUD_RUN_IAM,
        org.id,
    )
    await repo.syncTools(
        files.id,
        [
            ("read", "Read a file", {"type": "object"}),
            ("write", "Write a file", {"type": "object", "required": ["path"]}),
            ("delete", "Delete a file", {"type": "object"}),
        ],
    )
    await repo.syncTools(
        web.id, [("fetch", "Fetch", {"type": "object"}), ("search", "Search", {"type": "object"})]
    )
    zeta = await repo.createConfig(files.id, "zeta", "files", {"ROOT": "/srv"}, org.id)
    alpha = await repo.createConfig(web.id, "alpha", "", {"X-Token": "t0k3n"}, org.id)
    group = await repo.createToolGroup(
        org.id,
        "main",
        "the main group",
        [(zeta.id, "read"), (zeta.id, "write"), (alpha.id, "search")],
    )
    instance = await repo.createInstance(org.id, "main", "", group.id, m.AUTH_API_KEY)
    keyHash = hashApiKey(apiKey(1))
    key = await repo.createApiKey(instance.id, "first", keyHash, displayApiKey(apiKey(1)), None)
    return World(org, other, files, web, zeta, alpha, group, instance, key, keyHash)


def logRow(
    world: World, n: int, createdAt: datetime.datetime, data: m.RequestLogData | None = None
) -> m.RequestLogRow:
    return m.RequestLogRow(
        id=newId(),
        instanceId=world.instance.id,
        organizationId=world.org.id,
        toolName=f"tool{n}",
        transportType=m.STREAMABLE_HTTPS,
        method="tools/call",
        responseStatus="200" if n % 2 else "500",
        durationMs=n,
        errorMessage=None if n % 2 else "boom",
        errorCode=None if n % 2 else "Error",
        inputBytes=n * 10,
        outputBytes=None,
        userAgent=None,
        createdAt=createdAt,
        data=data,
    )


def logData(payload: bytes) -> m.RequestLogData:
    compressed = gzip.compress(payload)
    return m.RequestLogData(
        id=newId(),
        inputDataCompressed=compressed,
        outputDataCompressed=b"\x00\x01\xff" + payload,
        originalInputSize=len(payload),
        originalOutputSize=len(payload) + 3,
        compressedInputSize=len(compressed),
        compressedOutputSize=len(payload) + 3,
        compressionRatio=0.25,
    )


async def eventually(f: Callable[[], Awaitable[T]], within: float = 15.0) -> T:
    """
    Call C{f} until it does not fail with L{DatabaseUnavailable}.
    """
    deadline = reactor.seconds() + within
    while True:
        try:
            return await f()
        except DatabaseUnavailable:
            if reactor.seconds() > deadline:
                raise
            await deferLater(reactor, 0.05)


def names(items: list[Any]) -> list[str]:
    return [item.name for item in items]


# -- the admin lock and a blocked database -------------------------------------


def holdAdminLock(raw: RawDatabase) -> None:
    """
    Make every EXCLUSIVE operation of a repository wait.
    """
    if raw.kind == "sqlite":
        raw.query("BEGIN IMMEDIATE")
    else:
        raw.query("SELECT pg_advisory_lock(%s)", (ADMIN_LOCK_KEY,))


def releaseAdminLock(raw: RawDatabase) -> None:
    if raw.kind == "sqlite":
        raw.query("ROLLBACK")
    else:
        raw.query("SELECT pg_advisory_unlock(%s)", (ADMIN_LOCK_KEY,))


async def waitUntilBlocked(raw: RawDatabase) -> None:
    """
    Wait until the repository waits for a lock: observed on PostgreSQL,
    given time on SQLite (whose outcome does not depend on it).
    """
    if raw.kind == "sqlite":
        await deferLater(reactor, 0.2)
        return
    for _ in range(200):
        rows = raw.query(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
            "AND application_name = 'mcp-proxy' AND wait_event_type = 'Lock'"
        )
        if rows[0][0]:
            return
        await deferLater(reactor, 0.02)
    raise AssertionError("the repository never waited for the lock")


# -- basics ----------------------------------------------------------------------


def test_providesIRepository(repository: Any, request: Any) -> None:
    """
    Both providers provide L{IRepository}, say which they are, and start on
    mcp-proxy's own schema.
    """
    assert verifyObject(IRepository, repository)
    assert repository.kind == request.node.callspec.params["repository"]
    assert repository.originSchema is False
    assert isinstance(repository.queryCounts, dict)


def test_openRepositoryKinds(tmp_path: Any) -> None:
    """
    L{openRepository} returns an unstarted provider of the URL's kind.
    """
    sqlite = openRepository(DatabaseURL.parse(f"sqlite:///{tmp_path}/x.sqlite3"), reactor=reactor)
    assert isinstance(sqlite, SqliteRepository)
    pg = openRepository(DatabaseURL.parse("postgresql://u@127.0.0.1:5432/db"), reactor=reactor)
    assert isinstance(pg, PostgresRepository)
    assert sqlite.queryCounts == {} and pg.queryCounts == {}


@pytest_twisted.ensureDeferred
async def test_migrateIsIdempotent(repository: Any, rawDatabase: RawDatabase) -> None:
    """
    After C{start()}, every migration is recorded once and migrating again
    applies nothing; the system user that owns keys exists.
    """
    assert await repository.migrate() == []
    versions = sorted(r[0] for r in rawDatabase.query(f"SELECT version FROM {MIGRATIONS_TABLE}"))
    assert versions == sorted(mig.version for mig in MIGRATIONS)
    assert rawDatabase.query('SELECT id FROM "User"') == [(SYSTEM_USER_ID,)]


@pytest_twisted.ensureDeferred
async def test_migrateAppliesPending(repository: Any, rawDatabase: RawDatabase) -> None:
    """
    A pending migration is applied once and its version returned.
    """
    sql = 'CREATE TABLE "TestExtra" (id TEXT PRIMARY KEY);\nINSERT INTO "TestExtra" (id) VALUES (\'x\');\n'
    repository.migrations = (*MIGRATIONS, Migration("9000_extra", sql, sql))
    assert await repository.migrate() == ["9000_extra"]
    assert await repository.migrate() == []
    assert rawDatabase.query('SELECT id FROM "TestExtra"') == [("x",)]


@pytest_twisted.ensureDeferred
async def test_failingMigrationIsRolledBack(repository: Any, rawDatabase: RawDatabase) -> None:
    """
    A migration that fails leaves nothing behind and is not recorded.
    """
    sql = 'CREATE TABLE "TestBad" (id TEXT);\nINSERT INTO "NoSuchTable" (id) VALUES (\'x\');\n'
    repository.migrations = (*MIGRATIONS, Migration("9001_bad", sql, sql))
    with pytest.raises(SchemaError):
        await repository.migrate()
    versions = [r[0] for r in rawDatabase.query(f"SELECT version FROM {MIGRATIONS_TABLE}")]
    assert "9001_bad" not in versions
    with pytest.raises(Exception, match="TestBad"):
        rawDatabase.query('SELECT id FROM "TestBad"')
    await repository.ping()


@pytest_twisted.ensureDeferred
async def test_concurrentStartsMigrateOnce(repository: Any, databases: Databases) -> None:
    """
    Two providers starting at once on one empty database both succeed and
    the migrations are applied once.
    """
    url = databases.new()
    first = openRepository(url, reactor=reactor, queryTimeout=TEST_QUERY_TIMEOUT)
    second = openRepository(url, reactor=reactor, queryTimeout=TEST_QUERY_TIMEOUT)
    try:
        await gatherResults([first.start(), second.start()])
        assert await first.migrate() == [] and await second.migrate() == []
        org = await first.createOrganization("shared")
        assert await second.getOrganization(org.id) == org
    finally:
        await first.stop()
        await second.stop()
    raw = RawDatabase(url)
    try:
        versions = [r[0] for r in raw.query(f"SELECT version FROM {MIGRATIONS_TABLE}")]
    finally:
        raw.close()
    assert sorted(versions) == sorted(mig.version for mig in MIGRATIONS)


@pytest_twisted.ensureDeferred
async def test_stoppedRepositoryIsUnavailable(repository: Any) -> None:
    """
    After C{stop()}, operations fail with L{DatabaseUnavailable}; stopping
    again is harmless.
    """
    await repository.ping()
    await repository.stop()
    with pytest.raises(DatabaseUnavailable, match="stopped"):
        await repository.ping()
    with pytest.raises(DatabaseUnavailable):
        await repository.lookupApiKey("0" * 64)
    await repository.stop()


# -- organizations ---------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_organizations(repository: Any) -> None:
    """
    Organizations are created with a cuid and a naive UTC time, read back
    alike, and listed by name.
    """
    before = m.utcnow()
    zed = await repository.createOrganization("zed")
    acme = await repository.createOrganization("acme")
    assert zed.id.startswith("c") and len(zed.id) == 25
    assert zed.createdAt.tzinfo is None
    assert before <= zed.createdAt <= m.utcnow()
    assert await repository.getOrganization(zed.id) == zed
    assert await repository.listOrganizations() == [acme, zed]


@pytest_twisted.ensureDeferred
async def test_organizationErrors(repository: Any) -> None:
    """
    Blank and duplicate names and unknown ids are refused.
    """
    await repository.createOrganization("acme")
    with pytest.raises(InvalidInput, match="organization name"):
        await repository.createOrganization("  ")
    with pytest.raises(Conflict, match="'acme' exists already"):
        await repository.createOrganization("acme")
    with pytest.raises(NotFound, match="organization 'nope' not found"):
        await repository.getOrganization("nope")
    assert names(await repository.listOrganizations()) == ["acme"]


# -- servers ---------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_servers(repository: Any) -> None:
    """
    Stdio and remote servers are stored with their arrays and read back.
    """
    org = await repository.createOrganization("acme")
    stdio = await repository.createServer(
        "files",
        m.STDIO,
        "npx",
        ["-y", "@x/files", "--root=/a b"],
        None,
        ["ROOT", "MODE"],
        "NONE",
        None,
    )
    remote = await repository.createServer(
        "api", m.SSE, None, [], "http://127.0.0.1:9/sse", [], m.AUTH_CLOUD_RUN_IAM, org.id
    )
    assert stdio.args == ("-y", "@x/files", "--root=/a b")
    assert stdio.envVars == ("ROOT", "MODE")
    assert await repository.getServer(stdio.id) == stdio
    assert await repository.getServer(remote.id) == remote
    assert remote.organizationId == org.id and remote.url == "http://127.0.0.1:9/sse"
    assert await repository.listServers() == [remote, stdio]


@pytest_twisted.ensureDeferred
async def test_serverErrors(repository: Any) -> None:
    """
    Bad transports, auth types, commands and URLs, unknown organizations
    and duplicate names are refused, and nothing is written.
    """
    await repository.createServer("files", m.STDIO, "npx", [], None, [], "NONE", None)
    cases: list[tuple[type[Exception], str, tuple[Any, ...]]] = [
        (InvalidInput, "transportType", ("x", "HTTP", None, [], "https://h/", [], "NONE", None)),
        (InvalidInput, "authType", ("x", m.STDIO, "npx", [], None, [], "BOTH", None)),
        (InvalidInput, "command", ("x", m.STDIO, " ", [], None, [], "NONE", None)),
        (InvalidInput, "url", ("x", m.SSE, None, [], None, [], "NONE", None)),
        (InvalidInput, "url", ("x", m.SSE, None, [], "ftp://h/", [], "NONE", None)),
        (InvalidInput, "no command", ("x", m.SSE, "npx", [], "https://h/", [], "NONE", None)),
        (InvalidInput, "args", ("x", m.STDIO, "npx", "not-a-list", None, [], "NONE", None)),
        (NotFound, "organization", ("x", m.STDIO, "npx", [], None, [], "NONE", "nope")),
        (Conflict, "'files' exists already", ("files", m.STDIO, "npx", [], None, [], "NONE", None)),
    ]
    for error, message, args in cases:
        with pytest.raises(error, match=message):
            await repository.createServer(*args)
    assert names(await repository.listServers()) == ["files"]
    with pytest.raises(NotFound, match="server 'nope' not found"):
        await repository.getServer("nope")


@pytest_twisted.ensureDeferred
async def test_deleteServer(repository: Any) -> None:
    """
    Deleting a server deletes its configs, its tools and their tool-group
    entries; other servers' entries stay.
    """
    world = await makeWorld(repository)
    await repository.deleteServer(world.files.id)
    with pytest.raises(NotFound):
        await repository.getServer(world.files.id)
    with pytest.raises(NotFound):
        await repository.getConfig(world.zeta.id)
    with pytest.raises(NotFound):
        await repository.listTools(world.files.id)
    group = await repository.getToolGroup(world.group.id)
    assert [(t.configId, t.toolName) for t in group.tools] == [(world.alpha.id, "search")]
    config = await repository.loadInstanceConfig(world.instance.id)
    assert [u.name for u in config.upstreams] == ["alpha"]
    with pytest.raises(NotFound):
        await repository.deleteServer(world.files.id)


# -- configs ---------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_configs(repository: Any) -> None:
    """
    Configs are created, read, listed per organization, updated and
    deleted; their env values round-trip.
    """
    world = await makeWorld(repository)
    config = await repository.getConfig(world.zeta.id)
    assert config == world.zeta
    assert dict(config.envVars) == {"ROOT": "/srv"}
    own = await repository.createConfig(world.files.id, "zeta", "", {}, world.other.id)
    assert await repository.listConfigs(world.org.id) == [world.alpha, world.zeta]
    assert await repository.listConfigs(world.other.id) == [own]
    assert names(await repository.listConfigs(None)) == ["alpha", "zeta", "zeta"]
    env = {"ROOT": "/data", "QUOTE": 'a "b" \\ c', "UNICODE": "日本"}
    updated = await repository.updateConfigEnv(world.zeta.id, env)
    assert dict(updated.envVars) == env
    assert dict((await repository.getConfig(world.zeta.id)).envVars) == env
    await repository.deleteConfig(world.zeta.id)
    with pytest.raises(NotFound):
        await repository.getConfig(world.zeta.id)
    group = await repository.getToolGroup(world.group.id)
    assert [t.toolName for t in group.tools] == ["search"]


@pytest_twisted.ensureDeferred
async def test_configErrors(repository: Any) -> None:
    """
    Unknown servers and organizations, duplicate names, bad env values and
    servers of another organization are refused.
    """
    world = await makeWorld(repository)
    with pytest.raises(NotFound, match="server"):
        await repository.createConfig("nope", "c", "", {}, world.org.id)
    with pytest.raises(NotFound, match="organization"):
        await repository.createConfig(world.files.id, "c", "", {}, "nope")
    with pytest.raises(Conflict, match="'zeta' exists already"):
        await repository.createConfig(world.files.id, "zeta", "", {}, world.org.id)
    with pytest.raises(InvalidInput, match="envVars"):
        await repository.createConfig(world.files.id, "c", "", {"N": 1}, world.org.id)
    with pytest.raises(InvalidInput, match="another organization"):
        await repository.createConfig(world.web.id, "c", "", {}, world.other.id)
    with pytest.raises(NotFound):
        await repository.updateConfigEnv("nope", {})
    with pytest.raises(InvalidInput):
        await repository.updateConfigEnv(world.zeta.id, ["not", "a", "mapping"])
    with pytest.raises(NotFound):
        await repository.deleteConfig("nope")
    assert names(await repository.listConfigs(None)) == ["alpha", "zeta"]


@pytest_twisted.ensureDeferred
async def test_encryptedEnvVars(repository: Any, rawDatabase: RawDatabase) -> None:
    """
    A config whose env was encrypted by the origin cannot be loaded: the
    error names the config.
    """
    world = await makeWorld(repository)
    rawDatabase.query(
        'UPDATE "UserMcpServerConfig" SET "envVars" = %s WHERE id = %s',
        ("v1.aesgcm256.0a1b2c3d.aXY=.Y2lwaGVy", world.zeta.id),
    )
    with pytest.raises(EncryptedValueError, match="'zeta'"):
        await repository.getConfig(world.zeta.id)
    with pytest.raises(EncryptedValueError, match=world.zeta.id):
        await repository.loadInstanceConfig(world.instance.id)
    rawDatabase.query(
        'UPDATE "UserMcpServerConfig" SET "envVars" = %s WHERE id = %s',
        ("not json", world.zeta.id),
    )
    with pytest.raises(SchemaError, match="not valid JSON"):
        await repository.getConfig(world.zeta.id)


# -- tools -----------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_syncTools(repository: Any) -> None:
    """
    Syncing inserts new tools, updates changed ones in place and keeps the
    others; tools are listed by name.
    """
    world = await makeWorld(repository)
    before = {t.name: t for t in await repository.listTools(world.files.id)}
    assert sorted(before) == ["delete", "read", "write"]
    tools = await repository.syncTools(
        world.files.id,
        [
            ("read", "Read a file, better", {"type": "object", "properties": {"p": {}}}),
            ("write", "Write a file", {"type": "object", "required": ["path"]}),
            ("list", "List files", {"type": "object"}),
        ],
    )
    assert names(tools) == ["delete", "list", "read", "write"]
    assert tools == await repository.listTools(world.files.id)
    after = {t.name: t for t in tools}
    assert after["read"].id == before["read"].id
    assert after["read"].description == "Read a file, better"
    assert after["read"].inputSchema == {"type": "object", "properties": {"p": {}}}
    assert after["write"] == before["write"]
    assert after["delete"] == before["delete"]
    assert after["list"].mcpServerId == world.files.id


@pytest_twisted.ensureDeferred
async def test_syncToolsErrors(repository: Any) -> None:
    """
    Unknown servers, repeated names and bad schemas are refused.
    """
    world = await makeWorld(repository)
    with pytest.raises(NotFound):
        await repository.syncTools("nope", [])
    with pytest.raises(InvalidInput, match="twice"):
        await repository.syncTools(world.files.id, [("a", "", {}), ("a", "", {})])
    with pytest.raises(InvalidInput, match="inputSchema"):
        await repository.syncTools(world.files.id, [("a", "", "{}")])
    with pytest.raises(NotFound):
        await repository.listTools("nope")
    assert names(await repository.listTools(world.files.id)) == ["delete", "read", "write"]


# -- tool groups -----------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_toolGroups(repository: Any) -> None:
    """
    A tool group keeps its whitelist in the given order, without repeats.
    """
    world = await makeWorld(repository)
    assert [(t.configId, t.toolName, t.sortOrder) for t in world.group.tools] == [
        (world.zeta.id, "read", 0),
        (world.zeta.id, "write", 1),
        (world.alpha.id, "search", 2),
    ]
    assert world.group.isEnabled and world.group.description == "the main group"
    assert await repository.getToolGroup(world.group.id) == world.group
    empty = await repository.createToolGroup(
        world.org.id, "empty", None, [(world.zeta.id, "read"), (world.zeta.id, "read")][:0]
    )
    twice = await repository.createToolGroup(
        world.org.id, "twice", "", [(world.zeta.id, "read"), (world.zeta.id, "read")]
    )
    assert empty.tools == ()
    assert [t.toolName for t in twice.tools] == ["read"]
    assert await repository.listToolGroups(world.org.id) == [empty, world.group, twice]
    assert await repository.listToolGroups(world.other.id) == []
    assert names(await repository.listToolGroups(None)) == ["empty", "main", "twice"]


@pytest_twisted.ensureDeferred
async def test_toolGroupErrors(repository: Any) -> None:
    """
    Unknown organizations and configs, duplicate names, tools of another
    server and configs of another organization are refused, and nothing is
    written.
    """
    world = await makeWorld(repository)
    foreign = await repository.createConfig(world.files.id, "foreign", "", {}, world.other.id)
    cases: list[tuple[type[Exception], str, tuple[Any, ...]]] = [
        (NotFound, "organization", ("nope", "g", "", [])),
        (Conflict, "'main' exists already", (world.org.id, "main", "", [])),
        (
            NotFound,
            "config 'nope'",
            (world.org.id, "g", "", [(world.zeta.id, "read"), ("nope", "x")]),
        ),
        (
            InvalidInput,
            "'fetch' is not a tool",
            (world.org.id, "g", "", [(world.zeta.id, "fetch")]),
        ),
        (InvalidInput, "another organization", (world.org.id, "g", "", [(foreign.id, "read")])),
        (InvalidInput, "pairs", (world.org.id, "g", "", [("only-one",)])),
        (InvalidInput, "tool group name", (world.org.id, "", "", [])),
    ]
    for error, message, args in cases:
        with pytest.raises(error, match=message):
            await repository.createToolGroup(*args)
    assert names(await repository.listToolGroups(None)) == ["main"]


@pytest_twisted.ensureDeferred
async def test_setToolGroupTools(repository: Any) -> None:
    """
    Replacing a whitelist is all or nothing.
    """
    world = await makeWorld(repository)
    group = await repository.setToolGroupTools(
        world.group.id, [(world.alpha.id, "fetch"), (world.zeta.id, "delete")]
    )
    assert [(t.configId, t.toolName) for t in group.tools] == [
        (world.alpha.id, "fetch"),
        (world.zeta.id, "delete"),
    ]
    with pytest.raises(InvalidInput):
        await repository.setToolGroupTools(
            world.group.id, [(world.zeta.id, "read"), (world.alpha.id, "nope")]
        )
    assert await repository.getToolGroup(world.group.id) == group
    with pytest.raises(NotFound):
        await repository.setToolGroupTools("nope", [])
    cleared = await repository.setToolGroupTools(world.group.id, [])
    assert cleared.tools == ()


@pytest_twisted.ensureDeferred
async def test_setToolGroupEnabled(repository: Any) -> None:
    """
    A tool group can be disabled and enabled again.
    """
    world = await makeWorld(repository)
    disabled = await repository.setToolGroupEnabled(world.group.id, False)
    assert not disabled.isEnabled
    assert await repository.getToolGroup(world.group.id) == disabled
    assert (await repository.setToolGroupEnabled(world.group.id, True)).isEnabled
    with pytest.raises(NotFound):
        await repository.setToolGroupEnabled("nope", True)
    with pytest.raises(NotFound):
        await repository.getToolGroup("nope")


# -- instances -------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_instances(repository: Any) -> None:
    """
    Instances are created, read and listed, deleted ones only on request.
    """
    world = await makeWorld(repository)
    assert await repository.getInstance(world.instance.id) == world.instance
    assert world.instance.deletedAt is None
    spare = await repository.createToolGroup(world.org.id, "spare", "", [])
    second = await repository.createInstance(world.org.id, "b-side", "d", spare.id, m.AUTH_OAUTH)
    assert await repository.listInstances(world.org.id, False) == [second, world.instance]
    assert await repository.listInstances(world.other.id, True) == []
    assert names(await repository.listInstances(None, False)) == ["b-side", "main"]


@pytest_twisted.ensureDeferred
async def test_instanceErrors(repository: Any) -> None:
    """
    Bad auth types, unknown organizations and tool groups, tool groups of
    another organization or already used, and duplicate live names are
    refused.
    """
    world = await makeWorld(repository)
    spare = await repository.createToolGroup(world.org.id, "spare", "", [])
    foreign = await repository.createToolGroup(world.other.id, "foreign", "", [])
    cases: list[tuple[type[Exception], str, tuple[Any, ...]]] = [
        (InvalidInput, "authType", (world.org.id, "x", "", spare.id, "BOTH")),
        (NotFound, "organization", ("nope", "x", "", spare.id, m.AUTH_API_KEY)),
        (NotFound, "tool group", (world.org.id, "x", "", "nope", m.AUTH_API_KEY)),
        (InvalidInput, "another organization", (world.org.id, "x", "", foreign.id, m.AUTH_API_KEY)),
        (
            Conflict,
            "used already by instance 'main'",
            (world.org.id, "x", "", world.group.id, "NONE"),
        ),
        (Conflict, "'main' exists already", (world.org.id, "main", "", spare.id, m.AUTH_API_KEY)),
    ]
    for error, message, args in cases:
        with pytest.raises(error, match=message):
            await repository.createInstance(*args)
    assert names(await repository.listInstances(None, True)) == ["main"]
    with pytest.raises(NotFound):
        await repository.getInstance("nope")


@pytest_twisted.ensureDeferred
async def test_deleteInstance(repository: Any) -> None:
    """
    Deleting is soft, returns the instance's key hashes, and frees the name
    but not the tool group.
    """
    world = await makeWorld(repository)
    second = hashApiKey(apiKey(2))
    await repository.createApiKey(
        world.instance.id, "second", second, displayApiKey(apiKey(2)), None
    )
    hashes = await repository.deleteInstance(world.instance.id)
    assert hashes == sorted([world.keyHash, second])
    deleted = await repository.getInstance(world.instance.id)
    assert deleted.deletedAt is not None and deleted.deletedAt.tzinfo is None
    assert await repository.listInstances(world.org.id, False) == []
    assert await repository.listInstances(world.org.id, True) == [deleted]
    assert await repository.deleteInstance(world.instance.id) == hashes
    assert (await repository.getInstance(world.instance.id)).deletedAt == deleted.deletedAt
    with pytest.raises(Conflict, match="deleted instance 'main'"):
        await repository.createInstance(world.org.id, "again", "", world.group.id, m.AUTH_API_KEY)
    spare = await repository.createToolGroup(world.org.id, "spare", "", [])
    await repository.createInstance(world.org.id, "main", "", spare.id, m.AUTH_API_KEY)
    with pytest.raises(NotFound):
        await repository.deleteInstance("nope")


# -- API keys --------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_apiKeys(repository: Any) -> None:
    """
    Keys are created active, listed oldest first, revoked, given an expiry
    (an aware one is stored as naive UTC) and touched.
    """
    world = await makeWorld(repository)
    assert world.key.isActive and world.key.display == displayApiKey(apiKey(1))
    assert world.key.expiresAt is None and world.key.lastUsedAt is None
    tokyo = datetime.timezone(datetime.timedelta(hours=9))
    second = await repository.createApiKey(
        world.instance.id,
        "second",
        hashApiKey(apiKey(2)),
        displayApiKey(apiKey(2)),
        datetime.datetime(2030, 1, 1, 21, 0, 0, 123456, tzinfo=tokyo),
    )
    assert second.expiresAt == datetime.datetime(2030, 1, 1, 12, 0, 0, 123000)
    oldestFirst = sorted([world.key, second], key=lambda k: (k.createdAt, k.id))
    assert await repository.listApiKeys(world.instance.id) == oldestFirst
    assert await repository.listApiKeys(None) == oldestFirst
    assert await repository.revokeApiKey(world.key.id) == world.keyHash
    assert await repository.setApiKeyExpiry(second.id, None) == hashApiKey(apiKey(2))
    when = datetime.datetime(2029, 5, 6, 7, 8, 9, 10000)
    await repository.touchApiKey(second.id, when)
    keys = {k.id: k for k in await repository.listApiKeys(world.instance.id)}
    assert (keys[world.key.id].isActive, keys[world.key.id].lastUsedAt) == (False, None)
    assert (keys[second.id].isActive, keys[second.id].expiresAt) == (True, None)
    assert keys[second.id].lastUsedAt == when
    await repository.touchApiKey("nope", when)


@pytest_twisted.ensureDeferred
async def test_apiKeyErrors(repository: Any) -> None:
    """
    Bad hashes, unknown and deleted instances, duplicate hashes and display
    forms, and unknown keys are refused.
    """
    world = await makeWorld(repository)
    h2, d2 = hashApiKey(apiKey(2)), displayApiKey(apiKey(2))
    with pytest.raises(InvalidInput, match="keyHash"):
        await repository.createApiKey(world.instance.id, "k", "ABC", d2, None)
    with pytest.raises(InvalidInput, match="expiresAt"):
        await repository.createApiKey(world.instance.id, "k", h2, d2, "tomorrow")
    with pytest.raises(NotFound, match="instance"):
        await repository.createApiKey("nope", "k", h2, d2, None)
    with pytest.raises(Conflict, match="hash"):
        await repository.createApiKey(world.instance.id, "k", world.keyHash, d2, None)
    with pytest.raises(Conflict, match="display form"):
        await repository.createApiKey(world.instance.id, "k", h2, world.key.display, None)
    with pytest.raises(NotFound):
        await repository.revokeApiKey("nope")
    with pytest.raises(NotFound):
        await repository.setApiKeyExpiry("nope", UTC_2030)
    await repository.deleteInstance(world.instance.id)
    with pytest.raises(InvalidInput, match="deleted"):
        await repository.createApiKey(world.instance.id, "k", h2, d2, None)
    assert await repository.listApiKeys(None) == [world.key]


# -- the request path ------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_lookupApiKey(repository: Any) -> None:
    """
    A key hash resolves, in one statement, to the key and the state of its
    instance and tool group, whatever that state is; an unknown hash to
    C{None}.
    """
    world = await makeWorld(repository)
    before = repository.queryCounts.get("lookupApiKey", 0)
    assert await repository.lookupApiKey("0" * 64) is None
    record = await repository.lookupApiKey(world.keyHash)
    assert repository.queryCounts["lookupApiKey"] == before + 2
    assert record == m.ApiKeyRecord(
        keyId=world.key.id,
        instanceId=world.instance.id,
        organizationId=world.org.id,
        authType=m.AUTH_API_KEY,
        isActive=True,
        expiresAt=None,
        instanceDeleted=False,
        toolGroupEnabled=True,
    )


@pytest_twisted.ensureDeferred
async def test_lookupApiKeyStates(repository: Any) -> None:
    """
    Revoked and expired keys, deleted instances and disabled tool groups
    are reported, not hidden.
    """
    world = await makeWorld(repository)
    await repository.revokeApiKey(world.key.id)
    assert (await repository.lookupApiKey(world.keyHash)).isActive is False
    await repository.setApiKeyExpiry(world.key.id, UTC_2020)
    assert (await repository.lookupApiKey(world.keyHash)).expiresAt == UTC_2020
    await repository.setToolGroupEnabled(world.group.id, False)
    assert (await repository.lookupApiKey(world.keyHash)).toolGroupEnabled is False
    await repository.deleteInstance(world.instance.id)
    record = await repository.lookupApiKey(world.keyHash)
    assert (record.isActive, record.instanceDeleted, record.toolGroupEnabled) == (
        False,
        True,
        False,
    )
    assert record.keyId == world.key.id


@pytest_twisted.ensureDeferred
async def test_loadInstanceConfig(repository: Any) -> None:
    """
    An instance's configuration comes in one statement: one upstream per
    config, ordered by config name, each with its server, env and
    whitelist.
    """
    world = await makeWorld(repository)
    before = repository.queryCounts.get("loadInstanceConfig", 0)
    config = await repository.loadInstanceConfig(world.instance.id)
    assert repository.queryCounts["loadInstanceConfig"] == before + 1
    assert config == m.InstanceConfig(
        instanceId=world.instance.id,
        organizationId=world.org.id,
        toolGroupId=world.group.id,
        toolGroupEnabled=True,
        upstreams=(
            m.UpstreamConfig(
                configId=world.alpha.id,
                name="alpha",
                transportType=m.STREAMABLE_HTTPS,
                command=None,
                args=(),
                url="https://example.com/mcp",
                env={"X-Token": "t0k3n"},
                authType=m.AUTH_CLOUD_RUN_IAM,
                toolNames=frozenset({"search"}),
                serverId=world.web.id,
            ),
            m.UpstreamConfig(
                configId=world.zeta.id,
                name="zeta",
                transportType=m.STDIO,
                command="npx",
                args=("-y", "files"),
                url=None,
                env={"ROOT": "/srv"},
                authType=m.AUTH_NONE,
                toolNames=frozenset({"read", "write"}),
                serverId=world.files.id,
            ),
        ),
    )


@pytest_twisted.ensureDeferred
async def test_loadInstanceConfigEdges(repository: Any) -> None:
    """
    Unknown and deleted instances give C{None}; a tool group without tools
    gives no upstreams; a disabled group is reported.
    """
    world = await makeWorld(repository)
    assert await repository.loadInstanceConfig("nope") is None
    empty = await repository.createToolGroup(world.org.id, "empty", "", [])
    bare = await repository.createInstance(world.org.id, "bare", "", empty.id, m.AUTH_API_KEY)
    await repository.setToolGroupEnabled(empty.id, False)
    config = await repository.loadInstanceConfig(bare.id)
    assert config.upstreams == () and config.toolGroupEnabled is False
    assert config.toolGroupId == empty.id
    await repository.deleteInstance(world.instance.id)
    assert await repository.loadInstanceConfig(world.instance.id) is None


@pytest_twisted.ensureDeferred
async def test_requestLogs(repository: Any) -> None:
    """
    Log rows and their data (arbitrary bytes) round-trip, newest first,
    filtered by instance and time, limited, with or without data.
    """
    world = await makeWorld(repository)
    base = datetime.datetime(2025, 3, 4, 5, 6, 7, 890000)
    rows = [
        logRow(world, 1, base, logData(b'{"jsonrpc":"2.0"}')),
        logRow(world, 2, base + datetime.timedelta(seconds=1)),
        logRow(world, 3, base + datetime.timedelta(seconds=2), logData(bytes(range(256)))),
    ]
    assert await repository.insertRequestLogs(rows) == 3
    newest = list(reversed(rows))
    assert await repository.listRequestLogs(None, None, 10, True) == newest
    without = await repository.listRequestLogs(world.instance.id, None, 10, False)
    assert without == [evolve(r, data=None) for r in newest]
    since = base + datetime.timedelta(seconds=1)
    assert [r.id for r in await repository.listRequestLogs(None, since, 10, False)] == [
        rows[2].id,
        rows[1].id,
    ]
    assert [r.id for r in await repository.listRequestLogs(None, None, 1, True)] == [rows[2].id]
    assert await repository.listRequestLogs("nope", None, 10, True) == []
    assert await repository.listRequestLogs(None, None, 0, True) == []
    with pytest.raises(InvalidInput):
        await repository.listRequestLogs(None, None, -1, True)


@pytest_twisted.ensureDeferred
async def test_insertRequestLogsAwkwardValues(repository: Any) -> None:
    """
    Text with quotes, backslashes, JSON and SQL syntax, non-ASCII and
    emoji, every byte value in the payloads, and the largest integers are
    stored as given; a NUL in client-chosen text (which PostgreSQL's text
    cannot hold) becomes U+FFFD on both databases.
    """
    world = await makeWorld(repository)
    nasty = 'it\'s \\x00 "q" \\ {"a":[1]} \'); DROP TABLE x; -- \u00e9\u4e2d\U0001f600'
    payload = bytes(range(256)) * 3
    row = evolve(
        logRow(world, 1, datetime.datetime(2025, 1, 2, 3, 4, 5, 678000), logData(payload)),
        toolName=nasty,
        errorMessage=nasty + "\x00end",
        errorCode="E\x00",
        userAgent="agent/1.0 \x00",
        inputBytes=2**31 - 1,
        outputBytes=0,
    )
    assert await repository.insertRequestLogs([row]) == 1
    [stored] = await repository.listRequestLogs(world.instance.id, None, 10, True)
    assert stored == evolve(
        row,
        errorMessage=nasty + "\N{REPLACEMENT CHARACTER}end",
        errorCode="E\N{REPLACEMENT CHARACTER}",
        userAgent="agent/1.0 \N{REPLACEMENT CHARACTER}",
    )
    assert stored.data is not None and stored.data.outputDataCompressed == b"\x00\x01\xff" + payload


@pytest_twisted.ensureDeferred
async def test_insertRequestLogsBatches(repository: Any) -> None:
    """
    Many rows go in a few multi-row statements (on PostgreSQL one per
    table, the rows in one JSON parameter); none at all for no rows.
    """
    world = await makeWorld(repository)
    before = repository.queryCounts.get("insertRequestLogs", 0)
    assert await repository.insertRequestLogs([]) == 0
    assert repository.queryCounts.get("insertRequestLogs", 0) == before
    base = datetime.datetime(2025, 1, 1)
    rows = [
        logRow(
            world,
            n,
            base + datetime.timedelta(milliseconds=n),
            logData(b"x" * n) if n % 3 == 0 else None,
        )
        for n in range(1, 1201)
    ]
    assert await repository.insertRequestLogs(rows) == 1200
    # SQLite: 1200 log rows, 3 statements; 400 data rows, 1 statement.
    statements = 2 if repository.kind == "postgresql" else 4
    assert repository.queryCounts["insertRequestLogs"] == before + statements
    listed = await repository.listRequestLogs(world.instance.id, None, 2000, True)
    assert len(listed) == 1200 and listed[0] == rows[-1] and listed[-1] == rows[0]


@pytest_twisted.ensureDeferred
async def test_insertRequestLogsIsAtomic(repository: Any) -> None:
    """
    A batch with a row of an unknown instance writes nothing.
    """
    world = await makeWorld(repository)
    good = logRow(world, 1, UTC_2020)
    bad = evolve(good, id=newId(), instanceId="nope")
    with pytest.raises(NotFound):
        await repository.insertRequestLogs([good, bad])
    assert await repository.listRequestLogs(None, None, 10, False) == []
    assert await repository.insertRequestLogs([good]) == 1


@pytest_twisted.ensureDeferred
async def test_hotPathQueryCounts(repository: Any) -> None:
    """
    The request path costs one statement per call, counted under the
    method's name.
    """
    world = await makeWorld(repository)
    counts = dict(repository.queryCounts)
    await repository.lookupApiKey(world.keyHash)
    await repository.loadInstanceConfig(world.instance.id)
    await repository.touchApiKey(world.key.id, m.utcnow())
    await repository.insertRequestLogs([logRow(world, 1, UTC_2020)])
    changed = {
        kind: n - counts.get(kind, 0)
        for kind, n in repository.queryCounts.items()
        if n != counts.get(kind, 0)
    }
    assert changed == {
        "lookupApiKey": 1,
        "loadInstanceConfig": 1,
        "touchApiKey": 1,
        "insertRequestLogs": 1,
    }


# -- cancellation and timeouts ---------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_cancelledWriteLeavesRepositoryUsable(
    repository: Any, rawDatabase: RawDatabase
) -> None:
    """
    Cancelling a write that waits for a lock fails it at once with
    L{CancelledError}, writes nothing, and leaves every connection usable.
    """
    holdAdminLock(rawDatabase)
    try:
        d = repository.createOrganization("never")
        await waitUntilBlocked(rawDatabase)
        assert not d.called
        d.cancel()
        assert d.called
        with pytest.raises(CancelledError):
            await d
    finally:
        releaseAdminLock(rawDatabase)
    await gatherResults([repository.ping() for _ in range(8)])
    assert await repository.listOrganizations() == []
    org = await repository.createOrganization("after")
    assert names(await repository.listOrganizations()) == ["after"]
    assert await repository.getOrganization(org.id) == org


@pytest_twisted.ensureDeferred
async def test_cancelledReadLeavesRepositoryUsable(
    repository: Any, rawDatabase: RawDatabase
) -> None:
    """
    Cancelling a lookup that waits (for a table lock on PostgreSQL, behind
    a blocked write on SQLite's single connection) leaves the repository
    usable.
    """
    world = await makeWorld(repository)
    blocked: Deferred[Any] | None = None
    if rawDatabase.kind == "sqlite":
        holdAdminLock(rawDatabase)
        blocked = repository.createOrganization("blocked")
    else:
        rawDatabase.query("BEGIN")
        rawDatabase.query('LOCK TABLE "McpApiKey" IN ACCESS EXCLUSIVE MODE')
    try:
        d = repository.lookupApiKey(world.keyHash)
        await waitUntilBlocked(rawDatabase)
        d.cancel()
        with pytest.raises(CancelledError):
            await d
    finally:
        if rawDatabase.kind == "sqlite":
            releaseAdminLock(rawDatabase)
        else:
            rawDatabase.query("ROLLBACK")
    if blocked is not None:
        await blocked
    records = await gatherResults([repository.lookupApiKey(world.keyHash) for _ in range(6)])
    assert {r.keyId for r in records} == {world.key.id}


@pytest_twisted.ensureDeferred
async def test_timeout(repository: Any, rawDatabase: RawDatabase) -> None:
    """
    An operation that takes longer than the query timeout fails with
    L{DatabaseUnavailable} and writes nothing.
    """
    repository.queryTimeout = 0.3
    holdAdminLock(rawDatabase)
    try:
        with pytest.raises(DatabaseUnavailable, match=r"createOrganization timed out after 0\.3 s"):
            await repository.createOrganization("late")
    finally:
        releaseAdminLock(rawDatabase)
        repository.queryTimeout = TEST_QUERY_TIMEOUT
    assert await repository.listOrganizations() == []
    await repository.createOrganization("on time")


# -- SQLite only -----------------------------------------------------------------


def test_sqliteDirectoryMustExist(tmp_path: Any) -> None:
    """
    A SQLite file in a missing directory is refused with a clear message.
    """
    missing = tmp_path / "no" / "such" / "dir" / "db.sqlite3"
    with pytest.raises(SettingsError, match="does not exist"):
        openRepository(DatabaseURL(kind="sqlite", path=str(missing)), reactor=reactor)


@pytest_twisted.ensureDeferred
async def test_sqliteDirectoryMustExistOnStart(tmp_path: Any) -> None:
    """
    A provider made directly checks the directory on C{start()} too.
    """
    repo = SqliteRepository(path=str(tmp_path / "no" / "db.sqlite3"), reactor=reactor)
    with pytest.raises(SettingsError, match="does not exist"):
        await repo.start()
    with pytest.raises(DatabaseUnavailable):
        await repo.ping()


@pytest_twisted.ensureDeferred
async def test_sqliteSettings(tmp_path: Any) -> None:
    """
    The SQLite file is in WAL mode, and foreign keys are enforced.
    """
    path = str(tmp_path / "wal.sqlite3")
    repo = openRepository(DatabaseURL(kind="sqlite", path=path), reactor=reactor)
    await repo.start()
    try:
        raw = RawDatabase(DatabaseURL(kind="sqlite", path=path))
        try:
            assert raw.query("PRAGMA journal_mode") == [("wal",)]
        finally:
            raw.close()
        world = await makeWorld(repo)
        orphan = logRow(world, 1, UTC_2020)
        with pytest.raises(NotFound, match="referenced row"):
            await repo.insertRequestLogs([evolve(orphan, instanceId="x")])
    finally:
        await repo.stop()


# -- PostgreSQL only -------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_postgresUnreachable() -> None:
    """
    Starting on a PostgreSQL that cannot be reached fails with
    L{DatabaseUnavailable}; the provider is unusable afterwards.
    """
    repo = openRepository(
        DatabaseURL.parse("postgresql://postgres:secret@127.0.0.1:1/nothing"),
        reactor=reactor,
        queryTimeout=10.0,
    )
    with pytest.raises(DatabaseUnavailable, match="cannot connect to PostgreSQL") as info:
        await repo.start()
    assert "secret" not in str(info.value)
    with pytest.raises(DatabaseUnavailable):
        await repo.ping()
    await repo.stop()


@pytest_twisted.ensureDeferred
async def test_postgresGoesAwayAndComesBack(
    postgresServer: PostgresServer, postgresDatabase: str
) -> None:
    """
    While the database refuses connections, C{ping()} fails with
    L{DatabaseUnavailable}; dead connections are re-established once it
    accepts them again.
    """
    repo = PostgresRepository(
        dsn=postgresServer.dsnFor(postgresDatabase),
        reactor=reactor,
        queryTimeout=5.0,
        poolSize=2,
        reconnectDelay=0.05,
        reconnectMaxDelay=0.2,
    )
    await repo.start()
    admin = postgresServer.connect()
    try:
        with admin.cursor() as cursor:
            cursor.execute(f'ALTER DATABASE "{postgresDatabase}" ALLOW_CONNECTIONS false')
            cursor.execute(
                "SELECT pg_terminate_backend(pid, 5000) FROM pg_stat_activity "
                "WHERE datname = %s AND application_name = 'mcp-proxy'",
                (postgresDatabase,),
            )
        for _ in range(4):
            with pytest.raises(DatabaseUnavailable):
                await repo.ping()
        with pytest.raises(DatabaseUnavailable):
            await repo.lookupApiKey("0" * 64)
        with admin.cursor() as cursor:
            cursor.execute(f'ALTER DATABASE "{postgresDatabase}" ALLOW_CONNECTIONS true')
        await eventually(repo.ping)
        for _ in range(4):
            await eventually(repo.ping)
        assert await repo.lookupApiKey("0" * 64) is None
    finally:
        admin.close()
        await repo.stop()


@pytest_twisted.ensureDeferred
async def test_postgresStatementTimeout(
    postgresServer: PostgresServer, postgresDatabase: str
) -> None:
    """
    A statement cancelled by the server (its C{statement_timeout}) fails
    with L{DatabaseUnavailable}, not as if the caller had cancelled it; the
    connection stays usable.
    """
    dsn = postgresServer.dsnFor(postgresDatabase) + " options='-c statement_timeout=200'"
    repo = PostgresRepository(dsn=dsn, reactor=reactor, queryTimeout=TEST_QUERY_TIMEOUT, poolSize=1)
    await repo.start()
    raw = RawDatabase(DatabaseURL(kind="postgresql", dsn=postgresServer.dsnFor(postgresDatabase)))
    try:
        holdAdminLock(raw)
        try:
            with pytest.raises(DatabaseUnavailable, match="cancelled the statement"):
                await repo.createOrganization("slow")
        finally:
            releaseAdminLock(raw)
        assert await repo.listOrganizations() == []
        await repo.createOrganization("quick")
    finally:
        raw.close()
        await repo.stop()


ORIGIN_SCHEMA = """
CREATE TYPE "TransportType" AS ENUM ('STDIO', 'SSE', 'STREAMABLE_HTTPS');
CREATE TYPE "AuthType" AS ENUM ('NONE', 'API_KEY', 'OAUTH', 'CLOUD_RUN_IAM');
CREATE TYPE "ServerStatus" AS ENUM ('RUNNING', 'STOPPED', 'ERROR', 'PENDING');
CREATE TYPE "ServerType" AS ENUM ('CUSTOM', 'OFFICIAL');
CREATE TABLE "User" ("id" TEXT PRIMARY KEY, "email" TEXT UNIQUE, "name" TEXT,
    "role" TEXT NOT NULL DEFAULT 'USER', "createdAt" TIMESTAMP(3) NOT NULL,
    "updatedAt" TIMESTAMP(3) NOT NULL);
CREATE TABLE "Organization" ("id" TEXT PRIMARY KEY, "name" TEXT NOT NULL,
    "slug" TEXT NOT NULL UNIQUE, "isPersonal" BOOLEAN NOT NULL DEFAULT false,
    "createdBy" TEXT NOT NULL REFERENCES "User"("id"), "createdAt" TIMESTAMP(3) NOT NULL,
    "updatedAt" TIMESTAMP(3) NOT NULL);
CREATE TABLE "McpServer" ("id" TEXT PRIMARY KEY, "name" TEXT NOT NULL,
    "description" TEXT NOT NULL DEFAULT '', "tags" TEXT[], "iconPath" TEXT,
    "transportType" "TransportType" NOT NULL DEFAULT 'STDIO', "command" TEXT, "args" TEXT[],
    "url" TEXT, "envVars" TEXT[], "authType" "AuthType" NOT NULL DEFAULT 'NONE',
    "oauthProvider" VARCHAR(50), "oauthScopes" TEXT[],
    "serverType" "ServerType" NOT NULL DEFAULT 'OFFICIAL', "createdBy" TEXT,
    "organizationId" TEXT REFERENCES "Organization"("id"), "isPublic" BOOLEAN NOT NULL DEFAULT true,
    "createdAt" TIMESTAMP(3) NOT NULL, "updatedAt" TIMESTAMP(3) NOT NULL);
CREATE TABLE "Tool" ("id" TEXT PRIMARY KEY, "name" TEXT NOT NULL, "description" TEXT NOT NULL,
    "inputSchema" JSONB NOT NULL, "isEnabled" BOOLEAN NOT NULL DEFAULT true,
    "mcpServerId" TEXT NOT NULL REFERENCES "McpServer"("id") ON DELETE CASCADE,
    "createdAt" TIMESTAMP(3) NOT NULL, "updatedAt" TIMESTAMP(3) NOT NULL,
    UNIQUE ("mcpServerId", "name"));
CREATE TABLE "UserMcpServerConfig" ("id" TEXT PRIMARY KEY, "name" TEXT NOT NULL,
    "description" TEXT NOT NULL DEFAULT '', "envVars" TEXT NOT NULL, "oauthConnection" TEXT,
    "mcpServerId" TEXT NOT NULL REFERENCES "McpServer"("id"),
    "organizationId" TEXT NOT NULL REFERENCES "Organization"("id"),
    "createdAt" TIMESTAMP(3) NOT NULL, "updatedAt" TIMESTAMP(3) NOT NULL);
CREATE TABLE "UserToolGroup" ("id" TEXT PRIMARY KEY, "name" TEXT NOT NULL,
    "description" TEXT NOT NULL, "isEnabled" BOOLEAN NOT NULL DEFAULT true,
    "organizationId" TEXT NOT NULL REFERENCES "Organization"("id"),
    "createdAt" TIMESTAMP(3) NOT NULL, "updatedAt" TIMESTAMP(3) NOT NULL);
CREATE TABLE "UserToolGroupTool" (
    "userMcpServerConfigId" TEXT NOT NULL REFERENCES "UserMcpServerConfig"("id") ON DELETE CASCADE,
    "toolGroupId" TEXT NOT NULL REFERENCES "UserToolGroup"("id") ON DELETE CASCADE,
    "toolId" TEXT NOT NULL REFERENCES "Tool"("id") ON DELETE CASCADE,
    "sortOrder" INTEGER NOT NULL DEFAULT 0, "createdAt" TIMESTAMP(3) NOT NULL,
    PRIMARY KEY ("toolGroupId", "userMcpServerConfigId", "toolId"));
CREATE TABLE "UserMcpServerInstance" ("id" TEXT PRIMARY KEY, "name" TEXT NOT NULL,
    "description" TEXT NOT NULL, "iconPath" TEXT,
    "serverStatus" "ServerStatus" NOT NULL, "serverType" "ServerType" NOT NULL,
    "toolGroupId" TEXT NOT NULL UNIQUE REFERENCES "UserToolGroup"("id"),
    "authType" "AuthType" NOT NULL DEFAULT 'API_KEY',
    "organizationId" TEXT NOT NULL REFERENCES "Organization"("id"),
    "displayOrder" INTEGER NOT NULL DEFAULT 0, "createdAt" TIMESTAMP(3) NOT NULL,
    "updatedAt" TIMESTAMP(3) NOT NULL, "deletedAt" TIMESTAMP(3));
CREATE TABLE "McpApiKey" ("id" TEXT PRIMARY KEY, "name" TEXT NOT NULL,
    "apiKey" TEXT NOT NULL UNIQUE, "apiKeyHash" TEXT UNIQUE,
    "isActive" BOOLEAN NOT NULL DEFAULT true, "lastUsedAt" TIMESTAMP(3),
    "expiresAt" TIMESTAMP(3), "scopes" TEXT[] DEFAULT ARRAY[]::TEXT[],
    "userId" TEXT NOT NULL REFERENCES "User"("id"),
    "userMcpServerInstanceId" TEXT NOT NULL REFERENCES "UserMcpServerInstance"("id") ON DELETE CASCADE,
    "createdAt" TIMESTAMP(3) NOT NULL, "updatedAt" TIMESTAMP(3) NOT NULL);
CREATE TABLE "McpServerRequestLog" ("id" TEXT PRIMARY KEY,
    "mcpServerInstanceId" TEXT NOT NULL REFERENCES "UserMcpServerInstance"("id"),
    "toolName" TEXT NOT NULL, "transportType" "TransportType" NOT NULL, "method" TEXT NOT NULL,
    "responseStatus" TEXT NOT NULL, "durationMs" INTEGER NOT NULL, "errorMessage" TEXT,
    "errorCode" TEXT, "inputBytes" INTEGER, "outputBytes" INTEGER,
    "organizationId" TEXT NOT NULL REFERENCES "Organization"("id"), "userAgent" TEXT,
    "createdAt" TIMESTAMP(3) NOT NULL DEFAULT CURRENT_TIMESTAMP);
CREATE TABLE "McpServerRequestData" ("id" TEXT PRIMARY KEY,
    "requestLogId" TEXT NOT NULL UNIQUE REFERENCES "McpServerRequestLog"("id") ON DELETE CASCADE,
    "inputDataCompressed" BYTEA NOT NULL, "outputDataCompressed" BYTEA NOT NULL,
    "originalInputSize" INTEGER NOT NULL, "originalOutputSize" INTEGER NOT NULL,
    "compressedInputSize" INTEGER NOT NULL, "compressedOutputSize" INTEGER NOT NULL,
    "compressionRatio" DOUBLE PRECISION NOT NULL,
    "createdAt" TIMESTAMP(3) NOT NULL DEFAULT CURRENT_TIMESTAMP);
INSERT INTO "User" VALUES ('u1', 'a@example.com', 'A', 'USER', now(), now());
INSERT INTO "Organization" VALUES ('o1', 'Acme', 'acme', false, 'u1', now(), now());
INSERT INTO "McpServer" ("id", "name", "transportType", "command", "args", "envVars", "createdAt",
    "updatedAt") VALUES ('s1', 'files', 'STDIO', 'npx', '{-y,files}', '{ROOT}', now(), now());
INSERT INTO "Tool" VALUES ('t1', 'read', '', '{"type": "object"}', true, 's1', now(), now()),
    ('t2', 'write', '', '{}', true, 's1', now(), now());
INSERT INTO "UserMcpServerConfig" VALUES ('c1', 'files', '', '{"ROOT": "/srv"}', NULL, 's1', 'o1',
    now(), now());
INSERT INTO "UserToolGroup" VALUES ('g1', 'main', '', true, 'o1', now(), now());
INSERT INTO "UserToolGroupTool" VALUES ('c1', 'g1', 't1', 0, now());
INSERT INTO "UserMcpServerInstance" VALUES ('i1', 'main', '', NULL, 'RUNNING', 'CUSTOM', 'g1',
    'API_KEY', 'o1', 0, now(), now(), NULL);
INSERT INTO "McpApiKey" VALUES ('k1', 'key', 'v1.aesgcm256.00000000.aXY=.Y2lwaGVy', %(hash)s, true,
    NULL, NULL, '{}', 'u1', 'i1', now(), now());
"""


def _catalog(cursor: Any) -> set[tuple[str, str]]:
    cursor.execute(
        "SELECT relname, relkind::text FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE n.nspname = 'public' UNION SELECT typname, 'type' FROM pg_type t "
        "JOIN pg_namespace n ON n.oid = t.typnamespace WHERE n.nspname = 'public'"
    )
    return set(cursor.fetchall())


@pytest_twisted.ensureDeferred
async def test_originSchema(postgresServer: PostgresServer, postgresDatabase: str) -> None:
    """
    A database made by the origin (a "McpApiKey" table and no migrations
    table) is used as it is: no DDL, and the request path works.
    """
    keyHash = hashApiKey(apiKey(1))
    origin = postgresServer.connect(postgresDatabase)
    try:
        with origin.cursor() as cursor:
            cursor.execute(ORIGIN_SCHEMA, {"hash": keyHash})
            before = _catalog(cursor)
        repo = openRepository(
            DatabaseURL(kind="postgresql", dsn=postgresServer.dsnFor(postgresDatabase)),
            reactor=reactor,
            queryTimeout=TEST_QUERY_TIMEOUT,
        )
        await repo.start()
        try:
            assert repo.originSchema is True
            # The advisory lock and the detection query; no DDL.
            assert repo.queryCounts == {"migrate": 2}
            assert await repo.migrate() == []
            record = await repo.lookupApiKey(keyHash)
            assert (record.keyId, record.instanceId, record.organizationId) == ("k1", "i1", "o1")
            assert record.isActive and not record.instanceDeleted and record.toolGroupEnabled
            config = await repo.loadInstanceConfig("i1")
            assert config.upstreams == (
                m.UpstreamConfig(
                    configId="c1",
                    name="files",
                    transportType=m.STDIO,
                    command="npx",
                    args=("-y", "files"),
                    url=None,
                    env={"ROOT": "/srv"},
                    authType=m.AUTH_NONE,
                    toolNames=frozenset({"read"}),
                    serverId="s1",
                ),
            )
            await repo.touchApiKey("k1", UTC_2030)
            row = m.RequestLogRow(
                id=newId(),
                instanceId="i1",
                organizationId="o1",
                toolName="read",
                transportType=m.SSE,
                method="tools/call",
                responseStatus="200",
                durationMs=5,
                errorMessage=None,
                errorCode=None,
                inputBytes=None,
                outputBytes=12,
                userAgent=None,
                createdAt=UTC_2030,
                data=logData(b"{}"),
            )
            assert await repo.insertRequestLogs([row]) == 1
            assert await repo.listRequestLogs("i1", None, 5, True) == [row]
            keys = await repo.listApiKeys("i1")
            assert [(k.id, k.lastUsedAt) for k in keys] == [("k1", UTC_2030)]
        finally:
            await repo.stop()
        with origin.cursor() as cursor:
            assert _catalog(cursor) == before
    finally:
        origin.close()
