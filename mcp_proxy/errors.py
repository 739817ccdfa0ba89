"""
Exceptions shared across the layers of mcp-proxy.
"""


class ProxyError(Exception):
    """
    Base class of mcp-proxy's own errors.
    """


class NotFound(ProxyError):
    """
    A referenced object (organization, server, config, tool group, instance,
    key) does not exist.
    """


class Conflict(ProxyError):
    """
    The change would duplicate a unique name or break a constraint.
    """


class InvalidInput(ProxyError):
    """
    A value given by the user is not acceptable (bad URL, bad transport...).
    """


class DatabaseUnavailable(ProxyError):
    """
    The database could not be reached or failed; the operation may succeed
    when retried.  Never cached.
    """


class SchemaError(ProxyError):
    """
    The database holds a schema that mcp-proxy cannot use.
    """
