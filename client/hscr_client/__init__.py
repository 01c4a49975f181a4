"""hscr-client: the public contract (wire models, dataset schema) and the SDK of the HSCR service."""

from ._params import HSCRParams

__all__ = ["HSCRParams"]
