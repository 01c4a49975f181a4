"""``hscr_client.__all__`` is exactly the public names, sorted (as ruff's RUF022 sorts: constants, classes, rest)."""

import types

import hscr_client


def _public_names() -> set[str]:
    # Submodules (schema, storage, the private ones) are reached by import, not re-exported.
    return {name for name, value in vars(hscr_client).items()
            if not name.startswith("_") and not isinstance(value, types.ModuleType)}


def test_all_is_sorted():
    def order(name: str) -> tuple[int, str]:
        return (0 if name.isupper() else 1 if name[0].isupper() else 2, name)

    assert hscr_client.__all__ == sorted(hscr_client.__all__, key=order)


def test_all_is_exactly_the_public_names():
    exported = set(hscr_client.__all__)
    assert len(exported) == len(hscr_client.__all__)  # no duplicates
    assert all(hasattr(hscr_client, name) for name in exported)
    assert exported == _public_names()


def test_sdk_surface_is_exported():
    for name in ("Client", "AsyncClient", "HSCRError", "APIError", "APIStatusError", "APIConnectionError",
                 "APITimeoutError", "NotFoundError", "NOT_GIVEN"):
        assert name in hscr_client.__all__
