"""Small shared types: the "not given" sentinel and timeouts."""

from __future__ import annotations

from typing import Any, Final

import httpx

__all__ = ["NOT_GIVEN", "NotGiven", "Timeout"]


Timeout = float | httpx.Timeout | None


class NotGiven:
    """Tells "the caller passed nothing" apart from ``None`` (which may be a real value, e.g. no timeout).

    >>> client.jobs.list(after=NOT_GIVEN)  # same as leaving ``after`` out
    """

    _instance: NotGiven | None = None

    def __new__(cls) -> NotGiven:  # a singleton, so ``is NOT_GIVEN`` always works
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __bool__(self) -> bool:
        return False

    def __repr__(self) -> str:
        return "NOT_GIVEN"


NOT_GIVEN: Final = NotGiven()


def given(value: Any) -> bool:
    return not isinstance(value, NotGiven)


def strip_not_given(mapping: dict[str, Any]) -> dict[str, Any]:
    """The entries the caller actually gave."""
    return {key: value for key, value in mapping.items() if given(value)}
