"""
Tests for L{mcp_proxy.upstream.stdio}: real server processes on the real
reactor, with a L{Clock} where timers matter.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path
from typing import Any, Callable

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import CancelledError, Deferred, gatherResults, succeed
from twisted.internet.task import Clock
from twisted.logger import globalLogPublisher
from upstreamhelpers import (
    ECHO,
    SERVERS,
    TESTSERVER,
    Started,
    callTool,
    makeConfig,
    nothingLeftOver,
    within,
)
from zope.interface.verify import verifyObject

from mcp_proxy.interfaces import IUpstream
from mcp_proxy.jsonrpc import JsonRpcError
from mcp_proxy.upstream import (
    SAFE_ENV_NAMES,
    StdioUpstream,
    UpstreamError,
    UpstreamExited,
    UpstreamTimeout,
    UpstreamUnavailable,
    _spawn,
    childEnvironment,
    resolveCommand,
)
from mcp_proxy.upstream.stdio import CappedLines, LineSplitter, MessageTooLarge

FASTMCP = str(SERVERS / "fastmcp_server.py")


@pytest.fixture(autouse=True)
def noLeftovers():
    """After each test: no new child process or timer."""
    with nothingLeftOver():
        yield


@pytest_twisted.async_yield_fixture
async def spawn():
    """
    Start upstreams; stop them all after the test.
    """
    started = Started(StdioUpstream)
    yield started
    await started.stopAll()


class LogWatcher:
    """
    Records log events and fires Deferreds when one matches.
    """

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []
        self._waiting: list[tuple[Callable[[dict[str, Any]], bool], Deferred[Any]]] = []

    def __call__(self, event: dict[str, Any]) -> None:
        self.events.append(event)
        for item in list(self._waiting):
            if item[0](event):
                self._waiting.remove(item)
                item[1].callback(event)

    def wait(self, predicate: Callable[[dict[str, Any]], bool]) -> Deferred[Any]:
        for event in self.events:
            if predicate(event):
                return succeed(event)
        d: Deferred[Any] = Deferred()
        self._waiting.append((predicate, d))
        return within(d)

    def matching(self, predicate: Callable[[dict[str, Any]], bool]) -> list[dict[str, Any]]:
        return [e for e in self.events if predicate(e)]


@pytest.fixture
def logs():
    watcher = LogWatcher()
    globalLogPublisher.addObserver(watcher)
    yield watcher
    globalLogPublisher.removeObserver(watcher)


@pytest.fixture
def subreaper():
    """
    Let this process reap the orphans of upstream process groups (PID 1
    here does not reap).
    """
    assert _spawn.setSubreaper(True)
    yield
    _spawn.setSubreaper(False)


# -- pure parts ----------------------------------------------------------------


class TestLineSplitter:
    def test_splitsAcrossChunks(self) -> None:
        """Lines split over reads and several lines in one read come out whole."""
        splitter = LineSplitter(100)
        assert splitter.feed(b'{"a"') == []
        assert splitter.feed(b":1}\n{}\n{") == [b'{"a":1}', b"{}"]
        assert splitter.feed(b"}\n") == [b"{}"]

    def test_twentyMebibytesFast(self) -> None:
        """A 20 MiB line fed in 8 KiB reads is split in linear time."""
        line = b"x" * (20 * 1024 * 1024)
        splitter = LineSplitter(64 * 1024 * 1024)
        started = time.perf_counter()
        out: list[bytes] = []
        for i in range(0, len(line), 8192):
            out += splitter.feed(line[i : i + 8192])
        out += splitter.feed(b"\n")
        assert out == [line]
        assert time.perf_counter() - started < 2

    def test_tooLarge(self) -> None:
        """A partial line past the limit raises, keeping the lines before it."""
        splitter = LineSplitter(10)
        with pytest.raises(MessageTooLarge) as e:
            splitter.feed(b"ok\n" + b"y" * 11)
        assert e.value.lines == [b"ok"]

    def test_cappedLines(self) -> None:
        """Stderr lines are cut at the limit and flagged."""
        lines = CappedLines(4)
        assert lines.feed(b"abcdefgh") == []
        assert lines.feed(b"ij\nxy\n") == [(b"abcd", True), (b"xy", False)]
        assert lines.feed(b"tail") == []
        assert lines.flush() == [(b"tail", False)]


def test_childEnvironment() -> None:
    """Only the safe names cross from the proxy; the config wins; PATH is set."""
    proxy = {"HOME": "/h", "PATH": "/p", "SECRET_X": "s", "TERM": "() { :; }", "USER": "u"}
    env = childEnvironment({"USER": "config", "API_KEY": "k"}, proxy)
    assert env == {"HOME": "/h", "PATH": "/p", "USER": "config", "API_KEY": "k"}
    assert childEnvironment({}, {})["PATH"] == os.defpath


def test_resolveCommand(tmp_path: Path) -> None:
    """Commands are looked up on the child's PATH and made absolute."""
    tool = tmp_path / "tool"
    tool.write_text("#!/bin/sh\n")
    tool.chmod(0o755)
    assert resolveCommand("n", "tool", {"PATH": str(tmp_path)}) == str(tool)
    assert resolveCommand("n", "./tool", {"PATH": ""}, cwd=str(tmp_path)) == str(tool)
    with pytest.raises(UpstreamUnavailable, match="not found on PATH"):
        resolveCommand("n", "tool", {"PATH": "/nonexistent"})


# -- handshake -----------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_handshake(spawn) -> None:
    """start() runs initialize; the server's answer is kept."""
    upstream = await spawn(makeConfig(TESTSERVER), clientCapabilities={"roots": {}})
    verifyObject(IUpstream, upstream)
    assert upstream.alive and upstream.ready
    assert upstream.protocolVersion == "2025-11-25"
    assert upstream.serverInfo == {"name": "testserver", "version": "0.1"}
    assert upstream.serverCapabilities == {"tools": {}}
    assert upstream.instructions == "for tests"
    sent = (await callTool(upstream, "initParams"))["structuredContent"]
    assert sent["clientInfo"] == {"name": "mcp-proxy", "version": "0.1.0"}
    assert sent["protocolVersion"] == "2025-11-25"
    assert sent["capabilities"] == {"roots": {}}


@pytest_twisted.ensureDeferred
async def test_olderVersionAccepted(spawn) -> None:
    """A server answering an older supported version is used at that version."""
    upstream = await spawn(makeConfig(TESTSERVER, "--version", "2024-11-05"))
    assert upstream.protocolVersion == "2024-11-05"


@pytest_twisted.ensureDeferred
async def test_unsupportedVersionRefused() -> None:
    """An unknown protocol version fails start() and stops the process."""
    upstream = StdioUpstream(reactor, makeConfig(TESTSERVER, "--version", "1999-01-01"))
    with pytest.raises(UpstreamUnavailable, match="unsupported protocol version '1999-01-01'"):
        await within(upstream.start())
    assert not upstream.alive
    assert upstream.state == "ended"


@pytest_twisted.ensureDeferred
async def test_echoServer(spawn) -> None:
    """The example server negotiates, lists and calls its tools."""
    upstream = await spawn(makeConfig(ECHO))
    assert upstream.serverInfo["name"] == "echo-server"
    tools = await upstream.request("tools/list", None, 10)
    assert [t["name"] for t in tools["tools"]] == ["echo", "add", "sleep"]
    added = await callTool(upstream, "add", a=2, b=3)
    assert added["structuredContent"] == {"result": 5}
    with pytest.raises(UpstreamError) as e:
        await callTool(upstream, "nope")
    assert e.value.code == -32602 and e.value.fromUpstream
    with pytest.raises(UpstreamError) as e:
        await upstream.request("nope/nope", None, 10)
    assert e.value.code == -32601


@pytest_twisted.ensureDeferred
async def test_fastmcpInterop(spawn) -> None:
    """A server built on the official mcp SDK (FastMCP) works as an upstream."""
    pytest.importorskip("mcp.server.fastmcp")
    upstream = await spawn(makeConfig(FASTMCP))
    assert upstream.protocolVersion == "2025-11-25"
    assert upstream.serverInfo["name"] == "fastmcp-test"
    tools = await upstream.request("tools/list", None, 20)
    assert {t["name"] for t in tools["tools"]} == {"echo", "add"}
    result = await callTool(upstream, "add", a=2, b=40)
    assert result["structuredContent"] == {"result": 42}
    assert (await callTool(upstream, "echo", text="hi"))["content"][0]["text"] == "hi"
    assert await upstream.request("ping", None, 10) == {}


# -- multiplexing --------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_hundredConcurrentCalls(spawn) -> None:
    """100 concurrent calls through one process each get their own answer."""
    upstream = await spawn(makeConfig(ECHO))
    started = time.perf_counter()
    results = await within(
        gatherResults(
            [Deferred.fromCoroutine(callTool(upstream, "echo", text=f"n{i}")) for i in range(100)]
        )
    )
    elapsed = time.perf_counter() - started
    assert [r["content"][0]["text"] for r in results] == [f"n{i}" for i in range(100)]
    assert upstream.inFlight == 0
    print(f"100 concurrent calls: {elapsed * 1000:.1f} ms")


@pytest_twisted.ensureDeferred
async def test_outOfOrder(spawn) -> None:
    """A later request answered first goes to its own caller."""
    upstream = await spawn(makeConfig(TESTSERVER))
    first = Deferred.fromCoroutine(callTool(upstream, "hold", key="a"))
    second = Deferred.fromCoroutine(callTool(upstream, "hold", key="b"))
    await callTool(upstream, "release", key="b")
    assert (await within(second))["content"][0]["text"] == "released b"
    assert not first.called
    assert upstream.inFlight == 1
    await callTool(upstream, "release", key="a")
    assert (await within(first))["content"][0]["text"] == "released a"


# -- timeouts and cancellation ------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_timeoutCancelsUpstream(spawn, logs) -> None:
    """
    On timeout the caller gets UpstreamTimeout, the server gets
    notifications/cancelled with the upstream id, and the late answer is
    dropped.
    """
    clock = Clock()
    upstream = await spawn(makeConfig(TESTSERVER), clock=clock)
    held = upstream.request("tools/call", {"name": "hold", "arguments": {"key": "k"}}, 5)
    clock.advance(4.9)
    assert not held.called
    clock.advance(0.1)
    with pytest.raises(UpstreamTimeout, match="did not answer tools/call within 5 s"):
        await held
    assert upstream.inFlight == 0
    cancelled = await callTool(upstream, "cancellations")
    assert cancelled["structuredContent"] == {"ids": [2]}
    await callTool(upstream, "release", key="k")
    event = await logs.wait(lambda e: e.get("requestId") == 2 and "unknown" in e["log_format"])
    assert event["upstream"] == "test"
    assert upstream.droppedResponses == 1
    assert (await callTool(upstream, "echo", text="still fine"))["content"][0]["text"]


@pytest_twisted.ensureDeferred
async def test_callerCancel(spawn) -> None:
    """Cancelling a request fails it with CancelledError and cancels it upstream."""
    upstream = await spawn(makeConfig(TESTSERVER))
    held = upstream.request("tools/call", {"name": "hold", "arguments": {"key": "k"}}, 20)
    held.cancel()
    with pytest.raises(CancelledError):
        await held
    assert upstream.inFlight == 0
    cancelled = await callTool(upstream, "cancellations")
    assert cancelled["structuredContent"] == {"ids": [2]}
    await callTool(upstream, "release", key="k")


@pytest_twisted.ensureDeferred
async def test_echoServerSleepCancelled(spawn) -> None:
    """The example server's sleep does not block other calls and can be cancelled."""
    upstream = await spawn(makeConfig(ECHO))
    sleeping = upstream.request("tools/call", {"name": "sleep", "arguments": {"seconds": 30}}, 60)
    assert (await callTool(upstream, "echo", text="x"))["content"][0]["text"] == "x"
    sleeping.cancel()
    with pytest.raises(CancelledError):
        await sleeping
    quick = await callTool(upstream, "sleep", seconds=0)
    assert quick["content"][0]["text"] == "slept 0 s"


# -- errors --------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_upstreamErrorKept(spawn) -> None:
    """A JSON-RPC error from the upstream keeps its code, message and data."""
    upstream = await spawn(makeConfig(TESTSERVER))
    with pytest.raises(UpstreamError) as e:
        await callTool(upstream, "error", code=-32042, message="go there", data={"url": "u"})
    assert (e.value.code, e.value.message, e.value.data) == (-32042, "go there", {"url": "u"})
    assert e.value.fromUpstream
    assert type(e.value) is UpstreamError


@pytest_twisted.ensureDeferred
async def test_processDeathFailsInFlight(spawn) -> None:
    """When the process dies every in-flight call fails at once, naming the status."""
    ended: list[Any] = []
    upstream = await spawn(makeConfig(TESTSERVER), onEnded=lambda u, e: ended.append(e))
    held = Deferred.fromCoroutine(callTool(upstream, "hold", key="k"))
    crash = Deferred.fromCoroutine(callTool(upstream, "crash", status=3))
    for d in (held, crash):
        with pytest.raises(UpstreamExited, match=r"^upstream test exited \(status 3\)$") as e:
            await within(d)
        assert e.value.status == 3 and e.value.code == -32603
    assert not upstream.alive
    assert [type(e) for e in ended] == [UpstreamExited]
    with pytest.raises(UpstreamUnavailable, match=r"exited \(status 3\)"):
        await callTool(upstream, "echo")


@pytest_twisted.ensureDeferred
async def test_killedBySignal(spawn) -> None:
    """A process killed by a signal fails its calls naming the signal."""
    upstream = await spawn(makeConfig(TESTSERVER))
    held = Deferred.fromCoroutine(callTool(upstream, "hold", key="k"))
    assert upstream.pid is not None
    os.kill(upstream.pid, signal.SIGKILL)
    with pytest.raises(UpstreamExited, match=r"exited \(signal 9\)"):
        await within(held)


@pytest_twisted.ensureDeferred
async def test_missingExecutable() -> None:
    """A command that is not on PATH fails start() clearly; nothing is spawned."""
    upstream = StdioUpstream(reactor, makeConfig(command="no-such-mcp-server-xyz"))
    with pytest.raises(UpstreamUnavailable) as e:
        await upstream.start()
    assert str(e.value) == "upstream test: executable 'no-such-mcp-server-xyz' not found on PATH"
    assert upstream.pid is None and upstream.state == "ended"
    await upstream.stop()


@pytest.mark.parametrize("inTmp", [False, True], ids=["posix_spawn", "fork"])
@pytest_twisted.ensureDeferred
async def test_unexecutableCommand(tmp_path: Path, inTmp: bool) -> None:
    """
    A command found on PATH that cannot be executed (bad interpreter) fails
    start() clearly on both of Twisted's spawn paths.
    """
    script = tmp_path / "broken-server"
    script.write_text("#!/nonexistent/interpreter\n")
    script.chmod(0o755)
    upstream = StdioUpstream(
        reactor,
        makeConfig(command=str(script)),
        cwd=str(tmp_path) if inTmp else None,
    )
    with pytest.raises(UpstreamUnavailable) as e:
        await within(upstream.start())
    assert str(e.value) == (
        "upstream test exited (status 127): the command could not be executed during start"
    )


@pytest_twisted.ensureDeferred
async def test_forkPath(spawn, tmp_path: Path) -> None:
    """With a working directory (Twisted's fork path) the server runs there."""
    upstream = await spawn(makeConfig(ECHO), cwd=str(tmp_path))
    assert (await callTool(upstream, "echo", text="x"))["content"][0]["text"] == "x"


@pytest_twisted.ensureDeferred
async def test_exitAtStart(logs) -> None:
    """A server that exits at once fails start(); its stderr is logged."""
    upstream = StdioUpstream(reactor, makeConfig(TESTSERVER, "--exit-at-start", "4"))
    with pytest.raises(UpstreamUnavailable, match=r"exited \(status 4\) during start"):
        await within(upstream.start())
    await logs.wait(lambda e: e.get("line") == "testserver: exiting at start")


# -- environment and process group -----------------------------------------


@pytest_twisted.ensureDeferred
async def test_environmentIsolated(spawn, monkeypatch) -> None:
    """The child sees the safe names and the config env, not the proxy's secrets."""
    monkeypatch.setenv("SECRET_X", "proxy-secret")
    monkeypatch.setenv("HOME", "/proxy-home")
    upstream = await spawn(makeConfig(TESTSERVER, env={"MY_VAR": "v", "USER": "cfg"}))
    # The environment the server was executed with (Python then adds
    # LC_CTYPE to its own in the C locale).
    with open(f"/proc/{upstream.pid}/environ", "rb") as f:
        env = dict(item.decode().split("=", 1) for item in f.read().split(b"\0") if item)
    assert "SECRET_X" not in (await callTool(upstream, "env"))["structuredContent"]
    assert "SECRET_X" not in env
    assert env["MY_VAR"] == "v" and env["USER"] == "cfg" and env["HOME"] == "/proxy-home"
    assert set(env) <= set(SAFE_ENV_NAMES) | {"MY_VAR"}
    assert env["PATH"] == os.environ["PATH"]


@pytest_twisted.ensureDeferred
async def test_ownSession(spawn) -> None:
    """
    The child leads its own session and group and keeps the spawned PID.
    """
    upstream = await spawn(makeConfig(TESTSERVER))
    info = (await callTool(upstream, "info"))["structuredContent"]
    assert info["pid"] == info["pgid"] == info["sid"] == upstream.pid
    assert upstream.pid != os.getpgid(0)


@pytest_twisted.ensureDeferred
async def test_signalsDefault(spawn, logs) -> None:
    """The command starts with SIGPIPE not ignored (Python ignores it)."""
    script = f"grep SigIgn /proc/self/status >&2; exec {sys.executable} {TESTSERVER}"
    await spawn(makeConfig("-c", script, command="/bin/sh", name="sh"))
    event = await logs.wait(lambda e: e.get("upstream") == "sh" and "line" in e)
    mask = int(event["line"].split()[1], 16)
    assert not mask & (1 << (signal.SIGPIPE - 1))


def assertGroupGone(pgid: int) -> None:
    with pytest.raises(ProcessLookupError):
        os.killpg(pgid, 0)


@pytest_twisted.ensureDeferred
async def test_stopKillsGroup(subreaper) -> None:
    """
    stop() kills the whole group: a server that ignores the end of stdin
    and SIGTERM, with a grandchild that ignores SIGTERM and holds stdout.
    """
    upstream = StdioUpstream(
        reactor,
        makeConfig(TESTSERVER, "--ignore-eof", "--ignore-term", "--grandchild-ignores-term"),
        stopGrace=0.2,
    )
    await within(upstream.start())
    info = (await callTool(upstream, "info"))["structuredContent"]
    pgid = info["pgid"]
    assert os.getpgid(info["grandchild"]) == pgid
    await within(upstream.stop())
    assert upstream.exitSignal == signal.SIGKILL
    assertGroupGone(pgid)
    await within(upstream.stop())


@pytest_twisted.ensureDeferred
async def test_orphansKilledAfterExit(subreaper) -> None:
    """
    When a server exits on the end of stdin, the rest of its group (which
    holds stdout open) is terminated too.
    """
    upstream = StdioUpstream(reactor, makeConfig(TESTSERVER, "--grandchild"))
    await within(upstream.start())
    info = (await callTool(upstream, "info"))["structuredContent"]
    started = time.perf_counter()
    await within(upstream.stop())
    assert upstream.exitStatus == 0
    assert time.perf_counter() - started < 1.5
    assertGroupGone(info["pgid"])


@pytest_twisted.ensureDeferred
async def test_groupKilledWithoutSubreaper() -> None:
    """
    Without reaping orphans, stop() still ends once the group has no live
    member (killed members may stay zombies of an init that does not reap).
    """
    upstream = StdioUpstream(
        reactor, makeConfig(TESTSERVER, "--ignore-eof", "--grandchild"), stopGrace=0.2
    )
    await within(upstream.start())
    info = (await callTool(upstream, "info"))["structuredContent"]
    await within(upstream.stop())
    assert _spawn.liveGroupMembers(info["pgid"]) == []


@pytest_twisted.ensureDeferred
async def test_stopDuringStart() -> None:
    """Stopping while the handshake runs fails start() and ends the process."""
    upstream = StdioUpstream(reactor, makeConfig(TESTSERVER))
    starting = upstream.start()
    stopped = upstream.stop()
    with pytest.raises(UpstreamUnavailable):
        await within(starting)
    await within(stopped)
    assert upstream.state == "ended"


# -- framing and output --------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_twentyMebibyteResult(spawn) -> None:
    """A 20 MiB single-line result arrives whole, quickly."""
    upstream = await spawn(makeConfig(TESTSERVER))
    size = 20 * 1024 * 1024
    started = time.perf_counter()
    result = await callTool(upstream, "big", timeout=60, size=size)
    elapsed = time.perf_counter() - started
    assert len(result["content"][0]["text"]) == size
    assert elapsed < 10
    print(f"20 MiB result: {elapsed * 1000:.0f} ms")


@pytest_twisted.ensureDeferred
async def test_messageTooLarge(spawn) -> None:
    """A message over the limit kills the process and fails every call clearly."""
    upstream = await spawn(makeConfig(TESTSERVER), maxMessageSize=1024 * 1024)
    held = Deferred.fromCoroutine(callTool(upstream, "hold", key="k"))
    big = Deferred.fromCoroutine(callTool(upstream, "big", size=2 * 1024 * 1024))
    expected = "upstream test sent a message larger than 1048576 bytes; the process was killed"
    for d in (big, held):
        with pytest.raises(UpstreamUnavailable) as e:
            await within(d)
        assert str(e.value) == expected
    assert not upstream.alive


@pytest_twisted.ensureDeferred
async def test_garbageSkipped(spawn, logs) -> None:
    """Lines that are not JSON-RPC messages are logged and skipped."""
    upstream = await spawn(makeConfig(TESTSERVER))
    assert (await callTool(upstream, "garbage"))["content"][0]["text"] == "ok"
    notJson = logs.matching(lambda e: "not JSON" in e.get("log_format", ""))
    assert [e["preview"] for e in notJson] == ["this is not json"]
    assert logs.matching(lambda e: "not a JSON-RPC message" in e.get("log_format", ""))


@pytest_twisted.ensureDeferred
async def test_stderrLogged(spawn, logs) -> None:
    """Stderr lines are logged with the config name, capped and cleaned."""
    upstream = await spawn(makeConfig(TESTSERVER, name="noisy"))
    await callTool(upstream, "stderr", text="red \x1b[31malert\x07\tend" + "y" * 10000 + "\n")
    event = await logs.wait(lambda e: e.get("upstream") == "noisy" and "line" in e)
    assert event["log_namespace"] == "mcp_proxy.upstream.stderr"
    line = event["line"]
    assert line.startswith("red [31malert end") and line.endswith("y [truncated]")
    assert len(line) == 4096 - 2 + len(" [truncated]")


@pytest_twisted.ensureDeferred
async def test_stderrRateLimited(spawn, logs) -> None:
    """Past the per-second budget, stderr lines are counted, not logged."""
    clock = Clock()
    upstream = await spawn(makeConfig(TESTSERVER, name="flood"), clock=clock)
    await callTool(upstream, "stderr", text="line\n", repeat=150)
    await logs.wait(lambda e: e.get("upstream") == "flood" and e.get("line") == "line")
    await callTool(upstream, "stderr", text="last\n")
    clock.advance(1)
    await callTool(upstream, "stderr", text="next\n")
    await logs.wait(lambda e: e.get("upstream") == "flood" and e.get("line") == "next")
    lines = logs.matching(lambda e: e.get("upstream") == "flood" and "line" in e)
    assert len(lines) == 101
    summary = logs.matching(lambda e: e.get("upstream") == "flood" and "count" in e)
    assert [e["count"] for e in summary] == [51]


# -- messages from the server --------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_serverPingAnswered(spawn) -> None:
    """A ping from the server is answered {} without the hook."""
    seen: list[Any] = []
    upstream = await spawn(makeConfig(TESTSERVER), onMessage=lambda u, m: seen.append(m))
    assert (await callTool(upstream, "pingClient"))["structuredContent"] == {}
    assert seen == []


@pytest_twisted.ensureDeferred
async def test_notificationsToHook(spawn) -> None:
    """Notifications from the server reach onMessage, in order, before the result."""
    seen: list[Any] = []
    upstream = await spawn(makeConfig(TESTSERVER), onMessage=lambda u, m: seen.append((u, m)))
    await callTool(upstream, "notify", data="hi")
    assert seen == [
        (
            upstream,
            {
                "jsonrpc": "2.0",
                "method": "notifications/message",
                "params": {"level": "info", "data": "hi"},
            },
        )
    ]


@pytest_twisted.ensureDeferred
async def test_serverRequestToHook(spawn) -> None:
    """A request from the server is answered with the hook's (deferred) result."""

    def onMessage(upstream: StdioUpstream, message: dict[str, Any]) -> Deferred[Any]:
        assert message["method"] == "sampling/createMessage"
        d: Deferred[Any] = Deferred()
        reactor.callLater(0, d.callback, {"role": "assistant", "model": "m"})
        return d

    upstream = await spawn(makeConfig(TESTSERVER), onMessage=onMessage)
    result = await callTool(upstream, "sample")
    assert result["structuredContent"] == {"role": "assistant", "model": "m"}


@pytest_twisted.ensureDeferred
async def test_serverRequestErrors(spawn) -> None:
    """The hook's JsonRpcError, or no hook, answers the server with an error."""

    def onMessage(upstream: StdioUpstream, message: dict[str, Any]) -> Any:
        raise JsonRpcError(-32600, "no sampling here")

    upstream = await spawn(makeConfig(TESTSERVER), onMessage=onMessage)
    result = await callTool(upstream, "sample")
    assert result["structuredContent"] == {"error": {"code": -32600, "message": "no sampling here"}}
    bare = await spawn(makeConfig(TESTSERVER))
    result = await callTool(bare, "sample")
    assert result["structuredContent"]["error"]["code"] == -32601


@pytest_twisted.ensureDeferred
async def test_serverCancelsItsRequest(spawn) -> None:
    """notifications/cancelled from the server cancels the hook's Deferred."""
    cancelled: list[str] = []

    def onMessage(upstream: StdioUpstream, message: dict[str, Any]) -> Deferred[Any]:
        return Deferred(lambda d: cancelled.append(message["id"]))

    upstream = await spawn(makeConfig(TESTSERVER), onMessage=onMessage)
    result = await callTool(upstream, "sampleCancelled")
    assert cancelled == [result["content"][0]["text"]]


# -- lifecycle -----------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_requestBeforeStart() -> None:
    """Requests before start() or after stop() fail as unavailable."""
    upstream = StdioUpstream(reactor, makeConfig(ECHO))
    with pytest.raises(UpstreamUnavailable, match="is not running"):
        await upstream.request("ping", None, 1)
    await within(upstream.start())
    await within(upstream.stop())
    with pytest.raises(UpstreamUnavailable, match="is not running"):
        await upstream.request("ping", None, 1)
    with pytest.raises(UpstreamError, match="already started"):
        await upstream.start()
