"""
API keys and object ids.

A key is C{mcpp_} followed by 43 characters of base64url (256 random bits).
The database keeps only the SHA-256 hex digest of the key (with an optional
salt appended, as the origin's prisma-field-encryption did) in "apiKeyHash",
and a non-secret display form in "apiKey".
"""

from __future__ import annotations

import hashlib
import secrets
import string
import time

KEY_PREFIX = "mcpp_"

_B36 = string.digits + string.ascii_lowercase


def generateApiKey(prefix: str = KEY_PREFIX) -> str:
    """
    A new random API key: C{prefix} + base64url of 32 random bytes.
    """
    return prefix + secrets.token_urlsafe(32)


def hashApiKey(key: str, salt: str = "") -> str:
    """
    The lookup hash of a key: lowercase hex SHA-256 of the UTF-8 key with
    C{salt} appended.
    """
    return hashlib.sha256((key + salt).encode("utf-8")).hexdigest()


def displayApiKey(key: str) -> str:
    """
    The non-secret display form: the prefix (up to the first C{_}, at most
    12 characters) and the last four characters.
    """
    cut = key.find("_")
    prefix = key[: cut + 1] if 0 <= cut < 12 else key[:4]
    return f"{prefix}...{key[-4:]}"


#: Every two-character base36 string, in order: C{_B36_PAIRS[n]} spells
#: C{n} (0 <= n < 36 ** 2) in two digits.
_B36_PAIRS = tuple(a + b for a in _B36 for b in _B36)


def _base36(n: int, width: int) -> str:
    """
    The last C{width} (even) base36 digits of C{n} >= 0, zero-padded: two
    digits per division, as ids are made for every logged request.
    """
    out = []
    for _ in range(width // 2):
        n, r = divmod(n, 1296)
        out.append(_B36_PAIRS[r])
    out.reverse()
    return "".join(out)


def newIds(count: int) -> list[str]:
    """
    C{count} new ids, as L{newId} makes them, at a lower cost each: one
    clock reading and one read of random bytes for all of them.
    """
    prefix = "c" + _base36(int(time.time() * 1000), 8)
    random = secrets.token_bytes(10 * count)
    return [
        prefix + _base36(int.from_bytes(random[i : i + 10], "big"), 16)
        for i in range(0, 10 * count, 10)
    ]


def newId() -> str:
    """
    A new collision-resistant, roughly time-ordered id in the shape of a
    cuid (C{c} + millisecond timestamp + 80 random bits, lowercase base36,
    25 characters), as the origin's ids are.
    """
    return "c" + _base36(int(time.time() * 1000), 8) + _base36(secrets.randbits(80), 16)
