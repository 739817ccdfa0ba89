"""
The PostgreSQL provider of L{IRepository}, on txpostgres.

A txpostgres C{ConnectionPool} whose connections each carry a
C{DeadConnectionDetector}: a connection found dead is re-established in the
background with backoff, and operations given to it meanwhile fail with
L{ConnectionLost} (a L{DatabaseUnavailable}).

Cancellation (and so the timeout of every operation) never cancels a
txpostgres Deferred: the operation's Deferred fails at once, a cancel
request is sent to the server from a thread (libpq's C{PQcancel} blocks),
and the operation ends on its own, rolling its transaction back, before its
connection goes back to the pool (twisted-notes section 3.3).
"""

from __future__ import annotations

import datetime
from collections.abc import Awaitable, Callable
from typing import Any, Optional, TypeVar

import psycopg2
import psycopg2.extensions
import psycopg2.extras
from attrs import define, field
from twisted.internet.defer import CancelledError, Deferred, FirstError, fail, succeed
from twisted.internet.defer import TimeoutError as DeferredTimeout
from twisted.internet.interfaces import IReactorThreads
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from txpostgres import txpostgres
from txpostgres.reconnection import ConnectionDead, DeadConnectionDetector
from txpostgres.retrying import RetryingCall, simpleBackoffIterator
from zope.interface import implementer

from mcp_proxy.errors import (
    Conflict,
    DatabaseUnavailable,
    InvalidInput,
    NotFound,
    ProxyError,
    SchemaError,
)
from mcp_proxy.interfaces import IRepository
from mcp_proxy.repository.base import NEW, RepositoryBase, cancellable
from mcp_proxy.repository.plans import Array, Json, Mode, Operation, Query, Rows, naiveUtc
from mcp_proxy.repository.schema import MIGRATIONS, Migration

T = TypeVar("T")

log = Logger()

#: The key of the advisory lock that serialises EXCLUSIVE operations.
ADMIN_LOCK_KEY = int.from_bytes(b"mcpproxy", "big")

_LOCK = Query("SELECT pg_advisory_xact_lock(%s)", (ADMIN_LOCK_KEY,))

#: SQLSTATEs of a server going away (besides class 08).
_SHUTDOWN_CODES = ("57P01", "57P02", "57P03")


class ConnectionLost(DatabaseUnavailable):
    """
    The connection to PostgreSQL broke, or is being re-established.
    """


def redactDsn(dsn: str) -> str:
    """
    A libpq connection string with its password masked.
    """
    return " ".join(
        "password=***" if part.startswith("password=") else part for part in dsn.split(" ")
    )


def isConnectionError(error: BaseException) -> bool:
    """
    Whether a psycopg2 error means that the connection is unusable.
    """
    if isinstance(error, psycopg2.InterfaceError):
        return True
    if isinstance(error, psycopg2.OperationalError):
        code = error.pgcode
        return code is None or code.startswith("08") or code in _SHUTDOWN_CODES
    return False


def _isDead(failure: Failure) -> bool:
    if failure.check(ConnectionLost, txpostgres.RollbackFailed):
        return True
    return failure.value is not None and isConnectionError(failure.value)


def _message(error: psycopg2.Error) -> str:
    diag = getattr(error, "diag", None)
    primary = getattr(diag, "message_primary", None)
    if not primary:
        return str(error).strip()
    detail = getattr(diag, "message_detail", None)
    return f"{primary} ({detail})" if detail else primary


def mapPostgresError(error: BaseException, sql: str = "") -> Optional[ProxyError]:
    """
    The mcp-proxy error for a psycopg2 or txpostgres error, or C{None}.
    """
    if isinstance(error, FirstError):
        inner = error.subFailure.value
        return None if inner is None else mapPostgresError(inner, sql)
    if isinstance(error, ConnectionDead):
        return ConnectionLost("the connection to PostgreSQL is being re-established")
    if isinstance(error, txpostgres.RollbackFailed):
        return ConnectionLost("PostgreSQL failed to roll back; reconnecting")
    if isConnectionError(error):
        return ConnectionLost(f"PostgreSQL connection failed: {str(error).strip()}")
    if not isinstance(error, psycopg2.Error):
        return None
    code = error.pgcode or ""
    text = _message(error)
    if code == "23505":
        return Conflict(f"duplicate value: {text}")
    if code == "23503":
        if sql.lstrip().upper().startswith("DELETE"):
            return Conflict(f"the row is still referenced: {text}")
        return NotFound(f"a referenced row does not exist: {text}")
    if code == "23502":
        return SchemaError(f"a required column is NULL: {text}")
    if code in ("23514", "22P02", "22001", "22003", "22007", "22008"):
        return InvalidInput(f"a value is not allowed: {text}")
    if code in ("42P01", "42703", "42704", "42883"):
        return SchemaError(f"the PostgreSQL schema does not match: {text}")
    return DatabaseUnavailable(f"PostgreSQL error: {text}")


def _param(value: Any) -> Any:
    if isinstance(value, datetime.datetime):
        return naiveUtc(value)
    if isinstance(value, Array):
        return list(value.values)
    if isinstance(value, Json):
        return psycopg2.extras.Json(value.value)
    return value


def _params(params: tuple[Any, ...]) -> Optional[tuple[Any, ...]]:
    return tuple(_param(p) for p in params) if params else None


def _fetch(cursor: Any) -> Rows:
    if cursor.description is None:
        return []
    rows: Rows = cursor.fetchall()
    return rows


class _Retrying(RetryingCall):  # type: ignore[misc]
    """
    A C{RetryingCall} on a given reactor (the base class would import the
    global one).
    """

    def __init__(self, reactor: Any, f: Callable[[], Deferred[Any]]) -> None:
        self.reactor = reactor
        RetryingCall.__init__(self, f)


class _Detector(DeadConnectionDetector):  # type: ignore[misc]
    """
    A C{DeadConnectionDetector} that can be stopped, and logs.
    """

    def __init__(self, reactor: Any, delay: float, maxDelay: float) -> None:
        DeadConnectionDetector.__init__(
            self,
            deathChecker=_isDead,
            reconnectionIterator=lambda: simpleBackoffIterator(
                initialDelay=delay, maxDelay=maxDelay, factor=1.7, maxRetries=0, now=True
            ),
            reactor=reactor,
        )
        self.stopped = False
        self._retrying: Optional[Deferred[Any]] = None

    def startReconnecting(self, f: Failure) -> None:
        if self.stopped:
            return
        log.warn("PostgreSQL connection lost ({error}); reconnecting", error=f.getErrorMessage())
        d = _Retrying(self.reactor, self.reconnect).start(self.reconnectionIterator())
        self._retrying = d
        d.addCallback(lambda _: self.connectionRecovered())
        d.addErrback(self._gaveUp)

    def reconnect(self) -> Deferred[Any]:
        if self.stopped:
            return fail(CancelledError())
        d: Deferred[Any] = DeadConnectionDetector.reconnect(self)
        return d

    def connectionRecovered(self) -> Deferred[Any]:
        log.info("PostgreSQL connection re-established")
        d: Deferred[Any] = DeadConnectionDetector.connectionRecovered(self)
        return d

    def _gaveUp(self, f: Failure) -> None:
        if not self.stopped and not f.check(CancelledError):
            log.failure("PostgreSQL reconnection stopped", f)

    def stop(self) -> None:
        self.stopped = True
        d, self._retrying = self._retrying, None
        if d is not None and not d.called:
            try:
                d.cancel()
            except Exception:
                pass


class _Connection(txpostgres.Connection):  # type: ignore[misc]
    """
    A txpostgres connection that runs one statement outside a transaction.
    """

    def runStatement(self, sql: str, params: Optional[tuple[Any, ...]]) -> Deferred[Rows]:
        d: Deferred[Rows] = self._doit(self._runStatement, sql, params)
        return d

    def _runStatement(self, sql: str, params: Optional[tuple[Any, ...]]) -> Deferred[Rows]:
        d: Deferred[Any] = self.cursor().execute(sql, params)
        return d.addCallback(_fetch)

    def close(self) -> None:
        if self.pollable() is not None:
            txpostgres.Connection.close(self)


class _Pool(txpostgres.ConnectionPool):  # type: ignore[misc]
    """
    A txpostgres pool of L{_Connection}s, lent out one operation at a time.
    """

    def __init__(self, reactor: Any, dsn: str, size: int, delay: float, maxDelay: float) -> None:
        self.reactor = reactor
        self.everyConnection: list[_Connection] = []

        def connectionFactory(reactor: Any, cooperator: Any) -> _Connection:
            connection = _Connection(
                reactor, cooperator, detector=_Detector(reactor, delay, maxDelay)
            )
            self.everyConnection.append(connection)
            return connection

        self.connectionFactory = connectionFactory
        options = {}
        if "application_name" not in psycopg2.extensions.parse_dsn(dsn):
            options["application_name"] = "mcp-proxy"
        txpostgres.ConnectionPool.__init__(self, None, dsn, min=size, **options)

    def acquire(self) -> Deferred[_Connection]:
        """
        Wait for a free connection and take it.
        """
        d: Deferred[Any] = self._semaphore.acquire()
        return d.addCallback(lambda _: self.connections.pop())

    def release(self, connection: _Connection) -> None:
        """
        Give back a connection taken with L{acquire}.
        """
        self.connections.add(connection)
        self._semaphore.release()

    def closeAll(self) -> None:
        """
        Stop reconnecting and close every connection, lent or not.
        """
        for connection in self.everyConnection:
            connection.detector.stop()
            try:
                connection.close()
            except psycopg2.Error:
                pass


def _sendCancel(reactor: Any, connection: _Connection) -> Deferred[None]:
    """
    Ask the server to cancel what a connection runs, from a thread.
    """
    raw = connection.pollable()
    if raw is None or raw.closed:
        return succeed(None)

    def send() -> None:
        try:
            raw.cancel()
        except psycopg2.Error:
            pass

    if not IReactorThreads.providedBy(reactor):
        send()
        return succeed(None)
    d: Deferred[None] = deferToThreadPool(reactor, reactor.getThreadPool(), send)
    return d


@define
class _Call:
    """
    One operation's cancellation state.
    """

    reactor: Any
    cancelled: bool = False
    waiting: Optional[Deferred[Any]] = None
    running: Optional[_Connection] = None
    cancelling: Optional[Deferred[None]] = None

    def cancel(self) -> None:
        if self.cancelled:
            return
        self.cancelled = True
        if self.waiting is not None and not self.waiting.called:
            self.waiting.cancel()
        elif self.running is not None:
            self.cancelling = _sendCancel(self.reactor, self.running)


Execute = Callable[[str, Optional[tuple[Any, ...]]], Awaitable[Rows]]


@implementer(IRepository)
@define
class PostgresRepository(RepositoryBase):
    """
    A repository in PostgreSQL.

    @ivar dsn: a libpq connection string.
    @ivar poolSize: the number of connections.
    @ivar migrations: the schema migrations, oldest first.
    @ivar reconnectDelay: seconds before the second attempt to re-establish
        a dead connection (the first is immediate); the delay grows to
        C{reconnectMaxDelay}.
    """

    dsn: str
    reactor: Any
    queryTimeout: float = 30.0
    poolSize: int = 3
    reconnectDelay: float = 0.5
    reconnectMaxDelay: float = 10.0
    kind: str = field(default="postgresql", init=False)
    originSchema: bool = field(default=False, init=False)
    migrations: tuple[Migration, ...] = MIGRATIONS
    queryCounts: dict[str, int] = field(factory=dict, init=False)
    _state: str = field(default=NEW, init=False)
    _inflight: set[Deferred[Any]] = field(factory=set, init=False)
    _drainWaiters: list[Deferred[None]] = field(factory=list, init=False)
    _pool: Optional[_Pool] = field(default=None, init=False)

    async def _open(self) -> None:
        pool = _Pool(
            self.reactor, self.dsn, self.poolSize, self.reconnectDelay, self.reconnectMaxDelay
        )
        self._pool = pool
        started = cancellable(pool.start(), lambda: None)
        started.addTimeout(self.queryTimeout, self.reactor)
        try:
            await started
        except DeferredTimeout:
            raise DatabaseUnavailable(
                f"cannot connect to PostgreSQL ({redactDsn(self.dsn)}): "
                f"no answer in {self.queryTimeout:g} s"
            ) from None
        except Exception as e:
            mapped = mapPostgresError(e)
            if mapped is None:
                raise
            raise DatabaseUnavailable(
                f"cannot connect to PostgreSQL ({redactDsn(self.dsn)}): {mapped}"
            ) from e

    def _close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.closeAll()

    def _translate(self, error: BaseException, sql: str = "") -> Optional[BaseException]:
        return mapPostgresError(error, sql)

    def _submit(self, op: Operation[T]) -> tuple[Deferred[T], Callable[[], object]]:
        pool = self._pool
        assert pool is not None
        call = _Call(self.reactor)
        return Deferred.fromCoroutine(self._execute(pool, op, call)), call.cancel

    async def _execute(self, pool: _Pool, op: Operation[T], call: _Call) -> T:
        call.waiting = pool.acquire()
        try:
            connection = await call.waiting
        except BaseException:
            op.steps.close()
            raise
        call.waiting = None
        call.running = connection
        try:
            if op.mode is Mode.AUTOCOMMIT:
                return await self._drive(op, call, connection.runStatement, lock=False)
            result: T = await connection.runInteraction(self._interaction, op, call)
            return result
        finally:
            call.running = None
            if call.cancelling is not None:
                await call.cancelling
            pool.release(connection)

    def _interaction(self, cursor: Any, op: Operation[T], call: _Call) -> Deferred[T]:
        def execute(sql: str, params: Optional[tuple[Any, ...]]) -> Deferred[Rows]:
            d: Deferred[Any] = cursor.execute(sql, params)
            return d.addCallback(_fetch)

        return Deferred.fromCoroutine(
            self._drive(op, call, execute, lock=op.mode is Mode.EXCLUSIVE)
        )

    async def _drive(self, op: Operation[T], call: _Call, execute: Execute, lock: bool) -> T:
        steps = op.steps
        try:
            if lock:
                await self._statement(op, call, execute, _LOCK)
            value: Any = None
            error: Optional[BaseException] = None
            while True:
                try:
                    query = steps.send(value) if error is None else steps.throw(error)
                except StopIteration as stop:
                    result: T = stop.value
                    return result
                try:
                    value = await self._statement(op, call, execute, query)
                    error = None
                except (ProxyError, CancelledError) as e:
                    value, error = None, e
        finally:
            steps.close()

    async def _statement(
        self, op: Operation[T], call: _Call, execute: Execute, query: Query
    ) -> Rows:
        if call.cancelled:
            raise CancelledError()
        self._count(op.kind)
        try:
            return await execute(query.sql, _params(query.params))
        except CancelledError:
            if call.cancelled:
                raise
            raise DatabaseUnavailable(
                f"{op.name}: PostgreSQL cancelled the statement (statement_timeout?)"
            ) from None
        except Exception as e:
            mapped = mapPostgresError(e, query.sql)
            if mapped is None:
                raise
            raise mapped from e
