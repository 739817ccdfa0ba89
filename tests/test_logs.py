"""
Tests for L{mcp_proxy.logs}: levels and formats, redaction, request
context, the per-request debug event, and the way twistd is given the
observer (a real C{twistd -n} run with a throwaway plugin).
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.application.service import Application, IService, Service
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater
from twisted.logger import ILogObserver, Logger, LogLevel, eventsFromJSONLogFile
from twisted.logger._flatten import flattenEvent
from twisted.python import usage
from twisted.web.test.requesthelper import DummyRequest
from zope.interface.verify import verifyObject

from mcp_proxy import logs
from mcp_proxy.logs import (
    MASK,
    LogObserverService,
    RedactingObserver,
    bindRequest,
    currentRequest,
    isSecretField,
    logRequest,
    makeObserver,
    observerForTwistd,
    observerFromEnvironment,
    redact,
    redactEvent,
    redactUrl,
    requestContextOf,
    requestIdFor,
    runInRequestContext,
)
from mcp_proxy.session import sessionLogId

ROOT = Path(__file__).resolve().parent.parent
SECRET = "mcpp_SuperSecretValue_0123456789"


def emitAll(log: Logger) -> None:
    log.debug("event at {which}", which="debug")
    log.info("event at {which}", which="info")
    log.warn("event at {which}", which="warn")
    log.error("event at {which}", which="error")
    log.critical("event at {which}", which="critical")


def records(stream: io.StringIO) -> list[dict[str, Any]]:
    """
    The JSON records of an RFC 7464 text: each a record separator, one
    JSON object and a newline.
    """
    text = stream.getvalue()
    assert text.endswith("\n")
    lines = text.split("\n")[:-1]
    assert all(line.startswith("\x1e") for line in lines)
    return [json.loads(line[1:]) for line in lines]


@pytest.mark.parametrize(
    "level, expected",
    [
        ("debug", ["debug", "info", "warn", "error", "critical"]),
        ("info", ["info", "warn", "error", "critical"]),
        ("WARN", ["warn", "error", "critical"]),
        ("warning", ["warn", "error", "critical"]),
        ("error", ["error", "critical"]),
        ("critical", ["critical"]),
        (LogLevel.error, ["error", "critical"]),
    ],
)
def test_levelFilters(level: Any, expected: list[str]) -> None:
    stream = io.StringIO()
    observer = makeObserver(level, "json", stream)
    verifyObject(ILogObserver, observer)
    emitAll(Logger(namespace="test", observer=observer))
    found = records(stream)
    assert [r["which"] for r in found] == expected
    assert [r["log_level"]["name"] for r in found] == expected


def test_textFormat() -> None:
    stream = io.StringIO()
    emitAll(Logger(namespace="test", observer=makeObserver("warn", "text", stream)))
    lines = stream.getvalue().splitlines()
    assert len(lines) == 3
    assert lines[0].endswith("[test#warn] event at warn")
    assert lines[2].endswith("[test#critical] event at critical")


def test_jsonRecordsReadBack() -> None:
    """
    The JSON output is read back by twisted.logger itself, fields intact.
    """
    stream = io.StringIO()
    log = Logger(namespace="mcp_proxy.test", observer=makeObserver("info", "json", stream))
    log.info("served {path} in {seconds}", path="/mcp", seconds=0.25, count=3)
    stream.seek(0)
    [event] = list(eventsFromJSONLogFile(stream))
    assert event["log_namespace"] == "mcp_proxy.test"
    assert event["log_format"] == "served {path} in {seconds}"
    assert (event["path"], event["seconds"], event["count"]) == ("/mcp", 0.25, 3)
    assert event["log_level"] == LogLevel.info


def test_badLevelOrFormat() -> None:
    with pytest.raises(ValueError, match="unknown log level 'loud'"):
        makeObserver("loud", "text", io.StringIO())
    with pytest.raises(ValueError, match="unknown log format 'xml'"):
        makeObserver("info", "xml", io.StringIO())


# -- redaction ----------------------------------------------------------------------


def test_secretFieldNames() -> None:
    for name in (
        "apiKey",
        "api_key",
        "X-API-Key",
        "token",
        "accessToken",
        "clientSecret",
        "password",
        "credentials",
        "Authorization",
        "proxy-authorization",
    ):
        assert isSecretField(name), name
    for name in ("keyId", "key_id", "tokenIds", "method", "instance", "session", "path"):
        assert not isSecretField(name), name


def test_redactUrl() -> None:
    assert (
        redactUrl(f"/sse/i1?api-key={SECRET}&x=1&sessionId=abc#f")
        == "/sse/i1?api-key=***&x=1&sessionId=***#f"
    )
    assert redactUrl(f"/messages/i?session_id=s1&api_key={SECRET}") == (
        "/messages/i?session_id=***&api_key=***"
    )
    assert redactUrl(f"GET http://h/x?API-KEY={SECRET} then") == "GET http://h/x?API-KEY=*** then"
    assert redactUrl("/mcp/i?cursor=2") == "/mcp/i?cursor=2"
    assert redactUrl("no query") == "no query"


def test_redactNested() -> None:
    value = {
        "headers": {"Authorization": f"Bearer {SECRET}", "Accept": "application/json"},
        "env": [{"name": "X", "password": SECRET}],
        "url": f"https://h/?token={SECRET}",
        "keyId": "k1",
        b"raw": 1,
    }
    assert redact(value) == {
        "headers": {"Authorization": MASK, "Accept": "application/json"},
        "env": [{"name": "X", "password": MASK}],
        "url": f"https://h/?token={MASK}",
        "keyId": "k1",
        b"raw": 1,
    }
    assert redact(None, "apiKey") is None
    assert redact(12, "tokens") == MASK


def test_flattenedByAnotherObserver() -> None:
    """
    An event flattened (with its secret) by an observer before ours is
    written from the redacted fields.
    """
    from twisted.logger import LogPublisher, formatEvent

    stream = io.StringIO()
    textStream = io.StringIO()
    publisher = LogPublisher()
    seen: list[str] = []
    publisher.addObserver(lambda event: seen.append(formatEvent(event)))
    publisher.addObserver(lambda event: flattenEvent(event))
    publisher.addObserver(makeObserver("info", "json", stream))
    publisher.addObserver(makeObserver("info", "text", textStream))
    Logger(namespace="x", observer=publisher).warn("key {apiKey}", apiKey=SECRET)
    assert seen == [f"key {SECRET}"]
    assert SECRET not in stream.getvalue()
    assert SECRET not in textStream.getvalue()
    assert textStream.getvalue().endswith("key ***\n")


def test_redactEventLeavesOriginal() -> None:
    event = {"log_format": "{apiKey}", "apiKey": SECRET, "log_namespace": "x", "n": 1}
    redacted = redactEvent(event)
    assert redacted == {"log_format": "{apiKey}", "apiKey": MASK, "log_namespace": "x", "n": 1}
    assert event["apiKey"] == SECRET


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_noSecretReachesTheOutput(fmt: str) -> None:
    """
    Whatever fields a warning carries, the written log has no secret in
    it, in text (where the format string shows fields) and in JSON (where
    every field is written).
    """
    stream = io.StringIO()
    observer = makeObserver("info", fmt, stream)
    verifyObject(ILogObserver, RedactingObserver(observer))
    log = Logger(namespace="test", observer=observer)
    log.warn(
        "refused {apiKey} on {url} with {headers}",
        apiKey=SECRET,
        url=f"/sse/i?api-key={SECRET}",
        headers={"X-API-Key": SECRET},
        upstreamToken=SECRET,
        keyId="key-1",
    )
    output = stream.getvalue()
    assert SECRET not in output
    assert MASK in output
    if fmt == "json":
        [record] = records(stream)
        assert record["keyId"] == "key-1"
        assert record["upstreamToken"] == MASK


# -- requests ---------------------------------------------------------------------------


def test_requestIdFor() -> None:
    request = DummyRequest([b"mcp"])
    request.requestHeaders.setRawHeaders(b"x-request-id", [b"abc-123.X:y"])
    assert requestIdFor(request) == "abc-123.X:y"
    for bad in (b"two\nlines", b"x" * 129, b"", b"sp ace", b"\xff"):
        request = DummyRequest([b"mcp"])
        request.requestHeaders.setRawHeaders(b"x-request-id", [bad])
        generated = requestIdFor(request)
        assert len(generated) == 16 and int(generated, 16) >= 0
        assert requestIdFor(request) == generated
    other = DummyRequest([b"mcp"])
    assert requestIdFor(other) != requestIdFor(DummyRequest([b"mcp"]))
    assert requestIdFor(other) == requestIdFor(other)


@pytest.mark.parametrize("level, emitted", [("debug", True), ("info", False)])
def test_logRequestAtDebugOnly(level: str, emitted: bool) -> None:
    stream = io.StringIO()
    log = Logger(namespace="mcp_proxy.transport", observer=makeObserver(level, "json", stream))
    sessionId = "0123456789abcdef0123456789abcdef"
    logRequest(
        log,
        requestId="r-1",
        instance="inst-1",
        sessionId=sessionId,
        method="tools/call",
        status=200,
        duration=0.0123456,
        transport="streamable-http",
        url=f"/mcp/inst-1?api-key={SECRET}",
    )
    if not emitted:
        assert stream.getvalue() == ""
        return
    [record] = records(stream)
    assert record["log_level"]["name"] == "debug"
    assert {k: record[k] for k in ("requestId", "instance", "session", "method", "status")} == {
        "requestId": "r-1",
        "instance": "inst-1",
        "session": sessionLogId(sessionId),
        "method": "tools/call",
        "status": 200,
    }
    assert record["duration"] == 0.0123456
    assert record["durationMs"] == 12.346
    assert sessionId not in stream.getvalue()
    assert SECRET not in stream.getvalue()


def test_logRequestCost() -> None:
    """
    With debug off, a request's event costs little (it is built and
    dropped by the level filter); a generous bound, to catch a slow path.
    """
    import timeit

    log = Logger(namespace="x", observer=makeObserver("info", "json", io.StringIO()))

    def once() -> None:
        logRequest(
            log,
            requestId="r",
            instance="i",
            sessionId=None,
            method="ping",
            status=200,
            duration=0.001,
        )

    seconds = min(timeit.repeat(once, number=2000, repeat=3)) / 2000
    assert seconds < 100e-6


@pytest_twisted.ensureDeferred
async def test_boundContextFollowsEachRequest() -> None:
    """
    Events logged while serving a request carry its context (also in
    coroutines it awaits), each request its own; others carry none.
    """
    stream = io.StringIO()
    textStream = io.StringIO()
    json_ = makeObserver("info", "json", stream)
    text = makeObserver("info", "text", textStream)

    def both(event: dict[str, Any]) -> None:
        json_(event)
        text(event)

    log = Logger(namespace="test", observer=both)

    async def inner(name: str) -> None:
        await deferLater(reactor, 0.01)
        log.warn("upstream {name} slow", name=name)

    async def serve(request: DummyRequest, sessionId: str) -> None:
        context = bindRequest(request, "inst-" + requestIdFor(request), sessionId, "tools/call")
        assert currentRequest() is context
        await deferLater(reactor, 0)
        await inner(requestIdFor(request))
        log.error("done")

    requests = []
    for requestId in ("r1", "r2"):
        request = DummyRequest([b"mcp"])
        request.requestHeaders.setRawHeaders(b"x-request-id", [requestId.encode()])
        requests.append(request)
    first = Deferred.fromCoroutine(serve(requests[0], "s-one"))
    second = Deferred.fromCoroutine(serve(requests[1], "s-two"))
    await first
    await second
    log.warn("outside")
    assert currentRequest() is None
    found = records(stream)
    assert len(found) == 5
    for requestId, sessionId in (("r1", "s-one"), ("r2", "s-two")):
        mine = [r for r in found if r.get("requestId") == requestId]
        assert sorted(r["log_format"] for r in mine) == ["done", "upstream {name} slow"]
        for r in mine:
            assert r["instance"] == "inst-" + requestId
            assert r["session"] == sessionLogId(sessionId)
        assert sessionId not in stream.getvalue()
    [outside] = [r for r in found if r["log_format"] == "outside"]
    assert "requestId" not in outside and "session" not in outside
    lines = textStream.getvalue().splitlines()
    expected = f"upstream r1 slow [requestId=r1 instance=inst-r1 session={sessionLogId('s-one')}]"
    assert any(line.endswith(expected) for line in lines), lines
    assert lines[-1].endswith("outside")
    context = requestContextOf(requests[0])
    assert context is not None
    assert (context.requestId, context.method, context.sessionId) == ("r1", "tools/call", "s-one")
    assert "s-one" not in repr(context)
    assert requestContextOf(DummyRequest([b""])) is None


def test_runInRequestContext() -> None:
    """
    The request's id is bound while the function runs, and in coroutines
    it starts, and not after.
    """
    events: list[dict[str, Any]] = []
    log = Logger(namespace="t", observer=RedactingObserver(events.append))
    request = DummyRequest([b"mcp"])
    later: Deferred[None] = Deferred()

    async def work() -> None:
        log.info("before")
        await later
        log.info("after")

    def render(value: int) -> int:
        Deferred.fromCoroutine(work())
        log.info("in render")
        return value * 2

    assert runInRequestContext(request, render, 21) == 42
    assert currentRequest() is None
    log.info("outside")
    later.callback(None)
    requestId = requestIdFor(request)
    assert [(e["log_format"], e.get("requestId")) for e in events] == [
        ("before", requestId),
        ("in render", requestId),
        ("outside", None),
        ("after", requestId),
    ]


def test_observerFromEnvironment(monkeypatch: pytest.MonkeyPatch) -> None:
    stream = io.StringIO()
    monkeypatch.setattr(sys, "stdout", stream)
    monkeypatch.setenv("MCPPROXY_LOG_LEVEL", "error")
    monkeypatch.setenv("MCPPROXY_LOG_FORMAT", "json")
    emitAll(Logger(namespace="env", observer=observerFromEnvironment()))
    assert [r["which"] for r in records(stream)] == ["error", "critical"]
    monkeypatch.delenv("MCPPROXY_LOG_LEVEL")
    monkeypatch.delenv("MCPPROXY_LOG_FORMAT")
    stream.truncate(0)
    stream.seek(0)
    emitAll(Logger(namespace="env", observer=observerFromEnvironment()))
    assert len(stream.getvalue().splitlines()) == 4
    assert not stream.getvalue().startswith("\x1e")
    monkeypatch.setenv("MCPPROXY_LOG_LEVEL", "chatty")
    with pytest.raises(ValueError, match="MCPPROXY_LOG_LEVEL"):
        observerFromEnvironment()
    monkeypatch.setenv("MCPPROXY_LOG_LEVEL", "info")
    monkeypatch.setenv("MCPPROXY_LOG_FORMAT", "yaml")
    with pytest.raises(ValueError, match="MCPPROXY_LOG_FORMAT"):
        observerFromEnvironment()


# -- twistd ----------------------------------------------------------------------------


class PluginOptions(usage.Options):
    optParameters = [["log-level", None, "info", ""], ["log-format", None, "text", ""]]


def test_observerForTwistdFollowsItsOptions(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    stream = io.StringIO()
    monkeypatch.setattr(sys, "stdout", stream)
    options = PluginOptions()
    observer = observerForTwistd("warn", "text", options)
    assert observer is not None
    emitAll(Logger(namespace="t", observer=observer))
    assert len(stream.getvalue().splitlines()) == 3
    options.parent = {"logger": "some.factory", "nodaemon": True}
    assert observerForTwistd("warn", "text", options) is None
    options.parent = {"syslog": True, "nodaemon": True}
    assert observerForTwistd("warn", "text", options) is None
    path = tmp_path / "proxy.log"
    options.parent = {"logfile": str(path), "nodaemon": True}
    observer = observerForTwistd("error", "json", options)
    assert observer is not None
    emitAll(Logger(namespace="t", observer=observer))
    with path.open() as f:
        assert [e["which"] for e in eventsFromJSONLogFile(f)] == ["error", "critical"]


def test_logObserverServiceSetsTheApplicationsObserver() -> None:
    observer = makeObserver("info", "text", io.StringIO())
    child = Service()
    top = LogObserverService(child, observer)
    assert list(top) == [child]
    application = Application("mcpproxy")
    top.setServiceParent(application)
    assert application.getComponent(ILogObserver) is observer
    assert list(IService(application)) == [top]
    # An observer the application already has is kept.
    other = Application("mcpproxy")
    mine = makeObserver("info", "text", io.StringIO())
    other.setComponent(ILogObserver, mine)
    LogObserverService(Service(), observer).setServiceParent(other)
    assert other.getComponent(ILogObserver) is mine
    # None leaves twistd's own.
    third = Application("mcpproxy")
    LogObserverService(Service(), None).setServiceParent(third)
    assert third.getComponent(ILogObserver) is None


PLUGIN = """
from twisted.application.service import ServiceMaker

logtest = ServiceMaker("log test", "logtest_tap", "Logs at every level.", "logtest")
"""

TAP = """
from twisted.application.service import Service
from twisted.logger import Logger
from twisted.python import usage

from mcp_proxy.logs import LogObserverService, observerForTwistd


class Options(usage.Options):
    optParameters = [["log-level", None, "info", ""], ["log-format", None, "text", ""]]


class Emitter(Service):
    def startService(self):
        from twisted.internet import reactor

        log = Logger(namespace="logtest")
        log.debug("a debug event")
        log.info("an info event")
        log.warn("a warning about {apiKey}", apiKey="mcpp_SuperSecretValue_0123456789")
        log.error("an error")
        reactor.callLater(0, reactor.stop)


def makeService(options):
    observer = observerForTwistd(options["log-level"], options["log-format"], options)
    return LogObserverService(Emitter(), observer)
"""


def runTwistd(tmp_path: Path, *args: str) -> str:
    """
    Run C{twistd -n --pidfile= ARGS} with the throwaway C{logtest} plugin;
    return its standard output.
    """
    plugins = tmp_path / "twisted" / "plugins"
    plugins.mkdir(parents=True, exist_ok=True)
    (plugins / "logtest_plugin.py").write_text(textwrap.dedent(PLUGIN))
    (tmp_path / "logtest_tap.py").write_text(textwrap.dedent(TAP))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), str(ROOT), env.get("PYTHONPATH", "")])
    result = subprocess.run(
        [sys.executable, "-c", "from twisted.scripts.twistd import run; run()", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        cwd=str(tmp_path),
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def test_twistdAppliesThePluginsLevelAndFormat(tmp_path: Path) -> None:
    """
    C{twistd -n logtest --log-level warn --log-format json} writes only
    warnings and errors, as JSON records, redacted; twistd's own info
    lines are filtered too.
    """
    output = runTwistd(
        tmp_path, "-n", "--pidfile=", "logtest", "--log-level", "warn", "--log-format", "json"
    )
    found = records(io.StringIO(output))
    assert [(r["log_namespace"], r["log_level"]["name"]) for r in found] == [
        ("logtest", "warn"),
        ("logtest", "error"),
    ]
    assert found[0]["apiKey"] == MASK
    assert SECRET not in output


def test_twistdTextAtDebug(tmp_path: Path) -> None:
    output = runTwistd(tmp_path, "-n", "--pidfile=", "logtest", "--log-level", "debug")
    assert "[logtest#debug] a debug event" in output
    assert "[logtest#info] an info event" in output
    assert "twistd" in output and "starting up" in output
    assert SECRET not in output


def test_twistdLogfileAndLogger(tmp_path: Path) -> None:
    """
    C{--logfile} is honoured; C{--logger} wins over the plugin's options.
    """
    path = tmp_path / "out.log"
    output = runTwistd(
        tmp_path, "-n", "--pidfile=", f"--logfile={path}", "logtest", "--log-level", "error"
    )
    assert output == ""
    lines = path.read_text().splitlines()
    assert len(lines) == 1 and lines[0].endswith("[logtest#error] an error")
    env = {"MCPPROXY_LOG_LEVEL": "warn", "MCPPROXY_LOG_FORMAT": "json"}
    old = {name: os.environ.get(name) for name in env}
    os.environ.update(env)
    try:
        output = runTwistd(
            tmp_path,
            "-n",
            "--pidfile=",
            "--logger=mcp_proxy.logs.observerFromEnvironment",
            "logtest",
            "--log-level",
            "debug",
        )
    finally:
        for name, previous in old.items():
            if previous is None:
                del os.environ[name]
            else:
                os.environ[name] = previous
    levels = [r["log_level"]["name"] for r in records(io.StringIO(output))]
    assert levels == ["warn", "error"]


def test_moduleName() -> None:
    assert logs.__name__ == "mcp_proxy.logs"
