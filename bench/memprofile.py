#!/usr/bin/env python3
"""
Where a proxy's resident memory goes.

    python bench/memprofile.py smaps PID      # RSS by mapping of a running process
    python bench/memprofile.py imports        # RSS added by each import, in order

C{smaps} groups C{/proc/PID/smaps} by what is mapped: the anonymous memory
(the Python heap: objects, code, caches) and each shared library or
extension module.  C{imports} runs in a fresh interpreter (this one) and
imports, in the order the proxy's start-up does, the packages the proxy
loads, printing the RSS each adds (a package's shared dependencies count
for the first that imports them).

Each prints one line C{BENCH_JSON {...}}.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
from collections import defaultdict


def smaps(pid: int) -> dict[str, object]:
    byName: dict[str, int] = defaultdict(int)
    name = "?"
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            first = line.split(None, 1)[0]
            if "-" in first and not first.endswith(":"):
                parts = line.split(None, 5)
                path = parts[5].strip() if len(parts) > 5 else ""
                if not path or path.startswith("[anon") or path == "[heap]":
                    name = "anonymous memory and [heap] (Python objects, code, buffers)"
                elif path.startswith("["):
                    name = path
                else:
                    name = path
            elif first == "Rss:":
                byName[name] += int(line.split()[1])
    total = sum(byName.values())
    rows = sorted(byName.items(), key=lambda kv: -kv[1])
    return {"total_kb": total, "rows": [[n, kb] for n, kb in rows]}


# In the order twistd loads them: twistd and the reactor, the plugin's
# imports, the service and its parts.
LADDER = [
    "twisted.internet.defer",
    "twisted.internet.reactor",
    "twisted.web.server",
    "twisted.scripts.twistd",
    "klein",
    "prometheus_client",
    "treq",
    "sqlite3",
    "twisted.enterprise.adbapi",
    "psycopg2",
    "txpostgres.txpostgres",
    "txredisapi",
    "mcp_proxy.config",
    "mcp_proxy.metrics",
    "mcp_proxy.requestlog",
    "mcp_proxy.repository",
    "mcp_proxy.upstream.http",
    "mcp_proxy.service",
    "mcp_proxy.tap",
]


def _rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def imports() -> dict[str, object]:
    rows = []
    start = _rss()
    rows.append(["python " + sys.version.split()[0] + " itself", start, len(sys.modules)])
    for module in LADDER:
        before, count = _rss(), len(sys.modules)
        try:
            importlib.import_module(module)
        except ImportError:
            continue
        rows.append([module, _rss() - before, len(sys.modules) - count])
    return {"total_kb": _rss(), "modules": len(sys.modules), "rows": rows}


def main() -> None:
    if len(sys.argv) >= 3 and sys.argv[1] == "smaps":
        result = smaps(int(sys.argv[2]))
    elif len(sys.argv) == 2 and sys.argv[1] == "imports":
        os.environ.setdefault("PYTHONDONTWRITEBYTECODE", "1")
        result = imports()
    else:
        sys.exit(__doc__)
    print("BENCH_JSON " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
