"""Every HSCR parameter is a flag of `hscr generate` / `hscr quality`, parsed to the parameter's own type."""

from __future__ import annotations

import click
import pytest
from click.testing import CliRunner

from hscr_worker.cli import _param_options, params_from_options


def _parse(*args: str):
    @click.command()
    @_param_options
    def command(**options):
        click.echo(params_from_options(options, paper=False).model_dump_json())

    return CliRunner().invoke(command, list(args))


@pytest.mark.parametrize(("flag", "severity_order"), [("false", False), ("no", False), ("true", True), ("1", True)])
def test_boolean_flag_parses_to_a_boolean(flag, severity_order):
    result = _parse("--severity-order", flag, "--n-levels", "2")
    assert result.exit_code == 0, result.output
    assert f'"severity_order":{str(severity_order).lower()}' in result.output and '"n_levels":2' in result.output


def test_a_bad_boolean_is_a_usage_error():
    result = _parse("--severity-order", "maybe")
    assert result.exit_code == 2 and "severity-order" in result.output
