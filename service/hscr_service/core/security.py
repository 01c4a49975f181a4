"""API keys: only their sha256 digests are configured and held; each maps to a tenant."""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from pathlib import Path

TENANT_PATTERN = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
DIGEST_PATTERN = re.compile(r"^[0-9a-f]{64}$")


def hash_key(api_key: str) -> str:
    """The digest stored for a key. API keys are long random tokens, so a plain sha256 suffices."""
    return hashlib.sha256(api_key.encode()).hexdigest()


def new_key() -> str:
    return "hscr-" + secrets.token_urlsafe(32)


class KeyRing:
    """Digest -> tenant. Built from 'tenant:sha256hex' entries (env or file)."""

    def __init__(self, entries: list[str]):
        self._tenants: dict[str, str] = {}
        for entry in entries:
            tenant, _, digest = entry.strip().partition(":")
            digest = digest.strip().lower()
            if not TENANT_PATTERN.match(tenant) or not DIGEST_PATTERN.match(digest):
                raise ValueError("each API key entry must be 'tenant:<sha256 hex of the key>' with a tenant of "
                                 "letters, digits, '.', '_' or '-' (the entry itself is not shown: it may be a secret)")
            self._tenants[digest] = tenant

    @classmethod
    def from_settings(cls, api_keys: list[str], api_keys_file: str | None) -> KeyRing:
        entries = list(api_keys)
        if api_keys_file:
            lines = Path(api_keys_file).read_text().splitlines()
            entries += [line for line in lines if line.strip() and not line.lstrip().startswith("#")]
        return cls(entries)

    def tenant_for(self, api_key: str) -> str | None:
        digest = hash_key(api_key)
        for known, tenant in self._tenants.items():
            if hmac.compare_digest(known, digest):  # constant time over every entry
                return tenant
        return None

    def __len__(self) -> int:
        return len(self._tenants)
