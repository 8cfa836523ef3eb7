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
import torch.nn.functional as F
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
    """``blocks`` ``MaskBlock``s on the same input, their outputs concatenated, then the bottleneck MLP.

    The blocks' weights are stacked, (blocks, in, out) per layer: a request (at most ``STACKED_ROWS`` rows) runs every
    block in one batched matmul per layer, which costs about 40% of the block-by-block loop's CPU time for one row;
    a training batch runs the blocks one after another, which is faster at a thousand rows (both measured with
    one torch thread). The two paths compute the same function. The weights start as ``MaskBlock``'s would, drawn
    block by block in its order; checkpoints written with per-block modules (``blocks.{i}.mask.0.weight``, ...)
    load into the stacked form.
    """

    STACKED_ROWS = 64
    _LAYERS = ("mask_in", "mask_out", "hidden", "out")   # MaskBlock's linear layers, in its order
    _NORMS = ("norm_hidden", "norm_out")                 # and its layer norms

    def __init__(self, width: int, hidden: int, blocks: int, dropout: float, out: int | None = None):
        super().__init__()
        proto = [MaskBlock(width, hidden, dropout) for _ in range(blocks)]
        self.n_blocks = blocks
        self._paths: dict[str, str] = {}   # stacked name -> the per-block module's path (for old checkpoints)
        for names, kind in ((self._LAYERS, nn.Linear), (self._NORMS, nn.LayerNorm)):
            paths = [path for path, m in proto[0].named_modules() if isinstance(m, kind)]
            for name, path in zip(names, paths, strict=True):
                self._paths[name] = path
                mods = [b.get_submodule(path) for b in proto]   # weights (blocks, in, out), the rest (blocks, 1, n)
                weight = [m.weight.detach().T if kind is nn.Linear else m.weight.detach()[None] for m in mods]
                bias = [m.bias.detach()[None] for m in mods]
                self.register_parameter(f"{name}_weight", nn.Parameter(torch.stack(weight)))
                self.register_parameter(f"{name}_bias", nn.Parameter(torch.stack(bias)))
        self.drop = nn.Dropout(dropout) if dropout else nn.Identity()
        self.out_features = out or hidden
        self.bottleneck = mlp([blocks * hidden, hidden, self.out_features], dropout, final_activation=out is None)

    def _linear(self, name: str, h: torch.Tensor, k: int | None) -> torch.Tensor:
        w, b = getattr(self, f"{name}_weight"), getattr(self, f"{name}_bias")
        return torch.baddbmm(b, h, w) if k is None else torch.addmm(b[k], h, w[k])

    def _norm(self, name: str, h: torch.Tensor, k: int | None) -> torch.Tensor:
        w, b = getattr(self, f"{name}_weight"), getattr(self, f"{name}_bias")
        if k is None:
            return F.layer_norm(h, h.shape[-1:]) * w + b
        return F.layer_norm(h, h.shape[-1:], w[k, 0], b[k, 0])

    def _blocks(self, x: torch.Tensor, k: int | None) -> torch.Tensor:
        """Block ``k`` on x (B, W) -> (B, hidden), or every block on x (blocks, B, W) -> (blocks, B, hidden)."""
        mask = self._linear("mask_out", F.gelu(self._linear("mask_in", x, k)), k)
        h = self.drop(F.gelu(self._norm("norm_hidden", self._linear("hidden", x * mask, k), k)))
        return self.drop(F.gelu(self._norm("norm_out", self._linear("out", h, k), k)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:   # (B, W) -> (B, out)
        if len(x) <= self.STACKED_ROWS:
            y = self._blocks(x.unsqueeze(0).expand(self.n_blocks, -1, -1), None)          # (blocks, B, hidden)
            y = y.transpose(0, 1).reshape(len(x), -1)
        else:
            y = torch.cat([self._blocks(x, k) for k in range(self.n_blocks)], dim=-1)
        return self.bottleneck(y)

    def stack_blocks(self, state_dict: dict[str, torch.Tensor], prefix: str = "") -> None:
        """Rewrite, in place, a checkpoint's per-block modules under ``prefix`` (written before the blocks were
        stacked) into this module's stacked tensors; a state dict without them is left as it is. The block count is
        the checkpoint's (a different count than this module's then fails to load, as any shape change does)."""
        n = 0
        while f"{prefix}blocks.{n}.mask.0.weight" in state_dict:
            n += 1
        if not n:
            return
        for name, path in self._paths.items():
            for part in ("weight", "bias"):
                old = [state_dict.pop(f"{prefix}blocks.{i}.{path}.{part}") for i in range(n)]
                transpose = name in self._LAYERS and part == "weight"
                state_dict[f"{prefix}{name}_{part}"] = torch.stack([t.T if transpose else t[None] for t in old])

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        self.stack_blocks(state_dict, prefix)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def stack_masknet_blocks(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A copy of ``state_dict`` (a checkpoint of a model shaped like ``model``) with the per-block MaskNet modules of
    checkpoints written before the blocks were stacked rewritten as ``model`` holds them: what ``load_state_dict``
    does on its own, for code that matches tensors by name (a retrain's warm start)."""
    out = dict(state_dict)
    for prefix, module in model.named_modules():
        if isinstance(module, ParallelMaskNet):
            module.stack_blocks(out, f"{prefix}." if prefix else "")
    return out


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
