"""
Import of the widely used C{mcpServers} JSON format into mcp-proxy.

The file looks like this (Claude Desktop, Cursor, VS Code and many others
write it)::

    {"mcpServers": {
        "time": {"command": "uvx", "args": ["mcp-server-time"],
                 "env": {"TZ": "Europe/Paris"}},
        "deepl": {"url": "https://example.com/mcp", "type": "streamable-http",
                  "headers": {"X-DeepL-API-Key": "..."}}}}

Each entry becomes an "McpServer" (how to reach it, with the I{names} of its
environment variables or headers) and a "UserMcpServerConfig" named after
the entry (with their I{values}).  The tools of every upstream that can be
reached are discovered and stored, then gathered in a new tool group served
by a new instance.

Everything that can be checked is checked before anything is written:
the file, the names, the organization, the instance name, the existing
servers and configs of the same names, and the upstreams themselves
(their tools are listed first).
"""

from __future__ import annotations

import json
import re
from typing import Any, Awaitable, Callable, Mapping, Optional, Sequence
from urllib.parse import urlsplit, urlunsplit

from attrs import field, frozen

from mcp_proxy.errors import InvalidInput, ProxyError
from mcp_proxy.models import (
    AUTH_API_KEY,
    AUTH_NONE,
    SSE,
    STDIO,
    STREAMABLE_HTTPS,
    Instance,
    McpServer,
    ServerConfig,
    UpstreamConfig,
)

# A function that lists the tools of one upstream:
# (reactor, config, timeout) -> awaitable list of tool dicts.
Discoverer = Callable[[Any, UpstreamConfig, float], Awaitable[list[dict[str, Any]]]]

_ENV_NAME = re.compile(r"\A[A-Za-z_][A-Za-z0-9_]*\Z")
_HEADER_NAME = re.compile(r"\A[!#$%&'*+.^_`|~0-9A-Za-z-]+\Z")

# The "type" values of a remote entry, normalised (lower case, no "-"/"_").
_REMOTE_TYPES = {
    "streamablehttp": STREAMABLE_HTTPS,
    "http": STREAMABLE_HTTPS,
    "sse": SSE,
}

# Transport names on the command line and in the file, and back.
TRANSPORT_NAMES = {STDIO: "stdio", STREAMABLE_HTTPS: "streamable-http", SSE: "sse"}


class UpstreamFailed(ProxyError):
    """
    An upstream could not be started or did not list its tools.
    """


# -- validation helpers shared with the admin command -------------------------


def validateEnvName(name: str, what: str = "environment variable") -> str:
    """
    Check an environment variable name: letters, digits and C{_}, not
    starting with a digit.

    @raise InvalidInput: naming the bad value.
    """
    if not isinstance(name, str) or not _ENV_NAME.match(name):
        raise InvalidInput(
            f"bad {what} name {name!r}: use letters, digits and _, not starting with a digit"
        )
    return name


def validateHeaderName(name: str) -> str:
    """
    Check an HTTP header name (an RFC 9110 token).

    @raise InvalidInput: naming the bad value.
    """
    if not isinstance(name, str) or not _HEADER_NAME.match(name):
        raise InvalidInput(f"bad header name {name!r}")
    return name


def validateUpstreamURL(url: str) -> str:
    """
    Check the URL of a remote upstream: C{http} or C{https}, a host, no
    user name or password (credentials belong in a config's headers, where
    they are kept secret), no whitespace.

    @return: the URL, unchanged.
    @raise InvalidInput: saying what is wrong (without echoing credentials).
    """
    if not isinstance(url, str) or not url:
        raise InvalidInput("bad URL: empty")
    if any(c.isspace() for c in url):
        raise InvalidInput("bad URL: it contains whitespace")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as e:
        raise InvalidInput(f"bad URL: {e}")
    if parts.scheme not in ("http", "https"):
        raise InvalidInput(
            f"bad URL {maskURL(url)!r}: the scheme must be http or https, not {parts.scheme!r}"
        )
    if parts.username is not None or parts.password is not None or "@" in parts.netloc:
        raise InvalidInput(
            f"bad URL {maskURL(url)!r}: it must not contain a user name or password "
            "(put credentials in headers, e.g. --header-name Authorization)"
        )
    if not parts.hostname:
        raise InvalidInput(f"bad URL {url!r}: it has no host")
    if port == 0:
        raise InvalidInput(f"bad URL {url!r}: bad port")
    return url


def maskURL(url: str) -> str:
    """
    A URL safe to print: user information and the values of query
    parameters (tokens are sometimes passed there) replaced by C{***}.
    """
    try:
        parts = urlsplit(url)
    except ValueError:
        return "***"
    netloc = parts.netloc
    if "@" in netloc:
        netloc = "***@" + netloc.rpartition("@")[2]
    query = "&".join(
        (item.partition("=")[0] + "=***") if "=" in item else item
        for item in parts.query.split("&")
        if item
    )
    return urlunsplit((parts.scheme, netloc, parts.path, query, ""))


def parseTransport(name: str) -> str:
    """
    Map a remote transport name (C{streamable-http}, C{http}, C{sse}, in
    any case, with or without dashes) to its L{mcp_proxy.models} constant.

    @raise InvalidInput: for anything else.
    """
    key = name.lower().replace("-", "").replace("_", "") if isinstance(name, str) else ""
    try:
        return _REMOTE_TYPES[key]
    except KeyError:
        raise InvalidInput(
            f"bad transport {name!r}: expected streamable-http (or http) or sse"
        ) from None


# -- the file ------------------------------------------------------------------


@frozen
class ServerEntry:
    """
    One validated entry of an C{mcpServers} file.

    @ivar secrets: env values (stdio) or header values (remote).  Secret.
    """

    name: str
    transportType: str
    command: Optional[str]
    args: tuple[str, ...]
    url: Optional[str]
    secrets: Mapping[str, str] = field(repr=False)

    @property
    def envNames(self) -> tuple[str, ...]:
        return tuple(self.secrets)

    @property
    def isStdio(self) -> bool:
        return self.transportType == STDIO


@frozen
class ServersFile:
    """
    A validated C{mcpServers} file.

    @ivar warnings: things worth telling the user that did not stop the
        import (skipped disabled entries, assumed transports).
    """

    entries: tuple[ServerEntry, ...]
    warnings: tuple[str, ...] = ()


def _rejectDuplicateKeys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise InvalidInput(f"the name {key!r} appears twice in the same object")
        result[key] = value
    return result


def loadServersFile(path: str) -> ServersFile:
    """
    Read and validate an C{mcpServers} file.

    @raise InvalidInput: with a message naming the file and the entry.
    """
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise InvalidInput(f"cannot read {path}: {e.strerror or e}")
    except UnicodeDecodeError:
        raise InvalidInput(f"{path}: not a UTF-8 text file")
    try:
        return parseServersFile(text)
    except InvalidInput as e:
        raise InvalidInput(f"{path}: {e}")


def parseServersFile(text: str) -> ServersFile:
    """
    Validate the text of an C{mcpServers} file.

    Both C{"mcpServers"} and VS Code's C{"servers"} are accepted as the
    top-level key.  Entries with C{"disabled": true} are skipped with a
    warning.  Unknown keys of an entry are ignored.

    @raise InvalidInput: for the first problem found.
    """
    try:
        document = json.loads(text, object_pairs_hook=_rejectDuplicateKeys)
    except json.JSONDecodeError as e:
        raise InvalidInput(f"not valid JSON: {e.msg} at line {e.lineno} column {e.colno}")
    if not isinstance(document, dict):
        raise InvalidInput('expected a JSON object with an "mcpServers" object')
    keys = [k for k in ("mcpServers", "servers") if k in document]
    if not keys:
        raise InvalidInput('no "mcpServers" object at the top level')
    if len(keys) > 1:
        raise InvalidInput('give either "mcpServers" or "servers", not both')
    servers = document[keys[0]]
    if not isinstance(servers, dict):
        raise InvalidInput(f'"{keys[0]}" must be an object mapping names to servers')
    entries = []
    warnings = []
    for name, spec in servers.items():
        where = f"{keys[0]}.{name}"
        if not name.strip() or any(ord(c) < 32 for c in name) or len(name) > 200:
            raise InvalidInput(f"{where}: bad server name {name!r}")
        if not isinstance(spec, dict):
            raise InvalidInput(f"{where}: must be an object")
        disabled = spec.get("disabled", False)
        if not isinstance(disabled, bool):
            raise InvalidInput(f'{where}: "disabled" must be true or false')
        if disabled:
            warnings.append(f"{where} is disabled: skipped")
            continue
        try:
            entry, warning = _parseEntry(name, spec)
        except InvalidInput as e:
            raise InvalidInput(f"{where}: {e}")
        if warning:
            warnings.append(f"{where}: {warning}")
        entries.append(entry)
    if not entries:
        raise InvalidInput(f'"{keys[0]}" has no (enabled) servers')
    return ServersFile(tuple(entries), tuple(warnings))


def _stringMap(
    spec: Mapping[str, Any], key: str, checkName: Callable[[str], str]
) -> dict[str, str]:
    value = spec.get(key, {})
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InvalidInput(f'"{key}" must be an object of names to strings')
    result = {}
    for name, v in value.items():
        checkName(name)
        if not isinstance(v, str):
            raise InvalidInput(
                f'"{key}.{name}" must be a string, not {type(v).__name__} '
                '(quote numbers and booleans: "1", "true")'
            )
        result[name] = v
    return result


def _parseEntry(name: str, spec: Mapping[str, Any]) -> tuple[ServerEntry, Optional[str]]:
    kind = spec.get("type")
    if kind is not None and not isinstance(kind, str):
        raise InvalidInput('"type" must be a string')
    hasCommand = "command" in spec
    hasURL = "url" in spec or "serverUrl" in spec
    if hasCommand and hasURL:
        raise InvalidInput('give either "command" (stdio) or "url" (remote), not both')
    if hasCommand:
        if kind is not None and kind.lower() != "stdio":
            raise InvalidInput(
                f'"type" is {kind!r} but the entry has a "command": expected "stdio"'
            )
        command = spec["command"]
        if not isinstance(command, str) or not command.strip():
            raise InvalidInput('"command" must be a non-empty string')
        args = spec.get("args", [])
        if args is None:
            args = []
        if not isinstance(args, list) or not all(isinstance(a, str) for a in args):
            raise InvalidInput('"args" must be a list of strings')
        env = _stringMap(spec, "env", validateEnvName)
        return ServerEntry(name, STDIO, command, tuple(args), None, env), None
    if hasURL:
        url = spec.get("url", spec.get("serverUrl"))
        if not isinstance(url, str):
            raise InvalidInput('"url" must be a string')
        validateUpstreamURL(url)
        warning = None
        if kind is None:
            transport = STREAMABLE_HTTPS
            warning = 'no "type": assuming streamable-http'
        else:
            transport = parseTransport(kind)
        headers = _stringMap(spec, "headers", validateHeaderName)
        return ServerEntry(name, transport, None, (), url, headers), warning
    raise InvalidInput('needs "command" (a stdio server) or "url" (a remote server)')


# -- the import -----------------------------------------------------------------


@frozen
class ImportedServer:
    """
    What the import did with one entry.

    @ivar tools: the discovered tool names, or C{None} when the upstream
        was not contacted (a remote one without remote discovery).
    """

    name: str
    transportType: str
    serverId: str
    configId: str
    serverCreated: bool
    configCreated: bool
    tools: Optional[tuple[str, ...]]


@frozen
class ImportResult:
    instance: Instance
    toolGroupId: str
    servers: tuple[ImportedServer, ...]
    warnings: tuple[str, ...]


@frozen
class _Plan:
    entry: ServerEntry
    server: Optional[McpServer]
    config: Optional[ServerConfig]


def upstreamConfigFor(entry: ServerEntry, configId: str = "") -> UpstreamConfig:
    """
    The L{UpstreamConfig} that reaches an entry's upstream, for discovery.
    """
    return UpstreamConfig(
        configId=configId,
        name=entry.name,
        transportType=entry.transportType,
        command=entry.command,
        args=entry.args,
        url=entry.url,
        env=dict(entry.secrets),
        authType=AUTH_NONE,
        toolNames=frozenset(),
    )


def normaliseTools(name: str, tools: Sequence[Any]) -> list[tuple[str, str, dict[str, Any]]]:
    """
    Turn a discovered C{tools/list} result into the C{(name, description,
    inputSchema)} triples that L{IRepository.syncTools} takes.

    @raise UpstreamFailed: when the upstream's answer is not a list of tools.
    """
    result = []
    seen = set()
    for tool in tools:
        if not isinstance(tool, dict) or not isinstance(tool.get("name"), str) or not tool["name"]:
            raise UpstreamFailed(f"{name}: the upstream listed a tool without a name")
        if tool["name"] in seen:
            continue
        seen.add(tool["name"])
        description = tool.get("description")
        schema = tool.get("inputSchema")
        result.append(
            (
                tool["name"],
                description if isinstance(description, str) else "",
                schema if isinstance(schema, dict) else {"type": "object"},
            )
        )
    return result


def sameDefinition(server: McpServer, entry: ServerEntry) -> bool:
    """
    Whether an existing server reaches the same upstream as an entry.
    """
    return (
        server.transportType == entry.transportType
        and (server.command or None) == entry.command
        and tuple(server.args) == entry.args
        and (server.url or None) == entry.url
    )


def describeServer(
    transportType: str, command: Optional[str], args: Sequence[str], url: Optional[str]
) -> str:
    """
    A short description of how a server is reached, without secrets.
    """
    if transportType == STDIO:
        return " ".join([command or "", *args]).strip()
    return f"{TRANSPORT_NAMES.get(transportType, transportType)} {maskURL(url or '')}"


async def importServers(
    reactor: Any,
    repo: Any,
    servers: ServersFile,
    organizationId: Optional[str],
    instanceName: str,
    description: str,
    discover: Callable[[str], Optional[Discoverer]],
    timeout: float,
    authType: str = AUTH_API_KEY,
    skipFailed: bool = False,
    newOrganization: str = "default",
) -> ImportResult:
    """
    Register the servers of a file, discover their tools, and serve them all
    through a new tool group and instance.

    Servers are reused when one of the same name reaches the same upstream
    (their config of the same name gets the file's values); an existing
    server of the same name that reaches another upstream is an error.

    @param repo: the L{mcp_proxy.interfaces.IRepository}.
    @param organizationId: the organization, or C{None} when there is none
        yet: one named C{newOrganization} is then created with the rest.
    @param discover: maps a transport type to the function that lists the
        tools of such an upstream, or C{None} when it cannot be contacted
        from here.
    @param skipFailed: register an upstream whose tools cannot be listed
        without its tools (with a warning) instead of failing.
    @raise InvalidInput: for a name that is taken or a server that differs.
    @raise UpstreamFailed: when an upstream cannot be started or listed.
    """
    warnings = list(servers.warnings)
    instanceName = instanceName.strip()
    if not instanceName:
        raise InvalidInput("the instance name is empty")

    # 1. Everything that can be checked in the database.
    existingServers = list(await repo.listServers())
    existingConfigs: list[ServerConfig] = []
    if organizationId is not None:
        for instance in await repo.listInstances(organizationId, False):
            if instance.name == instanceName and instance.deletedAt is None:
                raise InvalidInput(
                    f"an instance named {instanceName!r} already exists ({instance.id}): "
                    "choose another name with --instance, or delete it first with "
                    f"'mcpproxy-admin instance delete {instance.id}'"
                )
        existingConfigs = list(await repo.listConfigs(organizationId))
    plans = []
    for entry in servers.entries:
        server = _findServer(existingServers, entry.name)
        if server is not None and server.organizationId not in (None, organizationId):
            raise InvalidInput(
                f"a server named {entry.name!r} already exists ({server.id}) in another "
                "organization; rename the entry in the file"
            )
        if server is not None and not sameDefinition(server, entry):
            raise InvalidInput(
                f"a server named {entry.name!r} already exists ({server.id}) and reaches "
                f"another upstream ({describeServer(server.transportType, server.command, server.args, server.url)}); "
                "rename the entry in the file, or delete the old server first with "
                f"'mcpproxy-admin server delete {server.id}'"
            )
        config = None
        for candidate in existingConfigs:
            if candidate.name == entry.name:
                if server is None or candidate.mcpServerId != server.id:
                    raise InvalidInput(
                        f"a config named {entry.name!r} already exists ({candidate.id}) for "
                        f"another server ({candidate.mcpServerId}); rename the entry in the file"
                    )
                config = candidate
                break
        if server is not None and tuple(server.envVars) != entry.envNames:
            warnings.append(
                f"server {entry.name!r} keeps its variable names "
                f"{list(server.envVars)}; the file gives {list(entry.envNames)}"
            )
        plans.append(_Plan(entry, server, config))

    # 2. The upstreams: list their tools before writing anything.
    discovered: dict[str, list[tuple[str, str, dict[str, Any]]]] = {}
    for plan in plans:
        entry = plan.entry
        discoverer = discover(entry.transportType)
        if discoverer is None:
            warnings.append(
                f"{entry.name}: {TRANSPORT_NAMES[entry.transportType]} upstreams cannot be "
                "contacted from here yet; its tools will be discovered by "
                "'mcpproxy-admin tools sync' once it is reachable"
            )
            continue
        configId = plan.config.id if plan.config is not None else ""
        try:
            tools = await discoverer(reactor, upstreamConfigFor(entry, configId), timeout)
            discovered[entry.name] = normaliseTools(entry.name, tools)
        except Exception as e:
            message = (
                f"cannot list the tools of {entry.name!r} "
                f"({describeServer(entry.transportType, entry.command, entry.args, entry.url)}): "
                f"{_oneLine(e)}"
            )
            if not skipFailed:
                raise UpstreamFailed(message + " (--skip-failed registers it without tools)")
            warnings.append(
                f"{message}; registered without tools: run 'mcpproxy-admin tools sync' "
                "once it answers"
            )

    # 3. Write: servers, configs, tools, the tool group and the instance.
    if organizationId is None:
        organizationId = (await repo.createOrganization(newOrganization)).id
    done = []
    groupTools: list[tuple[str, str]] = []
    for plan in plans:
        entry = plan.entry
        server = plan.server
        if server is None:
            server = await repo.createServer(
                entry.name,
                entry.transportType,
                entry.command,
                list(entry.args),
                entry.url,
                list(entry.envNames),
                AUTH_NONE,
                organizationId,
            )
        config = plan.config
        if config is None:
            config = await repo.createConfig(
                server.id, entry.name, "", dict(entry.secrets), organizationId
            )
        else:
            config = await repo.updateConfigEnv(config.id, dict(entry.secrets))
        names: Optional[tuple[str, ...]] = None
        if entry.name in discovered:
            await repo.syncTools(server.id, discovered[entry.name])
            names = tuple(t[0] for t in discovered[entry.name])
            groupTools.extend((config.id, n) for n in names)
        done.append(
            ImportedServer(
                name=entry.name,
                transportType=entry.transportType,
                serverId=server.id,
                configId=config.id,
                serverCreated=plan.server is None,
                configCreated=plan.config is None,
                tools=names,
            )
        )
    groupName = await _freeToolGroupName(repo, organizationId, instanceName)
    group = await repo.createToolGroup(organizationId, groupName, description, groupTools)
    instance = await repo.createInstance(
        organizationId, instanceName, description, group.id, authType
    )
    return ImportResult(instance, group.id, tuple(done), tuple(warnings))


def _findServer(servers: Sequence[McpServer], name: str) -> Optional[McpServer]:
    """
    The server of that name (server names are unique).
    """
    for server in servers:
        if server.name == name:
            return server
    return None


async def _freeToolGroupName(repo: Any, organizationId: str, wanted: str) -> str:
    taken = {g.name for g in await repo.listToolGroups(organizationId)}
    if wanted not in taken:
        return wanted
    n = 2
    while f"{wanted} ({n})" in taken:
        n += 1
    return f"{wanted} ({n})"


def _oneLine(error: BaseException) -> str:
    text = str(error).strip() or type(error).__name__
    return " ".join(text.split())
