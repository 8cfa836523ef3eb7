"""Offline evaluation harness shared by the retrieval model and the baselines.

Protocol (one definition for every model):

- **Interactions** are positive engagements (``label == 1``) with ``user_id``, ``pin_id`` (canonical) and
  ``event_timestamp``. Every row counts (a user may engage with one pin several times); interactions
  with pins outside the candidate set are dropped *before* the split, so the split and every metric
  live on the candidate set.
- **Temporal split, per user** (``temporal_split``): a user's rows sorted by ``(event_timestamp,
  pin_id)``; the last ``ceil(test_fraction · n)`` rows are test (at least one, and at least one row is
  left for training); of the remaining ``m`` rows the last ``ceil(valid_fraction · m)`` are validation
  (at least one when ``m >= 2``, none when ``m == 1`` or ``valid_fraction == 0``); the rest is
  train-proper. A user with a single interaction cannot be evaluated (nothing to condition on) and goes
  entirely to train. ``ceil`` ignores floating-point noise (``0.14 · 50`` = 7.000000000000001 -> 7, not 8).
- **Ranking**: every scorer ranks the full candidate set for every evaluated user, after removing the
  items the user engaged with in the data it was fit on: train + validation for ``on="test"``,
  train-proper for ``on="valid"``. Ties are broken by item index (deterministic).
- **Relevant set** of a user: their distinct target-part (test or validation) items that are not
  excluded (an excluded item cannot be retrieved); users left without any are skipped. This is the
  protocol of ``training.data.synthetic.oracle_recall_at_k``, which runs through this harness.
- **Fitting**: scorers fit on ``split.train``. Tune on ``on="valid"`` with the split as built, then
  refit on ``split.merged()`` (train + validation in ``train``) before ``on="test"``.

Metrics (``evaluate``): recall@K (mean over users of ``|top-K ∩ relevant| / |relevant|``, see
``training.metrics``), capped recall@K (denominator ``min(|relevant|, K)``, the "normalized" recall of
Liang et al. 2018), the whole recall@1..``curve_k`` curve from the same ranked lists, NDCG@10 (binary
relevance, ideal DCG over ``min(|relevant|, 10)`` hits), catalogue coverage@K (distinct items in all
users' top-K / number of candidates), mean log-popularity@K (``log(1 + count)`` of the recommended
items, ``count`` = the item's interactions in the data the model was fit on, averaged over every
recommended slot of every user), and per-interest recall@50 (for each interest ``c`` of the relevant
items: ``Σ_users hits in c / Σ_users relevant items in c``, i.e. micro-averaged within the interest; it
needs ``item_interest`` on the split). Users are scored in batches so that one batch's
(n_users, n_items) float32 score matrix stays under ``batch_bytes`` (256 MB by default).

Candidate set: a parameter of the split (``items``; default every canonical pin in the positives). On
ML-100k (1664 canonical pins; serving corpus 1590) the choice moves recall by < 0.01, so it cannot be what
separates these figures from the ML-100k reference figures (popularity R@10/R@50 .119/.213, item-kNN
.197/.346, tuned ALS .177/.375). Those are reproduced within 0.006 only with the capped recall and ties
at equal timestamps in a pseudo-random order (``tie_break="hash"``); with recall@K as defined here and
ties by pin id, popularity gives .060/.200. ``bench/bench_baselines.py`` prints the comparison.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal, Protocol, runtime_checkable

import numpy as np
import pandas as pd
import scipy.sparse as sp

from training.metrics import coverage, mean_log_popularity, ndcg_at_k, recall_curve

PARTS = ("train", "valid", "test")
BATCH_BYTES = 256 * 2**20
"""Default bound on one batch's (n_users, n_items) float32 score matrix."""
_CEIL_EPS = 1e-9


@dataclass(frozen=True)
class Split:
    """A per-user temporal split over a dense user and item (candidate set) index.

    Matrices are (n_users, n_items) float32 CSR holding interaction counts (rows per user-item pair);
    row ``u`` is ``users[u]``, column ``i`` is ``items[i]``.
    """

    users: np.ndarray
    """(n_users,) int64 user ids, ascending: the row index of every matrix and score."""
    items: np.ndarray
    """(n_items,) int64 candidate pin ids, ascending: the column index of every matrix and score."""
    train: sp.csr_matrix
    """Counts in train-proper (train + validation after ``merged()``)."""
    valid: sp.csr_matrix
    """Counts in validation (empty after ``merged()``)."""
    test: sp.csr_matrix
    """Counts in test."""
    frame: pd.DataFrame
    """The interactions: user_id, pin_id, event_timestamp, user_idx, item_idx, part ('train'|'valid'|'test')."""
    item_interest: np.ndarray | None = None
    """(n_items,) int64 interest of each candidate, -1 when unknown; None without an interest map."""
    is_merged: bool = False
    """True after ``merged()``: validation is folded into train and can no longer be evaluated."""

    @property
    def n_users(self) -> int:
        return len(self.users)

    @property
    def n_items(self) -> int:
        return len(self.items)

    @classmethod
    def from_frame(
        cls,
        frame: pd.DataFrame,
        items: np.ndarray | Sequence[int] | None = None,
        item_interest: Mapping[int, int] | pd.Series | None = None,
    ) -> Split:
        """Build a split from interactions already assigned to parts (column ``part``).

        ``frame`` needs user_id, pin_id and part (event_timestamp is kept when present). Rows whose
        pin is not in ``items`` (default: every pin in ``frame``) are dropped. ``item_interest`` maps
        pin id -> interest id.
        """
        missing = {"user_id", "pin_id", "part"} - set(frame.columns)
        if missing:
            raise ValueError(f"frame lacks columns {sorted(missing)}")
        bad = set(frame["part"].unique()) - set(PARTS)
        if bad:
            raise ValueError(f"unknown parts {sorted(bad)}; expected {PARTS}")
        item_ids = _candidate_ids(frame, items)
        df = frame[frame["pin_id"].isin(item_ids)].copy()
        if df.empty:
            raise ValueError("no interaction falls inside the candidate set")
        users = np.unique(df["user_id"].to_numpy(np.int64))
        df["user_idx"] = np.searchsorted(users, df["user_id"].to_numpy(np.int64))
        df["item_idx"] = np.searchsorted(item_ids, df["pin_id"].to_numpy(np.int64))
        shape = (len(users), len(item_ids))
        mats = {part: _counts(df[df["part"] == part], shape) for part in PARTS}
        return cls(
            users=users,
            items=item_ids,
            train=mats["train"],
            valid=mats["valid"],
            test=mats["test"],
            frame=df.reset_index(drop=True),
            item_interest=None if item_interest is None else _interest_array(item_ids, item_interest),
        )

    def merged(self) -> Split:
        """The split with validation folded into train (for the final fit before the test evaluation)."""
        if self.is_merged:
            return self
        frame = self.frame.assign(part=self.frame["part"].replace("valid", "train"))
        empty = sp.csr_matrix(self.valid.shape, dtype=np.float32)
        return replace(self, train=(self.train + self.valid).tocsr(), valid=empty, frame=frame, is_merged=True)

    def excluded(self, on: Literal["test", "valid"]) -> sp.csr_matrix:
        """(n_users, n_items) counts of the items removed from each user's ranking when evaluating ``on``."""
        if on == "test":
            return (self.train + self.valid).tocsr()
        if on == "valid":
            if self.is_merged:
                raise ValueError("validation was merged into train; evaluate on='valid' before merged()")
            return self.train
        raise ValueError(f"on must be 'test' or 'valid', got {on!r}")

    def relevant(self, on: Literal["test", "valid"]) -> sp.csr_matrix:
        """(n_users, n_items) bool: the user's distinct ``on`` items that are not excluded."""
        target = self.test if on == "test" else self.valid
        excluded = self.excluded(on)
        t = (target > 0).astype(np.int8)
        rel = sp.csr_matrix((t - t.multiply(excluded > 0)) > 0)
        rel.sort_indices()
        return rel


def temporal_split(
    interactions: pd.DataFrame,
    test_fraction: float = 0.2,
    valid_fraction: float = 0.1,
    *,
    items: np.ndarray | Sequence[int] | None = None,
    item_interest: Mapping[int, int] | pd.Series | None = None,
    tie_break: Literal["pin_id", "hash"] = "pin_id",
    seed: int = 0,
) -> Split:
    """Per-user temporal split of positive interactions (see the module docstring for the rules).

    ``interactions`` needs user_id, pin_id, event_timestamp; when it has a ``label`` column only the
    rows with ``label == 1`` are used. ``items`` is the candidate set (default: every pin in the
    positives); rows outside it are dropped before splitting. ``item_interest`` maps pin id -> interest
    id (needed for the per-interest recall).

    ``tie_break`` orders a user's interactions with equal timestamps: ``"pin_id"`` (ascending id, the
    default) or ``"hash"`` (a fixed pseudo-random order from a hash of (user_id, pin_id, ``seed``),
    independent of row order). It matters when timestamps tie a lot: 76% of ML-100k's ratings share
    their (user, second) with another rating, and ML-100k movie ids follow catalogue order, so ordering
    ties by id puts each user's newest-catalogued (least popular) movies into test.
    """
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    if not 0 <= valid_fraction < 1:
        raise ValueError(f"valid_fraction must be in [0, 1), got {valid_fraction}")
    missing = {"user_id", "pin_id", "event_timestamp"} - set(interactions.columns)
    if missing:
        raise ValueError(f"interactions lack columns {sorted(missing)}")
    df = interactions
    if "label" in df.columns:
        df = df[df["label"] == 1]
    df = df[["user_id", "pin_id", "event_timestamp"]]
    item_ids = _candidate_ids(df, items)
    df = df[df["pin_id"].isin(item_ids)]
    if tie_break == "pin_id":
        df = df.sort_values(["user_id", "event_timestamp", "pin_id"], kind="stable").reset_index(drop=True)
    elif tie_break == "hash":
        key = _hash_order(df["user_id"].to_numpy(np.int64), df["pin_id"].to_numpy(np.int64), seed)
        df = df.assign(_tie=key).sort_values(["user_id", "event_timestamp", "_tie", "pin_id"], kind="stable")
        df = df.drop(columns="_tie").reset_index(drop=True)
    else:
        raise ValueError(f"tie_break must be 'pin_id' or 'hash', got {tie_break!r}")
    grouped = df.groupby("user_id", sort=False)
    n = grouped["pin_id"].transform("size").to_numpy(np.int64)
    position = grouped.cumcount().to_numpy(np.int64)
    n_test = np.where(n >= 2, np.clip(_ceil(test_fraction * n), 1, n - 1), 0)
    rest = n - n_test
    n_valid = np.where((rest >= 2) & (valid_fraction > 0), np.clip(_ceil(valid_fraction * rest), 1, rest - 1), 0)
    part = np.where(position >= rest, "test", np.where(position >= rest - n_valid, "valid", "train"))
    return Split.from_frame(df.assign(part=part), item_ids, item_interest)


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
) -> dict[str, Any]:
    """Rank the candidate set for every evaluable user with an already fitted ``scorer``.

    Returns ``recall@K``, ``capped_recall@K`` (denominator ``min(|relevant|, K)``), ``coverage@K`` and
    ``logpop@K`` for K in ``ks``, ``ndcg@{ndcg_k}``,
    ``recall_curve`` (list of recall@1..curve_k), ``recall@{interest_k}_by_interest`` (interest id ->
    recall, only with ``split.item_interest``), ``relevant_by_interest`` (interest id -> number of
    relevant user-item pairs), ``users`` (number evaluated), ``items`` and ``seconds``. Holds the top
    ``max(ks, curve_k, ...)`` item indices of every evaluated user (n_users × depth int32) in memory.
    """
    ks = sorted({int(k) for k in ks})
    if not ks or ks[0] < 1:
        raise ValueError(f"ks must be positive, got {ks}")
    depth = min(max(*ks, curve_k, ndcg_k, interest_k), split.n_items)
    t0 = time.perf_counter()
    excluded = split.excluded(on)
    relevant = split.relevant(on)
    n_rel = np.diff(relevant.indptr)
    users = np.flatnonzero(n_rel > 0)
    if len(users) == 0:
        raise ValueError(f"no user has a relevant {on} item")
    batch = max(1, batch_bytes // (4 * split.n_items))
    topk = np.empty((len(users), depth), dtype=np.int32)
    hits = np.empty((len(users), depth), dtype=bool)
    for start in range(0, len(users), batch):
        rows = users[start : start + batch]
        scores = np.asarray(scorer.score(rows), dtype=np.float32)
        if scores.shape != (len(rows), split.n_items):
            raise ValueError(f"scorer returned {scores.shape}, expected {(len(rows), split.n_items)}")
        if scores.base is not None or not scores.flags.writeable:
            scores = scores.copy()  # never write -inf into a view of the scorer's own state
        ex = excluded[rows]
        scores[np.repeat(np.arange(len(rows)), np.diff(ex.indptr)), ex.indices] = -np.inf
        top = _top_items(scores, depth)
        rel = relevant[rows].toarray()
        sl = slice(start, start + len(rows))
        topk[sl] = top
        hits[sl] = np.take_along_axis(rel, np.maximum(top, 0), axis=1) & (top >= 0)
    n_rel = n_rel[users]
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
    out["seconds"] = round(time.perf_counter() - t0, 3)
    return out


def write_report(
    results: Mapping[str, Mapping[str, Any]],
    out_dir: str | Path,
    title: str,
    notes: Sequence[str] = (),
) -> Path:
    """Write ``report.md`` (models × metrics table, per-interest recall), ``results.json`` and PNG plots.

    ``results`` maps a model name to an ``evaluate`` output. Plots: ``recall_curve.png`` (recall@K for
    K = 1..curve length, every model) and, when the results carry per-interest recall,
    ``recall_by_interest.png``. ``notes`` are extra markdown lines under the table. Returns the .md path.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if not results:
        raise ValueError("no results to report")
    lines = [f"# {title}", "", format_table(results), ""]
    lines += [*notes, ""] if notes else []

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, res in results.items():
        curve = res.get("recall_curve") or []
        ax.plot(np.arange(1, len(curve) + 1), curve, label=name)
    ax.set_xlabel("K")
    ax.set_ylabel("recall@K")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "recall_curve.png", dpi=120)
    plt.close(fig)
    lines += ["![recall@K](recall_curve.png)", ""]

    interest_key = next((k for r in results.values() for k in r if k.endswith("_by_interest") and "@" in k), None)
    if interest_key is not None:
        interests = sorted({i for r in results.values() for i in r.get(interest_key, {})}, key=_interest_sort_key)
        support = next(iter(results.values())).get("relevant_by_interest", {})
        header = "| interest | relevant | " + " | ".join(results) + " |"
        lines += [f"## {interest_key.replace('_by_interest', '')} by interest of the relevant items", ""]
        lines += [header, "|" + "---|" * (len(results) + 2)]
        for i in interests:
            vals = " | ".join(_fmt(r.get(interest_key, {}).get(i)) for r in results.values())
            lines.append(f"| {i} | {support.get(i, '')} | {vals} |")
        lines += ["", "![per-interest recall](recall_by_interest.png)", ""]
        fig, ax = plt.subplots(figsize=(min(14, max(7, 0.4 * len(interests) + 2)), 4.5))
        width = 0.8 / len(results)
        x = np.arange(len(interests))
        for j, (name, res) in enumerate(results.items()):
            vals = [res.get(interest_key, {}).get(i, np.nan) for i in interests]
            ax.bar(x + j * width - 0.4 + width / 2, vals, width, label=name)
        ax.set_xticks(x, interests, rotation=60, fontsize=8)
        ax.set_ylabel(interest_key.replace("_by_interest", ""))
        ax.set_xlabel("interest")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / "recall_by_interest.png", dpi=120)
        plt.close(fig)

    (out / "results.json").write_text(json.dumps(results, indent=2, default=_jsonable))
    md = out / "report.md"
    md.write_text("\n".join(lines))
    return md


def format_table(results: Mapping[str, Mapping[str, Any]]) -> str:
    """Markdown table, one row per model, one column per scalar metric (recall, ndcg, coverage, logpop)."""
    order = ("recall@", "capped_recall@", "ndcg@", "coverage@", "logpop@")
    cols = [
        k
        for prefix in order
        for k in sorted(
            {k for r in results.values() for k in r if k.startswith(prefix) and "_by_" not in k},
            key=lambda s: int(s.split("@")[1]),
        )
    ]
    cols += ["users"]
    lines = ["| model | " + " | ".join(cols) + " |", "|---|" + "---:|" * len(cols)]
    for name, res in results.items():
        lines.append(f"| {name} | " + " | ".join(_fmt(res.get(c)) for c in cols) + " |")
    return "\n".join(lines)


def _fmt(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.3f}" if abs(v) < 10 else f"{v:.1f}"
    return str(v)


def _interest_sort_key(i: str) -> tuple[int, str]:
    return (int(i), "") if i.lstrip("-").isdigit() else (10**9, i)


def _jsonable(v: Any) -> Any:
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, np.ndarray):
        return v.tolist()
    raise TypeError(f"not JSON serializable: {type(v).__name__}")


def _hash_order(user_ids: np.ndarray, pin_ids: np.ndarray, seed: int) -> np.ndarray:
    """(n,) uint64 pseudo-random keys of (user_id, pin_id, seed) pairs (splitmix64 finalizer)."""
    with np.errstate(over="ignore"):
        x = user_ids.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)
        x ^= pin_ids.astype(np.uint64) + np.uint64(seed) * np.uint64(0xD1B54A32D192ED03)
        x ^= x >> np.uint64(30)
        x *= np.uint64(0xBF58476D1CE4E5B9)
        x ^= x >> np.uint64(27)
        x *= np.uint64(0x94D049BB133111EB)
        x ^= x >> np.uint64(31)
    return x


def _ceil(x: np.ndarray) -> np.ndarray:
    """Elementwise ceil that ignores floating-point noise above an integer (0.14 · 50 -> 7, not 8)."""
    return np.ceil(np.asarray(x, dtype=np.float64) - _CEIL_EPS).astype(np.int64)


def _candidate_ids(frame: pd.DataFrame, items: np.ndarray | Sequence[int] | None) -> np.ndarray:
    ids = frame["pin_id"].to_numpy(np.int64) if items is None else np.asarray(items, dtype=np.int64)
    ids = np.unique(ids)
    if len(ids) == 0:
        raise ValueError("the candidate set is empty")
    return ids


def _counts(df: pd.DataFrame, shape: tuple[int, int]) -> sp.csr_matrix:
    """(n_users, n_items) float32 CSR of interaction counts of the rows of ``df``."""
    ones = np.ones(len(df), dtype=np.float32)
    m = sp.coo_matrix((ones, (df["user_idx"].to_numpy(), df["item_idx"].to_numpy())), shape=shape).tocsr()
    m.sum_duplicates()
    m.sort_indices()
    return m


def _interest_array(items: np.ndarray, item_interest: Mapping[int, int] | pd.Series) -> np.ndarray:
    """(n_items,) int64 interest of each candidate id (-1 when the map lacks it)."""
    s = item_interest if isinstance(item_interest, pd.Series) else pd.Series(dict(item_interest))
    s = s[~s.index.duplicated()].dropna()
    return s.reindex(items).fillna(-1).to_numpy(np.int64)


def _top_items(scores: np.ndarray, depth: int) -> np.ndarray:
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


def positives(training_set: pd.DataFrame) -> pd.DataFrame:
    """The positive interactions (label == 1) of a training set: user_id, pin_id, event_timestamp."""
    df = training_set[training_set["label"] == 1] if "label" in training_set.columns else training_set
    return df[["user_id", "pin_id", "event_timestamp"]].reset_index(drop=True)


def interest_map(training_set: pd.DataFrame) -> pd.Series:
    """pin_id -> interest_id from a training set's pin features (the first non-null value per pin)."""
    df = training_set[["pin_id", "interest_id"]].dropna().drop_duplicates("pin_id")
    return pd.Series(df["interest_id"].to_numpy(np.int64), index=df["pin_id"].to_numpy(np.int64))


__all__ = [
    "BATCH_BYTES",
    "PARTS",
    "Scorer",
    "Split",
    "evaluate",
    "format_table",
    "interest_map",
    "positives",
    "temporal_split",
    "write_report",
]
