"""
Encoding cache values for shared backends (Redis and the like).

A shared cache holds bytes, and what it holds may be read by another
process, another version of mcp-proxy, or anyone who can write to the
backend.  So the encoding is JSON (never pickle), versioned, and rebuilds
objects only from a registry of allowed classes; anything else reads as a
miss.

The format (version 1) is the UTF-8 JSON document
C{{"mcpcache": 1, "value": TREE}}, where TREE is:

  - C{null}, booleans, integers, floats, strings and lists as themselves;
  - a C{dict} whose keys are all strings, none of them C{"$t"}, as a JSON
    object (in its order);
  - anything else as a tagged object C{{"$t": TAG, ...}}:
      - C{{"$t": "tuple", "items": [TREE...]}}
      - C{{"$t": "frozenset", "items": [TREE...]}} and C{"set"} likewise
        (items in a canonical order)
      - C{{"$t": "dict", "items": [[TREE, TREE]...]}}: the other dicts
      - C{{"$t": "datetime", "iso": "2026-11-28T11:41:24.123000"}}
      - C{{"$t": "bytes", "b64": "..."}}
      - C{{"$t": "attrs", "class": NAME, "fields": {FIELD: TREE...}}}: an
        instance of a registered attrs class, rebuilt through its
        C{__init__} (so its validators run).

Any other C{Mapping} is encoded as a C{dict} (it reads back as a C{dict},
which compares equal).  Other types, and instances of unregistered classes,
cannot be encoded: L{CacheCodec.encode} raises L{UnencodableValue}.
"""

from __future__ import annotations

import base64
import datetime
import json
from typing import Any, Iterable, Mapping, Optional

import attrs
from attrs import define, field

from mcp_proxy.auth import Principal
from mcp_proxy.models import (
    ApiKey,
    ApiKeyRecord,
    Instance,
    InstanceConfig,
    McpServer,
    Organization,
    RequestLogData,
    RequestLogRow,
    ServerConfig,
    Tool,
    ToolGroup,
    ToolGroupTool,
    UpstreamConfig,
)

#: The version of the format written; entries of other versions read as
#: misses.
CODEC_VERSION = 1

_ENVELOPE = "mcpcache"
_TAG = "$t"

#: The classes the default codec rebuilds: the frozen attrs classes of
#: L{mcp_proxy.models}, and L{mcp_proxy.auth.Principal}.
DEFAULT_CLASSES: tuple[type, ...] = (
    Organization,
    McpServer,
    ServerConfig,
    Tool,
    ToolGroupTool,
    ToolGroup,
    Instance,
    ApiKey,
    ApiKeyRecord,
    UpstreamConfig,
    InstanceConfig,
    RequestLogRow,
    RequestLogData,
    Principal,
)


class CodecError(ValueError):
    """
    A value cannot be encoded, or stored bytes cannot be decoded.
    """


class UnencodableValue(CodecError):
    """
    The value (or a part of it) has a type the codec does not encode.
    """


class UndecodableEntry(CodecError):
    """
    Stored bytes are not an entry this codec can rebuild: not JSON, another
    format version, an unknown tag or class, or fields that do not fit the
    class.  A cache reads such an entry as a miss.
    """


class UnknownTag(UndecodableEntry):
    """
    The entry names a tag or a class that is not in the registry.
    """


def className(cls: type) -> str:
    """
    The registry name of a class: its module and qualified name.
    """
    return f"{cls.__module__}.{cls.__qualname__}"


def _canonical(tree: Any) -> str:
    """
    A text that orders encoded set items the same way in every process.
    """
    return json.dumps(tree, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


@define
class CacheCodec:
    """
    Encodes cache values to bytes and back.

    @ivar classes: registry name to class, for the attrs classes that may
        be stored; see L{register}.
    """

    classes: dict[str, type] = field(factory=dict)
    _names: dict[type, str] = field(factory=dict, init=False)
    # class -> field name -> its __init__ argument name, or None when the
    # field is not set by __init__.
    _fields: dict[type, dict[str, Optional[str]]] = field(factory=dict, init=False)

    def __attrs_post_init__(self) -> None:
        registered, self.classes = self.classes, {}
        for name, cls in registered.items():
            self.register(cls, name)

    def register(self, cls: type, name: Optional[str] = None) -> type:
        """
        Allow the instances of a frozen attrs class to be stored.

        @param name: the name written in entries; by default
            L{className}.  Keep it stable: entries naming a class that is
            no longer registered read as misses.
        @return: C{cls}, so that this can decorate a class.
        @raise TypeError: when C{cls} is not a frozen attrs class.
        @raise ValueError: when C{name} is taken by another class.
        """
        if not (isinstance(cls, type) and attrs.has(cls) and attrs.inspect(cls).is_frozen):
            raise TypeError(f"{cls!r} is not a frozen attrs class")
        if name is None:
            name = className(cls)
        existing = self.classes.get(name)
        if existing is not None and existing is not cls:
            raise ValueError(f"the codec name {name!r} is already taken by {existing!r}")
        self.classes[name] = cls
        self._names[cls] = name
        self._fields[cls] = {
            f.name: (f.alias or f.name) if f.init else None for f in attrs.fields(cls)
        }
        return cls

    # -- encoding -------------------------------------------------------------

    def encode(self, value: Any) -> bytes:
        """
        The bytes of C{value}.

        @raise UnencodableValue: when C{value} holds something the codec
            does not encode.
        """
        document = {_ENVELOPE: CODEC_VERSION, "value": self._tree(value)}
        try:
            text = json.dumps(document, separators=(",", ":"), ensure_ascii=False)
        except (ValueError, RecursionError) as e:
            raise UnencodableValue(f"cannot encode the value: {e}") from e
        return text.encode("utf-8")

    def _tree(self, value: Any) -> Any:
        kind = type(value)
        if value is None or kind in (bool, int, float, str):
            return value
        if kind is list:
            return [self._tree(item) for item in value]
        if kind is tuple:
            return {_TAG: "tuple", "items": [self._tree(item) for item in value]}
        if kind is frozenset or kind is set:
            items = sorted((self._tree(item) for item in value), key=_canonical)
            return {_TAG: kind.__name__, "items": items}
        if kind is datetime.datetime:
            return {_TAG: "datetime", "iso": value.isoformat()}
        if kind is bytes:
            return {_TAG: "bytes", "b64": base64.b64encode(value).decode("ascii")}
        name = self._names.get(kind)
        if name is not None:
            fields = {f: self._tree(getattr(value, f)) for f in self._fields[kind]}
            return {_TAG: "attrs", "class": name, "fields": fields}
        if isinstance(value, Mapping):
            if all(type(k) is str for k in value) and _TAG not in value:
                return {k: self._tree(v) for k, v in value.items()}
            return {
                _TAG: "dict",
                "items": [[self._tree(k), self._tree(v)] for k, v in value.items()],
            }
        if attrs.has(kind):
            raise UnencodableValue(f"{className(kind)} is not registered with the cache codec")
        raise UnencodableValue(f"the cache codec does not encode {kind.__qualname__} values")

    # -- decoding -------------------------------------------------------------

    def decode(self, data: bytes | str) -> Any:
        """
        The value of stored bytes.

        @raise UndecodableEntry: when the bytes are not an entry of this
            format version that this codec can rebuild (L{UnknownTag} for
            a tag or class it does not know).
        """
        try:
            document = json.loads(data)
        except (ValueError, RecursionError) as e:
            raise UndecodableEntry(f"not a cache entry: {e}") from e
        if not isinstance(document, dict) or set(document) != {_ENVELOPE, "value"}:
            raise UndecodableEntry("not a cache entry: no envelope")
        version = document[_ENVELOPE]
        if version != CODEC_VERSION or type(version) is not int:
            raise UndecodableEntry(
                f"cache entry of format version {version!r}, not {CODEC_VERSION}"
            )
        try:
            return self._value(document["value"])
        except RecursionError as e:
            raise UndecodableEntry("cache entry nested too deeply") from e

    def _value(self, tree: Any) -> Any:
        if isinstance(tree, list):
            return [self._value(item) for item in tree]
        if not isinstance(tree, dict):
            return tree
        if _TAG not in tree:
            return {k: self._value(v) for k, v in tree.items()}
        tag = tree[_TAG]
        try:
            if tag == "tuple":
                return tuple(self._value(item) for item in self._list(tree, "items"))
            if tag == "frozenset":
                return frozenset(self._value(item) for item in self._list(tree, "items"))
            if tag == "set":
                return {self._value(item) for item in self._list(tree, "items")}
            if tag == "dict":
                return {
                    self._value(pair[0]): self._value(pair[1])
                    for pair in self._pairs(self._list(tree, "items"))
                }
            if tag == "datetime":
                return datetime.datetime.fromisoformat(self._str(tree, "iso"))
            if tag == "bytes":
                return base64.b64decode(self._str(tree, "b64"), validate=True)
            if tag == "attrs":
                return self._instance(tree)
        except UndecodableEntry:
            raise
        except (TypeError, ValueError, KeyError) as e:
            raise UndecodableEntry(f"bad {tag!r} item in cache entry: {e}") from e
        raise UnknownTag(f"unknown tag {tag!r} in cache entry")

    def _instance(self, tree: dict[str, Any]) -> Any:
        name = self._str(tree, "class")
        cls = self.classes.get(name)
        if cls is None:
            raise UnknownTag(f"class {name!r} of cache entry is not registered")
        stored = tree.get("fields")
        if not isinstance(stored, dict):
            raise UndecodableEntry(f"cache entry of {name} has no fields")
        known = self._fields[cls]
        kwargs: dict[str, Any] = {}
        for fieldName, value in stored.items():
            if fieldName not in known:
                unknown = sorted(set(stored) - set(known))
                raise UndecodableEntry(f"cache entry of {name} has unknown fields {unknown}")
            argument = known[fieldName]
            if argument is not None:
                kwargs[argument] = self._value(value)
        try:
            return cls(**kwargs)
        except (TypeError, ValueError) as e:
            raise UndecodableEntry(f"cache entry does not fit {name}: {e}") from e

    @staticmethod
    def _list(tree: dict[str, Any], key: str) -> list[Any]:
        value = tree[key]
        if not isinstance(value, list):
            raise TypeError(f"{key!r} is not a list")
        return value

    @staticmethod
    def _str(tree: dict[str, Any], key: str) -> str:
        value = tree[key]
        if not isinstance(value, str):
            raise TypeError(f"{key!r} is not a string")
        return value

    @staticmethod
    def _pairs(items: list[Any]) -> Iterable[list[Any]]:
        for pair in items:
            if not isinstance(pair, list) or len(pair) != 2:
                raise TypeError("a dict item is not a [key, value] pair")
            yield pair


def defaultCodec() -> CacheCodec:
    """
    A new codec with L{DEFAULT_CLASSES} registered.
    """
    codec = CacheCodec()
    for cls in DEFAULT_CLASSES:
        codec.register(cls)
    return codec


__all__ = [
    "CODEC_VERSION",
    "DEFAULT_CLASSES",
    "CacheCodec",
    "CodecError",
    "UndecodableEntry",
    "UnencodableValue",
    "UnknownTag",
    "className",
    "defaultCodec",
]
