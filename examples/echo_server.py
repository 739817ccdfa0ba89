#!/usr/bin/env python3
"""
A small stdio MCP server using only the standard library.

Tools: C{echo} {text}, C{add} {a, b} (with structured output) and C{sleep}
{seconds} (answered later without blocking other requests; stopped by
C{notifications/cancelled}).  It starts fast and answers many concurrent
requests, so it also serves as the benchmark's upstream.

Run it as C{python3 examples/echo_server.py}; it reads JSON-RPC lines on
stdin and writes them on stdout, and exits at the end of stdin.
"""

import heapq
import json
import sys
import threading
import time

SUPPORTED_VERSIONS = ("2024-11-05", "2025-03-26", "2025-06-18", "2025-11-25")
LATEST_VERSION = "2025-11-25"

TOOLS = [
    {
        "name": "echo",
        "description": "Return the given text.",
        "inputSchema": {
            "type": "object",
            "properties": {"text": {"type": "string"}},
            "required": ["text"],
        },
    },
    {
        "name": "add",
        "description": "Add two numbers.",
        "inputSchema": {
            "type": "object",
            "properties": {"a": {"type": "number"}, "b": {"type": "number"}},
            "required": ["a", "b"],
        },
        "outputSchema": {
            "type": "object",
            "properties": {"result": {"type": "number"}},
            "required": ["result"],
        },
    },
    {
        "name": "sleep",
        "description": "Wait the given number of seconds, then answer.",
        "inputSchema": {
            "type": "object",
            "properties": {"seconds": {"type": "number", "minimum": 0}},
            "required": ["seconds"],
        },
    },
]

_output = sys.stdout.buffer
_outputLock = threading.Lock()
_encode = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode


def send(message):
    data = _encode(message).encode("utf-8") + b"\n"
    with _outputLock:
        _output.write(data)
        _output.flush()


def result(requestId, value):
    send({"jsonrpc": "2.0", "id": requestId, "result": value})


def error(requestId, code, message):
    send({"jsonrpc": "2.0", "id": requestId, "error": {"code": code, "message": message}})


def text(value, isError=False):
    answer = {"content": [{"type": "text", "text": value}]}
    if isError:
        answer["isError"] = True
    return answer


def isNumber(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool)


class Sleeper:
    """
    One thread that answers the C{sleep} calls when they are due.
    """

    def __init__(self):
        self._heap = []
        self._cancelled = set()
        self._condition = threading.Condition()
        self._thread = None

    def add(self, requestId, seconds):
        with self._condition:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, daemon=True)
                self._thread.start()
            key = (type(requestId).__name__, requestId)
            self._cancelled.discard(key)
            heapq.heappush(self._heap, (time.monotonic() + seconds, id(key), key, seconds))
            self._condition.notify()

    def cancel(self, requestId):
        with self._condition:
            self._cancelled.add((type(requestId).__name__, requestId))

    def _run(self):
        while True:
            with self._condition:
                while not self._heap or self._heap[0][0] > time.monotonic():
                    wait = self._heap[0][0] - time.monotonic() if self._heap else None
                    self._condition.wait(wait)
                _, _, key, seconds = heapq.heappop(self._heap)
                if key in self._cancelled:
                    self._cancelled.discard(key)
                    continue
            result(key[1], text(f"slept {seconds:g} s"))


sleeper = Sleeper()


def callTool(requestId, params):
    name = params.get("name")
    arguments = params.get("arguments") or {}
    if not isinstance(arguments, dict):
        error(requestId, -32602, "arguments must be an object")
    elif name == "echo":
        value = arguments.get("text")
        if isinstance(value, str):
            result(requestId, text(value))
        else:
            result(requestId, text("echo needs a string 'text'", isError=True))
    elif name == "add":
        a, b = arguments.get("a"), arguments.get("b")
        if isNumber(a) and isNumber(b):
            total = a + b
            answer = text(str(total))
            answer["structuredContent"] = {"result": total}
            result(requestId, answer)
        else:
            result(requestId, text("add needs numbers 'a' and 'b'", isError=True))
    elif name == "sleep":
        seconds = arguments.get("seconds")
        if isNumber(seconds) and 0 <= seconds <= 86400:
            sleeper.add(requestId, seconds)
        else:
            result(requestId, text("sleep needs 'seconds' from 0 to 86400", isError=True))
    else:
        error(requestId, -32602, f"Unknown tool: {name}")


def handleRequest(requestId, method, params):
    if method == "tools/call":
        callTool(requestId, params)
    elif method == "ping":
        result(requestId, {})
    elif method == "tools/list":
        result(requestId, {"tools": TOOLS})
    elif method == "initialize":
        requested = params.get("protocolVersion")
        version = requested if requested in SUPPORTED_VERSIONS else LATEST_VERSION
        result(
            requestId,
            {
                "protocolVersion": version,
                "capabilities": {"tools": {"listChanged": False}},
                "serverInfo": {"name": "echo-server", "version": "1.0.0"},
            },
        )
    else:
        error(requestId, -32601, f"Method not found: {method}")


def handleNotification(method, params):
    if method == "notifications/cancelled":
        requestId = params.get("requestId")
        if isinstance(requestId, (str, int)):
            sleeper.cancel(requestId)


def main():
    for line in sys.stdin.buffer:
        if not line.strip():
            continue
        try:
            message = json.loads(line)
        except ValueError:
            sys.stderr.write("echo-server: ignoring a line that is not JSON\n")
            sys.stderr.flush()
            continue
        if not isinstance(message, dict) or not isinstance(message.get("method"), str):
            continue  # responses and junk
        params = message.get("params")
        if not isinstance(params, dict):
            params = {}
        if "id" in message:
            handleRequest(message["id"], message["method"], params)
        else:
            handleNotification(message["method"], params)


if __name__ == "__main__":
    try:
        main()
    except (KeyboardInterrupt, BrokenPipeError):
        pass
