"""
Tests for L{mcp_proxy.session}: sessions, their expiry, their close
callbacks and the sweeper, all on a L{Clock}.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred, fail
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from mcp_proxy.session import (
    SSE,
    STREAMABLE_HTTP,
    Session,
    SessionCapacityError,
    SessionTable,
    sessionLogId,
)


class Recorder:
    """
    A close callback that records the reasons it was called with.
    """

    def __init__(self, log: list[Any] | None = None, name: str = "") -> None:
        self.reasons: list[str] = []
        self.log = log
        self.name = name

    def __call__(self, reason: str) -> None:
        self.reasons.append(reason)
        if self.log is not None:
            self.log.append(self.name)


def explode(reason: str) -> None:
    raise RuntimeError("close callback exploded")


class TableTestsMixin:
    def setUp(self) -> None:
        self.clock = Clock()
        self.table = SessionTable(self.clock, timeout=600, maxSessions=5)

    def open(self, transport: str = STREAMABLE_HTTP, **kw: Any) -> Session:
        return self.table.create(transport, kw.pop("instanceId", "inst1"), "key1", **kw)


class CreateTests(TableTestsMixin, SynchronousTestCase):
    """
    L{SessionTable.create} opens sessions up to the limit.
    """

    def test_fields(self) -> None:
        """A new session records its principal, transport, client and times."""
        self.clock.advance(100)
        s = self.table.create(
            SSE,
            "inst1",
            "key1",
            protocolVersion="2025-06-18",
            clientInfo={"name": "c", "version": "1"},
            clientCapabilities={"roots": {}},
        )
        self.assertEqual(
            (s.transport, s.instanceId, s.keyId, s.protocolVersion),
            (SSE, "inst1", "key1", "2025-06-18"),
        )
        self.assertEqual(s.clientInfo, {"name": "c", "version": "1"})
        self.assertEqual(s.clientCapabilities, {"roots": {}})
        self.assertEqual((s.createdAt, s.lastActivity), (100, 100))
        self.assertFalse(s.closed)
        self.assertIs(self.table.get(s.id), s)

    def test_idIs128RandomBits(self) -> None:
        """Ids are 32 hex digits (128 bits) and distinct."""
        table = SessionTable(self.clock, maxSessions=1000)
        ids = {table.create(SSE, "i", "k").id for _ in range(1000)}
        self.assertEqual(len(ids), 1000)
        for sessionId in ids:
            self.assertEqual(len(sessionId), 32)
            int(sessionId, 16)

    def test_clientDictsCopied(self) -> None:
        """The session keeps its own copy of the client's dicts."""
        info = {"name": "c"}
        s = self.open(clientInfo=info)
        info["name"] = "changed"
        self.assertEqual(s.clientInfo, {"name": "c"})

    def test_unknownTransport(self) -> None:
        """An unknown transport is refused."""
        self.assertRaises(ValueError, self.table.create, "websocket", "i", "k")
        self.assertEqual(len(self.table), 0)

    def test_capacity(self) -> None:
        """Beyond C{maxSessions} open sessions, creation fails."""
        for _ in range(5):
            self.open()
        error = self.assertRaises(SessionCapacityError, self.open)
        self.assertEqual(error.maxSessions, 5)
        self.assertEqual(self.table.stats["rejected"], 1)
        self.assertEqual(len(self.table), 5)

    def test_capacityFreedByClose(self) -> None:
        """Closing a session makes room at once."""
        sessions = [self.open() for _ in range(5)]
        self.successResultOf(self.table.close(sessions[0].id))
        self.open()
        self.assertEqual(len(self.table), 5)

    def test_capacitySweepsExpiredFirst(self) -> None:
        """At capacity, expired sessions are swept to make room."""
        old = self.open()
        recorder = Recorder()
        old.onClose(recorder)
        self.clock.advance(300)
        for _ in range(4):
            self.open()
        self.clock.advance(301)
        self.open()
        self.assertEqual(recorder.reasons, ["expired"])
        self.assertEqual(len(self.table), 5)

    def test_counts(self) -> None:
        """Open sessions are counted by transport."""
        self.assertEqual(self.table.counts(), {STREAMABLE_HTTP: 0, SSE: 0})
        a = self.open(STREAMABLE_HTTP)
        self.open(STREAMABLE_HTTP)
        self.open(SSE)
        self.assertEqual(self.table.counts(), {STREAMABLE_HTTP: 2, SSE: 1})
        self.successResultOf(self.table.close(a.id))
        self.assertEqual(self.table.counts(), {STREAMABLE_HTTP: 1, SSE: 1})
        self.assertEqual(len(self.table), 2)

    def test_invalidLimits(self) -> None:
        """A timeout or limit of 0 is refused."""
        self.assertRaises(ValueError, SessionTable, self.clock, timeout=0)
        self.assertRaises(ValueError, SessionTable, self.clock, maxSessions=0)


class SessionTests(TableTestsMixin, SynchronousTestCase):
    """
    L{Session} itself.
    """

    def test_reprHidesId(self) -> None:
        """The id is a credential: C{repr} shows only its hashed form."""
        s = self.open()
        self.assertNotIn(s.id, repr(s))
        self.assertIn(s.logId, repr(s))

    def test_logId(self) -> None:
        """The log id is 8 hex digits of the id's SHA-256, not a part of the id."""
        s = self.open()
        self.assertEqual(s.logId, sessionLogId(s.id))
        self.assertEqual(len(s.logId), 8)
        self.assertNotIn(s.logId, s.id)

    def test_belongsTo(self) -> None:
        """A session belongs only to its own key and instance."""
        s = self.open()
        self.assertTrue(s.belongsTo("key1", "inst1"))
        self.assertFalse(s.belongsTo("key2", "inst1"))
        self.assertFalse(s.belongsTo("key1", "inst2"))

    def test_mutable(self) -> None:
        """The transport may set the negotiated version after creation."""
        s = self.open()
        s.protocolVersion = "2025-06-18"
        self.assertEqual(self.table.get(s.id), s)
        self.assertEqual(s.protocolVersion, "2025-06-18")


class ExpiryTests(TableTestsMixin, SynchronousTestCase):
    """
    Sessions idle longer than the timeout are gone.
    """

    def test_getUnknown(self) -> None:
        """An unknown id reads as C{None}."""
        self.assertIsNone(self.table.get("0" * 32))

    def test_aliveUntilTimeout(self) -> None:
        """A session idle for exactly the timeout is still there."""
        s = self.open()
        self.clock.advance(600)
        self.assertIs(self.table.get(s.id), s)

    def test_expiredIsAbsent(self) -> None:
        """An expired session reads as absent and is closed at once."""
        s = self.open()
        recorder = Recorder()
        s.onClose(recorder)
        self.clock.advance(600.5)
        self.assertIsNone(self.table.get(s.id))
        self.assertTrue(s.closed)
        self.assertEqual(recorder.reasons, ["expired"])
        self.assertEqual(len(self.table), 0)
        self.assertEqual(self.table.stats["expired"], 1)

    def test_touchExtends(self) -> None:
        """Touching a session restarts its idle time."""
        s = self.open()
        self.clock.advance(500)
        self.table.touch(s)
        self.assertEqual(s.lastActivity, 500)
        self.clock.advance(500)
        self.assertIs(self.table.get(s.id), s)
        self.clock.advance(101)
        self.assertIsNone(self.table.get(s.id))

    def test_touchClosedIgnored(self) -> None:
        """Touching a closed session does not bring it back."""
        s = self.open()
        self.successResultOf(self.table.close(s.id))
        self.table.touch(s)
        self.assertIsNone(self.table.get(s.id))
        self.assertEqual(len(self.table), 0)


class CloseTests(TableTestsMixin, SynchronousTestCase):
    """
    Closing runs the close callbacks once and frees the entry at once.
    """

    def test_callbacksRunOnce(self) -> None:
        """Closing twice runs the callbacks once; the second close finds nothing."""
        s = self.open()
        recorder = Recorder()
        s.onClose(recorder)
        self.assertTrue(self.successResultOf(self.table.close(s.id, "deleted")))
        self.assertFalse(self.successResultOf(self.table.close(s.id, "deleted")))
        self.assertEqual(recorder.reasons, ["deleted"])
        self.assertEqual((s.closed, s.closeReason), (True, "deleted"))
        self.assertIsNone(self.table.get(s.id))

    def test_lastAddedFirst(self) -> None:
        """Callbacks run last added first, like a cleanup stack."""
        order: list[Any] = []
        s = self.open()
        s.onClose(Recorder(order, "upstream"))
        s.onClose(Recorder(order, "stream"))
        self.table.close(s.id)
        self.assertEqual(order, ["stream", "upstream"])

    def test_onCloseAfterClose(self) -> None:
        """A callback added to a closed session runs at once, with its reason."""
        s = self.open()
        self.table.close(s.id, "deleted")
        recorder = Recorder()
        s.onClose(recorder)
        self.assertEqual(recorder.reasons, ["deleted"])

    def test_failingCallbackLogged(self) -> None:
        """A raising callback is logged; the others still run; close succeeds."""
        s = self.open()
        recorder = Recorder()
        s.onClose(recorder)
        s.onClose(explode)
        self.assertTrue(self.successResultOf(self.table.close(s.id)))
        self.assertEqual(recorder.reasons, ["closed"])
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_failingDeferredCallbackLogged(self) -> None:
        """A callback whose Deferred fails is logged too."""
        s = self.open()
        s.onClose(lambda reason: fail(ValueError("async cleanup failed")))
        self.assertTrue(self.successResultOf(self.table.close(s.id)))
        self.assertEqual(len(self.flushLoggedErrors(ValueError)), 1)

    def test_waitsForCallbacks(self) -> None:
        """C{close} fires once the callbacks' Deferreds have; the entry is freed before."""
        s = self.open()
        pending: Deferred[None] = Deferred()
        s.onClose(lambda reason: pending)
        d = self.table.close(s.id)
        self.assertNoResult(d)
        self.assertIsNone(self.table.get(s.id))
        self.assertEqual(len(self.table), 0)
        pending.callback(None)
        self.assertTrue(self.successResultOf(d))

    def test_callbackClosingAgain(self) -> None:
        """A callback that closes its own session again does not recurse."""
        s = self.open()
        recorder = Recorder()
        s.onClose(recorder)
        s.onClose(lambda reason: self.table.close(s.id))
        self.successResultOf(self.table.close(s.id))
        self.assertEqual(recorder.reasons, ["closed"])

    def test_closeAll(self) -> None:
        """C{closeAll} closes every session and waits for their callbacks."""
        recorders = []
        pending: Deferred[None] = Deferred()
        for i in range(3):
            s = self.open(SSE if i else STREAMABLE_HTTP)
            recorder = Recorder()
            s.onClose(recorder)
            recorders.append(recorder)
        s.onClose(lambda reason: pending)
        d = self.table.closeAll()
        self.assertEqual([r.reasons for r in recorders], [["shutdown"]] * 3)
        self.assertEqual(len(self.table), 0)
        self.assertEqual(self.table.counts(), {STREAMABLE_HTTP: 0, SSE: 0})
        self.assertNoResult(d)
        pending.callback(None)
        self.assertIsNone(self.successResultOf(d))


class CountingTable(SessionTable):
    """
    A table that counts how many sessions its sweeps examine.
    """

    examined = 0

    def _expired(self, session: Session, now: float) -> bool:
        CountingTable.examined += 1
        return super()._expired(session, now)


class SweepTests(TableTestsMixin, SynchronousTestCase):
    """
    L{SessionTable.sweep} closes idle sessions, cheaply and without dying.
    """

    def test_sweepsOnlyExpired(self) -> None:
        """Sessions idle longer than the timeout are closed, the others kept."""
        old = [self.open() for _ in range(2)]
        self.clock.advance(300)
        new = [self.open() for _ in range(2)]
        self.table.touch(old[1])
        self.clock.advance(301)
        self.assertEqual(self.table.sweep(), 1)
        self.assertTrue(old[0].closed)
        for s in [old[1], *new]:
            self.assertIs(self.table.get(s.id), s)

    def test_examinesOnlyExpiredPlusOne(self) -> None:
        """A sweep looks at the expired sessions and the first live one only."""
        table = CountingTable(self.clock, timeout=600, maxSessions=10_000)
        for _ in range(30):
            table.create(SSE, "i", "k")
        self.clock.advance(300)
        for _ in range(1000):
            table.create(SSE, "i", "k")
        self.clock.advance(301)
        CountingTable.examined = 0
        self.assertEqual(table.sweep(), 30)
        self.assertEqual(CountingTable.examined, 31)
        CountingTable.examined = 0
        self.assertEqual(table.sweep(), 0)
        self.assertEqual(CountingTable.examined, 1)

    def test_survivesFailingCallback(self) -> None:
        """A failing close callback is logged and the sweep goes on."""
        sessions = [self.open() for _ in range(3)]
        recorder = Recorder()
        sessions[0].onClose(explode)
        sessions[2].onClose(recorder)
        self.clock.advance(601)
        self.assertEqual(self.table.sweep(), 3)
        self.assertEqual(recorder.reasons, ["expired"])
        self.assertEqual(len(self.table), 0)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_survivesBrokenClock(self) -> None:
        """An error inside the sweep itself is logged, not raised."""

        class BrokenClock(Clock):
            def seconds(self) -> float:
                raise OSError("clock broke")

        table = SessionTable(BrokenClock())
        self.assertEqual(table.sweep(), 0)
        self.assertEqual(len(self.flushLoggedErrors(OSError)), 1)

    def test_tenThousand(self) -> None:
        """At 10,000 sessions, all expired, one sweep closes them all."""
        table = SessionTable(self.clock, timeout=600, maxSessions=10_000)
        closed: list[str] = []
        for _ in range(10_000):
            table.create(STREAMABLE_HTTP, "i", "k").onClose(closed.append)
        self.assertRaises(SessionCapacityError, table.create, SSE, "i", "k")
        self.clock.advance(601)
        self.assertEqual(table.sweep(), 10_000)
        self.assertEqual(len(closed), 10_000)
        self.assertEqual(table.counts(), {STREAMABLE_HTTP: 0, SSE: 0})


class SweeperServiceTests(TableTestsMixin, SynchronousTestCase):
    """
    L{SessionTable.sweeperService} runs the sweep on the table's clock.
    """

    def test_sweepsPeriodically(self) -> None:
        """The service sweeps at start and every interval."""
        svc = self.table.sweeperService(60)
        self.assertEqual(svc.name, "session-sweeper")
        s = self.open()
        svc.startService()
        self.clock.pump([60] * 10)
        self.assertFalse(s.closed)
        self.clock.pump([60] * 1)
        self.assertTrue(s.closed)
        self.successResultOf(svc.stopService())
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_defaultInterval(self) -> None:
        """By default the sweep runs every half timeout."""
        self.assertEqual(self.table.sweeperService().step, 300)

    def test_keepsRunningAfterFailures(self) -> None:
        """A failing close callback does not stop later sweeps."""
        svc = self.table.sweeperService(60)
        svc.startService()
        first = self.open()
        first.onClose(explode)
        self.clock.pump([60] * 11)
        self.assertTrue(first.closed)
        second = self.open()
        self.clock.pump([60] * 11)
        self.assertTrue(second.closed)
        self.assertTrue(svc._loop.running)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.successResultOf(svc.stopService())
