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


def _base36(n: int) -> str:
    out = []
    while True:
        n, r = divmod(n, 36)
        out.append(_B36[r])
        if not n:
            return "".join(reversed(out))


def newId() -> str:
    """
    A new collision-resistant, roughly time-ordered id in the shape of a
    cuid (C{c} + millisecond timestamp + 80 random bits, lowercase base36,
    25 characters), as the origin's ids are.
    """
    ts = _base36(int(time.time() * 1000)).rjust(8, "0")[-8:]
    rand = _base36(secrets.randbits(80)).rjust(16, "0")[-16:]
    return "c" + ts + rand
