"""Prometheus metrics beyond the per-route ones: queue depth and workers, read at scrape time."""

from __future__ import annotations

from prometheus_client import REGISTRY
from prometheus_client.core import GaugeMetricFamily
from rq import Queue, Worker


class QueueCollector:
    """One collector per process (metric names are process-wide) over every queue registered with it: the
    queue of each served model."""

    _instance: QueueCollector | None = None

    def __init__(self):
        self.queues: dict[str, Queue] = {}

    @classmethod
    def register(cls, queue: Queue) -> None:
        if cls._instance is None:
            cls._instance = cls()
            REGISTRY.register(cls._instance)
        cls._instance.queues.setdefault(queue.name, queue)

    def collect(self):
        queued = GaugeMetricFamily("hscr_queue_chunks", "Chunks by RQ state", labels=["queue", "state"])
        workers = GaugeMetricFamily("hscr_workers", "Workers listening on the queue", labels=["queue"])
        try:
            for name, queue in self.queues.items():
                queued.add_metric([name, "queued"], queue.count)
                queued.add_metric([name, "started"], queue.started_job_registry.count)
                queued.add_metric([name, "scheduled"], queue.scheduled_job_registry.count)
                queued.add_metric([name, "failed"], queue.failed_job_registry.count)
                workers.add_metric([name], Worker.count(queue=queue))
        except Exception:  # Redis down: scrape still answers, without these series
            return
        yield queued
        yield workers
