"""HSCR training job: multi-level preference optimization on HSCR datasets, and evaluation.

Every name below is imported when first asked for: they pull in torch, transformers and peft, and the
``hscr`` command group imports this package (through ``hscr_trainer.cli``) to build ``hscr train``.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["HSCRConfig", "HSCRTrainer", "LOSSES", "PreferenceStream", "VARIANTS"]

_LAZY = {"HSCRConfig": ".hscr_config", "HSCRTrainer": ".hscr_trainer", "LOSSES": ".losses", "VARIANTS": ".losses",
         "PreferenceStream": ".data"}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_LAZY[name], __name__), name)
