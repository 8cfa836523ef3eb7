"""Feature rows (Feast offline or online, same column names) -> tensors for the towers.

One encoder serves training, evaluation, the offline pin embedding and the online user tower, so a value
is transformed the same way everywhere. Vocabularies are fitted on the training set and stored in the
checkpoint. Index 0 is both "unknown" and "padding" for every id; the towers mask it out of sequences.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch

USER_COUNT_COLUMNS = ("engagements_7d", "engagements_30d", "saves_30d", "hides_30d", "history_length")
PIN_COUNT_COLUMNS = ("decayed_engagement", "pin_impressions_30d", "pin_engagements_30d", "pin_saves_30d", "age_days")
PIN_RATE_COLUMNS = ("pin_impressions_30d", "pin_engagements_30d", "pin_saves_30d")
"""Counts also read as per-day rates over the pin's exposure in their window (``PIN_COUNT_WINDOW_DAYS``)."""
PIN_IMPRESSION_RATE = len(PIN_COUNT_COLUMNS) + 1 + PIN_RATE_COLUMNS.index("pin_impressions_30d")
"""Column of the pin tower's numeric input that holds the log impression rate (the popularity prior's signal)."""
PIN_COUNT_WINDOW_DAYS = 30.0
"""Window of the ``*_30d`` pin counts: a pin younger than it was exposed for its age only."""
RATE_PSEUDO = 0.5
"""Pseudo-count (and pseudo-days) of the rates: log((count + 0.5) / (min(age, window) + 0.5))."""
PIN_NUMERIC = len(PIN_COUNT_COLUMNS) + 1 + len(PIN_RATE_COLUMNS)
"""Width of the pin tower's numeric input: log counts, log days since the features' row, log rates."""
AGE_BUCKETS = np.array([18, 25, 35, 45, 55, 65], dtype=np.float64)
"""Edges of the user-age buckets (bucket 0 = unknown / 0)."""
RECENCY_BUCKETS = 16
"""Buckets of log2(1 + age in hours) for the recency of each sequence item."""


def _index(values: np.ndarray, vocab: np.ndarray) -> np.ndarray:
    """Map ids to 1-based positions in the sorted ``vocab``; unknown ids -> 0."""
    pos = np.searchsorted(vocab, values)
    pos = np.clip(pos, 0, len(vocab) - 1)
    found = vocab[pos] == values if len(vocab) else np.zeros(len(values), dtype=bool)
    return np.where(found, pos + 1, 0).astype(np.int64)


Columns = pd.DataFrame | dict[str, list]
"""Feature rows: a DataFrame (offline, batches) or a mapping column -> list of values (Feast's online
``to_dict()``, one request: no DataFrame is built on the request path). Both give identical tensors."""


def _column(rows: Columns, name: str, n: int, default: Any = None) -> np.ndarray:
    """One column as an (n,) object array (``default`` everywhere when the rows lack it)."""
    if name not in rows:
        return np.full(n, default, dtype=object)
    values = rows[name]
    if isinstance(values, pd.Series) and isinstance(values.dtype, pd.ArrowDtype):
        # Arrow-backed lists (``load_split(features='fit')``): a NumPy view a row, None where null
        import pyarrow as pa

        return pa.array(values.array).to_numpy(zero_copy_only=False)
    return values.to_numpy(dtype=object) if isinstance(values, pd.Series) else np.asarray(values, dtype=object)


def _numbers(values: np.ndarray, fill: float = 0.0) -> np.ndarray:
    """(n,) float64 of an object column; missing or non-numeric values -> ``fill``."""
    out = pd.to_numeric(values, errors="coerce")
    out = np.asarray(out, dtype=np.float64)
    return np.where(np.isnan(out), fill, out)


def _strings(values: np.ndarray) -> np.ndarray:
    return np.array(["" if v is None or v is pd.NA or (isinstance(v, float) and np.isnan(v)) else str(v)
                     for v in values], dtype=object)


def _lists(values: np.ndarray, length: int, dtype: Any) -> tuple[np.ndarray, np.ndarray]:
    """Ragged list column -> (n, length) padded array and (n,) lengths (truncated to ``length``)."""
    n = len(values)
    out = np.zeros((n, length), dtype=dtype)
    lens = np.zeros(n, dtype=np.int64)
    for i, v in enumerate(values):
        if v is None or (isinstance(v, float) and np.isnan(v)):
            continue
        arr = np.asarray(v, dtype=dtype)[:length]
        out[i, : len(arr)] = arr
        lens[i] = len(arr)
    return out, lens


@dataclass
class Encoder:
    """Vocabularies and constants fitted on a training set; pure data, saved in checkpoints."""

    pin_ids: np.ndarray
    """Sorted canonical pin ids with an embedding (index = position + 1; 0 = unknown/padding)."""
    n_interests: int
    genders: list[str] = field(default_factory=list)
    segments: list[str] = field(default_factory=list)
    history_length: int = 50
    top_interests: int = 3
    user_ids: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    """Sorted user ids with a (pre-trained) user embedding (index = position + 1; 0 = unknown)."""
    pin_interests: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    """Interest of each vocabulary pin + 1 (0 = unknown), aligned with ``pin_ids``: the interest of every
    history item, which the history's interest histogram counts."""

    @classmethod
    def fit(cls, train: pd.DataFrame, n_interests: int, history_length: int = 50, top_interests: int = 3,
            extra_pin_ids: np.ndarray | None = None, user_ids: np.ndarray | None = None,
            pin_interest: pd.Series | None = None) -> Encoder:
        """Vocabularies of ``train`` (training rows): every pin they label or hold in their histories, plus
        ``extra_pin_ids`` (e.g. a pre-trained table's pins); ``user_ids`` for the user-id input (default none);
        ``pin_interest`` (pin_id -> interest_id; default: ``train``'s own) for the history items' interests."""
        parts = [train["pin_id"].to_numpy(np.int64)]
        if "recent_pin_ids" in train:
            parts += [np.asarray(v, np.int64) for v in _column(train, "recent_pin_ids", len(train))
                      if v is not None and len(v)]
        if extra_pin_ids is not None:
            parts.append(np.asarray(extra_pin_ids, np.int64))
        pin_ids = np.unique(np.concatenate(parts))
        if pin_interest is None:
            pin_interest = train.drop_duplicates("pin_id").set_index("pin_id")["interest_id"]
        interest = pd.to_numeric(pin_interest[~pin_interest.index.duplicated()].reindex(pin_ids), errors="coerce")
        return cls(
            pin_interests=np.clip(interest.fillna(-1).to_numpy(np.int64) + 1, 0, n_interests),
            pin_ids=pin_ids,
            n_interests=n_interests,
            genders=sorted(set(_strings(_column(train, "gender", len(train))))) if "gender" in train else [],
            segments=sorted(set(_strings(_column(train, "segment", len(train))))) if "segment" in train else [],
            history_length=history_length,
            top_interests=top_interests,
            user_ids=np.unique(np.asarray(user_ids if user_ids is not None else [], np.int64)),
        )

    @property
    def n_pins(self) -> int:
        """Rows of the pin embedding table (vocabulary + index 0)."""
        return len(self.pin_ids) + 1

    @property
    def n_users(self) -> int:
        """Rows of the user embedding table (vocabulary + index 0)."""
        return len(self.user_ids) + 1

    def state(self) -> dict[str, Any]:
        return {"pin_ids": torch.from_numpy(self.pin_ids), "n_interests": self.n_interests, "genders": self.genders,
                "segments": self.segments, "history_length": self.history_length,
                "top_interests": self.top_interests, "user_ids": torch.from_numpy(self.user_ids),
                "pin_interests": torch.from_numpy(self.pin_interests)}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> Encoder:
        ids = {k: np.asarray(state.get(k, []), dtype=np.int64) for k in ("pin_ids", "user_ids", "pin_interests")}
        return cls(**{**state, **ids})

    def _category(self, values: np.ndarray, vocab: list[str]) -> np.ndarray:
        return _index(_strings(values), np.asarray(vocab, dtype=object)) if vocab else np.zeros(len(values), np.int64)

    def users(self, rows: Columns) -> dict[str, torch.Tensor]:
        """User-tower inputs, each (n, ...): categorical ids, log counts, the padded pin sequence with
        recency buckets, and the top interests (+1 so that 0 is padding). ``rows``: a DataFrame or a mapping
        column -> values (the online store's answer)."""
        n = len(rows) if isinstance(rows, pd.DataFrame) else len(next(iter(rows.values())))
        age = _numbers(_column(rows, "age", n))
        age_bucket = np.where(age > 0, np.searchsorted(AGE_BUCKETS, age, side="right") + 1, 0)
        counts = np.stack([np.log1p(_numbers(_column(rows, c, n)).clip(0)) for c in USER_COUNT_COLUMNS], axis=1)
        seq_ids, seq_len = _lists(_column(rows, "recent_pin_ids", n), self.history_length, np.int64)
        seq_age, _ = _lists(_column(rows, "recent_pin_ages_days", n), self.history_length, np.float64)
        seq_idx = _index(seq_ids.ravel(), self.pin_ids).reshape(seq_ids.shape)
        valid = np.arange(self.history_length)[None, :] < seq_len[:, None]
        seq_idx = np.where(valid, seq_idx, 0)
        recency = np.clip(np.log2(1 + seq_age.clip(0) * 24).astype(np.int64), 0, RECENCY_BUCKETS - 1)
        top, top_len = _lists(_column(rows, "top_interest_ids", n), self.top_interests, np.int64)
        top = np.where(np.arange(self.top_interests)[None, :] < top_len[:, None], top + 1, 0)
        user = _index(_numbers(_column(rows, "user_id", n), fill=-1).astype(np.int64), self.user_ids)
        return {
            "impressed": torch.from_numpy(self._impressed(rows, n)),
            "user": torch.from_numpy(user),
            "age_bucket": torch.from_numpy(age_bucket.astype(np.int64)),
            "gender": torch.from_numpy(self._category(_column(rows, "gender", n, ""), self.genders)),
            "segment": torch.from_numpy(self._category(_column(rows, "segment", n, ""), self.segments)),
            "counts": torch.from_numpy(counts.astype(np.float32)),
            "seq": torch.from_numpy(seq_idx),
            "seq_interest": torch.from_numpy(self._pin_interest(seq_idx)),
            "seq_valid": torch.from_numpy(valid & (seq_idx > 0)),
            "seq_recency": torch.from_numpy(np.where(valid, recency + 1, 0)),
            "top_interests": torch.from_numpy(np.clip(top, 0, self.n_interests)),
        }

    def _impressed(self, rows: Columns, n: int) -> np.ndarray:
        """(n, n_interests + 1) float32 impressions per interest + 1 (column 0, unknown, stays 0) from the parallel
        lists ``impressed_interest_ids`` / ``impressed_interest_counts``; zeros without them."""
        ids, lens = _lists(_column(rows, "impressed_interest_ids", n), self.n_interests, np.int64)
        counts, count_lens = _lists(_column(rows, "impressed_interest_counts", n), self.n_interests, np.float64)
        if not np.array_equal(lens, count_lens):
            raise ValueError("impressed_interest_ids and impressed_interest_counts differ in length")
        ok = (np.arange(self.n_interests)[None, :] < lens[:, None]) & (ids >= 0) & (ids < self.n_interests)
        out = np.zeros((n, self.n_interests + 1), np.float32)
        row, _ = np.nonzero(ok)
        np.add.at(out, (row, ids[ok] + 1), counts[ok].clip(0))
        return out

    def _pin_interest(self, idx: np.ndarray) -> np.ndarray:
        """Interest (+1; 0 = unknown/padding) of vocabulary indices ``idx`` (0 = padding)."""
        if not len(self.pin_interests):
            return np.zeros_like(idx)
        table = np.concatenate([[0], self.pin_interests])
        return table[idx]

    def pins(self, df: pd.DataFrame, now: Any = None) -> dict[str, torch.Tensor]:
        """Pin-tower inputs, each (n, ...): pin index, interest (+1; 0 = unknown), log counts and log rates.
        ``now``: when the pins are scored (a timestamp); default each row's ``event_timestamp`` (the time of its
        point-in-time join). A pin's feature row is written at the midnight after each active day, so the days
        from its ``pin_features_at`` to ``now`` are days without activity: they age the pin and thin its rates."""
        n = len(df)
        raw = {c: pd.to_numeric(df[c], errors="coerce").to_numpy(np.float64) if c in df else np.full(n, np.nan)
               for c in PIN_COUNT_COLUMNS}
        known = ~np.isnan(raw["age_days"])       # no feature row (never materialised or expired): an old, idle pin
        raw = {c: np.nan_to_num(v).clip(0) for c, v in raw.items()}
        stale = _days_since(df, "pin_features_at", now)
        age = np.where(known, raw["age_days"] + stale, PIN_COUNT_WINDOW_DAYS)
        # a young pin's 30-day count covers its age only: the rate per exposed day says how often it is shown now
        exposure = np.minimum(age, PIN_COUNT_WINDOW_DAYS) + RATE_PSEUDO
        counts = np.stack([np.log1p(raw[c]) for c in PIN_COUNT_COLUMNS] + [np.log1p(stale)]
                          + [np.log((raw[c] + RATE_PSEUDO) / exposure) for c in PIN_RATE_COLUMNS], axis=1)
        interest = pd.to_numeric(df["interest_id"], errors="coerce").fillna(-1).to_numpy(np.int64) + 1
        return {
            "pin": torch.from_numpy(_index(df["pin_id"].to_numpy(np.int64), self.pin_ids)),
            "interest": torch.from_numpy(np.clip(interest, 0, self.n_interests)),
            "counts": torch.from_numpy(counts.astype(np.float32)),
        }


def _days_since(df: pd.DataFrame, column: str, now: Any) -> np.ndarray:
    """(n,) days from each row's ``column`` timestamp to ``now`` (default: the row's ``event_timestamp``), >= 0;
    0 where either is missing."""
    n = len(df)
    if column not in df:
        return np.zeros(n)
    at = pd.to_datetime(df[column], utc=True, errors="coerce")
    if now is None:
        if "event_timestamp" not in df:
            return np.zeros(n)
        ref = pd.to_datetime(df["event_timestamp"], utc=True, errors="coerce")
    else:
        ref = pd.Series(pd.to_datetime([now], utc=True)[0], index=at.index)
    days = (ref - at).dt.total_seconds().to_numpy(np.float64) / 86400.0
    return np.nan_to_num(days).clip(0)


def take(batch: dict[str, torch.Tensor], idx: torch.Tensor | np.ndarray) -> dict[str, torch.Tensor]:
    """Rows ``idx`` of every tensor in an encoded batch."""
    idx = torch.as_tensor(idx)
    return {k: v[idx] for k, v in batch.items()}
