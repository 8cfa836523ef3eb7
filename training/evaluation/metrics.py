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


# Ranked-list metrics on a hits matrix. The evaluation harness (training.evaluate) ranks items per user, then
# looks up whether each ranked item is relevant: ``hits`` has shape (n_users, K), ``hits[i, r]`` is True when
# the item at rank ``r`` (0-based) of user ``i`` is relevant. Every metric at every cut-off <= K follows from it
# in one pass, so a recall@K curve costs no more than a single recall@K.


def recall_curve(hits: np.ndarray, n_relevant: np.ndarray, capped: bool = False) -> np.ndarray:
    """(n_users, K) per-user recall at every cut-off k = 1..K: ``cumsum(hits)[:, k-1] / |relevant|``.

    ``hits`` is (n_users, K) bool; ``n_relevant`` is (n_users,) with every entry >= 1. Like
    ``recall_at_k``, the denominator is the full ``|relevant|``, even when it exceeds the cut-off;
    column ``k - 1`` averaged over users equals ``recall_at_k`` of the top-k ids. With ``capped`` the
    denominator is ``min(|relevant|, k)`` instead (the "normalized" recall of Liang et al. 2018,
    VAE-CF, which reaches 1 whenever the top k are all relevant).
    """
    hits, n_relevant = _check_hits(hits, n_relevant)
    found = np.cumsum(hits, axis=1, dtype=np.float64)
    if capped:
        return found / np.minimum(n_relevant[:, None], np.arange(1, hits.shape[1] + 1)[None, :])
    return found / n_relevant[:, None]


def ndcg_at_k(hits: np.ndarray, n_relevant: np.ndarray, k: int = 10) -> np.ndarray:
    """(n_users,) NDCG@k with binary relevance.

    ``DCG = Σ_{r=1..k} hit_r / log2(r + 1)``, divided by the ideal DCG of ``min(|relevant|, k)`` hits at
    the top ranks. ``hits`` is (n_users, K >= k) bool, ``n_relevant`` (n_users,) >= 1.
    """
    hits, n_relevant = _check_hits(hits, n_relevant)
    if not 1 <= k <= hits.shape[1]:
        raise ValueError(f"k must be in 1..{hits.shape[1]} (the ranked depth), got {k}")
    discount = 1.0 / np.log2(np.arange(2, k + 2))
    dcg = hits[:, :k] @ discount
    ideal = np.cumsum(discount)[np.minimum(n_relevant, k) - 1]
    return dcg / ideal


def coverage(topk_items: np.ndarray, n_items: int) -> float:
    """Catalogue coverage: distinct items in all users' lists / ``n_items``.

    ``topk_items`` is (n_users, k) int item indices; negative entries (padding for users with fewer
    than k rankable items) are ignored.
    """
    items = np.asarray(topk_items).ravel()
    if n_items <= 0:
        raise ValueError("n_items must be > 0")
    return len(np.unique(items[items >= 0])) / n_items


def mean_log_popularity(topk_items: np.ndarray, counts: np.ndarray) -> float:
    """Mean of ``log(count + 1)`` over every recommended item of every user (a popularity-bias measure).

    ``topk_items`` is (n_users, k) int item indices (negative = padding, ignored); ``counts`` is
    (n_items,) interaction counts in the data the model was fit on.
    """
    items = np.asarray(topk_items).ravel()
    items = items[items >= 0]
    if len(items) == 0:
        raise ValueError("no recommended items")
    return float(np.log1p(np.asarray(counts, dtype=np.float64)[items]).mean())


def _check_hits(hits: np.ndarray, n_relevant: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    hits = np.asarray(hits, dtype=bool)
    n_relevant = np.asarray(n_relevant, dtype=np.int64)
    if hits.ndim != 2:
        raise ValueError(f"hits must have shape (n_users, K), got {hits.shape}")
    if n_relevant.shape != (hits.shape[0],):
        raise ValueError(f"n_relevant must have shape ({hits.shape[0]},), got {n_relevant.shape}")
    if (n_relevant < 1).any():
        raise ValueError("every user needs at least one relevant item; drop users without any first")
    if (hits.sum(axis=1) > n_relevant).any():
        raise ValueError("a user has more hits than relevant items")
    return hits, n_relevant


def top_k(scores: np.ndarray, depth: int) -> np.ndarray:
    """(n, depth) int32 item indices by descending score, ties by ascending index; -inf slots become -1."""
    n, n_items = scores.shape
    if depth < n_items:
        part = np.argpartition(-scores, depth - 1, axis=1)[:, :depth]
        part.sort(axis=1)  # index order, so the stable sort below breaks ties by index
    else:
        part = np.broadcast_to(np.arange(n_items), (n, n_items))
    order = np.argsort(-np.take_along_axis(scores, part, axis=1), axis=1, kind="stable")
    top = np.take_along_axis(part, order, axis=1).astype(np.int32)
    top[~np.isfinite(np.take_along_axis(scores, top, axis=1))] = -1
    return top
