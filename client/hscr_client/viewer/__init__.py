"""The token-level reward viewer: see what HSCR did to each item of a dataset's ``ranked`` config.

- :class:`ViewerDataset` reads a dataset (local directory or ``s3://``) as view rows and serves
  filtered pages of them as JSON (:meth:`ViewerDataset.page`); :class:`DatasetCache` keeps a few
  in memory for the service.
- :func:`write_static_file` / :func:`write_static` write one self-contained HTML file
  (``hscr view DIR --out view.html``); :func:`render_app` renders the page the service serves,
  which fetches its rows page by page.
- :func:`place_tokens` places token positions on decoded text (how marks are placed).

Needs the ``data`` extra (pyarrow, Pillow).
"""

from ._cache import DatasetCache
from ._dataset import MAX_PAGE_ROWS, MODALITIES, STATUSES, Filters, ViewerDataset, view_row
from ._html import StaticStats, render_app, render_static, script_json, write_static, write_static_file
from ._images import thumbnail_png
from ._marks import Placement, place_tokens

__all__ = [
    "MAX_PAGE_ROWS",
    "MODALITIES",
    "STATUSES",
    "DatasetCache",
    "Filters",
    "Placement",
    "StaticStats",
    "ViewerDataset",
    "place_tokens",
    "render_app",
    "render_static",
    "script_json",
    "thumbnail_png",
    "view_row",
    "write_static",
    "write_static_file",
]
