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


def _strings(col: pd.Series) -> np.ndarray:
    return col.fillna("").astype(str).to_numpy()


def _lists(col: pd.Series, length: int, dtype: Any) -> tuple[np.ndarray, np.ndarray]:
    """Ragged list column -> (n, length) padded array and (n,) lengths (truncated to ``length``)."""
    n = len(col)
    out = np.zeros((n, length), dtype=dtype)
    lens = np.zeros(n, dtype=np.int64)
    for i, v in enumerate(col.to_numpy()):
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

    @classmethod
    def fit(cls, train: pd.DataFrame, n_interests: int, history_length: int = 50, top_interests: int = 3,
            pin_ids: np.ndarray | None = None) -> Encoder:
        ids = np.unique(train["pin_id"].to_numpy(np.int64) if pin_ids is None else np.asarray(pin_ids, np.int64))
        return cls(
            pin_ids=ids,
            n_interests=n_interests,
            genders=sorted(set(_strings(train["gender"]))) if "gender" in train else [],
            segments=sorted(set(_strings(train["segment"]))) if "segment" in train else [],
            history_length=history_length,
            top_interests=top_interests,
        )

    @property
    def n_pins(self) -> int:
        """Rows of the pin embedding table (vocabulary + index 0)."""
        return len(self.pin_ids) + 1

    def state(self) -> dict[str, Any]:
        return {"pin_ids": self.pin_ids.tolist(), "n_interests": self.n_interests, "genders": self.genders,
                "segments": self.segments, "history_length": self.history_length,
                "top_interests": self.top_interests}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> Encoder:
        return cls(**{**state, "pin_ids": np.asarray(state["pin_ids"], dtype=np.int64)})

    def _category(self, col: pd.Series, vocab: list[str]) -> np.ndarray:
        return _index(_strings(col), np.asarray(vocab, dtype=object)) if vocab else np.zeros(len(col), np.int64)

    def users(self, df: pd.DataFrame) -> dict[str, torch.Tensor]:
        """User-tower inputs, each (n, ...): categorical ids, log counts, the padded pin sequence with
        recency buckets, and the top interests (+1 so that 0 is padding)."""
        n = len(df)
        age = pd.to_numeric(df.get("age", pd.Series(np.zeros(n))), errors="coerce").fillna(0).to_numpy()
        age_bucket = np.where(age > 0, np.searchsorted(AGE_BUCKETS, age, side="right") + 1, 0)
        counts = np.stack([np.log1p(pd.to_numeric(df[c], errors="coerce").fillna(0).to_numpy(np.float64).clip(0))
                           if c in df else np.zeros(n) for c in USER_COUNT_COLUMNS], axis=1)
        seq_ids, seq_len = _lists(df["recent_pin_ids"], self.history_length, np.int64)
        seq_age, _ = _lists(df["recent_pin_ages_days"], self.history_length, np.float64)
        seq_idx = _index(seq_ids.ravel(), self.pin_ids).reshape(seq_ids.shape)
        valid = np.arange(self.history_length)[None, :] < seq_len[:, None]
        seq_idx = np.where(valid, seq_idx, 0)
        recency = np.clip(np.log2(1 + seq_age.clip(0) * 24).astype(np.int64), 0, RECENCY_BUCKETS - 1)
        top, top_len = _lists(df["top_interest_ids"], self.top_interests, np.int64)
        top = np.where(np.arange(self.top_interests)[None, :] < top_len[:, None], top + 1, 0)
        return {
            "age_bucket": torch.from_numpy(age_bucket.astype(np.int64)),
            "gender": torch.from_numpy(self._category(df.get("gender", pd.Series([""] * n)), self.genders)),
            "segment": torch.from_numpy(self._category(df.get("segment", pd.Series([""] * n)), self.segments)),
            "counts": torch.from_numpy(counts.astype(np.float32)),
            "seq": torch.from_numpy(seq_idx),
            "seq_valid": torch.from_numpy(valid & (seq_idx > 0)),
            "seq_recency": torch.from_numpy(np.where(valid, recency + 1, 0)),
            "top_interests": torch.from_numpy(np.clip(top, 0, self.n_interests)),
        }

    def pins(self, df: pd.DataFrame) -> dict[str, torch.Tensor]:
        """Pin-tower inputs, each (n, ...): pin index, interest (+1; 0 = unknown), log counts."""
        n = len(df)
        interest = pd.to_numeric(df["interest_id"], errors="coerce").fillna(-1).to_numpy(np.int64) + 1
        counts = np.stack([np.log1p(pd.to_numeric(df[c], errors="coerce").fillna(0).to_numpy(np.float64).clip(0))
                           if c in df else np.zeros(n) for c in PIN_COUNT_COLUMNS], axis=1)
        return {
            "pin": torch.from_numpy(_index(df["pin_id"].to_numpy(np.int64), self.pin_ids)),
            "interest": torch.from_numpy(np.clip(interest, 0, self.n_interests)),
            "counts": torch.from_numpy(counts.astype(np.float32)),
        }


def take(batch: dict[str, torch.Tensor], idx: torch.Tensor | np.ndarray) -> dict[str, torch.Tensor]:
    """Rows ``idx`` of every tensor in an encoded batch."""
    idx = torch.as_tensor(idx)
    return {k: v[idx] for k, v in batch.items()}
