"""Uploads: items JSONL files and images (PNG, JPEG, DICOM) -> file ids."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, File, Form, Query, UploadFile

from hscr_client import ErrorResponse, FileList, FileObject
from hscr_client._models import FilePurpose

from ...core.errors import NotFound
from ...core.files import store_upload
from ..deps import AfterQuery, FileIdPath, SettingsDep, StorageDep, StoreDep, TenantDep
from ..errors import BODY_ERROR_RESPONSES, ERROR_RESPONSES

router = APIRouter(prefix="/v1/files", tags=["files"], responses=ERROR_RESPONSES)


@router.post("", response_model=FileObject, status_code=201,
             responses={**BODY_ERROR_RESPONSES,
                        413: {"model": ErrorResponse, "description": "The body, or the file for its purpose, is over "
                                                                     "its limit (the message names the setting)."}})
def upload_file(tenant: TenantDep, store: StoreDep, storage: StorageDep, settings: SettingsDep,
                file: Annotated[UploadFile, File(description="The file's bytes.")],
                purpose: Annotated[FilePurpose, Form(description="'items' (JSONL) or 'image' (PNG/JPEG/DICOM).")]):
    """Upload an items file or an image; use its id as a job's ``input_file_id`` or an item's ``image``."""
    # The body arrived spooled to a temporary file (the edge capped it); it is checked and copied from there.
    size = file.size if file.size is not None else file.file.seek(0, 2)
    record = store_upload(tenant=tenant, filename=file.filename or "upload", purpose=purpose, upload=file.file,
                          size=size, store=store, storage=storage, settings=settings)
    return record.public()


@router.get("", response_model=FileList)
def list_files(tenant: TenantDep, store: StoreDep, after: AfterQuery = None,
               limit: Annotated[int, Query(ge=1, le=100)] = 20):
    """The tenant's files, newest first."""
    return store.list_files(tenant, limit=limit, after=after)


@router.get("/{file_id}", response_model=FileObject)
def get_file(tenant: TenantDep, store: StoreDep, file_id: FileIdPath):
    record = store.get_file(tenant, file_id)
    if record is None:
        raise NotFound(f"no file {file_id!r}")
    return record.public()
