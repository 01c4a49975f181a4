"""The environment ``scripts/setup.sh`` builds works for a user's own scripts, not only for our modules
(issue #16 item 10): PyPI's CUDA torchvision beside the CPU torch used to fail ``import torchvision``, and
with it ``from transformers import AutoProcessor`` in any script that did not go through ``hscr_worker``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "worker" / "hscr_worker" / "fixture"

# A user's script: nothing of ours is imported, nothing is on PYTHONPATH.
USER_SCRIPT = """
import json, sys
import torchvision
from PIL import Image
from transformers import AutoProcessor

processor = AutoProcessor.from_pretrained(sys.argv[1])
image = Image.new("RGB", (64, 64), (120, 30, 200))
messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is shown?"}]}]
text = processor.apply_chat_template(messages, add_generation_prompt=True)
batch = processor(images=[image], text=[text], return_tensors="pt")
ours = sorted(name for name in ("hscr_worker", "hscr_trainer", "_hscr_torchvision_cpu") if name in sys.modules)
print(json.dumps({"torchvision": torchvision.__version__, "image_processor": type(processor.image_processor).__name__,
                  "pixel_values": list(batch["pixel_values"].shape), "loaded": ours}))
"""


def _user_env() -> dict[str, str]:
    return {key: value for key, value in os.environ.items() if not key.startswith("PYTHON")}


@pytest.mark.parametrize("model", ["model", "model-qwen2.5-vl"])
def test_a_plain_user_script_imports_torchvision_and_runs_a_processor(tmp_path, model):
    result = subprocess.run([sys.executable, "-c", USER_SCRIPT, str(FIXTURES / model)], cwd=tmp_path,
                            capture_output=True, text=True, env=_user_env(), timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["torchvision"] and len(report["pixel_values"]) >= 2 and report["pixel_values"][0] >= 1
    # our modules stayed out of it: only the start-up hook setup.sh installs
    assert not {"hscr_worker", "hscr_trainer"} & set(report["loaded"]), report


def test_the_start_up_hook_costs_no_torch_import():
    """The hook runs in every interpreter of the venv: until torchvision is imported it must not load torch."""
    probe = "import sys; print('torch' in sys.modules, '_hscr_torchvision_cpu' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=_user_env(),
                            timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["False", "True"], "scripts/setup.sh did not install the torchvision hook"
