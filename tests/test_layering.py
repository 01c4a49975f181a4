"""The SDK and the API never import torch (they install and run without it)."""

import subprocess
import sys

import pytest


@pytest.mark.parametrize("module", ["hscr_client", "hscr_client._cli", "hscr_client.schema", "hscr_client.storage",
                                    "hscr_service.main"])
def test_light_components_do_not_import_torch(module):
    code = f"import sys, {module}; heavy = {{'torch', 'transformers', 'vllm'}} & set(sys.modules); " \
           "assert not heavy, heavy"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-1500:]


def test_client_distribution_does_not_depend_on_torch():
    from importlib.metadata import requires

    for dist in ("hscr-client", "hscr-service"):
        assert not [r for r in requires(dist) or [] if r.split()[0].startswith(("torch", "vllm", "transformers"))]
