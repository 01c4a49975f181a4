"""Similarity encoders for reranking: lexical token F1, or a sentence-transformers model."""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

from .core.rerank import token_f1
from .pipeline import Similarity


def lexical(candidates: Sequence[str], reference: str) -> list[float]:
    return [token_f1(c, reference) for c in candidates]


@lru_cache(maxsize=2)
def _encoder(name: str):
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError as exc:  # pragma: no cover - depends on the optional extra
        raise RuntimeError(
            f"similarity={name!r} needs sentence-transformers (pip install 'hscr-worker[encoder]'); "
            "use similarity='lexical' for the model-free token F1") from exc
    return SentenceTransformer(name, device="cpu")


def get_similarity(name: str) -> Similarity:
    """``'lexical'`` or a sentence-transformers model name / local path (loaded once, cosine)."""
    if name == "lexical":
        return lexical

    def encoder_similarity(candidates: Sequence[str], reference: str) -> list[float]:
        vectors = _encoder(name).encode([reference, *candidates], normalize_embeddings=True)
        return [float(vectors[0] @ v) for v in vectors[1:]]

    return encoder_similarity
