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


def splitStatements(sql: str) -> list[str]:
    """
    Split SQL text on semicolons that end a line, dropping comments-only
    and empty pieces.
    """
    out = []
    for piece in sql.split(";\n"):
        lines = [ln for ln in piece.strip().splitlines() if not ln.strip().startswith("--")]
        text = "\n".join(lines).strip().rstrip(";").strip()
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

#: Every migration, oldest first.  Append; never edit an applied one.
MIGRATIONS: tuple[Migration, ...] = (
    Migration("0001_initial", _INITIAL_SQLITE, _INITIAL_POSTGRESQL),
)
