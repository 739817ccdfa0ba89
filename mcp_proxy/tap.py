"""
The C{twistd mcpproxy} command: its options and the service it builds.

Only this module and the admin command import the global reactor, and only
inside functions.
"""

from __future__ import annotations

from typing import Any, Optional

from twisted.application.service import IService
from twisted.python import usage

from mcp_proxy.config import OPTIONS, Settings, SettingsError, resolveSettings


class Options(usage.Options):
    """
    Options of C{twistd mcpproxy}.  Each can also be given as the
    environment variable C{MCPPROXY_<NAME>}; the command line wins.
    """

    synopsis = "[options]"
    longdesc = (
        "Serve MCP (Streamable HTTP and the legacy SSE transport) in front of the "
        "upstream MCP servers configured in the database.  Every option can also "
        "be set with the environment variable MCPPROXY_<OPTION> (upper case, '-' "
        "as '_'); the command line wins."
    )

    optParameters = [
        [spec.name, None, None, f"{spec.help} [env {spec.envName}; default: {spec.default}]"]
        for spec in OPTIONS
    ]

    def __init__(self) -> None:
        super().__init__()
        self["listen"] = []
        self.settings: Optional[Settings] = None

    def opt_listen(self, description: str) -> None:
        """
        A Twisted endpoint description to listen on; repeatable
        [env MCPPROXY_LISTEN, comma-separated; default:
        tcp:8080:interface=127.0.0.1].
        """
        self["listen"].append(description)

    def postOptions(self) -> None:
        given = {spec.name: self.get(spec.name) for spec in OPTIONS}
        try:
            self.settings = resolveSettings(given, self["listen"])
        except SettingsError as e:
            raise usage.UsageError(str(e)) from None
        from twisted.internet import endpoints, reactor

        from mcp_proxy.cacheplugins import discoverCacheFactories, parseCacheSpec

        name, _ = parseCacheSpec(self.settings.cache)
        available = discoverCacheFactories()
        if name not in available:
            raise usage.UsageError(
                f"bad --cache value: unknown cache backend {name!r}; "
                f"available: {', '.join(sorted(available))}"
            )

        for description in self.settings.listen:
            try:
                endpoints.serverFromString(reactor, description)
            except (ValueError, KeyError, TypeError) as e:
                raise usage.UsageError(f"bad --listen value {description!r}: {e}") from None
        if self.settings.metricsListen is not None:
            try:
                endpoints.serverFromString(reactor, self.settings.metricsListen)
            except (ValueError, KeyError, TypeError) as e:
                raise usage.UsageError(
                    f"bad --metrics-listen value {self.settings.metricsListen!r}: {e}"
                ) from None


def makeService(options: Any) -> IService:
    """
    Build the proxy's service tree; nothing connects or listens until
    twistd starts it.
    """
    from twisted.internet import reactor

    from mcp_proxy.service import ProxyService

    settings = options.settings
    if settings is None:
        settings = resolveSettings({}, ())
    from mcp_proxy.logs import LogObserverService, observerForTwistd

    return LogObserverService(
        ProxyService(settings, reactor),
        observerForTwistd(settings.logLevel, settings.logFormat, options),
    )
