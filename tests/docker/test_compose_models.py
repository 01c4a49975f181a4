"""docker/compose.yaml serves three model families side by side: LLaVA (the default worker), Qwen2.5-VL
(``--profile second-model``) and Gemma 3 (``--profile third-model``), each worker on its model's queue."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

COMPOSE = Path(__file__).resolve().parents[2] / "docker" / "compose.yaml"
DEFAULT = re.compile(r"^\$\{(?P<name>[A-Z_]+):-(?P<default>[^}]*)\}$")


def _default(value: str) -> str:
    """The value a ``${NAME:-default}`` setting takes when NAME is unset (a literal stays itself)."""
    match = DEFAULT.match(value)
    return match["default"] if match else value


def test_three_model_families_each_on_its_own_queue():
    from hscr_worker._compat import ensure_torchvision_importable

    ensure_torchvision_importable()
    from transformers import AutoConfig

    from hscr_worker.families import resolve_profile
    from hscr_worker.fixture import resolve_model

    services = yaml.safe_load(COMPOSE.read_text())["services"]
    families, queues = {}, set()
    for name, profile in (("worker-second-model", "second-model"), ("worker-third-model", "third-model")):
        worker = services[name]
        assert worker["profiles"] == [profile]
        env = worker["environment"]
        model, job_name = _default(env["HSCR_WORKER_MODEL"]), _default(env["HSCR_DEFAULT_MODEL"])
        assert env["HSCR_QUEUE"].endswith("." + env["HSCR_DEFAULT_MODEL"])  # <HSCR_QUEUE>.<the name jobs use>
        queues.add(env["HSCR_QUEUE"])
        path = resolve_model(model)
        families[name] = (job_name, resolve_profile(None, path, config=AutoConfig.from_pretrained(path)).family)
    assert families == {"worker-second-model": ("fixture-qwen2.5-vl", "qwen2-vl"),
                        "worker-third-model": ("fixture-gemma3", "gemma3")}
    assert len(queues) == 2
