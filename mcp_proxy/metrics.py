"""
Prometheus metrics of one proxy.

A L{Metrics} is owned by the service and has its own
C{CollectorRegistry}, so two proxies in one process never share a series.
Two kinds of metric live in it:

  - Measured on the request path, as cheaply as possible: request latency
    and outcome (L{Metrics.observeRequest}, one call per request) and the
    latency of upstream calls (L{Metrics.observeUpstreamCall}).
  - Read at scrape time from the counters the other parts keep anyway
    (repository query counts, cache and loader stats, sessions, the
    upstream pool, the request log, the process): nothing is added to
    their hot paths.  Every source is optional; see L{Metrics.watch}.

Exposition runs in the reactor thread (L{Metrics.render}), so the sources'
plain C{dict}s are read while nothing changes them.
L{prometheus_client.twisted.MetricsResource} is not used: it renders in a
thread-pool thread.

Access: L{metricsResponse} answers C{GET /metrics} with an optional bearer
token; L{metricsResource} is a twisted.web resource for a separate
listening endpoint; L{instrumentFront} wraps the MCP front's resource to
count HTTP-level errors (and may serve C{/metrics} on the same port).
"""

from __future__ import annotations

import hmac
import time
from bisect import bisect_left
from typing import Any, Callable, Iterable, Mapping, Optional, Protocol

from attrs import define, field
from prometheus_client import CollectorRegistry, Gauge
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString
from twisted.internet.defer import CancelledError, Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest
from twisted.web.resource import IResource, Resource, getChildForRequest

from mcp_proxy import __version__
from mcp_proxy.dispatch import CallContext, Dispatcher
from mcp_proxy.logs import logRequest, requestContextOf, requestIdFor, runInRequestContext
from mcp_proxy.models import UpstreamConfig
from mcp_proxy.upstream import UpstreamTimeout

log = Logger(namespace="mcp_proxy.metrics")

#: Latency buckets (seconds) of requests and upstream calls: from well under
#: a millisecond (a cached tools/list) to the default upstream timeout.
LATENCY_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
)

OK = "ok"
ERROR = "error"
HTTP_ERROR = "http_error"
OUTCOMES = (OK, ERROR, HTTP_ERROR)
TIMEOUT = "timeout"
CANCELLED = "cancelled"
UPSTREAM_OUTCOMES = (OK, ERROR, TIMEOUT, CANCELLED)

#: The C{method} label for a request whose JSON-RPC method is not known
#: (an HTTP error before the body was read).
NO_METHOD = "none"
#: The C{method} label for a method name that is not an MCP method: the
#: label's values must not be chosen by clients.
OTHER_METHOD = "other"

#: The MCP methods (2024-11-05 to 2025-11-25) that get a label of their own.
MCP_METHODS = (
    "initialize",
    "ping",
    "tools/list",
    "tools/call",
    "resources/list",
    "resources/templates/list",
    "resources/read",
    "resources/subscribe",
    "resources/unsubscribe",
    "prompts/list",
    "prompts/get",
    "completion/complete",
    "logging/setLevel",
    "server/discover",
    "tasks/get",
    "tasks/result",
    "tasks/list",
    "tasks/cancel",
    "sampling/createMessage",
    "elicitation/create",
    "roots/list",
)

_METHOD_LABELS: dict[Optional[str], str] = {m: m for m in MCP_METHODS}
_METHOD_LABELS[None] = NO_METHOD

STREAMABLE_HTTP = "streamable-http"
SSE = "sse"

#: Transport names as the front (L{CallContext.transport}) and the session
#: table (L{mcp_proxy.session}) spell them, to one label vocabulary.
_TRANSPORT_LABELS: dict[Optional[str], str] = {
    "STREAMABLE_HTTPS": STREAMABLE_HTTP,
    STREAMABLE_HTTP: STREAMABLE_HTTP,
    "SSE": SSE,
    SSE: SSE,
}

#: The first path segment of the MCP front's routes, to a transport label.
_PATH_TRANSPORTS = {b"mcp": STREAMABLE_HTTP, b"sse": SSE, b"messages": SSE}

#: Stats keys of an L{mcp_proxy.interfaces.ICache}, to metric name and help.
_CACHE_STATS = {
    "hits": ("mcpproxy_cache_hits", "Cache reads that found a live entry."),
    "misses": ("mcpproxy_cache_misses", "Cache reads that found nothing (or an expired entry)."),
    "sets": ("mcpproxy_cache_sets", "Entries stored."),
    "evictions": ("mcpproxy_cache_evictions", "Live entries evicted to make room (LRU)."),
    "expirations": ("mcpproxy_cache_expirations", "Expired entries dropped."),
    "deletes": ("mcpproxy_cache_deletes", "Entries removed by invalidation."),
    "errors": ("mcpproxy_cache_errors", "Cache backend errors (shared backends)."),
    "undecodable": ("mcpproxy_cache_undecodable", "Entries that could not be decoded."),
}

#: Stats keys of the API-key authenticator and the config loader.
_LOADER_STATS = {
    "requests": ("requests", "Lookups asked for."),
    "cacheHits": ("cache_hits", "Lookups answered from the cache."),
    "lookups": ("db_lookups", "Lookups that went to the database."),
    "coalesced": ("coalesced", "Lookups that joined one already in flight."),
    "dbErrors": ("db_errors", "Lookups that failed on a database error."),
    "refused": ("refused", "API keys refused (unknown, inactive, expired, wrong instance)."),
    "touches": ("touches", "lastUsedAt updates sent."),
}

_SESSION_STATS = {
    "created": ("mcpproxy_sessions_created", "Sessions opened."),
    "closed": ("mcpproxy_sessions_closed", "Sessions closed, expiries included."),
    "expired": ("mcpproxy_sessions_expired", "Sessions closed for inactivity."),
    "rejected": ("mcpproxy_sessions_rejected", "Sessions refused at capacity."),
}

_POOL_COUNTERS = {
    "starts": ("mcpproxy_upstream_starts", "Upstream processes or connections started."),
    "restarts": ("mcpproxy_upstream_restarts", "Upstreams started again after a failure."),
    "failures": ("mcpproxy_upstream_failures", "Upstream start failures and crashes."),
}

_REQUEST_LOG_COUNTERS = {
    "queued": ("mcpproxy_requestlog_queued", "Request-log rows queued for writing."),
    "written": ("mcpproxy_requestlog_written", "Request-log rows written to the database."),
    "dropped": ("mcpproxy_requestlog_dropped", "Request-log rows dropped (queue full)."),
    "failedWrites": ("mcpproxy_requestlog_failed_writes", "Request-log batch writes that failed."),
}

#: Exported when the request log has them.
_OPTIONAL_REQUEST_LOG_COUNTERS = {
    "refused": ("mcpproxy_requestlog_refused", "Request-log rows the database refused for good."),
}


def methodLabel(method: Optional[str]) -> str:
    """
    The C{method} label of a JSON-RPC method name: itself for an MCP
    method, L{NO_METHOD} for C{None}, L{OTHER_METHOD} for anything else.
    """
    return _METHOD_LABELS.get(method, OTHER_METHOD)


def transportLabel(transport: Optional[str]) -> str:
    """
    The C{transport} label: C{"streamable-http"}, C{"sse"} or C{"other"}.
    """
    return _TRANSPORT_LABELS.get(transport, "other")


_RESPONSE_PREFIX = b'{"jsonrpc":"2.0","id":'


def responseOutcome(body: bytes) -> str:
    """
    L{OK} or L{ERROR} for one encoded JSON-RPC response of
    L{mcp_proxy.jsonrpc}.

    Those are compact JSON with the members C{jsonrpc}, C{id}, then
    C{result} or C{error}.  The id is a number, C{null} or a string, so
    only the id is scanned (the end of a string is its first C{"} after an
    even number of backslashes), never the result.
    """
    if not body.startswith(_RESPONSE_PREFIX):
        return ERROR
    start = len(_RESPONSE_PREFIX)
    if body.startswith(b'"', start):
        end = start + 1
        while True:
            end = body.find(b'"', end)
            if end < 0:
                return ERROR
            backslashes = 0
            while body[end - 1 - backslashes] == 0x5C:
                backslashes += 1
            if backslashes % 2 == 0:
                break
            end += 1
        end += 1
    else:
        end = body.find(b",", start)
        if end < 0:
            return ERROR
    return OK if body.startswith(b',"result":', end) else ERROR


# -- sources read at scrape time ------------------------------------------------


class HasQueryCounts(Protocol):
    """
    A repository: L{mcp_proxy.interfaces.IRepository.queryCounts}.
    """

    queryCounts: dict[str, int]


class HasStats(Protocol):
    """
    A cache, the authenticator, the config loader, the session table.
    """

    stats: dict[str, int]


class HasSessionCounts(Protocol):
    """
    The session table.
    """

    stats: dict[str, int]

    def counts(self) -> dict[str, int]: ...


class HasUpstreamHealth(Protocol):
    """
    The upstream pool.
    """

    counters: dict[str, dict[str, int]]

    def health(self) -> list[dict[str, Any]]: ...


class RequestLogCounters(Protocol):
    """
    The request log: its counters, as plain integers (attributes or
    properties).
    """

    @property
    def queued(self) -> int: ...

    @property
    def written(self) -> int: ...

    @property
    def dropped(self) -> int: ...

    @property
    def failedWrites(self) -> int: ...

    @property
    def queueDepth(self) -> int: ...


def _number(value: Any) -> float:
    """
    A counter's value: an attribute, a property, or a method of no
    arguments.
    """
    if callable(value):
        value = value()
    return float(value)


@define
class Sources:
    """
    What the scrape-time collector reads; any may be C{None}.

    @ivar caches: cache name (the C{cache} label) to an
        L{mcp_proxy.interfaces.ICache}.
    """

    repository: Optional[HasQueryCounts] = None
    authenticator: Optional[HasStats] = None
    configLoader: Optional[HasStats] = None
    caches: dict[str, HasStats] = field(factory=dict)
    sessions: Optional[HasSessionCounts] = None
    pool: Optional[HasUpstreamHealth] = None
    requestLog: Optional[RequestLogCounters] = None


class _SourceCollector(Collector):
    """
    Turns the counters of the L{Sources} into metric families at scrape
    time.  A source that fails is logged and left out of that scrape;
    the others are still exported.
    """

    def __init__(self, sources: Sources) -> None:
        self._sources = sources
        self.errors: dict[str, int] = {}

    def describe(self) -> Iterable[Metric]:
        # The families are known only at scrape time; describing none keeps
        # registration from calling collect().
        return []

    def collect(self) -> Iterable[Metric]:
        sources = self._sources
        families: list[Metric] = []
        for name, part in (
            ("repository", self._repository),
            ("caches", self._caches),
            ("authenticator", self._authenticator),
            ("configLoader", self._configLoader),
            ("sessions", self._sessions),
            ("pool", self._pool),
            ("requestLog", self._requestLog),
        ):
            if name == "caches":
                present = bool(sources.caches)
            else:
                present = getattr(sources, name) is not None
            if not present:
                continue
            try:
                families.extend(part())
            except Exception:
                self.errors[name] = self.errors.get(name, 0) + 1
                log.failure("reading the {source} metrics failed", source=name)
        errors = CounterMetricFamily(
            "mcpproxy_metrics_collect_errors",
            "Scrapes in which reading a source failed (it was left out).",
            labels=["source"],
        )
        for name, count in sorted(self.errors.items()):
            errors.add_metric([name], count)
        families.append(errors)
        return families

    def _repository(self) -> list[Metric]:
        repository = self._sources.repository
        assert repository is not None
        queries = CounterMetricFamily(
            "mcpproxy_db_queries",
            "Statements sent to the database, by query kind.",
            labels=["kind"],
        )
        for kind, count in sorted(repository.queryCounts.items()):
            queries.add_metric([kind], count)
        return [queries]

    def _caches(self) -> list[Metric]:
        families = {
            key: CounterMetricFamily(name, help, labels=["cache"])
            for key, (name, help) in _CACHE_STATS.items()
        }
        entries = GaugeMetricFamily(
            "mcpproxy_cache_entries",
            "Entries held (expired ones not yet dropped included).",
            labels=["cache"],
        )
        seen: set[str] = set()
        for cacheName, cache in sorted(self._sources.caches.items()):
            for key, count in cache.stats.items():
                family = families.get(key)
                if family is not None:
                    family.add_metric([cacheName], count)
                    seen.add(key)
            if hasattr(cache, "__len__"):
                entries.add_metric([cacheName], len(cache))  # type: ignore[arg-type]
        out: list[Metric] = [families[key] for key in _CACHE_STATS if key in seen]
        if entries.samples:
            out.append(entries)
        return out

    def _loader(self, prefix: str, what: str, loader: HasStats) -> list[Metric]:
        out: list[Metric] = []
        for key, count in loader.stats.items():
            known = _LOADER_STATS.get(key)
            if known is None:
                continue
            suffix, help = known
            out.append(CounterMetricFamily(f"{prefix}_{suffix}", f"{what}: {help}", value=count))
        return out

    def _authenticator(self) -> list[Metric]:
        assert self._sources.authenticator is not None
        return self._loader("mcpproxy_auth", "API keys", self._sources.authenticator)

    def _configLoader(self) -> list[Metric]:
        assert self._sources.configLoader is not None
        return self._loader(
            "mcpproxy_config", "Instance configurations", self._sources.configLoader
        )

    def _sessions(self) -> list[Metric]:
        sessions = self._sources.sessions
        assert sessions is not None
        open_ = GaugeMetricFamily(
            "mcpproxy_sessions_open", "Open MCP sessions, by transport.", labels=["transport"]
        )
        for transport, count in sorted(sessions.counts().items()):
            open_.add_metric([transportLabel(transport)], count)
        out: list[Metric] = [open_]
        for key, (name, help) in _SESSION_STATS.items():
            if key in sessions.stats:
                out.append(CounterMetricFamily(name, help, value=sessions.stats[key]))
        return out

    def _pool(self) -> list[Metric]:
        pool = self._sources.pool
        assert pool is not None
        running: dict[str, int] = {}
        starting: dict[str, int] = {}
        inFlight: dict[str, int] = {}
        for name in pool.counters:
            running[name] = starting[name] = inFlight[name] = 0
        for entry in pool.health():
            name = entry["name"]
            running[name] = running.get(name, 0) + len(entry["pids"])
            starting[name] = starting.get(name, 0) + entry["starting"]
            inFlight[name] = inFlight.get(name, 0) + entry["inFlight"]
        out: list[Metric] = []
        for metric, help, values in (
            (
                "mcpproxy_upstream_running",
                "Live upstream processes (stdio) or sessions (remote), by config name.",
                running,
            ),
            ("mcpproxy_upstream_starting", "Upstreams starting, by config name.", starting),
            ("mcpproxy_upstream_in_flight", "Upstream requests awaiting an answer.", inFlight),
        ):
            family = GaugeMetricFamily(metric, help, labels=["upstream"])
            for name in sorted(values):
                family.add_metric([name], values[name])
            out.append(family)
        for key, (metric, help) in _POOL_COUNTERS.items():
            counter = CounterMetricFamily(metric, help, labels=["upstream"])
            for name, counters in sorted(pool.counters.items()):
                counter.add_metric([name], counters.get(key, 0))
            out.append(counter)
        return out

    def _requestLog(self) -> list[Metric]:
        requestLog = self._sources.requestLog
        assert requestLog is not None
        out: list[Metric] = [
            GaugeMetricFamily(
                "mcpproxy_requestlog_queue_depth",
                "Request-log rows waiting to be written.",
                value=_number(requestLog.queueDepth),
            )
        ]
        for attribute, (name, help) in _REQUEST_LOG_COUNTERS.items():
            out.append(
                CounterMetricFamily(name, help, value=_number(getattr(requestLog, attribute)))
            )
        for attribute, (name, help) in _OPTIONAL_REQUEST_LOG_COUNTERS.items():
            value = getattr(requestLog, attribute, None)
            if value is not None:
                out.append(CounterMetricFamily(name, help, value=_number(value)))
        return out


class CallUpstream(Protocol):
    """
    The upstream pool's C{call} (L{mcp_proxy.router.CallUpstream}).
    """

    def __call__(
        self,
        instanceId: str,
        config: UpstreamConfig,
        method: str,
        params: Optional[dict[str, Any]],
        timeout: float,
    ) -> Deferred[Any]: ...


#: (method label, transport label, outcome, HTTP status or None)
RequestKey = tuple[str, str, str, Optional[int]]
#: (config name, method label, outcome)
UpstreamKey = tuple[str, str, str]


def _newCell() -> list[float]:
    # One count per bucket of LATENCY_BUCKETS, one for +Inf, then the sum.
    return [0] * (len(LATENCY_BUCKETS) + 1) + [0.0]


class _LatencyCollector(Collector):
    """
    Exports the cells of L{Metrics.observeRequest} and
    L{Metrics.observeUpstreamCall}: per label set, a histogram (summed over
    outcomes) and a counter by outcome.
    """

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def describe(self) -> Iterable[Metric]:
        return [
            HistogramMetricFamily(
                "mcpproxy_request_duration_seconds", "", labels=["method", "transport"]
            ),
            CounterMetricFamily(
                "mcpproxy_requests", "", labels=["method", "transport", "outcome", "status"]
            ),
            HistogramMetricFamily(
                "mcpproxy_upstream_call_duration_seconds", "", labels=["upstream", "method"]
            ),
            CounterMetricFamily(
                "mcpproxy_upstream_calls", "", labels=["upstream", "method", "outcome"]
            ),
        ]

    def collect(self) -> Iterable[Metric]:
        metrics = self._metrics
        durations: dict[tuple[str, ...], list[float]] = {}
        counts: dict[tuple[str, ...], float] = {}
        for (method, transport, outcome, status), cell in metrics._requestCells.items():
            statusLabel = str(status) if outcome == HTTP_ERROR and status is not None else ""
            _add(durations, (method, transport), cell)
            labels = (method, transport, outcome, statusLabel)
            counts[labels] = counts.get(labels, 0) + sum(cell[:-1])
        yield _histogram(
            "mcpproxy_request_duration_seconds",
            "Time to answer an MCP request, by method and transport.",
            ["method", "transport"],
            durations,
        )
        yield _counter(
            "mcpproxy_requests",
            "MCP requests by method, transport and outcome (ok; error: a JSON-RPC "
            "error answer; http_error: an HTTP error status, given in status).",
            ["method", "transport", "outcome", "status"],
            counts,
        )
        durations = {}
        counts = {}
        for (upstream, method, outcome), cell in metrics._upstreamCells.items():
            _add(durations, (upstream, method), cell)
            counts[(upstream, method, outcome)] = sum(cell[:-1])
        yield _histogram(
            "mcpproxy_upstream_call_duration_seconds",
            "Time of a call to an upstream (its start included when it had to "
            "start), by config name and method.",
            ["upstream", "method"],
            durations,
        )
        yield _counter(
            "mcpproxy_upstream_calls",
            "Calls to upstreams by config name, method and outcome (ok, error, "
            "timeout, cancelled).",
            ["upstream", "method", "outcome"],
            counts,
        )


_BUCKET_LABELS = [floatToGoString(b) for b in LATENCY_BUCKETS] + ["+Inf"]


def _add(
    into: dict[tuple[str, ...], list[float]], labels: tuple[str, ...], cell: list[float]
) -> None:
    total = into.get(labels)
    if total is None:
        into[labels] = list(cell)
    else:
        for i, value in enumerate(cell):
            total[i] += value


def _histogram(
    name: str, help: str, labels: list[str], cells: dict[tuple[str, ...], list[float]]
) -> Metric:
    family = HistogramMetricFamily(name, help, labels=labels)
    for labelValues, cell in sorted(cells.items()):
        cumulative = 0.0
        buckets = []
        for bound, count in zip(_BUCKET_LABELS, cell[:-1]):
            cumulative += count
            buckets.append((bound, cumulative))
        family.add_metric(list(labelValues), buckets, cell[-1])
    return family


def _counter(
    name: str, help: str, labels: list[str], counts: dict[tuple[str, ...], float]
) -> Metric:
    family = CounterMetricFamily(name, help, labels=labels)
    for labelValues, count in sorted(counts.items()):
        family.add_metric(list(labelValues), count)
    return family


class Metrics:
    """
    The metrics of one proxy, in a registry of its own.

    Latencies are kept in plain lists, without locks: they are written and
    exported in the reactor thread only (render through L{render},
    L{metricsResource} or L{instrumentFront}, never from another thread).

    @ivar registry: the C{CollectorRegistry}; nothing here touches
        prometheus_client's global one.
    @ivar sources: what is read at scrape time (see L{watch}).
    @ivar timer: the clock of latencies (seconds, monotonic).
    """

    def __init__(
        self,
        timer: Callable[[], float] = time.perf_counter,
        processCollector: bool = True,
    ) -> None:
        """
        @param timer: the clock of L{instrumentUpstreamCall},
            L{MeteredDispatcher} and L{instrumentFront}.
        @param processCollector: export C{process_*} (RSS, open file
            descriptors, CPU time) from C{/proc}.
        """
        self.timer = timer
        self.registry = CollectorRegistry(auto_describe=True)
        self.sources = Sources()
        self._requestCells: dict[RequestKey, list[float]] = {}
        self._upstreamCells: dict[UpstreamKey, list[float]] = {}
        registry = self.registry
        info = Gauge(
            "mcpproxy_build_info", "The running version (value 1).", ["version"], registry=registry
        )
        info.labels(__version__).set(1)
        registry.register(_LatencyCollector(self))
        registry.register(_SourceCollector(self.sources))
        if processCollector:
            ProcessCollector(registry=registry)

    # -- sources -------------------------------------------------------------

    def watch(
        self,
        *,
        repository: Optional[HasQueryCounts] = None,
        authenticator: Optional[HasStats] = None,
        configLoader: Optional[HasStats] = None,
        authCache: Optional[HasStats] = None,
        configCache: Optional[HasStats] = None,
        sessions: Optional[HasSessionCounts] = None,
        pool: Optional[HasUpstreamHealth] = None,
        requestLog: Optional[RequestLogCounters] = None,
    ) -> None:
        """
        Read these objects' counters at each scrape.  Each argument given
        replaces the source of that kind; the others are kept.  A source
        is read only through the attributes named in its protocol.
        """
        sources = self.sources
        if repository is not None:
            sources.repository = repository
        if authenticator is not None:
            sources.authenticator = authenticator
        if configLoader is not None:
            sources.configLoader = configLoader
        if authCache is not None:
            sources.caches["auth"] = authCache
        if configCache is not None:
            sources.caches["config"] = configCache
        if sessions is not None:
            sources.sessions = sessions
        if pool is not None:
            sources.pool = pool
        if requestLog is not None:
            sources.requestLog = requestLog

    # -- the request path ----------------------------------------------------

    def observeRequest(
        self,
        method: Optional[str],
        transport: Optional[str],
        outcome: str,
        seconds: float,
        status: Optional[int] = None,
    ) -> None:
        """
        Count one MCP request and its latency.

        @param method: the JSON-RPC method (C{None} when unknown); names
            that are not MCP methods count as C{"other"}.
        @param transport: C{"STREAMABLE_HTTPS"}/C{"streamable-http"} or
            C{"SSE"}/C{"sse"}; anything else counts as C{"other"}.
        @param outcome: L{OK}, L{ERROR} or L{HTTP_ERROR}.
        @param status: the HTTP status of an L{HTTP_ERROR} (ignored for
            the other outcomes).
        @raise ValueError: for another outcome.
        """
        key = (
            _METHOD_LABELS.get(method, OTHER_METHOD),
            _TRANSPORT_LABELS.get(transport, "other"),
            outcome,
            status,
        )
        cell = self._requestCells.get(key)
        if cell is None:
            if outcome not in OUTCOMES:
                raise ValueError(f"unknown outcome {outcome!r}")
            if status is not None and not (isinstance(status, int) and 100 <= status <= 599):
                raise ValueError(f"bad HTTP status {status!r}")
            cell = self._requestCells[key] = _newCell()
        cell[bisect_left(LATENCY_BUCKETS, seconds)] += 1
        cell[-1] += seconds

    def observeUpstreamCall(
        self, upstream: str, method: Optional[str], outcome: str, seconds: float
    ) -> None:
        """
        Count one call to an upstream and its latency.

        @param upstream: the config name.
        @param outcome: one of L{UPSTREAM_OUTCOMES}.
        @raise ValueError: for another outcome.
        """
        key = (upstream, _METHOD_LABELS.get(method, OTHER_METHOD), outcome)
        cell = self._upstreamCells.get(key)
        if cell is None:
            if outcome not in UPSTREAM_OUTCOMES:
                raise ValueError(f"unknown outcome {outcome!r}")
            cell = self._upstreamCells[key] = _newCell()
        cell[bisect_left(LATENCY_BUCKETS, seconds)] += 1
        cell[-1] += seconds

    def instrumentUpstreamCall(self, call: CallUpstream) -> CallUpstream:
        """
        Wrap the upstream pool's C{call} (what the router is given as
        C{callUpstream}) to time every upstream call.
        """
        timer = self.timer

        def timed(
            instanceId: str,
            config: UpstreamConfig,
            method: str,
            params: Optional[dict[str, Any]],
            timeout: float,
        ) -> Deferred[Any]:
            started = timer()
            d = call(instanceId, config, method, params, timeout)

            def done(result: Any) -> Any:
                if isinstance(result, Failure):
                    if result.check(UpstreamTimeout):
                        outcome = TIMEOUT
                    elif result.check(CancelledError):
                        outcome = CANCELLED
                    else:
                        outcome = ERROR
                else:
                    outcome = OK
                self.observeUpstreamCall(config.name, method, outcome, timer() - started)
                return result

            return d.addBoth(done)

        return timed

    # -- exposition ----------------------------------------------------------

    def render(self) -> tuple[bytes, str]:
        """
        The metrics in the Prometheus text format.

        @return: the body and its content type.
        """
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


@define
class MeteredDispatcher(Dispatcher):
    """
    A L{Dispatcher} that times every request it answers (every JSON-RPC
    request but C{initialize}, which the session layer answers) and counts
    it as C{ok} or C{error} from the response it made.

    @ivar metrics: where to count; C{None} counts nothing.
    """

    metrics: Optional[Metrics] = None

    def handle(
        self, ctx: CallContext, message: Mapping[str, Any], *args: Any, **kwargs: Any
    ) -> Deferred[bytes]:
        metrics = self.metrics
        if metrics is None:
            return super().handle(ctx, message, *args, **kwargs)
        timer = metrics.timer
        started = timer()
        method = message["method"]

        d = super().handle(ctx, message, *args, **kwargs)
        if d.called:
            # Answered at once (ping, an error, a cached answer): no
            # callback needed, which saves most of the cost.
            body = d.result
            if isinstance(body, bytes):
                metrics.observeRequest(
                    method, ctx.transport, responseOutcome(body), timer() - started
                )
                return d

        def done(body: bytes) -> bytes:
            metrics.observeRequest(method, ctx.transport, responseOutcome(body), timer() - started)
            return body

        return d.addCallback(done)


# -- access -----------------------------------------------------------------------

_UNAUTHORIZED = (
    401,
    (
        ("Content-Type", "text/plain; charset=utf-8"),
        ("WWW-Authenticate", 'Bearer realm="metrics"'),
        ("Cache-Control", "no-store"),
    ),
    b"Unauthorized: a bearer token is required for /metrics\n",
)


def tokenMatches(token: Optional[str], authorization: Optional[str]) -> bool:
    """
    Whether an C{Authorization} header value carries C{token} as a bearer
    token (compared in constant time).  With no token set, every request
    matches.
    """
    if not token:
        return True
    if authorization is None:
        return False
    scheme, _, given = authorization.strip().partition(" ")
    if scheme.lower() != "bearer":
        return False
    return hmac.compare_digest(given.strip().encode("utf-8"), token.encode("utf-8"))


def metricsResponse(
    metrics: Metrics, token: Optional[str], authorization: Optional[str]
) -> tuple[int, tuple[tuple[str, str], ...], bytes]:
    """
    The answer to C{GET /metrics}.

    @param token: the bearer token required (C{None} or empty: none).
    @param authorization: the request's C{Authorization} header, if any.
    @return: the status, the headers and the body.
    """
    if not tokenMatches(token, authorization):
        return _UNAUTHORIZED
    body, contentType = metrics.render()
    return 200, (("Content-Type", contentType), ("Cache-Control", "no-store")), body


def _authorization(request: IRequest) -> Optional[str]:
    value = request.getHeader(b"authorization")
    if value is None:
        return None
    return value.decode("latin-1") if isinstance(value, bytes) else value


def _answer(request: IRequest, metrics: Metrics, token: Optional[str]) -> bytes:
    status, headers, body = metricsResponse(metrics, token, _authorization(request))
    request.setResponseCode(status)
    for name, value in headers:
        request.setHeader(name.encode("latin-1"), value.encode("latin-1"))
    return body


class _MetricsPage(Resource):
    isLeaf = True

    def __init__(self, metrics: Metrics, token: Optional[str]) -> None:
        super().__init__()
        self._metrics = metrics
        self._token = token

    def render_GET(self, request: IRequest) -> bytes:
        return _answer(request, self._metrics, self._token)


def metricsResource(metrics: Metrics, token: Optional[str] = None) -> IResource:
    """
    A twisted.web resource for a listening endpoint of its own: C{GET
    /metrics} (and C{HEAD}) answer the metrics, other paths 404, other
    methods 405.

    @param token: the bearer token required (C{None} or empty: none).
    """
    root = Resource()
    root.putChild(b"metrics", _MetricsPage(metrics, token))
    return root


class _InstrumentedFront(Resource):
    """
    See L{instrumentFront}.
    """

    isLeaf = True

    def __init__(
        self,
        inner: IResource,
        metrics: Metrics,
        token: Optional[str],
        serveMetrics: bool,
        requestLog: Optional[Logger],
    ) -> None:
        super().__init__()
        self._inner = inner
        self._metrics = metrics
        self._token = token
        self._serveMetrics = serveMetrics
        self._requestLog = requestLog

    def render(self, request: Any) -> Any:
        path = request.path or b"/"
        if self._serveMetrics and path in (b"/metrics", b"/metrics/"):
            if request.method not in (b"GET", b"HEAD"):
                request.setResponseCode(405)
                request.setHeader(b"allow", b"GET, HEAD")
                request.setHeader(b"content-type", b"text/plain; charset=utf-8")
                return b"Method Not Allowed\n"
            return _answer(request, self._metrics, self._token)
        requestId = requestIdFor(request)
        request.setHeader(b"x-request-id", requestId.encode("ascii"))
        segment = path.split(b"/", 2)[1] if path.startswith(b"/") else b""
        transport = _PATH_TRANSPORTS.get(segment)
        if transport is not None:
            self._watch(request, requestId, transport)
        return runInRequestContext(request, self._renderInner, request)

    def _renderInner(self, request: Any) -> Any:
        return getChildForRequest(self._inner, request).render(request)

    def _watch(self, request: Any, requestId: str, transport: str) -> None:
        metrics = self._metrics
        requestLog = self._requestLog
        started = metrics.timer()
        isPost = request.method == b"POST"
        sessionBefore = request.requestHeaders.hasHeader(b"mcp-session-id")

        def finished(result: object) -> None:
            code = request.code
            seconds = metrics.timer() - started
            if code >= 400:
                metrics.observeRequest(None, transport, HTTP_ERROR, seconds, code)
            elif (
                isPost
                and not sessionBefore
                and request.responseHeaders.hasHeader(b"mcp-session-id")
            ):
                # Only the answer to initialize creates a session id.
                metrics.observeRequest("initialize", transport, OK, seconds)
            if requestLog is not None:
                context = requestContextOf(request)
                logRequest(
                    requestLog,
                    requestId=requestId,
                    instance=context.instance if context is not None else None,
                    sessionId=context.sessionId if context is not None else None,
                    method=context.method if context is not None else None,
                    status=code,
                    duration=seconds,
                    transport=transport,
                    httpMethod=request.method.decode("latin-1"),
                    path=(request.path or b"").decode("latin-1"),
                )

        request.notifyFinish().addBoth(finished)


def instrumentFront(
    inner: IResource,
    metrics: Metrics,
    token: Optional[str] = None,
    serveMetrics: bool = True,
    requestLog: Optional[Logger] = None,
) -> IResource:
    """
    Wrap the MCP front's resource (C{McpFront.resource()}).

      - Every response with an HTTP error status under C{/mcp}, C{/sse}
        and C{/messages} counts as an L{HTTP_ERROR} of method C{none},
        timed from the moment the resource was asked to render it; a
        Streamable HTTP C{initialize} (the one answer that creates a
        session id) counts as an C{ok} C{initialize}.  Everything else is
        left to L{MeteredDispatcher}.
      - Every request gets an id (L{mcp_proxy.logs.requestIdFor}), sent
        back as C{X-Request-Id}, and is rendered in a logging context
        where that id is bound (L{mcp_proxy.logs.runInRequestContext}).
      - With C{requestLog}, each request under those paths is logged at
        debug level when it ends (L{mcp_proxy.logs.logRequest}), with the
        instance, session and method the front bound
        (L{mcp_proxy.logs.bindRequest}).

    @param serveMetrics: also answer C{GET /metrics} here, with C{token}.
    @param requestLog: the logger of those events; C{None} (when the log
        level is above debug) saves their cost.
    """
    return _InstrumentedFront(inner, metrics, token, serveMetrics, requestLog)
