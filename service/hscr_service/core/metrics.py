"""Prometheus metrics beyond the per-route ones: queue depth and workers, read at scrape time."""

from __future__ import annotations

from prometheus_client import REGISTRY
from prometheus_client.core import GaugeMetricFamily
from rq import Queue, Worker


class QueueCollector:
    _registered: set[str] = set()

    def __init__(self, queue: Queue):
        self.queue = queue

    @classmethod
    def register(cls, queue: Queue) -> None:
        if queue.name not in cls._registered:  # one collector per queue name per process
            REGISTRY.register(cls(queue))
            cls._registered.add(queue.name)

    def collect(self):
        queued = GaugeMetricFamily("hscr_queue_chunks", "Chunks by RQ state", labels=["queue", "state"])
        workers = GaugeMetricFamily("hscr_workers", "Workers listening on the queue", labels=["queue"])
        try:
            queued.add_metric([self.queue.name, "queued"], self.queue.count)
            queued.add_metric([self.queue.name, "started"], self.queue.started_job_registry.count)
            queued.add_metric([self.queue.name, "scheduled"], self.queue.scheduled_job_registry.count)
            queued.add_metric([self.queue.name, "failed"], self.queue.failed_job_registry.count)
            workers.add_metric([self.queue.name], Worker.count(queue=self.queue))
        except Exception:  # Redis down: scrape still answers, without these series
            return
        yield queued
        yield workers
