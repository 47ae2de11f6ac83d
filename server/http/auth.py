"""API keys -> (tenant, role). Keys are stored hashed; lookups compare hashes in constant time."""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from fastapi import Request

from server.http.problems import ProblemError
from server.registry.store import SHARED_TENANT

log = logging.getLogger("adapterserve.auth")

Role = Literal["tenant", "admin"]
OPEN_TENANT = "default"
TENANT_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,62}$")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


def owner_label(tenant: str) -> str:
    """How responses name an adapter's owner: "shared" for the shared tenant, else "tenant"."""
    return "shared" if tenant == SHARED_TENANT else "tenant"


def hash_key(key: str) -> str:
    """The sha256 hex digest stored in the keys file for a raw key."""
    return hashlib.sha256(key.encode()).hexdigest()


@dataclass(frozen=True)
class Principal:
    """Who is calling: the tenant they act as and their role."""

    tenant: str
    role: Role
    key_id: str  # first 12 hex chars of the key's hash, for logs and `uploader`

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"

    @property
    def uploader(self) -> str:
        """How meta.json records who stored a version: tenant and key id, never the key."""
        return f"{self.tenant}:{self.key_id}"

    def write_tenant(self, shared: bool) -> str:
        """Where a write goes: the caller's tenant, or the shared tenant (admins only; 403 otherwise)."""
        if not shared:
            return self.tenant
        if not self.is_admin:
            raise ProblemError(403, "forbidden", "only admin keys may manage shared adapters")
        return SHARED_TENANT


@dataclass(frozen=True)
class KeyEntry:
    sha256: bytes
    tenant: str
    role: Role


def parse_keys(data: object, source: str) -> list[KeyEntry]:
    """Validate the keys file structure; raise ValueError saying which entry is wrong."""
    if not isinstance(data, dict) or not isinstance(data.get("keys"), list):
        raise ValueError(f"{source}: expected an object {{\"keys\": [...]}}")
    entries: list[KeyEntry] = []
    for i, item in enumerate(data["keys"]):
        if not isinstance(item, dict):
            raise ValueError(f"{source}: keys[{i}] is not an object")
        digest = str(item.get("sha256", "")).lower()
        tenant = item.get("tenant")
        role = item.get("role", "tenant")
        if not _HEX64.match(digest):
            raise ValueError(f"{source}: keys[{i}].sha256 must be 64 hex chars (see `adapterserve hash-key`)")
        if not isinstance(tenant, str) or not TENANT_RE.match(tenant):
            raise ValueError(f"{source}: keys[{i}].tenant must match {TENANT_RE.pattern}")
        if role not in ("tenant", "admin"):
            raise ValueError(f"{source}: keys[{i}].role must be 'tenant' or 'admin'")
        entries.append(KeyEntry(bytes.fromhex(digest), tenant, role))
    return entries


class KeyRing:
    """The keys file, reloaded when its mtime changes (so a rotated k8s Secret takes effect)."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._mtime: float | None = None
        self._entries: list[KeyEntry] = []
        if path is not None:
            self._load()

    @property
    def open_mode(self) -> bool:
        return self.path is None

    def _load(self) -> None:
        assert self.path is not None
        mtime = os.stat(self.path).st_mtime
        entries = parse_keys(json.loads(self.path.read_text()), str(self.path))
        self._entries, self._mtime = entries, mtime

    def _maybe_reload(self) -> None:
        if self.path is None:
            return
        try:
            if os.stat(self.path).st_mtime != self._mtime:
                with self._lock:
                    self._load()
                    log.info("reloaded API keys from %s (%d keys)", self.path, len(self._entries))
        except (OSError, ValueError) as exc:  # keep serving with the last good keys
            log.error("cannot reload API keys from %s: %s", self.path, exc)

    def tenants(self) -> set[str]:
        """Every tenant named in the keys file (the only values the tenant metric label takes)."""
        if self.path is None:
            return {OPEN_TENANT}
        return {e.tenant for e in self._entries}

    def lookup(self, key: str) -> Principal | None:
        """The principal for a raw key, comparing every stored hash in constant time."""
        self._maybe_reload()
        digest = hashlib.sha256(key.encode()).digest()
        found: KeyEntry | None = None
        for entry in self._entries:  # no early exit: time does not depend on which entry matches
            if hmac.compare_digest(entry.sha256, digest):
                found = entry
        if found is None:
            return None
        return Principal(found.tenant, found.role, found.sha256.hex()[:12])


OPEN_PRINCIPAL = Principal(OPEN_TENANT, "admin", "open")


def _presented_key(request: Request) -> str | None:
    auth = request.headers.get("authorization")
    if auth:
        scheme, _, value = auth.partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            return value.strip()
    key = request.headers.get("x-api-key")
    return key.strip() if key and key.strip() else None


async def authenticate(request: Request) -> Principal:
    """FastAPI dependency: the caller's principal, or 401 problem+json."""
    keyring: KeyRing = request.app.state.keyring
    if keyring.open_mode:
        principal = OPEN_PRINCIPAL
    else:
        key = _presented_key(request)
        if key is None:
            raise ProblemError(
                401, "unauthorized", "missing API key: send 'Authorization: Bearer <key>' or 'X-API-Key: <key>'",
                {"WWW-Authenticate": 'Bearer realm="adapterserve"'},
            )
        found = keyring.lookup(key)
        if found is None:
            raise ProblemError(401, "unauthorized", "unknown API key", {"WWW-Authenticate": 'Bearer error="invalid_token"'})
        principal = found
    request.state.tenant = principal.tenant
    return principal
