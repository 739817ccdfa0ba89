#!/usr/bin/env python3
"""
The ceiling of the benchmark: a bare twisted.web server whose one Resource
answers every POST with a canned JSON-RPC result (the echo tool's answer).

It reads the request body (as any server must) but does not parse it: no
authentication, no routing, no upstream.  It runs on the same reactor
(epoll) and twisted.web as the proxy, with the access log off as the proxy
has it, so the proxy's throughput can be compared with what twisted.web
itself can do on this machine.

    python bench/bare_server.py PORT
"""

from __future__ import annotations

import sys

from twisted.internet import epollreactor

epollreactor.install()

from twisted.internet import reactor  # noqa: E402
from twisted.web.resource import Resource  # noqa: E402
from twisted.web.server import Site  # noqa: E402

ANSWER = b'{"jsonrpc":"2.0","id":1,"result":{"content":[{"type":"text","text":"hello from wrk"}]}}'


class CannedResult(Resource):
    isLeaf = True

    def render_POST(self, request):  # type: ignore[no-untyped-def]
        request.content.read()
        request.setHeader(b"content-type", b"application/json")
        return ANSWER

    def render_GET(self, request):  # type: ignore[no-untyped-def]
        request.setHeader(b"content-type", b"application/json")
        return b'{"status":"ok"}'


def main() -> None:
    port = int(sys.argv[1])
    site = Site(CannedResult())
    site.noisy = False
    # No access log (the proxy has none either).
    site.log = lambda request: None  # type: ignore[method-assign]
    reactor.listenTCP(port, site, interface="127.0.0.1")  # type: ignore[attr-defined]
    reactor.run()  # type: ignore[attr-defined]


if __name__ == "__main__":
    main()
