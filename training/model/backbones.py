"""Feature crossing over field tokens: MLP, MaskNet (Pinterest's parallel variant) and DHEN.

Every backbone takes the tower's field tokens, shape (B, F, d) (one layer-normalised d-dim token per feature
group), and returns (B, H). The output projection to the embedding space is the tower's.

- ``MLPBackbone``: the tokens concatenated, (B, F·d), through a two-layer MLP.
- ``ParallelMaskNet``: ``blocks`` mask blocks in parallel on the concatenated tokens, each
  ``MLP_b(x ⊙ MLP_a(x))`` with two-layer MLPs (MLP_a gives an instance-wise mask of x's width), their outputs
  concatenated and reduced by a bottleneck MLP (Wang et al. 2021; Pinterest runs the blocks in parallel).
- ``DHEN``: two layers of heterogeneous experts on the token set (Zhang et al. 2022). Layer 1: an MLP in parallel
  with a parallel MaskNet; layer 2: an MLP in parallel with a transformer encoder over the field tokens
  (field-level attention). Each layer sums its branches' outputs with a shortcut and layer-normalises, keeping
  the (B, F, d) token shape so the next layer can attend over fields.
"""

from __future__ import annotations

import torch
from torch import nn


def mlp(sizes: list[int], dropout: float = 0.0, final_activation: bool = False) -> nn.Sequential:
    """Linear layers with LayerNorm + GELU (+ dropout) between them (and after the last when asked)."""
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes, sizes[1:], strict=False)):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2 or final_activation:
            layers += [nn.LayerNorm(b), nn.GELU()] + ([nn.Dropout(dropout)] if dropout else [])
    return nn.Sequential(*layers)


class MLPBackbone(nn.Module):
    def __init__(self, n_fields: int, field_dim: int, hidden: int, dropout: float):
        super().__init__()
        self.net = mlp([n_fields * field_dim, hidden, hidden], dropout, final_activation=True)
        self.out_features = hidden

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.net(tokens.flatten(1))


class MaskBlock(nn.Module):
    """``MLP_b(x ⊙ MLP_a(x))``: MLP_a (in -> hidden -> in) gives the instance-guided mask."""

    def __init__(self, width: int, hidden: int, dropout: float):
        super().__init__()
        self.mask = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width))
        self.out = mlp([width, hidden, hidden], dropout, final_activation=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:   # (B, W) -> (B, hidden)
        return self.out(x * self.mask(x))


class ParallelMaskNet(nn.Module):
    def __init__(self, width: int, hidden: int, blocks: int, dropout: float, out: int | None = None):
        super().__init__()
        self.blocks = nn.ModuleList(MaskBlock(width, hidden, dropout) for _ in range(blocks))
        self.out_features = out or hidden
        self.bottleneck = mlp([blocks * hidden, hidden, self.out_features], dropout, final_activation=out is None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:   # (B, W) -> (B, out)
        return self.bottleneck(torch.cat([b(x) for b in self.blocks], dim=-1))


class MaskNetBackbone(nn.Module):
    def __init__(self, n_fields: int, field_dim: int, hidden: int, blocks: int, dropout: float):
        super().__init__()
        self.net = ParallelMaskNet(n_fields * field_dim, hidden, blocks, dropout)
        self.out_features = hidden

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.net(tokens.flatten(1))


class DHENLayer(nn.Module):
    """Two experts on the token set, summed with a shortcut, layer-normalised: (B, F, d) -> (B, F, d)."""

    def __init__(self, n_fields: int, field_dim: int, hidden: int, blocks: int, dropout: float, second: str):
        super().__init__()
        width = n_fields * field_dim
        self.n_fields, self.field_dim = n_fields, field_dim
        self.mlp = mlp([width, hidden, width], dropout)
        if second == "masknet":
            self.other: nn.Module = ParallelMaskNet(width, hidden, blocks, dropout, out=width)
        else:
            heads = 2 if field_dim % 2 == 0 else 1
            self.other = nn.TransformerEncoderLayer(field_dim, heads, dim_feedforward=2 * field_dim,
                                                    dropout=dropout, batch_first=True, norm_first=True)
        self.second = second
        self.norm = nn.LayerNorm(field_dim)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        flat = tokens.flatten(1)
        a = self.mlp(flat).view_as(tokens)
        b = self.other(flat).view_as(tokens) if self.second == "masknet" else self.other(tokens)
        return self.norm(tokens + a + b)


class DHENBackbone(nn.Module):
    def __init__(self, n_fields: int, field_dim: int, hidden: int, blocks: int, dropout: float):
        super().__init__()
        self.layers = nn.ModuleList([DHENLayer(n_fields, field_dim, hidden, blocks, dropout, "masknet"),
                                     DHENLayer(n_fields, field_dim, hidden, blocks, dropout, "transformer")])
        self.head = mlp([n_fields * field_dim, hidden], dropout, final_activation=True)
        self.out_features = hidden

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            tokens = layer(tokens)
        return self.head(tokens.flatten(1))


def make_backbone(kind: str, n_fields: int, field_dim: int, hidden: int, blocks: int, dropout: float) -> nn.Module:
    if kind == "mlp":
        return MLPBackbone(n_fields, field_dim, hidden, dropout)
    if kind == "masknet":
        return MaskNetBackbone(n_fields, field_dim, hidden, blocks, dropout)
    if kind == "dhen":
        return DHENBackbone(n_fields, field_dim, hidden, blocks, dropout)
    raise ValueError(f"unknown backbone {kind!r}")
