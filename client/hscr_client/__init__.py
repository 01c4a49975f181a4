"""hscr-client: the public contract (wire models, dataset schema) and the SDK of the HSCR service."""

from ._models import (
    TERMINAL_STATUSES,
    ChunkCounts,
    DatasetInfo,
    ErrorDetail,
    ErrorResponse,
    Event,
    FileList,
    FileObject,
    ItemInput,
    Job,
    JobCreate,
    JobError,
    JobList,
    JobStatus,
    RequestCounts,
    ShardInfo,
)
from ._params import HSCRParams

__all__ = [
    "TERMINAL_STATUSES",
    "ChunkCounts",
    "DatasetInfo",
    "ErrorDetail",
    "ErrorResponse",
    "Event",
    "FileList",
    "FileObject",
    "HSCRParams",
    "ItemInput",
    "Job",
    "JobCreate",
    "JobError",
    "JobList",
    "JobStatus",
    "RequestCounts",
    "ShardInfo",
]
