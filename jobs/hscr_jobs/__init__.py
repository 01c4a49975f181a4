"""The job lifecycle, shared by the API (``hscr_service``) and the GPU workers (``hscr_worker``).

- :mod:`hscr_jobs.store`: job, file and event records in Redis, and the keys they live under.
- :mod:`hscr_jobs.lifecycle`: chunk naming and enqueueing, chunk accounting, finalize, cancel and expiry.
- :mod:`hscr_jobs.maintenance`: storage housekeeping (stale multipart uploads) and durations.
- :mod:`hscr_jobs.failpoints`: named points where an operator's chaos test can hold or kill a process.

No HTTP and no torch here: the API image and the worker image both carry this package and nothing of each other.
"""
