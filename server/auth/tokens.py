"""Data tokens: ``kvs_<id>_<secret>``, of which daemons keep only a hash.

The id (12 hex digits) is public: lists, logs and revocations name a token by
it. The secret is 32 random bytes (base64url); a daemon stores
scrypt(secret, salt) and, once a presented secret has matched, a SHA-256 of it
in memory so that later calls cost a hash, not a KDF. The admin token is
configured, not created (``--admin-token-file``); daemons authenticate to each
other with the peer credential, an HMAC of the admin token that every daemon
can compute and no data token can be.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets
from typing import NamedTuple

PREFIX = "kvs_"
PEER_PREFIX = "kvs-peer_"
_TOKEN = re.compile(r"kvs_([0-9a-f]{12})_([A-Za-z0-9_-]{43})")
# scrypt's cost: about 50 ms on one core, paid once per token per daemon.
SCRYPT = {"n": 1 << 14, "r": 8, "p": 1, "dklen": 32}
MIN_ADMIN_TOKEN_CHARS = 16


class Presented(NamedTuple):
    """A data token as a caller presented it."""

    id: str
    secret: str


def new_token() -> tuple[str, str]:
    """(id, whole token) of a fresh data token."""
    token_id = secrets.token_hex(6)
    secret = base64.urlsafe_b64encode(secrets.token_bytes(32)).decode().rstrip("=")
    return token_id, f"{PREFIX}{token_id}_{secret}"


def parse(token: str) -> Presented | None:
    """The id and secret of a well-formed data token, else None."""
    match = _TOKEN.fullmatch(token)
    return Presented(match.group(1), match.group(2)) if match else None


def secret_of(token: str) -> str:
    presented = parse(token)
    assert presented is not None, "not a data token"
    return presented.secret


def hash_secret(secret: str, salt: bytes) -> bytes:
    """The stored hash of a secret (slow on purpose)."""
    return hashlib.scrypt(secret.encode(), salt=salt, **SCRYPT)


def fingerprint(secret: str) -> bytes:
    """What a daemon remembers of a secret it has verified (fast)."""
    return hashlib.sha256(secret.encode()).digest()


def peer_credential(admin_token: str) -> str:
    """The credential daemons of one cluster present to each other."""
    mac = hmac.new(admin_token.encode(), b"kvstore peer credential v1", hashlib.sha256).hexdigest()
    return PEER_PREFIX + mac


def same(a: str | bytes, b: str | bytes) -> bool:
    """Constant-time equality (a credential's length is not secret)."""
    if isinstance(a, str):
        a = a.encode()
    if isinstance(b, str):
        b = b.encode()
    return hmac.compare_digest(a, b)
