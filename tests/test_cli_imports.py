"""The ``hscr`` command group stays light: building it and running the SDK's and the service's commands
imports no torch, transformers or peft (issue #16 item 9; the time it saves is ``bench/cli_startup.py``).

Each check runs in a fresh interpreter: this test process has long imported torch.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from importlib.metadata import entry_points

import click
import pytest

from hscr_client._cli import LazyCommand

HEAVY = ("torch", "transformers", "peft", "vllm")

# Builds the group as `hscr` does, runs one command line in-process, prints the heavy modules then loaded.
PROBE = """
import json, sys
from hscr_client._cli import _load_plugins, cli
_load_plugins()
try:
    cli.main(sys.argv[1:], prog_name="hscr", standalone_mode=False)
except Exception as exc:  # `jobs list` against a closed port fails after building its client: fine here
    print(f"command raised {type(exc).__name__}", file=sys.stderr)
print(json.dumps({"heavy": sorted(m for m in HEAVY if m in sys.modules), "commands": sorted(cli.commands)}))
"""


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _probe(*args: str) -> dict:
    result = subprocess.run([sys.executable, "-c", f"HEAVY = {HEAVY!r}\n{PROBE}", *args], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "skipping the commands of" not in result.stderr, result.stderr  # every component's commands loaded
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("args", [
    ("--help",),
    ("jobs", "--help"),
    ("jobs", "list", "--base-url", "http://127.0.0.1:{port}"),
    ("jobs", "get", "job_x", "--base-url", "http://127.0.0.1:{port}"),
    ("serve", "--help"),
    ("maintenance", "--help"),
], ids=" ".join)
def test_command_group_imports_no_torch_transformers_or_peft(args):
    port = _closed_port()
    probe = _probe(*(arg.format(port=port) for arg in args))
    assert probe["heavy"] == [], f"`hscr {' '.join(args)}` imported {probe['heavy']}"
    # every component registered its commands (a missing one would make the check above vacuous)
    assert {"generate", "worker", "train", "evaluate", "serve", "view", "jobs"} <= set(probe["commands"])


def test_the_probe_sees_heavy_imports():
    """Guards the test above: a command that does import torch is reported."""
    probe = _probe("generate", "--help")  # --profile lists the model families, which import torch
    assert "torch" in probe["heavy"]


def test_lazy_commands_resolve_to_the_command_they_describe():
    """A lazy command's short help is written beside its target: it must still start the target's help,
    and the target must import (a module moved without updating the target fails here, not for a user)."""
    registered = [command for ep in entry_points(group="hscr.commands") for command in ep.load()()]
    lazy = [command for command in registered if isinstance(command, LazyCommand)]
    assert lazy, "no lazy command registered (hscr worker is one)"
    for command in lazy:
        resolved = command.resolve()
        assert isinstance(resolved, click.Command) and not isinstance(resolved, LazyCommand)
        assert resolved.name == command.name
        assert (resolved.help or "").startswith(command.short_help.rstrip(".")), (command.name, resolved.help)


def test_a_lazy_command_runs_as_the_real_one():
    """`hscr worker --help` prints the real command's options, and a bad option is its usage error."""
    hscr = [sys.executable, "-c", "from hscr_client._cli import main; main()"]
    result = subprocess.run([*hscr, "worker", "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "worker [OPTIONS]" in result.stdout and "--redis-url" in result.stdout
    bad = subprocess.run([*hscr, "worker", "--no-such"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "No such option '--no-such'" in bad.stderr, bad.stderr
