"""``client.files``: upload items files and images, read file objects back."""

from __future__ import annotations

import json
import mimetypes
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import anyio

from .._base_client import RequestOptions
from .._models import FileList, FileObject, FilePurpose
from .._types import NOT_GIVEN, NotGiven, Timeout, strip_not_given
from ._resource import AsyncAPIResource, SyncAPIResource, path_id

__all__ = ["AsyncFiles", "FileContent", "Files", "ItemsUpload", "plan_items_upload"]

# A path, raw bytes, an open binary file, or (filename, bytes).
FileContent = str | os.PathLike | bytes | IO[bytes] | tuple[str, bytes]

# Image uploads the async client keeps in flight at once (the sync client uploads one by one).
UPLOAD_CONCURRENCY = 8

# DICOM has no entry in Python's mimetypes table.
_EXTRA_TYPES = {".dcm": "application/dicom", ".dicom": "application/dicom", ".jsonl": "application/jsonl"}


def _read(file: FileContent, filename: str | NotGiven) -> tuple[str, bytes]:
    """Read the whole file once: a retried upload then sends the very same bytes."""
    if isinstance(file, tuple):
        name, content = file
    elif isinstance(file, bytes):
        name, content = "upload", file
    elif isinstance(file, (str, os.PathLike)):
        path = Path(file)
        name, content = path.name, path.read_bytes()
    else:
        name, content = Path(getattr(file, "name", "upload")).name, file.read()
    return (filename if isinstance(filename, str) else name), content


def _multipart(file: FileContent, purpose: str, filename: str | NotGiven) -> RequestOptions:
    name, content = _read(file, filename)
    suffix = Path(name).suffix.lower()
    content_type = _EXTRA_TYPES.get(suffix) or mimetypes.guess_type(name)[0] or "application/octet-stream"
    return RequestOptions("POST", "/v1/files", files={"file": (name, content, content_type)},
                          data={"purpose": purpose})


def _is_local_image(ref: object) -> bool:
    """An item's image that names a file on this machine (not an uploaded id, data URI or remote URL)."""
    if not isinstance(ref, str) or not ref.strip():
        return False
    if ref.startswith(("file-", "data:")):
        return False
    return ref.startswith("file://") or "://" not in ref


@dataclass
class ItemsUpload:
    """An items JSONL file read for upload: its lines, and the local images they reference.

    Lines that are not JSON objects are kept verbatim, so the service reports them as per-item
    errors instead of the SDK dropping them silently.
    """

    source: Path
    lines: list[dict | str] = field(default_factory=list)
    images: dict[str, Path] = field(default_factory=dict)  # reference as written -> resolved path

    def render(self, file_ids: dict[str, str]) -> bytes:
        """The JSONL to upload, each local image reference replaced by its uploaded file id."""
        out = []
        for line in self.lines:
            if isinstance(line, dict):
                ref = line.get("image")
                if isinstance(ref, str) and ref in file_ids:
                    line = {**line, "image": file_ids[ref]}
                out.append(json.dumps(line, ensure_ascii=False))
            else:
                out.append(line)
        return ("\n".join(out) + "\n").encode()


def plan_items_upload(path: str | os.PathLike) -> ItemsUpload:
    """Read an items JSONL file; local image paths resolve against its folder, like ``hscr generate``."""
    source = Path(path)
    plan = ItemsUpload(source=source)
    with open(source, encoding="utf-8") as handle:
        for raw in handle:
            text = raw.rstrip("\n")
            if not text.strip():
                continue
            try:
                item = json.loads(text)
            except ValueError:
                plan.lines.append(text)
                continue
            if not isinstance(item, dict):
                plan.lines.append(text)
                continue
            plan.lines.append(item)
            ref = item.get("image")
            if _is_local_image(ref) and ref not in plan.images:
                local = Path(ref.removeprefix("file://"))
                resolved = local if local.is_absolute() else source.parent / local
                # A missing file stays a reference: the service answers with a per-item error for it.
                if resolved.is_file():
                    plan.images[ref] = resolved
    return plan


class Files(SyncAPIResource):
    def upload(self, file: FileContent, *, purpose: FilePurpose, filename: str | NotGiven = NOT_GIVEN,
               timeout: Timeout | NotGiven = NOT_GIVEN) -> FileObject:
        """Upload one file: ``purpose="items"`` for an items JSONL, ``"image"`` for PNG, JPEG or DICOM."""
        options = _multipart(file, purpose, filename)
        options.timeout = timeout
        return self._client._request(FileObject, options)

    def upload_items(self, path: str | os.PathLike, *, timeout: Timeout | NotGiven = NOT_GIVEN) -> FileObject:
        """Upload an items JSONL together with the local images it references (each once).

        Returns the uploaded items file; pass its id as ``jobs.create(input_file_id=...)``.
        """
        plan = plan_items_upload(path)
        ids = {ref: self.upload(local, purpose="image", timeout=timeout).id for ref, local in plan.images.items()}
        return self.upload((plan.source.name, plan.render(ids)), purpose="items", timeout=timeout)

    def retrieve(self, file_id: str, *, timeout: Timeout | NotGiven = NOT_GIVEN) -> FileObject:
        return self._client._get(FileObject, f"/v1/files/{path_id(file_id, what='file_id')}", timeout=timeout)

    def list(self, *, limit: int | NotGiven = NOT_GIVEN, after: str | NotGiven = NOT_GIVEN,
             timeout: Timeout | NotGiven = NOT_GIVEN) -> FileList:
        params = strip_not_given({"limit": limit, "after": after})
        return self._client._get(FileList, "/v1/files", params=params, timeout=timeout)


class AsyncFiles(AsyncAPIResource):
    async def upload(self, file: FileContent, *, purpose: FilePurpose, filename: str | NotGiven = NOT_GIVEN,
                     timeout: Timeout | NotGiven = NOT_GIVEN) -> FileObject:
        options = _multipart(file, purpose, filename)
        options.timeout = timeout
        return await self._client._request(FileObject, options)

    async def upload_items(self, path: str | os.PathLike, *, timeout: Timeout | NotGiven = NOT_GIVEN
                           ) -> FileObject:
        plan = plan_items_upload(path)
        ids: dict[str, str] = {}
        limit = anyio.Semaphore(UPLOAD_CONCURRENCY)

        async def upload_image(ref: str, local: Path) -> None:
            async with limit:
                ids[ref] = (await self.upload(local, purpose="image", timeout=timeout)).id

        async with anyio.create_task_group() as group:
            for ref, local in plan.images.items():
                group.start_soon(upload_image, ref, local)
        return await self.upload((plan.source.name, plan.render(ids)), purpose="items", timeout=timeout)

    async def retrieve(self, file_id: str, *, timeout: Timeout | NotGiven = NOT_GIVEN) -> FileObject:
        return await self._client._get(FileObject, f"/v1/files/{path_id(file_id, what='file_id')}",
                                       timeout=timeout)

    async def list(self, *, limit: int | NotGiven = NOT_GIVEN, after: str | NotGiven = NOT_GIVEN,
                   timeout: Timeout | NotGiven = NOT_GIVEN) -> FileList:
        params = strip_not_given({"limit": limit, "after": after})
        return await self._client._get(FileList, "/v1/files", params=params, timeout=timeout)
