"""Jobs: create (inline items or an uploaded items file), get, list, cancel, progress events."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Header, Query, Request, Response
from sse_starlette import EventSourceResponse

from hscr_client import ErrorResponse, Job, JobCreate, JobList
from hscr_client._models import ID_PATTERN, ID_RULE

from ...core import jobs
from ...core.errors import NotFound, TooLarge
from ...core.events import stream_events
from ..deps import AfterQuery, JobIdPath, QueueDep, SettingsDep, StorageDep, StoreDep, TenantDep
from ..errors import BODY_ERROR_RESPONSES, ERROR_RESPONSES

# A Redis stream id, as the events carry it.
EVENT_ID_PATTERN = r"^[0-9]{1,20}-[0-9]{1,20}$"

router = APIRouter(prefix="/v1/jobs", tags=["jobs"], responses=ERROR_RESPONSES)


@router.post("", response_model=Job, status_code=201,
             responses={200: {"model": Job, "description": "The job an earlier request with this "
                                                           "Idempotency-Key created."},
                        409: {"model": ErrorResponse,
                              "description": "The Idempotency-Key was used with a different body."},
                        **BODY_ERROR_RESPONSES,
                        413: {"model": ErrorResponse, "description": "The body or the item count is over its limit "
                                                                     "(the message names the setting)."}})
def create_job(tenant: TenantDep, store: StoreDep, storage: StorageDep, queue: QueueDep, settings: SettingsDep,
               body: JobCreate, response: Response,
               idempotency_key: Annotated[str | None, Header(alias="Idempotency-Key", pattern=ID_PATTERN,
                                                             description="Retrying with the same key never makes "
                                                                         f"a second job. {ID_RULE}.")] = None):
    """Create a job; its chunks are queued at once. Per-item problems go to the error file, not a 4xx."""
    if body.items is not None and len(body.items) > settings.max_items_per_job:
        raise TooLarge(f"the job has {len(body.items)} items; the limit is {settings.max_items_per_job} per job "
                       "(HSCR_MAX_ITEMS_PER_JOB): split the items into several jobs", param="items")
    job, created = jobs.create_job(tenant=tenant, request=body, idempotency_key=idempotency_key, store=store,
                                   storage=storage, queue=queue, settings=settings)
    if not created:
        response.status_code = 200
    return job


@router.get("", response_model=JobList)
def list_jobs(tenant: TenantDep, store: StoreDep, queue: QueueDep, after: AfterQuery = None,
              limit: Annotated[int, Query(ge=1, le=100)] = 20):
    """The tenant's jobs, newest first."""
    page = store.list_jobs(tenant, limit=limit, after=after)
    page.data = [jobs.expire_if_due(job, tenant=tenant, store=store, queue=queue) for job in page.data]
    return page


@router.get("/{job_id}", response_model=Job)
def get_job(tenant: TenantDep, store: StoreDep, queue: QueueDep, job_id: JobIdPath):
    job = store.get_job(tenant, job_id)
    if job is None:
        raise NotFound(f"no job {job_id!r}")
    return jobs.expire_if_due(job, tenant=tenant, store=store, queue=queue)


@router.post("/{job_id}/cancel", response_model=Job,
             responses={409: {"model": ErrorResponse, "description": "The job already ended."}})
def cancel_job(tenant: TenantDep, store: StoreDep, queue: QueueDep, job_id: JobIdPath):
    """Stop the job; finished shards are kept and finalized. It ends ``cancelled`` at once when no chunk is
    running, else it is ``cancelling`` until the running chunks stop."""
    return jobs.cancel_job(tenant=tenant, job_id=job_id, store=store, queue=queue)


@router.get("/{job_id}/events", response_class=EventSourceResponse,
            responses={200: {"content": {"text/event-stream": {"schema": {"$ref": "#/components/schemas/Event"}}},
                             "description": "Server-sent events; each data line is an Event. The stream ends "
                                            "after a terminal status."}})
def job_events(tenant: TenantDep, store: StoreDep, settings: SettingsDep, request: Request, job_id: JobIdPath,
               last_event_id: Annotated[str | None, Header(alias="Last-Event-ID", pattern=EVENT_ID_PATTERN,
                                                           description="The id of the last event received "
                                                                       "(<ms>-<seq>).")] = None):
    """Progress as server-sent events: ``job.status``, ``job.progress``, ``job.shard`` (a shard is readable)."""
    if store.get_job(tenant, job_id) is None:
        raise NotFound(f"no job {job_id!r}")
    events = stream_events(request.app.state.async_redis, store, tenant=tenant, job_id=job_id,
                           last_event_id=last_event_id, is_disconnected=request.is_disconnected)
    return EventSourceResponse(events, ping=int(settings.event_keepalive_seconds))
