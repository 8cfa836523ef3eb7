"""Offline evaluation harness shared by the retrieval model and the baselines.

Protocol (one definition for every model):

- **Split**: ``training.evaluation.split.temporal_split`` (per user, the last 20% of positive interactions
  are test and the last 10% of the rest validation).
- **Ranking**: every scorer ranks the full candidate set for every evaluated user, after removing the
  items the user engaged with in the data it was fit on: train + validation for ``on="test"``,
  train-proper for ``on="valid"``. Ties are broken by item index (deterministic).
- **Relevant set** of a user: their distinct target-part (test or validation) items that are not
  excluded (an excluded item cannot be retrieved); users left without any are skipped. The generator's
  oracle (``training.evaluation.oracle``) runs through this harness too.
- **Fitting**: scorers fit on ``split.train``. Tune on ``on="valid"`` with the split as built, then
  refit on ``split.merged()`` (train + validation in ``train``) before ``on="test"``.
- **Point in time**: a user is scored from what happened strictly before their first held-out interaction
  (``Split.history_rows``; the towers' features by construction, the baselines' history by this rule): train rows
  at that very instant are training data, not history.

Metrics (``evaluate``): recall@K (mean over users of ``|top-K ∩ relevant| / |relevant|``, see
``training.evaluation.metrics``), capped recall@K (denominator ``min(|relevant|, K)``, the "normalized"
recall of Liang et al. 2018), the whole recall@1..``curve_k`` curve from the same ranked lists, NDCG@10
(binary relevance, ideal DCG over ``min(|relevant|, 10)`` hits), catalogue coverage@K (distinct items in
all users' top-K / number of candidates), mean log-popularity@K (``log(1 + count)`` of the recommended
items, ``count`` = the item's interactions in the data the model was fit on, averaged over every
recommended slot of every user), and per-interest recall@50 (for each interest ``c`` of the relevant
items: ``Σ_users hits in c / Σ_users relevant items in c``, i.e. micro-averaged within the interest; it
needs ``item_interest`` on the split). Users are scored in batches so that one batch's
(n_users, n_items) float32 score matrix stays under ``batch_bytes`` (256 MB by default).

The reference figures of ML-100k are reproduced only with the capped recall and ties at equal timestamps in
a pseudo-random order (``tie_break="hash"``); ``bench/bench_baselines.py`` prints the comparison. They were
measured before the point-in-time rule: the baselines read the train rows tied with the first held-out instant
then, which a served model never has (EASE with recency: test R@50 .420 with them, .406 without, ML-100k).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any, Literal, Protocol, runtime_checkable

import numpy as np
import scipy.sparse as sp

from training.evaluation.metrics import coverage, mean_log_popularity, ndcg_at_k, recall_curve, top_k
from training.evaluation.split import Split

BATCH_BYTES = 256 * 2**20
"""Default bound on one batch's (n_users, n_items) float32 score matrix."""


@runtime_checkable
class Scorer(Protocol):
    """A model the harness can rank with."""

    def fit(self, split: Split) -> None:
        """Fit on ``split.train`` (interaction counts, (n_users, n_items))."""

    def score(self, user_idx: np.ndarray) -> np.ndarray:
        """(len(user_idx), n_items) float32 scores of every candidate for the users at rows ``user_idx``.

        Higher is better; the harness masks excluded items with -inf in place (it copies views first).
        """


def evaluate(
    scorer: Scorer,
    split: Split,
    ks: Sequence[int] = (10, 50, 100),
    on: Literal["test", "valid"] = "test",
    *,
    curve_k: int = 100,
    ndcg_k: int = 10,
    interest_k: int = 50,
    batch_bytes: int = BATCH_BYTES,
    per_user: bool = False,
) -> dict[str, Any]:
    """Rank the candidate set for every evaluable user with an already fitted ``scorer``.

    Returns ``recall@K``, ``capped_recall@K`` (denominator ``min(|relevant|, K)``), ``coverage@K`` and
    ``logpop@K`` for K in ``ks``, ``ndcg@{ndcg_k}``,
    ``recall_curve`` (list of recall@1..curve_k), ``recall@{interest_k}_by_interest`` (interest id ->
    recall, only with ``split.item_interest``), ``relevant_by_interest`` (interest id -> number of
    relevant user-item pairs), ``users`` (number evaluated), ``items`` and ``seconds``; with ``per_user``, also
    ``per_user``: the evaluated users' ids and each one's capped recall@K for K in ``ks`` (arrays in one order, for
    paired comparisons across scorers: ``training.evaluation.paired``). Holds the top
    ``max(ks, curve_k, ...)`` item indices of every evaluated user (n_users × depth int32) in memory.
    """
    ks = sorted({int(k) for k in ks})
    if not ks or ks[0] < 1:
        raise ValueError(f"ks must be positive, got {ks}")
    depth = min(max(*ks, curve_k, ndcg_k, interest_k), split.n_items)
    t0 = time.perf_counter()
    excluded, relevant = split.excluded(on), split.relevant(on)
    users, n_rel, [(topk, hits)] = _ranked([scorer], excluded, relevant, on, depth, batch_bytes)
    curve = recall_curve(hits, n_rel).mean(axis=0)
    capped = recall_curve(hits, n_rel, capped=True).mean(axis=0)
    counts = np.asarray(excluded.sum(axis=0)).ravel()
    out: dict[str, Any] = {}
    for k in ks:
        out[f"recall@{k}"] = float(curve[min(k, depth) - 1])
    for k in ks:
        out[f"capped_recall@{k}"] = float(capped[min(k, depth) - 1])
    out[f"ndcg@{ndcg_k}"] = float(ndcg_at_k(hits, n_rel, min(ndcg_k, depth)).mean())
    for k in ks:
        out[f"coverage@{k}"] = coverage(topk[:, : min(k, depth)], split.n_items)
    for k in ks:
        out[f"logpop@{k}"] = mean_log_popularity(topk[:, : min(k, depth)], counts)
    out["recall_curve"] = curve[: min(curve_k, depth)].tolist()
    if split.item_interest is not None:
        by_interest, rel_by_interest = _recall_by_interest(
            hits[:, : min(interest_k, depth)], topk[:, : min(interest_k, depth)], relevant[users], split.item_interest
        )
        out[f"recall@{interest_k}_by_interest"] = by_interest
        out["relevant_by_interest"] = rel_by_interest
    out["users"] = len(users)
    out["items"] = split.n_items
    if per_user:
        per = recall_curve(hits, n_rel, capped=True)
        out["per_user"] = {"user_ids": split.users[users],
                           **{f"capped_recall@{k}": per[:, min(k, depth) - 1].astype(np.float32) for k in ks}}
    out["seconds"] = round(time.perf_counter() - t0, 3)
    return out


def user_recall(scorer: Scorer, split: Split, k: int, on: Literal["test", "valid"] = "valid",
                batch_bytes: int = BATCH_BYTES) -> np.ndarray:
    """Each evaluated user's recall@k (``evaluate``'s users, in its order; their mean is its ``recall@k``): for
    paired comparisons of two scorers on the same users."""
    return user_recalls([scorer], split, k, on, batch_bytes)[0]


def user_recalls(scorers: Sequence[Scorer], split: Split, k: int, on: Literal["test", "valid"] = "valid",
                 batch_bytes: int = BATCH_BYTES) -> list[np.ndarray]:
    """``user_recall`` of several scorers in one pass over the users (the first scorer's ``order``): scorers that
    share candidate vectors (``TwoTowerScorer.reweighted``) embed them once for all."""
    _, n_rel, ranked = _ranked(scorers, split.excluded(on), split.relevant(on), on, min(k, split.n_items),
                               batch_bytes)
    return [recall_curve(hits, n_rel)[:, -1] for _, hits in ranked]


def _ranked(scorers: Sequence[Scorer], excluded: sp.csr_matrix, relevant: sp.csr_matrix, on: str, depth: int,
            batch_bytes: int) -> tuple[np.ndarray, np.ndarray, list[tuple[np.ndarray, np.ndarray]]]:
    """(evaluated users: those with a relevant item, their numbers of relevant items, each scorer's top-``depth``
    item indices and hits) under the protocol (``split.excluded(on)`` masked, users ranked in batches, in the first
    scorer's ``order`` when it has one)."""
    n_rel = np.diff(relevant.indptr)
    users = np.flatnonzero(n_rel > 0)
    if len(users) == 0:
        raise ValueError(f"no user has a relevant {on} item")
    order = scorers[0].order(users) if hasattr(scorers[0], "order") else None
    ranked = rank_many([lambda rows, s=s: s.score(users[rows]) for s in scorers], users, relevant[users], excluded,
                       depth, batch_bytes=batch_bytes, order=order)
    return users, n_rel[users], ranked


def rank(
    score: Callable[[np.ndarray], np.ndarray],
    row_users: np.ndarray,
    relevant: sp.csr_matrix,
    excluded: sp.csr_matrix,
    depth: int,
    *,
    batch_bytes: int = BATCH_BYTES,
    order: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """The ranked lists of ``evaluate``, for any rows: ((n_rows, depth) int32 item indices, -1 = nothing left to
    rank; (n_rows, depth) bool hits).

    Row ``r`` ranks for user ``row_users[r]`` (several rows may share a user, e.g. one per condition): ``score(r)``
    gives (len(r), n_items) scores of row indices ``r`` (-inf = not a candidate of that row), the user's
    ``excluded`` items (a (n_users, n_items) matrix) are masked, and ``relevant`` ((n_rows, n_items)) marks the
    hits. ``order``: a permutation of the rows to score them in (a scorer's ``order``, e.g. grouping the users
    that share candidate vectors); the results stay in row order."""
    return rank_many([score], row_users, relevant, excluded, depth, batch_bytes=batch_bytes, order=order)[0]


def rank_many(
    scores: Sequence[Callable[[np.ndarray], np.ndarray]],
    row_users: np.ndarray,
    relevant: sp.csr_matrix,
    excluded: sp.csr_matrix,
    depth: int,
    *,
    batch_bytes: int = BATCH_BYTES,
    order: np.ndarray | None = None,
) -> list[tuple[np.ndarray, np.ndarray]]:
    """``rank`` for several score functions in one pass over the rows (batch by batch, each function in turn), so
    that scorers sharing state computed on demand (``TwoTowerScorer``'s candidate vectors) compute it once."""
    n_items = excluded.shape[1]
    batch = max(1, batch_bytes // (4 * n_items))
    out = [(np.empty((len(row_users), depth), dtype=np.int32), np.empty((len(row_users), depth), dtype=bool))
           for _ in scores]
    sequence = np.arange(len(row_users)) if order is None else np.asarray(order)
    if len(sequence) != len(row_users) or (order is not None and not np.array_equal(np.sort(sequence),
                                                                                     np.arange(len(row_users)))):
        raise ValueError("order must be a permutation of the rows")
    for start in range(0, len(row_users), batch):
        rows = sequence[start:start + batch]
        users = row_users[rows]
        ex = excluded[users]
        rel = relevant[rows].toarray()
        for score, (topk, hits) in zip(scores, out, strict=True):
            s = np.asarray(score(rows), dtype=np.float32)
            if s.shape != (len(rows), n_items):
                raise ValueError(f"scorer returned {s.shape}, expected {(len(rows), n_items)}")
            if s.base is not None or not s.flags.writeable:
                s = s.copy()  # never write -inf into a view of the scorer's own state
            s[np.repeat(np.arange(len(rows)), np.diff(ex.indptr)), ex.indices] = -np.inf
            top = top_k(s, depth)
            topk[rows] = top
            hits[rows] = np.take_along_axis(rel, np.maximum(top, 0), axis=1) & (top >= 0)
    return out


def _recall_by_interest(
    hits: np.ndarray, topk: np.ndarray, relevant: sp.csr_matrix, item_interest: np.ndarray
) -> tuple[dict[str, float], dict[str, int]]:
    """Per interest: Σ hits / Σ relevant over users (hits (n, k) bool, topk (n, k), relevant (n, n_items))."""
    hit_interest = item_interest[topk[hits]]
    rel_interest = item_interest[relevant.indices]
    ids, rel_counts = np.unique(rel_interest, return_counts=True)
    hit_ids, hit_counts = np.unique(hit_interest, return_counts=True)
    hit_map = dict(zip(hit_ids.tolist(), hit_counts.tolist(), strict=True))
    recall = {str(i): hit_map.get(i, 0) / c for i, c in zip(ids.tolist(), rel_counts.tolist(), strict=True)}
    return recall, {str(i): int(c) for i, c in zip(ids.tolist(), rel_counts.tolist(), strict=True)}
