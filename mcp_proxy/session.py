"""
MCP sessions of the Streamable HTTP and legacy SSE transports.

This is a layer of the transports only: the routing core never depends on
it, since the stateless MCP revision has no sessions.  A L{SessionTable},
owned by the service, holds the open L{Session}s; each session carries its
close callbacks (stream closers, upstream cleanups), run exactly once when
it is closed, expired or swept.

The table keeps sessions in order of last activity, so that a sweep looks
only at the expired ones: it stops at the first session still alive.
"""

from __future__ import annotations

import hashlib
import secrets
from collections import OrderedDict
from typing import Any, Callable, Optional

from attrs import define, field
from twisted.application.internet import TimerService
from twisted.internet.defer import Deferred, gatherResults, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from mcp_proxy.errors import ProxyError
from mcp_proxy.validation import positive

log = Logger()

STREAMABLE_HTTP = "streamable-http"
SSE = "sse"
TRANSPORTS = (STREAMABLE_HTTP, SSE)

CloseCallback = Callable[[str], object]
"""
A close callback: called with the close reason; may return a Deferred.
"""


class SessionCapacityError(ProxyError):
    """
    The table is full: no new session until one closes.

    @ivar maxSessions: the limit that was reached.
    """

    def __init__(self, maxSessions: int) -> None:
        super().__init__(f"session limit of {maxSessions} reached")
        self.maxSessions = maxSessions


def sessionLogId(sessionId: str) -> str:
    """
    A short, non-reversible form of a session id for logs: the first 8
    hex digits of its SHA-256.  Session ids are credentials; never log them.
    """
    return hashlib.sha256(sessionId.encode("utf-8")).hexdigest()[:8]


def newSessionId() -> str:
    """
    A new session id: 128 random bits as 32 lowercase hex digits (visible
    ASCII, as C{Mcp-Session-Id} requires).
    """
    return secrets.token_hex(16)


@define(eq=False)
class Session:
    """
    One MCP session: who opened it, over which transport, and what to do
    when it ends.

    @ivar id: the session id; a credential, shown hashed in C{repr}.
    @ivar transport: L{STREAMABLE_HTTP} or L{SSE}.
    @ivar instanceId: the instance it serves.
    @ivar keyId: the API key that created it; later requests must present
        the same key (see L{belongsTo}).
    @ivar createdAt: C{clock.seconds()} at creation.
    @ivar lastActivity: C{clock.seconds()} at the last L{SessionTable.touch}.
    @ivar protocolVersion: the negotiated MCP protocol version.
    @ivar clientInfo: the client's C{initialize} C{clientInfo}.
    @ivar clientCapabilities: the client's C{initialize} capabilities.
    @ivar organizationId: the organization of the instance.
    @ivar initialized: whether the client has run C{initialize} in it (the
        legacy SSE transport opens the session before that).
    @ivar closed: whether it has been closed.
    @ivar closeReason: why it was closed.
    """

    id: str = field(repr=sessionLogId)
    transport: str
    instanceId: str
    keyId: str
    createdAt: float
    lastActivity: float
    protocolVersion: str = ""
    clientInfo: dict[str, Any] = field(factory=dict)
    clientCapabilities: dict[str, Any] = field(factory=dict)
    organizationId: str = ""
    initialized: bool = False
    closed: bool = False
    closeReason: Optional[str] = None
    _closeCallbacks: list[CloseCallback] = field(factory=list, repr=False)

    @property
    def logId(self) -> str:
        """
        The form of L{id} to log.
        """
        return sessionLogId(self.id)

    def belongsTo(self, keyId: str, instanceId: str) -> bool:
        """
        Whether a request authenticated as C{keyId} for C{instanceId} may
        use this session.
        """
        return self.keyId == keyId and self.instanceId == instanceId

    def onClose(self, callback: CloseCallback) -> None:
        """
        Call C{callback(reason)} when the session closes; at once if it is
        closed already.  Callbacks run last added first; their errors,
        raised or in a returned Deferred, are logged.
        """
        if self.closed:
            self._call(callback, self.closeReason or "closed")
        else:
            self._closeCallbacks.append(callback)

    def _call(self, callback: CloseCallback, reason: str) -> Optional[Deferred[None]]:
        """
        Run one close callback, logging its error.

        @return: C{None} when it finished at once, else a Deferred firing
            (never failing) when it has.
        """
        try:
            result = callback(reason)
        except Exception:
            log.failure("close callback of session {session} failed", session=self.logId)
            return None
        if not isinstance(result, Deferred):
            return None
        return result.addCallbacks(
            lambda _: None,
            lambda f: log.failure(
                "close callback of session {session} failed", f, session=self.logId
            ),
        )

    def _runClose(self, reason: str) -> Deferred[None]:
        """
        Mark the session closed and run its close callbacks, once.

        @return: a Deferred firing when every callback has finished; it
            never fails.
        """
        if self.closed:
            return succeed(None)
        self.closed = True
        self.closeReason = reason
        callbacks, self._closeCallbacks = self._closeCallbacks, []
        pending = []
        for callback in reversed(callbacks):
            d = self._call(callback, reason)
            if d is not None:
                pending.append(d)
        if not pending:
            return succeed(None)
        return gatherResults(pending).addCallback(lambda _: None)


def _newTableStats() -> dict[str, int]:
    return dict.fromkeys(("created", "closed", "expired", "rejected"), 0)


@define
class SessionTable:
    """
    The open sessions of one process.

    Sessions are kept in order of last activity (L{touch} moves one to the
    end), so L{sweep} costs O(expired sessions).  If the clock goes back,
    sessions touched before may be swept late, never early: L{get} checks
    each session's own idle time.

    @ivar clock: the source of time.
    @ivar timeout: seconds of inactivity after which a session expires.
    @ivar maxSessions: the most sessions open at once.
    @ivar stats: counters for the metrics: C{created}, C{closed} (all
        closes, expiries included), C{expired}, C{rejected} (at capacity).
    """

    clock: IReactorTime
    timeout: float = field(default=600.0, validator=positive)
    maxSessions: int = field(default=10000, validator=positive)
    stats: dict[str, int] = field(factory=_newTableStats, init=False)
    _sessions: OrderedDict[str, Session] = field(factory=OrderedDict, init=False)
    _byTransport: dict[str, int] = field(factory=lambda: dict.fromkeys(TRANSPORTS, 0), init=False)

    def __len__(self) -> int:
        """
        The number of sessions held, expired ones not yet swept included.
        """
        return len(self._sessions)

    def counts(self) -> dict[str, int]:
        """
        The number of sessions held, by transport.
        """
        return dict(self._byTransport)

    def create(
        self,
        transport: str,
        instanceId: str,
        keyId: str,
        protocolVersion: str = "",
        clientInfo: Optional[dict[str, Any]] = None,
        clientCapabilities: Optional[dict[str, Any]] = None,
        organizationId: str = "",
        initialized: bool = False,
    ) -> Session:
        """
        Open a session.  At capacity, expired sessions are swept first.

        @raise SessionCapacityError: when L{maxSessions} are open.
        @raise ValueError: for an unknown transport.
        """
        if transport not in TRANSPORTS:
            raise ValueError(f"unknown transport {transport!r}")
        if len(self._sessions) >= self.maxSessions:
            self.sweep()
            if len(self._sessions) >= self.maxSessions:
                self.stats["rejected"] += 1
                raise SessionCapacityError(self.maxSessions)
        sessionId = newSessionId()
        while sessionId in self._sessions:
            sessionId = newSessionId()
        now = self.clock.seconds()
        session = Session(
            id=sessionId,
            transport=transport,
            instanceId=instanceId,
            keyId=keyId,
            createdAt=now,
            lastActivity=now,
            protocolVersion=protocolVersion,
            clientInfo=dict(clientInfo or {}),
            clientCapabilities=dict(clientCapabilities or {}),
            organizationId=organizationId,
            initialized=initialized,
        )
        self._sessions[sessionId] = session
        self._byTransport[transport] += 1
        self.stats["created"] += 1
        return session

    def _expired(self, session: Session, now: float) -> bool:
        return now - session.lastActivity > self.timeout

    def get(self, sessionId: str) -> Optional[Session]:
        """
        The open session with this id, or C{None}.  An expired session is
        closed on the spot and reads as absent.
        """
        session = self._sessions.get(sessionId)
        if session is None:
            return None
        if self._expired(session, self.clock.seconds()):
            self._close(session, "expired")
            return None
        return session

    def touch(self, session: Session) -> None:
        """
        Record activity on a session, postponing its expiry.  A session no
        longer in the table is left alone.
        """
        if self._sessions.get(session.id) is not session:
            return
        session.lastActivity = self.clock.seconds()
        self._sessions.move_to_end(session.id)

    def close(self, sessionId: str, reason: str = "closed") -> Deferred[bool]:
        """
        Close a session: free its entry at once, then run its close
        callbacks (once; errors are logged).

        @return: a Deferred firing with C{True} once the callbacks have
            finished, or with C{False} at once when no such session is held.
        """
        session = self._sessions.get(sessionId)
        if session is None:
            return succeed(False)
        return self._close(session, reason).addCallback(lambda _: True)

    def _close(self, session: Session, reason: str) -> Deferred[None]:
        del self._sessions[session.id]
        self._byTransport[session.transport] -= 1
        self.stats["closed"] += 1
        if reason == "expired":
            self.stats["expired"] += 1
        return session._runClose(reason)

    def closeAll(self, reason: str = "shutdown") -> Deferred[None]:
        """
        Close every session.

        @return: a Deferred firing when every close callback has finished.
        """
        done = [self._close(session, reason) for session in list(self._sessions.values())]
        return gatherResults(done).addCallback(lambda _: None)

    def closeWhere(self, predicate: Callable[[Session], bool], reason: str) -> Deferred[None]:
        """
        Close the sessions for which C{predicate} is true (e.g. those of a
        revoked key or a deleted instance).

        @return: a Deferred firing when their close callbacks have finished.
        """
        chosen = [session for session in self._sessions.values() if predicate(session)]
        done = [self._close(session, reason) for session in chosen]
        return gatherResults(done).addCallback(lambda _: None)

    def sweep(self) -> int:
        """
        Close the sessions idle for longer than L{timeout}.  Errors are
        logged, never raised, so that a timer calling this keeps running.

        @return: the number of sessions closed.
        """
        closed = 0
        try:
            now = self.clock.seconds()
            sessions = self._sessions
            while sessions:
                session = next(iter(sessions.values()))
                if not self._expired(session, now):
                    break
                try:
                    self._close(session, "expired")
                except Exception:
                    log.failure("closing session {session} failed", session=session.logId)
                    sessions.pop(session.id, None)
                closed += 1
        except Exception:
            log.failure("session sweep failed", Failure())
        if closed:
            log.debug("swept {count} expired sessions", count=closed)
        return closed

    def sweeperService(self, interval: Optional[float] = None) -> TimerService:
        """
        A service that sweeps every C{interval} seconds (default: half the
        timeout) on this table's clock, for the service tree to own.
        """
        service = TimerService(self.timeout / 2 if interval is None else interval, self.sweep)
        service.clock = self.clock
        service.setName("session-sweeper")
        return service
