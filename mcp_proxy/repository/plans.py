"""
The query logic of the repository, written once for both databases.

Each operation is a generator, a I{plan}: it yields L{Query} objects and is
sent back each query's rows (a list of tuples).  A driver runs it: the
SQLite provider in its database thread, the PostgreSQL provider in the
reactor with txpostgres.  The SQL uses C{%s} placeholders and only what both
databases understand; values they store differently are wrapped in L{Array}
or L{Json} when written, and decoded by the helpers here when read.

When a statement fails, the driver throws the mapped error
(L{mcp_proxy.errors.Conflict}, ...) into the plan, which may catch it only
to raise a clearer one: on PostgreSQL the transaction is aborted by then.
"""

from __future__ import annotations

import datetime
import enum
import functools
import json
from collections.abc import Callable, Generator, Iterable, Mapping, Sequence
from typing import Any, Generic, Optional, ParamSpec, TypeVar
from urllib.parse import urlsplit

from attrs import frozen

from mcp_proxy import models as m
from mcp_proxy.errors import Conflict, InvalidInput, NotFound, SchemaError
from mcp_proxy.keys import newId
from mcp_proxy.repository.schema import (
    MIGRATIONS_TABLE,
    MIGRATIONS_TABLE_SQL,
    SYSTEM_USER_ID,
    Migration,
)

T = TypeVar("T")
P = ParamSpec("P")

Row = tuple[Any, ...]
Rows = list[Row]

#: The prefix of a value encrypted by the origin's prisma-field-encryption.
ENCRYPTED_PREFIX = "v1.aesgcm256."

#: Rows per multi-row INSERT (PostgreSQL allows 65535 parameters).
ROWS_PER_INSERT = 500

#: Seconds a migration step may take.
MIGRATION_TIMEOUT = 600.0


class EncryptedValueError(SchemaError):
    """
    A stored value is encrypted by the origin (cloak, C{v1.aesgcm256.}) and
    mcp-proxy cannot decrypt it.
    """


class Mode(enum.Enum):
    """
    How a driver runs an operation.

    @cvar AUTOCOMMIT: every statement on its own, no explicit transaction
        (single statements and reads).
    @cvar TRANSACTION: one transaction.
    @cvar EXCLUSIVE: one transaction, serialised with every other
        C{EXCLUSIVE} one (admin writes, migrations).
    """

    AUTOCOMMIT = "autocommit"
    TRANSACTION = "transaction"
    EXCLUSIVE = "exclusive"


@frozen
class Array:
    """
    A text array parameter: C{text[]} in PostgreSQL, JSON text in SQLite.
    """

    values: tuple[str, ...]


@frozen
class Json:
    """
    A JSON parameter: C{jsonb} in PostgreSQL, JSON text in SQLite.
    """

    value: Any


@frozen
class Query:
    """
    One SQL statement with C{%s} placeholders, and its parameters.
    """

    sql: str
    params: tuple[Any, ...] = ()


Plan = Generator[Query, Rows, T]


@frozen(eq=False)
class Operation(Generic[T]):
    """
    A plan ready to run.

    @ivar name: the operation, for messages.
    @ivar kind: the key of C{queryCounts} its statements count under.
    @ivar timeout: seconds, or C{None} for the provider's query timeout.
    """

    name: str
    kind: str
    mode: Mode
    steps: Plan[T]
    timeout: Optional[float] = None


def operation(
    kind: Optional[str], mode: Mode, timeout: Optional[float] = None
) -> Callable[[Callable[P, Plan[T]]], Callable[P, Operation[T]]]:
    """
    Make a plan function return an L{Operation}.

    @param kind: the C{queryCounts} key; C{None} for the function's name.
    """

    def decorate(f: Callable[P, Plan[T]]) -> Callable[P, Operation[T]]:
        name = f.__name__

        @functools.wraps(f)
        def build(*args: P.args, **kwargs: P.kwargs) -> Operation[T]:
            return Operation(name, kind or name, mode, f(*args, **kwargs), timeout)

        return build

    return decorate


# -- decoding ------------------------------------------------------------------


def timestamp(value: Any) -> Optional[datetime.datetime]:
    """
    A stored timestamp (a C{datetime} from PostgreSQL, text from SQLite).
    """
    if value is None or isinstance(value, datetime.datetime):
        return value
    return datetime.datetime.fromisoformat(value)


def requiredTimestamp(value: Any) -> datetime.datetime:
    """
    A stored timestamp that cannot be NULL.
    """
    result = timestamp(value)
    if result is None:
        raise SchemaError("a required timestamp is NULL")
    return result


def array(value: Any) -> tuple[str, ...]:
    """
    A stored text array (a list from PostgreSQL, JSON text from SQLite).
    """
    if value is None:
        return ()
    if isinstance(value, str):
        value = json.loads(value)
    return tuple(value)


def jsonValue(value: Any) -> Any:
    """
    A stored JSON value (decoded by psycopg2 for jsonb, text from SQLite).
    """
    if isinstance(value, (str, bytes)):
        return json.loads(value)
    return value


def flag(value: Any) -> bool:
    """
    A stored boolean (C{bool} from PostgreSQL, C{0}/C{1} from SQLite).
    """
    return bool(value)


def blob(value: Any) -> bytes:
    """
    Stored bytes (a C{memoryview} from PostgreSQL, C{bytes} from SQLite).
    """
    return bytes(value)


def formatTimestamp(value: datetime.datetime) -> str:
    """
    The text form of a naive UTC timestamp, with milliseconds, as SQLite
    stores it and PostgreSQL reads it.
    """
    return naiveUtc(value).isoformat(sep=" ", timespec="milliseconds")


def naiveUtc(value: datetime.datetime) -> datetime.datetime:
    """
    C{value} as the database stores it: naive UTC, truncated to
    milliseconds.  An aware C{datetime} is converted to UTC.
    """
    if value.tzinfo is not None:
        value = value.astimezone(datetime.UTC).replace(tzinfo=None)
    return value.replace(microsecond=(value.microsecond // 1000) * 1000)


def parseEnv(raw: Any, configId: str, configName: str) -> dict[str, str]:
    """
    Decode a "UserMcpServerConfig"."envVars" value: a JSON object string.

    @raise EncryptedValueError: for a value encrypted by the origin.
    @raise SchemaError: for anything but a JSON object.
    """
    where = f"config {configName!r} ({configId})"
    if raw is None or raw == "":
        return {}
    if not isinstance(raw, str):
        raise SchemaError(f'"envVars" of {where} is not text')
    if raw.startswith(ENCRYPTED_PREFIX):
        raise EncryptedValueError(
            f'"envVars" of {where} is encrypted by the origin ({ENCRYPTED_PREFIX}...); '
            "mcp-proxy cannot decrypt it: set the values again with mcp-proxy"
        )
    try:
        value = json.loads(raw)
    except ValueError:
        raise SchemaError(f'"envVars" of {where} is not valid JSON') from None
    if not isinstance(value, dict):
        raise SchemaError(f'"envVars" of {where} is not a JSON object')
    env: dict[str, str] = {}
    for key, item in value.items():
        if isinstance(item, str) and item.startswith(ENCRYPTED_PREFIX):
            raise EncryptedValueError(
                f'"envVars" of {where}: the value of {key!r} is encrypted by the origin '
                f"({ENCRYPTED_PREFIX}...); mcp-proxy cannot decrypt it"
            )
        env[key] = item if isinstance(item, str) else json.dumps(item)
    return env


# -- validation ----------------------------------------------------------------


def _text(value: Any, what: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise InvalidInput(f"{what} must be a non-empty string")
    return value


def _optionalText(value: Any, what: str) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise InvalidInput(f"{what} must be a string")
    return value


def _strings(value: Any, what: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        raise InvalidInput(f"{what} must be a list of strings")
    items = tuple(value)
    for item in items:
        if not isinstance(item, str):
            raise InvalidInput(f"{what} must be a list of strings")
    return items


def _env(value: Any) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise InvalidInput("envVars must be a mapping of names to values")
    env = {}
    for key, item in value.items():
        if not isinstance(key, str) or not key:
            raise InvalidInput("envVars names must be non-empty strings")
        if not isinstance(item, str):
            raise InvalidInput(f"the value of envVars {key!r} must be a string")
        env[key] = item
    return env


def _choice(value: Any, choices: Sequence[str], what: str) -> str:
    if value not in choices:
        raise InvalidInput(f"{what} must be one of {', '.join(choices)}, not {value!r}")
    return str(value)


def _when(value: Any, what: str) -> Optional[datetime.datetime]:
    if value is None:
        return None
    if not isinstance(value, datetime.datetime):
        raise InvalidInput(f"{what} must be a datetime or None")
    return naiveUtc(value)


def _placeholders(count: int) -> str:
    return ", ".join(["%s"] * count)


def _insertMany(table: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> Query:
    """
    One multi-row C{INSERT ... VALUES (...), (...)}.
    """
    names = ", ".join(f'"{c}"' for c in columns)
    one = f"({_placeholders(len(columns))})"
    values = ", ".join([one] * len(rows))
    params = tuple(v for row in rows for v in row)
    return Query(f'INSERT INTO "{table}" ({names}) VALUES {values}', params)


def _chunks(items: Sequence[T], size: int) -> Iterable[Sequence[T]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


# -- the request path ----------------------------------------------------------

_LOOKUP_API_KEY = """
SELECT k.id, k."userMcpServerInstanceId", i."organizationId", i."authType",
       k."isActive", k."expiresAt", i."deletedAt", g."isEnabled"
FROM "McpApiKey" k
JOIN "UserMcpServerInstance" i ON i.id = k."userMcpServerInstanceId"
JOIN "UserToolGroup" g ON g.id = i."toolGroupId"
WHERE k."apiKeyHash" = %s
"""


@operation("lookupApiKey", Mode.AUTOCOMMIT)
def lookupApiKey(keyHash: str) -> Plan[Optional[m.ApiKeyRecord]]:
    """
    The key with hash C{keyHash} and the state of its instance and tool
    group, whatever that state is: the caller decides.
    """
    rows = yield Query(_LOOKUP_API_KEY, (keyHash,))
    if not rows:
        return None
    r = rows[0]
    return m.ApiKeyRecord(
        keyId=r[0],
        instanceId=r[1],
        organizationId=r[2],
        authType=r[3],
        isActive=flag(r[4]),
        expiresAt=timestamp(r[5]),
        instanceDeleted=r[6] is not None,
        toolGroupEnabled=flag(r[7]),
    )


_LOAD_INSTANCE_CONFIG = """
SELECT i.id, i."organizationId", i."toolGroupId", g."isEnabled",
       c.id, c.name, c."envVars",
       s.id, s."transportType", s.command, s.args, s.url, s."authType",
       t.name
FROM "UserMcpServerInstance" i
JOIN "UserToolGroup" g ON g.id = i."toolGroupId"
LEFT JOIN "UserToolGroupTool" gt ON gt."toolGroupId" = g.id
LEFT JOIN "Tool" t ON t.id = gt."toolId"
LEFT JOIN "UserMcpServerConfig" c ON c.id = gt."userMcpServerConfigId"
LEFT JOIN "McpServer" s ON s.id = c."mcpServerId"
WHERE i.id = %s AND i."deletedAt" IS NULL
"""


@operation("loadInstanceConfig", Mode.AUTOCOMMIT)
def loadInstanceConfig(instanceId: str) -> Plan[Optional[m.InstanceConfig]]:
    """
    A live instance's upstreams, one per config used by its tool group, in
    one statement.
    """
    rows = yield Query(_LOAD_INSTANCE_CONFIG, (instanceId,))
    if not rows:
        return None
    first = rows[0]
    configs: dict[str, Row] = {}
    names: dict[str, set[str]] = {}
    for r in rows:
        configId = r[4]
        if configId is None or r[7] is None:
            continue
        configs.setdefault(configId, r)
        if r[13] is not None:
            names.setdefault(configId, set()).add(r[13])
    upstreams = [
        m.UpstreamConfig(
            configId=r[4],
            name=r[5],
            transportType=r[8],
            command=r[9],
            args=array(r[10]),
            url=r[11],
            env=parseEnv(r[6], r[4], r[5]),
            authType=r[12],
            toolNames=frozenset(names.get(r[4], ())),
            serverId=r[7],
        )
        for r in configs.values()
    ]
    upstreams.sort(key=lambda u: (u.name, u.configId))
    return m.InstanceConfig(
        instanceId=first[0],
        organizationId=first[1],
        toolGroupId=first[2],
        toolGroupEnabled=flag(first[3]),
        upstreams=tuple(upstreams),
    )


@operation("touchApiKey", Mode.AUTOCOMMIT)
def touchApiKey(keyId: str, when: datetime.datetime) -> Plan[None]:
    """
    Set "lastUsedAt" of a key.
    """
    yield Query('UPDATE "McpApiKey" SET "lastUsedAt" = %s WHERE id = %s', (naiveUtc(when), keyId))
    return None


_LOG_COLUMNS = (
    "id",
    "mcpServerInstanceId",
    "toolName",
    "transportType",
    "method",
    "responseStatus",
    "durationMs",
    "errorMessage",
    "errorCode",
    "inputBytes",
    "outputBytes",
    "organizationId",
    "userAgent",
    "createdAt",
)

_DATA_COLUMNS = (
    "id",
    "requestLogId",
    "inputDataCompressed",
    "outputDataCompressed",
    "originalInputSize",
    "originalOutputSize",
    "compressedInputSize",
    "compressedOutputSize",
    "compressionRatio",
    "createdAt",
)


def _noNul(value: Optional[str]) -> Optional[str]:
    """
    Text a client chose (a tool name, a message, a User-Agent) as a text
    column can hold it: PostgreSQL's text has no NUL, which becomes U+FFFD
    (on both databases, so that they store the same).
    """
    if value is not None and "\x00" in value:
        return value.replace("\x00", "\N{REPLACEMENT CHARACTER}")
    return value


def _logValues(r: m.RequestLogRow) -> tuple[Any, ...]:
    return (
        r.id,
        r.instanceId,
        _noNul(r.toolName),
        r.transportType,
        r.method,
        r.responseStatus,
        r.durationMs,
        _noNul(r.errorMessage),
        _noNul(r.errorCode),
        r.inputBytes,
        r.outputBytes,
        r.organizationId,
        _noNul(r.userAgent),
    )


def _dataValues(r: m.RequestLogRow, d: m.RequestLogData) -> tuple[Any, ...]:
    return (
        d.id,
        r.id,
        bytes(d.inputDataCompressed),
        bytes(d.outputDataCompressed),
        d.originalInputSize,
        d.originalOutputSize,
        d.compressedInputSize,
        d.compressedOutputSize,
        float(d.compressionRatio),
    )


_jsonRows = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode


def _jsonRecordset(table: str, columns: Sequence[str], rows: list[tuple[Any, ...]]) -> Query:
    """
    One C{INSERT ... SELECT} of many rows passed as a single JSON parameter
    (PostgreSQL): the rows' values, in the order of C{columns}, become
    objects of a JSON array that C{json_populate_recordset} turns into
    records of the table's row type.  bytea values travel as hex text
    (C{\\x...}), timestamps as ISO text.

    One parameter instead of one per value: psycopg2 adapts every
    parameter in Python's thread with the GIL held, which for a batch of
    200 rows (about 4,800 values) cost more than building the rows.
    """
    names = ", ".join(f'"{c}"' for c in columns)
    objects = []
    for row in rows:
        objects.append(
            {c: ("\\x" + v.hex() if isinstance(v, bytes) else v) for c, v in zip(columns, row)}
        )
    return Query(
        f'INSERT INTO "{table}" ({names}) SELECT {names}'
        f' FROM json_populate_recordset(NULL::"{table}", %s::json)',
        (_jsonRows(objects),),
    )


@operation("insertRequestLogs", Mode.TRANSACTION)
def insertRequestLogs(rows: Sequence[m.RequestLogRow], dialect: str = "sqlite") -> Plan[int]:
    """
    Write log rows and their data rows: on SQLite with multi-row INSERTs,
    on PostgreSQL with one statement per table (L{_jsonRecordset}).
    """
    logs = list(rows)
    for row in logs:
        if not isinstance(row, m.RequestLogRow):
            raise InvalidInput(f"not a RequestLogRow: {row!r}")
    if not logs:
        return 0
    if dialect == "postgresql":
        yield _jsonRecordset(
            "McpServerRequestLog",
            _LOG_COLUMNS,
            [_logValues(r) + (formatTimestamp(r.createdAt),) for r in logs],
        )
        data = [
            _dataValues(r, r.data) + (formatTimestamp(r.createdAt),)
            for r in logs
            if r.data is not None
        ]
        if data:
            yield _jsonRecordset("McpServerRequestData", _DATA_COLUMNS, data)
        return len(logs)
    for chunk in _chunks(logs, ROWS_PER_INSERT):
        yield _insertMany(
            "McpServerRequestLog",
            _LOG_COLUMNS,
            [_logValues(r) + (formatTimestamp(r.createdAt),) for r in chunk],
        )
    withData = [r for r in logs if r.data is not None]
    for chunk in _chunks(withData, ROWS_PER_INSERT):
        yield _insertMany(
            "McpServerRequestData",
            _DATA_COLUMNS,
            [
                _dataValues(r, r.data) + (formatTimestamp(r.createdAt),)
                for r in chunk
                if r.data is not None
            ],
        )
    return len(logs)


@operation("admin", Mode.AUTOCOMMIT)
def listRequestLogs(
    instanceId: Optional[str], since: Optional[datetime.datetime], limit: int, withData: bool
) -> Plan[list[m.RequestLogRow]]:
    """
    Log rows, newest first, with their data rows when C{withData}.
    """
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 0:
        raise InvalidInput("limit must be a whole number, 0 or more")
    columns = ", ".join(f'l."{c}"' for c in _LOG_COLUMNS)
    sql = f"SELECT {columns}"
    if withData:
        sql += ", " + ", ".join(f'd."{c}"' for c in _DATA_COLUMNS if c != "requestLogId")
    sql += ' FROM "McpServerRequestLog" l'
    if withData:
        sql += ' LEFT JOIN "McpServerRequestData" d ON d."requestLogId" = l.id'
    conditions = []
    params: list[Any] = []
    if instanceId is not None:
        conditions.append('l."mcpServerInstanceId" = %s')
        params.append(instanceId)
    if since is not None:
        conditions.append('l."createdAt" >= %s')
        params.append(_when(since, "since"))
    if conditions:
        sql += " WHERE " + " AND ".join(conditions)
    sql += ' ORDER BY l."createdAt" DESC, l.id DESC LIMIT %s'
    params.append(limit)
    rows = yield Query(sql, tuple(params))
    result = []
    for r in rows:
        data = None
        if withData and r[14] is not None:
            data = m.RequestLogData(
                id=r[14],
                inputDataCompressed=blob(r[15]),
                outputDataCompressed=blob(r[16]),
                originalInputSize=r[17],
                originalOutputSize=r[18],
                compressedInputSize=r[19],
                compressedOutputSize=r[20],
                compressionRatio=float(r[21]),
            )
        result.append(
            m.RequestLogRow(
                id=r[0],
                instanceId=r[1],
                toolName=r[2],
                transportType=r[3],
                method=r[4],
                responseStatus=r[5],
                durationMs=r[6],
                errorMessage=r[7],
                errorCode=r[8],
                inputBytes=r[9],
                outputBytes=r[10],
                organizationId=r[11],
                userAgent=r[12],
                createdAt=requiredTimestamp(r[13]),
                data=data,
            )
        )
    return result


@operation("ping", Mode.AUTOCOMMIT)
def ping() -> Plan[None]:
    """
    C{SELECT 1}.
    """
    yield Query("SELECT 1")
    return None


# -- migrations ----------------------------------------------------------------


@frozen
class SchemaState:
    """
    What L{inspectSchema} found.

    @ivar origin: the database was made by the origin and has no migrations
        table.
    @ivar applied: the versions already applied.
    """

    origin: bool
    applied: frozenset[str]


@operation("migrate", Mode.EXCLUSIVE, MIGRATION_TIMEOUT)
def inspectSchema(dialect: str) -> Plan[SchemaState]:
    """
    Tell an origin database from one of mcp-proxy's, and create the
    migrations table in the latter if needed.
    """
    if dialect == "postgresql":
        rows = yield Query(
            "SELECT to_regclass(%s) IS NOT NULL, to_regclass(%s) IS NOT NULL",
            ('"McpApiKey"', MIGRATIONS_TABLE),
        )
    else:
        rows = yield Query(
            "SELECT EXISTS (SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = %s),"
            " EXISTS (SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = %s)",
            ("McpApiKey", MIGRATIONS_TABLE),
        )
    hasKeys, hasMigrations = flag(rows[0][0]), flag(rows[0][1])
    if hasKeys and not hasMigrations:
        if dialect == "postgresql":
            return SchemaState(origin=True, applied=frozenset())
        raise SchemaError(
            f'this SQLite database has a "McpApiKey" table but no {MIGRATIONS_TABLE}: '
            "it was not made by mcp-proxy"
        )
    if not hasMigrations:
        yield Query(MIGRATIONS_TABLE_SQL[dialect])
    rows = yield Query(f"SELECT version FROM {MIGRATIONS_TABLE}")
    return SchemaState(origin=False, applied=frozenset(r[0] for r in rows))


@operation("migrate", Mode.EXCLUSIVE, MIGRATION_TIMEOUT)
def applyMigration(dialect: str, migration: Migration) -> Plan[bool]:
    """
    Apply one migration unless it is recorded already.

    @return: whether it was applied.
    """
    rows = yield Query(
        f"SELECT version FROM {MIGRATIONS_TABLE} WHERE version = %s", (migration.version,)
    )
    if rows:
        return False
    for statement in migration.statements(dialect):
        yield Query(statement)
    yield Query(
        f'INSERT INTO {MIGRATIONS_TABLE} (version, "appliedAt") VALUES (%s, %s)',
        (migration.version, m.utcnow()),
    )
    return True


# -- administration: shared reads ----------------------------------------------


def _organization(r: Row) -> m.Organization:
    return m.Organization(id=r[0], name=r[1], createdAt=requiredTimestamp(r[2]))


_SERVER_COLUMNS = (
    's.id, s.name, s."transportType", s.command, s.args, s.url, s."envVars", '
    's."authType", s."organizationId", s."createdAt"'
)


def _server(r: Row) -> m.McpServer:
    return m.McpServer(
        id=r[0],
        name=r[1],
        transportType=r[2],
        command=r[3],
        args=array(r[4]),
        url=r[5],
        envVars=array(r[6]),
        authType=r[7],
        organizationId=r[8],
        createdAt=requiredTimestamp(r[9]),
    )


_CONFIG_COLUMNS = (
    'c.id, c.name, c.description, c."envVars", c."mcpServerId", c."organizationId", c."createdAt"'
)


def _config(r: Row) -> m.ServerConfig:
    return m.ServerConfig(
        id=r[0],
        name=r[1],
        description=r[2] or "",
        envVars=parseEnv(r[3], r[0], r[1]),
        mcpServerId=r[4],
        organizationId=r[5],
        createdAt=requiredTimestamp(r[6]),
    )


_TOOL_COLUMNS = 't.id, t.name, t.description, t."inputSchema", t."mcpServerId"'


def _tool(r: Row) -> m.Tool:
    return m.Tool(
        id=r[0],
        name=r[1],
        description=r[2] or "",
        inputSchema=jsonValue(r[3]),
        mcpServerId=r[4],
    )


_INSTANCE_COLUMNS = (
    'i.id, i.name, i.description, i."toolGroupId", i."authType", i."organizationId", '
    'i."createdAt", i."deletedAt"'
)


def _instance(r: Row) -> m.Instance:
    return m.Instance(
        id=r[0],
        name=r[1],
        description=r[2] or "",
        toolGroupId=r[3],
        authType=r[4],
        organizationId=r[5],
        createdAt=requiredTimestamp(r[6]),
        deletedAt=timestamp(r[7]),
    )


_KEY_COLUMNS = (
    'k.id, k.name, k."apiKey", k."userMcpServerInstanceId", k."isActive", k."expiresAt", '
    'k."lastUsedAt", k."createdAt"'
)


def _apiKey(r: Row) -> m.ApiKey:
    return m.ApiKey(
        id=r[0],
        name=r[1],
        display=r[2],
        instanceId=r[3],
        isActive=flag(r[4]),
        expiresAt=timestamp(r[5]),
        lastUsedAt=timestamp(r[6]),
        createdAt=requiredTimestamp(r[7]),
    )


_TOOL_GROUP_SELECT = """
SELECT g.id, g.name, g.description, g."isEnabled", g."organizationId", g."createdAt",
       gt."userMcpServerConfigId", gt."toolId", t.name, gt."sortOrder"
FROM "UserToolGroup" g
LEFT JOIN "UserToolGroupTool" gt ON gt."toolGroupId" = g.id
LEFT JOIN "Tool" t ON t.id = gt."toolId"
"""


def _toolGroups(rows: Rows) -> list[m.ToolGroup]:
    heads: dict[str, Row] = {}
    tools: dict[str, list[m.ToolGroupTool]] = {}
    for r in rows:
        heads.setdefault(r[0], r)
        entries = tools.setdefault(r[0], [])
        if r[6] is not None and r[7] is not None:
            entries.append(
                m.ToolGroupTool(
                    configId=r[6], toolId=r[7], toolName=r[8] or "", sortOrder=r[9] or 0
                )
            )
    groups = []
    for groupId, r in heads.items():
        entries = sorted(tools[groupId], key=lambda t: (t.sortOrder, t.configId, t.toolName))
        groups.append(
            m.ToolGroup(
                id=r[0],
                name=r[1],
                description=r[2] or "",
                isEnabled=flag(r[3]),
                organizationId=r[4],
                tools=tuple(entries),
                createdAt=requiredTimestamp(r[5]),
            )
        )
    groups.sort(key=lambda g: (g.name, g.id))
    return groups


def _byName(items: list[Any]) -> list[Any]:
    items.sort(key=lambda item: (item.name, item.id))
    return items


def _requireOrganization(orgId: Any) -> Plan[m.Organization]:
    rows = yield Query('SELECT id, name, "createdAt" FROM "Organization" WHERE id = %s', (orgId,))
    if not rows:
        raise NotFound(f"organization {orgId!r} not found")
    return _organization(rows[0])


def _requireServer(serverId: Any) -> Plan[m.McpServer]:
    rows = yield Query(f'SELECT {_SERVER_COLUMNS} FROM "McpServer" s WHERE s.id = %s', (serverId,))
    if not rows:
        raise NotFound(f"server {serverId!r} not found")
    return _server(rows[0])


def _requireConfigRow(configId: Any) -> Plan[Row]:
    rows = yield Query(
        f'SELECT {_CONFIG_COLUMNS} FROM "UserMcpServerConfig" c WHERE c.id = %s', (configId,)
    )
    if not rows:
        raise NotFound(f"config {configId!r} not found")
    return rows[0]


def _requireToolGroup(toolGroupId: Any) -> Plan[m.ToolGroup]:
    rows = yield Query(_TOOL_GROUP_SELECT + " WHERE g.id = %s", (toolGroupId,))
    if not rows:
        raise NotFound(f"tool group {toolGroupId!r} not found")
    return _toolGroups(rows)[0]


def _requireInstance(instanceId: Any) -> Plan[m.Instance]:
    rows = yield Query(
        f'SELECT {_INSTANCE_COLUMNS} FROM "UserMcpServerInstance" i WHERE i.id = %s',
        (instanceId,),
    )
    if not rows:
        raise NotFound(f"instance {instanceId!r} not found")
    return _instance(rows[0])


def _requireKeyHash(keyId: Any) -> Plan[Optional[str]]:
    rows = yield Query('SELECT "apiKeyHash" FROM "McpApiKey" WHERE id = %s', (keyId,))
    if not rows:
        raise NotFound(f"API key {keyId!r} not found")
    hashValue: Optional[str] = rows[0][0]
    return hashValue


# -- organizations -------------------------------------------------------------


@operation("admin", Mode.EXCLUSIVE)
def createOrganization(name: str) -> Plan[m.Organization]:
    """
    Create an organization with a unique name.
    """
    name = _text(name, "organization name")
    rows = yield Query('SELECT id FROM "Organization" WHERE name = %s', (name,))
    if rows:
        raise Conflict(f"an organization named {name!r} exists already")
    org = m.Organization(id=newId(), name=name, createdAt=m.utcnow())
    yield Query(
        'INSERT INTO "Organization" (id, name, "createdAt", "updatedAt") VALUES (%s, %s, %s, %s)',
        (org.id, org.name, org.createdAt, org.createdAt),
    )
    return org


@operation("admin", Mode.AUTOCOMMIT)
def listOrganizations() -> Plan[list[m.Organization]]:
    """
    Every organization, by name.
    """
    rows = yield Query('SELECT id, name, "createdAt" FROM "Organization"')
    return _byName([_organization(r) for r in rows])


@operation("admin", Mode.AUTOCOMMIT)
def getOrganization(orgId: str) -> Plan[m.Organization]:
    """
    One organization.
    """
    return (yield from _requireOrganization(orgId))


# -- servers -------------------------------------------------------------------


def _checkUrl(url: Any) -> str:
    url = _text(url, "url")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise InvalidInput(f"url must be an http:// or https:// URL, not {url!r}")
    return str(url)


@operation("admin", Mode.EXCLUSIVE)
def createServer(
    name: str,
    transportType: str,
    command: Optional[str],
    args: Sequence[str],
    url: Optional[str],
    envVars: Sequence[str],
    authType: str,
    organizationId: Optional[str],
) -> Plan[m.McpServer]:
    """
    Create a server definition with a unique name.
    """
    name = _text(name, "server name")
    transportType = _choice(transportType, m.TRANSPORT_TYPES, "transportType")
    authType = _choice(authType, m.AUTH_TYPES, "authType")
    argList = _strings(args, "args")
    names = _strings(envVars, "envVars")
    if transportType == m.STDIO:
        command = _text(command, "command (required for STDIO)")
        if url is not None:
            raise InvalidInput("a STDIO server has no url")
    else:
        url = _checkUrl(url)
        if command is not None:
            raise InvalidInput(f"a {transportType} server has no command")
        if argList:
            raise InvalidInput(f"a {transportType} server has no args")
    if organizationId is not None:
        yield from _requireOrganization(organizationId)
    rows = yield Query('SELECT id FROM "McpServer" WHERE name = %s', (name,))
    if rows:
        raise Conflict(f"a server named {name!r} exists already")
    server = m.McpServer(
        id=newId(),
        name=name,
        transportType=transportType,
        command=command,
        args=argList,
        url=url,
        envVars=names,
        authType=authType,
        organizationId=organizationId,
        createdAt=m.utcnow(),
    )
    yield _insertMany(
        "McpServer",
        (
            "id",
            "name",
            "transportType",
            "command",
            "args",
            "url",
            "envVars",
            "authType",
            "organizationId",
            "createdAt",
            "updatedAt",
        ),
        [
            (
                server.id,
                server.name,
                server.transportType,
                server.command,
                Array(server.args),
                server.url,
                Array(server.envVars),
                server.authType,
                server.organizationId,
                server.createdAt,
                server.createdAt,
            )
        ],
    )
    return server


@operation("admin", Mode.AUTOCOMMIT)
def listServers() -> Plan[list[m.McpServer]]:
    """
    Every server, by name.
    """
    rows = yield Query(f'SELECT {_SERVER_COLUMNS} FROM "McpServer" s')
    return _byName([_server(r) for r in rows])


@operation("admin", Mode.AUTOCOMMIT)
def getServer(serverId: str) -> Plan[m.McpServer]:
    """
    One server.
    """
    return (yield from _requireServer(serverId))


@operation("admin", Mode.EXCLUSIVE)
def deleteServer(serverId: str) -> Plan[None]:
    """
    Delete a server, its configs, its tools and their tool-group entries.
    """
    yield from _requireServer(serverId)
    yield Query(
        'DELETE FROM "UserToolGroupTool" WHERE "toolId" IN '
        '(SELECT id FROM "Tool" WHERE "mcpServerId" = %s) OR "userMcpServerConfigId" IN '
        '(SELECT id FROM "UserMcpServerConfig" WHERE "mcpServerId" = %s)',
        (serverId, serverId),
    )
    yield Query('DELETE FROM "UserMcpServerConfig" WHERE "mcpServerId" = %s', (serverId,))
    yield Query('DELETE FROM "Tool" WHERE "mcpServerId" = %s', (serverId,))
    yield Query('DELETE FROM "McpServer" WHERE id = %s', (serverId,))
    return None


# -- configs -------------------------------------------------------------------


@operation("admin", Mode.EXCLUSIVE)
def createConfig(
    serverId: str,
    name: str,
    description: Optional[str],
    envVars: Mapping[str, str],
    organizationId: str,
) -> Plan[m.ServerConfig]:
    """
    Create a config of a server for an organization; its name is unique in
    the organization.
    """
    name = _text(name, "config name")
    description = _optionalText(description, "description")
    env = _env(envVars)
    server = yield from _requireServer(serverId)
    yield from _requireOrganization(organizationId)
    if server.organizationId is not None and server.organizationId != organizationId:
        raise InvalidInput(f"server {server.name!r} belongs to another organization")
    rows = yield Query(
        'SELECT id FROM "UserMcpServerConfig" WHERE "organizationId" = %s AND name = %s',
        (organizationId, name),
    )
    if rows:
        raise Conflict(f"a config named {name!r} exists already in this organization")
    config = m.ServerConfig(
        id=newId(),
        name=name,
        description=description,
        envVars=env,
        mcpServerId=serverId,
        organizationId=organizationId,
        createdAt=m.utcnow(),
    )
    yield _insertMany(
        "UserMcpServerConfig",
        (
            "id",
            "name",
            "description",
            "envVars",
            "mcpServerId",
            "organizationId",
            "createdAt",
            "updatedAt",
        ),
        [
            (
                config.id,
                name,
                description,
                json.dumps(env),
                serverId,
                organizationId,
                config.createdAt,
                config.createdAt,
            )
        ],
    )
    return config


@operation("admin", Mode.AUTOCOMMIT)
def listConfigs(organizationId: Optional[str]) -> Plan[list[m.ServerConfig]]:
    """
    The configs of an organization (of all when C{None}), by name.
    """
    sql = f'SELECT {_CONFIG_COLUMNS} FROM "UserMcpServerConfig" c'
    params: tuple[Any, ...] = ()
    if organizationId is not None:
        sql += ' WHERE c."organizationId" = %s'
        params = (organizationId,)
    rows = yield Query(sql, params)
    return _byName([_config(r) for r in rows])


@operation("admin", Mode.AUTOCOMMIT)
def getConfig(configId: str) -> Plan[m.ServerConfig]:
    """
    One config.
    """
    row = yield from _requireConfigRow(configId)
    return _config(row)


@operation("admin", Mode.EXCLUSIVE)
def updateConfigEnv(configId: str, envVars: Mapping[str, str]) -> Plan[m.ServerConfig]:
    """
    Replace the environment values of a config.
    """
    env = _env(envVars)
    row = yield from _requireConfigRow(configId)
    yield Query(
        'UPDATE "UserMcpServerConfig" SET "envVars" = %s, "updatedAt" = %s WHERE id = %s',
        (json.dumps(env), m.utcnow(), configId),
    )
    return m.ServerConfig(
        id=row[0],
        name=row[1],
        description=row[2] or "",
        envVars=env,
        mcpServerId=row[4],
        organizationId=row[5],
        createdAt=requiredTimestamp(row[6]),
    )


@operation("admin", Mode.EXCLUSIVE)
def deleteConfig(configId: str) -> Plan[None]:
    """
    Delete a config and its tool-group entries.
    """
    yield from _requireConfigRow(configId)
    yield Query('DELETE FROM "UserToolGroupTool" WHERE "userMcpServerConfigId" = %s', (configId,))
    yield Query('DELETE FROM "UserMcpServerConfig" WHERE id = %s', (configId,))
    return None


# -- tools ---------------------------------------------------------------------


@operation("admin", Mode.EXCLUSIVE)
def syncTools(
    serverId: str, tools: Sequence[tuple[str, str, Mapping[str, Any]]]
) -> Plan[list[m.Tool]]:
    """
    Make the tools of a server match C{tools}: insert new names, update
    changed descriptions and schemas, keep the others.
    """
    wanted: dict[str, tuple[str, dict[str, Any]]] = {}
    for item in tools:
        try:
            name, description, schema = item
        except (TypeError, ValueError):
            raise InvalidInput("each tool must be (name, description, inputSchema)") from None
        name = _text(name, "tool name")
        description = _optionalText(description, f"description of tool {name!r}")
        if not isinstance(schema, Mapping):
            raise InvalidInput(f"inputSchema of tool {name!r} must be a JSON object")
        if name in wanted:
            raise InvalidInput(f"tool {name!r} is listed twice")
        wanted[name] = (description, dict(schema))
    yield from _requireServer(serverId)
    rows = yield Query(
        f'SELECT {_TOOL_COLUMNS} FROM "Tool" t WHERE t."mcpServerId" = %s', (serverId,)
    )
    existing = {t.name: t for t in (_tool(r) for r in rows)}
    now = m.utcnow()
    result = dict(existing)
    new = []
    for name, (description, schema) in wanted.items():
        old = existing.get(name)
        if old is None:
            tool = m.Tool(
                id=newId(),
                name=name,
                description=description,
                inputSchema=schema,
                mcpServerId=serverId,
            )
            new.append(tool)
            result[name] = tool
        elif old.description != description or old.inputSchema != schema:
            yield Query(
                'UPDATE "Tool" SET description = %s, "inputSchema" = %s, "updatedAt" = %s '
                "WHERE id = %s",
                (description, Json(schema), now, old.id),
            )
            result[name] = m.Tool(
                id=old.id,
                name=name,
                description=description,
                inputSchema=schema,
                mcpServerId=serverId,
            )
    for chunk in _chunks(new, ROWS_PER_INSERT):
        yield _insertMany(
            "Tool",
            (
                "id",
                "name",
                "description",
                "inputSchema",
                "isEnabled",
                "mcpServerId",
                "createdAt",
                "updatedAt",
            ),
            [
                (t.id, t.name, t.description, Json(t.inputSchema), True, serverId, now, now)
                for t in chunk
            ],
        )
    return _byName(list(result.values()))


@operation("admin", Mode.AUTOCOMMIT)
def listTools(serverId: str) -> Plan[list[m.Tool]]:
    """
    The tools of a server, by name.
    """
    rows = yield Query(
        f'SELECT s.id, {_TOOL_COLUMNS} FROM "McpServer" s '
        'LEFT JOIN "Tool" t ON t."mcpServerId" = s.id WHERE s.id = %s',
        (serverId,),
    )
    if not rows:
        raise NotFound(f"server {serverId!r} not found")
    return _byName([_tool(r[1:]) for r in rows if r[1] is not None])


# -- tool groups ---------------------------------------------------------------


def _resolveTools(organizationId: str, tools: Any) -> Plan[list[tuple[str, str]]]:
    """
    Check C{(configId, toolName)} pairs against the configs of an
    organization and the tools of their servers.

    @return: C{(configId, toolId)} pairs, without repeats, in order.
    """
    pairs: list[tuple[str, str]] = []
    for item in _pairs(tools):
        if item not in pairs:
            pairs.append(item)
    if not pairs:
        return []
    configIds = sorted({configId for configId, _ in pairs})
    rows = yield Query(
        'SELECT c.id, c.name, c."organizationId", t.id, t.name FROM "UserMcpServerConfig" c '
        'LEFT JOIN "Tool" t ON t."mcpServerId" = c."mcpServerId" '
        f"WHERE c.id IN ({_placeholders(len(configIds))})",
        tuple(configIds),
    )
    configs: dict[str, tuple[str, str, dict[str, str]]] = {}
    for configId, configName, orgId, toolId, toolName in rows:
        entry = configs.setdefault(configId, (configName, orgId, {}))
        if toolId is not None:
            entry[2][toolName] = toolId
    resolved = []
    for configId, toolName in pairs:
        if configId not in configs:
            raise NotFound(f"config {configId!r} not found")
        configName, orgId, toolIds = configs[configId]
        if orgId != organizationId:
            raise InvalidInput(
                f"config {configName!r} ({configId}) belongs to another organization"
            )
        if toolName not in toolIds:
            raise InvalidInput(
                f"tool {toolName!r} is not a tool of the server of config {configName!r} ({configId})"
            )
        resolved.append((configId, toolIds[toolName]))
    return resolved


def _pairs(tools: Any) -> list[tuple[str, str]]:
    if tools is None:
        return []
    if isinstance(tools, (str, bytes)) or not isinstance(tools, Iterable):
        raise InvalidInput("tools must be a list of (configId, toolName) pairs")
    out = []
    for item in tools:
        try:
            configId, toolName = item
        except (TypeError, ValueError):
            raise InvalidInput("tools must be a list of (configId, toolName) pairs") from None
        out.append((_text(configId, "configId"), _text(toolName, "tool name")))
    return out


def _insertGroupTools(
    toolGroupId: str, resolved: list[tuple[str, str]], now: datetime.datetime
) -> Plan[None]:
    for start in range(0, len(resolved), ROWS_PER_INSERT):
        chunk = resolved[start : start + ROWS_PER_INSERT]
        yield _insertMany(
            "UserToolGroupTool",
            ("toolGroupId", "userMcpServerConfigId", "toolId", "sortOrder", "createdAt"),
            [
                (toolGroupId, configId, toolId, start + index, now)
                for index, (configId, toolId) in enumerate(chunk)
            ],
        )
    return None


@operation("admin", Mode.EXCLUSIVE)
def createToolGroup(
    organizationId: str, name: str, description: Optional[str], tools: Sequence[tuple[str, str]]
) -> Plan[m.ToolGroup]:
    """
    Create a tool group with a whitelist; its name is unique in the
    organization.
    """
    name = _text(name, "tool group name")
    description = _optionalText(description, "description")
    yield from _requireOrganization(organizationId)
    rows = yield Query(
        'SELECT id FROM "UserToolGroup" WHERE "organizationId" = %s AND name = %s',
        (organizationId, name),
    )
    if rows:
        raise Conflict(f"a tool group named {name!r} exists already in this organization")
    resolved = yield from _resolveTools(organizationId, tools)
    groupId = newId()
    now = m.utcnow()
    yield Query(
        'INSERT INTO "UserToolGroup" (id, name, description, "isEnabled", "organizationId", '
        '"createdAt", "updatedAt") VALUES (%s, %s, %s, %s, %s, %s, %s)',
        (groupId, name, description, True, organizationId, now, now),
    )
    yield from _insertGroupTools(groupId, resolved, now)
    return (yield from _requireToolGroup(groupId))


@operation("admin", Mode.EXCLUSIVE)
def setToolGroupTools(toolGroupId: str, tools: Sequence[tuple[str, str]]) -> Plan[m.ToolGroup]:
    """
    Replace the whitelist of a tool group.
    """
    group = yield from _requireToolGroup(toolGroupId)
    resolved = yield from _resolveTools(group.organizationId, tools)
    now = m.utcnow()
    yield Query('DELETE FROM "UserToolGroupTool" WHERE "toolGroupId" = %s', (toolGroupId,))
    yield from _insertGroupTools(toolGroupId, resolved, now)
    yield Query('UPDATE "UserToolGroup" SET "updatedAt" = %s WHERE id = %s', (now, toolGroupId))
    return (yield from _requireToolGroup(toolGroupId))


@operation("admin", Mode.EXCLUSIVE)
def setToolGroupEnabled(toolGroupId: str, enabled: bool) -> Plan[m.ToolGroup]:
    """
    Enable or disable a tool group.
    """
    if not isinstance(enabled, bool):
        raise InvalidInput("enabled must be True or False")
    group = yield from _requireToolGroup(toolGroupId)
    yield Query(
        'UPDATE "UserToolGroup" SET "isEnabled" = %s, "updatedAt" = %s WHERE id = %s',
        (enabled, m.utcnow(), toolGroupId),
    )
    return m.ToolGroup(
        id=group.id,
        name=group.name,
        description=group.description,
        isEnabled=enabled,
        organizationId=group.organizationId,
        tools=group.tools,
        createdAt=group.createdAt,
    )


@operation("admin", Mode.AUTOCOMMIT)
def getToolGroup(toolGroupId: str) -> Plan[m.ToolGroup]:
    """
    One tool group with its whitelist.
    """
    return (yield from _requireToolGroup(toolGroupId))


@operation("admin", Mode.AUTOCOMMIT)
def listToolGroups(organizationId: Optional[str]) -> Plan[list[m.ToolGroup]]:
    """
    The tool groups of an organization (of all when C{None}), by name.
    """
    if organizationId is None:
        rows = yield Query(_TOOL_GROUP_SELECT)
    else:
        rows = yield Query(_TOOL_GROUP_SELECT + ' WHERE g."organizationId" = %s', (organizationId,))
    return _toolGroups(rows)


# -- instances -----------------------------------------------------------------


@operation("admin", Mode.EXCLUSIVE)
def createInstance(
    organizationId: str, name: str, description: Optional[str], toolGroupId: str, authType: str
) -> Plan[m.Instance]:
    """
    Create an instance serving a tool group; its name is unique among the
    live instances of the organization, and a tool group serves one
    instance only (deleted ones included, as in the origin).
    """
    name = _text(name, "instance name")
    description = _optionalText(description, "description")
    authType = _choice(authType, m.AUTH_TYPES, "authType")
    yield from _requireOrganization(organizationId)
    group = yield from _requireToolGroup(toolGroupId)
    if group.organizationId != organizationId:
        raise InvalidInput(f"tool group {group.name!r} belongs to another organization")
    rows = yield Query(
        'SELECT id, name, "deletedAt" FROM "UserMcpServerInstance" WHERE "toolGroupId" = %s',
        (toolGroupId,),
    )
    if rows:
        state = "deleted " if rows[0][2] is not None else ""
        raise Conflict(
            f"tool group {group.name!r} is used already by {state}instance {rows[0][1]!r} "
            f"({rows[0][0]})"
        )
    rows = yield Query(
        'SELECT id FROM "UserMcpServerInstance" '
        'WHERE "organizationId" = %s AND name = %s AND "deletedAt" IS NULL',
        (organizationId, name),
    )
    if rows:
        raise Conflict(f"an instance named {name!r} exists already in this organization")
    instance = m.Instance(
        id=newId(),
        name=name,
        description=description,
        toolGroupId=toolGroupId,
        authType=authType,
        organizationId=organizationId,
        createdAt=m.utcnow(),
    )
    yield _insertMany(
        "UserMcpServerInstance",
        (
            "id",
            "name",
            "description",
            "serverStatus",
            "serverType",
            "toolGroupId",
            "authType",
            "organizationId",
            "createdAt",
            "updatedAt",
        ),
        [
            (
                instance.id,
                name,
                description,
                "RUNNING",
                "CUSTOM",
                toolGroupId,
                authType,
                organizationId,
                instance.createdAt,
                instance.createdAt,
            )
        ],
    )
    return instance


@operation("admin", Mode.AUTOCOMMIT)
def getInstance(instanceId: str) -> Plan[m.Instance]:
    """
    One instance, deleted or not.
    """
    return (yield from _requireInstance(instanceId))


@operation("admin", Mode.AUTOCOMMIT)
def listInstances(organizationId: Optional[str], includeDeleted: bool) -> Plan[list[m.Instance]]:
    """
    The instances of an organization (of all when C{None}), by name.
    """
    sql = f'SELECT {_INSTANCE_COLUMNS} FROM "UserMcpServerInstance" i'
    conditions = []
    params: tuple[Any, ...] = ()
    if organizationId is not None:
        conditions.append('i."organizationId" = %s')
        params = (organizationId,)
    if not includeDeleted:
        conditions.append('i."deletedAt" IS NULL')
    if conditions:
        sql += " WHERE " + " AND ".join(conditions)
    rows = yield Query(sql, params)
    return _byName([_instance(r) for r in rows])


@operation("admin", Mode.EXCLUSIVE)
def deleteInstance(instanceId: str) -> Plan[list[str]]:
    """
    Soft-delete an instance (again: no change).

    @return: the hashes of its keys.
    """
    instance = yield from _requireInstance(instanceId)
    rows = yield Query(
        'SELECT "apiKeyHash" FROM "McpApiKey" WHERE "userMcpServerInstanceId" = %s', (instanceId,)
    )
    if instance.deletedAt is None:
        now = m.utcnow()
        yield Query(
            'UPDATE "UserMcpServerInstance" SET "deletedAt" = %s, "updatedAt" = %s WHERE id = %s',
            (now, now, instanceId),
        )
    return sorted(r[0] for r in rows if r[0] is not None)


# -- API keys ------------------------------------------------------------------


@operation("admin", Mode.EXCLUSIVE)
def createApiKey(
    instanceId: str,
    name: str,
    keyHash: str,
    display: str,
    expiresAt: Optional[datetime.datetime],
) -> Plan[m.ApiKey]:
    """
    Record a new key of a live instance, owned by the system user.
    """
    name = _text(name, "key name")
    display = _text(display, "display")
    keyHash = _text(keyHash, "keyHash")
    if len(keyHash) != 64 or any(c not in "0123456789abcdef" for c in keyHash):
        raise InvalidInput("keyHash must be a lowercase hex SHA-256 digest")
    expires = _when(expiresAt, "expiresAt")
    instance = yield from _requireInstance(instanceId)
    if instance.deletedAt is not None:
        raise InvalidInput(f"instance {instance.name!r} ({instanceId}) is deleted")
    rows = yield Query('SELECT id FROM "User" WHERE id = %s', (SYSTEM_USER_ID,))
    if not rows:
        raise SchemaError(f'the "User" row {SYSTEM_USER_ID!r}, owner of the keys, is missing')
    rows = yield Query(
        'SELECT "apiKeyHash" = %s FROM "McpApiKey" WHERE "apiKeyHash" = %s OR "apiKey" = %s',
        (keyHash, keyHash, display),
    )
    if any(flag(r[0]) for r in rows):
        raise Conflict("a key with this hash exists already")
    if rows:
        raise Conflict(f"a key with the display form {display!r} exists already: make a new key")
    key = m.ApiKey(
        id=newId(),
        name=name,
        display=display,
        instanceId=instanceId,
        isActive=True,
        expiresAt=expires,
        lastUsedAt=None,
        createdAt=m.utcnow(),
    )
    yield _insertMany(
        "McpApiKey",
        (
            "id",
            "name",
            "apiKey",
            "apiKeyHash",
            "isActive",
            "expiresAt",
            "userId",
            "userMcpServerInstanceId",
            "createdAt",
            "updatedAt",
        ),
        [
            (
                key.id,
                name,
                display,
                keyHash,
                True,
                expires,
                SYSTEM_USER_ID,
                instanceId,
                key.createdAt,
                key.createdAt,
            )
        ],
    )
    return key


@operation("admin", Mode.AUTOCOMMIT)
def listApiKeys(instanceId: Optional[str]) -> Plan[list[m.ApiKey]]:
    """
    The keys of an instance (of all when C{None}), oldest first.
    """
    sql = f'SELECT {_KEY_COLUMNS} FROM "McpApiKey" k'
    params: tuple[Any, ...] = ()
    if instanceId is not None:
        sql += ' WHERE k."userMcpServerInstanceId" = %s'
        params = (instanceId,)
    rows = yield Query(sql, params)
    keys = [_apiKey(r) for r in rows]
    keys.sort(key=lambda k: (k.createdAt, k.id))
    return keys


@operation("admin", Mode.EXCLUSIVE)
def revokeApiKey(keyId: str) -> Plan[Optional[str]]:
    """
    Deactivate a key.

    @return: its hash (C{None} for an origin key without one).
    """
    keyHash = yield from _requireKeyHash(keyId)
    yield Query(
        'UPDATE "McpApiKey" SET "isActive" = %s, "updatedAt" = %s WHERE id = %s',
        (False, m.utcnow(), keyId),
    )
    return keyHash


@operation("admin", Mode.EXCLUSIVE)
def setApiKeyExpiry(keyId: str, expiresAt: Optional[datetime.datetime]) -> Plan[Optional[str]]:
    """
    Set or clear the expiry of a key.

    @return: its hash (C{None} for an origin key without one).
    """
    expires = _when(expiresAt, "expiresAt")
    keyHash = yield from _requireKeyHash(keyId)
    yield Query(
        'UPDATE "McpApiKey" SET "expiresAt" = %s, "updatedAt" = %s WHERE id = %s',
        (expires, m.utcnow(), keyId),
    )
    return keyHash
