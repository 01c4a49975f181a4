"""Service settings: one pydantic-settings class, read from ``HSCR_*`` environment variables."""

from __future__ import annotations

from functools import lru_cache
from typing import Annotated

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from hscr_client._models import COMPLETION_WINDOW_PATTERN


class Settings(BaseSettings):
    """Every knob of the API. Workers read ``HSCR_REDIS_URL`` and ``HSCR_QUEUE`` too."""

    model_config = SettingsConfigDict(env_prefix="HSCR_", env_ignore_empty=True, extra="ignore")

    redis_url: str = Field("redis://127.0.0.1:6379/0", description="Job state and the RQ queue.")
    queue: str = Field("hscr", description="RQ queue the workers listen on.")
    storage_uri: str = Field("./hscr-data", description="Local directory or s3://bucket/prefix for uploads, "
                                                        "chunk inputs and datasets. S3 endpoint and credentials: "
                                                        "HSCR_S3_ENDPOINT, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY.")
    api_keys: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Comma-separated 'tenant:sha256hex' entries (the sha256 of each API key, never the key).")
    api_keys_file: str | None = Field(None, description="A file of 'tenant:sha256hex' lines, added to api_keys.")
    default_model: str = Field("fixture", description="Model name used when a job names none.")
    models: Annotated[list[str], NoDecode] = Field(default_factory=list,
                                                   description="Model names the workers serve [default: "
                                                               "default_model only].")

    chunk_size: int = Field(16, ge=1, le=4096, description="Items per chunk: the unit of retry and of one shard.")
    chunk_retries: int = Field(6, ge=0, le=50, description="Retries of a failed chunk before its items fail.")
    retry_intervals: Annotated[list[int], NoDecode] = Field(
        default_factory=lambda: [2, 5, 10, 20, 40, 60],
        description="Seconds between a chunk's retries (comma-separated; the last repeats).")
    chunk_timeout: int = Field(1800, ge=10, description="Seconds one chunk may run before RQ kills it.")
    completion_window: str = Field("24h", pattern=COMPLETION_WINDOW_PATTERN,
                                   description="Default time a job has to finish (<number><s|m|h|d>); a job "
                                               "still running then ends 'expired'.")

    # Limits: a request over one gets a 4xx naming it and its HSCR_* variable (docs/service.md, Limits).
    max_items_per_job: int = Field(10_000, ge=1, description="Items per job, inline or from a file (413).")
    max_image_bytes: int = Field(32 * 1024 * 1024, ge=1, description="Bytes of an image upload or inline image.")
    max_image_pixels: int = Field(40_000_000, ge=1, description="Pixels of an image, read from its header "
                                                                "(decompression-bomb guard).")
    max_items_file_bytes: int = Field(256 * 1024 * 1024, ge=1, description="Bytes of an items-file upload.")
    max_inline_request_bytes: int = Field(64 * 1024 * 1024, ge=1,
                                          description="Bytes of any request body but an upload (POST /v1/jobs with "
                                                      "inline items); checked before the body is read.")
    presign_seconds: int = Field(3600, ge=60, le=7 * 24 * 3600)
    event_keepalive_seconds: float = Field(15.0, gt=0)

    @field_validator("api_keys", "models", "retry_intervals", mode="before")
    @classmethod
    def _split_commas(cls, value: object) -> object:
        if isinstance(value, str):
            return [v.strip() for v in value.split(",") if v.strip()]
        return value

    @property
    def served_models(self) -> list[str]:
        return self.models or [self.default_model]

    def queue_for(self, model: str) -> str:
        """The RQ queue of a model's chunks: the default model's is ``queue``; another served model's is
        ``<queue>.<model>``, where only that model's workers listen (``hscr worker --queue``), so no worker
        ever dequeues a chunk for a model it does not hold."""
        return self.queue if model == self.default_model else f"{self.queue}.{model}"


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
