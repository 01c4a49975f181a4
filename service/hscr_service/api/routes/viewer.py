"""The token-level reward viewer of a job's dataset (``hscr_client.viewer``), served page by page.

- ``GET /v1/jobs/{job_id}/viewer``: the HTML page. With a valid key: the page with the dataset's
  summary embedded. A browser navigation without an ``Authorization`` header (``Accept: text/html``)
  gets the same page without any data, identical for every job id, so nothing is revealed; the page
  asks for an API key (kept in the tab's sessionStorage) and sends it with each request below.
- ``GET /v1/jobs/{job_id}/viewer/summary`` and ``.../viewer/rows``: JSON, bearer key required;
  another tenant's job answers 404 like every other route.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import HTMLResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel

from hscr_client.viewer import MAX_PAGE_ROWS, MODALITIES, DatasetCache, Filters, ViewerDataset, render_app

from ...core.errors import NotFound
from ..deps import JobIdPath, StoreDep, TenantDep, get_tenant
from ..errors import ERROR_RESPONSES

# The modality filter's values, as the spec's enum: exactly what Filters accepts.
Modality = Literal[tuple(MODALITIES)]  # type: ignore[valid-type]
# The page itself is HTML, its errors are JSON like every route's: say so per status (FastAPI would document
# them under the route's text/html).
_JSON_ERRORS = {status: {"description": spec["description"],
                         "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}},
                         **({"headers": spec["headers"]} if "headers" in spec else {})}
                for status, spec in ERROR_RESPONSES.items()}

router = APIRouter(prefix="/v1/jobs", tags=["viewer"], responses=ERROR_RESPONSES)
_optional_bearer = HTTPBearer(auto_error=False, description="An API key: `Authorization: Bearer <key>`.")

# Scripts and styles are inline in the page; it loads nothing else and talks only to this API.
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
                               "img-src data:; connect-src 'self'; base-uri 'none'; form-action 'none'; "
                               "frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


class ViewerPage(BaseModel):
    """One page of filtered items: view rows (``hscr_client.viewer``) and failed items."""

    total: int
    offset: int
    limit: int
    items: list[dict[str, Any]]


def get_viewer_cache(request: Request) -> DatasetCache:
    cache = getattr(request.app.state, "viewer_cache", None)
    if cache is None:
        cache = request.app.state.viewer_cache = DatasetCache(maxsize=4)
    return cache


ViewerCacheDep = Annotated[DatasetCache, Depends(get_viewer_cache)]


def job_dataset(*, tenant: str, job_id: str, store, cache: DatasetCache) -> ViewerDataset:
    """The viewer rows of a job of ``tenant`` (empty while its first chunk is running)."""
    job = store.get_job(tenant, job_id)
    if job is None:
        raise NotFound(f"no job {job_id!r}")
    return cache.get(job.dataset_uri, allow_empty=True)


def _urls(request: Request, job_id: str) -> dict[str, str]:
    return {"rows_url": str(request.url_for("viewer_rows", job_id=job_id).path),
            "summary_url": str(request.url_for("viewer_summary", job_id=job_id).path)}


@router.get("/{job_id}/viewer", response_class=HTMLResponse, name="viewer_page",
            responses={200: {"content": {"text/html": {"schema": {"type": "string"}}},
                             "description": "The viewer page."}, **_JSON_ERRORS})
def viewer_page(request: Request, store: StoreDep, cache: ViewerCacheDep, job_id: JobIdPath,
                credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_optional_bearer)]):
    """The viewer page of the job's dataset (see the module doc for how a browser authenticates)."""
    title = f"HSCR job {job_id}"
    navigation = "text/html" in request.headers.get("accept", "") and "authorization" not in request.headers
    if navigation:
        return HTMLResponse(render_app(title=title, **_urls(request, job_id)), headers=PAGE_HEADERS)
    tenant = get_tenant(request, credentials)
    dataset = job_dataset(tenant=tenant, job_id=job_id, store=store, cache=cache)
    summary = dataset.summary(title=title, source=f"job {job_id}")
    return HTMLResponse(render_app(title=title, summary=summary, **_urls(request, job_id)), headers=PAGE_HEADERS)


@router.get("/{job_id}/viewer/summary", name="viewer_summary", response_model=dict[str, Any])
def viewer_summary(tenant: TenantDep, store: StoreDep, cache: ViewerCacheDep, job_id: JobIdPath):
    """Counts, levels and modalities of the job's dataset, for the page's header and filters."""
    dataset = job_dataset(tenant=tenant, job_id=job_id, store=store, cache=cache)
    return dataset.summary(title=f"HSCR job {job_id}", source=f"job {job_id}")


@router.get("/{job_id}/viewer/rows", name="viewer_rows", response_model=ViewerPage)
def viewer_rows(
    tenant: TenantDep, store: StoreDep, cache: ViewerCacheDep, job_id: JobIdPath,
    offset: Annotated[int, Query(ge=0, le=10_000_000, description="Items to skip.")] = 0,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE_ROWS, description="Items per page.")] = 25,
    status: Annotated[Literal["ranked", "errors", "warnings", "all"],
                      Query(description="ranked rows, failed items, rows with warnings, or all.")] = "ranked",
    level: Annotated[int | None, Query(ge=0, le=1000, description="Only rows with this level.")] = None,
    q: Annotated[str, Query(max_length=500, description="Words that must all occur (case-insensitive).")] = "",
    modality: Annotated[Modality | None, Query(description="Only rows whose question or answers name this "
                                                           "modality.")] = None,
):
    """A page of the job's dataset as view rows with thumbnails (filters as in ``hscr_client.viewer.Filters``)."""
    dataset = job_dataset(tenant=tenant, job_id=job_id, store=store, cache=cache)
    filters = Filters(level=level, q=q, modality=modality, status=status)
    return dataset.page(filters, offset=offset, limit=limit)
