"""
Shared test fixtures.

Repositories: C{repository} runs a test once on SQLite (a file in the
test's C{tmp_path}) and once on PostgreSQL (a throwaway database, dropped
afterwards).  The PostgreSQL server is given by
C{MCPPROXY_TEST_POSTGRES_DSN} (a libpq connection string to a database
that may create databases); when it cannot be reached, the PostgreSQL runs
are skipped, or fail when C{CI=true}.
"""

from __future__ import annotations

import functools
import os
import secrets
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Optional

import psycopg2
import psycopg2.extensions
import pytest
import pytest_twisted
from twisted.internet import reactor

from mcp_proxy.config import DatabaseURL
from mcp_proxy.interfaces import IRepository
from mcp_proxy.repository import openRepository

POSTGRES_DSN = os.environ.get(
    "MCPPROXY_TEST_POSTGRES_DSN", "host=127.0.0.1 port=5432 user=postgres dbname=postgres"
)

#: Seconds an operation may take in tests (generous: CI machines are slow).
TEST_QUERY_TIMEOUT = 20.0


class PostgresServer:
    """
    The PostgreSQL server of the tests: makes and drops throwaway databases.
    """

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn

    def connect(self, dbname: Optional[str] = None) -> Any:
        """
        A blocking psycopg2 connection in autocommit mode.
        """
        dsn = self.dsn if dbname is None else self.dsnFor(dbname)
        connection = psycopg2.connect(dsn, connect_timeout=5)
        connection.autocommit = True
        return connection

    def dsnFor(self, dbname: str) -> str:
        return str(psycopg2.extensions.make_dsn(self.dsn, dbname=dbname))

    def createDatabase(self) -> str:
        name = "mcpproxy_test_" + secrets.token_hex(6)
        connection = self.connect()
        try:
            with connection.cursor() as cursor:
                cursor.execute(f'CREATE DATABASE "{name}"')
        finally:
            connection.close()
        return name

    def dropDatabase(self, name: str) -> None:
        connection = self.connect()
        try:
            with connection.cursor() as cursor:
                cursor.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')
                cursor.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            connection.close()


@functools.lru_cache(maxsize=1)
def _probePostgres() -> tuple[Optional[PostgresServer], str]:
    try:
        server = PostgresServer(POSTGRES_DSN)
        server.connect().close()
    except Exception as e:
        return None, str(e).strip()
    return server, ""


def requirePostgres() -> PostgresServer:
    """
    The test PostgreSQL server; skip the test (fail it when C{CI=true}) if
    it cannot be reached.
    """
    server, error = _probePostgres()
    if server is None:
        message = f"PostgreSQL ({POSTGRES_DSN}) is unreachable: {error}"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message)
        pytest.skip(message)
    return server


class Databases:
    """
    Makes empty databases of one kind for a test, and removes them after.
    """

    def __init__(self, kind: str, tmp_path: Path) -> None:
        self.kind = kind
        self.tmp_path = tmp_path
        self.created: list[str] = []
        self.server = requirePostgres() if kind == "postgresql" else None

    def new(self) -> DatabaseURL:
        if self.server is None:
            path = self.tmp_path / f"db-{len(self.created)}.sqlite3"
            self.created.append(str(path))
            return DatabaseURL(kind="sqlite", path=str(path))
        name = self.server.createDatabase()
        self.created.append(name)
        return DatabaseURL(kind="postgresql", dsn=self.server.dsnFor(name))

    def cleanup(self) -> None:
        if self.server is not None:
            for name in self.created:
                self.server.dropDatabase(name)


class RawDatabase:
    """
    Direct, blocking SQL access to a repository's database, beside it.
    C{%s} placeholders for both kinds.
    """

    def __init__(self, url: DatabaseURL) -> None:
        self.kind = url.kind
        if url.kind == "sqlite":
            self.connection: Any = sqlite3.connect(url.path, timeout=10, isolation_level=None)
        else:
            self.connection = psycopg2.connect(url.dsn, connect_timeout=5)
            self.connection.autocommit = True

    def query(self, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        if self.kind == "sqlite":
            cursor = self.connection.execute(sql.replace("%s", "?"), params)
            return list(cursor.fetchall())
        with self.connection.cursor() as cursor:
            cursor.execute(sql, params or None)
            return list(cursor.fetchall()) if cursor.description is not None else []

    def close(self) -> None:
        self.connection.close()


def urlOf(repository: Any) -> DatabaseURL:
    """
    The L{DatabaseURL} of a repository.
    """
    if repository.kind == "sqlite":
        return DatabaseURL(kind="sqlite", path=repository.path)
    return DatabaseURL(kind="postgresql", dsn=repository.dsn)


@pytest.fixture
def postgresServer() -> PostgresServer:
    """
    The test PostgreSQL server (skipped or failed when unreachable).
    """
    return requirePostgres()


@pytest.fixture
def postgresDatabase(postgresServer: PostgresServer) -> Iterator[str]:
    """
    The name of a new, empty PostgreSQL database, dropped after the test.
    """
    name = postgresServer.createDatabase()
    try:
        yield name
    finally:
        postgresServer.dropDatabase(name)


@pytest_twisted.async_yield_fixture(params=["sqlite", "postgresql"])
async def repository(request: Any, tmp_path: Path) -> Any:
    """
    A started L{IRepository} on an empty database: once on SQLite, once on
    PostgreSQL.
    """
    databases = Databases(request.param, tmp_path)
    repo: IRepository = openRepository(
        databases.new(), reactor=reactor, queryTimeout=TEST_QUERY_TIMEOUT
    )
    try:
        await repo.start()
        yield repo
        await repo.stop()
    finally:
        databases.cleanup()


@pytest.fixture
def databases(request: Any, tmp_path: Path) -> Iterator[Databases]:
    """
    A maker of further empty databases of the kind of the test's
    C{repository} parameter (SQLite without one).
    """
    kind = getattr(request.node, "callspec", None)
    param = kind.params.get("repository", "sqlite") if kind is not None else "sqlite"
    made = Databases(param, tmp_path)
    try:
        yield made
    finally:
        made.cleanup()


@pytest.fixture
def rawDatabase(repository: Any) -> Iterator[RawDatabase]:
    """
    Direct SQL access to the database of the test's C{repository}.
    """
    raw = RawDatabase(urlOf(repository))
    try:
        yield raw
    finally:
        raw.close()
