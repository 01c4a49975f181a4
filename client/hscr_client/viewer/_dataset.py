"""Read a dataset's ``ranked`` config as viewer rows: text with placed marks, filters and pages.

A :class:`ViewerDataset` holds every row *without* its image (a few hundred bytes a row, so
10,000 rows stay small) and reads images only for the rows of the page asked for. It reads a
finished dataset (shards from ``manifest.json``) or one still being written (the shards and
``_errors/`` files present so far).

A view row (JSON)::

    {"i": 0, "id": "fx-11-00005", "question": ..., "chosen": ..., "own": ...,
     "corrupted": null,            # the text coupled tokens index, when it differs from "own"
     "coupled": [{"start", "end", "how", "position", "token", "shift"}],
     "levels": [{"level", "text", "similarity", "n_replacements", "unfired",
                 "marks": [{"start", "end", "how", "position", "original", "replacement",
                            "reward", "shift"}]}],
     "n_candidates": 3, "shortfall": false, "modalities": ["CT"], "unplaced": 0,
     "image": "<base64 PNG thumbnail>"}   # only on rows of a page

``start``/``end`` are character offsets into the text (``-1`` and ``how == "unplaced"`` when the
token could not be placed; see :mod:`._marks`). A failed item (``errors.jsonl``) is
``{"id": ..., "error": ...}``.
"""

from __future__ import annotations

import json
import posixpath
import re
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Literal

from .. import schema
from ..storage import Location, open_location
from ._images import DEFAULT_THUMB_SIDE, thumbnail_b64
from ._marks import UNPLACED, place_tokens

Status = Literal["ranked", "errors", "warnings", "all"]
STATUSES: tuple[str, ...] = ("ranked", "errors", "warnings", "all")
MAX_PAGE_ROWS = 200

# Keyword heuristics for the modality filter, matched as whole words in the question and answers.
MODALITIES: dict[str, str] = {
    "X-ray": r"x-?rays?|radiographs?|radiography|cxr",
    "CT": r"ct|cta|computed tomography",
    "MRI": r"mri|mr|magnetic resonance|flair",
    "Ultrasound": r"ultrasound|ultrasonography|sonography|sonogram|doppler|echocardiogram",
    "PET": r"pet|pet-ct|spect",
    "Mammography": r"mammogram|mammography",
    "Angiography": r"angiogram|angiography",
    "Endoscopy": r"endoscopy|endoscopic|colonoscopy",
    "Pathology": r"histology|histopathology|pathology|biopsy|h&e|stain|stained|staining",
    "Fundus/OCT": r"fundus|oct|retina|retinal",
}
_MODALITY_PATTERNS = {name: re.compile(rf"(?<![\w-])(?:{p})(?![\w-])", re.IGNORECASE) for name, p in MODALITIES.items()}
_TEXT_COLUMNS = ("custom_id", "question", "chosen", "own_answer", "corrupted", "coupled", "levels", "n_candidates",
                 "shortfall")


def _num(value: float | None) -> float | None:
    return None if value is None else float(f"{value:.4g}")


def modalities_of(*texts: str) -> list[str]:
    """The modality names whose keywords occur in ``texts`` (see :data:`MODALITIES`)."""
    joined = "\n".join(texts)
    return [name for name, pattern in _MODALITY_PATTERNS.items() if pattern.search(joined)]


def view_row(index: int, row: dict) -> dict:
    """One ``ranked`` row (without its image) as a view row, marks placed on the text."""
    own, corrupted = row["own_answer"] or "", row["corrupted"] or ""
    coupled = row["coupled"] or []
    unplaced = 0
    coupled_view = []
    placements = place_tokens(corrupted, [(c["position"], c["token"]) for c in coupled])
    for c, p in zip(coupled, placements, strict=True):
        coupled_view.append({"start": p.start, "end": p.end, "how": p.how, "position": c["position"],
                             "token": c["token"], "shift": _num(c["shift"])})
        unplaced += p.how == UNPLACED
    levels = []
    for lv in sorted(row["levels"] or [], key=lambda lv: lv["level"]):
        text, replacements = lv["text"] or "", lv["replacements"] or []
        marks = []
        placements = place_tokens(text, [(r["position"], r["replacement"]) for r in replacements])
        for r, p in zip(replacements, placements, strict=True):
            marks.append({"start": p.start, "end": p.end, "how": p.how, "position": r["position"],
                          "original": r["original"], "replacement": r["replacement"],
                          "reward": _num(r["reward"]), "shift": _num(r["shift"])})
            unplaced += p.how == UNPLACED
        levels.append({"level": lv["level"], "text": text, "similarity": _num(lv["similarity"]),
                       "n_replacements": lv["n_replacements"], "unfired": lv["unfired"] or 0, "marks": marks})
    return {
        "i": index, "id": row["custom_id"], "question": row["question"] or "", "chosen": row["chosen"] or "",
        "own": own, "corrupted": None if corrupted == own else corrupted, "coupled": coupled_view, "levels": levels,
        "n_candidates": row["n_candidates"], "shortfall": bool(row["shortfall"]),
        "modalities": modalities_of(row["question"] or "", row["chosen"] or "", own),
        "unplaced": unplaced,
    }


def has_warning(row: dict) -> bool:
    """Shortfall (fewer well-separated levels than asked), unfired replacements, or unplaced marks."""
    return row["shortfall"] or row["unplaced"] > 0 or any(lv["unfired"] for lv in row["levels"])


def _haystack(item: dict) -> str:
    if "error" in item:
        return f"{item['id']}\n{item['error']}".lower()
    parts = [item["id"], item["question"], item["chosen"], item["own"], item["corrupted"] or ""]
    return "\n".join(parts + [lv["text"] for lv in item["levels"]]).lower()


@dataclass(frozen=True)
class Filters:
    """The viewer's filters. The page's JavaScript applies the same rules to a static file's rows.

    - ``level``: rows that have this level (the page then shows only that level);
    - ``q``: every whitespace-separated term occurs (case-insensitive) in the id, question, answers
      or level texts (a failed item: its id or error);
    - ``modality``: rows whose question or answers name this modality (:data:`MODALITIES`);
    - ``status``: ``ranked`` rows, failed items (``errors``), rows with ``warnings``, or ``all``.
    """

    level: int | None = None
    q: str = ""
    modality: str | None = None
    status: Status = "ranked"

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"status must be one of {STATUSES}, not {self.status!r}")
        if self.modality is not None and self.modality not in MODALITIES:
            raise ValueError(f"modality must be one of {tuple(MODALITIES)}, not {self.modality!r}")

    def accepts(self, item: dict) -> bool:
        terms = self.q.lower().split()
        if terms:
            haystack = _haystack(item)
            if not all(t in haystack for t in terms):
                return False
        if "error" in item:
            return self.status in ("errors", "all") and self.level is None and self.modality is None
        if self.status == "errors" or (self.status == "warnings" and not has_warning(item)):
            return False
        if self.level is not None and not any(lv["level"] == self.level for lv in item["levels"]):
            return False
        return self.modality is None or self.modality in item["modalities"]


@dataclass
class ViewerDataset:
    """The rows of one dataset, ready for the viewer. Build with :meth:`open`."""

    location: Location
    shards: list[str]
    rows: list[dict]
    errors: list[dict]
    manifest: dict | None = None
    _where: list[tuple[int, int]] = field(default_factory=list, repr=False)  # row -> (shard, row in shard)

    @classmethod
    def open(cls, uri_or_location: str | Location, *, allow_empty: bool = False) -> ViewerDataset:
        """Read the text of every ``ranked`` row and the error list of a dataset (local dir or ``s3://``).

        A location with no dataset files raises ``FileNotFoundError``, unless ``allow_empty`` (a job
        that has not written its first chunk yet).
        """
        location = open_location(uri_or_location) if isinstance(uri_or_location, str) else uri_or_location
        manifest = json.loads(location.read_bytes(schema.MANIFEST)) if location.exists(schema.MANIFEST) else None
        shards = _ranked_shards(location, manifest)
        if manifest is None and not shards and not location.list("_errors") and not allow_empty:
            raise FileNotFoundError(f"{location.uri}: no HSCR dataset here (no {schema.MANIFEST}, no "
                                    f"{schema.RANKED}/ shards)")
        dataset = cls(location, shards, [], _read_errors(location, manifest), manifest)
        # Shards are small files (one per chunk): read them concurrently, which matters on S3.
        with ThreadPoolExecutor(max_workers=8) as pool:
            tables = pool.map(lambda path: _read_shard(location, path, _TEXT_COLUMNS), shards)
            for shard_index, rows in enumerate(tables):
                for row_in_shard, row in enumerate(rows):
                    dataset.rows.append(view_row(len(dataset.rows), row))
                    dataset._where.append((shard_index, row_in_shard))
        return dataset

    def summary(self, *, title: str | None = None, source: str | None = None) -> dict:
        """Counts and settings for the page header and the filter controls."""
        modalities: dict[str, int] = {}
        for row in self.rows:
            for name in row["modalities"]:
                modalities[name] = modalities.get(name, 0) + 1
        manifest = self.manifest or {}
        return {
            "title": title or "HSCR dataset",
            "source": self.location.uri if source is None else source,
            "rows": len(self.rows),
            "errors": len(self.errors),
            "warnings": sum(has_warning(r) for r in self.rows),
            "levels": sorted({lv["level"] for r in self.rows for lv in r["levels"]}),
            "modalities": {name: modalities[name] for name in MODALITIES if name in modalities},
            "finished": self.manifest is not None,
            "created": manifest.get("created"),
            "request_counts": manifest.get("request_counts"),
            "model": manifest.get("model"),
        }

    def select(self, filters: Filters) -> list[dict]:
        """Rows, then failed items, that pass ``filters`` (without images)."""
        return [item for item in self._items(filters.status) if filters.accepts(item)]

    def page(self, filters: Filters = Filters(), *, offset: int = 0, limit: int = 25,
             thumb_side: int = DEFAULT_THUMB_SIDE) -> dict:
        """One page of filtered items as JSON-ready data, images (base64 PNG thumbnails) on its rows."""
        if offset < 0 or not 1 <= limit <= MAX_PAGE_ROWS:
            raise ValueError(f"offset must be >= 0 and limit within 1..{MAX_PAGE_ROWS}")
        selected = self.select(filters)
        items = [dict(item) for item in selected[offset:offset + limit]]
        images = self.images([item["i"] for item in items if "i" in item], thumb_side=thumb_side)
        for item in items:
            if "i" in item:
                item["image"] = images.get(item["i"])
        return {"total": len(selected), "offset": offset, "limit": limit, "items": items}

    def images(self, indices: Iterable[int], *, thumb_side: int = DEFAULT_THUMB_SIDE) -> dict[int, str | None]:
        """Base64 PNG thumbnails of rows ``indices`` (None where a row has no readable image bytes)."""
        by_shard: dict[int, list[int]] = {}
        for index in indices:
            by_shard.setdefault(self._where[index][0], []).append(index)
        out: dict[int, str | None] = {}
        for shard_index, wanted in by_shard.items():
            cells = _read_shard(self.location, self.shards[shard_index], ("image",))
            column = [cell["image"] for cell in cells]
            for index in wanted:
                cell = column[self._where[index][1]] or {}
                out[index] = thumbnail_b64(cell.get("bytes"), thumb_side)
        return out

    def iter_image_chunks(self, chunk_rows: int, *, thumb_side: int = DEFAULT_THUMB_SIDE) -> Iterator[list[str | None]]:
        """Thumbnails of all rows in order, ``chunk_rows`` at a time, reading each shard once."""
        pending: list[str | None] = []
        for path in self.shards:
            for cell in _read_shard(self.location, path, ("image",)):
                pending.append(thumbnail_b64((cell["image"] or {}).get("bytes"), thumb_side))
                if len(pending) == chunk_rows:
                    yield pending
                    pending = []
        if pending:
            yield pending

    def _items(self, status: str) -> list[dict]:
        if status == "errors":
            return self.errors
        if status == "all":
            return self.rows + self.errors
        return self.rows


def _ranked_shards(location: Location, manifest: dict | None) -> list[str]:
    if manifest is not None:
        return [s["path"] for s in manifest["configs"][schema.RANKED]["shards"]]
    return [p for p in location.list(schema.RANKED) if p.endswith(".parquet")]


def _read_errors(location: Location, manifest: dict | None) -> list[dict]:
    """Failed items: ``errors.jsonl`` of a finished dataset, else the per-chunk files written so far."""
    if manifest is not None or location.exists(schema.ERRORS):
        paths = [schema.ERRORS] if location.exists(schema.ERRORS) else []
    else:
        paths = [p for p in location.list("_errors") if p.endswith(".jsonl")]
    errors = []
    for path in paths:
        for line_number, line in enumerate(location.read_bytes(path).decode("utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                record = None
            if not isinstance(record, dict):
                record = {"custom_id": f"{posixpath.basename(path)}:{line_number}", "error": f"unreadable line: {line}"}
            errors.append({"id": str(record.get("custom_id", "")), "error": str(record.get("error", ""))})
    return errors


def _read_shard(location: Location, path: str, columns: tuple[str, ...]) -> list[dict]:
    import pyarrow.parquet as pq

    with location.fs.open_input_file(location.path(path)) as f:
        return pq.read_table(f, columns=list(columns)).to_pylist()
