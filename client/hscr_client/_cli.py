"""The ``hscr`` command. The SDK's commands live here; installed components add theirs.

Components register a ``hscr.commands`` entry point that returns a list of click commands
(``hscr-worker`` adds ``generate``, ``fixture``, ``quality`` ...), so the SDK stays torch-free.
"""

from __future__ import annotations

from importlib.metadata import entry_points

import click


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="hscr-client")
def cli() -> None:
    """HSCR: preference data for medical vision-language models."""


def _load_plugins() -> None:
    for ep in entry_points(group="hscr.commands"):
        for command in ep.load()():
            if command.name not in cli.commands:
                cli.add_command(command)


def main() -> None:
    _load_plugins()
    cli()
