"""Retrieval metrics shared by the synthetic-data oracle and the evaluation harness."""

from __future__ import annotations

from collections.abc import Collection, Sequence

import numpy as np


def recall_at_k(topk_ids: np.ndarray, relevant: Sequence[Collection[int]]) -> float:
    """Mean over users of ``|top-k ∩ relevant| / |relevant|``.

    ``topk_ids`` has shape (n_users, k): row ``i`` holds the ids retrieved for user ``i`` (order
    within the row does not matter). ``relevant`` holds ``n_users`` non-empty collections of ids.
    The denominator is the full ``|relevant|`` even when it exceeds ``k``, so a user with more
    relevant items than ``k`` cannot reach a recall of 1.
    """
    topk_ids = np.asarray(topk_ids)
    if topk_ids.ndim != 2:
        raise ValueError(f"topk_ids must have shape (n_users, k), got {topk_ids.shape}")
    if len(topk_ids) != len(relevant):
        raise ValueError(f"topk_ids has {len(topk_ids)} rows but relevant has {len(relevant)} users")
    if len(relevant) == 0:
        raise ValueError("recall@k of zero users is undefined")
    total = 0.0
    for row, rel in zip(topk_ids.tolist(), relevant, strict=True):
        rel_set = rel if isinstance(rel, (set, frozenset)) else set(rel)
        if not rel_set:
            raise ValueError("every user needs at least one relevant id; drop users without any first")
        total += len(rel_set.intersection(row)) / len(rel_set)
    return total / len(relevant)
