"""The two towers. Both map their inputs to vectors of ``out_dim`` in one space; relevance = inner product.

Each tower turns every feature group into one layer-normalised ``field_dim`` token (a "field"), crosses the
fields with the configured backbone (``training.model.backbones``: mlp, masknet or dhen) and projects to the
embedding space:

- user fields: profile (age, gender, segment), engagement counts, top interests, the attention-pooled and the
  mean learned history (pin + interest embeddings shared with the pin tower + recency buckets), the interest
  shares of the history, and with pre-trained IDs
  the recency-pooled pre-trained history ``Σ_r exp(-r/h)·P[h_r]`` and the pre-trained user embedding;
- pin fields: learned pin id, interest, engagement counts, and with pre-trained IDs the pre-trained pin
  embedding ``Q[pin]``.

Pre-trained tables are frozen buffers (or parameters when fine-tuned) with dropout where they enter the
backbone as fields (Pinterest's recipe). With ``pretrained_blend`` the pre-trained history pool and pin
embedding are also appended to the towers' outputs as their own subspace, weighted so that a score is
``w_learned · learned + w_table · pre-trained``; training runs with (1, 0) and the weights are chosen on
validation afterwards (``training.train.choose_blend``): one ANN search serves the blend. The subspace can read
a newer table than the fields (``set_blend_table``: the pre-training refit after training, ``train.blend_table``).

Shapes: B = batch, L = history length, T = top interests, E = ``id_embed_dim``, d = ``field_dim``,
k = pre-trained width, D = ``out_dim``.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from training.config import TrainConfig
from training.model.backbones import make_backbone
from training.model.clustering import k_for_length, route
from training.model.encoding import (
    AGE_BUCKETS,
    PIN_COUNT_COLUMNS,
    PIN_IMPRESSION_RATE,
    PIN_NUMERIC,
    RECENCY_BUCKETS,
    USER_COUNT_COLUMNS,
    take,
)
from training.model.pretrained import recency_weights

CROSS_SMOOTHING = 0.1
"""Pseudo-count per interest of the wide interest cross's shares (``train.wide_interest``)."""


class Field(nn.Module):
    """One feature group -> one layer-normalised token: (B, in) -> (B, d)."""

    def __init__(self, in_features: int, d: int):
        super().__init__()
        self.proj = nn.Linear(in_features, d)
        self.norm = nn.LayerNorm(d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(x))


class Pretrained(nn.Module):
    """A pre-trained table, frozen (buffer) or fine-tuned (parameter); ``drop`` is the dropout applied where the
    vectors enter the backbone as fields (the blended subspace takes them as they are)."""

    def __init__(self, table: torch.Tensor, trainable: bool, dropout: float):
        super().__init__()
        if trainable:
            self.weight = nn.Parameter(table.clone())
        else:
            self.register_buffer("weight", table.clone())
        self.drop = nn.Dropout(dropout)

    @property
    def dim(self) -> int:
        return self.weight.shape[1]

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return F.embedding(idx, self.weight)


class Tower(nn.Module):
    """Shared tail of both towers: fields -> backbone -> output projection, then (with the pre-trained blend) the
    pre-trained vector appended as its own subspace: ``[√w_learned · y, √w_table · t]``, so that
    <u, p> = w_learned · (learned score) + w_table · (pre-trained score). Both weights are buffers: training runs
    with (1, 0); ``set_blend`` sets the weights chosen on validation after training."""

    side = "pin"
    """Which tower: 'user' or 'pin' (the bias coordinate differs)."""

    def _init_tail(self, n_fields: int, tc: TrainConfig, blend_dim: int | None) -> None:
        self.pin_bias = tc.pin_bias
        self.backbone = make_backbone(tc.backbone, n_fields, tc.field_dim, tc.hidden_dim, tc.masknet_blocks,
                                      tc.dropout)
        self.out = nn.Linear(self.backbone.out_features, tc.out_dim)
        self.normalize = tc.normalize
        self.blend_dim = blend_dim
        self.register_buffer("blend", torch.tensor([1.0, 0.0]))
        self.blend_table = None
        """Set by ``set_blend_table``: the table the blended subspace is read from, when it is not the one the tower
        reads as a field."""
        # wide interest cross: users' log interest shares · pins' one-hot interest, outside the normalisation;
        # the user side's scale starts at the initial temperature, i.e. one log-share unit per logit
        self.cross_dim = self.n_cross if tc.wide_interest and tc.pin_bias else 0
        if self.cross_dim and self.side == "user":   # learned in log space: Adam's steps stay relative
            self.cross_log_scale = nn.Parameter(torch.zeros(()))
        self.logit_unit = float(tc.temperature)
        """A score of ``logit_unit`` is one logit at the initial temperature: the wide parts are scaled by it so
        that their weights learn in logits (a unit-scale weight under Adam would move 1/τ logits per step)."""

    @property
    def cross_scale(self) -> torch.Tensor:
        """The user side's scale of the wide interest cross (its log shares are multiplied by it)."""
        return self.logit_unit * self.cross_log_scale.exp()

    n_cross = 0
    """Interests of the wide cross (set by the towers before ``_init_tail``)."""

    def set_blend(self, learned: float, table: float) -> None:
        if not (learned >= 0 and table >= 0):   # the subspaces are scaled by their square roots
            raise ValueError(f"blend weights must be >= 0, got learned={learned}, table={table}")
        self.blend.copy_(torch.tensor([learned, table]))

    def set_blend_table(self, table: torch.Tensor) -> None:
        """Read the blended pre-trained subspace from ``table`` (aligned to the tower's vocabulary like its own
        pre-trained table: the pin side's candidate table, the user side's history table), e.g. a refit on newer
        data; the fields keep the table the tower was trained with."""
        if self.blend_dim is None or table.dim() != 2 or table.shape[1] != self.blend_dim:
            raise ValueError(f"blend table of shape {tuple(table.shape)} for a tower whose blended subspace is "
                             f"{self.blend_dim}-d")
        if self.pretrained is not None and table.shape[0] != self.pretrained.weight.shape[0]:
            raise ValueError(f"blend table has {table.shape[0]} rows, the tower's vocabulary "
                             f"{self.pretrained.weight.shape[0]}")
        self.blend_table = Pretrained(table, False, 0.0)

    @property
    def learned_dim(self) -> int:
        """Width of the trained part of the output vectors (``out_dim``, plus the wide interest cross)."""
        return self.out.out_features + self.cross_dim

    @property
    def dim(self) -> int:
        """Width of the output vectors (the trained part, plus the pre-trained subspace when blended)."""
        return self.learned_dim + (self.blend_dim or 0)

    def _tail(self, fields: list[torch.Tensor], table: torch.Tensor | None,
              wide: torch.Tensor | None = None, cross: torch.Tensor | None = None) -> torch.Tensor:
        tokens = torch.stack(fields, dim=1)                                      # (B, F, d)
        y = self.out(self.backbone(tokens))                                      # (B, D)
        if self.pin_bias:   # the last coordinate: 1 for users, the pin's learned bias (+ its wide part) for pins
            head = F.normalize(y[:, :-1], dim=-1) if self.normalize else y[:, :-1]
            bias = y[:, -1:] if wide is None else y[:, -1:] + self.logit_unit * wide
            y = torch.cat([head, torch.ones_like(y[:, -1:]) if self.side == "user" else bias], dim=1)
        elif self.normalize:
            y = F.normalize(y, dim=-1)
        if self.cross_dim:
            y = torch.cat([y, cross], dim=1)
        if self.blend_dim is not None:
            y = torch.cat([self.blend[0].sqrt() * y, self.blend[1].sqrt() * table], dim=1)   # (B, D + k)
        return y


class PinTower(Tower):
    """pin id + interest + log engagement counts (+ pre-trained pin embedding) -> (B, D).

    The learned pin id table is shared with the user tower's history encoder (``self.pin_embedding``).
    """

    def __init__(self, n_pins: int, n_interests: int, tc: TrainConfig, target: torch.Tensor | None = None):
        super().__init__()
        E, d = tc.id_embed_dim, tc.field_dim
        self.pin_embedding = nn.Embedding(n_pins, E, padding_idx=0, sparse=tc.sparse_ids(n_pins))
        self.interest_embedding = nn.Embedding(n_interests + 1, E, padding_idx=0)
        self.f_pin, self.f_interest = Field(E, d), Field(E, d)
        # the encoder's numeric inputs are the log counts, then the idle days and rates (read with ``pin_rates``)
        self.n_numeric = PIN_NUMERIC if tc.pin_rates else len(PIN_COUNT_COLUMNS)
        self.f_counts = Field(self.n_numeric, d)
        self.pretrained = None
        self.id_dropout = tc.pin_id_dropout
        self.n_cross = n_interests
        # wide part: the log counts straight into the pin bias, so popularity is not squashed by a field's norm
        self.wide = nn.Linear(self.n_numeric, 1) if tc.wide_counts and tc.pin_bias else None
        if self.wide is not None:
            nn.init.zeros_(self.wide.weight)
            nn.init.zeros_(self.wide.bias)
        # the popularity prior (``train.popularity_prior``): logits per unit of log impression rate, set after training
        self.register_buffer("prior", torch.zeros(()) if tc.popularity_prior and tc.pin_bias else None)
        n_fields = 3
        if target is not None:
            self.pretrained = Pretrained(target, tc.pretrained == "finetune", tc.pretrained_dropout)
            self.f_pretrained = Field(self.pretrained.dim, d)
            n_fields += 1
        self._init_tail(n_fields, tc, self.pretrained.dim if self.pretrained is not None and tc.pretrained_blend
                        else None)

    def forward(self, x: dict[str, torch.Tensor]) -> torch.Tensor:
        pin = x["pin"]
        if self.training and self.id_dropout:   # read as unknown (index 0): features only, as a pin newer than the ids
            pin = pin.masked_fill(torch.rand(pin.shape) < self.id_dropout, 0)
        counts = x["counts"][:, :self.n_numeric]
        fields = [self.f_pin(self.pin_embedding(pin)), self.f_interest(self.interest_embedding(x["interest"])),
                  self.f_counts(counts)]
        table = None
        if self.pretrained is not None:
            table = self.pretrained(pin)                                         # (B, k)
            fields.append(self.f_pretrained(self.pretrained.drop(table)))
            if self.blend_table is not None:
                table = self.blend_table(pin)
        cross = None
        if self.cross_dim:   # one-hot interest; a pin of unknown interest gets the mean of the user's log shares
            cross = F.one_hot(x["interest"], self.n_cross + 1)[:, 1:].float()
            cross[x["interest"] == 0] = 1.0 / self.n_cross
        wide = None if self.wide is None else self.wide(counts)
        if self.prior is not None:
            prior = self.prior * x["counts"][:, PIN_IMPRESSION_RATE:PIN_IMPRESSION_RATE + 1]
            wide = prior if wide is None else wide + prior
        return self._tail(fields, table, wide, cross)

    def set_prior(self, weight: float) -> None:
        """Set the popularity prior: ``weight`` logits (at the initial temperature) per unit of the pin's log
        impression rate, added to its bias coordinate (``train.popularity_prior``)."""
        if self.prior is None:
            raise ValueError("this pin tower has no popularity prior (train.popularity_prior and train.pin_bias)")
        self.prior.fill_(float(weight))


class UserTower(Tower):
    """profile + counts + top interests + engagement history (+ pre-trained history and user) -> (B, D).

    History: each item is its learned pin embedding (shared with the pin tower) plus a recency embedding,
    optionally passed through one transformer layer; items are pooled by attention whose query comes from the
    user's context fields, next to a plain mean. In training, each history item is dropped with probability
    ``seq_dropout``.
    """

    side = "user"

    def __init__(self, pin_embedding: nn.Embedding, interest_embedding: nn.Embedding, n_genders: int,
                 n_segments: int, tc: TrainConfig, history_length: int, context: torch.Tensor | None = None,
                 users: torch.Tensor | None = None):
        super().__init__()
        E, d = tc.id_embed_dim, tc.field_dim
        self.pin_embedding = pin_embedding
        self.interest_embedding = interest_embedding
        self.seq_dropout = tc.seq_dropout
        self.recency = nn.Embedding(RECENCY_BUCKETS + 1, E, padding_idx=0)
        self.age = nn.Embedding(len(AGE_BUCKETS) + 2, 8)
        self.gender = nn.Embedding(n_genders + 1, 4)
        self.segment = nn.Embedding(n_segments + 1, 8)
        self.f_profile = Field(8 + 4 + 8, d)
        self.f_counts = Field(len(USER_COUNT_COLUMNS), d)
        self.f_interests = Field(E, d)
        self.query = nn.Linear(3 * d, E, bias=False)
        self.history_encoder = None
        if tc.history_encoder == "transformer":
            heads = 2 if E % 2 == 0 else 1
            self.history_encoder = nn.TransformerEncoderLayer(E, heads, dim_feedforward=2 * E, dropout=tc.dropout,
                                                              batch_first=True, norm_first=True)
        self.f_attended, self.f_mean = Field(E, d), Field(E, d)
        self.n_interests = interest_embedding.num_embeddings
        self.n_cross = self.n_interests - 1
        self.f_interest_mix = Field(self.n_interests, d)
        n_fields = 6
        self.k_max, self.routing_iterations = tc.multi_embedding, tc.routing_iterations
        self.cluster_features = tc.cluster_features
        self.impression_interests = tc.impression_interests
        self.conditional = tc.conditional
        if self.conditional:   # early fusion: the condition is one more field; 0 = the learned "no condition"
            self.no_condition = nn.Parameter(torch.zeros(E))
            self.f_condition = Field(E, d)
            n_fields += 1
        self.pretrained = self.pretrained_users = None
        if context is not None:
            trainable = tc.pretrained == "finetune"
            self.pretrained = Pretrained(context, trainable, tc.pretrained_dropout)
            self.pretrained_users = Pretrained(users, trainable, tc.pretrained_dropout)
            self.f_pretrained = Field(self.pretrained.dim, d)
            self.f_pretrained_user = Field(self.pretrained.dim, d)
            self.register_buffer("recency_weights",
                                 torch.from_numpy(recency_weights(history_length, tc.history_recency)))
            n_fields += 2
        self._init_tail(n_fields, tc, self.pretrained.dim if self.pretrained is not None and tc.pretrained_blend
                        else None)

    @property
    def multi(self) -> bool:
        return self.k_max > 1

    def forward(self, x: dict[str, torch.Tensor], with_mask: bool = False):
        """(B, D) vectors, or with multi-embedding (B, K, D) with the embeddings a user does not get zeroed;
        ``with_mask`` also returns which embeddings are real ((B, K) bool; (B, 1) of True for one embedding).
        ``x["condition"]`` (B,), optional: an interest id + 1 per row for a conditional tower (0 = none)."""
        top = self.interest_embedding(x["top_interests"])                       # (B, T, E)
        top_mask = (x["top_interests"] > 0).unsqueeze(-1).float()
        top_mean = (top * top_mask).sum(1) / top_mask.sum(1).clamp(min=1)        # (B, E)
        profile = self.f_profile(torch.cat([self.age(x["age_bucket"]), self.gender(x["gender"]),
                                            self.segment(x["segment"])], -1))
        counts, interests = self.f_counts(x["counts"]), self.f_interests(top_mean)
        content = self.pin_embedding(x["seq"]) + self.interest_embedding(x["seq_interest"])   # (B, L, E)
        items = content + self.recency(x["seq_recency"])                         # (B, L, E)
        valid = x["seq_valid"]                                                   # (B, L)
        counts_by_interest = torch.zeros(valid.shape[0], self.n_interests).scatter_add_(
            1, x["seq_interest"], x["seq_valid"].float())                        # (B, I+1)
        # the cross's shares also count what the user was shown (``train.impression_interests``)
        shown = counts_by_interest + x["impressed"] if self.impression_interests else counts_by_interest
        cross_total = shown[:, 1:].sum(-1, keepdim=True)                         # (B, 1)
        cross = self._cross(shown, cross_total)
        mix = counts_by_interest / counts_by_interest.sum(-1, keepdim=True).clamp(min=1)   # (B, I+1) interest shares
        if self.training and self.seq_dropout:
            valid = valid & (torch.rand(valid.shape) >= self.seq_dropout)
        has_history = valid.any(1, keepdim=True)                                 # (B, 1)
        if self.history_encoder is not None:
            # a row without history attends to its (zero) first slot only, then is zeroed below
            mask = ~valid.clone()
            mask[:, 0] &= has_history.squeeze(1)
            items = self.history_encoder(items, src_key_padding_mask=mask)
        query = self.query(torch.cat([profile, counts, interests], -1)) / math.sqrt(items.shape[-1])   # (B, E)
        scores = (items * query.unsqueeze(1)).sum(-1).masked_fill(~valid, float("-inf"))          # (B, L)
        weights = torch.where(has_history, scores.softmax(-1).nan_to_num(0.0), torch.zeros_like(scores))
        attended = (items * weights.unsqueeze(-1)).sum(1)                         # (B, E)
        vf = valid.unsqueeze(-1).float()
        mean = (items * vf).sum(1) / vf.sum(1).clamp(min=1)                      # (B, E)
        fields = [profile, counts, interests, self.f_attended(attended), self.f_mean(mean), self.f_interest_mix(mix)]
        if self.conditional:
            cond = x.get("condition", torch.zeros(valid.shape[0], dtype=torch.long))
            cond_vec = torch.where((cond > 0).unsqueeze(-1), self.interest_embedding(cond),
                                   self.no_condition.expand(len(cond), -1))
            fields.append(self.f_condition(cond_vec))
        table = None
        if self.pretrained is not None:
            w = self.recency_weights[: x["seq"].shape[1]] * x["seq_valid"].float()  # (B, L), the full history
            table = (self.pretrained(x["seq"]) * w.unsqueeze(-1)).sum(1)          # (B, k)
            user = self.pretrained_users.drop(self.pretrained_users(x["user"]))
            fields += [self.f_pretrained(self.pretrained.drop(table)), self.f_pretrained_user(user)]
            if self.blend_table is not None:
                table = (self.blend_table(x["seq"]) * w.unsqueeze(-1)).sum(1)
        if not self.multi:
            y = self._tail(fields, table, cross=cross)
            return (y, torch.ones(len(y), 1, dtype=torch.bool)) if with_mask else y
        # one embedding per history cluster: the cluster vector takes the attended-history field's place; with
        # cluster features, items are clustered by what they are (pin + interest), not when they were engaged, and
        # only among the clusters the user keeps, so no item is left out
        kept = k_for_length(valid.sum(1), self.k_max)                                # (B,)
        clusters, ok, assign = route(content if self.cluster_features else items, valid, self.k_max,
                                     self.routing_iterations, kept if self.cluster_features else None)
        keep = ok & (torch.arange(self.k_max)[None, :] < kept[:, None])             # (B, K)
        keep[:, 0] = True                                                            # everyone gets one
        b, k = keep.shape
        per = [f.unsqueeze(1).expand(b, k, f.shape[-1]) for f in fields]

        def cluster_or_all(own: torch.Tensor, whole: torch.Tensor) -> torch.Tensor:   # an empty cluster: the whole's
            return torch.where(ok.unsqueeze(-1), own, whole)

        per[3] = cluster_or_all(self.f_attended(clusters), per[3])
        cross_k = None if cross is None else cross.unsqueeze(1).expand(b, k, cross.shape[-1])
        table_k = None if table is None else table.unsqueeze(1).expand(b, k, table.shape[-1])
        if self.cluster_features:   # each embedding reads its own cluster's history
            member = ((assign.unsqueeze(1) == torch.arange(k)[None, :, None]) & valid.unsqueeze(1)).float()  # (B,K,L)
            per[4] = cluster_or_all(self.f_mean(member @ items / member.sum(-1, keepdim=True).clamp(min=1)), per[4])
            counts_k = member @ F.one_hot(x["seq_interest"], self.n_interests).float()   # (B, K, I+1)
            per[5] = cluster_or_all(self.f_interest_mix(counts_k / counts_k.sum((1, 2), keepdim=True).clamp(min=1)),
                                    per[5])
            if cross_k is not None:
                # an interest of the cluster keeps its log share of the whole history (a minor interest's cluster
                # is not raised to a major one's), the others get the floor of an interest never engaged with
                absent = self._cross(torch.zeros_like(counts_k), cross_total.unsqueeze(1))
                cross_k = cluster_or_all(torch.where(counts_k[..., 1:] > 0, cross_k, absent), cross_k)
        tokens = [f.reshape(b * k, -1) for f in per]
        y = self._tail(tokens, None if table_k is None else table_k.reshape(b * k, -1),
                       cross=None if cross_k is None else cross_k.reshape(b * k, -1)).view(b, k, -1)
        y = y * keep.unsqueeze(-1).float()
        return (y, keep) if with_mask else y

    def _cross(self, counts: torch.Tensor, total: torch.Tensor) -> torch.Tensor | None:
        """The wide interest cross from history counts per interest (..., I+1) out of ``total`` items: the
        smoothed log shares of the known interests (index 0 = unknown is left out), times the learned scale;
        None without the cross."""
        if not self.cross_dim:
            return None
        known = counts[..., 1:]
        return self.cross_scale * torch.log((known + CROSS_SMOOTHING) / (total + CROSS_SMOOTHING * self.n_cross))


@torch.no_grad()
def run_tower(tower: nn.Module, x: dict[str, torch.Tensor], batch: int = 4096) -> np.ndarray:
    """(n, D) float32 vectors of a tower over encoded inputs ``x`` (each (n, ...)), ``batch`` rows at a time."""
    n = len(next(iter(x.values())))
    if n == 0:
        return np.zeros((0, 0), dtype=np.float32)
    return torch.cat([tower(take(x, torch.arange(i, min(i + batch, n)))) for i in range(0, n, batch)]).numpy()
