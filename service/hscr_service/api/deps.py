"""Dependencies as named Annotated aliases, so route signatures read like prose."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Path, Query, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from rq import Queue

from hscr_client._models import ID_PATTERN, ID_RULE
from hscr_jobs.store import Store

from ..core.config import Settings
from ..core.errors import ServiceError
from ..core.storage import Storage

_bearer = HTTPBearer(auto_error=False, description="An API key: `Authorization: Bearer <key>`.")


class Unauthorized(ServiceError):
    status_code = 401
    code = "unauthorized"


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_store(request: Request) -> Store:
    return request.app.state.store


def get_storage(request: Request) -> Storage:
    return request.app.state.storage


def get_queue(request: Request) -> Queue:
    return request.app.state.queue


def get_tenant(request: Request,
               credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]) -> str:
    if credentials is None or credentials.scheme.lower() != "bearer" or not credentials.credentials:
        raise Unauthorized("missing API key: send 'Authorization: Bearer <key>'")
    tenant = request.app.state.keyring.tenant_for(credentials.credentials)
    if tenant is None:
        raise Unauthorized("invalid API key")
    return tenant


SettingsDep = Annotated[Settings, Depends(get_settings)]
StoreDep = Annotated[Store, Depends(get_store)]
StorageDep = Annotated[Storage, Depends(get_storage)]
QueueDep = Annotated[Queue, Depends(get_queue)]
TenantDep = Annotated[str, Depends(get_tenant)]

# Ids in paths and queries follow the one id rule (hscr_client._models.ID_RULE), checked before any lookup.
JobIdPath = Annotated[str, Path(pattern=ID_PATTERN, description=f"A job id ('job-...'): {ID_RULE}.")]
FileIdPath = Annotated[str, Path(pattern=ID_PATTERN, description=f"A file id ('file-...'): {ID_RULE}.")]
AfterQuery = Annotated[str | None, Query(pattern=ID_PATTERN,
                                         description=f"The last id of the previous page ({ID_RULE}).")]
