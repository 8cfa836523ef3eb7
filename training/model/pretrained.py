"""Pre-trained ID embeddings: the versioned table artifact (written by ``retrieval pretrain``) and its alignment
to a model's vocabularies.

A table holds, for the pins and users seen in its data window [start, end): a history-side pin table
(``context``: how a pin in a user's history speaks for the user), a candidate-side pin table (``target``: how a
pin is retrieved) and a user table. The two-tower uses it frozen, with dropout on top, and only when the
table's window ends at or before the two-tower's training window starts (``check_window``): ID embeddings
trained on the very interactions the towers then fit make the towers lean on them (Pinterest's rule).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

from training.io import atomic_path, atomic_write_text

TABLE_FILE = "table.pt"
MANIFEST_FILE = "manifest.json"


class PretrainedError(ValueError):
    """A pre-trained table that cannot be used (missing, unreadable, or its window overlaps training)."""


def recency_weights(length: int, scale: float) -> np.ndarray:
    """(length,) float32 ``exp(-r / scale)`` for history rank r (0 = newest): the pooling of a history over the
    pre-trained table, the same in pre-training and in the towers."""
    return np.exp(-np.arange(length) / scale).astype(np.float32)


@dataclass
class PretrainedTable:
    table_id: str
    method: str
    window_start: str
    """ISO UTC: the first engagement the table was trained on."""
    window_end: str
    """ISO UTC, exclusive: the table saw nothing at or after this instant."""
    pin_ids: np.ndarray
    """(n_pins,) sorted int64 canonical pin ids; row i of ``context`` / ``target`` is pin_ids[i]."""
    context: np.ndarray
    """(n_pins, k) float32 history-side pin embeddings."""
    target: np.ndarray
    """(n_pins, k) float32 candidate-side pin embeddings."""
    user_ids: np.ndarray
    """(n_users,) sorted int64 user ids of ``users``."""
    users: np.ndarray
    """(n_users, k) float32 user embeddings."""
    meta: dict[str, Any]
    """Config, data snapshot, counts, timings, validation figures."""

    @property
    def dim(self) -> int:
        return self.context.shape[1]

    @property
    def end(self) -> datetime:
        return datetime.fromisoformat(self.window_end)

    def save(self, root: Path) -> Path:
        folder = Path(root) / self.table_id
        with atomic_path(folder / TABLE_FILE) as tmp:
            torch.save({"pin_ids": torch.from_numpy(self.pin_ids), "context": torch.from_numpy(self.context),
                        "target": torch.from_numpy(self.target), "user_ids": torch.from_numpy(self.user_ids),
                        "users": torch.from_numpy(self.users)}, tmp)
        atomic_write_text(folder / MANIFEST_FILE, json.dumps(self.manifest(), indent=2, default=str))
        return folder

    def manifest(self) -> dict[str, Any]:
        return {"table_id": self.table_id, "method": self.method, "window_start": self.window_start,
                "window_end": self.window_end, "dim": self.dim, "pins": len(self.pin_ids),
                "users": len(self.user_ids), **self.meta}

    @classmethod
    def load(cls, folder: Path) -> PretrainedTable:
        folder = Path(folder)
        try:
            manifest = json.loads((folder / MANIFEST_FILE).read_text())
            arrays = torch.load(folder / TABLE_FILE, map_location="cpu", weights_only=True)
        except (OSError, ValueError, RuntimeError) as e:
            raise PretrainedError(f"{folder}: not a readable pre-trained table ({e})") from e
        meta = {k: v for k, v in manifest.items()
                if k not in ("table_id", "method", "window_start", "window_end", "dim", "pins", "users")}
        return cls(table_id=manifest["table_id"], method=manifest["method"], window_start=manifest["window_start"],
                   window_end=manifest["window_end"], meta=meta,
                   **{k: arrays[k].numpy() for k in ("pin_ids", "context", "target", "user_ids", "users")})

    def rows(self, ids: np.ndarray, vocab: np.ndarray) -> np.ndarray:
        """Positions in ``vocab`` (sorted ids) of ``ids``; -1 where unknown."""
        pos = np.clip(np.searchsorted(vocab, ids), 0, max(len(vocab) - 1, 0))
        found = (vocab[pos] == ids) if len(vocab) else np.zeros(len(ids), bool)
        return np.where(found, pos, -1)

    def aligned(self, pin_vocab: np.ndarray, user_vocab: np.ndarray) -> dict[str, torch.Tensor]:
        """The tables re-indexed by a model's vocabularies (index 0 = unknown/padding, then ``vocab`` order):
        context and target (len(pin_vocab) + 1, k), users (len(user_vocab) + 1, k); unknown rows are zero."""
        out = {}
        for name, src, ids, vocab in (("context", self.context, self.pin_ids, pin_vocab),
                                      ("target", self.target, self.pin_ids, pin_vocab),
                                      ("users", self.users, self.user_ids, user_vocab)):
            table = np.zeros((len(vocab) + 1, self.dim), dtype=np.float32)
            rows = self.rows(np.asarray(vocab, np.int64), ids)
            table[1:][rows >= 0] = src[rows[rows >= 0]]
            out[name] = torch.from_numpy(table)
        return out


def check_window(table: PretrainedTable, training_start: datetime, allow_overlap: bool = False) -> None:
    """Raise unless the table's window ends at or before the training window starts."""
    if table.end > training_start and not allow_overlap:
        raise PretrainedError(f"pre-trained table {table.table_id} covers [{table.window_start}, {table.window_end}), "
                              f"which overlaps the training window starting {training_start.isoformat()}")


def latest_usable(root: Path, training_start: datetime, allow_overlap: bool = False) -> PretrainedTable:
    """The newest table under ``root`` (by window end) whose window does not overlap the training window."""
    folders = sorted(p for p in Path(root).glob(f"*/{MANIFEST_FILE}")) if Path(root).exists() else []
    manifests = [json.loads(p.read_text()) for p in folders]
    usable = [m for m in manifests
              if allow_overlap or datetime.fromisoformat(m["window_end"]) <= training_start]
    if not usable:
        seen = ", ".join(f"{m['table_id']} [{m['window_start']}, {m['window_end']})" for m in manifests) or "none"
        raise PretrainedError(f"no pre-trained table under {root} ends by the training window start "
                              f"{training_start.isoformat()} (tables: {seen}); run `retrieval pretrain`")
    best = max(usable, key=lambda m: (m["window_end"], m.get("created_at", "")))
    table = PretrainedTable.load(Path(root) / best["table_id"])
    check_window(table, training_start, allow_overlap)
    return table
