"""Make PyPI's CUDA torchvision importable beside the CPU torch wheel.

PyPI's torchvision (pulled in by vLLM) registers kernels for ``torchvision::nms`` and
``torchvision::qnms``; beside a CPU torch those schemas are missing and ``import torchvision``
fails, which breaks transformers' image processors and vLLM's LLaVA code. Defining the two schemas
first makes the import work; the ops themselves are never called by LLaVA-family models.
"""

from __future__ import annotations

import importlib.util

_done = False


def ensure_torchvision_importable() -> None:
    global _done
    if _done or importlib.util.find_spec("torchvision") is None:
        return
    _done = True
    import torch

    try:
        torch._C._dispatch_find_schema_or_throw("torchvision::nms", "")
        return
    except RuntimeError:
        pass
    library = torch.library.Library("torchvision", "DEF")  # kept alive below: dropping it unregisters the schemas
    library.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    library.define("qnms(Tensor qdets, Tensor scores, float iou_threshold) -> Tensor")
    globals()["_library"] = library
