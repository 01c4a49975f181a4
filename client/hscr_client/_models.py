"""Wire models of the HSCR service: what the API returns and accepts, shared by the service and the SDK.

Jobs follow the OpenAI Batch vocabulary (statuses, per-status timestamps, ``request_counts``,
``metadata``). Every model here is plain pydantic with no I/O, so the SDK needs nothing heavier.
Changes to this module are additive only: clients in the field parse what servers send.

Resource families (input, output and list types never mix)::

    FileObject, FileList            POST/GET /v1/files
    ItemInput -> JobCreate          POST /v1/jobs (inline items or an uploaded items file)
    Job, JobList                    GET /v1/jobs, GET /v1/jobs/{id}, POST /v1/jobs/{id}/cancel
    Event                           GET /v1/jobs/{id}/events (server-sent events, ``data:`` is an Event)
    DatasetInfo, ShardInfo          GET /v1/jobs/{id}/dataset
    ErrorResponse(ErrorDetail)      the body of every 4xx/5xx answer
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from ._params import HSCRParams

JobStatus = Literal["validating", "failed", "in_progress", "finalizing", "completed", "expired", "cancelling",
                    "cancelled"]
# Statuses a job never leaves.
TERMINAL_STATUSES: frozenset[str] = frozenset({"failed", "completed", "expired", "cancelled"})

FilePurpose = Literal["items", "image"]
COMPLETION_WINDOW_PATTERN = r"^[1-9][0-9]{0,5}[smhd]$"
_WINDOW_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def completion_window_seconds(window: str) -> int:
    """'24h' -> 86400 (a ``completion_window``, already matched against COMPLETION_WINDOW_PATTERN)."""
    return int(window[:-1]) * _WINDOW_UNITS[window[-1]]

EventType = Literal["job.status", "job.progress", "job.shard"]

MAX_QUESTION_CHARS = 4000
MAX_METADATA_KEYS = 16

# One rule for every id a client names: an item's custom_id (inline or in an items file), job and file ids (in
# paths, input_file_id, an item's image, the ``after`` cursor) and Idempotency-Keys. No separator (':' of the
# service's Redis keys, '/' of storage paths), space or control character ever travels inside an id.
ID_MAX_CHARS = 256
ID_PATTERN = rf"^[A-Za-z0-9._-]{{1,{ID_MAX_CHARS}}}$"
ID_RULE = f"1 to {ID_MAX_CHARS} characters, each an ASCII letter, a digit, '.', '_' or '-'"
_ID = re.compile(ID_PATTERN[1:-1])


def is_valid_id(value: object) -> bool:
    """Whether ``value`` follows the id rule (:data:`ID_RULE`)."""
    return isinstance(value, str) and _ID.fullmatch(value) is not None


def id_problem(value: object, what: str) -> str | None:
    """Why ``value`` is no valid id, in words that say how to fix it; None when it is one."""
    if is_valid_id(value):
        return None
    if not isinstance(value, str):
        return f"{what} must be a string of {ID_RULE}, not {json_type(value)}"
    shown = repr(value if len(value) <= 40 else value[:40] + "...")
    return f"{what} {shown} is not a valid id ({len(value)} characters): use {ID_RULE}"


def json_type(value: object) -> str:
    """The JSON name of a value's type, for messages about items (which are JSON)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return "a string" if isinstance(value, str) else type(value).__name__


class _Wire(BaseModel):
    # Servers may add fields later; an older SDK must still parse the answer.
    model_config = ConfigDict(extra="ignore")


# --- errors ----------------------------------------------------------------------------------------

class ErrorDetail(_Wire):
    code: str = Field(description="Machine-readable reason, e.g. 'not_found', 'invalid_request', 'too_large'.")
    message: str = Field(description="What went wrong and how to fix it, for a person.")
    param: str | None = Field(None, description="The request field at fault, when there is one.")
    request_id: str | None = Field(None, description="The request's id (also the X-Request-ID header): quote it "
                                                     "when reporting a problem.")


class ErrorResponse(_Wire):
    error: ErrorDetail


# --- files -----------------------------------------------------------------------------------------

class FileObject(_Wire):
    id: str = Field(description="File id ('file-...'): use it as input_file_id or as an item's image.")
    object: Literal["file"] = "file"
    bytes: int
    created_at: int = Field(description="Unix seconds.")
    filename: str
    purpose: FilePurpose = Field(description="'items': an items JSONL file; 'image': a PNG, JPEG or DICOM image.")
    content_type: str | None = None
    sha256: str | None = None


class FileList(_Wire):
    object: Literal["list"] = "list"
    data: list[FileObject]
    first_id: str | None = None
    last_id: str | None = None
    has_more: bool = False


# --- jobs ------------------------------------------------------------------------------------------

class ItemInput(BaseModel):
    """One item: an image, a question and optionally the preferred answer (else the model's own is used)."""

    model_config = ConfigDict(extra="ignore")

    custom_id: str | None = Field(None, pattern=ID_PATTERN,
                                  description=f"Your id for the item, echoed in the dataset and the error file: "
                                              f"{ID_RULE} (the same rule in items files) [default: item-<index>].")
    image: str = Field(min_length=1, description="An uploaded file id ('file-...', purpose 'image') or a "
                                                 "base64 data URI (data:image/png;base64,...).")
    question: str = Field(min_length=1, max_length=MAX_QUESTION_CHARS)
    answer: str | None = Field(None, min_length=1, description="The preferred answer, if you have one.")


class JobCreate(BaseModel):
    """Create a job from an uploaded items file (``input_file_id``) or from inline ``items``: exactly one."""

    # "Exactly one" in the JSON schema too, so the spec describes precisely the bodies the service accepts.
    model_config = ConfigDict(extra="forbid", json_schema_extra={"oneOf": [
        {"required": ["input_file_id"], "properties": {"input_file_id": {"type": "string"}, "items": {"type": "null"}}},
        {"required": ["items"], "properties": {"items": {"type": "array"}, "input_file_id": {"type": "null"}}},
    ]})

    input_file_id: str | None = Field(None, pattern=ID_PATTERN,
                                      description="An uploaded file with purpose 'items' (JSONL, one item per line).")
    items: list[ItemInput] | None = Field(None, min_length=1, description="Inline items (small jobs).")
    model: str | None = Field(None, description="Model to run [default: the service's configured model]. "
                                                "Must be one the workers serve.")
    params: HSCRParams = Field(default_factory=HSCRParams, description="HSCR parameters.")
    metadata: dict[str, str] | None = Field(None, description=f"Up to {MAX_METADATA_KEYS} string pairs, "
                                                              "returned with the job.",
                                            json_schema_extra={"maxProperties": MAX_METADATA_KEYS})
    completion_window: str | None = Field(
        None, pattern=COMPLETION_WINDOW_PATTERN, examples=["24h"],
        description="Time the job has to finish, as <number><s|m|h|d> (OpenAI Batch's completion_window) "
                    "[default: the service's, 24h]. A job still running then ends 'expired'; finished shards "
                    "are kept.")

    @model_validator(mode="after")
    def _one_input(self) -> JobCreate:
        if (self.input_file_id is None) == (self.items is None):
            raise ValueError("give exactly one of input_file_id or items")
        if self.metadata and len(self.metadata) > MAX_METADATA_KEYS:
            raise ValueError(f"metadata has {len(self.metadata)} keys; the limit is {MAX_METADATA_KEYS}")
        return self


class RequestCounts(_Wire):
    """Every item lands in exactly one count: ``total = completed + failed + cancelled + expired``.

    ``cancelled`` and ``expired`` items were never run (the job was cancelled, or its completion window ended
    first); the dataset's ``skipped.jsonl`` lists them with the reason.
    """

    total: int = 0
    completed: int = 0
    failed: int = 0
    cancelled: int = 0
    expired: int = 0


class ChunkCounts(_Wire):
    """Chunks are the unit of work and retry; each finished chunk is one shard per config."""

    total: int = 0
    done: int = 0


class JobError(_Wire):
    code: str
    message: str


class Job(_Wire):
    id: str = Field(description="Job id ('job-...'); also the dataset's folder name.")
    object: Literal["job"] = "job"
    status: JobStatus
    model: str
    params: HSCRParams
    input_file_id: str | None = None
    metadata: dict[str, str] | None = None
    request_counts: RequestCounts = Field(default_factory=RequestCounts)
    chunk_counts: ChunkCounts = Field(default_factory=ChunkCounts)
    errors: list[JobError] | None = Field(None, description="Why the whole job failed (per-item failures are in "
                                                            "the error file, never here).")
    dataset_uri: str | None = Field(None, description="Where the dataset is written (s3://... or a local path).")
    created_at: int
    expires_at: int | None = Field(None, description="When the job ends 'expired' if it has not finished.")
    in_progress_at: int | None = None
    finalizing_at: int | None = None
    completed_at: int | None = None
    failed_at: int | None = None
    expired_at: int | None = None
    cancelling_at: int | None = None
    cancelled_at: int | None = None

    @property
    def is_terminal(self) -> bool:
        return self.status in TERMINAL_STATUSES


class JobList(_Wire):
    object: Literal["list"] = "list"
    data: list[Job]
    first_id: str | None = None
    last_id: str | None = Field(None, description="Pass as ``after`` to get the next page.")
    has_more: bool = False


# --- progress events -------------------------------------------------------------------------------

class Event(_Wire):
    """One server-sent event; its SSE ``id`` resumes the stream (``Last-Event-ID``)."""

    id: str = Field(description="Stream position, increasing.")
    type: EventType
    job_id: str
    created_at: float
    status: JobStatus
    request_counts: RequestCounts
    chunk_counts: ChunkCounts
    chunk: int | None = Field(None, description="For job.shard: the chunk whose shards were just written.")


# --- datasets --------------------------------------------------------------------------------------

class ShardInfo(_Wire):
    config: Literal["pairs", "ranked"]
    chunk: int
    path: str = Field(description="Path inside the dataset, e.g. pairs/part-00003.parquet.")
    rows: int
    sha256: str
    bytes: int
    url: str | None = Field(None, description="A presigned https URL (S3) or a file:// URL (local storage).")


class DatasetInfo(_Wire):
    object: Literal["dataset"] = "dataset"
    job_id: str
    status: JobStatus
    complete: bool = Field(description="True once the manifest is written (job completed or cancelled).")
    uri: str = Field(description="The dataset's location (s3://bucket/prefix/datasets/<job> or a local path).")
    shards: list[ShardInfo]
    manifest: dict[str, Any] | None = Field(None, description="manifest.json, once written.")
    manifest_url: str | None = None
    card_url: str | None = None
    errors_url: str | None = None
    skipped_url: str | None = Field(None, description="Items never run (cancelled or expired), once finalized.")
    url_expires_at: int | None = Field(None, description="Unix seconds after which presigned URLs stop working.")
    storage_options: dict[str, Any] | None = Field(None, description="Non-secret options for reading ``uri`` "
                                                                     "directly (e.g. the S3 endpoint).")


__all__ = [
    "TERMINAL_STATUSES", "ChunkCounts", "DatasetInfo", "ErrorDetail", "ErrorResponse", "Event", "EventType",
    "FileList", "FileObject", "FilePurpose", "ItemInput", "Job", "JobCreate", "JobError", "JobList", "JobStatus",
    "RequestCounts", "ShardInfo",
]
