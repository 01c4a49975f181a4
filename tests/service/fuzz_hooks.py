"""Schemathesis hooks for ``test_zz_fuzz.py``: teach the generator the rules no JSON schema can state.

Only positive cases (bodies the spec calls valid) are touched, and only where the service checks something
beyond the schema, so the check "valid data is accepted" tests everything else as generated:

- an upload of purpose ``image`` must decode as PNG, JPEG or DICOM, and one of purpose ``items`` must hold
  something besides whitespace: random bytes are neither, so a positive case uploads a real tiny PNG or a
  one-line items file instead;
- ``HSCRParams``: ``n_levels`` may not exceed ``n_coupled`` (a comparison of two fields), and
  ``dropout_ratio`` 1.0 needs ``dropout_mode`` 'zero' (the default 'remove' would leave no image).

Negative cases go out unchanged: the service must refuse each with a 4xx.
"""

from __future__ import annotations

import base64

import schemathesis

# A 1x1 grey PNG.
TINY_PNG = base64.b64decode("iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAAAAAA6fptVAAAACklEQVR4nGNoAAAAggCBd81ytgAAAABJ"
                            "RU5ErkJggg==")
ONE_ITEM = b'{"custom_id": "fuzz", "image": "data:image/png;base64,AA==", "question": "q"}\n'


def _positive(case) -> bool:
    meta = getattr(case, "meta", None)
    return meta is not None and meta.generation.mode.is_positive


def _valid_upload(body: dict) -> None:
    if body.get("purpose") == "image":
        body["file"] = TINY_PNG
    elif body.get("purpose") == "items":
        content = body.get("file")
        if not (content.strip() if isinstance(content, (bytes, str)) else content):
            body["file"] = ONE_ITEM


def _number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)  # JSON 15.0 is a valid integer


def _valid_params(params: dict) -> None:
    n_coupled, n_levels = params.get("n_coupled", 10), params.get("n_levels", 3)  # the defaults
    if _number(n_coupled) and _number(n_levels) and n_levels > n_coupled:
        params["n_levels"] = n_coupled
    ratio = params.get("dropout_ratio")
    if _number(ratio) and ratio >= 1.0:
        params["dropout_mode"] = "zero"


@schemathesis.hook
def map_case(context, case):
    if not _positive(case) or not isinstance(case.body, dict) or case.method.upper() != "POST":
        return case
    if case.path == "/v1/files":
        _valid_upload(case.body)
    elif case.path == "/v1/jobs" and isinstance(case.body.get("params"), dict):
        _valid_params(case.body["params"])
    return case
