"""The synthetic generator's ground truth as a scorer: the best any model can do in expectation.

``Oracle`` ranks candidates by ``GroundTruth.scores`` (``training.data.synthetic``) through the same harness
as every model, so "x% of the oracle" compares like with like.
"""

from __future__ import annotations

from collections.abc import Collection

import numpy as np
import pandas as pd

from training.data.synthetic import SCORE_TERMS, GroundTruth, index_of
from training.evaluation.harness import evaluate
from training.evaluation.split import Split


class _Unfitted(RuntimeError):
    pass


class Oracle:
    """A ground truth's ``scores(user_ids)`` (e.g. ``training.data.synthetic.GroundTruth``) as a scorer.

    ``fit`` maps the split's users and candidates onto the ground truth's users and columns (every one
    must be known to it). Scores are computed for at most ``chunk_bytes`` / (8 · n_columns) users at a
    time, since the ground truth works in float64 on all its columns.
    """

    def __init__(self, truth: GroundTruth, chunk_bytes: int = 64 * 2**20, at=None,
                 terms: Collection[str] = SCORE_TERMS) -> None:
        self.truth = truth
        self.terms = tuple(terms)
        """Which terms of the ground truth to score with (``GroundTruth.scores``; all by default)."""
        self.chunk_bytes = chunk_bytes
        self.at = at
        """Score with the interest trends at this time (None: their average over the history)."""
        self.user_ids: np.ndarray | None = None
        self.columns: np.ndarray | None = None

    def fit(self, split: Split) -> None:
        self.user_ids = split.users
        self.columns = index_of(self.truth.pin_ids, split.items, "candidate pin ids")
        index_of(self.truth.user_ids, split.users, "user ids")

    def score(self, user_idx: np.ndarray) -> np.ndarray:
        """(len(user_idx), n_items) float32 true scores of the split's candidates."""
        if self.user_ids is None or self.columns is None:
            raise _Unfitted("Oracle.fit first")
        ids = self.user_ids[user_idx]
        chunk = max(1, self.chunk_bytes // (8 * len(self.truth.pin_ids)))
        out = np.empty((len(ids), len(self.columns)), dtype=np.float32)
        for start in range(0, len(ids), chunk):
            scores = self.truth.scores(ids[start : start + chunk], at=self.at, terms=self.terms)
            out[start : start + chunk] = scores[:, self.columns]
        return out


def oracle_recall_at_k(truth: GroundTruth, train: pd.DataFrame, test: pd.DataFrame, k: int) -> float:
    """Recall@k of ranking every pin by ``truth.scores`` (the best any model can do in expectation).

    ``train`` and ``test`` hold positive interactions (columns user_id, pin_id). For each test
    user, all pins except the user's train pins are ranked and the top ``k`` are kept. The
    relevant set is the user's distinct test pins that are not among their train pins (those
    cannot be retrieved); users left without any are skipped. Recall divides by the full size of
    the relevant set (see ``training.evaluation.metrics.recall_at_k``), averaged over users. This is the
    evaluation harness's protocol, and it runs through it (``evaluate`` with ``Oracle``, every pin of the
    ground truth as the candidate set).
    """
    for name, df in (("train", train), ("test", test)):
        index_of(truth.user_ids, df["user_id"].to_numpy(np.int64), f"{name} user_id")
        index_of(truth.pin_ids, df["pin_id"].to_numpy(np.int64), f"{name} pin_id")
    frame = pd.concat(
        [train[["user_id", "pin_id"]].assign(part="train"), test[["user_id", "pin_id"]].assign(part="test")],
        ignore_index=True,
    )
    split = Split.from_frame(frame, truth.pin_ids)
    if split.relevant("test").nnz == 0:
        raise ValueError("no test user has a test pin outside their train pins")
    oracle = Oracle(truth)
    oracle.fit(split)
    return evaluate(oracle, split, ks=(k,), on="test", curve_k=1)[f"recall@{k}"]
