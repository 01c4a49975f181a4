"""Items JSONL, one parser for every reader of it (the service's uploads, ``hscr generate``).

One JSON object a line; a line that is not one becomes an item that carries its error, so a bad line never
stops the rest and lands in the dataset's error file with its line number.
"""

from __future__ import annotations

import json
from collections.abc import Iterable

from ._models import id_problem


def parse_items_lines(lines: Iterable[bytes | str]) -> list[dict]:
    """Items JSONL lines -> raw items, in order; blank lines are skipped but still counted.

    ``lines`` is what ``bytes.splitlines()`` or iterating a file gives (line endings are allowed). Don't split
    text with ``str.splitlines()``: it also breaks at U+2028 and others, which JSON strings may hold raw.
    Bytes lines are decoded per line, so an invalid UTF-8 byte costs only its own line.

    An item without ``custom_id`` (or with ``null``) gets ``line-N``; a malformed line N becomes
    ``{"custom_id": "line-N", "error": "malformed JSON on line N: <reason>"}``, and so does a line whose
    custom_id breaks the id rule (``_models.ID_RULE``, the rule of inline items too).
    """
    items: list[dict] = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
            if not isinstance(item, dict):
                raise ValueError("each line must be a JSON object")
        except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            items.append({"custom_id": f"line-{number}", "error": f"malformed JSON on line {number}: {exc}"})
            continue
        if item.get("custom_id") is None:
            item["custom_id"] = f"line-{number}"
        elif problem := id_problem(item["custom_id"], "custom_id"):
            items.append({"custom_id": f"line-{number}", "error": f"line {number}: {problem}"})
            continue
        items.append(item)
    return items


__all__ = ["parse_items_lines"]
