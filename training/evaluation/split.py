"""The evaluation split: a per-user temporal split over a dense user × candidate index.

Interactions are positive engagements (``label == 1``) with ``user_id``, ``pin_id`` (canonical) and
``event_timestamp``. Every row counts (a user may engage with one pin several times); interactions with pins
outside the candidate set are dropped *before* the split, so the split and every metric live on the
candidate set. A user's rows sorted by ``(event_timestamp, pin_id)`` (or a fixed hash for ties): the last
``ceil(test_fraction · n)`` rows are test (at least one, and at least one row is left for training); of the
remaining ``m`` rows the last ``ceil(valid_fraction · m)`` are validation (at least one when ``m >= 2``, none
when ``m == 1`` or ``valid_fraction == 0``); the rest is train-proper. A user with a single interaction cannot
be evaluated (nothing to condition on) and goes entirely to train. ``ceil`` ignores floating-point noise
(``0.14 · 50`` = 7.000000000000001 -> 7, not 8).

Candidate set: a parameter of the split (``items``; default every canonical pin in the positives).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import scipy.sparse as sp

from training.config import Config
from training.features.training_set import training_set_path
from training.io import release_memory

PARTS = ("train", "valid", "test")
KEYS = ["user_id", "pin_id", "event_timestamp"]
"""The columns that identify a training-set row in the split's frame."""
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

    def window_start(self, fraction: float) -> pd.Timestamp:
        """Start of the newest ``fraction`` of the train-proper interactions, by time: the two-tower's training
        window is [window_start, end] and a pre-trained table must end before it. ``fraction`` 1 = the first one."""
        times = self.frame.loc[self.frame["part"] == "train", "event_timestamp"]
        if fraction >= 1:
            return times.min()
        return times.quantile(1 - fraction, interpolation="higher")

    def cutoffs(self, parts: tuple[str, ...] = ("valid", "test")) -> pd.Series:
        """user_id -> the time of the user's first interaction of ``parts``: nothing from then on may inform a model
        evaluated on them (the default, both held-out parts: a model fitted for this split; ("test",): a model
        refit on train + validation for the test evaluation)."""
        held = self.frame[self.frame["part"].isin(parts)]
        return held.groupby("user_id")["event_timestamp"].min()

    def before_cutoffs(self, rows: pd.DataFrame, parts: tuple[str, ...] = ("valid", "test")) -> np.ndarray:
        """(len(rows),) bool: which rows (user_id, event_timestamp) are strictly before their user's ``cutoffs``
        (every row of a user without one)."""
        cut = rows["user_id"].map(self.cutoffs(parts))
        return cut.isna().to_numpy() | (rows["event_timestamp"] < cut).to_numpy()

    @cached_property
    def history_rows(self) -> pd.DataFrame:
        """The train rows a model may read as a user's history when it scores them: those strictly before the
        user's first held-out interaction (``cutoffs``: validation and test, or test after ``merged()``). Rows at
        that very instant stay training data but are not history: the towers' point-in-time features cannot see
        them, so a baseline's scoring history must not either (on ML-100k, whose sessions share a second, 1.3% of
        the train rows; with distinct timestamps, none)."""
        train = self.frame[self.frame["part"] == "train"]
        if "event_timestamp" not in train.columns:
            return train
        return train[self.before_cutoffs(train, ("test",) if self.is_merged else ("valid", "test"))]

    def history(self) -> sp.csr_matrix:
        """(n_users, n_items) counts of ``history_rows``: what a baseline scores a user from (it fits on ``train``)."""
        return _counts(self.history_rows, self.train.shape)

    def merged(self) -> Split:
        """The split with validation folded into train (for the final fit before the test evaluation)."""
        if self.is_merged:
            return self
        frame = self.frame.assign(part=self.frame["part"].replace("valid", "train"))
        empty = sp.csr_matrix(self.valid.shape, dtype=np.float32)
        return replace(self, train=(self.train + self.valid).tocsr(), valid=empty, frame=frame, is_merged=True)

    def horizon_matched(self) -> Split:
        """The split with each user's validation part started ``round((t - v) / 2)`` rows earlier (t, v: the user's
        test and validation rows; at least one train row stays): those last train rows become validation.

        A model fitted on train and evaluated on validation sees targets 1..v rows past its data, (v + 1) / 2 on
        average; refit on train + validation and evaluated on test, it sees them (t + 1) / 2 rows past (t ≈ 2.5 v
        with the default fractions). A model fitted on this split's train part sees the original validation
        targets (t + 1) / 2 rows past its data on average, as far as test's: the table the blend weight is chosen
        with is fitted on it (``training.pretrain.pretrain(until='horizon')``), so that a table that ages faster
        than the towers is not chosen on a horizon test does not have."""
        if self.is_merged:
            raise ValueError("horizon_matched needs the validation part: call it before merged()")
        f = self.frame
        counts = f.groupby(["user_id", "part"]).size().unstack(fill_value=0).reindex(columns=list(PARTS),
                                                                                     fill_value=0)
        gap = np.floor((counts["test"] - counts["valid"]) / 2 + 0.5).clip(lower=0)
        train = f[f["part"] == "train"].sort_values(["user_id", "event_timestamp"], kind="stable")
        from_end = train.groupby("user_id").cumcount(ascending=False)
        kept = train.groupby("user_id")["pin_id"].transform("size") - 1   # at least one train row stays
        moved = train.index[(from_end < train["user_id"].map(gap)) & (from_end < kept)]
        frame = f.copy()
        frame.loc[moved, "part"] = "valid"
        shape = (self.n_users, self.n_items)
        return replace(self, train=_counts(frame[frame["part"] == "train"], shape),
                       valid=_counts(frame[frame["part"] == "valid"], shape), frame=frame)

    def test_since(self, since: pd.Timestamp) -> Split:
        """The split with its test part cut to the interactions at or after ``since`` (train and validation as they
        are): the fresh holdout a retrain compares its candidate and the live model on."""
        f = self.frame
        return replace(self, test=_counts(f[(f["part"] == "test") & (f["event_timestamp"] >= since)],
                                          (self.n_users, self.n_items)))

    def valid_sample(self, n: int, seed: int) -> Split:
        """The split with its validation part kept for at most ``n`` users (a fixed random sample, by ``seed``, of
        the users with validation rows; train, test and every cutoff as they are): what validation scores when a
        catalog's users are too many to rank against every pin after each epoch. ``n`` 0 or at least the users with
        validation rows: the split itself."""
        users = np.flatnonzero(np.diff(self.valid.indptr) > 0)
        if n <= 0 or len(users) <= n:
            return self
        keep = np.zeros(self.n_users, dtype=np.float32)
        keep[np.random.default_rng(seed).choice(users, size=n, replace=False)] = 1.0
        return replace(self, valid=(sp.diags(keep) @ self.valid).tocsr())

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


def positives(training_set: pd.DataFrame) -> pd.DataFrame:
    """The positive interactions (label == 1) of a training set: user_id, pin_id, event_timestamp."""
    df = training_set[training_set["label"] == 1] if "label" in training_set.columns else training_set
    return df[["user_id", "pin_id", "event_timestamp"]].reset_index(drop=True)


def interest_map(training_set: pd.DataFrame) -> pd.Series:
    """pin_id -> interest_id from a training set's pin features (the first non-null value per pin)."""
    df = training_set[["pin_id", "interest_id"]].dropna().drop_duplicates("pin_id")
    return pd.Series(df["interest_id"].to_numpy(np.int64), index=df["pin_id"].to_numpy(np.int64))


SPLIT_COLUMNS = ("user_id", "pin_id", "event_timestamp", "label", "interest_id")
"""What the split itself reads from the training set (``load_split(cfg, features=False)``)."""


def load_split(cfg: Config, features: bool | Literal["fit"] = True) -> tuple[pd.DataFrame, Split, dict[str, Any]]:
    """(training set, its temporal split, its manifest) of the live training set: the one split every model of
    a run is fitted and evaluated on (ties at equal timestamps by a fixed hash of ``train.seed``). With
    ``features`` False only ``SPLIT_COLUMNS`` are read (the same split, without the feature columns' memory: what
    the pre-training stage needs). With ``features`` 'fit' the split is built from ``SPLIT_COLUMNS`` and the
    training set holds only ``fit_rows``, every column: what a two-tower fit, its validation and test read (the
    rows before the training window are most of a training set and most of its memory: each row holds its
    user's history lists)."""
    path = training_set_path(cfg)
    if not path.exists():
        raise FileNotFoundError(f"no training set at {path}: run `retrieval run` (or `retrieval training-set`)")
    manifest = json.loads(path.with_suffix(".json").read_text())
    ts = pd.read_parquet(path, columns=None if features is True else list(SPLIT_COLUMNS))
    split = temporal_split(ts, item_interest=interest_map(ts), tie_break="hash", seed=cfg.train.seed)
    if features == "fit":
        ts = read_rows(path, fit_rows(ts, split, split.window_start(cfg.train.window_fraction)))
    release_memory()
    return ts, split, manifest


def fit_rows(training_set: pd.DataFrame, split: Split, window_start: pd.Timestamp) -> np.ndarray:
    """(len(training_set),) bool: the rows a two-tower fit on ``split`` reads with their features: those of the
    training window (from ``window_start``), every hide (the hard negatives may come from before the window),
    every validation and test row (a user's held-out rows can be older than the window) and each pin's first row
    (the pins' interests)."""
    keep = (training_set["event_timestamp"] >= window_start).to_numpy()
    if "label" in training_set.columns:
        keep |= (training_set["label"] == 0).to_numpy()
    held = split.frame.loc[split.frame["part"] != "train", KEYS]
    keep |= pd.MultiIndex.from_frame(training_set[KEYS]).isin(pd.MultiIndex.from_frame(held))
    keep[np.unique(training_set["pin_id"].to_numpy(), return_index=True)[1]] = True
    return keep


def read_rows(path: Path, keep: np.ndarray, batch_rows: int = 65_536) -> pd.DataFrame:
    """The rows of the parquet file at ``path`` where ``keep`` (one bool per row, in file order), every column,
    read a batch at a time: the skipped rows are never held as pandas objects."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    def lists_in_arrow(t: pa.DataType) -> pd.ArrowDtype | None:   # one buffer a column, not an array object a row
        return pd.ArrowDtype(t) if pa.types.is_list(t) else None

    pieces, at = [], 0
    for batch in pq.ParquetFile(path).iter_batches(batch_size=batch_rows):
        mask = keep[at:at + batch.num_rows]
        at += batch.num_rows
        if mask.any():
            pieces.append(batch.filter(mask).to_pandas(types_mapper=lists_in_arrow))
    if at != len(keep):
        raise ValueError(f"{path} has {at:,} rows, the mask {len(keep):,}")
    return pd.concat(pieces, ignore_index=True)
