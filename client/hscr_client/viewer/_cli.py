"""``hscr view``: write a dataset's viewer page as one self-contained HTML file."""

from __future__ import annotations

import click

from ._html import DEFAULT_CHUNK_ROWS, write_static_file
from ._images import DEFAULT_THUMB_SIDE


@click.command("view")
@click.argument("dataset")
@click.option("--out", "-o", "out", type=click.Path(dir_okay=False, writable=True), default="view.html",
              show_default=True, help="The HTML file to write.")
@click.option("--title", default=None, help="Page title [default: the dataset's location].")
@click.option("--thumb", "thumb_side", type=click.IntRange(16, 1024), default=DEFAULT_THUMB_SIDE, show_default=True,
              help="Largest side of the embedded image thumbnails, in pixels.")
@click.option("--chunk-rows", type=click.IntRange(1, 10_000), default=DEFAULT_CHUNK_ROWS, show_default=True,
              help="Rows per embedded JSON chunk (the unit the page parses lazily).")
def view(dataset: str, out: str, title: str | None, thumb_side: int, chunk_rows: int) -> None:
    """Write the token-level reward viewer of DATASET (a directory or s3://bucket/prefix) to --out."""
    try:
        stats = write_static_file(dataset, out, title=title or f"HSCR dataset: {dataset}", thumb_side=thumb_side,
                                  chunk_rows=chunk_rows)
    except (FileNotFoundError, ValueError, OSError) as error:
        raise click.ClickException(str(error)) from error
    click.echo(f"{out}: {stats.rows} rows, {stats.errors} failed items, {stats.bytes / 1e6:.2f} MB")


def commands() -> list[click.Command]:
    """The ``hscr.commands`` entry point."""
    return [view]
