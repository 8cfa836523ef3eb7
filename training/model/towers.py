"""The two towers. Both end in L2-normalized vectors of ``out_dim`` in one space; relevance = dot product.

Shapes: B = batch, L = history length, T = top interests, E = ``id_embed_dim``, D = ``out_dim``.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from training.model.encoding import AGE_BUCKETS, PIN_COUNT_COLUMNS, RECENCY_BUCKETS, USER_COUNT_COLUMNS, take


def mlp(sizes: list[int], dropout: float = 0.0) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes, sizes[1:], strict=False)):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers += [nn.LayerNorm(b), nn.GELU()] + ([nn.Dropout(dropout)] if dropout else [])
    return nn.Sequential(*layers)


class PinTower(nn.Module):
    """pin id + interest + log engagement counts -> (B, D) unit vectors.

    The pin id table is shared with the user tower's history encoder (``self.pin_embedding``).
    """

    def __init__(self, n_pins: int, n_interests: int, id_embed_dim: int, out_dim: int, dropout: float = 0.0):
        super().__init__()
        self.pin_embedding = nn.Embedding(n_pins, id_embed_dim, padding_idx=0)
        self.interest_embedding = nn.Embedding(n_interests + 1, id_embed_dim, padding_idx=0)
        n_counts = len(PIN_COUNT_COLUMNS)
        self.counts_norm = nn.LayerNorm(n_counts)
        self.head = mlp([2 * id_embed_dim + n_counts, 2 * out_dim, out_dim], dropout)

    def forward(self, x: dict[str, torch.Tensor]) -> torch.Tensor:
        h = torch.cat([self.pin_embedding(x["pin"]), self.interest_embedding(x["interest"]),
                       self.counts_norm(x["counts"])], dim=-1)
        return F.normalize(self.head(h), dim=-1)


class UserTower(nn.Module):
    """profile + counts + top interests + engagement history -> (B, D) unit vectors.

    History: each item is its pin embedding (shared with the pin tower) plus a recency embedding; items are
    pooled by attention whose query comes from the user's context, next to a plain mean. In training, each
    history item is dropped with probability ``seq_dropout`` (sequence dropout, a regularizer).
    """

    def __init__(self, pin_embedding: nn.Embedding, interest_embedding: nn.Embedding, n_genders: int,
                 n_segments: int, id_embed_dim: int, out_dim: int, dropout: float = 0.0, seq_dropout: float = 0.0):
        super().__init__()
        self.pin_embedding = pin_embedding
        self.seq_dropout = seq_dropout
        self.interest_embedding = interest_embedding
        self.recency = nn.Embedding(RECENCY_BUCKETS + 1, id_embed_dim, padding_idx=0)
        self.age = nn.Embedding(len(AGE_BUCKETS) + 2, 8)
        self.gender = nn.Embedding(n_genders + 1, 4)
        self.segment = nn.Embedding(n_segments + 1, 8)
        n_counts = len(USER_COUNT_COLUMNS)
        self.counts_norm = nn.LayerNorm(n_counts)
        context_in = 8 + 4 + 8 + n_counts + id_embed_dim
        self.context = mlp([context_in, id_embed_dim, id_embed_dim], dropout)
        self.attn_key = nn.Linear(id_embed_dim, id_embed_dim, bias=False)
        self.head = mlp([3 * id_embed_dim, 2 * out_dim, out_dim], dropout)

    def forward(self, x: dict[str, torch.Tensor]) -> torch.Tensor:
        top = self.interest_embedding(x["top_interests"])                       # (B, T, E)
        top_mask = (x["top_interests"] > 0).unsqueeze(-1).float()
        top_mean = (top * top_mask).sum(1) / top_mask.sum(1).clamp(min=1)        # (B, E)
        ctx = self.context(torch.cat([self.age(x["age_bucket"]), self.gender(x["gender"]),
                                      self.segment(x["segment"]), self.counts_norm(x["counts"]), top_mean], -1))
        items = self.pin_embedding(x["seq"]) + self.recency(x["seq_recency"])   # (B, L, E)
        valid = x["seq_valid"]                                                   # (B, L)
        if self.training and self.seq_dropout:
            valid = valid & (torch.rand(valid.shape) >= self.seq_dropout)
        # <attn_key(item), ctx> = <item, ctx @ W>: project the (B, E) query instead of the (B, L, E) keys
        query = ctx @ self.attn_key.weight / items.shape[-1] ** 0.5               # (B, E)
        scores = (items * query.unsqueeze(1)).sum(-1).masked_fill(~valid, float("-inf"))  # (B, L)
        has_history = valid.any(1, keepdim=True)
        weights = torch.where(has_history, scores.softmax(-1).nan_to_num(0.0), torch.zeros_like(scores))
        attended = (items * weights.unsqueeze(-1)).sum(1)                         # (B, E)
        vf = valid.unsqueeze(-1).float()
        mean = (items * vf).sum(1) / vf.sum(1).clamp(min=1)                      # (B, E)
        return F.normalize(self.head(torch.cat([attended, mean, ctx], -1)), dim=-1)


@torch.no_grad()
def run_tower(tower: nn.Module, x: dict[str, torch.Tensor], batch: int = 4096) -> np.ndarray:
    """(n, D) float32 vectors of a tower over encoded inputs ``x`` (each (n, ...)), ``batch`` rows at a time."""
    n = len(next(iter(x.values())))
    if n == 0:
        return np.zeros((0, 0), dtype=np.float32)
    return torch.cat([tower(take(x, torch.arange(i, min(i + batch, n)))) for i in range(0, n, batch)]).numpy()
