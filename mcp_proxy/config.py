"""
The settings of a proxy, and where they come from.

Every option of C{twistd mcpproxy} is described once in L{OPTIONS}: its
name, default, type and help.  The command line wins over the environment
variable C{MCPPROXY_<NAME>} (upper case, dashes as underscores), which wins
over the default.  L{Settings} is the frozen, validated result that the
service is built from.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Mapping, Optional, Sequence
from urllib.parse import unquote, urlsplit

from attrs import frozen

ENV_PREFIX = "MCPPROXY_"

DEFAULT_LISTEN = "tcp:8080:interface=127.0.0.1"
DEFAULT_DATABASE = "sqlite:///mcpproxy.sqlite3"


class SettingsError(ValueError):
    """
    An option has a value that cannot be used; the message names it.
    """


def _positiveInt(value: str) -> int:
    n = int(value)
    if n < 1:
        raise ValueError("must be at least 1")
    return n


def _nonNegativeFloat(value: str) -> float:
    n = float(value)
    if not n >= 0 or n == float("inf"):
        raise ValueError("must be a number of seconds, 0 or more")
    return n


def _positiveFloat(value: str) -> float:
    n = _nonNegativeFloat(value)
    if n == 0:
        raise ValueError("must be more than 0")
    return n


def _size(value: str) -> int:
    """
    A byte size: a whole number with an optional K, M or G suffix (powers
    of 1024).
    """
    text = value.strip().upper().removesuffix("B").removesuffix("I")
    factor = 1
    for suffix, f in (("K", 1024), ("M", 1024**2), ("G", 1024**3)):
        if text.endswith(suffix):
            text, factor = text[:-1], f
            break
    n = int(text) * factor
    if n < 1:
        raise ValueError("must be at least 1 byte")
    return n


def _str(value: str) -> str:
    return value


def _onOff(value: str) -> bool:
    text = value.strip().lower()
    if text in ("on", "true", "yes", "1"):
        return True
    if text in ("off", "false", "no", "0"):
        return False
    raise ValueError("must be on or off")


def _writer(value: str) -> str:
    text = value.strip().lower()
    if text not in ("process", "inline"):
        raise ValueError("must be process or inline")
    return text


def _names(value: str) -> frozenset[str]:
    names = frozenset(part.strip().lower() for part in value.split(",") if part.strip())
    if not names:
        raise ValueError("must name at least one, or *")
    return names


@frozen
class OptionSpec:
    """
    One option: C{--name}, its variable, default and coercion.
    """

    name: str
    default: Optional[str]
    coerce: Callable[[str], Any]
    help: str

    @property
    def envName(self) -> str:
        return ENV_PREFIX + self.name.upper().replace("-", "_")

    @property
    def attribute(self) -> str:
        head, *rest = self.name.split("-")
        return head + "".join(part.capitalize() for part in rest)


def _logLevel(value: str) -> str:
    from mcp_proxy.logs import parseLevel

    parseLevel(value)
    return value.strip().lower()


def _logFormat(value: str) -> str:
    from mcp_proxy.logs import parseFormat

    return parseFormat(value)


OPTIONS: tuple[OptionSpec, ...] = (
    OptionSpec(
        "database",
        DEFAULT_DATABASE,
        _str,
        "Database URL: sqlite:///PATH or postgresql://user:password@host:port/dbname.",
    ),
    OptionSpec(
        "cache",
        "memory",
        _str,
        "Cache backend for API-key results and configurations: memory, "
        "redis://[:password@]host:port/db (rediss:// for TLS), or NAME:ARGS of a "
        "cache plugin (docs/extending.md).",
    ),
    OptionSpec(
        "key-salt",
        "",
        _str,
        "Salt appended to API keys before hashing (the origin's "
        "PRISMA_FIELD_ENCRYPTION_HASH_SALT).",
    ),
    OptionSpec("auth-cache-size", "100", _positiveInt, "Entries in the API-key cache."),
    OptionSpec("auth-cache-ttl", "300", _positiveFloat, "Seconds a valid API key stays cached."),
    OptionSpec(
        "auth-negative-ttl",
        "30",
        _nonNegativeFloat,
        "Seconds an unknown or refused API key stays cached (0: not cached).",
    ),
    OptionSpec(
        "config-cache-ttl",
        "300",
        _positiveFloat,
        "Seconds an instance's configuration stays cached.",
    ),
    OptionSpec(
        "session-timeout", "600", _positiveFloat, "Seconds of inactivity that end a session."
    ),
    OptionSpec(
        "session-sweep",
        None,
        _positiveFloat,
        "Seconds between sweeps of expired sessions (default: half the session timeout).",
    ),
    OptionSpec("max-sessions", "10000", _positiveInt, "Sessions open at once; more get 503."),
    OptionSpec(
        "max-concurrent-requests",
        "256",
        _positiveInt,
        "POSTs served at once; beyond it requests are shed with 503 and Retry-After.",
    ),
    OptionSpec(
        "upstream-processes", "1", _positiveInt, "Processes per stdio upstream (instance, config)."
    ),
    OptionSpec("upstream-timeout", "30", _positiveFloat, "Seconds an upstream call may take."),
    OptionSpec(
        "upstream-idle-ttl", "300", _positiveFloat, "Seconds an idle upstream process is kept."
    ),
    OptionSpec(
        "max-body-size", "10M", _size, "Largest request body (K, M, G suffixes); more gets 413."
    ),
    OptionSpec("sse-keepalive", "30", _positiveFloat, "Seconds between SSE keep-alive comments."),
    OptionSpec(
        "request-log",
        "on",
        _onOff,
        "Write a request-log row per tools/call, tools/list, resources/read and "
        "prompts/get (on or off).",
    ),
    OptionSpec(
        "request-log-writer",
        "process",
        _writer,
        "Who builds and writes request-log rows: process (a writer process of its own, "
        "so that the work runs beside the proxy's reactor, not under its GIL) or inline "
        "(the proxy's process; always so for an in-memory SQLite database).",
    ),
    OptionSpec(
        "request-log-batch-size", "200", _positiveInt, "Request-log rows written per INSERT."
    ),
    OptionSpec(
        "request-log-flush-interval",
        "0.5",
        _positiveFloat,
        "Seconds at most between request-log writes.",
    ),
    OptionSpec(
        "request-log-max-queue",
        "10000",
        _positiveInt,
        "Request-log rows kept while the database is slow or down; beyond it the "
        "oldest are dropped (and counted).",
    ),
    OptionSpec(
        "request-log-max-data",
        "5M",
        _size,
        "Largest request or response whose compressed copy is kept (McpServerRequestData).",
    ),
    OptionSpec(
        "request-log-double-encode",
        "off",
        _onOff,
        "Store the detail payloads double-encoded, as the origin did (on or off).",
    ),
    OptionSpec(
        "client-timeout",
        "60",
        _positiveFloat,
        "Seconds a client may take to answer a request relayed from an upstream "
        "(sampling, elicitation, roots).",
    ),
    OptionSpec(
        "allowed-hosts",
        None,
        _names,
        "Comma-separated host names the Host header may name, or * for any "
        "(default: loopback names when every --listen is on loopback, else any).",
    ),
    OptionSpec(
        "allowed-origins",
        None,
        _names,
        "Comma-separated Origins browsers may call from, or * for any "
        "(default: the request's own host and loopback).",
    ),
    OptionSpec(
        "log-level",
        "info",
        _logLevel,
        "Least severe log level written: debug, info, warn, error or critical.",
    ),
    OptionSpec("log-format", "text", _logFormat, "Log format: text, or json (RFC 7464 records)."),
    OptionSpec(
        "metrics-token",
        None,
        _str,
        "Bearer token that /metrics requires (default: none; prefer the variable).",
    ),
    OptionSpec(
        "metrics-listen",
        None,
        _str,
        "Endpoint of a listener serving only /metrics; the main port then does not "
        "(default: none).",
    ),
)

OPTIONS_BY_NAME: Mapping[str, OptionSpec] = {o.name: o for o in OPTIONS}


@frozen
class DatabaseURL:
    """
    A parsed C{--database} value.

    @ivar kind: C{"sqlite"} or C{"postgresql"}.
    @ivar path: the SQLite file (C{":memory:"} for a private in-memory one).
    @ivar dsn: the libpq connection string for PostgreSQL.
    """

    kind: str
    path: str = ""
    dsn: str = ""

    @classmethod
    def parse(cls, url: str) -> DatabaseURL:
        """
        Parse C{sqlite:///PATH} (relative to the working directory;
        C{sqlite:////abs/path} for an absolute one) or
        C{postgresql://user:password@host:port/dbname}.

        @raise SettingsError: for anything else.
        """
        if url.startswith("sqlite://"):
            rest = url[len("sqlite://") :]
            if not rest.startswith("/") or len(rest) < 2:
                raise SettingsError(f"bad --database {url!r}: expected sqlite:///PATH")
            return cls(kind="sqlite", path=unquote(rest[1:]))
        parts = urlsplit(url)
        if parts.scheme in ("postgresql", "postgres"):
            dbname = parts.path.lstrip("/")
            if not parts.hostname and not dbname:
                raise SettingsError(
                    f"bad --database {url!r}: expected postgresql://user:password@host:port/dbname"
                )
            fields = []
            if parts.hostname:
                fields.append(("host", parts.hostname))
            try:
                port = parts.port
            except ValueError:
                raise SettingsError(f"bad --database {url!r}: bad port") from None
            if port:
                fields.append(("port", str(port)))
            if parts.username:
                fields.append(("user", unquote(parts.username)))
            if parts.password:
                fields.append(("password", unquote(parts.password)))
            if dbname:
                fields.append(("dbname", unquote(dbname)))
            for item in parts.query.split("&") if parts.query else ():
                key, _, value = item.partition("=")
                if key:
                    fields.append((key, unquote(value)))
            dsn = " ".join(f"{k}={_quoteLibpq(v)}" for k, v in fields)
            return cls(kind="postgresql", dsn=dsn)
        raise SettingsError(
            f"bad --database {url!r}: expected sqlite:///PATH or "
            "postgresql://user:password@host:port/dbname"
        )

    def redacted(self) -> str:
        """
        A form safe to log: the password is masked.
        """
        if self.kind == "sqlite":
            return f"sqlite:///{self.path}"
        return " ".join(
            "password=***" if part.startswith("password=") else part for part in self.dsn.split(" ")
        )


def _quoteLibpq(value: str) -> str:
    if value and all(c not in value for c in " '\\"):
        return value
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


@frozen
class Settings:
    """
    The validated settings of one proxy.
    """

    listen: tuple[str, ...] = (DEFAULT_LISTEN,)
    database: DatabaseURL = DatabaseURL(kind="sqlite", path="mcpproxy.sqlite3")
    cache: str = "memory"
    keySalt: str = ""
    authCacheSize: int = 100
    authCacheTtl: float = 300.0
    authNegativeTtl: float = 30.0
    configCacheTtl: float = 300.0
    sessionTimeout: float = 600.0
    sessionSweep: float = 300.0
    maxSessions: int = 10000
    maxConcurrentRequests: int = 256
    upstreamProcesses: int = 1
    upstreamTimeout: float = 30.0
    upstreamIdleTtl: float = 300.0
    maxBodySize: int = 10 * 1024 * 1024
    sseKeepalive: float = 30.0
    clientTimeout: float = 60.0
    requestLog: bool = True
    requestLogWriter: str = "process"
    requestLogBatchSize: int = 200
    requestLogFlushInterval: float = 0.5
    requestLogMaxQueue: int = 10000
    requestLogMaxData: int = 5 * 1024 * 1024
    requestLogDoubleEncode: bool = False
    allowedHosts: Optional[frozenset[str]] = None
    allowedOrigins: Optional[frozenset[str]] = None
    logLevel: str = "info"
    logFormat: str = "text"
    metricsToken: Optional[str] = None
    metricsListen: Optional[str] = None

    def hostPolicy(self) -> Optional[frozenset[str]]:
        """
        The host names the front accepts in C{Host} (C{None}: any): as
        configured, else loopback names when every listener is on loopback.
        """
        if self.allowedHosts is not None:
            return None if "*" in self.allowedHosts else self.allowedHosts
        if all(_onLoopback(description) for description in self.listen):
            return frozenset({"127.0.0.1", "localhost", "::1"})
        return None


def _onLoopback(description: str) -> bool:
    """
    Whether an endpoint description listens on loopback only (a TCP port
    with a loopback C{interface}, or a UNIX socket).
    """
    kind = description.split(":", 1)[0]
    if kind == "unix":
        return True
    for part in description.split(":"):
        if part.startswith("interface="):
            address = part[len("interface=") :].strip("[]").replace("\\", "")
            return address in ("127.0.0.1", "::1", "localhost") or address.startswith("127.")
    return False


def resolveSettings(
    given: Mapping[str, Optional[str]],
    listen: Sequence[str] = (),
    environ: Optional[Mapping[str, str]] = None,
) -> Settings:
    """
    Build L{Settings} from command-line values, the environment and the
    defaults, in that order of precedence.

    @param given: option name to the command-line value (C{None} when the
        option was not given).
    @param listen: the C{--listen} values given on the command line.
    @param environ: the environment (default: C{os.environ}).
    @raise SettingsError: naming the option and the problem.
    """
    env = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    for spec in OPTIONS:
        raw = given.get(spec.name)
        source = f"--{spec.name}"
        if raw is None and spec.envName in env:
            raw = env[spec.envName]
            source = spec.envName
        if raw is None:
            raw = spec.default
        if raw is None:
            continue
        try:
            values[spec.attribute] = spec.coerce(raw)
        except (TypeError, ValueError) as e:
            raise SettingsError(f"bad {source} value {raw!r}: {e}") from None
    values["database"] = DatabaseURL.parse(values["database"])
    if "sessionSweep" not in values:
        values["sessionSweep"] = values["sessionTimeout"] / 2
    if listen:
        values["listen"] = tuple(listen)
    elif ENV_PREFIX + "LISTEN" in env:
        values["listen"] = tuple(
            part.strip() for part in env[ENV_PREFIX + "LISTEN"].split(",") if part.strip()
        )
    else:
        values["listen"] = (DEFAULT_LISTEN,)
    return Settings(**values)
