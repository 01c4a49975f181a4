"""Resources of the API, each a sync class and its async twin: ``client.files``, ``.jobs``, ``.datasets``."""

from .datasets import AsyncDatasets, Datasets
from .files import AsyncFiles, Files
from .jobs import AsyncJobs, Jobs

__all__ = ["AsyncDatasets", "AsyncFiles", "AsyncJobs", "Datasets", "Files", "Jobs"]
