"""The replicated table of namespaces and token hashes.

Entries are keyed ``ns/<tenant>/<subtenant>`` and ``token/<id>``; each carries
the time it was last written. Merging two tables keeps, per key, the newest
entry (a deletion at equal time wins), so daemons that exchange their tables in
any order and any number of times end up with the same one; deletions stay as
tombstones so that an older copy cannot bring a revoked token back. The table is
small (namespaces and tokens, not blocks) and written to ``auth.json`` in the
data dir, atomically, on every change.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

from kvstore import errors
from kvstore.namespace import Namespace, validate_name
from kvstore.protocol.codes import ErrorCode
from kvstore.server.auth import tokens

log = logging.getLogger("kvstore.server.auth")

FILE_NAME = "auth.json"


@dataclass(frozen=True)
class Entry:
    value: dict | None  # None: deleted
    updated_ns: int

    @property
    def deleted(self) -> bool:
        return self.value is None

    def newer_than(self, other: "Entry | None") -> bool:
        if other is None:
            return True
        if self.updated_ns != other.updated_ns:
            return self.updated_ns > other.updated_ns
        return self.deleted and not other.deleted


def namespace_key(ns: Namespace) -> str:
    return f"ns/{ns.tenant}/{ns.subtenant}"


def token_key(token_id: str) -> str:
    return f"token/{token_id}"


class AuthTable:
    def __init__(self, data_dir: Path) -> None:
        self.path = Path(data_dir) / FILE_NAME
        self.entries: dict[str, Entry] = {}
        # Called after every change with the keys that changed (replication pushes them).
        self.listeners: list[Callable[[list[str]], None]] = []
        self._load()

    # -- persistence --------------------------------------------------------

    def _load(self) -> None:
        try:
            raw = json.loads(self.path.read_text())
        except FileNotFoundError:
            return
        except (OSError, ValueError) as exc:
            raise errors.ConfigError(f"{self.path}: cannot read the namespaces and tokens table: {exc}") from None
        for key, item in raw.get("entries", {}).items():
            self.entries[key] = Entry(item.get("value"), int(item["updated_ns"]))

    def _save(self) -> None:
        body = json.dumps(
            {"entries": {k: {"value": e.value, "updated_ns": e.updated_ns} for k, e in sorted(self.entries.items())}},
            indent=1,
        )
        temporary = self.path.with_name(f".{FILE_NAME}.{secrets.token_hex(4)}")
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)  # token hashes: not for other users
        try:
            os.write(fd, body.encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temporary, self.path)

    def _write(self, changes: dict[str, dict | None]) -> None:
        now = time.time_ns()
        for key, value in changes.items():
            old = self.entries.get(key)
            self.entries[key] = Entry(value, max(now, old.updated_ns + 1) if old else now)
        self._changed(list(changes))

    def _changed(self, keys: list[str]) -> None:
        self._save()
        for listener in self.listeners:
            listener(keys)

    # -- replication ----------------------------------------------------------

    def merge(self, entries: Iterable[tuple[str, Entry]]) -> list[str]:
        """Take every entry newer than ours; returns the keys that changed."""
        changed = []
        for key, entry in entries:
            if not (key.startswith("ns/") or key.startswith("token/")):
                continue  # a newer daemon's kind of entry: not ours to keep
            if entry.newer_than(self.entries.get(key)):
                self.entries[key] = entry
                changed.append(key)
        if changed:
            self._changed(changed)
        return changed

    # -- namespaces -------------------------------------------------------------

    def has_namespace(self, ns: Namespace) -> bool:
        entry = self.entries.get(namespace_key(ns))
        return entry is not None and not entry.deleted

    def namespaces(self) -> list[Namespace]:
        found = []
        for key, entry in self.entries.items():
            if key.startswith("ns/") and not entry.deleted:
                tenant, _, subtenant = key[3:].partition("/")
                found.append(Namespace(tenant, subtenant))
        return sorted(found, key=lambda ns: (ns.tenant, ns.subtenant))

    def create_namespace(self, ns: Namespace) -> bool:
        if self.has_namespace(ns):
            return False
        self._write({namespace_key(ns): {"created": time.time()}})
        return True

    def rate(self, ns: Namespace) -> tuple[float, int]:
        """(requests per second, burst) of ``ns``; (0, 0): unlimited."""
        entry = self.entries.get(namespace_key(ns))
        if entry is None or entry.deleted:
            return 0.0, 0
        return float(entry.value.get("requests_per_second", 0.0)), int(entry.value.get("burst", 0))

    def set_rate(self, ns: Namespace, requests_per_second: float, burst: int) -> None:
        """Set the request rate of ``ns`` (created if need be: the rate is a namespace setting)."""
        if not (requests_per_second >= 0 and requests_per_second < float("inf")) or burst < 0:
            raise errors.InvalidArgumentError("requests_per_second and burst must be finite and not negative")
        entry = self.entries.get(namespace_key(ns))
        value = dict(entry.value) if entry is not None and not entry.deleted else {"created": time.time()}
        value.update(requests_per_second=float(requests_per_second), burst=int(burst))
        self._write({namespace_key(ns): value})

    def drop_namespace(self, ns: Namespace) -> bool:
        if not self.has_namespace(ns):
            return False
        self._write({namespace_key(ns): None})
        return True

    # -- tokens -------------------------------------------------------------------

    def token(self, token_id: str) -> dict | None:
        entry = self.entries.get(token_key(token_id))
        return entry.value if entry is not None else None

    def tokens(self, tenant: str = "") -> list[tuple[str, dict]]:
        found = [
            (key[6:], entry.value)
            for key, entry in self.entries.items()
            if key.startswith("token/") and not entry.deleted and (not tenant or entry.value["tenant"] == tenant)
        ]
        return sorted(found, key=lambda item: item[1]["created"])

    def create_token(self, tenant: str, subtenant: str, read_only: bool, description: str) -> tuple[str, dict, str]:
        """(id, record, whole token): the token exists nowhere else once the caller has it."""
        validate_name("tenant", tenant)
        if subtenant:
            validate_name("subtenant", subtenant)
        if len(description) > 256:
            raise errors.InvalidArgumentError("a token's description is at most 256 characters")
        token_id, token = tokens.new_token()
        salt = secrets.token_bytes(16)
        record = {
            "tenant": tenant,
            "subtenant": subtenant,
            "read_only": bool(read_only),
            "created": time.time(),
            "description": description,
            "salt": salt.hex(),
            "hash": tokens.hash_secret(tokens.secret_of(token), salt).hex(),
        }
        self._write({token_key(token_id): record})
        return token_id, record, token

    def revoke(self, token_id: str) -> None:
        if self.token(token_id) is None:
            raise errors.InvalidArgumentError(f"no token has id {token_id!r}", code=ErrorCode.UNKNOWN_TOKEN)
        self._write({token_key(token_id): None})
