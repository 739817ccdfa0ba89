#!/usr/bin/env python3
"""
The benchmark of mcp-proxy, end to end.  Run it through C{bench/run}, which
makes sure wrk and py-spy are there and cleans up after it.

What it measures, in one run on this machine:

 1. The ceiling: a bare twisted.web resource (bench/bare_server.py).
 2. The upstream without the proxy: examples/echo_server.py over stdio
    (bench/direct.py).
 3. For each database (a SQLite file; a throwaway PostgreSQL database): an
    instance and key made by C{mcpproxy-admin}, a proxy with request
    logging on, API-key authentication and sessions as in production;
    tools/call and tools/list at concurrency 1, 32 and 128 (wrk, a separate
    process); database queries per request from C{/metrics}; RSS and CPU.
    Then load beyond capacity (shedding), and request log on against off.
 4. RSS with 1,000 and 10,000 open sessions.
 5. The targets, MET or NOT MET; a profile of the proxy (py-spy) for each
    NOT MET.
 6. bench/results/latest.md (and .json), and docs/performance.md.
"""

from __future__ import annotations

import argparse
import datetime
import http.client
import json
import os
import platform
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any, Optional

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
VENV = ROOT / ".venv" / "bin"
PYTHON = str(VENV / "python")
# The product code the run measures: a copy of the tree's taken at the start
# (see snapshotCode), so that commits landing during the run do not mix
# versions; the processes that run product code get it first on PYTHONPATH.
CODE = {"dir": ROOT}


def echoPath() -> Path:
    return CODE["dir"] / "examples" / "echo_server.py"


def productEnv() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(CODE["dir"]) + (
        os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else ""
    )
    return env


def snapshotCode(run: Path) -> None:
    """
    Copy the product code (mcp_proxy/, the twistd plugin, examples/) as it
    is now into the run folder, and run that.
    """
    target = run / "code"
    for name in ("mcp_proxy", "twisted", "examples"):
        shutil.copytree(
            ROOT / name, target / name, ignore=shutil.ignore_patterns("__pycache__", "dropin.cache")
        )
    CODE["dir"] = target


LUA = BENCH / "mcp.lua"
DOC = ROOT / "docs" / "performance.md"
BEGIN = "<!-- bench:begin (written by bench/run; edit outside these markers) -->"
END = "<!-- bench:end -->"
PG_ADMIN_DSN = os.environ.get(
    "BENCH_PG_DSN", "host=127.0.0.1 port=5432 user=postgres dbname=postgres"
)
PG_URL = os.environ.get("BENCH_PG_URL", "postgresql://postgres@127.0.0.1:5432/{db}")
CLK_TCK = os.sysconf("SC_CLK_TCK")

LOAD_CONCURRENCY = (1, 32, 128)
METHODS = ("tools/call", "tools/list")
SESSIONS_FOR_LOAD = 128


LOGFILE: Optional[Path] = None


def log(message: str) -> None:
    line = f"[bench {time.strftime('%H:%M:%S')}] {message}"
    print(line, flush=True)
    if LOGFILE is not None:
        with LOGFILE.open("a") as f:
            f.write(line + "\n")


# -- bookkeeping for cleanup -------------------------------------------------


class Registry:
    """
    What this run started: process groups and databases, also written to
    files in the run folder so that C{bench.py cleanup RUN} (bench/run's
    trap) can end them if this process dies.
    """

    def __init__(self, run: Path) -> None:
        self.run = run
        self.processes: list[subprocess.Popen[bytes]] = []
        self.databases: list[str] = []

    def spawn(self, argv: list[str], logPath: Path, **kwargs: Any) -> subprocess.Popen[bytes]:
        out = logPath.open("ab")
        process = subprocess.Popen(
            argv, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, **kwargs
        )
        out.close()
        self.processes.append(process)
        with (self.run / "pgids").open("a") as f:
            f.write(f"{process.pid}\n")
        return process

    def stop(self, process: subprocess.Popen[bytes], timeout: float = 20.0) -> None:
        if process.poll() is None:
            try:
                os.kill(process.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                _killGroup(process.pid, signal.SIGKILL)
                process.wait()
        # Whatever of its group is left (an upstream the proxy left behind).
        _killGroup(process.pid, signal.SIGKILL)
        if process in self.processes:
            self.processes.remove(process)

    def addDatabase(self, name: str) -> None:
        self.databases.append(name)
        with (self.run / "pgdbs").open("a") as f:
            f.write(name + "\n")

    def cleanup(self) -> None:
        for process in list(self.processes):
            self.stop(process, timeout=10)
        for name in list(self.databases):
            dropDatabase(name)
            self.databases.remove(name)


def _killGroup(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def cleanupRun(run: Path) -> None:
    """
    End the process groups and drop the databases a run recorded (bench/run's
    trap calls this, also after a crash).
    """
    pgids = run / "pgids"
    if pgids.exists():
        groups = [int(x) for x in pgids.read_text().split() if x.strip()]
        for pgid in groups:
            _killGroup(pgid, signal.SIGTERM)
        deadline = time.monotonic() + 5
        for pgid in groups:
            while time.monotonic() < deadline:
                try:
                    os.killpg(pgid, 0)
                except (ProcessLookupError, PermissionError):
                    break
                time.sleep(0.1)
            _killGroup(pgid, signal.SIGKILL)
        pgids.unlink()
    dbs = run / "pgdbs"
    if dbs.exists():
        for name in dbs.read_text().split():
            dropDatabase(name)
        dbs.unlink()


# -- PostgreSQL -----------------------------------------------------------------


def _pg() -> Any:
    import psycopg2  # from the project's virtualenv

    connection = psycopg2.connect(PG_ADMIN_DSN, connect_timeout=5)
    connection.autocommit = True
    return connection


def postgresAvailable() -> Optional[str]:
    try:
        connection = _pg()
    except Exception as e:
        return str(e).strip().splitlines()[0] if str(e).strip() else repr(e)
    connection.close()
    return None


def createDatabase(name: str) -> None:
    connection = _pg()
    try:
        connection.cursor().execute(f'CREATE DATABASE "{name}"')
    finally:
        connection.close()


def dropDatabase(name: str) -> None:
    try:
        connection = _pg()
    except Exception:
        return
    try:
        connection.cursor().execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    except Exception as e:
        log(f"could not drop database {name}: {e}")
    finally:
        connection.close()


# -- small helpers -----------------------------------------------------------------


def freePort() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def httpGet(port: int, path: str, timeout: float = 10.0) -> tuple[int, bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def httpPost(port: int, path: str, body: bytes, headers: dict[str, str]) -> tuple[int, bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        connection.request("POST", path, body, headers)
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def waitHttp(port: int, path: str, process: subprocess.Popen[bytes], logPath: Path) -> None:
    deadline = time.monotonic() + 60
    while True:
        try:
            status, _ = httpGet(port, path, timeout=2)
            if status == 200:
                return
        except OSError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            tail = logPath.read_text(errors="replace")[-3000:] if logPath.exists() else ""
            raise RuntimeError(f"server on port {port} did not start:\n{tail}")
        time.sleep(0.1)


def rssKb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def cpuTicks(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])  # utime + stime
    except (OSError, IndexError, ValueError):
        return 0


def machineTicks() -> tuple[int, int]:
    """
    (busy, total) CPU ticks of the whole machine, from /proc/stat.
    """
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    total = sum(fields[:8])
    return total - idle, total


def children(pid: int) -> list[int]:
    found: list[int] = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            try:
                with open(f"/proc/{pid}/task/{tid}/children") as f:
                    found.extend(int(x) for x in f.read().split())
            except OSError:
                pass
    except OSError:
        pass
    return found


def parseBenchJson(output: str) -> dict[str, Any]:
    for line in output.splitlines():
        if line.startswith("BENCH_JSON "):
            return json.loads(line[len("BENCH_JSON ") :])
    raise RuntimeError("no BENCH_JSON line in:\n" + output[-3000:])


METRIC_LINE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)")


def scrape(port: int) -> dict[str, float]:
    status, body = httpGet(port, "/metrics")
    if status != 200:
        raise RuntimeError(f"/metrics answered {status}")
    values: dict[str, float] = {}
    for line in body.decode().splitlines():
        if line.startswith("#"):
            continue
        m = METRIC_LINE.match(line)
        if m:
            values[m.group(1) + (m.group(2) or "")] = float(m.group(3))
    return values


def queriesByKind(metrics: dict[str, float]) -> dict[str, float]:
    out = {}
    for name, value in metrics.items():
        if name.startswith("mcpproxy_db_queries_total{"):
            m = re.search(r'kind="([^"]*)"', name)
            if m:
                out[m.group(1)] = value
    return out


# -- load ------------------------------------------------------------------------


class Load:
    def __init__(self, settings: argparse.Namespace, run: Path) -> None:
        self.settings = settings
        self.run = run

    def wrk(
        self,
        url: str,
        method: str,
        concurrency: int,
        duration: float,
        key: str = "-",
        sessionsFile: str = "-",
    ) -> dict[str, Any]:
        threads = 1
        argv = [
            self.settings.wrk,
            f"-t{threads}",
            f"-c{concurrency}",
            f"-d{max(1, round(duration))}s",
            "--timeout",
            f"{self.settings.timeout}s",
            "-s",
            str(LUA),
            url,
            "--",
            method,
            key,
            sessionsFile,
        ]
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        result = subprocess.run(argv, capture_output=True, text=True, timeout=duration + 120)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        if result.returncode != 0:
            raise RuntimeError(f"wrk failed ({result.returncode}): {result.stderr[-2000:]}")
        data = parseBenchJson(result.stdout)
        seconds = data["duration_us"] / 1e6
        data["rps"] = data["requests"] / seconds if seconds else 0.0
        data["wrk_cpu_pct"] = (
            100.0
            * ((after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime))
            / max(seconds, 1e-9)
        )
        data["errors"] = (
            data["non2xx"]
            + data["rpc_errors"]
            + data["tool_errors"]
            + data["connect_errors"]
            + data["read_errors"]
            + data["write_errors"]
            + data["timeouts"]
        )
        data["failures_not_503"] = data["errors"] - data["status503"]
        data["error_rate"] = data["errors"] / max(
            data["requests"] + data["connect_errors"] + data["timeouts"], 1
        )
        data["concurrency"] = concurrency
        data["method"] = method
        return data


EXTRA = {"seconds": 0.0}


def withinBudget(settings: argparse.Namespace) -> bool:
    """
    Whether the time spent waiting for a quiet machine and measuring again
    is still within C{--budget}.
    """
    return EXTRA["seconds"] < settings.budget


def quiesce(settings: argparse.Namespace) -> None:
    """
    Wait (a few seconds at most, and only while the run is within its time
    budget) until processes outside the benchmark leave the CPU alone: the
    machine may be shared.  Our own servers are idle meanwhile.
    """
    start = time.monotonic()
    deadline = start + settings.quiet_wait
    try:
        while withinBudget(settings):
            busy0, _ = machineTicks()
            time.sleep(0.5)
            busy1, _ = machineTicks()
            if 100.0 * (busy1 - busy0) / CLK_TCK / 0.5 <= settings.max_other_cpu:
                return
            if time.monotonic() > deadline:
                return
    finally:
        EXTRA["seconds"] += time.monotonic() - start


def measured(load: Load, pid: int, *args: Any, **kwargs: Any) -> dict[str, Any]:
    """
    L{measuredOnce} when the machine is quiet; once more when processes
    outside the benchmark used more than C{--max-other-cpu} % of a core
    meanwhile (while the run is within its time budget); the least
    disturbed attempt is kept.
    """
    limit = load.settings.max_other_cpu
    best: Optional[dict[str, Any]] = None
    attempts = 0
    for attempt in range(2):
        quiesce(load.settings)
        t0 = time.monotonic()
        data = measuredOnce(load, pid, *args, **kwargs)
        if attempt:
            EXTRA["seconds"] += time.monotonic() - t0
        attempts += 1
        if best is None or data["other_cpu_pct"] < best["other_cpu_pct"]:
            best = data
        if data["other_cpu_pct"] <= limit or not withinBudget(load.settings):
            break
        log(
            f"    other processes used {data['other_cpu_pct']:.0f} % CPU meanwhile: measuring again"
        )
    assert best is not None
    best["attempts"] = attempts
    return best


def measuredOnce(
    load: Load, pid: int, *args: Any, metricsPort: Optional[int] = None, **kwargs: Any
) -> dict[str, Any]:
    """
    One wrk run against a server, with its RSS, the CPU used by it and its
    children, and (for a proxy) the database queries, from /metrics.
    """
    kids = children(pid)
    before = scrape(metricsPort) if metricsPort else None
    rss0 = rssKb(pid)
    cpu0 = cpuTicks(pid)
    kid0 = {k: cpuTicks(k) for k in kids}
    busy0, _ = machineTicks()
    t0 = time.monotonic()
    data = load.wrk(*args, **kwargs)
    t1 = time.monotonic()
    busy1, _ = machineTicks()
    cpu1 = cpuTicks(pid)
    kid1 = {k: cpuTicks(k) for k in kids}
    wall = t1 - t0
    data["server_cpu_pct"] = 100.0 * (cpu1 - cpu0) / CLK_TCK / wall
    data["upstream_cpu_pct"] = (
        100.0 * sum(kid1[k] - kid0[k] for k in kids) / CLK_TCK / wall if kids else None
    )
    data["machine_cpu_pct"] = 100.0 * (busy1 - busy0) / CLK_TCK / wall
    data["other_cpu_pct"] = max(
        0.0,
        data["machine_cpu_pct"]
        - data["server_cpu_pct"]
        - (data["upstream_cpu_pct"] or 0.0)
        - data["wrk_cpu_pct"] * (data["duration_us"] / 1e6) / wall,
    )
    if metricsPort:
        # Let the request log's last batch (flushed every 0.5 s) be written
        # and counted with this run.
        time.sleep(0.8)
        after = scrape(metricsPort)
        q0, q1 = queriesByKind(before or {}), queriesByKind(after)
        delta = {k: q1.get(k, 0) - q0.get(k, 0) for k in q1}
        delta = {k: v for k, v in delta.items() if v}
        data["queries"] = delta
        data["queries_per_request"] = {k: v / max(data["requests"], 1) for k, v in delta.items()}
        data["requestlog_dropped"] = after.get("mcpproxy_requestlog_dropped_total", 0) - (
            before or {}
        ).get("mcpproxy_requestlog_dropped_total", 0)
    data["rss_before_kb"] = rss0
    data["rss_after_kb"] = rssKb(pid)
    return data


# -- the proxy ---------------------------------------------------------------------


class Proxy:
    def __init__(self, registry: Registry, run: Path, name: str, database: str, options: list[str]):
        self.registry = registry
        self.name = name
        self.database = database
        self.port = freePort()
        self.metricsPort = freePort()
        self.logPath = run / f"proxy-{name}.log"
        argv = [
            str(VENV / "twistd"),
            "-n",
            "--pidfile=",
            f"--logfile={self.logPath}",
            "mcpproxy",
            "--listen",
            f"tcp:{self.port}:interface=127.0.0.1",
            "--database",
            database,
            "--metrics-listen",
            f"tcp:{self.metricsPort}:interface=127.0.0.1",
            *options,
        ]
        self.argv = argv
        self.process = registry.spawn(
            argv, run / f"proxy-{name}.stdout", cwd=str(run), env=productEnv()
        )
        waitHttp(self.port, "/health", self.process, self.logPath)

    @property
    def pid(self) -> int:
        return self.process.pid

    def stop(self) -> None:
        self.registry.stop(self.process)


class Instance:
    """
    A database prepared with C{mcpproxy-admin}: the echo server imported as
    an instance with a key.
    """

    def __init__(self, run: Path, database: str, label: str):
        self.database = database
        servers = run / "servers.json"
        servers.write_text(
            json.dumps({"mcpServers": {"echo": {"command": PYTHON, "args": [str(echoPath())]}}})
        )
        self.admin("init")
        imported = self.admin("import", str(servers), "--instance", f"bench-{label}", "--key")
        self.instanceId = imported["instance"]["id"]
        self.key = imported["key"]

    def admin(self, *args: str) -> Any:
        result = subprocess.run(
            [str(VENV / "mcpproxy-admin"), "--database", self.database, "--json", *args],
            capture_output=True,
            text=True,
            timeout=120,
            cwd=str(ROOT),
            env=productEnv(),
        )
        if result.returncode != 0:
            raise RuntimeError(f"mcpproxy-admin {' '.join(args)} failed: {result.stderr}")
        return json.loads(result.stdout) if result.stdout.strip() else None

    def path(self) -> str:
        return f"/mcp/{self.instanceId}"


def openSessions(proxy: Proxy, instance: Instance, count: int, out: Path) -> dict[str, Any]:
    result = subprocess.run(
        [
            PYTHON,
            str(BENCH / "sessions.py"),
            f"http://127.0.0.1:{proxy.port}{instance.path()}",
            instance.key,
            str(count),
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    data = parseBenchJson(result.stdout)
    if result.returncode != 0:
        raise RuntimeError(f"opening sessions failed: {data} {result.stderr[-2000:]}")
    return data


def checkProxyAnswers(proxy: Proxy, instance: Instance) -> None:
    body = (
        b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"echo",'
        b'"arguments":{"text":"hello from wrk"}}}'
    )
    status, answer = httpPost(
        proxy.port,
        instance.path(),
        body,
        {"Content-Type": "application/json", "X-API-Key": instance.key},
    )
    if status != 200 or b'"text":"hello from wrk"' not in answer:
        raise RuntimeError(f"the proxy did not echo: {status} {answer[:500]!r}")


# -- profiles ------------------------------------------------------------------------


def pyspy() -> Optional[str]:
    candidate = VENV / "py-spy"
    if candidate.exists():
        return str(candidate)
    return shutil.which("py-spy")


def profileUnderLoad(
    load: Load,
    proxy: Proxy,
    instance: Instance,
    sessionsFile: str,
    concurrency: int,
    seconds: float,
    out: Path,
) -> Optional[dict[str, Any]]:
    spy = pyspy()
    if spy is None:
        return None
    url = f"http://127.0.0.1:{proxy.port}{instance.path()}"
    wrk = subprocess.Popen(
        [
            load.settings.wrk,
            "-t1",
            f"-c{concurrency}",
            f"-d{int(seconds + 3)}s",
            "-s",
            str(LUA),
            url,
            "--",
            "tools/call",
            instance.key,
            sessionsFile,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        time.sleep(1.0)
        result = subprocess.run(
            [
                spy,
                "record",
                "--pid",
                str(proxy.pid),
                "--duration",
                str(int(seconds)),
                "--rate",
                "200",
                "--gil",
                "--threads",
                "--format",
                "raw",
                "-o",
                str(out),
            ],
            capture_output=True,
            text=True,
            timeout=seconds + 60,
        )
    finally:
        wrk.wait(timeout=seconds + 60)
    if result.returncode != 0 or not out.exists():
        log(f"py-spy failed: {result.stderr[-500:]}")
        return None
    return summarizeProfile(out, seconds, 200)


FRAME = re.compile(r"^(?P<func>.*) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")


def _frame(text: str) -> tuple[str, str]:
    m = FRAME.match(text)
    if not m:
        return text, text
    return f"{m.group('func')} ({m.group('file')})", m.group("file")


def summarizeProfile(path: Path, seconds: float, rate: int) -> dict[str, Any]:
    """
    Aggregate py-spy's collapsed stacks (recorded with --gil: each sample is
    the thread holding the GIL, i.e. where the Python CPU time goes).
    """
    selfByFunc: Counter[str] = Counter()
    selfByFile: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    perThread: Counter[str] = Counter()
    otherThreadLeaves: dict[str, Counter[str]] = defaultdict(Counter)
    total = 0
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        stack, _, count = line.rpartition(" ")
        n = int(count)
        frames = stack.split(";")
        threadName = frames[0].split(": ", 1)[-1]
        if threadName.startswith("PoolThread-") and "requestlog" not in threadName:
            threadName = "PoolThread (database, adbapi)"
        perThread[threadName] += n
        total += n
        funcs = [_frame(f) for f in frames[1:]]
        if not funcs:
            continue
        leaf, leafFile = funcs[-1]
        selfByFunc[leaf] += n
        selfByFile[leafFile] += n
        if threadName != "MainThread":
            otherThreadLeaves[threadName][leaf] += n
        for func in set(f for f, _ in funcs):
            inclusive[func] += n
    expected = seconds * rate
    main = perThread.get("MainThread", total)
    below = [(f, n) for f, n in inclusive.most_common() if n < 0.95 * max(main, 1)]
    return {
        "samples": total,
        "slots": int(expected),
        "gil_held_pct": 100.0 * total / expected if expected else None,
        "threads": perThread.most_common(),
        "self_by_function": selfByFunc.most_common(25),
        "self_by_file": selfByFile.most_common(15),
        "inclusive": below[:40],
        "inclusive_mcp_proxy": [(f, n) for f, n in below if "(mcp_proxy/" in f][:25],
        "other_threads": {t: c.most_common(6) for t, c in otherThreadLeaves.items()},
        "raw": str(path),
    }


# -- the run ---------------------------------------------------------------------------


PRODUCT_PATHS = ["mcp_proxy", "twisted", "setup.py", "pyproject.toml", "examples/echo_server.py"]


def codeVersion() -> tuple[str, list[str]]:
    """
    The commit, and the product files changed but not committed (the
    project is installed in editable mode: what runs is what is on disk).
    """
    commit = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    status = subprocess.run(
        ["git", "-C", str(ROOT), "status", "--porcelain", "--", *PRODUCT_PATHS],
        capture_output=True,
        text=True,
    ).stdout
    dirty = sorted(line[3:] for line in status.splitlines() if line.strip())
    return commit, dirty


def machine() -> dict[str, Any]:
    cpu = "?"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = 0
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                mem = int(line.split()[1])
    versions = subprocess.run(
        [
            PYTHON,
            "-c",
            "import sys, twisted, klein; print(sys.version.split()[0]); "
            "print(twisted.__version__); print(klein.__version__)",
        ],
        capture_output=True,
        text=True,
    ).stdout.split()
    wrkVersion = subprocess.run(
        [shutil.which("wrk") or "wrk", "-v"], capture_output=True, text=True
    )
    pgVersion = None
    try:
        connection = _pg()
        cursor = connection.cursor()
        cursor.execute("SHOW server_version")
        pgVersion = cursor.fetchone()[0]
        connection.close()
    except Exception:
        pass
    sqliteVersion = subprocess.run(
        [PYTHON, "-c", "import sqlite3; print(sqlite3.sqlite_version)"],
        capture_output=True,
        text=True,
    ).stdout.strip()
    commit, dirty = codeVersion()
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": round(mem / 1024 / 1024, 1),
        "kernel": platform.release(),
        "python": versions[0] if versions else "?",
        "twisted": versions[1] if len(versions) > 1 else "?",
        "klein": versions[2] if len(versions) > 2 else "?",
        "wrk": (wrkVersion.stdout + wrkVersion.stderr).split("[")[0].strip(),
        "postgresql": pgVersion,
        "sqlite": sqliteVersion,
        "commit": commit,
        "dirty": dirty,
    }


def runDirect(
    settings: argparse.Namespace, c: int, seconds: float, warmup: float
) -> dict[str, Any]:
    """
    bench/direct.py once the machine is quiet; once more if other processes
    used the CPU meanwhile (within the budget).
    """
    best = None
    for attempt in range(2):
        quiesce(settings)
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        busy0, _ = machineTicks()
        t0 = time.monotonic()
        out = subprocess.run(
            [
                PYTHON,
                str(BENCH / "direct.py"),
                "--concurrency",
                str(c),
                "--duration",
                str(seconds),
                "--warmup",
                str(warmup),
                "--python",
                PYTHON,
                "--echo",
                str(echoPath()),
            ],
            capture_output=True,
            text=True,
            timeout=seconds + 120,
        )
        wall = time.monotonic() - t0
        if attempt:
            EXTRA["seconds"] += wall
        busy1, _ = machineTicks()
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        data = parseBenchJson(out.stdout)
        data["rps"] = data["requests"] / (data["duration_us"] / 1e6)
        data["concurrency"] = c
        data["method"] = "tools/call"
        data["errors"] = data["rpc_errors"]
        ours = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
        data["client_and_upstream_cpu_pct"] = 100.0 * ours / wall
        data["other_cpu_pct"] = max(
            0.0, 100.0 * (busy1 - busy0) / CLK_TCK / wall - data["client_and_upstream_cpu_pct"]
        )
        data["attempts"] = attempt + 1
        if best is None or data["other_cpu_pct"] < best["other_cpu_pct"]:
            best = data
        if data["other_cpu_pct"] <= settings.max_other_cpu or not withinBudget(settings):
            break
        log(
            f"    other processes used {data['other_cpu_pct']:.0f} % CPU meanwhile: measuring again"
        )
    assert best is not None
    return best


def pairedRounds(rounds: int, loads: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """
    Run each load of C{loads} (name -> a function measuring it) once per
    round, in alternating order (ABBA...), so that slow drifts of the
    machine's speed hit every load alike.
    """
    names = list(loads)
    out: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
    for rnd in range(rounds):
        for name in names if rnd % 2 == 0 else list(reversed(names)):
            data = loads[name]()
            data["round"] = rnd
            out[name].append(data)
    return out


def runBench(settings: argparse.Namespace, run: Path, registry: Registry) -> dict[str, Any]:
    load = Load(settings, run)
    D = settings.duration
    snapshotCode(run)
    results: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "quick": settings.quick,
        "duration": D,
        "warmup": settings.warmup,
        "max_other_cpu": settings.max_other_cpu,
        "quiet_wait": settings.quiet_wait,
        "ab_seconds": settings.ab_seconds,
        "pair_seconds": settings.pair_seconds,
        "machine": machine(),
        "settings": {
            "wrk": f"1 thread, keep-alive connections, --timeout {settings.timeout}s",
            "sessions_for_load": SESSIONS_FOR_LOAD,
        },
    }
    log(f"machine: {results['machine']}")

    if settings.only == "request-log":
        return runRequestLogOnly(settings, run, registry, load, results)

    # 1. The ceiling.
    log("bare twisted.web ceiling")
    port = freePort()
    bareLog = run / "bare.log"
    bare = registry.spawn([PYTHON, str(BENCH / "bare_server.py"), str(port)], bareLog)
    waitHttp(port, "/", bare, bareLog)
    url = f"http://127.0.0.1:{port}/mcp/bare"
    load.wrk(url, "tools/call", 32, settings.warmup)
    results["bare"] = []
    for c in LOAD_CONCURRENCY:
        data = measured(load, bare.pid, url, "tools/call", c, D)
        results["bare"].append(data)
        log(f"  bare c={c}: {data['rps']:.0f} req/s p50 {data['p50_us'] / 1000:.2f} ms")
    # The bare server stays up (idle) for the paired ceiling next to each
    # proxy's tools/call at c=32.
    results["_bare"] = (bare, url)

    # 2. The upstream, direct.
    log("direct upstream (stdio)")
    results["direct"] = []
    for c in (1, 32):
        data = runDirect(settings, c, D, settings.warmup)
        results["direct"].append(data)
        log(f"  direct c={c}: {data['rps']:.0f} req/s p50 {data['p50_us'] / 1000:.3f} ms")

    # 3. The proxy, per database.
    results["variants"] = {}
    variants = [v for v in settings.variants.split(",") if v]
    for variant in variants:
        if variant == "postgresql":
            problem = postgresAvailable()
            if problem:
                log(f"PostgreSQL not reachable, skipped: {problem}")
                results["variants"][variant] = {"skipped": problem}
                continue
        results["variants"][variant] = runVariant(
            settings, run, registry, load, variant, results["_bare"]
        )
    bareProcess, _ = results.pop("_bare")
    registry.stop(bareProcess)

    # 4. Sessions and RSS.
    results["sessions_rss"] = runSessionsRss(settings, run, registry, load)

    # 5. Targets, and profiles for those not met.
    results["targets"] = evaluate(results)
    if not settings.no_profile:
        results["profiles"] = runProfiles(settings, run, registry, load, results)
    return results


def measureProxy(
    load: Load,
    proxy: Proxy,
    url: str,
    instance: Instance,
    sessionsFile: str,
    method: str,
    concurrency: int,
    seconds: float,
) -> dict[str, Any]:
    """
    L{measured} of a proxy under C{method} load, with the instance's key,
    the sessions of C{sessionsFile}, and the proxy's /metrics.
    """
    return measured(
        load,
        proxy.pid,
        url,
        method,
        concurrency,
        seconds,
        instance.key,
        sessionsFile,
        metricsPort=proxy.metricsPort,
    )


def databaseUrl(run: Path, registry: Registry, variant: str, label: str) -> str:
    if variant == "sqlite":
        path = run / f"{label}.sqlite3"
        return f"sqlite:///{path}"
    name = f"mcpbench_{os.getpid()}_{label}_{int(time.time())}"
    registry.addDatabase(name)
    createDatabase(name)
    return PG_URL.format(db=name)


def startWarm(
    settings: argparse.Namespace,
    run: Path,
    registry: Registry,
    load: Load,
    instance: Instance,
    name: str,
    options: list[str],
) -> tuple[Proxy, str]:
    proxy = Proxy(registry, run, name, instance.database, options)
    checkProxyAnswers(proxy, instance)
    sessionsFile = run / f"sessions-{name}.txt"
    if sessionsFile.exists():
        sessionsFile.unlink()
    openSessions(proxy, instance, SESSIONS_FOR_LOAD, sessionsFile)
    url = f"http://127.0.0.1:{proxy.port}{instance.path()}"
    for method in METHODS:
        load.wrk(url, method, 32, settings.warmup, instance.key, str(sessionsFile))
    time.sleep(0.8)
    return proxy, str(sessionsFile)


def runVariant(
    settings: argparse.Namespace,
    run: Path,
    registry: Registry,
    load: Load,
    variant: str,
    bare: tuple[subprocess.Popen[bytes], str],
) -> dict[str, Any]:
    D = settings.duration
    log(f"proxy on {variant}")
    database = databaseUrl(run, registry, variant, "main")
    instance = Instance(run, database, variant)
    out: dict[str, Any] = {"database": re.sub(r"//[^@/]*@", "//", database)}
    proxy, sessionsFile = startWarm(
        settings, run, registry, load, instance, f"{variant}-main", ["--request-log", "on"]
    )
    out["options"] = proxy.argv[proxy.argv.index("mcpproxy") + 1 :]
    url = f"http://127.0.0.1:{proxy.port}{instance.path()}"
    runs = []
    for method in METHODS:
        for c in LOAD_CONCURRENCY:
            data = measureProxy(load, proxy, url, instance, sessionsFile, method, c, D)
            runs.append(data)
            log(
                f"  {variant} {method} c={c}: {data['rps']:.0f} req/s p50 {data['p50_us'] / 1000:.2f} ms "
                f"p99 {data['p99_us'] / 1000:.2f} ms errors {data['errors']} q/req "
                f"{sum(data['queries_per_request'].values()):.4f} cpu {data['server_cpu_pct']:.0f}%"
            )
    out["runs"] = runs

    # The two targets that compare with another server, in alternating
    # short loads: the machine's speed drifts (it is a shared virtual
    # machine), and a ratio of loads run minutes apart would measure that.
    bareProcess, bareUrl = bare
    S = settings.pair_seconds
    ceiling = pairedRounds(
        settings.pair_rounds,
        {
            "bare": lambda: measured(load, bareProcess.pid, bareUrl, "tools/call", 32, S),
            "proxy": lambda: measureProxy(
                load, proxy, url, instance, sessionsFile, "tools/call", 32, S
            ),
        },
    )
    gap = pairedRounds(
        settings.pair_rounds,
        {
            "direct": lambda: runDirect(settings, 1, S, 0.5),
            "proxy": lambda: measureProxy(
                load, proxy, url, instance, sessionsFile, "tools/call", 1, S
            ),
        },
    )
    out["paired"] = {"ceiling": ceiling, "gap": gap}
    log(
        f"  {variant} paired: proxy/bare c=32 "
        + ", ".join(f"{p['rps'] / b['rps']:.2f}" for p, b in zip(ceiling["proxy"], ceiling["bare"]))
        + "; p50 proxy - direct c=1 "
        + ", ".join(
            f"{(p['p50_us'] - d['p50_us']) / 1000:+.3f}"
            for p, d in zip(gap["proxy"], gap["direct"])
        )
        + " ms"
    )

    # Beyond capacity.
    shedding = []
    for c in settings.beyond:
        data = measureProxy(load, proxy, url, instance, sessionsFile, "tools/call", c, D)
        shedding.append(data)
        log(
            f"  {variant} beyond c={c}: {data['rps']:.0f} req/s p99 {data['p99_us'] / 1000:.0f} ms "
            f"503s {data['status503']} other failures {data['failures_not_503']}"
        )
    out["beyond"] = shedding
    out["proxy_log_warnings"] = _warnings(proxy.logPath)
    proxy.stop()

    out["request_log_ab"] = runRequestLogAb(settings, run, registry, load, instance, variant)
    return out


def runRequestLogAb(
    settings: argparse.Namespace,
    run: Path,
    registry: Registry,
    load: Load,
    instance: Instance,
    variant: str,
) -> dict[str, list[dict[str, Any]]]:
    """
    Request log on against off: two fresh proxies, up at once (the one not
    measured is idle), measured in alternation (ABBA), so that both see the
    same conditions; the cost is the median of the paired ratios.
    """
    ab: dict[str, list[dict[str, Any]]] = {"on": [], "off": [], "on_c1": [], "off_c1": []}
    pair = {}
    for mode in ("on", "off"):
        pair[mode] = startWarm(
            settings, run, registry, load, instance, f"{variant}-log{mode}", ["--request-log", mode]
        )
    try:
        for rnd in range(settings.ab_rounds):
            order = ("on", "off") if rnd % 2 == 0 else ("off", "on")
            for c in (32, 1):
                for mode in order:
                    p, sf = pair[mode]
                    data = measureProxy(
                        load,
                        p,
                        f"http://127.0.0.1:{p.port}{instance.path()}",
                        instance,
                        sf,
                        "tools/call",
                        c,
                        settings.ab_seconds,
                    )
                    data["round"] = rnd
                    ab[mode if c == 32 else mode + "_c1"].append(data)
            log(
                f"  {variant} request log, round {rnd + 1}: c=32 on {ab['on'][-1]['rps']:.0f} / "
                f"off {ab['off'][-1]['rps']:.0f} req/s; c=1 p50 on {ab['on_c1'][-1]['p50_us'] / 1000:.3f} / "
                f"off {ab['off_c1'][-1]['p50_us'] / 1000:.3f} ms"
            )
    finally:
        for p, _ in pair.values():
            p.stop()
    return ab


def runRequestLogOnly(
    settings: argparse.Namespace,
    run: Path,
    registry: Registry,
    load: Load,
    results: dict[str, Any],
) -> dict[str, Any]:
    """
    C{--only request-log}: the request log on against off for each
    database, and nothing else (for working on the log's cost).
    """
    results["only"] = "request-log"
    results["variants"] = {}
    for variant in [v for v in settings.variants.split(",") if v]:
        if variant == "postgresql" and postgresAvailable():
            log("PostgreSQL not reachable, skipped")
            continue
        log(f"request log on against off, {variant}")
        database = databaseUrl(run, registry, variant, "ab")
        instance = Instance(run, database, variant)
        ab = runRequestLogAb(settings, run, registry, load, instance, variant)
        results["variants"][variant] = {"request_log_ab": ab}
        ratios = [a["rps"] / b["rps"] for a, b in zip(ab["on"], ab["off"]) if b["rps"]]
        cpuOn = statistics.median(cpuUs(r) for r in ab["on"])
        cpuOff = statistics.median(cpuUs(r) for r in ab["off"])
        p50 = statistics.median(
            a["p50_us"] - b["p50_us"] for a, b in zip(ab["on_c1"], ab["off_c1"])
        )
        dropped = sum(r.get("requestlog_dropped", 0) for r in ab["on"] + ab["on_c1"])
        log(
            f"  {variant}: c=32 on/off ratios {', '.join(f'{x:.2f}' for x in ratios)}, "
            f"cost {100 * (1 - statistics.median(ratios)):.1f} %; proxy CPU per request "
            f"on {cpuOn:.0f} µs, off {cpuOff:.0f} µs ({100 * (cpuOn / cpuOff - 1):+.1f} %); "
            f"c=1 p50 on - off {p50 / 1000:+.3f} ms; rows dropped {dropped:.0f}"
        )
    return results


def _warnings(path: Path) -> list[str]:
    if not path.exists():
        return []
    lines = [
        line
        for line in path.read_text(errors="replace").splitlines()
        if "#warn]" in line or "#error]" in line or "#critical]" in line or "Traceback" in line
    ]
    return lines[:20]


def runSessionsRss(
    settings: argparse.Namespace, run: Path, registry: Registry, load: Load
) -> dict[str, Any]:
    log("RSS with open sessions")
    database = databaseUrl(run, registry, "sqlite", "sessions")
    instance = Instance(run, database, "sessions")
    proxy = Proxy(
        registry, run, "sessions", database, ["--request-log", "on", "--max-sessions", "20000"]
    )
    checkProxyAnswers(proxy, instance)
    url = f"http://127.0.0.1:{proxy.port}{instance.path()}"
    # Warm: the upstream runs and the caches are filled (stateless calls,
    # so that no session is open yet).
    for method in METHODS:
        load.wrk(url, method, 8, 1, instance.key, "-")
    time.sleep(1.0)
    out: dict[str, Any] = {"options": ["--max-sessions", "20000"], "points": []}
    sessionsFile = run / "sessions-rss.txt"
    opened = 0
    for target in (0, 1000, 10000):
        if target > opened:
            data = openSessions(proxy, instance, target - opened, sessionsFile)
            opened = target
            out.setdefault("open_seconds", []).append(data["seconds"])
        time.sleep(1.0)
        metrics = scrape(proxy.metricsPort)
        point = {
            "sessions": target,
            "sessions_open_metric": metrics.get(
                'mcpproxy_sessions_open{transport="streamable-http"}'
            ),
            "rss_kb": rssKb(proxy.pid),
            "smaps": parseBenchJson(
                subprocess.run(
                    [PYTHON, str(BENCH / "memprofile.py"), "smaps", str(proxy.pid)],
                    capture_output=True,
                    text=True,
                ).stdout
            ),
        }
        out["points"].append(point)
        log(
            f"  {target} sessions: RSS {point['rss_kb'] / 1024:.1f} MB (open: {point['sessions_open_metric']})"
        )
    proxy.stop()
    return out


# -- targets ---------------------------------------------------------------------------


def _find(runs: list[dict[str, Any]], method: str, c: int) -> Optional[dict[str, Any]]:
    for r in runs:
        if r["method"] == method and r["concurrency"] == c:
            return r
    return None


REQUEST_PATH_KINDS = ("lookupApiKey", "loadInstanceConfig")


def evaluate(results: dict[str, Any]) -> list[dict[str, Any]]:
    targets: list[dict[str, Any]] = []
    bare32 = next(r for r in results["bare"] if r["concurrency"] == 32)
    direct1 = next(r for r in results["direct"] if r["concurrency"] == 1)

    def add(
        name: str,
        variant: str,
        measuredText: str,
        met: bool,
        profile: Optional[str] = None,
        **extra: Any,
    ) -> None:
        targets.append(
            {
                "target": name,
                "variant": variant,
                "measured": measuredText,
                "met": met,
                "profile": profile,
                **extra,
            }
        )

    for variant, v in results["variants"].items():
        if "skipped" in v:
            continue
        runs = v["runs"]
        kinds: dict[str, float] = defaultdict(float)
        requests = 0
        for r in runs:
            requests += r["requests"]
            for k, n in r["queries"].items():
                kinds[k] += n
        readPath = sum(kinds.get(k, 0) for k in REQUEST_PATH_KINDS)
        other = {k: n for k, n in kinds.items() if k not in REQUEST_PATH_KINDS}
        otherText = ", ".join(
            f"{k} {n:.0f} ({n / max(requests, 1):.4f}/req)" for k, n in sorted(other.items())
        )
        add(
            "0 database queries per request after warm-up",
            variant,
            f"{readPath:.0f} reads ({'/'.join(REQUEST_PATH_KINDS)}) in {requests} requests; "
            f"off the response path: {otherText or 'none'}",
            readPath == 0,
        )
        call32 = _find(runs, "tools/call", 32)
        assert call32 is not None
        paired = v["paired"]
        shares = [
            p["rps"] / b["rps"]
            for p, b in zip(paired["ceiling"]["proxy"], paired["ceiling"]["bare"])
        ]
        share = statistics.median(shares)
        add(
            "tools/call c=32 (one upstream process) >= 50 % of bare twisted.web",
            variant,
            f"{100 * share:.1f} % (median of {len(shares)} alternating pairs: "
            f"{statistics.median(p['rps'] for p in paired['ceiling']['proxy']):.0f} vs "
            f"{statistics.median(b['rps'] for b in paired['ceiling']['bare']):.0f} req/s); "
            f"{results['duration']:g} s loads: {call32['rps']:.0f} vs {bare32['rps']:.0f} req/s = {100 * call32['rps'] / bare32['rps']:.1f} %",
            share >= 0.5,
            profile="c32",
        )
        call1 = _find(runs, "tools/call", 1)
        assert call1 is not None
        gaps = [
            (p["p50_us"] - d["p50_us"]) / 1000
            for p, d in zip(paired["gap"]["proxy"], paired["gap"]["direct"])
        ]
        gap = statistics.median(gaps)
        add(
            "c=1: p50 at most 0.5 ms above the direct upstream",
            variant,
            f"+{gap:.3f} ms (median of {len(gaps)} alternating pairs: proxy "
            f"{statistics.median(p['p50_us'] for p in paired['gap']['proxy']) / 1000:.3f} ms, direct "
            f"{statistics.median(d['p50_us'] for d in paired['gap']['direct']) / 1000:.3f} ms); "
            f"{results['duration']:g} s loads: {call1['p50_us'] / 1000:.3f} - {direct1['p50_us'] / 1000:.3f} = "
            f"+{(call1['p50_us'] - direct1['p50_us']) / 1000:.3f} ms",
            gap <= 0.5,
            profile="c1",
        )
        p99 = call32["p99_us"] / 1000
        list32 = _find(runs, "tools/list", 32)
        add(
            "p99 <= 5 ms at c=32",
            variant,
            f"tools/call p99 {p99:.1f} ms; tools/list p99 {list32['p99_us'] / 1000:.1f} ms"
            + f" (bare twisted.web: {bare32['p99_us'] / 1000:.1f} ms)",
            p99 <= 5 and list32["p99_us"] / 1000 <= 5,
            profile="c32",
        )
        atCapacity = [r for r in runs if r["concurrency"] <= 128]
        errors = sum(r["errors"] for r in atCapacity)
        total = sum(r["requests"] for r in atCapacity)
        add(
            "no errors at capacity (c <= 128)",
            variant,
            f"{errors} errors in {total} requests",
            errors == 0,
        )
        beyond = v.get("beyond", [])
        if beyond:
            failures = sum(r["failures_not_503"] for r in beyond)
            shed = sum(r["status503"] for r in beyond)
            worst = max(beyond, key=lambda r: r["concurrency"])
            add(
                "beyond capacity: no failures other than 503",
                variant,
                f"c={','.join(str(r['concurrency']) for r in beyond)}: {failures} non-503 failures",
                failures == 0,
            )
            add(
                "beyond capacity: excess load shed with 503",
                variant,
                f"{shed} 503s; at c={worst['concurrency']} p50 {worst['p50_us'] / 1000:.0f} ms, "
                f"p99 {worst['p99_us'] / 1000:.0f} ms (queued, not shed)"
                if shed == 0
                else f"{shed} 503s",
                shed > 0,
                profile="c32",
            )
        ab = v["request_log_ab"]
        on = statistics.median(r["rps"] for r in ab["on"])
        off = statistics.median(r["rps"] for r in ab["off"])
        ratios = [a["rps"] / b["rps"] for a, b in zip(ab["on"], ab["off"]) if b["rps"]]
        cost = 1 - statistics.median(ratios) if ratios else 0.0
        add(
            "request log on costs <= 10 % throughput (tools/call c=32)",
            variant,
            f"median on {on:.0f} req/s, off {off:.0f} req/s; median of {len(ratios)} paired rounds: "
            f"{100 * cost:.1f} % less with the log on",
            cost <= 0.10,
            profile="c32",
        )
    points = {p["sessions"]: p for p in results["sessions_rss"]["points"]}
    for sessions, limit in ((1000, 60), (10000, 100)):
        mb = points[sessions]["rss_kb"] / 1024
        add(
            f"RSS <= {limit} MB with {sessions:,} sessions",
            "sqlite",
            f"{mb:.1f} MB (0 sessions: {points[0]['rss_kb'] / 1024:.1f} MB)",
            mb <= limit,
            profile="memory",
        )
    return targets


def runProfiles(
    settings: argparse.Namespace, run: Path, registry: Registry, load: Load, results: dict[str, Any]
) -> dict[str, Any]:
    wanted = {t["profile"] for t in results["targets"] if not t["met"] and t["profile"]}
    profiles: dict[str, Any] = {}
    if not wanted:
        return profiles
    if ("c32" in wanted or "c1" in wanted) and pyspy() is None:
        profiles["error"] = "py-spy is not installed"
    log(f"profiles: {sorted(wanted)}")
    database = databaseUrl(run, registry, "sqlite", "profile")
    instance = Instance(run, database, "profile")
    proxy, sessionsFile = startWarm(
        settings, run, registry, load, instance, "profile", ["--request-log", "on"]
    )
    seconds = settings.profile_seconds
    try:
        for name, c in (("c32", 32), ("c1", 1)):
            if name in wanted and pyspy() is not None:
                summary = profileUnderLoad(
                    load, proxy, instance, sessionsFile, c, seconds, run / f"profile-{name}.txt"
                )
                if summary:
                    summary["concurrency"] = c
                    summary["seconds"] = seconds
                    profiles[name] = summary
                    log(f"  profile {name}: {summary['samples']} samples")
    finally:
        proxy.stop()
    if "memory" in wanted:
        out = subprocess.run(
            [PYTHON, str(BENCH / "memprofile.py"), "imports"],
            capture_output=True,
            text=True,
            cwd=str(run),
            env=productEnv(),
        )
        profiles["memory_imports"] = parseBenchJson(out.stdout)
        points = results["sessions_rss"]["points"]
        p1, p10 = points[1], points[2]
        profiles["memory_per_session_bytes"] = (
            (p10["rss_kb"] - p1["rss_kb"]) * 1024 / max(p10["sessions"] - p1["sessions"], 1)
        )
    return profiles


# -- the report ---------------------------------------------------------------------------


def ms(us: float) -> str:
    return f"{us / 1000:.2f}"


def mb(kb: float) -> str:
    return f"{kb / 1024:.1f}"


def pct(x: Optional[float]) -> str:
    return "—" if x is None else f"{x:.0f}"


def cpuUs(r: dict[str, Any]) -> float:
    """
    CPU time of the server process per request, in microseconds.
    """
    return r["server_cpu_pct"] / 100.0 / max(r["rps"], 1e-9) * 1e6


def errorsText(r: dict[str, Any]) -> str:
    if not r["errors"]:
        return "0"
    parts = []
    for key, label in (
        ("status503", "503"),
        ("non2xx", "non-2xx"),
        ("rpc_errors", "JSON-RPC"),
        ("tool_errors", "isError"),
        ("timeouts", "timeout"),
        ("connect_errors", "connect"),
        ("read_errors", "read"),
        ("write_errors", "write"),
    ):
        if r.get(key):
            parts.append(f"{r[key]} {label}")
    return f"{r['errors']} ({100 * r['error_rate']:.2f} %: {', '.join(parts)})"


def queriesText(r: dict[str, Any]) -> str:
    q = r.get("queries_per_request") or {}
    if not q:
        return "0"
    return "<br>".join(f"{k} {v:.4f}" for k, v in sorted(q.items()))


def report(results: dict[str, Any]) -> str:
    m = results["machine"]
    lines: list[str] = []
    w = lines.append
    w(
        f"Run of {results['date']}{' (--quick)' if results['quick'] else ''}: "
        f"each load {results['duration']:g} s after {results['warmup']:g} s of warm-up, "
        f"wrk {results['settings']['wrk']}, commit {m['commit']}"
        + (f" with uncommitted changes to {', '.join(m['dirty'])}" if m["dirty"] else "")
        + "."
    )
    w("")
    end = results.get("code_at_end")
    if end and (end["commit"] != m["commit"] or end["dirty"] != m["dirty"]):
        w(
            f"The tree changed during the run (at the end: commit {end['commit']}"
            + (f", uncommitted changes to {', '.join(end['dirty'])}" if end["dirty"] else "")
            + "); every proxy ran the copy of the product code taken at the start."
        )
        w("")
    w("### Machine")
    w("")
    w("| | |")
    w("| --- | --- |")
    w(f"| CPU | {m['cpu']}, {m['cores']} cores (load generator, proxy and upstream share them) |")
    w(f"| memory | {m['memory_gib']} GiB |")
    w(f"| kernel | Linux {m['kernel']} |")
    w(f"| Python | {m['python']} |")
    w(f"| Twisted / Klein | {m['twisted']} / {m['klein']} |")
    w(
        f"| databases | SQLite {m['sqlite']}; PostgreSQL {m['postgresql'] or 'not reachable'} (127.0.0.1) |"
    )
    w(f"| load generator | {m['wrk']} |")
    w("")

    w(
        "CPU % columns are of one core (the machine has "
        f"{m['cores']}); *other CPU %* is what processes outside the benchmark used meanwhile "
        "(the machine may be shared), *CPU µs / request* is the server's CPU time divided by its requests."
    )
    w("")
    allRuns = list(results["bare"]) + list(results["direct"])
    for v in results["variants"].values():
        if "skipped" not in v:
            allRuns += (
                v["runs"] + v["beyond"] + [r for rs in v["request_log_ab"].values() for r in rs]
            )
            allRuns += [r for group in v["paired"].values() for rs in group.values() for r in rs]
    again = [r for r in allRuns if r.get("attempts", 1) > 1]
    disturbed = [r for r in allRuns if r.get("other_cpu_pct", 0) > results.get("max_other_cpu", 25)]
    w(
        f"{len(allRuns)} loads, each started once the machine was quiet (waiting {results.get('quiet_wait', 10):g} s at most); {len(again)} measured again because other processes used more than "
        f"{results.get('max_other_cpu', 25):g} % of a core meanwhile (the least disturbed attempt is kept); "
        f"{len(disturbed)} still above that in the attempt kept (see the *other CPU %* columns)."
    )
    w("")
    w("### Targets")
    w("")
    w("| target | database | measured | verdict |")
    w("| --- | --- | --- | --- |")
    for t in results["targets"]:
        w(
            f"| {t['target']} | {t['variant']} | {t['measured']} | {'MET' if t['met'] else '**NOT MET**'} |"
        )
    w("")

    w("### Ceiling and baseline")
    w("")
    w(
        "| server | c | req/s | mean ms | p50 ms | p95 ms | p99 ms | errors | server CPU % | server CPU µs / request | wrk CPU % | other CPU % |"
    )
    w("| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: |")
    for r in results["bare"]:
        w(
            f"| bare twisted.web (bench/bare_server.py) | {r['concurrency']} | {r['rps']:.0f} | {ms(r['lat_mean_us'])} | {ms(r['p50_us'])} | {ms(r['p95_us'])} | {ms(r['p99_us'])} | {errorsText(r)} | {pct(r['server_cpu_pct'])} | {cpuUs(r):.0f} | {pct(r['wrk_cpu_pct'])} | {pct(r['other_cpu_pct'])} |"
        )
    for r in results["direct"]:
        w(
            f"| echo_server.py over stdio, direct (bench/direct.py) | {r['concurrency']} | {r['rps']:.0f} | {r['lat_mean_us'] / 1000:.3f} | {r['p50_us'] / 1000:.3f} | {r['p95_us'] / 1000:.3f} | {r['p99_us'] / 1000:.3f} | {r['errors']} | {pct(r['client_and_upstream_cpu_pct'])} (client and upstream) | — | — | {pct(r['other_cpu_pct'])} |"
        )
    w("")

    for variant, v in results["variants"].items():
        w(f"### The proxy on {variant}")
        w("")
        if "skipped" in v:
            w(f"Skipped: {v['skipped']}")
            w("")
            continue
        w(
            f"`twistd -n mcpproxy {' '.join(o for o in v['options'])}` (database {v['database']}); "
            f"API key in `X-API-Key`, requests spread over {SESSIONS_FOR_LOAD} sessions opened with `initialize`."
        )
        w("")
        w(
            "| method | c | req/s | mean ms | p50 ms | p95 ms | p99 ms | errors | DB queries / request | RSS MB before → after | proxy CPU % | proxy CPU µs / request | upstream CPU % | wrk CPU % | other CPU % | request-log rows dropped |"
        )
        w(
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"
        )
        for r in v["runs"]:
            w(
                f"| {r['method']} | {r['concurrency']} | {r['rps']:.0f} | {ms(r['lat_mean_us'])} | {ms(r['p50_us'])} | {ms(r['p95_us'])} | {ms(r['p99_us'])} | {errorsText(r)} | {queriesText(r)} | {mb(r['rss_before_kb'])} → {mb(r['rss_after_kb'])} | {pct(r['server_cpu_pct'])} | {cpuUs(r):.0f} | {pct(r['upstream_cpu_pct'])} | {pct(r['wrk_cpu_pct'])} | {pct(r['other_cpu_pct'])} | {r.get('requestlog_dropped', 0):.0f} |"
            )
        w("")
        pc, pg = v["paired"]["ceiling"], v["paired"]["gap"]
        w(
            f"Alternating short loads ({results['pair_seconds']:g} s each, tools/call) for the two targets that compare with another server:"
        )
        w("")
        w(
            "| round | bare c=32 req/s | proxy c=32 req/s | proxy ÷ bare | direct c=1 p50 ms | proxy c=1 p50 ms | proxy - direct ms |"
        )
        w("| ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
        for i, (b, p, d, q) in enumerate(zip(pc["bare"], pc["proxy"], pg["direct"], pg["proxy"])):
            w(
                f"| {i + 1} | {b['rps']:.0f} | {p['rps']:.0f} | {p['rps'] / b['rps']:.2f} | {d['p50_us'] / 1000:.3f} | {q['p50_us'] / 1000:.3f} | {(q['p50_us'] - d['p50_us']) / 1000:+.3f} |"
            )
        w("")
        w("Beyond capacity (tools/call):")
        w("")
        w(
            "| c | req/s | p50 ms | p99 ms | max ms | 503 | other failures | RSS MB before → after | request-log rows dropped |"
        )
        w("| ---: | ---: | ---: | ---: | ---: | ---: | --- | --- | ---: |")
        for r in v["beyond"]:
            other = dict(r)
            other["errors"] = r["failures_not_503"]
            other["status503"] = 0
            w(
                f"| {r['concurrency']} | {r['rps']:.0f} | {ms(r['p50_us'])} | {ms(r['p99_us'])} | {ms(r['lat_max_us'])} | {r['status503']} | {errorsText(other) if r['failures_not_503'] else '0'} | {mb(r['rss_before_kb'])} → {mb(r['rss_after_kb'])} | {r.get('requestlog_dropped', 0):.0f} |"
            )
        w("")
        ab = v["request_log_ab"]
        w(
            f"Request log on against off (tools/call; two fresh proxies, measured in alternation, "
            f"{len(ab['on'])} rounds of {results['ab_seconds']:g} s per load):"
        )
        w("")
        w(
            "| request log | c | runs: req/s | median req/s | p50 ms (median) | p99 ms (median) | proxy CPU % | proxy CPU µs / request | other CPU % (max) | DB queries / request |"
        )
        w("| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
        for mode in ("on", "off", "on_c1", "off_c1"):
            rs = ab.get(mode) or []
            if not rs:
                continue
            each = ", ".join("{:.0f}".format(r["rps"]) for r in rs)
            cpuPerRequest = statistics.median(cpuUs(r) for r in rs)
            w(
                f"| {mode.split('_')[0]} | {rs[0]['concurrency']} | {each} | {statistics.median(r['rps'] for r in rs):.0f} | {ms(statistics.median(r['p50_us'] for r in rs))} | {ms(statistics.median(r['p99_us'] for r in rs))} | {pct(statistics.median(r['server_cpu_pct'] for r in rs))} | {cpuPerRequest:.0f} | {max(r['other_cpu_pct'] for r in rs):.0f} | {queriesText(rs[-1])} |"
            )
        ratios = [a["rps"] / b["rps"] for a, b in zip(ab["on"], ab["off"]) if b["rps"]]
        gaps = [(a["p50_us"] - b["p50_us"]) / 1000 for a, b in zip(ab["on_c1"], ab["off_c1"])]
        if ratios:
            w("")
            w(
                f"Paired rounds, on ÷ off at c=32: {', '.join(f'{x:.2f}' for x in ratios)} "
                f"(median {statistics.median(ratios):.2f}); p50 on - off at c=1: "
                f"{', '.join(f'{x:+.3f}' for x in gaps)} ms (median {statistics.median(gaps):+.3f} ms)."
            )
        w("")
        if v.get("proxy_log_warnings"):
            w("Warnings in the proxy's log:")
            w("")
            w("```")
            lines.extend(v["proxy_log_warnings"])
            w("```")
            w("")

    s = results["sessions_rss"]
    w("### RSS with open sessions")
    w("")
    w(
        f"A fresh proxy (SQLite, request log on, `{' '.join(s['options'])}`), warmed with 1 s of tools/call and tools/list "
        "without sessions; sessions opened with `initialize` + `notifications/initialized` (4 keep-alive connections)."
    )
    w("")
    w("| sessions open | /metrics sessions_open | RSS MB | anonymous (heap) MB |")
    w("| ---: | ---: | ---: | ---: |")
    for p in s["points"]:
        anon = next((kb for n, kb in p["smaps"]["rows"] if n.startswith("anonymous")), 0)
        w(
            f"| {p['sessions']:,} | {p['sessions_open_metric']:.0f} | {mb(p['rss_kb'])} | {mb(anon)} |"
        )
    w("")

    profiles = results.get("profiles") or {}
    if profiles:
        w("### Profiles (for the targets NOT MET)")
        w("")
        for name in ("c32", "c1"):
            p = profiles.get(name)
            if not p:
                continue
            w(
                f"#### py-spy --gil, tools/call at c={p['concurrency']} (SQLite, request log on), {p['seconds']:g} s at 200 Hz"
            )
            w("")
            w(
                f"Each sample is the thread holding the GIL: {p['samples']} of {p['slots']} sample slots "
                f"({p['gil_held_pct']:.0f} %) had one. By thread: "
                + ", ".join(f"{t} {100 * n / max(p['samples'], 1):.1f} %" for t, n in p["threads"])
                + f". Percentages below are of the {p['samples']} samples. Raw stacks: `{Path(p['raw']).name}` in the run folder."
            )
            w("")
            total = max(p["samples"], 1)
            w("Own time by file (leaf frames):")
            w("")
            w("```")
            for f, n in p["self_by_file"]:
                w(f"{100 * n / total:5.1f} %  {f}")
            w("```")
            w("")
            w("Own time by function (leaf frames):")
            w("")
            w("```")
            for f, n in p["self_by_function"]:
                w(f"{100 * n / total:5.1f} %  {f}")
            w("```")
            w("")
            w(
                "Inclusive time, below the reactor loop (frames in 95 % or more of the reactor thread's samples left out):"
            )
            w("")
            w("```")
            for f, n in p["inclusive"]:
                w(f"{100 * n / total:5.1f} %  {f}")
            w("```")
            w("")
            w("Inclusive time of the proxy's own frames (mcp_proxy/):")
            w("")
            w("```")
            for f, n in p["inclusive_mcp_proxy"]:
                w(f"{100 * n / total:5.1f} %  {f}")
            w("```")
            w("")
            if p.get("other_threads"):
                w("Threads other than the reactor's, own time by function:")
                w("")
                w("```")
                for t, leaves in p["other_threads"].items():
                    w(f"{t}:")
                    for f, n in leaves:
                        w(f"  {100 * n / total:5.1f} %  {f}")
                w("```")
                w("")
        if "memory_imports" in profiles:
            mi = profiles["memory_imports"]
            w("#### Memory: what the RSS is made of")
            w("")
            w(
                f"Per open session: {profiles['memory_per_session_bytes']:.0f} bytes of RSS (from 1,000 to 10,000 sessions)."
            )
            w("")
            p10 = s["points"][-1]
            w(
                f"RSS by mapping of the proxy with {p10['sessions']:,} sessions (/proc/PID/smaps, top 12):"
            )
            w("")
            w("```")
            for n, kb in p10["smaps"]["rows"][:12]:
                w(f"{kb / 1024:7.1f} MB  {n}")
            w("```")
            w("")
            w(
                f"RSS added by each import, in start-up order, in a fresh interpreter (total {mi['total_kb'] / 1024:.1f} MB, {mi['modules']} modules):"
            )
            w("")
            w("```")
            for name, kb, count in mi["rows"]:
                w(f"{kb / 1024:6.1f} MB  {count:4d} modules  {name}")
            w("```")
            w("")
    return "\n".join(lines) + "\n"


def writeDoc(body: str, results: dict[str, Any]) -> None:
    head = (
        "# Performance\n\n"
        "`bench/run` measures the proxy end to end (`bench/run --quick` for a short run); "
        "bench/README.md says what it does. The part between the markers below is written "
        "by it: the latest run's machine, results, targets and profiles.\n\n"
    )
    block = f"{BEGIN}\n\n## Latest results\n\n{body}\n{END}\n"
    if DOC.exists():
        text = DOC.read_text()
        if BEGIN in text and END in text:
            before = text.split(BEGIN, 1)[0]
            after = text.split(END, 1)[1]
            DOC.write_text(before + block + after.lstrip("\n"))
            return
        DOC.write_text(text.rstrip("\n") + "\n\n" + block)
        return
    DOC.write_text(head + block)


def main() -> None:
    parser = argparse.ArgumentParser(description="mcp-proxy benchmark (use bench/run)")
    sub = parser.add_subparsers(dest="command", required=True)
    runP = sub.add_parser("run")
    runP.add_argument("--run-dir", required=True)
    runP.add_argument("--quick", action="store_true")
    runP.add_argument("--duration", type=float)
    runP.add_argument("--warmup", type=float)
    runP.add_argument("--variants", default="sqlite,postgresql")
    runP.add_argument("--beyond", default=None, help="concurrencies beyond capacity, e.g. 512,2048")
    runP.add_argument("--ab-rounds", type=int, help="rounds of request log on/off loads")
    runP.add_argument(
        "--pair-rounds",
        type=int,
        help="rounds of the alternating proxy/bare and proxy/direct loads",
    )
    runP.add_argument("--pair-seconds", type=float, help="seconds of each alternating load")
    runP.add_argument("--ab-seconds", type=float, help="seconds of each request log on/off load")
    runP.add_argument("--timeout", type=int, default=10, help="wrk's request timeout (s)")
    runP.add_argument(
        "--max-other-cpu",
        type=float,
        default=25.0,
        help="measure again when other processes used more CPU %% than this meanwhile",
    )
    runP.add_argument(
        "--budget",
        type=float,
        help="seconds that waiting for a quiet machine and measuring again may add",
    )
    runP.add_argument(
        "--quiet-wait",
        type=float,
        default=5.0,
        help="seconds to wait for a quiet machine before a load",
    )
    runP.add_argument("--profile-seconds", type=float)
    runP.add_argument("--no-profile", action="store_true")
    runP.add_argument("--no-doc", action="store_true", help="do not update docs/performance.md")
    runP.add_argument("--wrk", default=shutil.which("wrk") or "wrk")
    runP.add_argument(
        "--only",
        choices=["request-log"],
        help="measure only this part (results.json only; no report, docs/performance.md untouched)",
    )
    reportP = sub.add_parser(
        "report", help="write latest.md and docs/performance.md again from a results.json"
    )
    reportP.add_argument("results")
    reportP.add_argument("--no-doc", action="store_true")
    cleanP = sub.add_parser("cleanup")
    cleanP.add_argument("run_dir")
    args = parser.parse_args()
    if args.command == "report":
        path = Path(args.results)
        publish(json.loads(path.read_text()), path.parent, args.no_doc)
        return
    if args.command == "cleanup":
        cleanupRun(Path(args.run_dir))
        return

    quick = args.quick
    args.duration = args.duration or (3.0 if quick else 10.0)
    args.warmup = args.warmup or (1.0 if quick else 2.0)
    args.ab_rounds = args.ab_rounds or (2 if quick else 4)
    args.pair_rounds = args.pair_rounds or (2 if quick else 4)
    args.pair_seconds = args.pair_seconds or (2.0 if quick else 3.0)
    args.ab_seconds = args.ab_seconds or (2.0 if quick else 4.0)
    args.profile_seconds = args.profile_seconds or (3.0 if quick else 8.0)
    args.budget = args.budget if args.budget is not None else (10.0 if quick else 60.0)
    args.beyond = [
        int(x) for x in (args.beyond or ("1024" if quick else "512,2048")).split(",") if x
    ]
    run = Path(args.run_dir)
    run.mkdir(parents=True, exist_ok=True)
    global LOGFILE
    LOGFILE = run / "bench.log"

    def terminate(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, terminate)
    signal.signal(signal.SIGINT, terminate)
    registry = Registry(run)
    started = time.monotonic()
    try:
        results = runBench(args, run, registry)
    finally:
        registry.cleanup()
    results["code_at_end"] = dict(zip(("commit", "dirty"), codeVersion()))
    results["elapsed_s"] = round(time.monotonic() - started, 1)
    results["extra_s"] = round(EXTRA["seconds"], 1)
    (run / "results.json").write_text(json.dumps(results, indent=1))
    if args.only:
        log(f"done in {results['elapsed_s']:.0f} s: {run / 'results.json'}")
        return
    publish(results, run, args.no_doc)


def publish(results: dict[str, Any], run: Path, noDoc: bool) -> None:
    """
    Write bench/results/latest.md and .json, and docs/performance.md.
    """
    body = report(results)
    resultsDir = BENCH / "results"
    resultsDir.mkdir(exist_ok=True)
    (resultsDir / "latest.json").write_text(json.dumps(results, indent=1))
    title = "# mcp-proxy benchmark: latest run\n\n"
    (resultsDir / "latest.md").write_text(
        title
        + body
        + f"\nThe run took {results['elapsed_s']:.0f} s ({results['extra_s']:.0f} s of it waiting for a quiet machine or measuring again); raw data: {run}/results.json\n"
    )
    if not noDoc:
        writeDoc(body, results)
    log(f"done in {results['elapsed_s']:.0f} s: {resultsDir / 'latest.md'}")
    for t in results["targets"]:
        log(
            f"  {'MET    ' if t['met'] else 'NOT MET'}  [{t['variant']}] {t['target']}: {t['measured']}"
        )


if __name__ == "__main__":
    main()
