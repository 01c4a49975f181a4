"""Uploads: items JSONL files and images (PNG, JPEG, DICOM) -> file ids."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, File, Form, Query, UploadFile

from hscr_client import FileList, FileObject
from hscr_client._models import FilePurpose

from ...core.errors import NotFound, TooLarge
from ...core.files import store_upload
from ..deps import SettingsDep, StorageDep, StoreDep, TenantDep
from ..errors import ERROR_RESPONSES

router = APIRouter(prefix="/v1/files", tags=["files"], responses=ERROR_RESPONSES)


@router.post("", response_model=FileObject, status_code=201,
             responses={413: {"description": "The file is over the size limit for its purpose."}})
def upload_file(tenant: TenantDep, store: StoreDep, storage: StorageDep, settings: SettingsDep,
                file: Annotated[UploadFile, File(description="The file's bytes.")],
                purpose: Annotated[FilePurpose, Form(description="'items' (JSONL) or 'image' (PNG/JPEG/DICOM).")]):
    """Upload an items file or an image; use its id as a job's ``input_file_id`` or an item's ``image``."""
    limit = settings.max_image_bytes if purpose == "image" else settings.max_items_file_bytes
    data = file.file.read(limit + 1)
    if len(data) > limit:
        raise TooLarge(f"the file is over {limit} bytes, the limit for purpose {purpose!r}", param="file")
    record = store_upload(tenant=tenant, filename=file.filename or "upload", purpose=purpose, data=data,
                          store=store, storage=storage, settings=settings)
    return record.public()


@router.get("", response_model=FileList)
def list_files(tenant: TenantDep, store: StoreDep,
               limit: Annotated[int, Query(ge=1, le=100)] = 20,
               after: Annotated[str | None, Query(max_length=128, description="Last id of the previous page.")] = None):
    """The tenant's files, newest first."""
    return store.list_files(tenant, limit=limit, after=after)


@router.get("/{file_id}", response_model=FileObject)
def get_file(tenant: TenantDep, store: StoreDep, file_id: str):
    record = store.get_file(tenant, file_id)
    if record is None:
        raise NotFound(f"no file {file_id!r}")
    return record.public()
