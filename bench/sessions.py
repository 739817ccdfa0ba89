#!/usr/bin/env python3
"""
Open MCP sessions on a proxy the way a 2025-era client does: an
C{initialize} POST (the answer carries C{Mcp-Session-Id}), then the
C{notifications/initialized} notification in that session.

    python bench/sessions.py URL KEY COUNT OUT_FILE [--connections 4]

Appends the session ids to OUT_FILE, one a line, and prints one line
C{BENCH_JSON {"opened": N, "refused503": N, "failed": N, "seconds": S}}.
Connections are kept alive; a few of them run in parallel threads.
"""

from __future__ import annotations

import argparse
import http.client
import json
import sys
import threading
import time
from urllib.parse import urlsplit

INITIALIZE = json.dumps(
    {
        "jsonrpc": "2.0",
        "id": 1,
        "method": "initialize",
        "params": {
            "protocolVersion": "2025-11-25",
            "capabilities": {},
            "clientInfo": {"name": "bench", "version": "1.0"},
        },
    }
).encode()
INITIALIZED = b'{"jsonrpc":"2.0","method":"notifications/initialized"}'


def worker(
    url: str, key: str, count: int, out: list[str], stats: dict[str, int], lock: threading.Lock
) -> None:
    parts = urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
    headers = {
        "Content-Type": "application/json",
        "Accept": "application/json, text/event-stream",
        "X-API-Key": key,
    }
    opened: list[str] = []
    refused = failed = 0
    for _ in range(count):
        connection.request("POST", parts.path, INITIALIZE, headers)
        response = connection.getresponse()
        response.read()
        sessionId = response.getheader("Mcp-Session-Id")
        if response.status == 200 and sessionId:
            notify = dict(headers)
            notify["Mcp-Session-Id"] = sessionId
            notify["Mcp-Protocol-Version"] = "2025-11-25"
            connection.request("POST", parts.path, INITIALIZED, notify)
            answer = connection.getresponse()
            answer.read()
            if answer.status == 202:
                opened.append(sessionId)
            else:
                failed += 1
        elif response.status == 503:
            refused += 1
        else:
            failed += 1
    connection.close()
    with lock:
        out.extend(opened)
        stats["refused503"] += refused
        stats["failed"] += failed


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("url")
    parser.add_argument("key")
    parser.add_argument("count", type=int)
    parser.add_argument("out")
    parser.add_argument("--connections", type=int, default=4)
    args = parser.parse_args()
    ids: list[str] = []
    stats = {"refused503": 0, "failed": 0}
    lock = threading.Lock()
    n = max(1, min(args.connections, args.count))
    shares = [args.count // n + (1 if i < args.count % n else 0) for i in range(n)]
    start = time.monotonic()
    threads = [
        threading.Thread(target=worker, args=(args.url, args.key, share, ids, stats, lock))
        for share in shares
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    seconds = time.monotonic() - start
    with open(args.out, "a") as f:
        for sessionId in ids:
            f.write(sessionId + "\n")
    print(
        "BENCH_JSON " + json.dumps({"opened": len(ids), "seconds": round(seconds, 3), **stats}),
        flush=True,
    )
    sys.exit(0 if len(ids) == args.count else 1)


if __name__ == "__main__":
    main()
