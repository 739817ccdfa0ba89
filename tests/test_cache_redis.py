"""
Tests for L{mcp_proxy.cachecodec} and L{mcp_proxy.cache_redis}.

The L{ICache} contract runs on L{RedisCache} in C{tests/test_cache.py};
here is what only the codec and the Redis provider promise.  The Redis
tests use the Redis of L{mcp_proxy.testing.redisTestURL}; they are skipped
when it cannot be reached, or fail when C{CI=true}.
"""

from __future__ import annotations

import datetime
import json
from typing import Any

import attrs
from twisted.trial.unittest import SynchronousTestCase

from mcp_proxy.auth import Principal
from mcp_proxy.cachecodec import (
    CODEC_VERSION,
    DEFAULT_CLASSES,
    CacheCodec,
    UndecodableEntry,
    UnencodableValue,
    UnknownTag,
    className,
    defaultCodec,
)
from mcp_proxy.models import (
    ApiKeyRecord,
    InstanceConfig,
    RequestLogData,
    RequestLogRow,
    ToolGroup,
    ToolGroupTool,
    UpstreamConfig,
)


def sampleConfig() -> InstanceConfig:
    """
    An instance configuration with two upstreams, as the config loader
    caches it.
    """
    return InstanceConfig(
        instanceId="inst1",
        organizationId="org1",
        toolGroupId="tg1",
        toolGroupEnabled=True,
        upstreams=(
            UpstreamConfig(
                configId="cfg1",
                name="files",
                transportType="STDIO",
                command="npx",
                args=("-y", "server-files", "--root=/tmp/ü"),
                url=None,
                env={"TOKEN": "secret", "EMPTY": ""},
                authType="NONE",
                toolNames=frozenset({"read", "write", "list"}),
                serverId="srv1",
            ),
            UpstreamConfig(
                configId="cfg2",
                name="remote",
                transportType="STREAMABLE_HTTPS",
                command=None,
                args=(),
                url="https://mcp.example/mcp",
                env={},
                authType="API_KEY",
                toolNames=frozenset(),
            ),
        ),
    )


@attrs.frozen
class Point:
    x: int
    y: int = 0


@attrs.frozen
class Hidden:
    _secret: str
    derived: int = attrs.field(init=False, default=7)


class CacheCodecTests(SynchronousTestCase):
    """
    L{CacheCodec} encodes values as versioned JSON and rebuilds only
    registered classes.
    """

    def setUp(self) -> None:
        self.codec = defaultCodec()

    def roundTrip(self, value: Any) -> Any:
        return self.codec.decode(self.codec.encode(value))

    def test_instanceConfigRoundTrip(self) -> None:
        """An L{InstanceConfig} with nested upstreams reads back equal, types included."""
        config = sampleConfig()
        back = self.roundTrip(config)
        self.assertEqual(back, config)
        self.assertIsInstance(back.upstreams, tuple)
        self.assertIsInstance(back.upstreams[0], UpstreamConfig)
        self.assertIsInstance(back.upstreams[0].args, tuple)
        self.assertIsInstance(back.upstreams[0].toolNames, frozenset)
        self.assertEqual(dict(back.upstreams[0].env), {"TOKEN": "secret", "EMPTY": ""})

    def test_scalarsAndContainers(self) -> None:
        """JSON values, tuples, sets, datetimes and bytes read back equal and of their type."""
        values: list[Any] = [
            {"found": True, "keyId": "k1", "expiresAt": 1234.5, "tags": ["a", "b"]},
            ["a", 1, 2.5, True, None],
            "text ü \u2603",
            42,
            10**30,
            2.5,
            -0.0,
            True,
            False,
            (1, (2, 3)),
            frozenset({1, "1", (1,)}),
            {3, 4},
            datetime.datetime(2026, 11, 28, 11, 41, 24, 123000),
            datetime.datetime(2026, 11, 28, 11, 41, 24, tzinfo=datetime.UTC),
            b"\x00\xffbytes",
            {"nested": {"list": [(1, 2), frozenset({"x"})]}},
        ]
        for value in values:
            back = self.roundTrip(value)
            self.assertEqual(back, value)
            self.assertIs(type(back), type(value))

    def test_dictsOfOtherKeys(self) -> None:
        """Dicts with non-str keys, or a C{"$t"} key, read back as they were."""
        for value in ({1: "a", (2, 3): "b"}, {"$t": "tuple", "items": [1]}, {"a": 1, 2: 3}):
            self.assertEqual(self.roundTrip(value), value)

    def test_dictOrderKept(self) -> None:
        """A dict reads back with its keys in the same order."""
        value = {"b": 1, "a": 2, "c": 3}
        self.assertEqual(list(self.roundTrip(value)), ["b", "a", "c"])

    def test_mappingAsDict(self) -> None:
        """Any other mapping is stored as a dict, which compares equal."""
        from types import MappingProxyType

        value = MappingProxyType({"a": 1})
        self.assertEqual(self.roundTrip(value), {"a": 1})

    def test_everyDefaultClass(self) -> None:
        """The records the proxy may cache round-trip, datetimes and bytes included."""
        when = datetime.datetime(2026, 1, 2, 3, 4, 5, 6000)
        values = [
            ApiKeyRecord("k", "i", "o", "API_KEY", True, when, False, True),
            ApiKeyRecord("k", "i", "o", "API_KEY", True, None, False, True),
            Principal("k", "hash", "i", "o", "API_KEY"),
            ToolGroup("t", "n", "d", True, "o", (ToolGroupTool("c", "t", "n", 2),), when),
            RequestLogRow(
                "r",
                "i",
                "o",
                "tool",
                "STDIO",
                "tools/call",
                "SUCCESS",
                12,
                None,
                None,
                3,
                4,
                "curl",
                when,
                RequestLogData("d", b"\x01\x02", b"", 2, 0, 2, 0, 1.0),
            ),
        ]
        for value in values:
            self.assertEqual(self.roundTrip(value), value)
        self.assertIn(InstanceConfig, DEFAULT_CLASSES)
        self.assertIn(Principal, DEFAULT_CLASSES)

    def test_versionedJson(self) -> None:
        """The bytes are UTF-8 JSON in an envelope naming the format version."""
        document = json.loads(self.codec.encode({"a": (1,)}).decode("utf-8"))
        self.assertEqual(
            document,
            {"mcpcache": CODEC_VERSION, "value": {"a": {"$t": "tuple", "items": [1]}}},
        )

    def test_setsCanonical(self) -> None:
        """Equal sets encode to the same bytes, whatever their iteration order."""
        a = frozenset(f"tool{i}" for i in range(50))
        b = frozenset(sorted(a, reverse=True))
        self.assertEqual(self.codec.encode(a), self.codec.encode(b))

    def test_unregisteredClassRefused(self) -> None:
        """An instance of an attrs class not registered cannot be encoded."""
        self.assertRaises(UnencodableValue, self.codec.encode, Point(1, 2))
        self.assertRaises(UnencodableValue, self.codec.encode, {"p": [Point(1, 2)]})

    def test_otherTypesRefused(self) -> None:
        """Objects the codec does not know cannot be encoded (no pickle fallback)."""
        for value in (object(), 1 + 2j, datetime.date(2026, 1, 1), bytearray(b"x")):
            self.assertRaises(UnencodableValue, self.codec.encode, value)

    def test_registeredClass(self) -> None:
        """A registered frozen attrs class round-trips, private and init=False fields too."""
        codec = CacheCodec()
        codec.register(Point)
        codec.register(Hidden, "test.Hidden")
        self.assertEqual(codec.decode(codec.encode(Point(1, 2))), Point(1, 2))
        hidden = codec.decode(codec.encode(Hidden("s")))
        self.assertEqual(hidden, Hidden("s"))
        self.assertEqual(codec.classes["test.Hidden"], Hidden)

    def test_registerRefusesNonFrozen(self) -> None:
        """Only frozen attrs classes can be registered."""

        @attrs.define
        class Mutable:
            x: int

        class Plain:
            pass

        self.assertRaises(TypeError, CacheCodec().register, Mutable)
        self.assertRaises(TypeError, CacheCodec().register, Plain)

    def test_registerRefusesNameClash(self) -> None:
        """A name taken by one class cannot be given to another."""
        codec = CacheCodec()
        codec.register(Point, "p")
        codec.register(Point, "p")
        self.assertRaises(ValueError, codec.register, Hidden, "p")

    def test_unknownClassIsUnknownTag(self) -> None:
        """An entry naming a class that is not registered is refused."""
        codec = CacheCodec()
        codec.register(Point)
        data = codec.encode(Point(1))
        with self.assertRaises(UnknownTag):
            defaultCodec().decode(data)

    def test_unknownTagRefused(self) -> None:
        """An entry with a tag the codec does not know is refused."""
        data = json.dumps({"mcpcache": 1, "value": {"$t": "pickle", "data": "gASV"}})
        self.assertRaises(UnknownTag, self.codec.decode, data.encode())

    def test_otherVersionRefused(self) -> None:
        """An entry of another format version is refused."""
        for version in (2, 0, True, "1"):
            data = json.dumps({"mcpcache": version, "value": 1}).encode()
            self.assertRaises(UndecodableEntry, self.codec.decode, data)

    def test_garbageRefused(self) -> None:
        """Bytes that are not an entry are refused, never crash the reader."""
        nested = b'{"mcpcache":1,"value":' + b"[" * 100_000 + b"]" * 100_000 + b"}"
        for data in (
            b"",
            b"\x80\x04\x95",  # a pickle
            b"not json",
            b"[1, 2]",
            b'{"value": 1}',
            b'{"mcpcache": 1, "value": 1, "extra": 2}',
            b'{"mcpcache":1,"value":{"$t":"tuple","items":5}}',
            b'{"mcpcache":1,"value":{"$t":"frozenset","items":[[1]]}}',
            b'{"mcpcache":1,"value":{"$t":"dict","items":[[1]]}}',
            b'{"mcpcache":1,"value":{"$t":"datetime","iso":"yesterday"}}',
            b'{"mcpcache":1,"value":{"$t":"bytes","b64":"!!"}}',
            nested,
        ):
            self.assertRaises(UndecodableEntry, self.codec.decode, data)

    def test_fieldsMustFit(self) -> None:
        """An entry whose fields do not fit the class (another version of it) is refused."""
        name = className(UpstreamConfig)
        good = json.loads(self.codec.encode(sampleConfig().upstreams[0]))
        missing = json.loads(json.dumps(good))
        del missing["value"]["fields"]["configId"]
        extra = json.loads(json.dumps(good))
        extra["value"]["fields"]["newField"] = 1
        for document in (missing, extra):
            self.assertEqual(document["value"]["class"], name)
            with self.assertRaises(UndecodableEntry):
                self.codec.decode(json.dumps(document).encode())
