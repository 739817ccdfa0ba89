"""
A stdio MCP server for the upstream tests, standard library only.

Each C{tools/call} runs in its own thread, so calls can be held and
released in any order.  Options (command line):

  --version V             answer initialize with protocol version V
  --exit-at-start N       exit with status N before reading anything
  --grandchild            fork a process that sleeps (holding stdout)
  --grandchild-ignores-term   ... and ignores SIGTERM
  --ignore-eof            keep running at the end of stdin
  --ignore-term           ignore SIGTERM
  --extra-tools N         list N more tools ("extra-0", ...)
  --page-size N           page tools/list N tools at a time
  --stderr-at-start TEXT  write TEXT to stderr at start
"""

import json
import os
import signal
import sys
import threading
import time

args = sys.argv[1:]


def option(name, default=None):
    if name in args:
        return args[args.index(name) + 1]
    return default


if option("--exit-at-start") is not None:
    sys.stderr.write("testserver: exiting at start\n")
    sys.exit(int(option("--exit-at-start")))

if "--ignore-term" in args:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)

if option("--stderr-at-start") is not None:
    sys.stderr.write(option("--stderr-at-start") + "\n")
    sys.stderr.flush()

grandchild = None
if "--grandchild" in args or "--grandchild-ignores-term" in args:
    grandchild = os.fork()
    if grandchild == 0:
        if "--grandchild-ignores-term" in args:
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        os.close(0)
        while True:
            time.sleep(3600)

_output = sys.stdout.buffer
_lock = threading.Lock()
_held = {}
_cancellations = []
_clientAnswers = {}
_nextId = [0]
_initParams = {}


def send(message):
    data = json.dumps(message, separators=(",", ":")).encode() + b"\n"
    with _lock:
        _output.write(data)
        _output.flush()


def sendRaw(data):
    with _lock:
        _output.write(data)
        _output.flush()


def text(value):
    return {"content": [{"type": "text", "text": value}]}


def askClient(method, params):
    """
    Send a request to the client and wait for its answer.
    """
    with _lock:
        _nextId[0] += 1
        requestId = f"srv-{_nextId[0]}"
    event = threading.Event()
    _clientAnswers[requestId] = [event, None]
    send({"jsonrpc": "2.0", "id": requestId, "method": method, "params": params})
    event.wait(30)
    return _clientAnswers.pop(requestId)[1]


def holdEvent(key):
    with _lock:
        return _held.setdefault(key, threading.Event())


def tool(name, arguments):
    """
    @return: C{("result", value)} or C{("error", errorObject)}.
    """
    if name == "echo":
        return "result", text(arguments.get("text", ""))
    if name == "initParams":
        return "result", {"content": [], "structuredContent": _initParams}
    if name == "env":
        return "result", {"content": [], "structuredContent": dict(os.environ)}
    if name == "info":
        info = {
            "pid": os.getpid(),
            "pgid": os.getpgid(0),
            "sid": os.getsid(0),
            "grandchild": grandchild,
            "sigpipe": str(signal.getsignal(signal.SIGPIPE)),
        }
        return "result", {"content": [], "structuredContent": info}
    if name == "crash":
        with _lock:
            os._exit(int(arguments.get("status", 3)))
    if name == "big":
        return "result", text("x" * int(arguments["size"]))
    if name == "hold":
        holdEvent(arguments["key"]).wait(60)
        return "result", text("released " + arguments["key"])
    if name == "release":
        holdEvent(arguments["key"]).set()
        return "result", text("ok")
    if name == "cancellations":
        return "result", {"content": [], "structuredContent": {"ids": list(_cancellations)}}
    if name == "error":
        error = {"code": arguments["code"], "message": arguments["message"]}
        if "data" in arguments:
            error["data"] = arguments["data"]
        return "error", error
    if name == "garbage":
        sendRaw(b"this is not json\n")
        sendRaw(b'{"jsonrpc": "1.0", "what": "not a message"}\n')
        return "result", text("ok")
    if name == "stderr":
        sys.stderr.write(arguments["text"] * int(arguments.get("repeat", 1)))
        sys.stderr.flush()
        return "result", text("ok")
    if name == "pingClient":
        return "result", {"content": [], "structuredContent": askClient("ping", {})}
    if name == "notify":
        send(
            {
                "jsonrpc": "2.0",
                "method": "notifications/message",
                "params": {"level": "info", "data": arguments.get("data", "hello")},
            }
        )
        return "result", text("notified")
    if name == "sampleCancelled":
        with _lock:
            _nextId[0] += 1
            requestId = f"srv-{_nextId[0]}"
        send({"jsonrpc": "2.0", "id": requestId, "method": "sampling/createMessage", "params": {}})
        send(
            {
                "jsonrpc": "2.0",
                "method": "notifications/cancelled",
                "params": {"requestId": requestId, "reason": "changed my mind"},
            }
        )
        return "result", text(requestId)
    if name == "sample":
        answer = askClient("sampling/createMessage", {"messages": [], "maxTokens": 1})
        return "result", {"content": [], "structuredContent": answer}
    return "error", {"code": -32602, "message": "Unknown tool: " + str(name)}


def runTool(requestId, params):
    try:
        kind, value = tool(params.get("name"), params.get("arguments") or {})
    except Exception as e:
        kind, value = "error", {"code": -32603, "message": repr(e)}
    send({"jsonrpc": "2.0", "id": requestId, kind: value})


def toolList():
    names = [
        "echo",
        "initParams",
        "env",
        "info",
        "crash",
        "big",
        "hold",
        "release",
        "cancellations",
    ]
    names += ["error", "garbage", "stderr", "pingClient", "notify", "sample", "sampleCancelled"]
    names += [f"extra-{i}" for i in range(int(option("--extra-tools", "0")))]
    return [
        {"name": n, "description": f"tool {n}", "inputSchema": {"type": "object"}} for n in names
    ]


def listTools(params):
    tools = toolList()
    size = option("--page-size")
    if size is None:
        return {"tools": tools}
    size = int(size)
    cursor = params.get("cursor")
    start = int(cursor.removeprefix("page-")) if cursor else 0
    page = {"tools": tools[start : start + size]}
    if start + size < len(tools):
        page["nextCursor"] = f"page-{start + size}"
    return page


def handle(message):
    method = message.get("method")
    params = message.get("params") or {}
    if method is None:
        entry = _clientAnswers.get(message.get("id"))
        if entry is not None:
            entry[1] = message.get("result", {"error": message.get("error")})
            entry[0].set()
        return
    if "id" not in message:
        if method == "notifications/cancelled":
            _cancellations.append(params.get("requestId"))
        return
    requestId = message["id"]
    if method == "initialize":
        _initParams.update(params)
        version = option("--version", params.get("protocolVersion"))
        result = {
            "protocolVersion": version,
            "capabilities": {"tools": {}},
            "serverInfo": {"name": "testserver", "version": "0.1"},
            "instructions": "for tests",
        }
        send({"jsonrpc": "2.0", "id": requestId, "result": result})
    elif method == "tools/list":
        send({"jsonrpc": "2.0", "id": requestId, "result": listTools(params)})
    elif method == "tools/call":
        threading.Thread(target=runTool, args=(requestId, params), daemon=True).start()
    elif method == "ping":
        send({"jsonrpc": "2.0", "id": requestId, "result": {}})
    else:
        send(
            {
                "jsonrpc": "2.0",
                "id": requestId,
                "error": {"code": -32601, "message": "Method not found"},
            }
        )


def main():
    for line in sys.stdin.buffer:
        if line.strip():
            handle(json.loads(line))
    if "--ignore-eof" in args:
        while True:
            time.sleep(3600)
    os._exit(0)


main()
