"""The base of every resource: it holds its client and nothing else (all I/O goes through the client)."""

from __future__ import annotations

from typing import TYPE_CHECKING
from urllib.parse import quote

if TYPE_CHECKING:
    from .._client import AsyncClient, Client


class SyncAPIResource:
    def __init__(self, client: Client) -> None:
        self._client = client


class AsyncAPIResource:
    def __init__(self, client: AsyncClient) -> None:
        self._client = client


def path_id(value: str, *, what: str) -> str:
    """An id as one safe path segment; an empty id is the caller's bug, said plainly."""
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{what} must be a non-empty string, got {value!r}")
    return quote(value, safe="")
