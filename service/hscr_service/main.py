"""The FastAPI app: ``uvicorn hscr_service.main:app`` (settings from HSCR_* environment variables)."""

from __future__ import annotations

from contextlib import asynccontextmanager

import redis.asyncio as aredis
from fastapi import FastAPI
from prometheus_fastapi_instrumentator import Instrumentator
from rq import Queue

from hscr_jobs.store import Store, connect

from . import __version__
from .api import errors, openapi
from .api.edge import BodyLimit, RequestContext
from .api.main import api_router
from .core.config import Settings, get_settings
from .core.metrics import QueueCollector
from .core.security import KeyRing
from .core.storage import Storage


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        await app.state.async_redis.aclose()

    app = FastAPI(title="HSCR preference-data service", version=__version__, lifespan=lifespan,
                  description="Generate HSCR preference datasets for medical vision-language models. Jobs follow "
                              "the OpenAI Batch vocabulary; datasets stream to object storage.")
    client = connect(settings.redis_url)
    app.state.settings = settings
    app.state.keyring = KeyRing.from_settings(settings.api_keys, settings.api_keys_file)
    app.state.store = Store(client)
    app.state.async_redis = aredis.Redis.from_url(settings.redis_url, socket_connect_timeout=2)
    app.state.storage = Storage(settings.storage_uri)
    app.state.queue = Queue(settings.queue, connection=client)
    errors.install(app)
    app.include_router(api_router)
    for model in settings.served_models:  # each model's queue (see Settings.queue_for)
        QueueCollector.register(Queue(settings.queue_for(model), connection=client))
    Instrumentator(excluded_handlers=["/metrics"]).instrument(app).expose(app, include_in_schema=False)
    # Added last, so outermost: every request gets its id and its body cap before anything else runs.
    app.add_middleware(BodyLimit, settings=settings)
    app.add_middleware(RequestContext)
    openapi.install(app, settings)
    return app


def __getattr__(name: str):
    # `uvicorn hscr_service.main:app` builds the app on first access, not at import.
    if name == "app":
        globals()["app"] = create_app()
        return globals()["app"]
    raise AttributeError(name)
