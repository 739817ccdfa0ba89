"""
The database schema of mcp-proxy, as versioned migrations.

Table and column names are the origin's (Prisma model and field names,
quoted, camelCase), so that mcp-proxy can use a database created by the
origin as it is, and the origin's tools can read mcp-proxy's.  Each
migration has one SQL text per dialect; statements are separated by a
semicolon at the end of a line.

In SQLite, arrays are stored as JSON text, enums as text with a C{CHECK},
booleans as integers and timestamps as C{"YYYY-MM-DD HH:MM:SS.mmm"} text
(naive UTC, which sorts as it compares).
"""

from __future__ import annotations

import re
from typing import Optional

from attrs import frozen

MIGRATIONS_TABLE = "mcpproxy_schema_migrations"

#: The "User" row that owns every API key created by mcp-proxy.
SYSTEM_USER_ID = "mcp-proxy"

#: The values of the origin's PostgreSQL enum types.
ENUMS: dict[str, tuple[str, ...]] = {
    "TransportType": ("STDIO", "SSE", "STREAMABLE_HTTPS"),
    "AuthType": ("NONE", "API_KEY", "OAUTH", "CLOUD_RUN_IAM"),
    "ServerStatus": ("RUNNING", "STOPPED", "ERROR", "PENDING"),
    "ServerType": ("CUSTOM", "OFFICIAL"),
    "McpServerVisibility": ("PRIVATE", "ORGANIZATION", "PUBLIC"),
}


@frozen
class Migration:
    """
    One schema change.

    @ivar version: its name, recorded in L{MIGRATIONS_TABLE} once applied.
    @ivar sqlite: the SQL for SQLite.
    @ivar postgresql: the SQL for PostgreSQL.
    """

    version: str
    sqlite: str
    postgresql: str

    def statements(self, dialect: str) -> list[str]:
        """
        The statements of this migration for C{dialect} (C{"sqlite"} or
        C{"postgresql"}), one by one.
        """
        return splitStatements(self.sqlite if dialect == "sqlite" else self.postgresql)


_DOLLAR_QUOTE = re.compile(r"\$(?:[A-Za-z_][A-Za-z0-9_]*)?\$")


def splitStatements(sql: str) -> list[str]:
    """
    Split SQL text on semicolons that end a line, dropping comment lines
    and empty pieces.  A semicolon inside a dollar-quoted body (C{$$ ...
    $$}, C{$fn$ ... $fn$}: a PL/pgSQL function) does not split.
    """
    pieces: list[str] = []
    current: list[str] = []
    quote: Optional[str] = None
    for line in sql.splitlines():
        if quote is None and line.strip().startswith("--"):
            continue
        current.append(line)
        for match in _DOLLAR_QUOTE.finditer(line):
            if quote is None:
                quote = match.group(0)
            elif match.group(0) == quote:
                quote = None
        if quote is None and line.rstrip().endswith(";"):
            pieces.append("\n".join(current))
            current = []
    pieces.append("\n".join(current))
    out = []
    for piece in pieces:
        text = piece.strip().rstrip(";").strip()
        if text:
            out.append(text)
    return out


def _check(column: str, enum: str) -> str:
    values = ", ".join(f"'{v}'" for v in ENUMS[enum])
    return f'CHECK ("{column}" IN ({values}))'


MIGRATIONS_TABLE_SQL = {
    "sqlite": (
        f"CREATE TABLE IF NOT EXISTS {MIGRATIONS_TABLE} ("
        'version TEXT PRIMARY KEY, "appliedAt" TEXT NOT NULL)'
    ),
    "postgresql": (
        f"CREATE TABLE IF NOT EXISTS {MIGRATIONS_TABLE} ("
        'version TEXT PRIMARY KEY, "appliedAt" TIMESTAMP(3) NOT NULL)'
    ),
}

_SQLITE_NOW = "(strftime('%Y-%m-%d %H:%M:%f', 'now'))"

_INITIAL_POSTGRESQL = f"""
CREATE TYPE "TransportType" AS ENUM ('STDIO', 'SSE', 'STREAMABLE_HTTPS');
CREATE TYPE "AuthType" AS ENUM ('NONE', 'API_KEY', 'OAUTH', 'CLOUD_RUN_IAM');
CREATE TYPE "ServerStatus" AS ENUM ('RUNNING', 'STOPPED', 'ERROR', 'PENDING');
CREATE TYPE "ServerType" AS ENUM ('CUSTOM', 'OFFICIAL');
CREATE TYPE "McpServerVisibility" AS ENUM ('PRIVATE', 'ORGANIZATION', 'PUBLIC');

CREATE TABLE "User" (
    "id" TEXT NOT NULL,
    "name" TEXT,
    "createdAt" TIMESTAMP(3) NOT NULL DEFAULT CURRENT_TIMESTAMP,
    "updatedAt" TIMESTAMP(3) NOT NULL,
    CONSTRAINT "User_pkey" PRIMARY KEY ("id")
);

CREATE TABLE "Organization" (
    "id" TEXT NOT NULL,
    "name" TEXT NOT NULL,
    "createdAt" TIMESTAMP(3) NOT NULL DEFAULT CURRENT_TIMESTAMP,
    "updatedAt" TIMESTAMP(3) NOT NULL,
    CONSTRAINT "Organization_pkey" PRIMARY KEY ("id")
);

CREATE TABLE "McpServer" (
    "id" TEXT NOT NULL,
    "name" TEXT NOT NULL,
    "description" TEXT NOT NULL DEFAULT '',
    "tags" TEXT[] DEFAULT ARRAY[]::TEXT[],
    "iconPath" TEXT,
    "transportType" "TransportType" NOT NULL DEFAULT 'STDIO',
    "command" TEXT,
    "args" TEXT[] DEFAULT ARRAY[]::TEXT[],
    "url" TEXT,
    "envVars" TEXT[] DEFAULT ARRAY[]::TEXT[],
    "authType" "AuthType" NOT NULL DEFAULT 'NONE',
    "oauthProvider" VARCHAR(50),
    "oauthScopes" TEXT[] DEFAULT ARRAY[]::TEXT[],
    "serverType" "ServerType" NOT NULL DEFAULT 'CUSTOM',
    "createdBy" TEXT,
    "visibility" "McpServerVisibility" NOT NULL DEFAULT 'PRIVATE',
    "organizationId" TEXT,
    "isPublic" BOOLEAN NOT NULL DEFAULT false,
    "createdAt" TIMESTAMP(3) NOT NULL DEFAULT CURRENT_TIMESTAMP,
    "updatedAt" TIMESTAMP(3) NOT NULL,
    CONSTRAINT "McpServer_pkey" PRIMARY KEY ("id")
);

CREATE TABLE "Tool" (
    "id" TEXT NOT NULL,
    "name" TEXT NOT NULL,
    "description" TEXT NOT NULL DEFAULT '',
    "inputSchema" JSONB NOT NULL,
    "isEnabled" BOOLEAN NOT NULL DEFAULT true,
    "mcpServerId" TEXT NOT NULL,
    "createdAt" TIMESTAMP(3) NOT NULL DEFAULT CURRENT_TIMESTAMP,
    "updatedAt" TIMESTAMP(3) NOT NULL,
    CONSTRAINT "Tool_pkey" PRIMARY KEY ("id")
);

CREATE TABLE "UserMcpServerConfig" (
    "id" TEXT NOT NULL,
    "name" TEXT NOT NULL,
    "description" TEXT NOT NULL DEFAULT '',
    "envVars" TEXT NOT NULL,
    "oauthConnection" TEXT,
    "mcpServerId" TEXT NOT NULL,
    "organizationId" TEXT NOT NULL,
    "createdAt" TIMESTAMP(3) NOT NULL DEFAULT CURRENT_TIMESTAMP,
    "updatedAt" TIMESTAMP(3) NOT NULL,
    CONSTRAINT "UserMcpServerConfig_pkey" PRIMARY KEY ("id")
);

CREATE TABLE "UserToolGroup" (
    "id" TEXT NOT NULL,
    "name" TEXT NOT NULL,
    "description" TEXT NOT NULL DEFAULT '',
    "isEnabled" BOOLEAN NOT NULL DEFAULT true,
    "organizationId" TEXT NOT NULL,
    "createdAt" TIMESTAMP(3) NOT NULL DEFAULT CURRENT_TIMESTAMP,
    "updatedAt" TIMESTAMP(3) NOT NULL,
    CONSTRAINT "UserToolGroup_pkey" PRIMARY KEY ("id")
);

CREATE TABLE "UserToolGroupTool" (
    "toolGroupId" TEXT NOT NULL,
    "userMcpServerConfigId" TEXT NOT NULL,
    "toolId" TEXT NOT NULL,
    "sortOrder" INTEGER NOT NULL DEFAULT 0,
    "createdAt" TIMESTAMP(3) NOT NULL DEFAULT CURRENT_TIMESTAMP,
    CONSTRAINT "UserToolGroupTool_pkey"
        PRIMARY KEY ("toolGroupId", "userMcpServerConfigId", "toolId")
);

CREATE TABLE "UserMcpServerInstance" (
    "id" TEXT NOT NULL,
    "name" TEXT NOT NULL,
    "description" TEXT NOT NULL DEFAULT '',
    "iconPath" TEXT,
    "serverStatus" "ServerStatus" NOT NULL DEFAULT 'RUNNING',
    "serverType" "ServerType" NOT NULL DEFAULT 'CUSTOM',
    "toolGroupId" TEXT NOT NULL,
    "authType" "AuthType" NOT NULL DEFAULT 'API_KEY',
    "organizationId" TEXT NOT NULL,
    "displayOrder" INTEGER NOT NULL DEFAULT 0,
    "createdAt" TIMESTAMP(3) NOT NULL DEFAULT CURRENT_TIMESTAMP,
    "updatedAt" TIMESTAMP(3) NOT NULL,
    "deletedAt" TIMESTAMP(3),
    CONSTRAINT "UserMcpServerInstance_pkey" PRIMARY KEY ("id")
);

CREATE TABLE "McpApiKey" (
    "id" TEXT NOT NULL,
    "name" TEXT NOT NULL,
    "apiKey" TEXT NOT NULL,
    "apiKeyHash" TEXT,
    "isActive" BOOLEAN NOT NULL DEFAULT true,
    "lastUsedAt" TIMESTAMP(3),
    "expiresAt" TIMESTAMP(3),
    "scopes" TEXT[] DEFAULT ARRAY[]::TEXT[],
    "userId" TEXT NOT NULL,
    "userMcpServerInstanceId" TEXT NOT NULL,
    "createdAt" TIMESTAMP(3) NOT NULL DEFAULT CURRENT_TIMESTAMP,
    "updatedAt" TIMESTAMP(3) NOT NULL,
    CONSTRAINT "McpApiKey_pkey" PRIMARY KEY ("id")
);

CREATE TABLE "McpServerRequestLog" (
    "id" TEXT NOT NULL,
    "mcpServerInstanceId" TEXT NOT NULL,
    "toolName" TEXT NOT NULL,
    "transportType" "TransportType" NOT NULL,
    "method" TEXT NOT NULL,
    "responseStatus" TEXT NOT NULL,
    "durationMs" INTEGER NOT NULL,
    "errorMessage" TEXT,
    "errorCode" TEXT,
    "inputBytes" INTEGER,
    "outputBytes" INTEGER,
    "organizationId" TEXT NOT NULL,
    "userAgent" TEXT,
    "createdAt" TIMESTAMP(3) NOT NULL DEFAULT CURRENT_TIMESTAMP,
    CONSTRAINT "McpServerRequestLog_pkey" PRIMARY KEY ("id")
);

CREATE TABLE "McpServerRequestData" (
    "id" TEXT NOT NULL,
    "requestLogId" TEXT NOT NULL,
    "inputDataCompressed" BYTEA NOT NULL,
    "outputDataCompressed" BYTEA NOT NULL,
    "originalInputSize" INTEGER NOT NULL,
    "originalOutputSize" INTEGER NOT NULL,
    "compressedInputSize" INTEGER NOT NULL,
    "compressedOutputSize" INTEGER NOT NULL,
    "compressionRatio" DOUBLE PRECISION NOT NULL,
    "createdAt" TIMESTAMP(3) NOT NULL DEFAULT CURRENT_TIMESTAMP,
    CONSTRAINT "McpServerRequestData_pkey" PRIMARY KEY ("id")
);

CREATE UNIQUE INDEX "Tool_mcpServerId_name_key" ON "Tool"("mcpServerId", "name");
CREATE UNIQUE INDEX "UserMcpServerInstance_toolGroupId_key"
    ON "UserMcpServerInstance"("toolGroupId");
CREATE INDEX "UserMcpServerInstance_deletedAt_idx" ON "UserMcpServerInstance"("deletedAt");
CREATE INDEX "UserMcpServerInstance_organizationId_idx"
    ON "UserMcpServerInstance"("organizationId");
CREATE UNIQUE INDEX "McpApiKey_apiKey_key" ON "McpApiKey"("apiKey");
CREATE UNIQUE INDEX "McpApiKey_apiKeyHash_key" ON "McpApiKey"("apiKeyHash");
CREATE INDEX "McpApiKey_userId_idx" ON "McpApiKey"("userId");
CREATE INDEX "McpApiKey_userMcpServerInstanceId_idx" ON "McpApiKey"("userMcpServerInstanceId");
CREATE INDEX "McpApiKey_apiKeyHash_idx" ON "McpApiKey"("apiKeyHash");
CREATE INDEX "McpServerRequestLog_organizationId_idx" ON "McpServerRequestLog"("organizationId");
CREATE INDEX "McpServerRequestLog_mcpServerInstanceId_createdAt_idx"
    ON "McpServerRequestLog"("mcpServerInstanceId", "createdAt");
CREATE UNIQUE INDEX "McpServerRequestData_requestLogId_key"
    ON "McpServerRequestData"("requestLogId");

ALTER TABLE "McpServer" ADD CONSTRAINT "McpServer_organizationId_fkey"
    FOREIGN KEY ("organizationId") REFERENCES "Organization"("id")
    ON DELETE SET NULL ON UPDATE CASCADE;
ALTER TABLE "Tool" ADD CONSTRAINT "Tool_mcpServerId_fkey"
    FOREIGN KEY ("mcpServerId") REFERENCES "McpServer"("id")
    ON DELETE RESTRICT ON UPDATE CASCADE;
ALTER TABLE "UserMcpServerConfig" ADD CONSTRAINT "UserMcpServerConfig_mcpServerId_fkey"
    FOREIGN KEY ("mcpServerId") REFERENCES "McpServer"("id")
    ON DELETE RESTRICT ON UPDATE CASCADE;
ALTER TABLE "UserMcpServerConfig" ADD CONSTRAINT "UserMcpServerConfig_organizationId_fkey"
    FOREIGN KEY ("organizationId") REFERENCES "Organization"("id")
    ON DELETE RESTRICT ON UPDATE CASCADE;
ALTER TABLE "UserToolGroup" ADD CONSTRAINT "UserToolGroup_organizationId_fkey"
    FOREIGN KEY ("organizationId") REFERENCES "Organization"("id")
    ON DELETE RESTRICT ON UPDATE CASCADE;
ALTER TABLE "UserToolGroupTool" ADD CONSTRAINT "UserToolGroupTool_toolGroupId_fkey"
    FOREIGN KEY ("toolGroupId") REFERENCES "UserToolGroup"("id")
    ON DELETE CASCADE ON UPDATE CASCADE;
ALTER TABLE "UserToolGroupTool" ADD CONSTRAINT "UserToolGroupTool_userMcpServerConfigId_fkey"
    FOREIGN KEY ("userMcpServerConfigId") REFERENCES "UserMcpServerConfig"("id")
    ON DELETE CASCADE ON UPDATE CASCADE;
ALTER TABLE "UserToolGroupTool" ADD CONSTRAINT "UserToolGroupTool_toolId_fkey"
    FOREIGN KEY ("toolId") REFERENCES "Tool"("id")
    ON DELETE CASCADE ON UPDATE CASCADE;
ALTER TABLE "UserMcpServerInstance" ADD CONSTRAINT "UserMcpServerInstance_toolGroupId_fkey"
    FOREIGN KEY ("toolGroupId") REFERENCES "UserToolGroup"("id")
    ON DELETE RESTRICT ON UPDATE CASCADE;
ALTER TABLE "UserMcpServerInstance" ADD CONSTRAINT "UserMcpServerInstance_organizationId_fkey"
    FOREIGN KEY ("organizationId") REFERENCES "Organization"("id")
    ON DELETE RESTRICT ON UPDATE CASCADE;
ALTER TABLE "McpApiKey" ADD CONSTRAINT "McpApiKey_userId_fkey"
    FOREIGN KEY ("userId") REFERENCES "User"("id")
    ON DELETE CASCADE ON UPDATE CASCADE;
ALTER TABLE "McpApiKey" ADD CONSTRAINT "McpApiKey_userMcpServerInstanceId_fkey"
    FOREIGN KEY ("userMcpServerInstanceId") REFERENCES "UserMcpServerInstance"("id")
    ON DELETE CASCADE ON UPDATE CASCADE;
ALTER TABLE "McpServerRequestLog" ADD CONSTRAINT "McpServerRequestLog_mcpServerInstanceId_fkey"
    FOREIGN KEY ("mcpServerInstanceId") REFERENCES "UserMcpServerInstance"("id")
    ON DELETE RESTRICT ON UPDATE CASCADE;
ALTER TABLE "McpServerRequestLog" ADD CONSTRAINT "McpServerRequestLog_organizationId_fkey"
    FOREIGN KEY ("organizationId") REFERENCES "Organization"("id")
    ON DELETE RESTRICT ON UPDATE CASCADE;
ALTER TABLE "McpServerRequestData" ADD CONSTRAINT "McpServerRequestData_requestLogId_fkey"
    FOREIGN KEY ("requestLogId") REFERENCES "McpServerRequestLog"("id")
    ON DELETE CASCADE ON UPDATE CASCADE;

INSERT INTO "User" ("id", "name", "createdAt", "updatedAt")
    VALUES ('{SYSTEM_USER_ID}', 'mcp-proxy',
            CURRENT_TIMESTAMP AT TIME ZONE 'UTC', CURRENT_TIMESTAMP AT TIME ZONE 'UTC');
"""

_INITIAL_SQLITE = f"""
CREATE TABLE "User" (
    "id" TEXT NOT NULL PRIMARY KEY,
    "name" TEXT,
    "createdAt" TEXT NOT NULL DEFAULT {_SQLITE_NOW},
    "updatedAt" TEXT NOT NULL
);

CREATE TABLE "Organization" (
    "id" TEXT NOT NULL PRIMARY KEY,
    "name" TEXT NOT NULL,
    "createdAt" TEXT NOT NULL DEFAULT {_SQLITE_NOW},
    "updatedAt" TEXT NOT NULL
);

CREATE TABLE "McpServer" (
    "id" TEXT NOT NULL PRIMARY KEY,
    "name" TEXT NOT NULL,
    "description" TEXT NOT NULL DEFAULT '',
    "tags" TEXT NOT NULL DEFAULT '[]',
    "iconPath" TEXT,
    "transportType" TEXT NOT NULL DEFAULT 'STDIO' {_check("transportType", "TransportType")},
    "command" TEXT,
    "args" TEXT NOT NULL DEFAULT '[]',
    "url" TEXT,
    "envVars" TEXT NOT NULL DEFAULT '[]',
    "authType" TEXT NOT NULL DEFAULT 'NONE' {_check("authType", "AuthType")},
    "oauthProvider" TEXT,
    "oauthScopes" TEXT NOT NULL DEFAULT '[]',
    "serverType" TEXT NOT NULL DEFAULT 'CUSTOM' {_check("serverType", "ServerType")},
    "createdBy" TEXT,
    "visibility" TEXT NOT NULL DEFAULT 'PRIVATE' {_check("visibility", "McpServerVisibility")},
    "organizationId" TEXT REFERENCES "Organization"("id") ON DELETE SET NULL ON UPDATE CASCADE,
    "isPublic" INTEGER NOT NULL DEFAULT 0,
    "createdAt" TEXT NOT NULL DEFAULT {_SQLITE_NOW},
    "updatedAt" TEXT NOT NULL
);

CREATE TABLE "Tool" (
    "id" TEXT NOT NULL PRIMARY KEY,
    "name" TEXT NOT NULL,
    "description" TEXT NOT NULL DEFAULT '',
    "inputSchema" TEXT NOT NULL,
    "isEnabled" INTEGER NOT NULL DEFAULT 1,
    "mcpServerId" TEXT NOT NULL
        REFERENCES "McpServer"("id") ON DELETE RESTRICT ON UPDATE CASCADE,
    "createdAt" TEXT NOT NULL DEFAULT {_SQLITE_NOW},
    "updatedAt" TEXT NOT NULL
);

CREATE TABLE "UserMcpServerConfig" (
    "id" TEXT NOT NULL PRIMARY KEY,
    "name" TEXT NOT NULL,
    "description" TEXT NOT NULL DEFAULT '',
    "envVars" TEXT NOT NULL,
    "oauthConnection" TEXT,
    "mcpServerId" TEXT NOT NULL
        REFERENCES "McpServer"("id") ON DELETE RESTRICT ON UPDATE CASCADE,
    "organizationId" TEXT NOT NULL
        REFERENCES "Organization"("id") ON DELETE RESTRICT ON UPDATE CASCADE,
    "createdAt" TEXT NOT NULL DEFAULT {_SQLITE_NOW},
    "updatedAt" TEXT NOT NULL
);

CREATE TABLE "UserToolGroup" (
    "id" TEXT NOT NULL PRIMARY KEY,
    "name" TEXT NOT NULL,
    "description" TEXT NOT NULL DEFAULT '',
    "isEnabled" INTEGER NOT NULL DEFAULT 1,
    "organizationId" TEXT NOT NULL
        REFERENCES "Organization"("id") ON DELETE RESTRICT ON UPDATE CASCADE,
    "createdAt" TEXT NOT NULL DEFAULT {_SQLITE_NOW},
    "updatedAt" TEXT NOT NULL
);

CREATE TABLE "UserToolGroupTool" (
    "toolGroupId" TEXT NOT NULL
        REFERENCES "UserToolGroup"("id") ON DELETE CASCADE ON UPDATE CASCADE,
    "userMcpServerConfigId" TEXT NOT NULL
        REFERENCES "UserMcpServerConfig"("id") ON DELETE CASCADE ON UPDATE CASCADE,
    "toolId" TEXT NOT NULL REFERENCES "Tool"("id") ON DELETE CASCADE ON UPDATE CASCADE,
    "sortOrder" INTEGER NOT NULL DEFAULT 0,
    "createdAt" TEXT NOT NULL DEFAULT {_SQLITE_NOW},
    PRIMARY KEY ("toolGroupId", "userMcpServerConfigId", "toolId")
);

CREATE TABLE "UserMcpServerInstance" (
    "id" TEXT NOT NULL PRIMARY KEY,
    "name" TEXT NOT NULL,
    "description" TEXT NOT NULL DEFAULT '',
    "iconPath" TEXT,
    "serverStatus" TEXT NOT NULL DEFAULT 'RUNNING' {_check("serverStatus", "ServerStatus")},
    "serverType" TEXT NOT NULL DEFAULT 'CUSTOM' {_check("serverType", "ServerType")},
    "toolGroupId" TEXT NOT NULL
        REFERENCES "UserToolGroup"("id") ON DELETE RESTRICT ON UPDATE CASCADE,
    "authType" TEXT NOT NULL DEFAULT 'API_KEY' {_check("authType", "AuthType")},
    "organizationId" TEXT NOT NULL
        REFERENCES "Organization"("id") ON DELETE RESTRICT ON UPDATE CASCADE,
    "displayOrder" INTEGER NOT NULL DEFAULT 0,
    "createdAt" TEXT NOT NULL DEFAULT {_SQLITE_NOW},
    "updatedAt" TEXT NOT NULL,
    "deletedAt" TEXT
);

CREATE TABLE "McpApiKey" (
    "id" TEXT NOT NULL PRIMARY KEY,
    "name" TEXT NOT NULL,
    "apiKey" TEXT NOT NULL,
    "apiKeyHash" TEXT,
    "isActive" INTEGER NOT NULL DEFAULT 1,
    "lastUsedAt" TEXT,
    "expiresAt" TEXT,
    "scopes" TEXT NOT NULL DEFAULT '[]',
    "userId" TEXT NOT NULL REFERENCES "User"("id") ON DELETE CASCADE ON UPDATE CASCADE,
    "userMcpServerInstanceId" TEXT NOT NULL
        REFERENCES "UserMcpServerInstance"("id") ON DELETE CASCADE ON UPDATE CASCADE,
    "createdAt" TEXT NOT NULL DEFAULT {_SQLITE_NOW},
    "updatedAt" TEXT NOT NULL
);

CREATE TABLE "McpServerRequestLog" (
    "id" TEXT NOT NULL PRIMARY KEY,
    "mcpServerInstanceId" TEXT NOT NULL
        REFERENCES "UserMcpServerInstance"("id") ON DELETE RESTRICT ON UPDATE CASCADE,
    "toolName" TEXT NOT NULL,
    "transportType" TEXT NOT NULL {_check("transportType", "TransportType")},
    "method" TEXT NOT NULL,
    "responseStatus" TEXT NOT NULL,
    "durationMs" INTEGER NOT NULL,
    "errorMessage" TEXT,
    "errorCode" TEXT,
    "inputBytes" INTEGER,
    "outputBytes" INTEGER,
    "organizationId" TEXT NOT NULL
        REFERENCES "Organization"("id") ON DELETE RESTRICT ON UPDATE CASCADE,
    "userAgent" TEXT,
    "createdAt" TEXT NOT NULL DEFAULT {_SQLITE_NOW}
);

CREATE TABLE "McpServerRequestData" (
    "id" TEXT NOT NULL PRIMARY KEY,
    "requestLogId" TEXT NOT NULL
        REFERENCES "McpServerRequestLog"("id") ON DELETE CASCADE ON UPDATE CASCADE,
    "inputDataCompressed" BLOB NOT NULL,
    "outputDataCompressed" BLOB NOT NULL,
    "originalInputSize" INTEGER NOT NULL,
    "originalOutputSize" INTEGER NOT NULL,
    "compressedInputSize" INTEGER NOT NULL,
    "compressedOutputSize" INTEGER NOT NULL,
    "compressionRatio" REAL NOT NULL,
    "createdAt" TEXT NOT NULL DEFAULT {_SQLITE_NOW}
);

CREATE UNIQUE INDEX "Tool_mcpServerId_name_key" ON "Tool"("mcpServerId", "name");
CREATE UNIQUE INDEX "UserMcpServerInstance_toolGroupId_key"
    ON "UserMcpServerInstance"("toolGroupId");
CREATE INDEX "UserMcpServerInstance_deletedAt_idx" ON "UserMcpServerInstance"("deletedAt");
CREATE INDEX "UserMcpServerInstance_organizationId_idx"
    ON "UserMcpServerInstance"("organizationId");
CREATE UNIQUE INDEX "McpApiKey_apiKey_key" ON "McpApiKey"("apiKey");
CREATE UNIQUE INDEX "McpApiKey_apiKeyHash_key" ON "McpApiKey"("apiKeyHash");
CREATE INDEX "McpApiKey_userId_idx" ON "McpApiKey"("userId");
CREATE INDEX "McpApiKey_userMcpServerInstanceId_idx" ON "McpApiKey"("userMcpServerInstanceId");
CREATE INDEX "McpApiKey_apiKeyHash_idx" ON "McpApiKey"("apiKeyHash");
CREATE INDEX "McpServerRequestLog_organizationId_idx" ON "McpServerRequestLog"("organizationId");
CREATE INDEX "McpServerRequestLog_mcpServerInstanceId_createdAt_idx"
    ON "McpServerRequestLog"("mcpServerInstanceId", "createdAt");
CREATE UNIQUE INDEX "McpServerRequestData_requestLogId_key"
    ON "McpServerRequestData"("requestLogId");

INSERT INTO "User" ("id", "name", "createdAt", "updatedAt")
    VALUES ('{SYSTEM_USER_ID}', 'mcp-proxy', {_SQLITE_NOW}, {_SQLITE_NOW});
"""

#: The PostgreSQL channel of change notifications (see L{mcp_proxy.changes}).
CHANGE_CHANNEL = "mcpproxy_invalidate"

# Triggers that tell every listening proxy what a committed change makes
# stale, with pg_notify(CHANGE_CHANNEL, <JSON>), whoever wrote the change.
# The payloads are those of mcp_proxy.changes: {"t": "key", "keyId",
# "keyHash", "end"}, {"t": "instance", "instanceId", "keyHashes", "end"} and
# {"t": "all"}; "end" says whether sessions end.  UPDATE triggers fire only
# when a column the proxy caches changes (not on "lastUsedAt").  PostgreSQL
# delivers a transaction's notifications at its commit, identical ones once.
_CHANGE_NOTIFICATIONS_POSTGRESQL = """
CREATE OR REPLACE FUNCTION mcpproxy_notify_all() RETURNS trigger
LANGUAGE plpgsql AS $fn$
BEGIN
    PERFORM pg_notify('mcpproxy_invalidate', '{"t": "all"}');
    RETURN NULL;
END
$fn$;

CREATE OR REPLACE FUNCTION mcpproxy_notify_key() RETURNS trigger
LANGUAGE plpgsql AS $fn$
DECLARE
    payload jsonb;
BEGIN
    IF TG_OP = 'INSERT' THEN
        payload := jsonb_build_object(
            't', 'key', 'keyId', NEW.id, 'keyHash', NEW."apiKeyHash", 'end', false);
    ELSIF TG_OP = 'DELETE' THEN
        payload := jsonb_build_object(
            't', 'key', 'keyId', OLD.id, 'keyHash', OLD."apiKeyHash", 'end', true);
    ELSE
        payload := jsonb_build_object(
            't', 'key', 'keyId', NEW.id, 'keyHash', NEW."apiKeyHash",
            'end', NOT NEW."isActive" OR NEW."expiresAt" IS NOT NULL
                OR NEW."apiKeyHash" IS DISTINCT FROM OLD."apiKeyHash"
                OR NEW."userMcpServerInstanceId" IS DISTINCT FROM OLD."userMcpServerInstanceId"
                OR NEW.id IS DISTINCT FROM OLD.id);
        IF NEW."apiKeyHash" IS DISTINCT FROM OLD."apiKeyHash" THEN
            payload := payload || jsonb_build_object('oldKeyHash', OLD."apiKeyHash");
        END IF;
        IF NEW.id IS DISTINCT FROM OLD.id THEN
            payload := payload || jsonb_build_object('oldKeyId', OLD.id);
        END IF;
    END IF;
    PERFORM pg_notify('mcpproxy_invalidate', payload::text);
    RETURN NULL;
END
$fn$;

CREATE OR REPLACE FUNCTION mcpproxy_notify_instance(
    instance_id text, end_sessions boolean, with_keys boolean) RETURNS void
LANGUAGE plpgsql AS $fn$
DECLARE
    hashes jsonb := '[]'::jsonb;
    payload text;
BEGIN
    IF with_keys THEN
        SELECT coalesce(jsonb_agg(k."apiKeyHash" ORDER BY k."apiKeyHash"), '[]'::jsonb)
            INTO hashes
            FROM "McpApiKey" k
            WHERE k."userMcpServerInstanceId" = instance_id AND k."apiKeyHash" IS NOT NULL;
    END IF;
    payload := jsonb_build_object(
        't', 'instance', 'instanceId', instance_id, 'keyHashes', hashes,
        'end', end_sessions)::text;
    IF octet_length(payload) > 7000 THEN
        -- Too many keys for one notification (8000 bytes at most): drop
        -- every cached key instead of naming them.
        PERFORM pg_notify('mcpproxy_invalidate', '{"t": "all"}');
        payload := jsonb_build_object(
            't', 'instance', 'instanceId', instance_id, 'keyHashes', '[]'::jsonb,
            'end', end_sessions)::text;
    END IF;
    PERFORM pg_notify('mcpproxy_invalidate', payload);
END
$fn$;

CREATE OR REPLACE FUNCTION mcpproxy_notify_instance_row() RETURNS trigger
LANGUAGE plpgsql AS $fn$
BEGIN
    IF TG_OP = 'DELETE' THEN
        PERFORM mcpproxy_notify_instance(OLD.id, true, true);
        RETURN NULL;
    END IF;
    IF NEW.id IS DISTINCT FROM OLD.id THEN
        PERFORM mcpproxy_notify_instance(OLD.id, true, false);
    END IF;
    PERFORM mcpproxy_notify_instance(
        NEW.id,
        NEW."deletedAt" IS NOT NULL
            OR NEW."authType" IS DISTINCT FROM OLD."authType"
            OR NEW."organizationId" IS DISTINCT FROM OLD."organizationId"
            OR NEW.id IS DISTINCT FROM OLD.id,
        true);
    RETURN NULL;
END
$fn$;

CREATE OR REPLACE FUNCTION mcpproxy_notify_tool_group() RETURNS trigger
LANGUAGE plpgsql AS $fn$
DECLARE
    group_id text;
    ending boolean;
    instance_id text;
BEGIN
    IF TG_OP = 'DELETE' THEN
        group_id := OLD.id;
        ending := true;
    ELSE
        group_id := NEW.id;
        ending := NOT NEW."isEnabled"
            OR NEW."organizationId" IS DISTINCT FROM OLD."organizationId";
    END IF;
    FOR instance_id IN
        SELECT id FROM "UserMcpServerInstance" WHERE "toolGroupId" = group_id
    LOOP
        PERFORM mcpproxy_notify_instance(instance_id, ending, true);
    END LOOP;
    RETURN NULL;
END
$fn$;

CREATE OR REPLACE FUNCTION mcpproxy_notify_tool_group_tool() RETURNS trigger
LANGUAGE plpgsql AS $fn$
DECLARE
    old_group text;
    new_group text;
    instance_id text;
BEGIN
    IF TG_OP <> 'INSERT' THEN
        old_group := OLD."toolGroupId";
    END IF;
    IF TG_OP <> 'DELETE' THEN
        new_group := NEW."toolGroupId";
    END IF;
    FOR instance_id IN
        SELECT id FROM "UserMcpServerInstance" WHERE "toolGroupId" IN (old_group, new_group)
    LOOP
        PERFORM mcpproxy_notify_instance(instance_id, false, false);
    END LOOP;
    RETURN NULL;
END
$fn$;

CREATE TRIGGER mcpproxy_change_insert_delete AFTER INSERT OR DELETE ON "McpApiKey"
    FOR EACH ROW EXECUTE PROCEDURE mcpproxy_notify_key();
CREATE TRIGGER mcpproxy_change_update AFTER UPDATE ON "McpApiKey"
    FOR EACH ROW WHEN (
        OLD."isActive" IS DISTINCT FROM NEW."isActive"
        OR OLD."expiresAt" IS DISTINCT FROM NEW."expiresAt"
        OR OLD."apiKeyHash" IS DISTINCT FROM NEW."apiKeyHash"
        OR OLD."userMcpServerInstanceId" IS DISTINCT FROM NEW."userMcpServerInstanceId"
        OR OLD.id IS DISTINCT FROM NEW.id)
    EXECUTE PROCEDURE mcpproxy_notify_key();

CREATE TRIGGER mcpproxy_change_delete AFTER DELETE ON "UserMcpServerInstance"
    FOR EACH ROW EXECUTE PROCEDURE mcpproxy_notify_instance_row();
CREATE TRIGGER mcpproxy_change_update AFTER UPDATE ON "UserMcpServerInstance"
    FOR EACH ROW WHEN (
        OLD."deletedAt" IS DISTINCT FROM NEW."deletedAt"
        OR OLD."authType" IS DISTINCT FROM NEW."authType"
        OR OLD."toolGroupId" IS DISTINCT FROM NEW."toolGroupId"
        OR OLD."organizationId" IS DISTINCT FROM NEW."organizationId"
        OR OLD.id IS DISTINCT FROM NEW.id)
    EXECUTE PROCEDURE mcpproxy_notify_instance_row();

CREATE TRIGGER mcpproxy_change_delete AFTER DELETE ON "UserToolGroup"
    FOR EACH ROW EXECUTE PROCEDURE mcpproxy_notify_tool_group();
CREATE TRIGGER mcpproxy_change_update AFTER UPDATE ON "UserToolGroup"
    FOR EACH ROW WHEN (
        OLD."isEnabled" IS DISTINCT FROM NEW."isEnabled"
        OR OLD."organizationId" IS DISTINCT FROM NEW."organizationId"
        OR OLD.id IS DISTINCT FROM NEW.id)
    EXECUTE PROCEDURE mcpproxy_notify_tool_group();

CREATE TRIGGER mcpproxy_change AFTER INSERT OR UPDATE OR DELETE ON "UserToolGroupTool"
    FOR EACH ROW EXECUTE PROCEDURE mcpproxy_notify_tool_group_tool();

CREATE TRIGGER mcpproxy_change_delete AFTER DELETE ON "UserMcpServerConfig"
    FOR EACH ROW EXECUTE PROCEDURE mcpproxy_notify_all();
CREATE TRIGGER mcpproxy_change_update AFTER UPDATE ON "UserMcpServerConfig"
    FOR EACH ROW WHEN (
        OLD."envVars" IS DISTINCT FROM NEW."envVars"
        OR OLD.name IS DISTINCT FROM NEW.name
        OR OLD."mcpServerId" IS DISTINCT FROM NEW."mcpServerId"
        OR OLD."organizationId" IS DISTINCT FROM NEW."organizationId"
        OR OLD.id IS DISTINCT FROM NEW.id)
    EXECUTE PROCEDURE mcpproxy_notify_all();

CREATE TRIGGER mcpproxy_change_delete AFTER DELETE ON "McpServer"
    FOR EACH ROW EXECUTE PROCEDURE mcpproxy_notify_all();
CREATE TRIGGER mcpproxy_change_update AFTER UPDATE ON "McpServer"
    FOR EACH ROW WHEN (
        OLD."transportType" IS DISTINCT FROM NEW."transportType"
        OR OLD.command IS DISTINCT FROM NEW.command
        OR OLD.args IS DISTINCT FROM NEW.args
        OR OLD.url IS DISTINCT FROM NEW.url
        OR OLD."authType" IS DISTINCT FROM NEW."authType"
        OR OLD.id IS DISTINCT FROM NEW.id)
    EXECUTE PROCEDURE mcpproxy_notify_all();

CREATE TRIGGER mcpproxy_change_update AFTER UPDATE ON "Tool"
    FOR EACH ROW WHEN (
        OLD.name IS DISTINCT FROM NEW.name
        OR OLD."mcpServerId" IS DISTINCT FROM NEW."mcpServerId"
        OR OLD.id IS DISTINCT FROM NEW.id)
    EXECUTE PROCEDURE mcpproxy_notify_all();

CREATE TRIGGER mcpproxy_change_truncate AFTER TRUNCATE ON "McpApiKey"
    FOR EACH STATEMENT EXECUTE PROCEDURE mcpproxy_notify_all();
CREATE TRIGGER mcpproxy_change_truncate AFTER TRUNCATE ON "UserMcpServerInstance"
    FOR EACH STATEMENT EXECUTE PROCEDURE mcpproxy_notify_all();
CREATE TRIGGER mcpproxy_change_truncate AFTER TRUNCATE ON "UserToolGroup"
    FOR EACH STATEMENT EXECUTE PROCEDURE mcpproxy_notify_all();
CREATE TRIGGER mcpproxy_change_truncate AFTER TRUNCATE ON "UserToolGroupTool"
    FOR EACH STATEMENT EXECUTE PROCEDURE mcpproxy_notify_all();
CREATE TRIGGER mcpproxy_change_truncate AFTER TRUNCATE ON "UserMcpServerConfig"
    FOR EACH STATEMENT EXECUTE PROCEDURE mcpproxy_notify_all();
CREATE TRIGGER mcpproxy_change_truncate AFTER TRUNCATE ON "McpServer"
    FOR EACH STATEMENT EXECUTE PROCEDURE mcpproxy_notify_all();
CREATE TRIGGER mcpproxy_change_truncate AFTER TRUNCATE ON "Tool"
    FOR EACH STATEMENT EXECUTE PROCEDURE mcpproxy_notify_all();
"""

#: Every migration, oldest first.  Append; never edit an applied one.  Both
#: dialects have every version (an empty text records the version only: a
#: SQLite database has no other process to notify).
MIGRATIONS: tuple[Migration, ...] = (
    Migration("0001_initial", _INITIAL_SQLITE, _INITIAL_POSTGRESQL),
    Migration("0002_change_notifications", "", _CHANGE_NOTIFICATIONS_POSTGRESQL),
)
