"""
Tests for the options of C{twistd mcpproxy}: the plugin, the command line,
the environment, and bad values.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from twisted.application.service import IServiceMaker
from twisted.plugin import getPlugins
from twisted.python import usage
from zope.interface.verify import verifyObject

from mcp_proxy.config import OPTIONS, DatabaseURL, SettingsError, resolveSettings
from mcp_proxy.tap import Options

ROOT = Path(__file__).resolve().parent.parent


def test_pluginDiscoverable() -> None:
    """
    twistd finds the C{mcpproxy} plugin.
    """
    makers = {p.tapname: p for p in getPlugins(IServiceMaker)}
    assert "mcpproxy" in makers
    verifyObject(IServiceMaker, makers["mcpproxy"])


def test_defaults() -> None:
    """
    With nothing given, the proxy listens on loopback port 8080 and uses the
    SQLite file in the working directory.
    """
    settings = resolveSettings({}, (), environ={})
    assert settings.listen == ("tcp:8080:interface=127.0.0.1",)
    assert settings.database == DatabaseURL(kind="sqlite", path="mcpproxy.sqlite3")
    assert settings.authCacheSize == 100
    assert settings.authCacheTtl == 300
    assert settings.sessionTimeout == 600
    assert settings.sessionSweep == 300
    assert settings.maxSessions == 10000
    assert settings.maxBodySize == 10 * 1024 * 1024


def test_environmentAndCommandLine() -> None:
    """
    C{MCPPROXY_<NAME>} sets an option; the command line wins over it.
    """
    env = {
        "MCPPROXY_AUTH_CACHE_SIZE": "7",
        "MCPPROXY_SESSION_TIMEOUT": "60",
        "MCPPROXY_LISTEN": "tcp:1:interface=127.0.0.1, tcp:2:interface=127.0.0.1",
    }
    settings = resolveSettings({"auth-cache-size": "9"}, (), environ=env)
    assert settings.authCacheSize == 9
    assert settings.sessionTimeout == 60
    assert settings.sessionSweep == 30
    assert settings.listen == ("tcp:1:interface=127.0.0.1", "tcp:2:interface=127.0.0.1")
    settings = resolveSettings({}, ("tcp:3",), environ=env)
    assert settings.listen == ("tcp:3",)


@pytest.mark.parametrize(
    "name, value",
    [
        ("auth-cache-size", "0"),
        ("auth-cache-size", "many"),
        ("session-timeout", "-1"),
        ("max-body-size", "10X"),
        ("database", "mysql://x"),
        ("database", "sqlite://relative"),
    ],
)
def test_badValues(name: str, value: str) -> None:
    """
    A bad value raises L{SettingsError} naming the option.
    """
    with pytest.raises(SettingsError, match=name):
        resolveSettings({name: value}, (), environ={})


def test_badEnvironmentValueNamesTheVariable() -> None:
    """
    A bad value from the environment names the variable.
    """
    with pytest.raises(SettingsError, match="MCPPROXY_MAX_SESSIONS"):
        resolveSettings({}, (), environ={"MCPPROXY_MAX_SESSIONS": "lots"})


def test_sizes() -> None:
    """
    Sizes take K, M and G suffixes.
    """
    assert resolveSettings({"max-body-size": "512K"}, (), environ={}).maxBodySize == 512 * 1024
    assert resolveSettings({"max-body-size": "1G"}, (), environ={}).maxBodySize == 1024**3
    assert resolveSettings({"max-body-size": "100"}, (), environ={}).maxBodySize == 100


def test_postgresqlURL() -> None:
    """
    A PostgreSQL URL becomes a libpq DSN; the redacted form hides the
    password.
    """
    url = DatabaseURL.parse("postgresql://me:s3cret@db.example:5433/proxy?sslmode=require")
    assert url.kind == "postgresql"
    assert url.dsn == (
        "host=db.example port=5433 user=me password=s3cret dbname=proxy sslmode=require"
    )
    assert "s3cret" not in url.redacted()


def test_optionsParse() -> None:
    """
    The twistd options parse into settings; C{--listen} repeats.
    """
    options = Options()
    options.parseOptions(
        [
            "--listen",
            "tcp:0:interface=127.0.0.1",
            "--listen",
            "unix:/tmp/x.sock",
            "--max-sessions",
            "5",
        ]
    )
    assert options.settings is not None
    assert options.settings.listen == ("tcp:0:interface=127.0.0.1", "unix:/tmp/x.sock")
    assert options.settings.maxSessions == 5


def test_optionsBadEndpoint() -> None:
    """
    A bad endpoint description is a usage error.
    """
    with pytest.raises(usage.UsageError, match="--listen"):
        Options().parseOptions(["--listen", "nonsense:1"])


def test_everyOptionDocumented() -> None:
    """
    docs/configuration.md lists every option and its variable.
    """
    text = (ROOT / "docs" / "configuration.md").read_text()
    for spec in OPTIONS:
        assert f"`--{spec.name}`" in text
        assert spec.envName in text


def _twistd(*args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT)
    return subprocess.run(
        [
            sys.executable,
            "-c",
            "from twisted.scripts.twistd import run; run()",
            "-n",
            "--pidfile=",
            "mcpproxy",
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        cwd=str(ROOT),
    )


def test_twistdHelp() -> None:
    """
    C{twistd mcpproxy --help} documents every option.
    """
    result = _twistd("--help")
    assert result.returncode == 0, result.stderr
    for spec in OPTIONS:
        assert f"--{spec.name}" in result.stdout
    assert "--listen" in result.stdout


def test_twistdBadValue() -> None:
    """
    A bad value gives a usage error and exit status 1, without a traceback.
    """
    result = _twistd("--max-sessions", "zero")
    assert result.returncode == 1
    output = result.stdout + result.stderr
    assert "--max-sessions" in output
    assert "Traceback" not in output
