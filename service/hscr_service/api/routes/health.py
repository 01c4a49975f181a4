"""Liveness and readiness (Redis and storage reachable). /metrics is mounted by main.py."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from ..errors import RETRY_AFTER_SECONDS

router = APIRouter(tags=["health"])
CHECK_TIMEOUT = 3.0


class Health(BaseModel):
    status: str
    checks: dict[str, str] = {}


@router.get("/healthz", response_model=Health)
async def healthz():
    """The process is up."""
    return Health(status="ok")


@router.get("/readyz", response_model=Health,
            responses={503: {"model": Health, "description": "Not ready: ``checks`` names what is unreachable.",
                             "headers": {"Retry-After": {"description": "Seconds to wait before asking again.",
                                                         "schema": {"type": "integer"}}}}})
async def readyz(request: Request):
    """Ready when Redis answers PING and the storage root can be listed (each check bounded in time)."""
    state = request.app.state
    checks = {}
    for name, probe in (("redis", state.store.redis.ping), ("storage", state.storage.check)):
        try:
            await asyncio.wait_for(asyncio.to_thread(probe), CHECK_TIMEOUT)
            checks[name] = "ok"
        except Exception as exc:  # any failure means not ready; say which
            checks[name] = f"unreachable: {type(exc).__name__}"
    ready = all(v == "ok" for v in checks.values())
    body = Health(status="ok" if ready else "unavailable", checks=checks)
    if ready:
        return JSONResponse(body.model_dump())
    return JSONResponse(body.model_dump(), status_code=503, headers={"Retry-After": str(RETRY_AFTER_SECONDS)})
