"""
End-to-end tests of invalidation across processes: two real proxies
(C{twistd mcpproxy}) serve one database; C{mcpproxy-admin key revoke} in a
third process makes both refuse the key within a second, and ends a
session of that key on each.

  - PostgreSQL (its triggers notify both proxies);
  - PostgreSQL with a shared Redis cache (and mcpproxy-admin --cache);
  - SQLite with a shared Redis cache: mcpproxy-admin's Redis message is
    the only way the proxies learn of the change.

Nothing sleeps to synchronise: conditions are polled until a deadline.
"""

from __future__ import annotations

import http.client
import secrets
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg2.extensions
import pytest
from _proxyharness import ProxyProcess, admin, prepare, startProxy
from conftest import PostgresServer
from test_cache_redis import requireRedis

#: The most a change may take to reach every proxy.
BUDGET = 1.0

#: Seconds a test waits for what should happen much sooner.
PATIENCE = 10.0


def postgresURL(server: PostgresServer, database: str) -> str:
    """
    The C{postgresql://} URL of a database of the test server.
    """
    parts = psycopg2.extensions.parse_dsn(server.dsnFor(database))
    user = parts.get("user", "")
    password = f":{parts['password']}" if parts.get("password") else ""
    host = parts.get("host", "127.0.0.1")
    port = parts.get("port", "5432")
    return f"postgresql://{user}{password}@{host}:{port}/{database}"


def ping(proxy: ProxyProcess) -> int:
    """
    A session-less C{ping} with the proxy's key: its HTTP status.
    """
    status, _ = proxy.request(
        "POST",
        f"/mcp/{proxy.instanceId}",
        {"jsonrpc": "2.0", "id": 1, "method": "ping"},
        {"X-API-Key": proxy.key, "Accept": "application/json, text/event-stream"},
    )
    return status


class LegacySession:
    """
    A session of the legacy HTTP+SSE transport: its open C{GET /sse}
    stream, and the endpoint its messages go to.
    """

    def __init__(self, proxy: ProxyProcess) -> None:
        self.proxy = proxy
        self.connection = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=PATIENCE)
        self.connection.request(
            "GET",
            f"/sse/{proxy.instanceId}",
            headers={"X-API-Key": proxy.key, "Accept": "text/event-stream"},
        )
        self.stream = self.connection.getresponse()
        assert self.stream.status == 200
        self.endpoint = self._endpoint()

    def _endpoint(self) -> str:
        event = None
        while True:
            line = self.stream.readline().decode().strip()
            if line.startswith("event:"):
                event = line.partition(":")[2].strip()
            elif line.startswith("data:") and event == "endpoint":
                return line.partition(":")[2].strip()

    def post(self) -> int:
        """
        A C{ping} on the session, without a key: its HTTP status.
        """
        connection = http.client.HTTPConnection("127.0.0.1", self.proxy.port, timeout=PATIENCE)
        try:
            connection.request(
                "POST",
                self.endpoint,
                b'{"jsonrpc": "2.0", "id": 7, "method": "ping"}',
                {"Content-Type": "application/json"},
            )
            response = connection.getresponse()
            response.read()
            return response.status
        finally:
            connection.close()

    def ended(self) -> bool:
        """
        Whether the stream ends (read to its end, within the timeout).
        """
        try:
            self.stream.read()
        except TimeoutError:
            return False
        return True

    def close(self) -> None:
        self.connection.close()


def revokeOnTwoProxies(
    tmp: Path,
    database: str,
    proxyOptions: tuple[str, ...] = (),
    adminOptions: tuple[str, ...] = (),
) -> tuple[float, float]:
    """
    Start two proxies on C{database}, check the key works on both and open
    a session on each, revoke the key with mcpproxy-admin, and check that
    both refuse the key and end the sessions within L{BUDGET}.

    @return: the seconds from the end of C{mcpproxy-admin} to the last
        refusal, and from its start.
    """
    imported = prepare(database, tmp)
    proxies: list[ProxyProcess] = []
    sessions: list[LegacySession] = []
    try:
        for name in ("a", "b"):
            proxies.append(
                startProxy(
                    tmp, *proxyOptions, database=database, imported=imported, name=f"proxy-{name}"
                )
            )
        assert [ping(p) for p in proxies] == [200, 200]
        sessions = [LegacySession(p) for p in proxies]
        assert [s.post() for s in sessions] == [202, 202]

        started = time.monotonic()
        revoked = admin(database, *adminOptions, "key", "revoke", imported["keyId"])
        done = time.monotonic()
        assert revoked["state"] == "revoked"
        refusedAt: dict[int, float] = {}
        while len(refusedAt) < len(proxies):
            for i, proxy in enumerate(proxies):
                if i not in refusedAt:
                    status = ping(proxy)
                    if status != 200:
                        assert status == 401
                        refusedAt[i] = time.monotonic()
            assert time.monotonic() - done < PATIENCE, "the key is still accepted"
        latest = max(refusedAt.values())
        for session in sessions:
            while session.post() != 404:
                assert time.monotonic() - done < PATIENCE, "the session is still open"
            latest = max(latest, time.monotonic())
            assert session.ended()
        assert latest - done < BUDGET, f"{latest - done:.3f} s"
        return latest - done, latest - started
    finally:
        for session in sessions:
            session.close()
        for proxy in proxies:
            log = proxy.stop()
            assert "Traceback" not in log, log


def _report(what: str, afterAdmin: float, total: float) -> None:
    print(
        f"{what}: both proxies refused the key and ended its sessions "
        f"{afterAdmin * 1000:.0f} ms after mcpproxy-admin returned "
        f"({total * 1000:.0f} ms after it started)"
    )


@pytest.fixture
def postgresURLOfTest(postgresServer: PostgresServer, postgresDatabase: str) -> str:
    return postgresURL(postgresServer, postgresDatabase)


def test_revokeOnPostgres(tmp_path: Path, postgresURLOfTest: str) -> None:
    """
    PostgreSQL: the triggers tell both proxies.
    """
    _report("PostgreSQL", *revokeOnTwoProxies(tmp_path, postgresURLOfTest))


# -- Redis ------------------------------------------------------------------------------


def _redisCommand(*args: str) -> Any:
    """
    One command to the test Redis, over a plain socket (RESP2).
    """
    from urllib.parse import urlsplit

    url = urlsplit(requireRedis())
    with socket.create_connection((url.hostname or "127.0.0.1", url.port or 6379), 5) as s:
        stream = s.makefile("rwb")
        if url.path.strip("/"):
            _send(stream, "SELECT", url.path.strip("/"))
            _reply(stream)
        _send(stream, *args)
        return _reply(stream)


def _send(stream: Any, *args: str) -> None:
    parts = [f"*{len(args)}\r\n".encode()]
    for arg in args:
        data = arg.encode()
        parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
    stream.write(b"".join(parts))
    stream.flush()


def _reply(stream: Any) -> Any:
    line = stream.readline().rstrip(b"\r\n")
    kind, rest = line[:1], line[1:]
    if kind == b"+":
        return rest.decode()
    if kind == b"-":
        raise AssertionError(rest.decode())
    if kind == b":":
        return int(rest)
    if kind == b"$":
        size = int(rest)
        if size < 0:
            return None
        data = stream.read(size + 2)[:-2]
        return data
    if kind == b"*":
        return [_reply(stream) for _ in range(int(rest))]
    raise AssertionError(f"unexpected Redis reply {line!r}")


@pytest.fixture
def redisSpec() -> Iterator[str]:
    """
    A C{--cache} value for the test Redis under a fresh prefix; its keys
    are removed after the test.
    """
    prefix = f"mcpproxy-test:{secrets.token_hex(6)}:"
    yield requireRedis() + f"?prefix={prefix}"
    cursor = "0"
    while True:
        cursor, found = _redisCommand("SCAN", cursor, "MATCH", prefix + "*", "COUNT", "500")
        cursor = cursor.decode() if isinstance(cursor, bytes) else str(cursor)
        if found:
            _redisCommand("DEL", *[k.decode() for k in found])
        if cursor == "0":
            break


def test_revokeOnPostgresWithRedis(tmp_path: Path, postgresURLOfTest: str, redisSpec: str) -> None:
    """
    PostgreSQL and a shared Redis cache: the shared entry goes as well.
    """
    measured = revokeOnTwoProxies(
        tmp_path,
        postgresURLOfTest,
        proxyOptions=("--cache", redisSpec),
        adminOptions=("--cache", redisSpec),
    )
    _report("PostgreSQL + Redis", *measured)


def test_revokeOnSqliteWithRedis(tmp_path: Path, redisSpec: str) -> None:
    """
    SQLite and a shared Redis cache: mcpproxy-admin's Redis message is what
    tells both proxies.
    """
    database = f"sqlite:///{tmp_path}/shared.sqlite3"
    measured = revokeOnTwoProxies(
        tmp_path,
        database,
        proxyOptions=("--cache", redisSpec),
        adminOptions=("--cache", redisSpec),
    )
    _report("SQLite + Redis", *measured)
