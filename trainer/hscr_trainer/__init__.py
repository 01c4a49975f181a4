"""HSCR training job: multi-level preference optimization on HSCR datasets, and evaluation."""

from hscr_worker._compat import ensure_torchvision_importable

ensure_torchvision_importable()  # before transformers touches torchvision

from .hscr_config import HSCRConfig  # noqa: E402
from .losses import LOSSES, VARIANTS  # noqa: E402

__all__ = ["HSCRConfig", "HSCRTrainer", "LOSSES", "PreferenceStream", "VARIANTS"]


def __getattr__(name: str):  # the trainer pulls in transformers: import it only when asked
    if name == "HSCRTrainer":
        from .hscr_trainer import HSCRTrainer

        return HSCRTrainer
    if name == "PreferenceStream":
        from .data import PreferenceStream

        return PreferenceStream
    raise AttributeError(name)
