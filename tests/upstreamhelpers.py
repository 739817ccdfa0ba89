"""
What the upstream tests share: configs, the test servers, a check that a
test leaves no process or timer behind, a safety net against hanging
tests, and calling a tool.
"""

from __future__ import annotations

import inspect
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Optional

from twisted.internet import process, reactor
from twisted.internet.defer import Deferred

from mcp_proxy.models import UpstreamConfig

SERVERS = Path(__file__).parent / "servers"
TESTSERVER = str(SERVERS / "testserver.py")
ECHO = str(Path(__file__).parent.parent / "examples" / "echo_server.py")


def makeConfig(
    *args: str,
    command: Optional[str] = sys.executable,
    env: Optional[dict[str, str]] = None,
    name: str = "test",
    transportType: str = "STDIO",
    url: Optional[str] = None,
) -> UpstreamConfig:
    """
    The config of an upstream: by default a stdio one running Python with
    C{args}.
    """
    return UpstreamConfig(
        configId="config-" + name,
        name=name,
        transportType=transportType,
        command=command,
        args=tuple(args),
        url=url,
        env=env or {},
        authType="NONE",
        toolNames=frozenset(),
    )


def childPids() -> list[int]:
    """
    The processes whose parent is this one (zombies included).
    """
    me = str(os.getpid()).encode()
    pids = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat", "rb") as f:
                    stat = f.read()
            except OSError:
                continue
            if stat[stat.rfind(b")") + 2 :].split()[1] == me:
                pids.append(int(name))
    return pids


@contextmanager
def nothingLeftOver() -> Iterator[None]:
    """
    Check that what runs inside leaves no new child process, none newly
    tracked by Twisted, and no new timer on the reactor.
    """
    children = set(childPids())
    tracked = set(process.reapProcessHandlers)
    timers = set(reactor.getDelayedCalls())
    yield
    assert set(childPids()) - children == set()
    assert set(process.reapProcessHandlers) - tracked == set()
    assert [c for c in reactor.getDelayedCalls() if c not in timers] == []


def within(d: Any, seconds: float = 20) -> Deferred[Any]:
    """
    A safety net against a hanging test (a Deferred or a coroutine); not a
    synchronisation.
    """
    if inspect.iscoroutine(d):
        d = Deferred.fromCoroutine(d)
    return d.addTimeout(seconds, reactor)


async def callTool(
    upstream: Any, name: str, timeout: Optional[float] = 20, **arguments: Any
) -> Any:
    """
    Call a tool of an upstream.
    """
    return await upstream.request("tools/call", {"name": name, "arguments": arguments}, timeout)


class Started:
    """
    Upstreams a test makes and starts: C{await started(config, **kw)} makes
    one with C{makeUpstream(reactor, config, **kw)} and starts it;
    L{stopAll} stops them after the test.
    """

    def __init__(self, makeUpstream: Callable[..., Any]) -> None:
        self.makeUpstream = makeUpstream
        self.made: list[Any] = []

    async def __call__(self, config: UpstreamConfig, **kw: Any) -> Any:
        upstream = self.makeUpstream(reactor, config, **kw)
        self.made.append(upstream)
        await within(upstream.start())
        return upstream

    async def stopAll(self) -> list[Any]:
        """
        Stop every upstream made.

        @return: them.
        """
        for upstream in self.made:
            await within(upstream.stop())
        return self.made
