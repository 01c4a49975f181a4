"""A job's dataset (shards readable while it runs) and its error file."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import StreamingResponse

from hscr_client import DatasetInfo

from ...core.datasets import dataset_info, iter_errors
from ..deps import JobIdPath, SettingsDep, StorageDep, StoreDep, TenantDep
from ..errors import ERROR_RESPONSES

router = APIRouter(prefix="/v1/jobs", tags=["datasets"], responses=ERROR_RESPONSES)


@router.get("/{job_id}/dataset", response_model=DatasetInfo)
def get_dataset(tenant: TenantDep, store: StoreDep, storage: StorageDep, settings: SettingsDep,
                job_id: JobIdPath):
    """Shards written so far with download URLs; the manifest once the job is finalized."""
    return dataset_info(tenant=tenant, job_id=job_id, store=store, storage=storage, expires=settings.presign_seconds)


@router.get("/{job_id}/errors", response_class=StreamingResponse,
            responses={200: {"content": {"application/x-ndjson": {}},
                             "description": "One JSON object per failed item: custom_id and error."}})
def get_errors(tenant: TenantDep, store: StoreDep, storage: StorageDep, job_id: JobIdPath):
    """The error file: every item that failed, with its custom_id and why (grows while the job runs)."""
    return StreamingResponse(iter_errors(tenant=tenant, job_id=job_id, store=store, storage=storage),
                             media_type="application/x-ndjson")
