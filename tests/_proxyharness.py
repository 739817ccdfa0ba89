"""
A real proxy process for end-to-end tests: C{mcpproxy-admin} prepares a
database (SQLite by default; importing an mcpServers file that runs
examples/echo_server.py), then C{twistd -n mcpproxy} serves it on a free
loopback port.  Several proxies may serve one database: prepare it once
with L{prepare}, and give each L{startProxy} the result.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Optional

from attrs import define

ROOT = Path(__file__).resolve().parent.parent
ECHO = ROOT / "examples" / "echo_server.py"


def freePort() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def admin(database: str, *args: str) -> Any:
    """
    Run C{mcpproxy-admin --json ARGS} and return its parsed output.
    """
    result = subprocess.run(
        [sys.executable, "-m", "mcp_proxy.admin", "--database", database, "--json", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=_env(),
        cwd=str(ROOT),
    )
    if result.returncode != 0:
        raise AssertionError(f"mcpproxy-admin {args} failed: {result.stderr}")
    return json.loads(result.stdout) if result.stdout.strip() else None


@define
class ProxyProcess:
    """
    A running C{twistd mcpproxy}.
    """

    process: subprocess.Popen[bytes]
    port: int
    database: str
    instanceId: str
    key: str
    logPath: Path
    keyId: str = ""

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"{self.base}/mcp/{self.instanceId}"

    def request(
        self,
        method: str,
        path: str,
        body: Optional[Any] = None,
        headers: Optional[dict[str, str]] = None,
    ) -> tuple[int, Any]:
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(self.base + path, data=data, method=method)
        request.add_header("Content-Type", "application/json")
        for name, value in (headers or {}).items():
            request.add_header(name, value)
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                content = response.read()
                return response.status, json.loads(content) if content else None
        except urllib.error.HTTPError as e:
            content = e.read()
            return e.code, json.loads(content) if content else None

    def stop(self) -> str:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.logPath.read_text(errors="replace")


def prepare(database: str, tmp: Path, servers: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """
    Initialise a database and import a demo instance with a key.

    @param servers: the C{mcpServers} entries (default: the echo server).
    @return: what C{mcpproxy-admin import --json --key} printed.
    """
    serversFile = tmp / "servers.json"
    if servers is None:
        servers = {"echo": {"command": sys.executable, "args": [str(ECHO)]}}
    serversFile.write_text(json.dumps({"mcpServers": servers}))
    admin(database, "init")
    imported: dict[str, Any] = admin(
        database, "import", str(serversFile), "--instance", "demo", "--key"
    )
    return imported


def startProxy(
    tmp: Path,
    *options: str,
    servers: Optional[dict[str, Any]] = None,
    database: Optional[str] = None,
    imported: Optional[dict[str, Any]] = None,
    name: str = "proxy",
) -> ProxyProcess:
    """
    Prepare a database with a demo instance and start a proxy on it.

    @param servers: the C{mcpServers} entries (default: the echo server).
    @param database: the database URL (default: a SQLite file in C{tmp}).
    @param imported: what L{prepare} returned for C{database}, which is
        then not prepared again.
    @param name: the name of the proxy's log file in C{tmp}.
    """
    if database is None:
        database = f"sqlite:///{tmp}/proxy.sqlite3"
    if imported is None:
        imported = prepare(database, tmp, servers)
    port = freePort()
    logPath = tmp / f"{name}.log"
    log = logPath.open("wb")
    process = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "from twisted.scripts.twistd import run; run()",
            "-n",
            "--pidfile=",
            "--logfile=-",
            "mcpproxy",
            "--listen",
            f"tcp:{port}:interface=127.0.0.1",
            "--database",
            database,
            *options,
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=_env(),
        cwd=str(tmp),
    )
    proxy = ProxyProcess(
        process,
        port,
        database,
        imported["instance"]["id"],
        imported["key"],
        logPath,
        imported.get("keyId") or "",
    )
    deadline = time.monotonic() + 30
    while True:
        try:
            status, _ = proxy.request("GET", "/health")
            if status == 200:
                return proxy
        except OSError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            raise AssertionError("proxy did not start:\n" + proxy.stop())
        time.sleep(0.05)
