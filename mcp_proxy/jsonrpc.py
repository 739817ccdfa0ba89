"""
JSON-RPC 2.0 messages: codes, errors, encoding.

Both sides of the proxy use these: the HTTP front towards clients and the
upstream connections towards MCP servers.
"""

from __future__ import annotations

import json
from typing import Any, Optional, Union

PARSE_ERROR = -32700
INVALID_REQUEST = -32600
METHOD_NOT_FOUND = -32601
INVALID_PARAMS = -32602
INTERNAL_ERROR = -32603
SERVER_ERROR = -32000
RESOURCE_NOT_FOUND = -32002
REQUEST_TIMEOUT = -32001

RequestId = Union[str, int]

_encoder = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False)


class JsonRpcError(Exception):
    """
    An error to be answered as a JSON-RPC error object.

    @ivar code: the JSON-RPC error code.
    @ivar message: the human-readable message.
    @ivar data: optional extra data (JSON-able), or C{None}.
    """

    def __init__(self, code: int, message: str, data: Any = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.data = data

    def toObject(self) -> dict[str, Any]:
        """
        The C{error} member of a response.
        """
        error: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.data is not None:
            error["data"] = self.data
        return error

    def __repr__(self) -> str:
        return f"JsonRpcError({self.code}, {self.message!r})"


def encode(message: Any) -> bytes:
    """
    Compact UTF-8 JSON of C{message}, with no newline in it (safe for
    newline-delimited stdio framing and for SSE C{data:} lines).
    """
    return _encoder.encode(message).encode("utf-8")


def decode(data: Union[bytes, str]) -> Any:
    """
    Parse JSON text.

    @raise JsonRpcError: with L{PARSE_ERROR} when it is not JSON.
    """
    try:
        return json.loads(data)
    except (ValueError, UnicodeDecodeError) as e:
        raise JsonRpcError(PARSE_ERROR, "Parse error", str(e)) from None


def response(requestId: Optional[RequestId], result: Any) -> dict[str, Any]:
    """
    A success response object.
    """
    return {"jsonrpc": "2.0", "id": requestId, "result": result}


def errorResponse(
    requestId: Optional[RequestId], code: int, message: str, data: Any = None
) -> dict[str, Any]:
    """
    An error response object; C{requestId} is C{None} when the request's id
    is unknown.
    """
    error: dict[str, Any] = {"code": code, "message": message}
    if data is not None:
        error["data"] = data
    return {"jsonrpc": "2.0", "id": requestId, "error": error}


def request(requestId: RequestId, method: str, params: Optional[dict[str, Any]]) -> dict[str, Any]:
    """
    A request object.
    """
    message: dict[str, Any] = {"jsonrpc": "2.0", "id": requestId, "method": method}
    if params is not None:
        message["params"] = params
    return message


def notification(method: str, params: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """
    A notification object.
    """
    message: dict[str, Any] = {"jsonrpc": "2.0", "method": method}
    if params is not None:
        message["params"] = params
    return message


def isValidId(value: Any) -> bool:
    """
    Whether C{value} may be a request id: a string or an integer (not a
    boolean, not null).
    """
    return isinstance(value, str) or (isinstance(value, int) and not isinstance(value, bool))


def classify(message: Any) -> str:
    """
    Tell what a decoded message is: C{"request"}, C{"notification"},
    C{"response"}, or C{"invalid"}.
    """
    if not isinstance(message, dict) or message.get("jsonrpc") != "2.0":
        return "invalid"
    if "method" in message:
        if not isinstance(message["method"], str):
            return "invalid"
        params = message.get("params")
        if params is not None and not isinstance(params, (dict, list)):
            return "invalid"
        if "id" in message:
            return "request" if isValidId(message["id"]) else "invalid"
        return "notification"
    if "id" in message and ("result" in message or "error" in message):
        return "response"
    return "invalid"


class RawJSON(bytes):
    """
    JSON text that is already encoded, to be spliced into a message instead
    of being parsed and encoded again.
    """


def encodeResponseRaw(requestId: Optional[RequestId], result: RawJSON) -> bytes:
    """
    A success response whose result is already-encoded JSON.
    """
    return b'{"jsonrpc":"2.0","id":' + encode(requestId) + b',"result":' + result + b"}"
