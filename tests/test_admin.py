"""
Tests for C{mcpproxy-admin} (L{mcp_proxy.admin}) and the C{mcpServers}
import (L{mcp_proxy.importer}).

The CLI runs for real, as a subprocess (C{python -m mcp_proxy.admin}),
against a SQLite file in the test's temporary directory; the main
end-to-end path also runs against a throwaway PostgreSQL database.  The
upstream used for tool discovery is C{examples/echo_server.py}.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator, Optional
from urllib.parse import quote

import psycopg2.extensions
import pytest

from mcp_proxy.errors import InvalidInput
from mcp_proxy.importer import parseServersFile, validateUpstreamURL
from mcp_proxy.keys import hashApiKey
from mcp_proxy.repository import MIGRATIONS

ROOT = Path(__file__).resolve().parent.parent
ECHO_SERVER = ROOT / "examples" / "echo_server.py"
REMOTE_SERVER = ROOT / "tests" / "servers" / "remote_fastmcp.py"
SECRET = "s3cr3t-value-that-must-not-leak"


class Admin:
    """
    Runs C{mcpproxy-admin} against one database.
    """

    def __init__(self, database: str, cwd: Path) -> None:
        self.database = database
        self.cwd = cwd

    def run(
        self, *args: str, env: Optional[dict[str, str]] = None
    ) -> subprocess.CompletedProcess[str]:
        environ = {k: v for k, v in os.environ.items() if not k.startswith("MCPPROXY_")}
        environ["PYTHONPATH"] = str(ROOT)
        environ["MCPPROXY_DATABASE"] = self.database
        environ.update(env or {})
        return subprocess.run(
            [sys.executable, "-m", "mcp_proxy.admin", *args],
            cwd=self.cwd,
            env=environ,
            capture_output=True,
            text=True,
            timeout=120,
        )

    def ok(self, *args: str, env: Optional[dict[str, str]] = None) -> str:
        result = self.run(*args, env=env)
        assert result.returncode == 0, (args, result.stdout, result.stderr)
        assert "Traceback" not in result.stderr
        return result.stdout

    def json(self, *args: str, env: Optional[dict[str, str]] = None) -> Any:
        return json.loads(self.ok(*args, "--json", env=env))

    def fails(self, *args: str, code: int = 2, env: Optional[dict[str, str]] = None) -> str:
        """
        Run a command that must fail with C{code} and one error line.

        @return: the error line.
        """
        result = self.run(*args, env=env)
        assert result.returncode == code, (args, result.stdout, result.stderr)
        assert "Traceback" not in result.stderr
        errors = [line for line in result.stderr.splitlines() if ": error: " in line]
        assert len(errors) == 1, result.stderr
        assert errors[0].startswith("mcpproxy-admin: error: "), result.stderr
        return errors[0]


@pytest.fixture
def postgresURL(postgresServer: Any, postgresDatabase: str) -> str:
    """
    The URL of a new, empty PostgreSQL database (the C{postgresDatabase}
    fixture of conftest.py: dropped after the test; skipped when PostgreSQL
    is unreachable, unless C{CI=true}).
    """
    params = psycopg2.extensions.parse_dsn(postgresServer.dsnFor(postgresDatabase))
    auth = quote(params.get("user", "postgres"), safe="")
    if params.get("password"):
        auth += ":" + quote(params["password"], safe="")
    host = params.get("host", "127.0.0.1")
    if ":" in host:
        host = f"[{host}]"
    port = params.get("port", "5432")
    return f"postgresql://{auth}@{host}:{port}/{quote(postgresDatabase, safe='')}"


@pytest.fixture
def sqliteURL(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'admin.sqlite3'}"


@pytest.fixture
def admin(sqliteURL: str, tmp_path: Path) -> Admin:
    return Admin(sqliteURL, tmp_path)


@pytest.fixture(params=["sqlite", "postgresql"])
def anyAdmin(request: Any, tmp_path: Path) -> Admin:
    if request.param == "sqlite":
        return Admin(request.getfixturevalue("sqliteURL"), tmp_path)
    return Admin(request.getfixturevalue("postgresURL"), tmp_path)


def echoServersFile(path: Path, **extra: Any) -> Path:
    servers: dict[str, Any] = {
        "echo": {
            "command": sys.executable,
            "args": [str(ECHO_SERVER)],
            "env": {"ECHO_TOKEN": SECRET},
        }
    }
    servers.update(extra)
    path.write_text(json.dumps({"mcpServers": servers}), encoding="utf-8")
    return path


def assertNoSecret(result: Any) -> None:
    text = result if isinstance(result, str) else json.dumps(result)
    assert SECRET not in text


# -- the end-to-end path -------------------------------------------------------


def test_endToEnd(anyAdmin: Admin) -> None:
    """
    org -> server -> config -> tools -> tool group -> instance -> key, with
    every result read back as JSON.
    """
    admin = anyAdmin
    init = admin.json("init")
    assert init["applied"] == [m.version for m in MIGRATIONS]
    assert init["originSchema"] is False
    assert init["organization"]["name"] == "default"
    again = admin.json("init")
    assert again["applied"] == []
    assert again["organization"] is None
    assert admin.json("db", "migrate") == {"applied": [], "originSchema": False}
    org = admin.json("org", "create", "acme")
    assert sorted(o["name"] for o in admin.json("org", "list")) == ["acme", "default"]

    server = admin.json(
        "server",
        "add",
        "echo",
        "--stdio",
        "--command",
        sys.executable,
        "--arg",
        str(ECHO_SERVER),
        "--env-name",
        "ECHO_TOKEN",
        "--org",
        org["id"],
    )
    assert server["transportType"] == "STDIO"
    assert server["args"] == [str(ECHO_SERVER)]
    assert server["envVars"] == ["ECHO_TOKEN"]
    assert admin.json("server", "show", server["id"])["tools"] == []
    assert [s["id"] for s in admin.json("server", "list")] == [server["id"]]

    config = admin.json(
        "config",
        "create",
        "--server",
        server["id"],
        "--org",
        "acme",
        "echo-acme",
        "--env",
        f"ECHO_TOKEN={SECRET}",
    )
    assert config["envVars"] == {"ECHO_TOKEN": "***"}
    assert config["organizationId"] == org["id"]

    synced = admin.json("tools", "sync", "--config", config["id"])
    names = synced["servers"][0]["tools"]
    assert "echo" in names
    tools = admin.json("tools", "list", "--server", server["id"])
    assert sorted(t["name"] for t in tools) == sorted(names)
    assert all(t["mcpServerId"] == server["id"] for t in tools)

    group = admin.json(
        "toolgroup", "create", "--org", org["id"], "echoes", "--tool", f"{config['id']}:echo"
    )
    assert [t["toolName"] for t in group["tools"]] == ["echo"]
    assert group["isEnabled"] is True
    group = admin.json("toolgroup", "set-tools", group["id"], "--all-tools-of", config["id"])
    assert sorted(t["toolName"] for t in group["tools"]) == sorted(names)
    assert admin.json("toolgroup", "disable", group["id"])["isEnabled"] is False
    assert admin.json("toolgroup", "enable", group["id"])["isEnabled"] is True
    assert admin.json("toolgroup", "show", group["id"])["id"] == group["id"]
    assert [g["id"] for g in admin.json("toolgroup", "list", "--org", org["id"])] == [group["id"]]

    instance = admin.json("instance", "create", "--toolgroup", group["id"], "echo-instance")
    assert instance["organizationId"] == org["id"]
    assert instance["authType"] == "API_KEY"
    assert instance["deletedAt"] is None

    key = admin.json("key", "create", "--instance", instance["id"], "--name", "ci")
    assert set(key) >= {"id", "key", "instanceId", "display"}
    assert key["key"].startswith("mcpp_")
    assert key["instanceId"] == instance["id"]
    assert key["display"].endswith(key["key"][-4:])
    listed = admin.json("key", "list", "--instance", instance["id"])
    assert [(k["id"], k["display"], k["state"]) for k in listed] == [
        (key["id"], key["display"], "active")
    ]
    assert key["key"] not in admin.ok("key", "list")
    shown = admin.json("instance", "show", instance["id"])
    assert shown["toolGroup"]["id"] == group["id"]
    assert [k["id"] for k in shown["apiKeys"]] == [key["id"]]
    assert key["key"] not in json.dumps(shown)

    deleted = admin.json("instance", "delete", instance["id"])
    assert deleted == {"deleted": instance["id"], "apiKeys": 1}
    assert admin.json("instance", "list") == []
    [gone] = admin.json("instance", "list", "--all")
    assert gone["deletedAt"] is not None

    admin.json("config", "delete", config["id"])
    assert admin.json("config", "list") == []
    admin.json("server", "delete", server["id"])
    assert admin.json("server", "list") == []


def test_humanOutput(admin: Admin) -> None:
    """
    Without --json, lists are aligned tables and creations print the new
    object.
    """
    out = admin.ok("init")
    assert "applied migrations: " + MIGRATIONS[0].version in out
    assert "created organization 'default'" in out
    assert "the schema is up to date" in admin.ok("db", "migrate")
    admin.ok("org", "create", "second-org")
    lines = admin.ok("org", "list").splitlines()
    assert lines[0].split() == ["ID", "NAME", "CREATED"]
    assert len(lines) == 3
    assert lines[1].index("default") == lines[2].index("second-org") == lines[0].index("NAME")
    out = admin.ok("server", "add", "remote", "--url", "https://example.com/mcp")
    assert "streamable-http" in out
    assert "(none)" in admin.ok("instance", "list")


def test_jsonBeforeOrAfterCommand(admin: Admin) -> None:
    """
    --json and --database are accepted before and after the command.
    """
    admin.ok("init")
    before = admin.run("--json", "org", "list")
    after = admin.run("org", "--json", "list")
    last = admin.run("org", "list", "--json")
    assert before.returncode == after.returncode == last.returncode == 0
    assert json.loads(before.stdout) == json.loads(after.stdout) == json.loads(last.stdout)
    other = f"sqlite:///{admin.cwd / 'other.sqlite3'}"
    assert json.loads(admin.ok("org", "list", "--json", "--database", other)) == []
    assert json.loads(admin.ok("--database", other, "--json", "org", "list")) == []


def test_defaultDatabase(tmp_path: Path) -> None:
    """
    Without --database and MCPPROXY_DATABASE, the database is
    mcpproxy.sqlite3 in the working directory.
    """
    result = subprocess.run(
        [sys.executable, "-m", "mcp_proxy.admin", "init", "--json"],
        cwd=tmp_path,
        env={
            **{k: v for k, v in os.environ.items() if not k.startswith("MCPPROXY_")},
            "PYTHONPATH": str(ROOT),
        },
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["database"] == "sqlite:///mcpproxy.sqlite3"
    assert (tmp_path / "mcpproxy.sqlite3").exists()


def test_organizationDefaults(admin: Admin) -> None:
    """
    --org may be left out while exactly one organization exists; it may be
    a name; with several it is required.
    """
    admin.ok("init")
    group = admin.json("toolgroup", "create", "empty")
    [org] = admin.json("org", "list")
    assert group["organizationId"] == org["id"]
    admin.ok("org", "create", "second")
    message = admin.fails("toolgroup", "create", "another")
    assert "give --org" in message
    assert (
        admin.json("toolgroup", "create", "--org", "second", "other")["organizationId"] != org["id"]
    )


# -- secrets ----------------------------------------------------------------------


def test_envValuesMasked(admin: Admin) -> None:
    """
    Config env values are stored but never printed: show and list mask them
    as ***, in text and JSON.  A bare NAME reads the value from the
    environment.
    """
    admin.ok("init")
    server = admin.json(
        "server",
        "add",
        "remote",
        "--url",
        "https://example.com/mcp",
        "--transport",
        "sse",
        "--header-name",
        "X-Api-Key",
    )
    assert server["transportType"] == "SSE"
    config = admin.json(
        "config",
        "create",
        "--server",
        server["id"],
        "remote-cfg",
        "--env",
        "X-Api-Key",
        env={"X-Api-Key": SECRET},
    )
    outputs = [
        json.dumps(config),
        admin.ok("config", "show", config["id"]),
        admin.ok("config", "show", config["id"], "--json"),
        admin.ok("config", "list"),
        admin.ok("config", "list", "--json"),
        admin.ok("config", "set-env", config["id"], f"X-Other={SECRET}"),
        admin.ok("server", "show", server["id"]),
    ]
    for out in outputs:
        assert SECRET not in out
    assert "X-Api-Key=***" in admin.ok("config", "show", config["id"])
    shown = admin.json("config", "show", config["id"])
    assert shown["envVars"] == {"X-Api-Key": "***", "X-Other": "***"}
    shown = admin.json("config", "set-env", config["id"], "--unset", "X-Other")
    assert shown["envVars"] == {"X-Api-Key": "***"}

    # The values are really stored.
    with sqlite3.connect(admin.database[len("sqlite:///") :]) as db:
        [(stored,)] = db.execute(
            'SELECT "envVars" FROM "UserMcpServerConfig" WHERE id = ?', (config["id"],)
        ).fetchall()
    assert json.loads(stored) == {"X-Api-Key": SECRET}


# -- errors -------------------------------------------------------------------------


def populate(admin: Admin) -> dict[str, Any]:
    """
    Fill a database with an organization, a server, a config, a tool group,
    an instance and a key.

    @return: their ids.
    """
    admin.ok("init")
    server = admin.json("server", "add", "remote", "--url", "https://example.com/mcp")
    config = admin.json(
        "config", "create", "--server", server["id"], "cfg", "--env", "Authorization=Bearer x"
    )
    group = admin.json("toolgroup", "create", "group")
    instance = admin.json("instance", "create", "--toolgroup", group["id"], "inst")
    key = admin.json("key", "create", "--instance", instance["id"])
    return {
        "server": server["id"],
        "config": config["id"],
        "group": group["id"],
        "instance": instance["id"],
        "key": key["id"],
    }


@pytest.fixture
def populated(admin: Admin) -> dict[str, Any]:
    return populate(admin)


@pytest.fixture(scope="module")
def sharedAdmin(tmp_path_factory: pytest.TempPathFactory) -> tuple[Admin, dict[str, Any]]:
    """
    One populated database shared by the tests that must not change it.
    """
    path = tmp_path_factory.mktemp("shared")
    admin = Admin(f"sqlite:///{path / 'admin.sqlite3'}", path)
    return admin, populate(admin)


def dumpSQLite(admin: Admin) -> list[str]:
    with sqlite3.connect(admin.database[len("sqlite:///") :]) as db:
        return list(db.iterdump())


ERRORS = [
    (["server", "show", "nope"], "unknown server id 'nope'"),
    (["server", "delete", "nope"], "unknown server id"),
    (["config", "show", "nope"], "unknown config id"),
    (["toolgroup", "enable", "nope"], "unknown tool group id"),
    (["instance", "show", "nope"], "unknown instance id"),
    (["key", "revoke", "nope"], "unknown API key id"),
    (["key", "create", "--instance", "nope"], "unknown instance id"),
    (["server", "add", "x", "--url", "ftp://example.com/"], "scheme must be http or https"),
    (["server", "add", "x", "--url", "https://user:pw@example.com/"], "user name or password"),
    (["server", "add", "x", "--url", "https:///nohost"], "no host"),
    (["server", "add", "x", "--url", "https://e.com/", "--transport", "ws"], "bad transport"),
    (["server", "add", "x"], "give --stdio --command"),
    (["server", "add", "x", "--command", "c", "--env-name", "1BAD"], "bad environment variable"),
    (["server", "add", "remote", "--url", "https://example.com/"], "already exists"),
    (["org", "create", "default"], "already exists"),
    (["config", "create", "--server", "{server}", "cfg"], "already exists"),
    (["config", "create", "--server", "{server}", "c2", "--env", "Bad Name=1"], "bad header"),
    (["config", "create", "--server", "{server}", "c2", "--env", "UNSET_VAR"], "not set"),
    (["config", "set-env", "{config}"], "give NAME=VALUE"),
    (["config", "set-env", "{config}", "--unset", "NOPE"], "does not set 'NOPE'"),
    (["toolgroup", "create", "group"], "already exists"),
    (["toolgroup", "create", "g2", "--tool", "{config}:nope"], "has no tool 'nope'"),
    (["toolgroup", "create", "g2", "--tool", "garbage"], "expected CONFIG_ID:TOOL_NAME"),
    (["toolgroup", "create", "g2", "--all-tools-of", "{config}"], "no known tools"),
    (["toolgroup", "set-tools", "{group}"], "give --tool"),
    (["instance", "create", "--toolgroup", "{group}", "again"], "already serves instance"),
    (["instance", "create", "--toolgroup", "{group}", "x", "--org", "zzz"], "unknown organization"),
    (["key", "create", "--instance", "{instance}", "--expires", "tomorrow"], "bad date"),
    (["key", "create", "--instance", "{instance}", "--expires", "2001-01-01"], "in the past"),
    (["key", "expire", "{key}", "--at", "31/12/2030"], "bad date"),
    (["tools", "list", "--server", "nope"], "unknown server id"),
    (["org", "frobnicate"], "invalid choice"),
    (["key", "create"], "required: --instance"),
    (["--database", "mysql://localhost/x", "org", "list"], "bad --database"),
    (["--database", "sqlite:///no/such/dir/db.sqlite3", "org", "list"], "does not exist"),
    (
        ["--database", "postgresql://postgres@127.0.0.1:1/x", "org", "list"],
        "cannot open the database",
    ),
]


@pytest.mark.parametrize(("args", "message"), ERRORS, ids=[" ".join(a[:3]) for a, _ in ERRORS])
def test_errors(sharedAdmin: tuple[Admin, dict[str, Any]], args: list[str], message: str) -> None:
    """
    Bad input gives one line on stderr and exit status 2, never a
    traceback, nothing on stdout even with --json, and writes nothing.
    """
    admin, ids = sharedAdmin
    args = [a.format(**ids) for a in args]
    before = dumpSQLite(admin)
    result = admin.run(*args, "--json")
    assert result.stdout == ""
    line = admin.fails(*args)
    assert message in line
    assert dumpSQLite(admin) == before


def test_instanceDeleteTwice(admin: Admin, populated: dict[str, Any]) -> None:
    admin.ok("instance", "delete", populated["instance"])
    assert "already deleted" in admin.fails("instance", "delete", populated["instance"])
    assert "is deleted" in admin.fails("key", "create", "--instance", populated["instance"])


def test_noOrganization(admin: Admin) -> None:
    """
    Commands that need an organization say how to make one.
    """
    assert "org create" in admin.fails("toolgroup", "create", "g")


def test_upstreamFailure(admin: Admin) -> None:
    """
    An upstream that cannot be started fails tools sync with exit status 1
    and one line.
    """
    admin.ok("init")
    server = admin.json("server", "add", "broken", "--command", str(admin.cwd / "no-such-cmd"))
    line = admin.fails("tools", "sync", "--server", server["id"], "--timeout", "10", code=1)
    assert "cannot list the tools of server 'broken'" in line
    assert admin.json("tools", "list", "--server", server["id"]) == []


# -- API keys -----------------------------------------------------------------------


def test_keyRevokeAndExpire(admin: Admin, populated: dict[str, Any]) -> None:
    key = populated["key"]

    def state() -> tuple[Any, ...]:
        [k] = admin.json("key", "list", "--instance", populated["instance"])
        return k["state"], k["expiresAt"], k["isActive"]

    assert state() == ("active", None, True)
    result = admin.json("key", "expire", key, "--at", "2031-02-03T04:05:06+02:00")
    assert result["expiresAt"] == "2031-02-03T02:05:06Z"
    assert state() == ("active", "2031-02-03T02:05:06Z", True)
    admin.json("key", "expire", key, "--at", "2001-01-01")
    assert state() == ("expired", "2001-01-01T00:00:00Z", True)
    admin.json("key", "expire", key, "--at", "never")
    assert state() == ("active", None, True)
    revoked = admin.json("key", "revoke", key)
    assert revoked["isActive"] is False
    assert revoked["state"] == "revoked"
    assert state()[0] == "revoked"
    assert "revoked" in admin.ok("key", "list")


def test_keyExpiresAtCreation(admin: Admin, populated: dict[str, Any]) -> None:
    key = admin.json(
        "key", "create", "--instance", populated["instance"], "--expires", "2040-06-01"
    )
    assert key["expiresAt"] == "2040-06-01T00:00:00Z"
    out = admin.ok("key", "create", "--instance", populated["instance"])
    assert "only time the key is shown" in out
    assert "mcpp_" in out


def test_keySalt(admin: Admin, populated: dict[str, Any]) -> None:
    """
    The stored hash is SHA-256 of the key with --key-salt (or
    MCPPROXY_KEY_SALT) appended.
    """
    salted = admin.json("key", "create", "--instance", populated["instance"], "--key-salt", "pep")
    fromEnv = admin.json(
        "key", "create", "--instance", populated["instance"], env={"MCPPROXY_KEY_SALT": "env"}
    )
    with sqlite3.connect(admin.database[len("sqlite:///") :]) as db:
        hashes = dict(db.execute('SELECT id, "apiKeyHash" FROM "McpApiKey"').fetchall())
    assert hashes[salted["id"]] == hashApiKey(salted["key"], "pep")
    assert hashes[fromEnv["id"]] == hashApiKey(fromEnv["key"], "env")


# -- import -------------------------------------------------------------------------


def test_import(admin: Admin, tmp_path: Path) -> None:
    """
    An mcpServers file becomes servers, configs, tools, a tool group and an
    instance, with a key.
    """
    path = echoServersFile(tmp_path / "claude.json")
    result = admin.json("import", str(path), "--key")
    assertNoSecret({k: v for k, v in result.items() if k != "key"})
    assert result["instance"]["name"] == "claude"
    assert result["key"].startswith("mcpp_")
    [server] = result["servers"]
    assert server["name"] == "echo"
    assert server["serverCreated"] is True
    assert "echo" in server["tools"]
    assert {t["name"] for t in result["tools"]} == set(server["tools"])

    # What was written.
    [org] = admin.json("org", "list")
    assert org["name"] == "default"
    stored = admin.json("server", "show", server["serverId"])
    assert stored["command"] == sys.executable
    assert stored["args"] == [str(ECHO_SERVER)]
    assert stored["envVars"] == ["ECHO_TOKEN"]
    assert sorted(t["name"] for t in stored["tools"]) == sorted(server["tools"])
    config = admin.json("config", "show", server["configId"])
    assert config["name"] == "echo"
    assert config["envVars"] == {"ECHO_TOKEN": "***"}
    instance = admin.json("instance", "show", result["instance"]["id"])
    assert sorted(t["toolName"] for t in instance["toolGroup"]["tools"]) == sorted(server["tools"])
    assert [k["id"] for k in instance["apiKeys"]] == [result["keyId"]]


def test_importHuman(admin: Admin, tmp_path: Path) -> None:
    path = echoServersFile(tmp_path / "servers.json")
    out = admin.ok("import", str(path), "--instance", "mine")
    instances = admin.json("instance", "list")
    assert [i["name"] for i in instances] == ["mine"]
    assert instances[0]["id"] in out
    assert "mcpp_" not in out
    assert SECRET not in out


def test_reimport(admin: Admin, tmp_path: Path) -> None:
    """
    Importing the same file again reuses the servers and configs of the
    same names (updating their env values), and needs a free instance name.
    """
    path = echoServersFile(tmp_path / "servers.json")
    first = admin.json("import", str(path))
    line = admin.fails("import", str(path))
    assert "an instance named 'servers' already exists" in line
    assert "--instance" in line

    second = admin.json("import", str(path), "--instance", "again", "--key")
    assert [(s["serverId"], s["configId"]) for s in second["servers"]] == [
        (s["serverId"], s["configId"]) for s in first["servers"]
    ]
    assert second["servers"][0]["serverCreated"] is False
    assert second["servers"][0]["configCreated"] is False
    assert len(admin.json("server", "list")) == 1
    assert len(admin.json("config", "list")) == 1
    assert len(admin.json("toolgroup", "list")) == 2

    # A changed value is stored.
    data = json.loads(path.read_text())
    data["mcpServers"]["echo"]["env"]["ECHO_TOKEN"] = "changed"
    path.write_text(json.dumps(data))
    admin.json("import", str(path), "--instance", "third")
    with sqlite3.connect(admin.database[len("sqlite:///") :]) as db:
        [(stored,)] = db.execute('SELECT "envVars" FROM "UserMcpServerConfig"').fetchall()
    assert json.loads(stored) == {"ECHO_TOKEN": "changed"}

    # Once the instance is deleted, its name is free again.
    admin.ok("instance", "delete", first["instance"]["id"])
    fourth = admin.json("import", str(path))
    assert fourth["instance"]["name"] == "servers"
    assert fourth["instance"]["id"] != first["instance"]["id"]


class RemoteServer:
    """
    A remote MCP server (FastMCP of the mcp SDK, tests/servers/) on a free
    loopback port, in its own process group.
    """

    def __init__(self, transport: str, path: str) -> None:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}{path}"
        self.process = subprocess.Popen(
            [sys.executable, str(REMOTE_SERVER), transport, str(self.port)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        deadline = time.monotonic() + 30
        while True:
            assert self.process.poll() is None, "the remote server exited"
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError("the remote server did not listen in time")
                time.sleep(0.05)

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()


@pytest.fixture(params=[("streamable-http", "/mcp"), ("sse", "/sse")], ids=["http", "sse"])
def remoteServer(request: Any) -> Iterator[tuple[str, RemoteServer]]:
    transport, path = request.param
    server = RemoteServer(transport, path)
    try:
        yield transport, server
    finally:
        server.stop()


def test_importRemote(admin: Admin, tmp_path: Path, remoteServer: tuple[str, RemoteServer]) -> None:
    """
    A remote entry is registered with its header names, its header values
    go to its config, and its tools are discovered.
    """
    transport, server = remoteServer
    path = echoServersFile(
        tmp_path / "mixed.json",
        remote={
            "url": server.url,
            "type": transport,
            "headers": {"Authorization": f"Bearer {SECRET}"},
        },
    )
    result = admin.run("import", str(path), "--json", "--key")
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    out = json.loads(result.stdout)
    assertNoSecret({k: v for k, v in out.items() if k != "key"})
    assertNoSecret(result.stderr)
    remote = next(s for s in out["servers"] if s["name"] == "remote")
    assert remote["transportType"] == ("SSE" if transport == "sse" else "STREAMABLE_HTTPS")
    assert {"echo", "add"} <= set(remote["tools"])
    assert {("remote", "echo"), ("echo", "echo")} <= {
        (t["server"], t["name"]) for t in out["tools"]
    }
    stored = admin.json("server", "show", remote["serverId"])
    assert stored["url"] == server.url
    assert stored["envVars"] == ["Authorization"]
    assert sorted(t["name"] for t in stored["tools"]) == sorted(remote["tools"])
    config = admin.json("config", "show", remote["configId"])
    assert config["envVars"] == {"Authorization": "***"}

    # tools sync reaches it too.
    synced = admin.json("tools", "sync", "--config", remote["configId"])
    assert sorted(synced["servers"][0]["tools"]) == sorted(remote["tools"])


def test_importRemoteUnreachable(admin: Admin, tmp_path: Path) -> None:
    """
    An unreachable remote upstream stops the import, unless --skip-failed
    registers it without tools; tools sync then reports it.
    """
    path = echoServersFile(
        tmp_path / "mixed.json",
        remote={
            "url": "http://127.0.0.1:1/mcp?token=" + SECRET,
            "headers": {"Authorization": f"Bearer {SECRET}"},
        },
    )
    line = admin.fails("import", str(path), "--timeout", "10", code=1)
    assert "cannot list the tools of 'remote'" in line
    assert SECRET not in line
    assert admin.json("server", "list") == []

    result = admin.run("import", str(path), "--json", "--skip-failed", "--timeout", "10")
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assertNoSecret(out)
    assertNoSecret(result.stderr)
    assert 'no "type": assuming streamable-http' in result.stderr
    remote = next(s for s in out["servers"] if s["name"] == "remote")
    assert remote["tools"] is None
    assert remote["transportType"] == "STREAMABLE_HTTPS"
    assert admin.json("server", "show", remote["serverId"])["url"] == (
        "http://127.0.0.1:1/mcp?token=***"
    )

    # Syncing every server: the echo server is synced, the remote one fails.
    result = admin.run("tools", "sync", "--json", "--timeout", "10")
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    synced = {s["name"]: s for s in json.loads(result.stdout)["servers"]}
    assert "echo" in synced["echo"]["tools"]
    assert synced["remote"]["tools"] is None
    assert "cannot list the tools of server 'remote'" in synced["remote"]["error"]
    assertNoSecret(result.stderr + result.stdout)


def test_importDifferentServer(admin: Admin, tmp_path: Path) -> None:
    """
    An existing server of the same name that reaches another upstream stops
    the import before anything is written.
    """
    admin.ok("init")
    admin.ok("server", "add", "echo", "--command", "/bin/true")
    path = echoServersFile(tmp_path / "servers.json")
    line = admin.fails("import", str(path))
    assert "a server named 'echo' already exists" in line
    assert admin.json("instance", "list") == []
    assert admin.json("config", "list") == []


def test_importUpstreamFailure(admin: Admin, tmp_path: Path) -> None:
    """
    An upstream that cannot list its tools stops the import, exit status 1,
    before anything is written.
    """
    path = tmp_path / "broken.json"
    path.write_text(json.dumps({"mcpServers": {"broken": {"command": str(tmp_path / "nope")}}}))
    line = admin.fails("import", str(path), "--timeout", "10", code=1)
    assert "cannot list the tools of 'broken'" in line
    assert "--skip-failed" in line
    assert admin.json("server", "list") == []
    assert admin.json("instance", "list") == []
    assert admin.json("org", "list") == []

    # With --skip-failed, it is registered without tools.
    result = admin.run("import", str(path), "--timeout", "10", "--skip-failed", "--json")
    assert result.returncode == 0, result.stderr
    assert "registered without tools" in result.stderr
    [server] = json.loads(result.stdout)["servers"]
    assert server["tools"] is None
    assert [s["name"] for s in admin.json("server", "list")] == ["broken"]


BAD_FILES = [
    ("{", "not valid JSON"),
    ("[]", 'expected a JSON object with an "mcpServers" object'),
    ('{"other": {}}', 'no "mcpServers"'),
    ('{"mcpServers": []}', "must be an object mapping names"),
    ('{"mcpServers": {}}', "has no (enabled) servers"),
    ('{"mcpServers": {"a": {}}}', 'mcpServers.a: needs "command"'),
    ('{"mcpServers": {"a": {"command": ""}}}', '"command" must be a non-empty string'),
    ('{"mcpServers": {"a": {"command": "x", "args": "y"}}}', '"args" must be a list of strings'),
    ('{"mcpServers": {"a": {"command": "x", "env": {"N": 1}}}}', '"env.N" must be a string'),
    ('{"mcpServers": {"a": {"command": "x", "env": {"A-B": "1"}}}}', "bad environment variable"),
    ('{"mcpServers": {"a": {"command": "x", "url": "http://h/"}}}', "not both"),
    ('{"mcpServers": {"a": {"url": "ftp://h/"}}}', "scheme must be http or https"),
    ('{"mcpServers": {"a": {"url": "https://u:p@h/"}}}', "user name or password"),
    ('{"mcpServers": {"a": {"url": "https://h/", "type": "ws"}}}', "bad transport"),
    ('{"mcpServers": {"a": {"command": "x"}, "a": {"command": "y"}}}', "appears twice"),
    ('{"mcpServers": {"a": {"command": "x", "disabled": true}}}', "no (enabled) servers"),
]


@pytest.mark.parametrize(("text", "message"), BAD_FILES)
def test_importBadFile(admin: Admin, tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "bad.json"
    path.write_text(text)
    line = admin.fails("import", str(path))
    assert message in line
    assert str(path) in line
    assert not (tmp_path / "admin.sqlite3").exists()


def test_importMissingFile(admin: Admin, tmp_path: Path) -> None:
    assert "cannot read" in admin.fails("import", str(tmp_path / "missing.json"))


# -- the importer's validation, in process ---------------------------------------------


def test_parseServersFile() -> None:
    parsed = parseServersFile(
        json.dumps(
            {
                "servers": {
                    "a": {"command": "npx", "args": ["-y", "pkg"], "env": {"K": "sekrit"}},
                    "b": {"url": "https://h/mcp", "type": "http", "headers": {"X-K": "v"}},
                    "c": {"url": "https://h/sse", "type": "sse"},
                    "d": {"url": "https://h/mcp"},
                    "e": {"command": "x", "disabled": True},
                    "f": {"type": "stdio", "command": "y", "autoApprove": []},
                }
            }
        )
    )
    assert [(e.name, e.transportType) for e in parsed.entries] == [
        ("a", "STDIO"),
        ("b", "STREAMABLE_HTTPS"),
        ("c", "SSE"),
        ("d", "STREAMABLE_HTTPS"),
        ("f", "STDIO"),
    ]
    assert parsed.entries[0].args == ("-y", "pkg")
    assert parsed.entries[0].envNames == ("K",)
    assert parsed.entries[1].envNames == ("X-K",)
    assert "sekrit" not in repr(parsed.entries[0])
    assert any("servers.e is disabled" in w for w in parsed.warnings)
    assert any("servers.d" in w and "streamable-http" in w for w in parsed.warnings)


@pytest.mark.parametrize(
    "url",
    ["http://h", "https://h:8443/mcp?x=1", "https://[::1]/mcp"],
)
def test_goodURLs(url: str) -> None:
    assert validateUpstreamURL(url) == url


@pytest.mark.parametrize(
    "url",
    ["", "h/mcp", "file:///etc/passwd", "https://u@h/", "https://h:99999/", "https://h /"],
)
def test_badURLs(url: str) -> None:
    with pytest.raises(InvalidInput):
        validateUpstreamURL(url)
