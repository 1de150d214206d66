"""Re-shoots and crops: image pairs whose embeddings' cosine reaches a threshold, through FAISS.

Perceptual hashes (:mod:`cliptune.data.audit`) find copies of the same pixels; a crop, a re-shoot or a
recoloured copy changes the pixels but not what a model sees. FAISS's exact ``IndexFlatIP`` range search
returns every pair above the threshold without the (N, N) matrix, so 100k images stay in memory (the
index holds N x D floats; the pairs found are the only other cost).
"""

from __future__ import annotations

import numpy as np
import torch

from cliptune.data.audit import Pair

__all__ = ["DEFAULT_COSINE", "embedding_pairs"]

DEFAULT_COSINE = 0.90
"""Cosine at or above which two images are reported as the same picture by embedding.

Set on planted cases in a calibration catalogue that no test judges (``render_fashion`` seed 1, 200
images, the default ``embedded`` model): 20 copies cropped by 5% on each side score 0.912-0.970 against
their originals and 20 mirrored copies 0.907-0.983, while the closest two images of different products
reach 0.884 (99th percentile 0.75); 0.90 sits between. It is a flag for a person to review on the audit
page, not a verdict, and it belongs to that model: another model spreads its cosines differently, so
check a few planted copies with it (``docs/catalogues.md``) before trusting the default.
"""

_QUERY_CHUNK = 4096  # queries per range search: bounds the result buffers faiss allocates at once


def embedding_pairs(embeddings: torch.Tensor, threshold: float = DEFAULT_COSINE) -> list[Pair]:
    """Every unordered pair of images whose cosine is at least ``threshold``.

    Args:
        embeddings: L2-normalised image embeddings (what ``embed_images_with`` returns), so inner product
            is cosine.
        threshold: Smallest cosine reported, in (-1, 1].

    Returns:
        ``Pair(a, b, "embedding", cosine)`` with ``a < b``, sorted by ``(a, b)``.

    Shapes:
        embeddings (N, D) float -> pairs

    Example:
        >>> x = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [0.99, 0.1], [0.0, 1.0]]), dim=-1)
        >>> [(p.a, p.b) for p in embedding_pairs(x, 0.95)]
        [(0, 1)]
    """
    import faiss

    if not -1.0 < threshold <= 1.0:
        raise ValueError(f"embedding_pairs: threshold must be in (-1, 1], got {threshold}")
    vectors = np.ascontiguousarray(embeddings.detach().cpu().float().numpy())  # (N, D)
    n = vectors.shape[0]
    if n < 2:
        return []
    index = faiss.IndexFlatIP(vectors.shape[1])
    index.add(vectors)
    # faiss keeps inner products strictly above the radius; float error may put an exact copy at 1 - 1e-7
    radius = float(np.nextafter(np.float32(threshold), np.float32(-2.0)))
    pairs: list[Pair] = []
    for start in range(0, n, _QUERY_CHUNK):
        lims, sims, ids = index.range_search(vectors[start : start + _QUERY_CHUNK], radius)
        for q in range(len(lims) - 1):
            a = start + q
            for b, s in zip(ids[lims[q] : lims[q + 1]], sims[lims[q] : lims[q + 1]], strict=True):
                if int(b) > a:
                    pairs.append(Pair(a, int(b), "embedding", min(float(s), 1.0)))
    return sorted(pairs, key=lambda p: (p.a, p.b))
