"""
C{mcpproxy-admin}: manage the database of mcp-proxy from the command line.

Organizations, upstream servers, their configs (with secret environment
values), tools, tool groups, instances and API keys; and C{import}, which
turns an C{mcpServers} JSON file into a ready instance.  See docs/admin.md.

Every command prints aligned plain-text tables, or JSON on stdout with
C{--json}.  Errors are one line on stderr, C{mcpproxy-admin: error: ...},
with exit status 2 for bad input (and an unusable database) and 1 when an
upstream fails or something unexpected happens.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
from pathlib import Path
from typing import Any, Awaitable, Callable, Iterable, Mapping, Optional, Sequence, TextIO

from attrs import define, fields

from mcp_proxy.config import DEFAULT_DATABASE, ENV_PREFIX, DatabaseURL, SettingsError
from mcp_proxy.errors import (
    Conflict,
    DatabaseUnavailable,
    InvalidInput,
    NotFound,
    ProxyError,
    SchemaError,
)
from mcp_proxy.importer import (
    TRANSPORT_NAMES,
    Discoverer,
    ImportResult,
    ServersFile,
    UpstreamFailed,
    describeServer,
    importServers,
    loadServersFile,
    maskURL,
    normaliseTools,
    parseTransport,
    validateEnvName,
    validateHeaderName,
    validateUpstreamURL,
)
from mcp_proxy.keys import displayApiKey, generateApiKey, hashApiKey
from mcp_proxy.models import (
    AUTH_API_KEY,
    AUTH_NONE,
    AUTH_TYPES,
    STDIO,
    TRANSPORT_TYPES,
    ApiKey,
    Instance,
    McpServer,
    Organization,
    ServerConfig,
    Tool,
    ToolGroup,
    UpstreamConfig,
    utcnow,
)

PROG = "mcpproxy-admin"
DEFAULT_ORGANIZATION = "default"
DEFAULT_TIMEOUT = 30.0
MASK = "***"

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2


class AdminError(Exception):
    """
    A failure to report as one line, with an exit status.
    """

    def __init__(self, message: str, code: int = EXIT_USAGE) -> None:
        super().__init__(message)
        self.code = code


class _Unreachable(AdminError):
    """
    An upstream of a transport that cannot be contacted from here.
    """


# -- output ----------------------------------------------------------------------


def jsonValue(value: Any) -> Any:
    """
    A JSON-ready form of a model value: attrs objects become objects with
    their field names, C{datetime}s ISO 8601 UTC strings ending in C{Z}.
    """
    if isinstance(value, datetime.datetime):
        return formatTime(value)
    if hasattr(type(value), "__attrs_attrs__"):
        return {f.name: jsonValue(getattr(value, f.name)) for f in fields(type(value))}
    if isinstance(value, Mapping):
        return {str(k): jsonValue(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, frozenset, set)):
        return [jsonValue(v) for v in value]
    return value


def formatTime(when: Optional[datetime.datetime]) -> Optional[str]:
    if when is None:
        return None
    if when.tzinfo is not None:
        when = when.astimezone(datetime.UTC).replace(tzinfo=None)
    return when.isoformat(timespec="seconds") + "Z"


def serverJSON(server: McpServer) -> dict[str, Any]:
    """
    A server as JSON, the query values of its URL masked.
    """
    result = dict(jsonValue(server))
    if server.url:
        result["url"] = maskURL(server.url)
    return result


def configJSON(config: ServerConfig) -> dict[str, Any]:
    """
    A config as JSON, its environment values masked.
    """
    result = jsonValue(config)
    result["envVars"] = {name: MASK for name in config.envVars}
    return dict(result)


def maskedEnv(env: Mapping[str, str]) -> str:
    return ", ".join(f"{name}={MASK}" for name in env) or "-"


def formatTable(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """
    Aligned plain-text columns, two spaces apart, the last one unpadded.
    """
    cells = [[_cell(v) for v in row] for row in rows]
    widths = [len(h) for h in headers]
    for row in cells:
        for i, v in enumerate(row):
            widths[i] = max(widths[i], len(v))
    lines = []
    for row in [list(headers), *cells]:
        padded = [v.ljust(widths[i]) for i, v in enumerate(row[:-1])] + [row[-1]]
        lines.append("  ".join(padded).rstrip())
    return "\n".join(lines)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, datetime.datetime):
        return formatTime(value) or "-"
    text = " ".join(str(value).split())
    return text if len(text) <= 60 else text[:57] + "..."


class Output:
    """
    Where results and warnings go: JSON or text on stdout, warnings on
    stderr.
    """

    def __init__(self, asJSON: bool, stdout: TextIO, stderr: TextIO) -> None:
        self.asJSON = asJSON
        self.stdout = stdout
        self.stderr = stderr

    def emit(self, value: Any, human: Callable[[], None]) -> None:
        """
        Print C{value} as JSON with C{--json}, else call C{human}.
        """
        if self.asJSON:
            self.stdout.write(json.dumps(value, indent=2, sort_keys=False) + "\n")
        else:
            human()

    def line(self, text: str = "") -> None:
        self.stdout.write(text + "\n")

    def table(self, headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
        if rows:
            self.line(formatTable(headers, rows))
        else:
            self.line("(none)")

    def record(self, pairs: Sequence[tuple[str, Any]]) -> None:
        self.line(formatTable(("", ""), pairs).split("\n", 1)[1])

    def warn(self, text: str) -> None:
        self.stderr.write(f"{PROG}: warning: {text}\n")


@define
class Context:
    """
    What a command runs with.

    @ivar repo: the L{mcp_proxy.interfaces.IRepository}.
    """

    reactor: Any
    repo: Any
    args: argparse.Namespace
    out: Output
    keySalt: str
    environ: Mapping[str, str]
    schemaBefore: Optional[frozenset[str]] = None


Handler = Callable[[Context], Awaitable[None]]


# -- lookups ------------------------------------------------------------------------


async def _get(kind: str, listCommand: str, call: Awaitable[Any], ident: str) -> Any:
    try:
        return await call
    except NotFound:
        raise AdminError(f"unknown {kind} id {ident!r} (see '{PROG} {listCommand}')")


async def getServer(ctx: Context, serverId: str) -> McpServer:
    result: McpServer = await _get("server", "server list", ctx.repo.getServer(serverId), serverId)
    return result


async def getConfig(ctx: Context, configId: str) -> ServerConfig:
    result: ServerConfig = await _get(
        "config", "config list", ctx.repo.getConfig(configId), configId
    )
    return result


async def getToolGroup(ctx: Context, groupId: str) -> ToolGroup:
    result: ToolGroup = await _get(
        "tool group", "toolgroup list", ctx.repo.getToolGroup(groupId), groupId
    )
    return result


async def getInstance(ctx: Context, instanceId: str) -> Instance:
    result: Instance = await _get(
        "instance", "instance list --all", ctx.repo.getInstance(instanceId), instanceId
    )
    return result


async def getApiKey(ctx: Context, keyId: str) -> ApiKey:
    for key in await ctx.repo.listApiKeys(None):
        if key.id == keyId:
            result: ApiKey = key
            return result
    raise AdminError(f"unknown API key id {keyId!r} (see '{PROG} key list')")


async def resolveOrganization(
    ctx: Context, given: Optional[str], required: bool = True
) -> Optional[str]:
    """
    The organization id meant by C{--org}: an id, or a name that only one
    organization has.  Without C{--org}, the only organization when there
    is exactly one.

    @param required: when false, return C{None} instead of failing when no
        single organization can be chosen.
    """
    organizations: list[Organization] = list(await ctx.repo.listOrganizations())
    if given:
        for org in organizations:
            if org.id == given:
                return org.id
        named = [org for org in organizations if org.name == given]
        if len(named) == 1:
            return named[0].id
        if named:
            raise AdminError(f"several organizations are named {given!r}: give the id")
        raise AdminError(f"unknown organization {given!r} (see '{PROG} org list')")
    if len(organizations) == 1:
        return organizations[0].id
    if not required:
        return None
    if not organizations:
        raise AdminError(
            f"there is no organization yet: run '{PROG} init' or '{PROG} org create NAME'"
        )
    raise AdminError(
        f"there are {len(organizations)} organizations: give --org ID (see '{PROG} org list')"
    )


def parseWhen(text: str, now: datetime.datetime) -> Optional[datetime.datetime]:
    """
    Parse an ISO 8601 date or time (UTC unless it has an offset), C{now},
    or C{never} (C{None}).
    """
    value = text.strip()
    if value.lower() == "never":
        return None
    if value.lower() == "now":
        return now
    try:
        when = datetime.datetime.fromisoformat(value)
    except ValueError:
        raise AdminError(
            f"bad date {text!r}: expected ISO 8601 such as 2027-01-31 or "
            "2027-01-31T12:00:00Z, or 'never'"
        )
    if when.tzinfo is not None:
        when = when.astimezone(datetime.UTC).replace(tzinfo=None)
    return when.replace(microsecond=(when.microsecond // 1000) * 1000)


def parseAssignments(
    items: Sequence[str], environ: Mapping[str, str], transportType: str
) -> dict[str, str]:
    """
    Parse C{NAME=VALUE} items.  A bare C{NAME} takes its value from the
    environment of C{mcpproxy-admin}, which keeps the secret out of the
    command line.  Names are environment variable names for a stdio server
    and header names for a remote one.
    """
    result: dict[str, str] = {}
    for item in items:
        name, eq, value = item.partition("=")
        try:
            if transportType == STDIO:
                validateEnvName(name)
            else:
                validateHeaderName(name)
        except InvalidInput as e:
            raise AdminError(str(e))
        if not eq:
            if name not in environ:
                raise AdminError(
                    f"{name} is not set in the environment: give {name}=VALUE, "
                    f"or export {name} before running {PROG}"
                )
            value = environ[name]
        result[name] = value
    return result


# -- init, db, org ----------------------------------------------------------------------


def schemaVersions(database: DatabaseURL) -> Optional[frozenset[str]]:
    """
    The migrations recorded in a database, read directly (blocking) before
    the repository starts, so that C{init} can tell which ones it applied:
    C{start()} migrates and does not say what it did.

    @return: the versions (empty for a new database), or C{None} when they
        cannot be read (the repository will then report the problem).
    """
    from mcp_proxy.repository.schema import MIGRATIONS_TABLE

    try:
        if database.kind == "sqlite":
            if database.path == ":memory:" or not os.path.exists(database.path):
                return frozenset()
            import sqlite3

            uri = Path(database.path).absolute().as_uri() + "?mode=ro"
            connection = sqlite3.connect(uri, uri=True, timeout=10)
            try:
                (exists,) = connection.execute(
                    "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = ?",
                    (MIGRATIONS_TABLE,),
                ).fetchone()
                if not exists:
                    return frozenset()
                rows = connection.execute(f"SELECT version FROM {MIGRATIONS_TABLE}").fetchall()
            finally:
                connection.close()
        else:
            import psycopg2

            connection = psycopg2.connect(database.dsn, connect_timeout=10)
            try:
                with connection.cursor() as cursor:
                    cursor.execute("SELECT to_regclass(%s) IS NOT NULL", (MIGRATIONS_TABLE,))
                    if not cursor.fetchone()[0]:
                        return frozenset()
                    cursor.execute(f"SELECT version FROM {MIGRATIONS_TABLE}")
                    rows = cursor.fetchall()
            finally:
                connection.close()
    except Exception:
        return None
    return frozenset(str(row[0]) for row in rows)


async def appliedMigrations(ctx: Context) -> list[str]:
    """
    The migrations applied by this run: by C{start()}, and by a final
    C{migrate()} (which finds nothing to do unless another process raced).
    """
    late = list(await ctx.repo.migrate())
    if ctx.repo.originSchema:
        return []
    from mcp_proxy.repository import MIGRATIONS

    before = ctx.schemaBefore
    if before is None:
        return late
    return [m.version for m in MIGRATIONS if m.version not in before or m.version in late]


def _schemaLine(ctx: Context, applied: Sequence[str]) -> str:
    if ctx.repo.originSchema:
        return "the database has the origin's (Prisma) schema: used as it is, not migrated"
    if applied:
        return "applied migrations: " + ", ".join(applied)
    return "the schema is up to date"


async def cmdInit(ctx: Context) -> None:
    applied = await appliedMigrations(ctx)
    created = None
    if not await ctx.repo.listOrganizations():
        created = await ctx.repo.createOrganization(DEFAULT_ORGANIZATION)
    database = ctx.args.databaseURL.redacted()

    def human() -> None:
        ctx.out.line(f"database: {database}")
        ctx.out.line(_schemaLine(ctx, applied))
        if created is not None:
            ctx.out.line(f"created organization {created.name!r} ({created.id})")

    ctx.out.emit(
        {
            "database": database,
            "applied": applied,
            "originSchema": bool(ctx.repo.originSchema),
            "organization": jsonValue(created) if created is not None else None,
        },
        human,
    )


async def cmdMigrate(ctx: Context) -> None:
    applied = await appliedMigrations(ctx)
    ctx.out.emit(
        {"applied": applied, "originSchema": bool(ctx.repo.originSchema)},
        lambda: ctx.out.line(_schemaLine(ctx, applied)),
    )


async def cmdOrgCreate(ctx: Context) -> None:
    name = _name(ctx.args.name)
    if any(org.name == name for org in await ctx.repo.listOrganizations()):
        raise AdminError(f"an organization named {name!r} already exists")
    org = await ctx.repo.createOrganization(name)
    ctx.out.emit(jsonValue(org), lambda: _showOrganization(ctx, org))


def _showOrganization(ctx: Context, org: Organization) -> None:
    ctx.out.record([("id", org.id), ("name", org.name), ("createdAt", org.createdAt)])


async def cmdOrgList(ctx: Context) -> None:
    orgs = list(await ctx.repo.listOrganizations())
    ctx.out.emit(
        [jsonValue(o) for o in orgs],
        lambda: ctx.out.table(
            ("ID", "NAME", "CREATED"), [(o.id, o.name, o.createdAt) for o in orgs]
        ),
    )


def _name(value: str) -> str:
    name = value.strip()
    if not name:
        raise AdminError("the name is empty")
    if any(ord(c) < 32 for c in name):
        raise AdminError(f"bad name {value!r}: it contains control characters")
    return name


# -- servers ----------------------------------------------------------------------------


async def cmdServerAdd(ctx: Context) -> None:
    a = ctx.args
    name = _name(a.name)
    if a.url is not None and (a.stdio or a.command is not None):
        raise AdminError("give either --stdio --command CMD, or --url URL, not both")
    if a.url is None and a.command is None:
        raise AdminError("give --stdio --command CMD, or --url URL --transport streamable-http|sse")
    if a.url is not None:
        if a.arg or a.env_name:
            raise AdminError("--arg and --env-name are for stdio servers; use --header-name")
        try:
            validateUpstreamURL(a.url)
            transport = parseTransport(a.transport or "streamable-http")
            names = [validateHeaderName(n) for n in a.header_name or []]
        except InvalidInput as e:
            raise AdminError(str(e))
        command, args, url = None, [], a.url
    else:
        if a.transport is not None or a.header_name:
            raise AdminError("--transport and --header-name are for remote servers (--url)")
        if not a.command.strip():
            raise AdminError("--command is empty")
        try:
            names = [validateEnvName(n) for n in a.env_name or []]
        except InvalidInput as e:
            raise AdminError(str(e))
        transport, command, args, url = STDIO, a.command, list(a.arg or []), None
    if len(set(names)) != len(names):
        raise AdminError("a variable or header name is given twice")
    organizationId = await resolveOrganization(ctx, a.org, required=a.org is not None)
    for server in await ctx.repo.listServers():
        if server.name == name:
            raise AdminError(f"a server named {name!r} already exists ({server.id})")
    server = await ctx.repo.createServer(
        name, transport, command, args, url, names, a.auth_type, organizationId
    )
    ctx.out.emit(serverJSON(server), lambda: _showServer(ctx, server, None))


def _serverTarget(server: McpServer) -> str:
    """
    The command line of a stdio server, or the URL of a remote one.
    """
    if server.transportType == STDIO:
        return describeServer(server.transportType, server.command, server.args, server.url)
    return maskURL(server.url) if server.url else "-"


def _showServer(ctx: Context, server: McpServer, tools: Optional[Sequence[Tool]]) -> None:
    ctx.out.record(
        [
            ("id", server.id),
            ("name", server.name),
            ("transport", TRANSPORT_NAMES.get(server.transportType, server.transportType)),
            ("command" if server.transportType == STDIO else "url", _serverTarget(server)),
            (
                "env names" if server.transportType == STDIO else "header names",
                ", ".join(server.envVars) or "-",
            ),
            ("authType", server.authType),
            ("organization", server.organizationId),
            ("createdAt", server.createdAt),
        ]
    )
    if tools is not None:
        ctx.out.line()
        ctx.out.table(("TOOL", "DESCRIPTION"), [(t.name, t.description) for t in tools])


async def cmdServerList(ctx: Context) -> None:
    servers = list(await ctx.repo.listServers())
    ctx.out.emit(
        [serverJSON(s) for s in servers],
        lambda: ctx.out.table(
            ("ID", "NAME", "TRANSPORT", "TARGET", "NAMES"),
            [
                (
                    s.id,
                    s.name,
                    TRANSPORT_NAMES.get(s.transportType, s.transportType),
                    _serverTarget(s),
                    ",".join(s.envVars) or "-",
                )
                for s in servers
            ],
        ),
    )


async def cmdServerShow(ctx: Context) -> None:
    server = await getServer(ctx, ctx.args.id)
    tools = list(await ctx.repo.listTools(server.id))
    result = serverJSON(server)
    result["tools"] = [jsonValue(t) for t in tools]
    ctx.out.emit(result, lambda: _showServer(ctx, server, tools))


async def cmdServerDelete(ctx: Context) -> None:
    server = await getServer(ctx, ctx.args.id)
    await ctx.repo.deleteServer(server.id)
    ctx.out.emit(
        {"deleted": server.id},
        lambda: ctx.out.line(
            f"deleted server {server.name!r} ({server.id}) with its configs and tools"
        ),
    )


# -- configs ----------------------------------------------------------------------------


async def cmdConfigCreate(ctx: Context) -> None:
    a = ctx.args
    name = _name(a.name)
    server = await getServer(ctx, a.server)
    organizationId = await resolveOrganization(ctx, a.org or server.organizationId)
    if server.organizationId not in (None, organizationId):
        raise AdminError(f"server {server.id} belongs to another organization")
    env = parseAssignments(a.env or [], ctx.environ, server.transportType)
    for config in await ctx.repo.listConfigs(organizationId):
        if config.name == name:
            raise AdminError(f"a config named {name!r} already exists ({config.id})")
    _warnMissing(ctx, server, env)
    config = await ctx.repo.createConfig(server.id, name, a.description, env, organizationId)
    ctx.out.emit(configJSON(config), lambda: _showConfig(ctx, config, server))


def _warnMissing(ctx: Context, server: McpServer, env: Mapping[str, str]) -> None:
    missing = [n for n in server.envVars if n not in env]
    if missing:
        ctx.out.warn(
            f"server {server.name!r} expects {', '.join(missing)}, which the config does not set"
        )


def _showConfig(ctx: Context, config: ServerConfig, server: Optional[McpServer]) -> None:
    ctx.out.record(
        [
            ("id", config.id),
            ("name", config.name),
            ("description", config.description or "-"),
            ("server", f"{server.name} ({server.id})" if server else config.mcpServerId),
            ("organization", config.organizationId),
            ("env", maskedEnv(config.envVars)),
            ("createdAt", config.createdAt),
        ]
    )


async def cmdConfigList(ctx: Context) -> None:
    organizationId = None
    if ctx.args.org:
        organizationId = await resolveOrganization(ctx, ctx.args.org)
    configs = list(await ctx.repo.listConfigs(organizationId))
    if ctx.args.server:
        configs = [c for c in configs if c.mcpServerId == ctx.args.server]
    names = {s.id: s.name for s in await ctx.repo.listServers()}
    ctx.out.emit(
        [configJSON(c) for c in configs],
        lambda: ctx.out.table(
            ("ID", "NAME", "SERVER", "ORGANIZATION", "ENV"),
            [
                (
                    c.id,
                    c.name,
                    names.get(c.mcpServerId, c.mcpServerId),
                    c.organizationId,
                    maskedEnv(c.envVars),
                )
                for c in configs
            ],
        ),
    )


async def cmdConfigShow(ctx: Context) -> None:
    config = await getConfig(ctx, ctx.args.id)
    server = await getServer(ctx, config.mcpServerId)
    ctx.out.emit(configJSON(config), lambda: _showConfig(ctx, config, server))


async def cmdConfigSetEnv(ctx: Context) -> None:
    a = ctx.args
    config = await getConfig(ctx, a.id)
    server = await getServer(ctx, config.mcpServerId)
    if not a.assignments and not a.unset:
        raise AdminError("give NAME=VALUE items to set, or --unset NAME")
    changes = parseAssignments(a.assignments, ctx.environ, server.transportType)
    env = dict(config.envVars)
    for name in a.unset or []:
        if name not in env:
            raise AdminError(f"the config does not set {name!r}")
        if name in changes:
            raise AdminError(f"{name!r} is both set and unset")
        del env[name]
    env.update(changes)
    updated = await ctx.repo.updateConfigEnv(config.id, env)
    ctx.out.emit(configJSON(updated), lambda: _showConfig(ctx, updated, server))


async def cmdConfigDelete(ctx: Context) -> None:
    config = await getConfig(ctx, ctx.args.id)
    await ctx.repo.deleteConfig(config.id)
    ctx.out.emit(
        {"deleted": config.id},
        lambda: ctx.out.line(f"deleted config {config.name!r} ({config.id})"),
    )


# -- tools ------------------------------------------------------------------------------


def findDiscoverer(transportType: str) -> Optional[Discoverer]:
    """
    The function that lists the tools of an upstream of this transport, or
    C{None} when this build cannot contact such upstreams.
    """
    from mcp_proxy.upstream.pool import discoverTools

    if transportType in TRANSPORT_TYPES:
        return discoverTools  # type: ignore[no-any-return]
    return None


async def cmdToolsSync(ctx: Context) -> None:
    a = ctx.args
    explicit = bool(a.server or a.config)
    targets: list[tuple[McpServer, Optional[ServerConfig]]] = []
    if a.config:
        chosen = await getConfig(ctx, a.config)
        targets.append((await getServer(ctx, chosen.mcpServerId), chosen))
    else:
        servers = (
            [await getServer(ctx, a.server)] if a.server else list(await ctx.repo.listServers())
        )
        configs = sorted(await ctx.repo.listConfigs(None), key=lambda c: (c.name, c.id))
        for server in servers:
            mine = [c for c in configs if c.mcpServerId == server.id]
            targets.append((server, mine[0] if mine else None))
    results: list[tuple[McpServer, Optional[ServerConfig], Optional[list[str]], Optional[str]]] = []
    failures = 0
    for server, config in targets:
        try:
            names = await _syncOne(ctx, server, config)
            results.append((server, config, names, None))
        except AdminError as e:
            if explicit:
                raise
            if not isinstance(e, _Unreachable):
                failures += 1
            ctx.out.warn(str(e))
            results.append((server, config, None, str(e)))

    def human() -> None:
        for server, config, names, _ in results:
            via = f" via config {config.name!r}" if config else ""
            if names is None:
                ctx.out.line(f"{server.name} ({server.id}){via}: not synced")
                continue
            ctx.out.line(f"{server.name} ({server.id}){via}: {len(names)} tools")
            for name in names:
                ctx.out.line(f"  {name}")

    ctx.out.emit(
        {
            "servers": [
                {
                    "serverId": server.id,
                    "name": server.name,
                    "configId": config.id if config else None,
                    "tools": list(names) if names is not None else None,
                    "error": error,
                }
                for server, config, names, error in results
            ]
        },
        human,
    )
    if failures:
        raise AdminError(f"{failures} of {len(targets)} servers could not be synced", EXIT_FAILED)


async def _syncOne(ctx: Context, server: McpServer, config: Optional[ServerConfig]) -> list[str]:
    transport = TRANSPORT_NAMES.get(server.transportType, server.transportType)
    discoverer = findDiscoverer(server.transportType)
    if discoverer is None:
        raise _Unreachable(
            f"server {server.name!r} ({server.id}): {transport} upstreams cannot be contacted "
            "from here yet: skipped",
            EXIT_FAILED,
        )
    if config is None and server.envVars:
        raise AdminError(
            f"server {server.name!r} ({server.id}) needs {', '.join(server.envVars)}: "
            f"create a config for it ('{PROG} config create') and sync with --config"
        )
    upstream = UpstreamConfig(
        configId=config.id if config else "",
        name=config.name if config else server.name,
        transportType=server.transportType,
        command=server.command,
        args=tuple(server.args),
        url=server.url,
        env=dict(config.envVars) if config else {},
        authType=server.authType,
        toolNames=frozenset(),
        serverId=server.id,
    )
    try:
        tools = await discoverer(ctx.reactor, upstream, ctx.args.timeout)
        triples = normaliseTools(server.name, tools)
    except Exception as e:
        raise AdminError(
            f"cannot list the tools of server {server.name!r} ({_serverTarget(server)}): "
            f"{' '.join(str(e).split()) or type(e).__name__}",
            EXIT_FAILED,
        )
    await ctx.repo.syncTools(server.id, triples)
    return [t[0] for t in triples]


async def cmdToolsList(ctx: Context) -> None:
    a = ctx.args
    if a.config:
        serverId = (await getConfig(ctx, a.config)).mcpServerId
    else:
        serverId = (await getServer(ctx, a.server)).id
    tools = list(await ctx.repo.listTools(serverId))
    ctx.out.emit(
        [jsonValue(t) for t in tools],
        lambda: ctx.out.table(
            ("ID", "NAME", "DESCRIPTION"), [(t.id, t.name, t.description) for t in tools]
        ),
    )


# -- tool groups -------------------------------------------------------------------------


async def resolveToolSpecs(
    ctx: Context, organizationId: str, tools: Sequence[str], allOf: Sequence[str]
) -> list[tuple[str, str]]:
    """
    Turn C{--tool CONFIG_ID:TOOL_NAME} and C{--all-tools-of CONFIG_ID} into
    C{(configId, toolName)} pairs, checking that each config belongs to the
    organization and each tool is known.
    """
    known: dict[str, list[str]] = {}

    async def toolsOf(configId: str) -> list[str]:
        if configId not in known:
            config = await getConfig(ctx, configId)
            if config.organizationId != organizationId:
                raise AdminError(
                    f"config {configId} belongs to another organization than the tool group"
                )
            known[configId] = [t.name for t in await ctx.repo.listTools(config.mcpServerId)]
        return known[configId]

    result: list[tuple[str, str]] = []
    for spec in tools:
        configId, colon, toolName = spec.partition(":")
        if not colon or not configId or not toolName:
            raise AdminError(f"bad --tool {spec!r}: expected CONFIG_ID:TOOL_NAME")
        names = await toolsOf(configId)
        if toolName not in names:
            raise AdminError(
                f"config {configId} has no tool {toolName!r} "
                f"(known: {', '.join(names) or 'none'}); "
                f"run '{PROG} tools sync --config {configId}' if it is new"
            )
        result.append((configId, toolName))
    for configId in allOf:
        names = await toolsOf(configId)
        if not names:
            raise AdminError(
                f"config {configId} has no known tools: run "
                f"'{PROG} tools sync --config {configId}' first"
            )
        result.extend((configId, name) for name in names)
    unique = list(dict.fromkeys(result))
    return unique


async def _configNames(ctx: Context) -> dict[str, str]:
    return {c.id: c.name for c in await ctx.repo.listConfigs(None)}


def _showToolGroup(ctx: Context, group: ToolGroup, configNames: Mapping[str, str]) -> None:
    ctx.out.record(
        [
            ("id", group.id),
            ("name", group.name),
            ("description", group.description or "-"),
            ("enabled", group.isEnabled),
            ("organization", group.organizationId),
            ("createdAt", group.createdAt),
        ]
    )
    ctx.out.line()
    ctx.out.table(
        ("CONFIG", "CONFIG ID", "TOOL"),
        [(configNames.get(t.configId, "?"), t.configId, t.toolName) for t in group.tools],
    )


async def cmdToolGroupCreate(ctx: Context) -> None:
    a = ctx.args
    name = _name(a.name)
    organizationId = await resolveOrganization(ctx, a.org)
    assert organizationId is not None
    for group in await ctx.repo.listToolGroups(organizationId):
        if group.name == name:
            raise AdminError(f"a tool group named {name!r} already exists ({group.id})")
    tools = await resolveToolSpecs(ctx, organizationId, a.tool or [], a.all_tools_of or [])
    group = await ctx.repo.createToolGroup(organizationId, name, a.description, tools)
    names = await _configNames(ctx)
    ctx.out.emit(jsonValue(group), lambda: _showToolGroup(ctx, group, names))


async def cmdToolGroupList(ctx: Context) -> None:
    organizationId = None
    if ctx.args.org:
        organizationId = await resolveOrganization(ctx, ctx.args.org)
    groups = list(await ctx.repo.listToolGroups(organizationId))
    ctx.out.emit(
        [jsonValue(g) for g in groups],
        lambda: ctx.out.table(
            ("ID", "NAME", "ENABLED", "TOOLS", "ORGANIZATION"),
            [(g.id, g.name, g.isEnabled, len(g.tools), g.organizationId) for g in groups],
        ),
    )


async def cmdToolGroupShow(ctx: Context) -> None:
    group = await getToolGroup(ctx, ctx.args.id)
    names = await _configNames(ctx)
    ctx.out.emit(jsonValue(group), lambda: _showToolGroup(ctx, group, names))


async def _setEnabled(ctx: Context, enabled: bool) -> None:
    group = await getToolGroup(ctx, ctx.args.id)
    group = await ctx.repo.setToolGroupEnabled(group.id, enabled)
    names = await _configNames(ctx)
    ctx.out.emit(jsonValue(group), lambda: _showToolGroup(ctx, group, names))


async def cmdToolGroupEnable(ctx: Context) -> None:
    await _setEnabled(ctx, True)


async def cmdToolGroupDisable(ctx: Context) -> None:
    await _setEnabled(ctx, False)


async def cmdToolGroupSetTools(ctx: Context) -> None:
    a = ctx.args
    group = await getToolGroup(ctx, a.id)
    if not (a.tool or a.all_tools_of or a.clear):
        raise AdminError("give --tool CONFIG_ID:TOOL_NAME or --all-tools-of CONFIG_ID (or --clear)")
    if a.clear and (a.tool or a.all_tools_of):
        raise AdminError("--clear takes no --tool or --all-tools-of")
    tools = await resolveToolSpecs(ctx, group.organizationId, a.tool or [], a.all_tools_of or [])
    group = await ctx.repo.setToolGroupTools(group.id, tools)
    names = await _configNames(ctx)
    ctx.out.emit(jsonValue(group), lambda: _showToolGroup(ctx, group, names))


# -- instances -------------------------------------------------------------------------


async def cmdInstanceCreate(ctx: Context) -> None:
    a = ctx.args
    name = _name(a.name)
    group = await getToolGroup(ctx, a.toolgroup)
    organizationId = group.organizationId
    if a.org:
        given = await resolveOrganization(ctx, a.org)
        if given != organizationId:
            raise AdminError(f"tool group {group.id} belongs to another organization")
    for instance in await ctx.repo.listInstances(organizationId, True):
        if instance.toolGroupId == group.id:
            state = " (deleted)" if instance.deletedAt else ""
            raise AdminError(
                f"tool group {group.id} already serves instance {instance.name!r} "
                f"({instance.id}){state}: each instance needs its own tool group"
            )
        if instance.name == name and instance.deletedAt is None:
            raise AdminError(f"an instance named {name!r} already exists ({instance.id})")
    instance = await ctx.repo.createInstance(
        organizationId, name, a.description, group.id, a.auth_type
    )
    ctx.out.emit(jsonValue(instance), lambda: _showInstance(ctx, instance, group, None))


def _showInstance(
    ctx: Context, instance: Instance, group: Optional[ToolGroup], keys: Optional[Sequence[ApiKey]]
) -> None:
    ctx.out.record(
        [
            ("id", instance.id),
            ("name", instance.name),
            ("description", instance.description or "-"),
            ("authType", instance.authType),
            (
                "toolGroup",
                f"{group.name} ({group.id})" if group is not None else instance.toolGroupId,
            ),
            ("enabled", group.isEnabled if group is not None else "?"),
            ("tools", len(group.tools) if group is not None else "?"),
            ("organization", instance.organizationId),
            ("createdAt", instance.createdAt),
            ("deletedAt", instance.deletedAt),
        ]
    )
    if keys is not None:
        ctx.out.line()
        _keyTable(ctx, keys, utcnow())


async def cmdInstanceList(ctx: Context) -> None:
    organizationId = None
    if ctx.args.org:
        organizationId = await resolveOrganization(ctx, ctx.args.org)
    instances = list(await ctx.repo.listInstances(organizationId, ctx.args.all))
    ctx.out.emit(
        [jsonValue(i) for i in instances],
        lambda: ctx.out.table(
            ("ID", "NAME", "AUTH", "TOOL GROUP", "STATE", "CREATED"),
            [
                (
                    i.id,
                    i.name,
                    i.authType,
                    i.toolGroupId,
                    "deleted" if i.deletedAt else "live",
                    i.createdAt,
                )
                for i in instances
            ],
        ),
    )


async def cmdInstanceShow(ctx: Context) -> None:
    instance = await getInstance(ctx, ctx.args.id)
    try:
        group: Optional[ToolGroup] = await ctx.repo.getToolGroup(instance.toolGroupId)
    except NotFound:
        group = None
    keys = list(await ctx.repo.listApiKeys(instance.id))
    result = jsonValue(instance)
    result["toolGroup"] = jsonValue(group)
    now = utcnow()
    result["apiKeys"] = [keyJSON(k, now) for k in keys]
    ctx.out.emit(result, lambda: _showInstance(ctx, instance, group, keys))


async def cmdInstanceDelete(ctx: Context) -> None:
    instance = await getInstance(ctx, ctx.args.id)
    if instance.deletedAt is not None:
        raise AdminError(f"instance {instance.id} is already deleted")
    hashes = list(await ctx.repo.deleteInstance(instance.id))
    ctx.out.emit(
        {"deleted": instance.id, "apiKeys": len(hashes)},
        lambda: ctx.out.line(
            f"deleted instance {instance.name!r} ({instance.id}); its API keys "
            f"({len(hashes)}) no longer work ({_reach(ctx)})"
        ),
    )


# -- API keys ------------------------------------------------------------------------


def keyState(key: ApiKey, now: datetime.datetime) -> str:
    if not key.isActive:
        return "revoked"
    if key.expiresAt is not None and key.expiresAt <= now:
        return "expired"
    return "active"


def keyJSON(key: ApiKey, now: datetime.datetime) -> dict[str, Any]:
    result = dict(jsonValue(key))
    result["state"] = keyState(key, now)
    return result


def _keyTable(ctx: Context, keys: Sequence[ApiKey], now: datetime.datetime) -> None:
    ctx.out.table(
        ("ID", "NAME", "KEY", "INSTANCE", "STATE", "EXPIRES", "LAST USED"),
        [
            (
                k.id,
                k.name,
                k.display,
                k.instanceId,
                keyState(k, now),
                k.expiresAt or "never",
                k.lastUsedAt,
            )
            for k in keys
        ],
    )


async def createKey(
    ctx: Context, instance: Instance, name: str, expiresAt: Optional[datetime.datetime]
) -> tuple[ApiKey, str]:
    """
    Make a new API key for an instance: store its hash and display form,
    return the record and the key itself.
    """
    for attempt in range(5):
        key = generateApiKey()
        try:
            record = await ctx.repo.createApiKey(
                instance.id, name, hashApiKey(key, ctx.keySalt), displayApiKey(key), expiresAt
            )
        except Conflict:
            # The display form (prefix and last four characters) is unique
            # too, and may collide once keys number in the thousands.
            if attempt == 4:
                raise
            continue
        return record, key
    raise AssertionError("unreachable")


async def cmdKeyCreate(ctx: Context) -> None:
    a = ctx.args
    name = _name(a.name)
    now = utcnow()
    expiresAt = parseWhen(a.expires, now)
    if expiresAt is not None and expiresAt <= now:
        raise AdminError(f"--expires {a.expires!r} is in the past")
    instance = await getInstance(ctx, a.instance)
    if instance.deletedAt is not None:
        raise AdminError(f"instance {instance.id} is deleted")
    record, key = await createKey(ctx, instance, name, expiresAt)

    def human() -> None:
        ctx.out.line(f"API key {record.id} for instance {instance.name!r} ({instance.id}):")
        ctx.out.line()
        ctx.out.line(f"    {key}")
        ctx.out.line()
        ctx.out.line(
            "This is the only time the key is shown: store it now. "
            f"It expires {formatTime(expiresAt) or 'never'}."
        )

    ctx.out.emit(
        {
            "id": record.id,
            "key": key,
            "instanceId": instance.id,
            "display": record.display,
            "name": record.name,
            "expiresAt": formatTime(record.expiresAt),
        },
        human,
    )


async def cmdKeyList(ctx: Context) -> None:
    instanceId = None
    if ctx.args.instance:
        instanceId = (await getInstance(ctx, ctx.args.instance)).id
    keys = list(await ctx.repo.listApiKeys(instanceId))
    now = utcnow()
    ctx.out.emit([keyJSON(k, now) for k in keys], lambda: _keyTable(ctx, keys, now))


async def cmdKeyRevoke(ctx: Context) -> None:
    key = await getApiKey(ctx, ctx.args.id)
    await ctx.repo.revokeApiKey(key.id)
    key = await getApiKey(ctx, key.id)
    now = utcnow()
    ctx.out.emit(
        keyJSON(key, now),
        lambda: ctx.out.line(f"revoked API key {key.id} ({key.display}); {_reach(ctx)}"),
    )


async def cmdKeyExpire(ctx: Context) -> None:
    now = utcnow()
    expiresAt = parseWhen(ctx.args.at, now)
    key = await getApiKey(ctx, ctx.args.id)
    await ctx.repo.setApiKeyExpiry(key.id, expiresAt)
    key = await getApiKey(ctx, key.id)
    ctx.out.emit(
        keyJSON(key, now),
        lambda: ctx.out.line(
            f"API key {key.id} ({key.display}) now expires {formatTime(expiresAt) or 'never'}"
        ),
    )


# -- import ---------------------------------------------------------------------------


def prepareImport(args: argparse.Namespace) -> None:
    """
    Read and check the file before the database is opened.
    """
    try:
        args.servers = loadServersFile(args.file)
    except InvalidInput as e:
        raise AdminError(str(e))
    args.instanceName = args.instance if args.instance is not None else Path(args.file).stem
    if not args.instanceName.strip():
        raise AdminError("the instance name is empty: give --instance NAME")


async def cmdImport(ctx: Context) -> None:
    a = ctx.args
    servers: ServersFile = a.servers
    # Without any organization, the import creates "default" when it writes.
    organizationId = None
    if a.org is not None or await ctx.repo.listOrganizations():
        organizationId = await resolveOrganization(ctx, a.org)
    try:
        result = await importServers(
            ctx.reactor,
            ctx.repo,
            servers,
            organizationId,
            a.instanceName,
            f"Imported from {Path(a.file).name}",
            findDiscoverer,
            a.timeout,
            a.auth_type,
            a.skip_failed,
        )
    except UpstreamFailed as e:
        raise AdminError(str(e), EXIT_FAILED)
    for warning in result.warnings:
        ctx.out.warn(warning)
    record: Optional[ApiKey] = None
    key: Optional[str] = None
    if a.key:
        record, key = await createKey(ctx, result.instance, "import", None)
    ctx.out.emit(_importJSON(result, record, key), lambda: _showImport(ctx, result, key))


def _importJSON(
    result: ImportResult, record: Optional[ApiKey], key: Optional[str]
) -> dict[str, Any]:
    return {
        "instance": {
            "id": result.instance.id,
            "name": result.instance.name,
            "organizationId": result.instance.organizationId,
            "toolGroupId": result.toolGroupId,
        },
        "key": key,
        "keyId": record.id if record is not None else None,
        "servers": [
            {
                "name": s.name,
                "transportType": s.transportType,
                "serverId": s.serverId,
                "configId": s.configId,
                "serverCreated": s.serverCreated,
                "configCreated": s.configCreated,
                "tools": list(s.tools) if s.tools is not None else None,
            }
            for s in result.servers
        ],
        "tools": [
            {"server": s.name, "configId": s.configId, "name": name}
            for s in result.servers
            for name in s.tools or ()
        ],
    }


def _showImport(ctx: Context, result: ImportResult, key: Optional[str]) -> None:
    ctx.out.table(
        ("SERVER", "TRANSPORT", "SERVER ID", "CONFIG ID", "STATE", "TOOLS"),
        [
            (
                s.name,
                TRANSPORT_NAMES.get(s.transportType, s.transportType),
                s.serverId,
                s.configId,
                "new" if s.serverCreated else ("new config" if s.configCreated else "updated"),
                len(s.tools) if s.tools is not None else "not discovered",
            )
            for s in result.servers
        ],
    )
    ctx.out.line()
    ctx.out.record(
        [
            ("instance", result.instance.id),
            ("name", result.instance.name),
            ("toolGroup", result.toolGroupId),
        ]
    )
    if key is not None:
        ctx.out.line()
        ctx.out.line(f"    {key}")
        ctx.out.line()
        ctx.out.line("This is the only time the key is shown: store it now.")


# -- the parser ------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    """
    An argument parser whose errors are one line: C{mcpproxy-admin: error:
    ...}, exit status 2.
    """

    def error(self, message: str) -> Any:
        where = self.prog[len(PROG) :].strip()
        prefix = f"{where}: " if where else ""
        self.exit(EXIT_USAGE, f"{PROG}: error: {prefix}{message} (see '{self.prog} --help')\n")


def _addGlobalOptions(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("global options")
    group.add_argument(
        "--database",
        metavar="URL",
        default=argparse.SUPPRESS,
        help=f"sqlite:///PATH or postgresql://user:password@host:port/dbname "
        f"(default: ${ENV_PREFIX}DATABASE, else {DEFAULT_DATABASE})",
    )
    group.add_argument(
        "--key-salt",
        metavar="SALT",
        default=argparse.SUPPRESS,
        help=f"salt appended to API keys before hashing (default: ${ENV_PREFIX}KEY_SALT)",
    )
    group.add_argument(
        "--cache",
        metavar="SPEC",
        default=argparse.SUPPRESS,
        help="the proxies' --cache: with redis://..., each change is also published on "
        f"Redis and dropped from the shared cache (default: ${ENV_PREFIX}CACHE, else memory)",
    )
    group.add_argument(
        "--json",
        action="store_true",
        default=argparse.SUPPRESS,
        help="print machine-readable JSON on stdout",
    )


def _group(subparsers: Any, name: str, help: str) -> Any:
    parser = subparsers.add_parser(name, help=help, description=help)
    _addGlobalOptions(parser)
    sub = parser.add_subparsers(dest=f"{name}_command", metavar="COMMAND", required=True)
    return sub


def _command(subparsers: Any, name: str, help: str, handler: Handler) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = subparsers.add_parser(name, help=help, description=help)
    _addGlobalOptions(parser)
    parser.set_defaults(handler=handler)
    return parser


def _positiveFloat(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}")
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be more than 0: {text!r}")
    return value


def _toolOptions(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--tool",
        action="append",
        metavar="CONFIG_ID:TOOL_NAME",
        help="a tool served through a config (repeatable)",
    )
    parser.add_argument(
        "--all-tools-of",
        action="append",
        metavar="CONFIG_ID",
        help="every known tool of a config's server (repeatable)",
    )


def buildParser() -> argparse.ArgumentParser:
    """
    The C{mcpproxy-admin} argument parser.
    """
    parser = _Parser(
        prog=PROG,
        description="Manage the database of mcp-proxy: organizations, upstream servers, "
        "configs, tools, tool groups, instances and API keys.",
        epilog="Global options may be given before or after the command.  See docs/admin.md.",
    )
    _addGlobalOptions(parser)
    top = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = _command(
        top, "init", "create or migrate the database; create a 'default' organization", cmdInit
    )
    p.set_defaults(migrates=True)
    db = _group(top, "db", "database maintenance")
    p = _command(db, "migrate", "apply pending schema migrations", cmdMigrate)
    p.set_defaults(migrates=True)

    org = _group(top, "org", "organizations")
    p = _command(org, "create", "create an organization", cmdOrgCreate)
    p.add_argument("name", metavar="NAME")
    _command(org, "list", "list organizations", cmdOrgList)

    server = _group(top, "server", "upstream MCP servers")
    p = _command(server, "add", "register an upstream MCP server", cmdServerAdd)
    p.add_argument("name", metavar="NAME")
    p.add_argument("--stdio", action="store_true", help="a local process speaking stdio")
    p.add_argument("--command", metavar="CMD", help="the executable of a stdio server")
    p.add_argument(
        "--arg",
        action="append",
        metavar="A",
        help="an argument of the command (repeatable; --arg=-y for one starting with -)",
    )
    p.add_argument(
        "--env-name",
        action="append",
        metavar="N",
        help="the name of an environment variable its configs set (repeatable)",
    )
    p.add_argument("--url", metavar="URL", help="the http(s) URL of a remote server")
    p.add_argument(
        "--transport",
        metavar="streamable-http|sse",
        help="the transport of a remote server (default: streamable-http)",
    )
    p.add_argument(
        "--header-name",
        action="append",
        metavar="N",
        help="the name of an HTTP header its configs set (repeatable)",
    )
    p.add_argument(
        "--auth-type",
        choices=AUTH_TYPES,
        default=AUTH_NONE,
        help="how the proxy authenticates to it (default: NONE)",
    )
    p.add_argument("--org", metavar="ID", help="owning organization (default: the only one)")
    _command(server, "list", "list servers", cmdServerList)
    p = _command(server, "show", "show a server and its tools", cmdServerShow)
    p.add_argument("id", metavar="ID")
    p = _command(server, "delete", "delete a server with its configs and tools", cmdServerDelete)
    p.add_argument("id", metavar="ID")

    config = _group(top, "config", "server configs (with secret env values)")
    p = _command(config, "create", "create a config of a server", cmdConfigCreate)
    p.add_argument("name", metavar="NAME")
    p.add_argument("--server", metavar="ID", required=True)
    p.add_argument("--org", metavar="ID", help="organization (default: the only one)")
    p.add_argument(
        "--env",
        action="append",
        metavar="K=V",
        help="a variable (stdio) or header (remote) value; a bare K reads $K (repeatable)",
    )
    p.add_argument("--description", default="")
    p = _command(config, "list", "list configs (values masked)", cmdConfigList)
    p.add_argument("--org", metavar="ID")
    p.add_argument("--server", metavar="ID")
    p = _command(config, "show", "show a config (values masked)", cmdConfigShow)
    p.add_argument("id", metavar="ID")
    p = _command(config, "set-env", "set (or --unset) env values of a config", cmdConfigSetEnv)
    p.add_argument("id", metavar="ID")
    p.add_argument("assignments", nargs="*", metavar="K=V")
    p.add_argument("--unset", action="append", metavar="K")
    p = _command(config, "delete", "delete a config", cmdConfigDelete)
    p.add_argument("id", metavar="ID")

    tools = _group(top, "tools", "tools of servers")
    p = _command(tools, "sync", "list the tools of upstreams and store them", cmdToolsSync)
    which = p.add_mutually_exclusive_group()
    which.add_argument("--server", metavar="ID", help="(default: every server)")
    which.add_argument("--config", metavar="ID", help="connect with this config's env")
    p.add_argument(
        "--timeout",
        type=_positiveFloat,
        default=DEFAULT_TIMEOUT,
        help=f"seconds per upstream (default: {DEFAULT_TIMEOUT:g})",
    )
    p = _command(tools, "list", "list the stored tools of a server", cmdToolsList)
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--server", metavar="ID")
    which.add_argument("--config", metavar="ID")

    group = _group(top, "toolgroup", "tool groups (tool whitelists)")
    p = _command(group, "create", "create a tool group", cmdToolGroupCreate)
    p.add_argument("name", metavar="NAME")
    p.add_argument("--org", metavar="ID", help="organization (default: the only one)")
    p.add_argument("--description", default="")
    _toolOptions(p)
    p = _command(group, "list", "list tool groups", cmdToolGroupList)
    p.add_argument("--org", metavar="ID")
    for name, help, handler in (
        ("show", "show a tool group", cmdToolGroupShow),
        ("enable", "enable a tool group", cmdToolGroupEnable),
        ("disable", "disable a tool group (its instances refuse clients)", cmdToolGroupDisable),
    ):
        p = _command(group, name, help, handler)
        p.add_argument("id", metavar="ID")
    p = _command(group, "set-tools", "replace the tools of a tool group", cmdToolGroupSetTools)
    p.add_argument("id", metavar="ID")
    _toolOptions(p)
    p.add_argument("--clear", action="store_true", help="remove every tool")

    instance = _group(top, "instance", "instances (what clients connect to)")
    p = _command(instance, "create", "create an instance", cmdInstanceCreate)
    p.add_argument("name", metavar="NAME")
    p.add_argument("--toolgroup", metavar="ID", required=True)
    p.add_argument("--org", metavar="ID", help="(default: the tool group's)")
    p.add_argument(
        "--auth-type", choices=AUTH_TYPES, default=AUTH_API_KEY, help="(default: API_KEY)"
    )
    p.add_argument("--description", default="")
    p = _command(instance, "list", "list instances", cmdInstanceList)
    p.add_argument("--all", action="store_true", help="include deleted instances")
    p.add_argument("--org", metavar="ID")
    p = _command(instance, "show", "show an instance and its keys", cmdInstanceShow)
    p.add_argument("id", metavar="ID")
    p = _command(instance, "delete", "delete an instance (soft delete)", cmdInstanceDelete)
    p.add_argument("id", metavar="ID")

    key = _group(top, "key", "API keys")
    p = _command(key, "create", "create an API key (printed once)", cmdKeyCreate)
    p.add_argument("--instance", metavar="ID", required=True)
    p.add_argument("--name", default="default")
    p.add_argument("--expires", metavar="ISO8601|never", default="never")
    p = _command(key, "list", "list API keys (display form only)", cmdKeyList)
    p.add_argument("--instance", metavar="ID")
    p = _command(key, "revoke", "revoke an API key", cmdKeyRevoke)
    p.add_argument("id", metavar="ID")
    p = _command(key, "expire", "set or clear the expiry of an API key", cmdKeyExpire)
    p.add_argument("id", metavar="ID")
    p.add_argument("--at", metavar="ISO8601|now|never", required=True)

    p = _command(top, "import", "import an mcpServers JSON file as a new instance", cmdImport)
    p.add_argument("file", metavar="FILE.json")
    p.add_argument("--instance", metavar="NAME", help="(default: the file name without .json)")
    p.add_argument("--org", metavar="ID", help="(default: the only one; 'default' if none)")
    p.add_argument("--key", action="store_true", help="also create and print an API key")
    p.add_argument(
        "--skip-failed",
        action="store_true",
        help="register upstreams whose tools cannot be listed without their tools",
    )
    p.add_argument(
        "--auth-type",
        choices=AUTH_TYPES,
        default=AUTH_API_KEY,
        help="of the new instance (default: API_KEY)",
    )
    p.add_argument(
        "--timeout",
        type=_positiveFloat,
        default=DEFAULT_TIMEOUT,
        help=f"seconds per upstream to list its tools (default: {DEFAULT_TIMEOUT:g})",
    )
    p.set_defaults(prepare=prepareImport)

    p = _command(top, "logs", "list the request log, newest first", cmdLogs)
    p.add_argument("--instance", metavar="ID", help="only the requests of this instance")
    p.add_argument(
        "--since",
        metavar="TIME",
        help="only requests since TIME (ISO 8601, or an age: 15m, 2h, 7d)",
    )
    p.add_argument(
        "--limit", type=_logsLimit, default=50, metavar="N", help="at most N rows (default: 50)"
    )
    p.add_argument(
        "--show-data",
        action="store_true",
        help="also show the stored request and response of successful tools/call requests",
    )
    return parser


# -- request log ------------------------------------------------------------------------

_AGE_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def _logsLimit(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}")
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more: {text!r}")
    return value


def _logsSince(text: str, now: datetime.datetime) -> datetime.datetime:
    """
    The time of C{logs --since}: an age (C{90s}, C{15m}, C{2h}, C{7d}) or
    an ISO 8601 date or time (UTC unless it has an offset).
    """
    value = text.strip().lower()
    if len(value) > 1 and value[-1] in _AGE_UNITS and value[:-1].isdigit():
        return now - datetime.timedelta(seconds=int(value[:-1]) * _AGE_UNITS[value[-1]])
    when = parseWhen(text, now)
    if when is None:
        raise AdminError(f"bad --since {text!r}: expected an age such as 2h or an ISO 8601 time")
    return when


def _logData(data: Any) -> dict[str, Any]:
    """
    A detail row as JSON: its sizes, and the request and response read
    back from their gzip (plain or the origin's double-encoded JSON).
    """
    from mcp_proxy.requestlog import decodePayload

    result: dict[str, Any] = {}
    for name, blob in (
        ("request", data.inputDataCompressed),
        ("response", data.outputDataCompressed),
    ):
        try:
            value, encoding = decodePayload(blob)
        except ValueError as e:
            result[name] = None
            result[name + "Error"] = str(e)
        else:
            result[name] = value
            result["encoding"] = encoding
    result.update(
        originalInputSize=data.originalInputSize,
        originalOutputSize=data.originalOutputSize,
        compressedInputSize=data.compressedInputSize,
        compressedOutputSize=data.compressedOutputSize,
        compressionRatio=data.compressionRatio,
    )
    return result


def _logJSON(row: Any, showData: bool) -> dict[str, Any]:
    result: dict[str, Any] = {
        "id": row.id,
        "createdAt": formatTime(row.createdAt),
        "instanceId": row.instanceId,
        "organizationId": row.organizationId,
        "method": row.method,
        "toolName": row.toolName,
        "transportType": row.transportType,
        "responseStatus": row.responseStatus,
        "durationMs": row.durationMs,
        "inputBytes": row.inputBytes,
        "outputBytes": row.outputBytes,
        "errorCode": row.errorCode,
        "errorMessage": row.errorMessage,
        "userAgent": row.userAgent,
    }
    if showData:
        result["data"] = None if row.data is None else _logData(row.data)
    return result


def _logError(row: Any) -> Optional[str]:
    if row.errorCode and row.errorMessage:
        return f"{row.errorCode}: {row.errorMessage}"
    return row.errorMessage or row.errorCode


def _showLogs(ctx: Context, rows: Sequence[Any], entries: Sequence[dict[str, Any]]) -> None:
    if not ctx.args.show_data:
        ctx.out.table(
            (
                "TIME",
                "INSTANCE",
                "TRANSPORT",
                "METHOD",
                "TOOL",
                "STATUS",
                "MS",
                "IN",
                "OUT",
                "ERROR",
            ),
            [
                (
                    row.createdAt,
                    row.instanceId,
                    row.transportType,
                    row.method,
                    row.toolName,
                    row.responseStatus,
                    row.durationMs,
                    row.inputBytes,
                    row.outputBytes,
                    _logError(row),
                )
                for row in rows
            ],
        )
        return
    if not rows:
        ctx.out.line("(none)")
    for i, (row, entry) in enumerate(zip(rows, entries)):
        if i:
            ctx.out.line()
        ctx.out.record(
            [
                ("id", row.id),
                ("time", row.createdAt),
                ("instance", row.instanceId),
                ("transport", row.transportType),
                ("method", row.method),
                ("tool", row.toolName),
                ("status", row.responseStatus),
                ("duration", f"{row.durationMs} ms"),
                ("bytes in/out", f"{_cell(row.inputBytes)} / {_cell(row.outputBytes)}"),
                ("error", _logError(row)),
                ("user agent", row.userAgent),
            ]
        )
        data = entry["data"]
        if data is None:
            ctx.out.line("(no request/response stored)")
            continue
        ctx.out.line(
            f"stored {data.get('encoding', '?')} JSON, gzip ratio {data['compressionRatio']:.2f}"
        )
        for name, size in (("request", "originalInputSize"), ("response", "originalOutputSize")):
            if data.get(name + "Error"):
                ctx.out.line(f"{name}: unreadable ({data[name + 'Error']})")
            else:
                ctx.out.line(f"{name} ({data[size]} bytes stored):")
                ctx.out.line(json.dumps(data[name], indent=2, ensure_ascii=False))


async def cmdLogs(ctx: Context) -> None:
    args = ctx.args
    if args.instance:
        await getInstance(ctx, args.instance)
    since = _logsSince(args.since, utcnow()) if args.since else None
    rows = list(await ctx.repo.listRequestLogs(args.instance, since, args.limit, args.show_data))
    entries = [_logJSON(row, args.show_data) for row in rows]
    ctx.out.emit(entries, lambda: _showLogs(ctx, rows, entries))


# -- running ------------------------------------------------------------------------


def resolveOptions(args: argparse.Namespace, environ: Mapping[str, str]) -> None:
    """
    Fill in the global options from the environment and the defaults.
    """
    args.json = bool(getattr(args, "json", False))
    url = getattr(args, "database", None)
    if url is None:
        url = environ.get(ENV_PREFIX + "DATABASE") or DEFAULT_DATABASE
    try:
        args.databaseURL = DatabaseURL.parse(url)
    except SettingsError as e:
        raise AdminError(str(e))
    salt = getattr(args, "key_salt", None)
    args.key_salt = salt if salt is not None else environ.get(ENV_PREFIX + "KEY_SALT", "")
    cache = getattr(args, "cache", None)
    args.cache = cache if cache is not None else environ.get(ENV_PREFIX + "CACHE", "memory")
    from mcp_proxy.cacheplugins import parseCacheSpec

    args.sharedCache = parseCacheSpec(args.cache)[0] == "redis"


async def changePublishers(reactor: Any, args: argparse.Namespace, repo: Any) -> list[Any]:
    """
    Who tells running proxies about the changes of this run (see
    L{mcp_proxy.changes}): on PostgreSQL with the origin's schema, where no
    trigger does it, C{NOTIFY}; with a Redis C{--cache}, C{PUBLISH} (and
    deleting the changed entries from the shared cache).  On a database of
    mcp-proxy's own schema, its triggers notify.  Nothing connects before
    the first change.

    @raise SettingsError: for a C{--cache} that names no backend.
    """
    from mcp_proxy.cacheplugins import DEFAULT_BACKEND, closeCache, openCache, parseCacheSpec
    from mcp_proxy.changes import PostgresChangePublisher, RedisChangePublisher, redisCacheOf

    publishers: list[Any] = []
    if repo.kind == "postgresql" and repo.originSchema:
        publishers.append(PostgresChangePublisher(args.databaseURL.dsn, reactor))
    if parseCacheSpec(args.cache)[0] != DEFAULT_BACKEND:
        # Another backend than Redis has no change channel; it is opened
        # (without I/O) only to check the value.
        cache = openCache(args.cache, reactor)
        shared = redisCacheOf(cache)
        if shared is not None:
            publishers.append(RedisChangePublisher(shared))
        else:
            await closeCache(cache)
    return publishers


def _reach(ctx: Context) -> str:
    """
    How soon running proxies stop using what a change made stale.
    """
    if ctx.args.databaseURL.kind == "postgresql" or ctx.args.sharedCache:
        return "running proxies drop their cached copies within a second"
    return "a running proxy forgets cached keys within --auth-cache-ttl"


def _describeError(error: BaseException) -> tuple[str, int]:
    """
    The one-line message and exit status of a failure.
    """
    text = " ".join(str(error).split())
    if isinstance(error, AdminError):
        return text, error.code
    if isinstance(error, SettingsError):
        return text, EXIT_USAGE
    if isinstance(error, DatabaseUnavailable):
        return f"database unavailable: {text or 'no answer'}", EXIT_USAGE
    if isinstance(error, SchemaError):
        return f"unusable database schema: {text}", EXIT_USAGE
    if isinstance(error, (NotFound, Conflict, InvalidInput)):
        return text or type(error).__name__, EXIT_USAGE
    if isinstance(error, UpstreamFailed):
        return text, EXIT_FAILED
    if isinstance(error, ProxyError):
        return text or type(error).__name__, EXIT_FAILED
    return f"unexpected {type(error).__name__}: {text}", EXIT_FAILED


async def run(
    reactor: Any,
    args: argparse.Namespace,
    environ: Mapping[str, str],
    stdout: TextIO,
    stderr: TextIO,
) -> int:
    """
    Open the repository, run the command, close the repository.

    @return: the exit status; failures are reported on C{stderr}.
    """
    from mcp_proxy.repository import openRepository

    out = Output(args.json, stdout, stderr)
    repo = None
    started = False
    publishers: list[Any] = []
    try:
        schemaBefore = None
        if getattr(args, "migrates", False):
            schemaBefore = schemaVersions(args.databaseURL)
        repo = openRepository(args.databaseURL, reactor=reactor)
        try:
            await repo.start()
        except ProxyError as e:
            raise AdminError(
                f"cannot open the database {args.databaseURL.redacted()}: "
                f"{' '.join(str(e).split()) or type(e).__name__}"
            )
        started = True
        publishers = await changePublishers(reactor, args, repo)
        commandRepo: Any = repo
        if publishers:
            from mcp_proxy.changes import ChangePublishingRepository

            commandRepo = ChangePublishingRepository(repo, publishers, out.warn)
        ctx = Context(reactor, commandRepo, args, out, args.key_salt, environ, schemaBefore)
        await args.handler(ctx)
        return EXIT_OK
    except Exception as e:
        message, code = _describeError(e)
        stderr.write(f"{PROG}: error: {message}\n")
        return code
    finally:
        for publisher in publishers:
            try:
                await publisher.close()
            except Exception as e:
                stderr.write(f"{PROG}: warning: closing {publisher.name}: {e}\n")
        if repo is not None and started:
            try:
                await repo.stop()
            except Exception as e:
                stderr.write(f"{PROG}: warning: closing the database: {e}\n")


def main(argv: Optional[Sequence[str]] = None) -> None:
    """
    The C{mcpproxy-admin} console script.
    """
    args = buildParser().parse_args(argv)
    environ = os.environ
    try:
        resolveOptions(args, environ)
        prepare = getattr(args, "prepare", None)
        if prepare is not None:
            prepare(args)
    except AdminError as e:
        sys.stderr.write(f"{PROG}: error: {e}\n")
        raise SystemExit(e.code)

    from twisted.internet import task
    from twisted.internet.defer import Deferred

    async def _main(reactor: Any) -> None:
        code = await run(reactor, args, environ, sys.stdout, sys.stderr)
        sys.stdout.flush()
        if code:
            raise SystemExit(code)

    task.react(lambda reactor: Deferred.fromCoroutine(_main(reactor)))


if __name__ == "__main__":
    main()
