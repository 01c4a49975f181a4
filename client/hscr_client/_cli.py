"""The ``hscr`` command. The SDK's commands live here; installed components add theirs.

Components register a ``hscr.commands`` entry point that returns a list of click commands
(``hscr-worker`` adds ``generate``, ``fixture``, ``quality`` ...), so the SDK stays torch-free.
"""

from __future__ import annotations

import importlib
import json
import sys
from collections.abc import Callable
from functools import wraps
from importlib.metadata import entry_points
from typing import Any, TypeVar

import click
from pydantic import ValidationError

from ._base_client import DEFAULT_BASE_URL
from ._client import Client
from ._exceptions import HSCRError
from ._models import Job
from ._params import HSCRParams


class LazyCommand(click.Command):
    """A command whose module is imported only when the command runs or shows its own help.

    ``hscr --help`` lists it from its name and ``short_help`` alone, so a component whose command module
    pulls in torch (``hscr worker``) costs nothing to the other commands. ``target`` is ``"module:attribute"``.
    """

    def __init__(self, name: str, target: str, short_help: str) -> None:
        super().__init__(name, short_help=short_help, help=short_help, add_help_option=False)
        self.target = target

    def resolve(self) -> click.Command:
        module_name, _, attribute = self.target.partition(":")
        return getattr(importlib.import_module(module_name), attribute)

    def make_context(self, info_name: str | None, args: list[str], parent: click.Context | None = None,
                     **extra: Any) -> click.Context:
        # click parses and invokes through the context's command: from here on it is the real one.
        return self.resolve().make_context(info_name, args, parent=parent, **extra)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="hscr-client")
def cli() -> None:
    """HSCR: preference data for medical vision-language models."""


# --- SDK commands: thin wrappers over hscr_client.Client ---------------------------------------------

F = TypeVar("F", bound=Callable[..., Any])


def _client_options(command: F) -> F:
    """``--base-url``/``--api-key`` (or their env vars) become a ``client`` argument; SDK errors exit 1."""

    @click.option("--base-url", envvar="HSCR_BASE_URL", default=DEFAULT_BASE_URL, show_default=True,
                  show_envvar=True, help="The HSCR service.")
    @click.option("--api-key", envvar="HSCR_API_KEY", show_envvar=True, default=None,
                  help="Bearer API key (prefer the env var: arguments show in `ps`).")
    @wraps(command)
    def wrapper(*args: Any, base_url: str, api_key: str | None, **kwargs: Any) -> Any:
        try:
            with Client(base_url=base_url, api_key=api_key) as client:
                return command(*args, client=client, **kwargs)
        except HSCRError as exc:
            raise click.ClickException(str(exc)) from exc

    return wrapper  # type: ignore[return-value]


def _key_values(pairs: tuple[str, ...], option: str) -> dict[str, str]:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise click.BadParameter(f"expected KEY=VALUE, got {pair!r}", param_hint=option)
        out[key.strip()] = value
    return out


def _params(pairs: tuple[str, ...]) -> HSCRParams:
    """``--param n_levels=2`` pairs, values read as JSON where they parse (numbers), else as strings."""
    raw: dict[str, Any] = {}
    for key, value in _key_values(pairs, "--param").items():
        try:
            raw[key] = json.loads(value)
        except ValueError:
            raw[key] = value
    try:
        return HSCRParams(**raw)
    except ValidationError as exc:
        reasons = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'params'}: {e['msg']}" for e in exc.errors())
        raise click.BadParameter(reasons, param_hint="--param") from exc


def _echo_json(model: Any) -> None:
    click.echo(model.model_dump_json(indent=2, exclude_none=True))


def _summary(job: Job) -> str:
    counts = job.request_counts
    skipped = "".join(f", {n} {name}" for name, n in (("cancelled", counts.cancelled), ("expired", counts.expired))
                      if n)
    return (f"{job.id}  {job.status:<11}  {counts.completed}/{counts.total} done, {counts.failed} failed{skipped}  "
            f"{job.model}")


def _finish(job: Job) -> None:
    """Print the waited-for job; exit 1 unless it completed, so scripts can chain on success."""
    _echo_json(job)
    if job.status != "completed":
        raise click.ClickException(f"job {job.id} ended {job.status}")


@cli.command()
@click.argument("items", type=click.Path(exists=True, dir_okay=False))
@click.option("--param", "params", multiple=True, metavar="KEY=VALUE",
              help="An HSCR parameter (repeatable), e.g. --param n_levels=2 --param dropout_mode=remove.")
@click.option("--model", default=None, help="Model to run [default: the service's].")
@click.option("--metadata", multiple=True, metavar="KEY=VALUE", help="Job metadata (repeatable).")
@click.option("--wait", is_flag=True, help="Wait for the job with a progress bar; exit 1 unless it completes.")
@_client_options
def submit(client: Client, items: str, params: tuple[str, ...], model: str | None, metadata: tuple[str, ...],
           wait: bool) -> None:
    """Upload ITEMS (JSONL) and the local images it references, and create a job."""
    hscr_params = _params(params)
    meta = _key_values(metadata, "--metadata")
    uploaded = client.files.upload_items(items)
    create: dict[str, Any] = {"input_file_id": uploaded.id, "params": hscr_params}
    if model:
        create["model"] = model
    if meta:
        create["metadata"] = meta
    job = client.jobs.create(**create)
    click.echo(f"created {job.id} from {uploaded.id} ({uploaded.filename})", err=True)
    if wait:
        _finish(client.jobs.wait(job.id, progress=sys.stderr.isatty()))
    else:
        _echo_json(job)


@cli.group()
def jobs() -> None:
    """List, inspect, wait for and cancel jobs."""


@jobs.command("list")
@click.option("--limit", type=click.IntRange(1, 100), default=20, show_default=True)
@click.option("--after", default=None, help="A job id: list the jobs older than it (the next page).")
@click.option("--json", "as_json", is_flag=True, help="Print the JobList as JSON.")
@_client_options
def jobs_list(client: Client, limit: int, after: str | None, as_json: bool) -> None:
    """Your jobs, newest first."""
    page = client.jobs.list(limit=limit, **({"after": after} if after else {}))
    if as_json:
        _echo_json(page)
        return
    for job in page.data:
        click.echo(_summary(job))
    if page.has_more:
        click.echo(f"(more: --after {page.last_id})", err=True)


@jobs.command("get")
@click.argument("job_id")
@_client_options
def jobs_get(client: Client, job_id: str) -> None:
    """Print one job as JSON."""
    _echo_json(client.jobs.retrieve(job_id))


@jobs.command("cancel")
@click.argument("job_id")
@_client_options
def jobs_cancel(client: Client, job_id: str) -> None:
    """Cancel a job; the shards it finished are kept."""
    _echo_json(client.jobs.cancel(job_id))


@jobs.command("wait")
@click.argument("job_id")
@click.option("--timeout", type=float, default=None, help="Give up after this many seconds.")
@_client_options
def jobs_wait(client: Client, job_id: str, timeout: float | None) -> None:
    """Wait for a job with a progress bar; exit 1 unless it completes."""
    _finish(client.jobs.wait(job_id, progress=sys.stderr.isatty(), timeout=timeout))


@cli.command()
@click.argument("job_id")
@click.argument("directory", type=click.Path(file_okay=False))
@click.option("--config", type=click.Choice(["pairs", "ranked"]), default=None,
              help="Only this config [default: both].")
@_client_options
def download(client: Client, job_id: str, directory: str, config: str | None) -> None:
    """Download a job's dataset into DIRECTORY (resumable; partial while the job runs)."""
    info = client.datasets.download(job_id, directory, **({"config": config} if config else {}))
    shards = [shard for shard in info.shards if config is None or shard.config == config]
    rows = sum(shard.rows for shard in shards)
    state = "complete" if info.complete else f"partial, job {info.status}"
    click.echo(f"{len(shards)} shards, {rows} rows ({state}) -> {directory}")


def _load_plugins() -> None:
    for ep in entry_points(group="hscr.commands"):
        try:
            commands = ep.load()()
        except Exception as exc:  # one broken component must not take the SDK's commands down with it
            click.echo(f"hscr: skipping the commands of {ep.value}: {type(exc).__name__}: {exc}", err=True)
            continue
        for command in commands:
            if command.name not in cli.commands:
                cli.add_command(command)


def main() -> None:
    _load_plugins()
    cli()
