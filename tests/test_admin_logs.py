"""
Tests for C{mcpproxy-admin logs} (L{mcp_proxy.admin.cmdLogs}).

The rows are written by the real request log (L{RequestLog}) into the
C{repository} fixture's database, SQLite and PostgreSQL; the command then
runs in this process (L{mcp_proxy.admin.run}) against the same database,
and once as the console script.
"""

from __future__ import annotations

import datetime
import io
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, AsyncIterator
from urllib.parse import quote

import psycopg2.extensions
import pytest
import pytest_twisted
from attrs import define
from twisted.internet import reactor
from twisted.internet.task import deferLater

from mcp_proxy import admin, jsonrpc
from mcp_proxy.dispatch import CallContext
from mcp_proxy.models import AUTH_API_KEY, SSE, STREAMABLE_HTTPS
from mcp_proxy.requestlog import Encoding, Entry, RequestLog, buildRow

ROOT = Path(__file__).resolve().parent.parent
#: A row of long ago, for --since.
OLD = datetime.datetime(2020, 1, 2, 3, 4, 5, tzinfo=datetime.UTC).timestamp()


def databaseURL(repository: Any) -> str:
    """
    The C{--database} URL of a repository.
    """
    if repository.kind == "sqlite":
        return f"sqlite:///{repository.path}"
    params = psycopg2.extensions.parse_dsn(repository.dsn)
    auth = quote(params.get("user", "postgres"), safe="")
    if params.get("password"):
        auth += ":" + quote(params["password"], safe="")
    host = params.get("host", "127.0.0.1")
    port = params.get("port", "5432")
    return f"postgresql://{auth}@{host}:{port}/{quote(params['dbname'], safe='')}"


@define
class Logs:
    repository: Any
    url: str
    main: CallContext
    other: CallContext

    async def run(self, *argv: str) -> tuple[int, str, str]:
        args = admin.buildParser().parse_args(["logs", "--database", self.url, *argv])
        admin.resolveOptions(args, {})
        stdout, stderr = io.StringIO(), io.StringIO()
        code = await admin.run(reactor, args, {}, stdout, stderr)
        return code, stdout.getvalue(), stderr.getvalue()

    async def json(self, *argv: str) -> Any:
        code, out, err = await self.run("--json", *argv)
        assert code == 0, err
        return json.loads(out)


async def context(repository: Any, org: Any, name: str, transport: str) -> CallContext:
    group = await repository.createToolGroup(org.id, name, "", [])
    instance = await repository.createInstance(org.id, name, "", group.id, AUTH_API_KEY)
    return CallContext(instance.id, org.id, "key", None, transport)


async def record(requestLog: RequestLog, *args: Any, **kw: Any) -> None:
    requestLog.record(*args, **kw)
    await requestLog.flush()
    await deferLater(reactor, 0.002)


@pytest_twisted.async_yield_fixture
async def logs(repository: Any) -> AsyncIterator[Logs]:
    """
    Two instances with logged requests: on "main", a tools/list, a failed
    call, a call with a large result (no detail), a call stored plain and
    one stored double-encoded; on "other", one call; and a call of 2020.
    """
    org = await repository.createOrganization("org")
    main = await context(repository, org, "main", STREAMABLE_HTTPS)
    other = await context(repository, org, "other", SSE)
    old = buildRow(
        Entry(main.instanceId, org.id, SSE, "tools/list", {}, b"{}", None, 1, None, None, OLD),
        Encoding(),
    )
    await repository.insertRequestLogs([old])
    plain = RequestLog(repository=repository, reactor=reactor, maxDataBytes=2000)
    double = RequestLog(repository=repository, reactor=reactor, doubleEncode=True)
    plain.start()
    double.start()
    # One at a time, so that each has its own "createdAt" (newest first is
    # then one order).
    await record(plain, main, "tools/list", {}, jsonrpc.RawJSON(b'{"tools":[]}'), None, 1)
    await record(
        plain,
        main,
        "tools/call",
        {"name": "bad"},
        None,
        jsonrpc.JsonRpcError(-32603, "Unknown tool"),
        2,
    )
    await record(
        plain, main, "tools/call", {"name": "big"}, {"content": [{"text": "x" * 3000}]}, None, 3
    )
    await record(
        plain,
        main,
        "tools/call",
        {"name": "echo", "arguments": {"text": "plain"}},
        {"content": [{"type": "text", "text": "plain"}]},
        None,
        4,
        userAgent="curl/8.5",
    )
    await record(
        double,
        main,
        "tools/call",
        {"name": "echo", "arguments": {"text": "二重"}},
        {"content": [{"type": "text", "text": "二重"}]},
        None,
        5,
    )
    await record(plain, other, "tools/call", {"name": "echo"}, {"content": []}, None, 6)
    await plain.stop()
    await double.stop()
    yield Logs(repository, databaseURL(repository), main, other)


@pytest_twisted.ensureDeferred
async def test_listNewestFirst(logs: Logs) -> None:
    """
    The rows come newest first, with the log's columns; --instance,
    --since and --limit narrow them.
    """
    rows = await logs.json()
    assert [r["toolName"] for r in rows] == [
        "echo",
        "echo",
        "echo",
        "big",
        "bad",
        "tools/list",
        "tools/list",
    ]
    assert rows[0]["instanceId"] == logs.other.instanceId
    assert rows[-1]["createdAt"] == "2020-01-02T03:04:05Z"
    plain = rows[2]
    assert plain == {
        "id": plain["id"],
        "createdAt": plain["createdAt"],
        "instanceId": logs.main.instanceId,
        "organizationId": logs.main.organizationId,
        "method": "tools/call",
        "toolName": "echo",
        "transportType": STREAMABLE_HTTPS,
        "responseStatus": "200",
        "durationMs": 4,
        "inputBytes": len(b'{"name":"echo","arguments":{"text":"plain"}}'),
        "outputBytes": len(b'{"content":[{"type":"text","text":"plain"}]}'),
        "errorCode": None,
        "errorMessage": None,
        "userAgent": "curl/8.5",
    }
    bad = rows[4]
    assert (bad["responseStatus"], bad["errorCode"], bad["errorMessage"]) == (
        "500",
        "-32603",
        "Unknown tool",
    )
    assert rows[3]["errorMessage"].startswith("detail skipped: payload of ")

    assert len(await logs.json("--instance", logs.other.instanceId)) == 1
    assert len(await logs.json("--instance", logs.main.instanceId)) == 6
    assert len(await logs.json("--since", "2h")) == 6
    assert len(await logs.json("--since", "2021-01-01")) == 6
    assert len(await logs.json("--since", "2019-12-31T00:00:00+09:00")) == 7
    assert [r["toolName"] for r in await logs.json("--limit", "2")] == ["echo", "echo"]


@pytest_twisted.ensureDeferred
async def test_showDataJSON(logs: Logs) -> None:
    """
    --show-data reads the stored request and response back, from the
    plain and from the double-encoded form alike.
    """
    rows = await logs.json("--show-data", "--instance", logs.main.instanceId)
    byText = {}
    for row in rows:
        data = row["data"]
        if row["toolName"] != "echo":
            assert data is None
            continue
        text = data["request"]["params"]["arguments"]["text"]
        byText[text] = data
    assert set(byText) == {"plain", "二重"}
    plain, double = byText["plain"], byText["二重"]
    assert plain["encoding"] == "plain" and double["encoding"] == "double"
    assert plain["request"] == {
        "method": "tools/call",
        "params": {"name": "echo", "arguments": {"text": "plain"}},
    }
    assert plain["response"] == {"content": [{"type": "text", "text": "plain"}]}
    assert double["response"] == {"content": [{"type": "text", "text": "二重"}]}
    for data in (plain, double):
        assert 0 < data["compressedInputSize"] and 0 < data["originalInputSize"]
        assert 0 < data["compressionRatio"]


@pytest_twisted.ensureDeferred
async def test_text(logs: Logs) -> None:
    """
    Without --json: a table, or with --show-data one block per row with
    the request and response as indented JSON.
    """
    code, out, err = await logs.run("--limit", "3")
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].split() == [
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
    ]
    assert len(lines) == 4
    assert logs.other.instanceId in lines[1] and SSE in lines[1]
    code, out, err = await logs.run("--limit", "6", "--show-data")
    assert code == 0, err
    assert '"text": "二重"' in out
    assert "stored double JSON" in out and "stored plain JSON" in out
    assert "(no request/response stored)" in out
    assert "-32603: Unknown tool" in out
    code, out, err = await logs.run("--instance", logs.other.instanceId, "--since", "2030-01-01")
    assert (code, out) == (0, "(none)\n")


@pytest_twisted.ensureDeferred
async def test_errors(logs: Logs) -> None:
    code, _, err = await logs.run("--instance", "nope")
    assert code == 2 and "unknown instance id 'nope'" in err
    code, _, err = await logs.run("--since", "yesterday")
    assert code == 2 and "bad date 'yesterday'" in err
    code, _, err = await logs.run("--since", "never")
    assert code == 2 and "bad --since 'never'" in err


def test_limitValidated() -> None:
    for bad in ("0", "-3", "many"):
        try:
            admin.buildParser().parse_args(["logs", "--limit", bad])
        except SystemExit as e:
            assert e.code == 2
        else:
            raise AssertionError(f"--limit {bad} was accepted")


@pytest_twisted.ensureDeferred
async def test_consoleScript(repository: Any) -> None:
    """
    The command as the console script runs it, on an empty log.
    """
    if repository.kind != "sqlite":
        pytest.skip("the console script is run on SQLite only")
    environ = {k: v for k, v in os.environ.items() if not k.startswith("MCPPROXY_")}
    environ["PYTHONPATH"] = str(ROOT)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "mcp_proxy.admin",
            "logs",
            "--database",
            databaseURL(repository),
            "--json",
        ],
        env=environ,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == []
