"""The served OpenAPI spec: FastAPI's, completed where it cannot say enough on its own.

- Models used only inside a non-JSON response (``Event``, each ``data:`` of the SSE stream) join the
  components, so every ``$ref`` resolves (``Event.model_json_schema()`` inline would point at ``#/$defs``).
- Links from the resources a POST creates to the operations that take their id, so clients and stateful
  testers (schemathesis) can follow a created job or file.
- ``JobCreate.model`` lists the models this service serves: any other name is refused.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from pydantic.json_schema import models_json_schema

from hscr_client import Event

from ..core.config import Settings

REF_TEMPLATE = "#/components/schemas/{model}"
EVENTS_PATH = "/v1/jobs/{job_id}/events"

# Link name -> (path, method) of each operation that takes the created resource's id.
_JOB_OPERATIONS = {
    "GetJob": ("/v1/jobs/{job_id}", "get"),
    "CancelJob": ("/v1/jobs/{job_id}/cancel", "post"),
    "GetDataset": ("/v1/jobs/{job_id}/dataset", "get"),
    "GetErrors": ("/v1/jobs/{job_id}/errors", "get"),
    "GetViewerSummary": ("/v1/jobs/{job_id}/viewer/summary", "get"),
    "GetViewerRows": ("/v1/jobs/{job_id}/viewer/rows", "get"),
}
_FILE_OPERATIONS = {"GetFile": ("/v1/files/{file_id}", "get")}


def _add_components(schema: dict[str, Any], models: list[type]) -> None:
    _, definitions = models_json_schema([(model, "serialization") for model in models], ref_template=REF_TEMPLATE)
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    for name, definition in definitions.get("$defs", {}).items():
        components.setdefault(name, definition)


def _link(schema: dict[str, Any], path: str, method: str, status: str, operations: dict[str, tuple[str, str]],
          parameter: str) -> None:
    response = schema["paths"][path][method]["responses"].get(status)
    if response is None:
        return
    links = response.setdefault("links", {})
    for name, (target_path, target_method) in operations.items():
        target = schema["paths"].get(target_path, {}).get(target_method)
        if target is None:
            continue
        links[name] = {"operationId": target["operationId"], "parameters": {parameter: "$response.body#/id"}}


def complete(schema: dict[str, Any], settings: Settings) -> None:
    """Complete FastAPI's spec in place (see the module doc)."""
    _add_components(schema, [Event])
    events = schema["paths"].get(EVENTS_PATH, {}).get("get")
    if events is not None:
        events["responses"]["200"]["content"]["text/event-stream"]["schema"] = {"$ref": REF_TEMPLATE.format(
            model="Event")}
    for status in ("200", "201"):
        _link(schema, "/v1/jobs", "post", status, _JOB_OPERATIONS, "job_id")
    _link(schema, "/v1/files", "post", "201", _FILE_OPERATIONS, "file_id")
    job_create = schema["components"]["schemas"].get("JobCreate", {}).get("properties", {})
    if "model" in job_create:
        job_create["model"] = {"anyOf": [{"type": "string", "enum": list(settings.served_models)}, {"type": "null"}],
                               "title": "Model", "description": job_create["model"].get("description", "")}


def install(app: FastAPI, settings: Settings) -> None:
    fastapi_openapi = app.openapi  # builds the spec once and caches it in app.openapi_schema

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            complete(fastapi_openapi(), settings)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
