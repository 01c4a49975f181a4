#!/usr/bin/env python3
"""Container healthcheck of an HSCR worker: healthy while an RQ worker on this host heartbeats in Redis.

Exit 0 when a worker registered from this hostname (RQ records ``socket.gethostname()``, the
container id) sent a heartbeat within ``HSCR_HEALTH_MAX_AGE`` seconds [default 90]; else exit 1.
Reads ``HSCR_REDIS_URL`` like the worker itself.
"""

from __future__ import annotations

import os
import socket
import sys
from datetime import datetime, timedelta, timezone


def main() -> int:
    import redis
    from rq import Worker

    url = os.environ.get("HSCR_REDIS_URL", "redis://127.0.0.1:6379/0")
    max_age = timedelta(seconds=float(os.environ.get("HSCR_HEALTH_MAX_AGE", "90")))
    host = os.environ.get("HSCR_HEALTH_HOSTNAME") or socket.gethostname()
    connection = redis.Redis.from_url(url, socket_connect_timeout=3, socket_timeout=3)
    try:
        workers = Worker.all(connection=connection)
    except redis.RedisError as exc:
        print(f"unhealthy: Redis unreachable ({type(exc).__name__})")
        return 1
    now = datetime.now(timezone.utc)
    for worker in workers:
        beat = worker.last_heartbeat
        if worker.hostname != host or beat is None:
            continue
        if beat.tzinfo is None:  # RQ stores UTC
            beat = beat.replace(tzinfo=timezone.utc)
        if now - beat <= max_age:
            print(f"healthy: {worker.name} last heartbeat {(now - beat).total_seconds():.0f} s ago")
            return 0
    print(f"unhealthy: no worker from {host} heartbeating within {max_age.total_seconds():.0f} s")
    return 1


if __name__ == "__main__":
    sys.exit(main())
