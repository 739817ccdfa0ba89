#!/usr/bin/env python3
"""
The upstream without the proxy: start examples/echo_server.py over stdio,
as the proxy does, and drive it with JSON-RPC lines for a fixed time, with
C{--concurrency} requests outstanding at once on the one process (the proxy
also multiplexes many requests over one process).

    python bench/direct.py --concurrency 32 --duration 10 [--warmup 1]

Prints one line: C{BENCH_JSON {...}} with requests, errors, req/s and the
latency mean and percentiles in microseconds (the same fields as
bench/mcp.lua).  The client is one thread doing blocking pipe I/O: at
concurrency 1 it adds a write and a read system call to each request, which
is what any client of a stdio server pays.
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ECHO = ROOT / "examples" / "echo_server.py"


def percentile(sorted_values: list[float], p: float) -> float:
    if not sorted_values:
        return 0.0
    k = max(0, min(len(sorted_values) - 1, round(p / 100.0 * len(sorted_values) + 0.5) - 1))
    return sorted_values[k]


def run(
    concurrency: int, duration: float, warmup: float, python: str, echo: str
) -> dict[str, object]:
    process = subprocess.Popen(
        [python, echo],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        bufsize=0,
    )
    assert process.stdin is not None and process.stdout is not None
    out = process.stdin  # unbuffered: each write is one system call
    buffered = io.BufferedReader(process.stdout, 65536)  # type: ignore[arg-type]
    perf = time.perf_counter
    try:
        # The handshake a client makes first.
        out.write(
            b'{"jsonrpc":"2.0","id":0,"method":"initialize","params":{"protocolVersion":'
            b'"2025-11-25","capabilities":{},"clientInfo":{"name":"bench","version":"1"}}}\n'
        )
        buffered.readline()
        out.write(b'{"jsonrpc":"2.0","method":"notifications/initialized"}\n')

        def body(requestId: int) -> bytes:
            return (
                b'{"jsonrpc":"2.0","id":%d,"method":"tools/call","params":{"name":"echo",'
                b'"arguments":{"text":"hello from wrk"}}}\n' % requestId
            )

        sent: dict[int, float] = {}
        latencies: list[float] = []
        errors = 0
        nextId = 1
        measuring = False
        start = perf()
        measureStart = start + warmup
        end = measureStart + duration
        for _ in range(concurrency):
            sent[nextId] = perf()
            out.write(body(nextId))
            nextId += 1
        completed = 0
        while True:
            line = buffered.readline()
            if not line:
                raise RuntimeError("the echo server exited")
            now = perf()
            message = json.loads(line)
            t0 = sent.pop(message["id"])
            if not measuring and now >= measureStart:
                measuring = True
                latencies.clear()
                completed = 0
                errors = 0
                measureStart = now
            if measuring:
                latencies.append(now - t0)
                completed += 1
                if "error" in message or message.get("result", {}).get("isError"):
                    errors += 1
            if now >= end:
                break
            sent[nextId] = perf()
            out.write(body(nextId))
            nextId += 1
        elapsed = now - measureStart
        # Drain the requests still outstanding.
        while sent:
            line = buffered.readline()
            if not line:
                break
            sent.pop(json.loads(line)["id"], None)
    finally:
        out.close()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        buffered.close()
    latencies.sort()
    us = 1e6
    return {
        "requests": completed,
        "duration_us": int(elapsed * us),
        "responses": completed,
        "non2xx": 0,
        "status503": 0,
        "rpc_errors": errors,
        "tool_errors": 0,
        "connect_errors": 0,
        "read_errors": 0,
        "write_errors": 0,
        "timeouts": 0,
        "lat_mean_us": statistics.fmean(latencies) * us if latencies else 0.0,
        "lat_stdev_us": statistics.pstdev(latencies) * us if latencies else 0.0,
        "lat_max_us": int(latencies[-1] * us) if latencies else 0,
        "p50_us": int(percentile(latencies, 50) * us),
        "p90_us": int(percentile(latencies, 90) * us),
        "p95_us": int(percentile(latencies, 95) * us),
        "p99_us": int(percentile(latencies, 99) * us),
        "p999_us": int(percentile(latencies, 99.9) * us),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--python", default=sys.executable, help="python that runs the echo server")
    parser.add_argument("--echo", default=str(ECHO), help="the echo server's file")
    args = parser.parse_args()
    result = run(args.concurrency, args.duration, args.warmup, args.python, args.echo)
    print("BENCH_JSON " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
