"""The compiled-shape vocabulary both serving engines (and their warm-up) share: sizes are powers of
two (or four) up to a limit, and a length runs in the smallest size that holds it, so a new length never
recompiles."""
from __future__ import annotations

from typing import Sequence

# max_context=None means the model's max_position_embeddings, but at most this: a 128K-token cache per
# slot rarely fits next to the weights; pass max_context explicitly for longer contexts.
DEFAULT_MAX_CONTEXT = 4096


def buckets(smallest: int, limit: int, factor: int = 2) -> tuple[int, ...]:
    """`smallest` times powers of `factor` below `limit`, then `limit` itself."""
    out, b = [], smallest
    while b < limit:
        out.append(b)
        b *= factor
    return tuple(out) + (limit,)


def bucket_for(n: int, sizes: Sequence[int]) -> int:
    """The smallest of `sizes` (ascending) that holds `n`."""
    return next(b for b in sizes if b >= n)
