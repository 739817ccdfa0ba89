"""
The SQLite provider of L{IRepository}.

One connection in one thread (C{twisted.enterprise.adbapi} with
C{cp_min = cp_max = 1}), so writes are serialised; WAL mode lets other
processes read meanwhile.  Plans run whole in that thread; cancelling an
operation interrupts its running statement (C{sqlite3.Connection.interrupt})
and rolls its transaction back.
"""

from __future__ import annotations

import datetime
import functools
import json
import os
import sqlite3
import threading
from collections.abc import Callable
from typing import Any, Optional, TypeVar

from attrs import define, field
from twisted.enterprise import adbapi
from twisted.internet.defer import CancelledError, Deferred
from zope.interface import implementer

from mcp_proxy.config import SettingsError
from mcp_proxy.errors import (
    Conflict,
    DatabaseUnavailable,
    InvalidInput,
    NotFound,
    ProxyError,
    SchemaError,
)
from mcp_proxy.interfaces import IRepository
from mcp_proxy.repository.base import NEW, RepositoryBase
from mcp_proxy.repository.plans import Array, Json, Mode, Operation, Rows, formatTimestamp
from mcp_proxy.repository.schema import MIGRATIONS, Migration

T = TypeVar("T")


def checkDirectory(path: str) -> None:
    """
    Check that the directory of a SQLite file exists.

    @raise SettingsError: naming it, when it does not.
    """
    if path == ":memory:" or path.startswith("file:"):
        return
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise SettingsError(
            f"bad --database sqlite:///{path}: the directory {directory} does not exist"
        )


@functools.lru_cache(maxsize=512)
def _qmark(sql: str) -> str:
    return sql.replace("%s", "?")


#: Parameter types that sqlite3 takes as they are.
_PLAIN = frozenset({str, int, float, bytes, type(None)})


def _param(value: Any) -> Any:
    if isinstance(value, Array):
        return json.dumps(list(value.values))
    if isinstance(value, Json):
        return json.dumps(value.value)
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, datetime.datetime):
        return formatTimestamp(value)
    return value


def mapSqliteError(error: sqlite3.Error, sql: str, path: str) -> ProxyError:
    """
    The mcp-proxy error for a C{sqlite3} error.
    """
    if isinstance(error, sqlite3.IntegrityError):
        name = getattr(error, "sqlite_errorname", "")
        if name in ("SQLITE_CONSTRAINT_UNIQUE", "SQLITE_CONSTRAINT_PRIMARYKEY"):
            return Conflict(f"duplicate value: {error}")
        if name == "SQLITE_CONSTRAINT_FOREIGNKEY":
            if sql.lstrip().upper().startswith("DELETE"):
                return Conflict(f"the row is still referenced: {error}")
            return NotFound(f"a referenced row does not exist: {error}")
        if name == "SQLITE_CONSTRAINT_CHECK":
            return InvalidInput(f"a value is not allowed: {error}")
        if name == "SQLITE_CONSTRAINT_NOTNULL":
            return SchemaError(f"a required column is NULL: {error}")
        return Conflict(f"constraint failed: {error}")
    message = str(error)
    if "no such table" in message or "no such column" in message:
        return SchemaError(f"SQLite {path}: {message}")
    return DatabaseUnavailable(f"SQLite {path}: {message}")


@define
class _Call:
    """
    One operation's cancellation state, shared with the database thread.
    """

    lock: threading.Lock = field(factory=threading.Lock)
    cancelled: bool = False
    connection: Any = None

    def cancel(self) -> None:
        with self.lock:
            if self.cancelled:
                return
            self.cancelled = True
            if self.connection is not None:
                self.connection.interrupt()


@implementer(IRepository)
@define
class SqliteRepository(RepositoryBase):
    """
    A repository in a SQLite file.

    @ivar path: the file (C{":memory:"} for a private in-memory database).
    @ivar busyTimeout: seconds to wait for another process's write lock.
    @ivar migrations: the schema migrations, oldest first.
    """

    path: str
    reactor: Any
    queryTimeout: float = 30.0
    busyTimeout: float = 5.0
    kind: str = field(default="sqlite", init=False)
    originSchema: bool = field(default=False, init=False)
    migrations: tuple[Migration, ...] = MIGRATIONS
    queryCounts: dict[str, int] = field(factory=dict, init=False)
    _state: str = field(default=NEW, init=False)
    _inflight: set[Deferred[Any]] = field(factory=set, init=False)
    _drainWaiters: list[Deferred[None]] = field(factory=list, init=False)
    _pool: Optional[adbapi.ConnectionPool] = field(default=None, init=False)

    async def _open(self) -> None:
        checkDirectory(self.path)
        pool = adbapi.ConnectionPool(
            "sqlite3",
            self.path,
            check_same_thread=False,
            isolation_level=None,
            timeout=self.busyTimeout,
            cp_min=1,
            cp_max=1,
            cp_openfun=self._prepare,
            cp_reactor=self.reactor,
            cp_noisy=False,
        )
        pool.start()
        self._pool = pool

    def _prepare(self, connection: sqlite3.Connection) -> None:
        """
        Set the PRAGMAs of a new connection (in the database thread).
        """
        connection.execute("PRAGMA journal_mode = WAL").fetchall()
        connection.execute("PRAGMA foreign_keys = ON")
        connection.execute(f"PRAGMA busy_timeout = {int(self.busyTimeout * 1000)}")
        connection.execute("PRAGMA synchronous = NORMAL")

    def _close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.close()

    def _submit(self, op: Operation[T]) -> tuple[Deferred[T], Callable[[], object]]:
        pool = self._pool
        assert pool is not None
        call = _Call()
        d: Deferred[T] = pool.runWithConnection(self._runInThread, op, call)
        return d, call.cancel

    def _translate(self, error: BaseException, sql: str = "") -> Optional[BaseException]:
        if isinstance(error, sqlite3.Error):
            return mapSqliteError(error, sql, self.path)
        return None

    # -- in the database thread -----------------------------------------------

    def _runInThread(self, connection: Any, op: Operation[T], call: _Call) -> T:
        with call.lock:
            if call.cancelled:
                op.steps.close()
                raise CancelledError()
            call.connection = connection
        try:
            return self._drive(connection, op, call)
        finally:
            with call.lock:
                call.connection = None

    def _drive(self, connection: Any, op: Operation[T], call: _Call) -> T:
        cursor = connection.cursor()
        steps = op.steps
        try:
            if op.mode is not Mode.AUTOCOMMIT:
                self._execute(cursor, "BEGIN IMMEDIATE", (), call)
            value: Any = None
            error: Optional[BaseException] = None
            while True:
                try:
                    query = steps.send(value) if error is None else steps.throw(error)
                except StopIteration as stop:
                    result: T = stop.value
                    break
                if call.cancelled:
                    raise CancelledError()
                self.reactor.callFromThread(self._count, op.kind)
                try:
                    value = self._execute(cursor, _qmark(query.sql), query.params, call)
                    error = None
                except (ProxyError, CancelledError) as e:
                    value, error = None, e
            if op.mode is not Mode.AUTOCOMMIT:
                self._execute(cursor, "COMMIT", (), call)
            return result
        except BaseException:
            steps.close()
            if connection.in_transaction:
                try:
                    connection.execute("ROLLBACK")
                except sqlite3.Error:
                    pass
            raise
        finally:
            cursor.close()

    def _execute(
        self, cursor: sqlite3.Cursor, sql: str, params: tuple[Any, ...], call: _Call
    ) -> Rows:
        try:
            cursor.execute(sql, tuple(p if type(p) in _PLAIN else _param(p) for p in params))
            return cursor.fetchall() if cursor.description is not None else []
        except sqlite3.Error as e:
            if call.cancelled and "interrupt" in str(e):
                raise CancelledError() from e
            raise mapSqliteError(e, sql, self.path) from e
