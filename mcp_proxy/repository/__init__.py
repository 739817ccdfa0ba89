"""
The data layer: L{IRepository} on SQLite or PostgreSQL.

Use L{openRepository} to get an unstarted provider for a C{--database}
value, then C{start()} it (connect and migrate).
"""

from __future__ import annotations

from typing import Any, Optional

from mcp_proxy.config import DatabaseURL, SettingsError
from mcp_proxy.interfaces import IRepository
from mcp_proxy.repository.plans import EncryptedValueError
from mcp_proxy.repository.postgres import ConnectionLost, PostgresRepository
from mcp_proxy.repository.schema import MIGRATIONS, SYSTEM_USER_ID
from mcp_proxy.repository.sqlite import SqliteRepository, checkDirectory

__all__ = [
    "MIGRATIONS",
    "SYSTEM_USER_ID",
    "ConnectionLost",
    "EncryptedValueError",
    "PostgresRepository",
    "SqliteRepository",
    "openRepository",
]


def openRepository(
    database: DatabaseURL,
    reactor: Optional[Any] = None,
    queryTimeout: float = 30.0,
    poolSize: int = 3,
) -> IRepository:
    """
    An unstarted repository for C{database}.

    @param reactor: the reactor (default: the global one); it must provide
        threads (SQLite runs in a thread; PostgreSQL cancels from one).
    @param queryTimeout: seconds any operation may take, waiting for a
        connection included, before it fails with L{DatabaseUnavailable}.
    @param poolSize: PostgreSQL connections.
    @raise SettingsError: for an unknown kind, or a SQLite file whose
        directory does not exist.
    """
    if reactor is None:
        from twisted.internet import reactor as globalReactor

        reactor = globalReactor
    if database.kind == "sqlite":
        checkDirectory(database.path)
        return SqliteRepository(path=database.path, reactor=reactor, queryTimeout=queryTimeout)
    if database.kind == "postgresql":
        return PostgresRepository(
            dsn=database.dsn, reactor=reactor, queryTimeout=queryTimeout, poolSize=poolSize
        )
    raise SettingsError(f"unknown database kind {database.kind!r}")
