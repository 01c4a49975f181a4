"""Render the viewer page: a self-contained static file, or the shell that the service serves.

The page is one HTML template with its CSS and JavaScript inlined (package data under
``static/``; no template engine). A static file embeds the rows as JSON, ``chunk_rows`` rows per
``<script type="application/json">`` element, and the thumbnails of those rows in a separate
element, so the browser parses text for filtering and decodes images only for the visible page.
"""

from __future__ import annotations

import html
import io
import json
import os
import re
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from typing import TextIO

from ._dataset import ViewerDataset
from ._images import DEFAULT_THUMB_SIDE

DEFAULT_CHUNK_ROWS = 100
_PLACEHOLDER = re.compile(r"__HSCR_([A-Z]+)__")
_DATA_MARK = "\0hscr-data\0"


@lru_cache(maxsize=1)
def _assets() -> dict[str, str]:
    static = resources.files(__package__).joinpath("static")
    return {name: static.joinpath(f"viewer.{name}").read_text(encoding="utf-8") for name in ("html", "css", "js")}


def script_json(value: object) -> str:
    """JSON that is safe inside a ``<script>`` element (no ``</script>``, ``<!--`` or entity surprises)."""
    text = json.dumps(value, separators=(",", ":"), ensure_ascii=False)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def _fill(template: str, parts: dict[str, str]) -> str:
    # One pass, so text substituted in (a title, rows) is never scanned for placeholders again.
    return _PLACEHOLDER.sub(lambda m: parts[m.group(1)], template)


def _page_parts(title: str, config: dict) -> dict[str, str]:
    assets = _assets()
    return {"TITLE": html.escape(title), "STYLE": assets["css"], "SCRIPT": assets["js"], "CONFIG": script_json(config)}


def render_app(*, rows_url: str, summary_url: str, title: str = "HSCR dataset", summary: dict | None = None) -> str:
    """The page for the service: it fetches pages of rows from ``rows_url`` (see :meth:`ViewerDataset.page`).

    ``summary`` (from :meth:`ViewerDataset.summary`) may be embedded; otherwise the page gets it
    from ``summary_url``. Requests carry ``Authorization: Bearer <key>`` when the user has given the
    page a key (kept in the tab's sessionStorage only).
    """
    config = {"mode": "api", "rowsUrl": rows_url, "summaryUrl": summary_url, "summary": summary}
    return _fill(_assets()["html"], {**_page_parts(title, config), "DATA": ""})


@dataclass(frozen=True)
class StaticStats:
    rows: int
    errors: int
    chunks: int
    bytes: int


def write_static(dataset: ViewerDataset, out: TextIO, *, title: str = "HSCR dataset", source: str | None = None,
                 chunk_rows: int = DEFAULT_CHUNK_ROWS, thumb_side: int = DEFAULT_THUMB_SIDE) -> StaticStats:
    """Write the self-contained page of ``dataset`` to ``out`` (a text stream), rows in chunks."""
    if chunk_rows < 1:
        raise ValueError("chunk_rows must be >= 1")
    n_chunks = (len(dataset.rows) + chunk_rows - 1) // chunk_rows
    config = {"mode": "static", "summary": dataset.summary(title=title, source=source), "chunkRows": chunk_rows,
              "nChunks": n_chunks, "errors": dataset.errors}
    # The data goes where the template's placeholder is: the last one, after the title and config.
    head, _, tail = _fill(_assets()["html"], {**_page_parts(title, config), "DATA": _DATA_MARK}).rpartition(_DATA_MARK)
    written = 0

    def emit(text: str) -> None:
        nonlocal written
        out.write(text)
        written += len(text.encode("utf-8"))

    emit(head)
    images = dataset.iter_image_chunks(chunk_rows, thumb_side=thumb_side)
    for k in range(n_chunks):
        rows = dataset.rows[k * chunk_rows:(k + 1) * chunk_rows]
        emit(f'<script type="application/json" id="hscr-rows-{k}">{script_json(rows)}</script>\n')
        emit(f'<script type="application/json" id="hscr-img-{k}">{script_json(next(images))}</script>\n')
    emit(tail)
    return StaticStats(rows=len(dataset.rows), errors=len(dataset.errors), chunks=n_chunks, bytes=written)


def render_static(dataset: ViewerDataset, **options) -> str:
    """:func:`write_static` into a string."""
    buffer = io.StringIO()
    write_static(dataset, buffer, **options)
    return buffer.getvalue()


def write_static_file(uri: str, out_path: str | os.PathLike, **options) -> StaticStats:
    """Open the dataset at ``uri`` (directory or ``s3://``) and write its page to ``out_path``.

    Written to a temporary file and renamed, so a failure leaves no half page behind.
    """
    dataset = ViewerDataset.open(uri)
    options.setdefault("source", uri)
    tmp = f"{os.fspath(out_path)}.tmp"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            stats = write_static(dataset, f, **options)
        os.replace(tmp, out_path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return stats
