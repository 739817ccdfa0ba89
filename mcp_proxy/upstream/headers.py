"""
The HTTP headers sent to a remote upstream, built from its config alone.

The map starts empty and is filled only from the config's env, as the
origin intended (its C{createClient} mapping, and its Streamable HTTP
factory that sent env entries named like headers verbatim):

  - C{API_KEY} or C{X_API_KEY} gives C{X-API-Key};
  - C{BEARER_TOKEN} or C{AUTHORIZATION_TOKEN} gives
    C{Authorization: Bearer <value>};
  - C{AUTHORIZATION} gives C{Authorization} as it is;
  - C{HEADER_<NAME>} gives the header C{<NAME>}, with C{_} as C{-}
    (C{HEADER_X_FOO} gives C{X-Foo}: names are case-insensitive);
  - a name that contains a C{-} and is a valid header name (C{X-DeepL-API-Key})
    is sent verbatim.

Other entries (C{NODE_ENV}, ...) are not headers and are left out, as are
empty values.  The downstream client's request is not an input: its
credentials can never reach an upstream.  Values are secret: no message
here contains one.
"""

from __future__ import annotations

import re
from typing import Mapping

from mcp_proxy.models import UpstreamConfig
from mcp_proxy.upstream import UpstreamError

# RFC 9110 "token": the characters of a header name.
_TOKEN = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")

# Headers that the transports set themselves; a config may not override them.
RESERVED_HEADERS = frozenset(
    name.lower()
    for name in (
        "Accept",
        "Accept-Encoding",
        "Connection",
        "Content-Encoding",
        "Content-Length",
        "Content-Type",
        "Cookie",
        "Host",
        "Keep-Alive",
        "Last-Event-ID",
        "Mcp-Session-Id",
        "MCP-Protocol-Version",
        "Proxy-Authorization",
        "Proxy-Connection",
        "TE",
        "Trailer",
        "Transfer-Encoding",
        "Upgrade",
    )
)

_ALIASES: Mapping[str, tuple[str, str]] = {
    "API_KEY": ("X-API-Key", "{}"),
    "X_API_KEY": ("X-API-Key", "{}"),
    "BEARER_TOKEN": ("Authorization", "Bearer {}"),
    "AUTHORIZATION_TOKEN": ("Authorization", "Bearer {}"),
    "AUTHORIZATION": ("Authorization", "{}"),
}

HEADER_PREFIX = "HEADER_"


def headerName(envName: str) -> str | None:
    """
    The header an env entry becomes, or C{None} when it is not a header.

    @raise UpstreamError: for a C{HEADER_} entry or a dashed name that is
        not a valid header name.
    """
    alias = _ALIASES.get(envName)
    if alias is not None:
        return alias[0]
    if envName.startswith(HEADER_PREFIX):
        parts = envName[len(HEADER_PREFIX) :].split("_")
        name = "-".join(part.capitalize() for part in parts)
        if not all(parts) or not _TOKEN.match(name):
            raise UpstreamError(f"env entry {_printable(envName)} does not name a valid header")
        return name
    if "-" in envName:
        if not _TOKEN.match(envName):
            raise UpstreamError(f"env entry {_printable(envName)} is not a valid header name")
        return envName
    return None


def upstreamHeaders(config: UpstreamConfig) -> dict[str, str]:
    """
    The headers of every request to the upstream of C{config}, in a stable
    order (by env name).

    @raise UpstreamError: for a value with a CR, LF or NUL; for a header the
        transport sets itself (C{Host}, C{Mcp-Session-Id}, ...); for two
        entries giving one header different values; for an invalid name.
    """
    headers: dict[str, str] = {}
    # lower-case header name -> (the header name as sent, its env entry)
    seen: dict[str, tuple[str, str]] = {}
    for envName in sorted(config.env):
        value = config.env[envName]
        name = headerName(envName)
        if name is None or value == "":
            continue
        if any(c in value for c in "\r\n\x00"):
            raise UpstreamError(
                f"upstream {config.name}: the value of env entry {_printable(envName)}"
                " contains a line break or NUL and cannot be sent as a header"
            )
        key = name.lower()
        if key in RESERVED_HEADERS:
            raise UpstreamError(
                f"upstream {config.name}: env entry {_printable(envName)} would set the"
                f" header {name}, which the proxy sets itself"
            )
        alias = _ALIASES.get(envName)
        text = alias[1].format(value) if alias is not None else value
        if key in seen:
            sentName, firstEntry = seen[key]
            if headers[sentName] != text:
                raise UpstreamError(
                    f"upstream {config.name}: env entries {firstEntry} and"
                    f" {_printable(envName)} give the header {name} different values"
                )
            continue
        seen[key] = (name, _printable(envName))
        headers[name] = text
    return headers


def _printable(envName: str) -> str:
    """
    An env name for a message: names are not secret, but may hold anything.
    """
    cleaned = "".join(c if c.isprintable() else "?" for c in envName)
    return repr(cleaned[:100])
