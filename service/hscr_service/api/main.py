"""One router per resource."""

from fastapi import APIRouter

from .routes import datasets, files, health, jobs, viewer

api_router = APIRouter()
api_router.include_router(health.router)
api_router.include_router(files.router)
api_router.include_router(jobs.router)
api_router.include_router(datasets.router)
api_router.include_router(viewer.router)
