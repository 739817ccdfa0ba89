"""
Structured logging of mcp-proxy through L{twisted.logger}.

  - L{makeObserver}: the observer for a level (C{debug}, C{info}, C{warn},
    C{error}, C{critical}) and a format (C{text}, or C{json}: RFC 7464
    records, a C{0x1E} byte then one JSON object per line).  Every event
    goes through L{redactEvent} first and, in text, ends with its request
    context.
  - L{observerFromEnvironment}: the same from C{MCPPROXY_LOG_LEVEL} and
    C{MCPPROXY_LOG_FORMAT}, for C{twistd --logger=mcp_proxy.logs.observerFromEnvironment}.
  - L{observerForTwistd} and L{LogObserverService}: how C{twistd -n
    mcpproxy --log-level ... --log-format ...} applies the plugin's own
    options (twistd asks the application for its observer after
    C{makeService}, before it starts logging).
  - L{requestIdFor}, L{bindRequest} and L{logRequest}: a request id per
    request, the context (request id, instance, hashed session) that every
    event logged while serving the request carries, and one structured
    event per request at debug level.

This module is C{logs}, not C{logging}: a module named like the standard
library's would be imported instead of it by any tool run with
C{mcp_proxy/} on C{sys.path}.
"""

from __future__ import annotations

import os
import random
import re
import sys
from contextvars import ContextVar, copy_context
from typing import IO, Any, Callable, Mapping, Optional, TypeVar, Union

from attrs import field, frozen
from twisted.application.service import IService, MultiService
from twisted.logger import (
    FileLogObserver,
    FilteringLogObserver,
    ILogObserver,
    LogEvent,
    Logger,
    LogLevel,
    LogLevelFilterPredicate,
    formatEventAsClassicLogText,
    formatTime,
    jsonFileLogObserver,
    timeFormatRFC3339,
)
from twisted.python.components import Componentized
from twisted.python.logfile import LogFile
from zope.interface import implementer

from mcp_proxy.session import sessionLogId

#: The C{--log-level} values.
LEVELS: Mapping[str, LogLevel] = {
    "debug": LogLevel.debug,
    "info": LogLevel.info,
    "warn": LogLevel.warn,
    "warning": LogLevel.warn,
    "error": LogLevel.error,
    "critical": LogLevel.critical,
}

TEXT = "text"
JSON = "json"
#: The C{--log-format} values.
FORMATS = (TEXT, JSON)

DEFAULT_LEVEL = "info"
DEFAULT_FORMAT = TEXT
LEVEL_ENV = "MCPPROXY_LOG_LEVEL"
FORMAT_ENV = "MCPPROXY_LOG_FORMAT"

#: What a masked value reads as.
MASK = "***"

#: Field names whose values are secrets.
SECRET_FIELD = re.compile(r"(key|token|secret|password|credential|authorization)", re.IGNORECASE)
#: ...except identifiers (C{keyId}, C{key_id}, C{tokenIds}), which are what
#: logs should carry instead of the secrets.
_IDENTIFIER_FIELD = re.compile(r"(Id|ID|_id|Ids|IDs|_ids)$")

#: Query parameters whose values are secrets in a URL.
_SECRET_QUERY = re.compile(
    r"([?&;](?:api-key|api_key|apikey|sessionId|session_id|access_token|token)=)[^&#;\s]*",
    re.IGNORECASE,
)

#: The context fields of L{bindRequest}, added to every event logged while
#: serving a request.
CONTEXT_FIELDS = ("requestId", "instance", "session")

_REQUEST_ID = re.compile(r"[A-Za-z0-9._:/+=@-]{1,128}")


def parseLevel(name: Union[str, LogLevel]) -> LogLevel:
    """
    The L{LogLevel} of a C{--log-level} value (any case).

    @raise ValueError: for another name.
    """
    if not isinstance(name, str):
        if name in LogLevel.iterconstants():
            return name
        raise ValueError(f"unknown log level {name!r}")
    level = LEVELS.get(name.strip().lower())
    if level is None:
        raise ValueError(
            f"unknown log level {name!r} (expected debug, info, warn, error or critical)"
        )
    return level


def parseFormat(name: str) -> str:
    """
    The C{--log-format} value, checked.

    @raise ValueError: for another name.
    """
    fmt = name.strip().lower()
    if fmt not in FORMATS:
        raise ValueError(f"unknown log format {name!r} (expected text or json)")
    return fmt


# -- redaction ------------------------------------------------------------------


def isSecretField(name: str) -> bool:
    """
    Whether a field called C{name} holds a secret: its name matches
    L{SECRET_FIELD} and it is not an identifier (C{keyId}).
    """
    return SECRET_FIELD.search(name) is not None and _IDENTIFIER_FIELD.search(name) is None


def redactUrl(text: str) -> str:
    """
    Mask the values of the C{api-key}, C{api_key}, C{sessionId},
    C{session_id}, C{access_token} and C{token} query parameters in a URL
    (or any text containing URLs).
    """
    if "=" not in text:
        return text
    return _SECRET_QUERY.sub(r"\1" + MASK, text)


def redact(value: Any, name: Optional[str] = None) -> Any:
    """
    A copy of C{value} safe to log: the whole value when C{name} is a
    secret field's; in mappings and sequences, the values of secret
    fields; in strings, secret query values.
    """
    if name is not None and isSecretField(name):
        return MASK if value is not None else None
    if isinstance(value, str):
        return redactUrl(value)
    if isinstance(value, bytes):
        return redact(value.decode("utf-8", "replace"))
    if isinstance(value, Mapping):
        return {k: redact(v, k if isinstance(k, str) else None) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [redact(v) for v in value]
    return value


def redactEvent(event: LogEvent) -> LogEvent:
    """
    A copy of a log event with L{redact} applied to every field but
    twisted.logger's own (C{log_*}, of which C{log_flattened} is dropped);
    the event itself is left alone, since other observers see it too.
    """
    redacted = dict(event)
    # Another observer may have flattened the event (twisted.logger's
    # flattenEvent adds the formatted fields, secrets included); the
    # formatters flatten it again from the redacted fields.
    redacted.pop("log_flattened", None)
    for key, value in event.items():
        if key.startswith("log_"):
            continue
        if isinstance(value, (str, bytes, Mapping, list, tuple)) or isSecretField(key):
            redacted[key] = redact(value, key)
    return redacted


@implementer(ILogObserver)
class RedactingObserver:
    """
    Passes a redacted copy of each event, with its request context (see
    L{bindRequest}) added, to another observer.
    """

    def __init__(self, observer: ILogObserver) -> None:
        self.observer = observer

    def __call__(self, event: LogEvent) -> None:
        context = _context.get()
        if context is not None:
            event = dict(event)
            for name, value in zip(CONTEXT_FIELDS, context.fields()):
                if value is not None:
                    event.setdefault(name, value)
        self.observer(redactEvent(event))


# -- observers ------------------------------------------------------------------


def _formatText(event: LogEvent) -> Optional[str]:
    text = formatEventAsClassicLogText(event, formatTime=lambda t: formatTime(t, timeFormatRFC3339))
    if text is None:
        return None
    context = " ".join(
        f"{name}={event[name]}" for name in CONTEXT_FIELDS if event.get(name) is not None
    )
    if not context:
        return text
    # Before the final newline: the context of a multi-line event (a
    # traceback) ends its last line.
    return text[:-1] + f" [{context}]\n"


def textObserver(stream: IO[Any]) -> ILogObserver:
    """
    Lines of text: the time, the system, the message, then the request
    context in brackets.
    """
    return FileLogObserver(stream, _formatText)


def makeObserver(level: Union[str, LogLevel], fmt: str, stream: IO[Any]) -> ILogObserver:
    """
    An observer writing the events of C{level} and above to C{stream},
    redacted, as text or as JSON records (RFC 7464).

    @param level: a name of L{LEVELS} or a L{LogLevel}.
    @param fmt: C{"text"} or C{"json"}.
    @raise ValueError: for an unknown level or format.
    """
    logLevel = parseLevel(level)
    if parseFormat(fmt) == JSON:
        inner: ILogObserver = jsonFileLogObserver(stream)
    else:
        inner = textObserver(stream)
    return FilteringLogObserver(
        RedactingObserver(inner), [LogLevelFilterPredicate(defaultLogLevel=logLevel)]
    )


def observerFromEnvironment() -> ILogObserver:
    """
    The observer of C{MCPPROXY_LOG_LEVEL} (default C{info}) and
    C{MCPPROXY_LOG_FORMAT} (default C{text}) on standard output: a factory
    for C{twistd --logger=mcp_proxy.logs.observerFromEnvironment}.

    @raise ValueError: naming the variable, for a bad value.
    """
    level = os.environ.get(LEVEL_ENV, DEFAULT_LEVEL)
    fmt = os.environ.get(FORMAT_ENV, DEFAULT_FORMAT)
    try:
        parseLevel(level)
    except ValueError as e:
        raise ValueError(f"{LEVEL_ENV}: {e}") from None
    try:
        parseFormat(fmt)
    except ValueError as e:
        raise ValueError(f"{FORMAT_ENV}: {e}") from None
    return makeObserver(level, fmt, sys.stdout)


# -- twistd ---------------------------------------------------------------------


def observerForTwistd(
    level: Union[str, LogLevel], fmt: str, options: Any
) -> Optional[ILogObserver]:
    """
    The observer for C{twistd ... mcpproxy} with the plugin's level and
    format, writing where twistd would: to C{--logfile} (C{-} or none with
    C{-n}: standard output; none when daemonizing: C{twistd.log}).

    @param options: the plugin's options; twistd's own are their
        C{parent} (absent when the options were not parsed by twistd:
        standard output).
    @return: the observer, or C{None} when twistd must keep its own: with
        C{--logger} (which wins anyway) or C{--syslog}.
    """
    parent = getattr(options, "parent", None)
    twistd: Mapping[str, Any] = parent if isinstance(parent, Mapping) else {}
    if twistd.get("logger") or twistd.get("syslog"):
        return None
    path = twistd.get("logfile") or ""
    stream: IO[Any]
    if path == "-" or (not path and (parent is None or twistd.get("nodaemon"))):
        stream = sys.stdout
    else:
        stream = LogFile.fromFullPath(path or "twistd.log")
    return makeObserver(level, fmt, stream)


class LogObserverService(MultiService):
    """
    The top of the service tree that C{makeService} gives twistd: when
    twistd sets it in its application, it makes C{observer} the
    application's L{ILogObserver}, which twistd then installs instead of
    its default one (C{--logger} still wins).  Under C{twist}, which
    configures logging itself, it does nothing.

    @ivar observer: the observer, or C{None} to leave twistd's.
    """

    def __init__(self, service: IService, observer: Optional[ILogObserver]) -> None:
        super().__init__()
        self.observer = observer
        service.setServiceParent(self)

    def setServiceParent(self, parent: Any) -> None:
        super().setServiceParent(parent)
        if (
            self.observer is not None
            and isinstance(parent, Componentized)
            and parent.getComponent(ILogObserver, None) is None
        ):
            parent.setComponent(ILogObserver, self.observer)


# -- requests -------------------------------------------------------------------


@frozen
class RequestContext:
    """
    What every event logged while serving a request carries.

    @ivar sessionId: the session's id: a credential, never logged (see
        L{session}).
    @ivar method: the JSON-RPC method, for the request's own event.
    """

    requestId: str
    instance: Optional[str] = None
    sessionId: Optional[str] = field(default=None, repr=False)
    method: Optional[str] = None

    @property
    def session(self) -> Optional[str]:
        """
        The session's log id (L{sessionLogId}).
        """
        return sessionLogId(self.sessionId) if self.sessionId is not None else None

    def fields(self) -> tuple[Optional[str], Optional[str], Optional[str]]:
        """
        The values of L{CONTEXT_FIELDS}.
        """
        return (self.requestId, self.instance, self.session)


_context: ContextVar[Optional[RequestContext]] = ContextVar("mcpproxyRequest", default=None)

_REQUEST_ID_ATTRIBUTE = "_mcpproxyRequestId"
_CONTEXT_ATTRIBUTE = "_mcpproxyRequestContext"

_T = TypeVar("_T")


def newRequestId() -> str:
    """
    A new request id: 64 random bits as 16 hex digits.  Ids need to be
    unique, not secret: the fast generator of L{random} (reseeded in forked
    children) serves.
    """
    return f"{random.getrandbits(64):016x}"


def requestIdFor(request: Any) -> str:
    """
    The id of a twisted.web request: its C{X-Request-Id} when that is 1 to
    128 characters of C{[A-Za-z0-9._:/+=@-]} (anything else could forge
    log lines), else a new one.  The same for every call on one request.
    """
    known = getattr(request, _REQUEST_ID_ATTRIBUTE, None)
    if isinstance(known, str):
        return known
    requestId = None
    header = request.getHeader(b"x-request-id")
    if header is not None:
        text = header.decode("latin-1") if isinstance(header, bytes) else header
        if _REQUEST_ID.fullmatch(text):
            requestId = text
    if requestId is None:
        requestId = newRequestId()
    _remember(request, _REQUEST_ID_ATTRIBUTE, requestId)
    return requestId


def _remember(request: Any, name: str, value: object) -> None:
    try:
        setattr(request, name, value)
    except AttributeError:
        pass


def bindRequest(
    request: Any,
    instance: Optional[str] = None,
    sessionId: Optional[str] = None,
    method: Optional[str] = None,
) -> RequestContext:
    """
    Make every event logged from now on in the current context carry the
    request's id (L{requestIdFor}), instance and session (hashed); remember
    them, with the method, on the request for its own event
    (L{requestContextOf}).

    Call it in the coroutine that serves the request (a route's C{async
    def}, run by C{Deferred.fromCoroutine}, has a context of its own, as
    do the coroutines it awaits), or within L{runInRequestContext}; work
    started with C{callLater} does not inherit it.  Called in plain
    reactor code it would stick to later events, so it must not be.
    """
    context = RequestContext(requestIdFor(request), instance, sessionId, method)
    _context.set(context)
    _remember(request, _CONTEXT_ATTRIBUTE, context)
    return context


def requestContextOf(request: Any) -> Optional[RequestContext]:
    """
    The context last bound for a request by L{bindRequest}, if any.
    """
    context = getattr(request, _CONTEXT_ATTRIBUTE, None)
    return context if isinstance(context, RequestContext) else None


def currentRequest() -> Optional[RequestContext]:
    """
    The context of L{bindRequest} in effect, if any.
    """
    return _context.get()


def runInRequestContext(request: Any, f: Callable[..., _T], *args: Any, **kwargs: Any) -> _T:
    """
    Call C{f} in a copy of the current context in which the request's id
    is bound: events logged by C{f}, and by the coroutines it starts (which
    copy the context they start in), carry it, and nothing leaks out.
    """

    def bound() -> _T:
        _context.set(RequestContext(requestIdFor(request)))
        return f(*args, **kwargs)

    return copy_context().run(bound)


def logRequest(
    log: Logger,
    *,
    requestId: str,
    instance: Optional[str],
    sessionId: Optional[str],
    method: Optional[str],
    status: Union[int, str],
    duration: float,
    transport: Optional[str] = None,
    **extra: Any,
) -> None:
    """
    Log one served request as one structured event, at debug level: its
    id, instance, session (hashed), JSON-RPC method, status (an HTTP
    status, or C{"ok"}/C{"error"} for a JSON-RPC answer) and duration
    (seconds; C{durationMs} rounded for reading).  C{extra} fields are
    redacted like every field.
    """
    log.debug(
        "{method} {status} in {durationMs}ms",
        requestId=requestId,
        instance=instance,
        session=sessionLogId(sessionId) if sessionId is not None else None,
        method=method,
        status=status,
        duration=duration,
        durationMs=round(duration * 1000, 3),
        transport=transport,
        **extra,
    )
