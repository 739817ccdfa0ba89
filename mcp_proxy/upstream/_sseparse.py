"""
An incremental parser of C{text/event-stream} bodies (Server-Sent Events),
for the remote upstreams.

It follows the WHATWG "event stream interpretation": lines end with CRLF, LF
or CR (a CRLF split between two reads is still one line end); a line
starting with C{:} is a comment (keep-alives); C{data} lines of one event
are joined with newlines; an event without a C{data} line is not
dispatched, but its C{id} is kept (an empty C{data:} line, as in the
priming events of Streamable HTTP, gives an event with empty data).  The bytes fed
are searched once, so a long event costs linear time, and no event may
exceed a size limit.
"""

from __future__ import annotations

import re
from typing import Optional

from attrs import frozen

_LINE_END = re.compile(rb"\r\n|\r|\n")
_BOM = b"\xef\xbb\xbf"


@frozen
class ServerSentEvent:
    """
    One dispatched event.

    @ivar event: the event type (C{"message"} when the stream named none).
    @ivar data: the data lines joined with C{"\\n"}.
    @ivar id: the last event id of the stream at this event, or C{""}.
    """

    event: str
    data: str
    id: str = ""


class EventTooLarge(Exception):
    """
    A line or an event exceeds the parser's limit.

    @ivar events: the complete events that came before it in the same feed.
    """

    def __init__(self, limit: int, events: list[ServerSentEvent]) -> None:
        super().__init__(f"event of more than {limit} bytes")
        self.limit = limit
        self.events = events


class EventStreamParser:
    """
    Turns the bytes of an event stream into L{ServerSentEvent}s.

    @ivar lastEventId: the last C{id} field seen.
    @ivar retry: the last valid C{retry} field (milliseconds), or C{None}.
    """

    def __init__(self, maxEventSize: int) -> None:
        self.maxEventSize = maxEventSize
        self.lastEventId = ""
        self.retry: Optional[int] = None
        self._buffer = bytearray()
        self._scanFrom = 0
        self._skipLF = False
        self._started = False
        self._eventType = ""
        self._data: list[str] = []
        self._dataSize = 0

    def feed(self, data: bytes) -> list[ServerSentEvent]:
        """
        @return: the events completed by C{data}.
        @raise EventTooLarge: when an unfinished line or event exceeds
            C{maxEventSize} bytes; the parser is then unusable.
        """
        buffer = self._buffer
        buffer += data
        events: list[ServerSentEvent] = []
        pos = 0
        if not self._started:
            if len(buffer) < len(_BOM) and _BOM.startswith(bytes(buffer)):
                return events
            self._started = True
            if buffer.startswith(_BOM):
                pos = len(_BOM)
        if self._skipLF and len(buffer) > pos:
            self._skipLF = False
            if buffer[pos] == 0x0A:
                pos += 1
        search = _LINE_END.search
        scan = max(pos, self._scanFrom)
        while True:
            match = search(buffer, scan)
            if match is None:
                break
            end = match.start()
            if match.end() == len(buffer) and buffer[end] == 0x0D:
                # A CR at the end of what we have: an LF may follow.
                self._skipLF = True
            line = bytes(buffer[pos:end])
            pos = scan = match.end()
            if len(line) > self.maxEventSize:
                raise EventTooLarge(self.maxEventSize, events)
            try:
                self._line(line.decode("utf-8", "replace"), len(line), events)
            except EventTooLarge as e:
                raise EventTooLarge(e.limit, events) from None
        if pos:
            del buffer[:pos]
        self._scanFrom = len(buffer)
        if len(buffer) + self._dataSize > self.maxEventSize:
            raise EventTooLarge(self.maxEventSize, events)
        return events

    def _line(self, line: str, size: int, events: list[ServerSentEvent]) -> None:
        if not line:
            self._dispatch(events)
            return
        if line.startswith(":"):
            return
        name, colon, value = line.partition(":")
        if colon and value.startswith(" "):
            value = value[1:]
        if name == "data":
            self._dataSize += size + 1
            if self._dataSize > self.maxEventSize:
                raise EventTooLarge(self.maxEventSize, events)
            self._data.append(value)
        elif name == "event":
            self._eventType = value
        elif name == "id":
            if "\x00" not in value:
                self.lastEventId = value
        elif name == "retry":
            if value.isascii() and value.isdigit():
                self.retry = int(value)

    def _dispatch(self, events: list[ServerSentEvent]) -> None:
        if self._data:
            events.append(
                ServerSentEvent(
                    self._eventType or "message", "\n".join(self._data), self.lastEventId
                )
            )
        self._eventType = ""
        self._data = []
        self._dataSize = 0
