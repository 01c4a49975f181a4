"""hscr-service: the HSCR generation service (FastAPI API, Redis job state, RQ queue). Never imports torch."""

__version__ = "0.1.0"
