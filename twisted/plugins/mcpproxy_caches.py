"""
The built-in cache backends of mcp-proxy, for C{--cache}: C{"memory"} and
C{"redis"} (see L{mcp_proxy.cacheplugins}).

Lazy on purpose, like C{mcpproxy_plugin.py}: this module imports only the
small L{mcp_proxy.cacheplugins}; a backend's own module (and txredisapi) is
imported when a cache of it is built, so that a broken backend cannot hide
the others, nor slow down C{twistd --help}.
"""

from mcp_proxy.cacheplugins import CacheFactoryPlugin

memory = CacheFactoryPlugin(
    name="memory",
    module="mcp_proxy.cacheplugins",
    function="buildMemoryCache",
    description="An LRU cache with a time to live in each proxy process (the default).",
)

redis = CacheFactoryPlugin(
    name="redis",
    module="mcp_proxy.cache_redis",
    function="buildRedisCache",
    description=(
        "A cache shared through Redis: redis://[[USER]:PASSWORD@]HOST[:PORT][/DB][?OPTIONS], "
        "or rediss:// for TLS."
    ),
)
