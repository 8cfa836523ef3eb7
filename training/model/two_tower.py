"""Two-tower retrieval task: towers in one space, in-batch softmax with logQ correction.

Logits are inner products of the towers' outputs times an inverse temperature (learned from
``TrainConfig.temperature`` with ``learn_temperature``). In-batch negatives over-penalize popular items (they
appear in many batches); the logQ correction subtracts log q_j, the item's estimated probability of being in a
batch, from every logit (Yi et al., RecSys 2019), with q estimated online by ``StreamingFrequency``. For small
catalogues a full softmax over every pin of the vocabulary is the alternative (``full_softmax_loss``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from training.config import TrainConfig
from training.model.towers import PinTower, UserTower


class StreamingFrequency(nn.Module):
    """Streaming estimate of each item's sampling probability per batch (Yi et al. 2019, Alg. 2).

    For an item seen at step t, ``gap`` is an exponential moving average of the steps between its
    occurrences and q = 1 / gap. Items hash into ``buckets`` slots (collisions only merge estimates).
    State is in buffers, so it is checkpointed and identical on every DDP rank.
    """

    def __init__(self, buckets: int = 1 << 20, alpha: float = 0.01, initial_gap: float = 100.0):
        super().__init__()
        self.alpha = alpha
        self.register_buffer("last_step", torch.zeros(buckets, dtype=torch.float64))
        self.register_buffer("gap", torch.full((buckets,), initial_gap, dtype=torch.float64))
        self.register_buffer("step", torch.zeros((), dtype=torch.float64))

    def _slot(self, ids: torch.Tensor) -> torch.Tensor:
        return (ids * 2654435761) % self.gap.numel()

    @torch.no_grad()
    def update(self, ids: torch.Tensor) -> None:
        """Record one batch of (canonical pin) ids, shape (B,)."""
        self.step += 1
        slots = torch.unique(self._slot(ids))
        seen = self.last_step[slots] > 0
        delta = self.step - self.last_step[slots]
        self.gap[slots] = torch.where(seen, (1 - self.alpha) * self.gap[slots] + self.alpha * delta, self.gap[slots])
        self.last_step[slots] = self.step

    @torch.no_grad()
    def prime(self, ids: torch.Tensor, batch_size: int) -> None:
        """Set the gap of every id in ``ids`` (an epoch's positives, with repeats) to its expectation when batches
        of ``batch_size`` are drawn from them uniformly: 1 / P(in a batch) = 1 / (1 - (1 - c/n)^B), c its count
        of n. The stream then updates these estimates as before."""
        count = torch.bincount(self._slot(ids), minlength=self.gap.numel()).double()
        present = count > 0
        self.gap[present] = 1.0 / (1.0 - (1.0 - count[present] / len(ids)) ** batch_size)

    def log_q(self, ids: torch.Tensor) -> torch.Tensor:
        """(B,) log of the estimated per-batch sampling probability of each id."""
        return -torch.log(self.gap[self._slot(ids)].clamp(min=1.0)).float()


def in_batch_softmax_loss(user: torch.Tensor, pin: torch.Tensor, scale: torch.Tensor | float,
                          log_q: torch.Tensor | None = None, pin_ids: torch.Tensor | None = None,
                          weights: torch.Tensor | None = None, extra: torch.Tensor | None = None,
                          extra_log_q: torch.Tensor | None = None,
                          extra_ids: torch.Tensor | None = None, hard: torch.Tensor | None = None,
                          hard_valid: torch.Tensor | None = None,
                          hard_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Extreme multi-class softmax over the batch's pins.

    user, pin: (B, D) embeddings of positive pairs (row i's positive is pin i); scale: the inverse temperature;
    log_q: (B,) log sampling probability of each pin, subtracted from its column (logQ correction); pin_ids:
    (B,) so that other rows' copies of a row's own positive are masked instead of counted as negatives;
    weights: (B,). extra: (R, D) additional negatives (mixed negative sampling: pins drawn uniformly from the
    vocabulary) with their log sampling probability extra_log_q (R,) and ids extra_ids (R,) (a row's own
    positive among them is masked). hard: (B, D) one hard negative per row (the user's own negative feedback),
    scored against that row only, without a sampling correction; hard_valid (B,) says which rows have one and
    hard_ids (B,) masks a row's hard negative that is also its positive.
    """
    logits = scale * (user @ pin.T)                                       # (B, B)
    if log_q is not None:
        logits = logits - log_q.unsqueeze(0)
    if pin_ids is not None:
        same = pin_ids.unsqueeze(0) == pin_ids.unsqueeze(1)
        same.fill_diagonal_(False)
        logits = logits.masked_fill(same, float("-inf"))
    if extra is not None:
        more = scale * (user @ extra.T)                                   # (B, R)
        if extra_log_q is not None:
            more = more - extra_log_q.unsqueeze(0)
        if extra_ids is not None and pin_ids is not None:
            more = more.masked_fill(pin_ids.unsqueeze(1) == extra_ids.unsqueeze(0), float("-inf"))
        logits = torch.cat([logits, more], dim=1)
    if hard is not None:
        own = scale * (user * hard).sum(-1)                               # (B,)
        drop = torch.zeros_like(own, dtype=torch.bool) if hard_valid is None else ~hard_valid
        if hard_ids is not None and pin_ids is not None:
            drop = drop | (hard_ids == pin_ids)
        logits = torch.cat([logits, own.masked_fill(drop, float("-inf")).unsqueeze(1)], dim=1)
    target = torch.arange(len(user), device=user.device)
    return _weighted(F.cross_entropy(logits, target, reduction="none"), weights)


def full_softmax_loss(user: torch.Tensor, vocab: torch.Tensor, target: torch.Tensor, scale: torch.Tensor | float,
                      weights: torch.Tensor | None = None) -> torch.Tensor:
    """Softmax over every pin of the vocabulary: user (B, D), vocab (N, D), target (B,) rows of ``vocab``."""
    return _weighted(F.cross_entropy(scale * (user @ vocab.T), target, reduction="none"), weights)


def _weighted(loss: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    if weights is not None:
        return (loss * weights).sum() / weights.sum()
    return loss.mean()


class TwoTower(nn.Module):
    """User and pin towers sharing the pin id and interest tables. ``tables``: pre-trained context / target / users
    aligned to the encoder's vocabularies (``PretrainedTable.aligned``), or None."""

    def __init__(self, n_pins: int, n_interests: int, n_genders: int, n_segments: int, tc: TrainConfig,
                 history_length: int, tables: dict[str, torch.Tensor] | None = None):
        super().__init__()
        tables = tables or {}
        self.pin_tower = PinTower(n_pins, n_interests, tc, tables.get("target"))
        self.user_tower = UserTower(self.pin_tower.pin_embedding, self.pin_tower.interest_embedding, n_genders,
                                    n_segments, tc, history_length, tables.get("context"), tables.get("users"))
        self.log_scale = nn.Parameter(torch.tensor(math.log(1.0 / tc.temperature)),
                                      requires_grad=tc.learn_temperature)
        self.frequency = StreamingFrequency()

    def set_blend_tables(self, tables: dict[str, torch.Tensor]) -> None:
        """Read the blended pre-trained subspace from newer tables (``PretrainedTable.aligned`` to this model's
        vocabularies: the user side pools ``context``, the pin side reads ``target``); the towers' fields keep the
        table they were trained with."""
        self.user_tower.set_blend_table(tables["context"])
        self.pin_tower.set_blend_table(tables["target"])

    @property
    def scale(self) -> torch.Tensor:
        """The inverse temperature of the softmax (learned with ``learn_temperature``)."""
        return self.log_scale.exp()

    def forward(self, users: dict[str, torch.Tensor], pins: dict[str, torch.Tensor],
                extra: dict[str, torch.Tensor] | None = None):
        """((user vectors, which embeddings are real), pin vectors, extra pin vectors or None, softmax scale):
        users (B, D) or (B, K, D), mask (B, 1) or (B, K); pins (B, D); ``extra`` (sampled negatives) (N, D).
        Everything the loss uses comes out of forward, so that DDP sees each parameter used once per step."""
        return (self.user_tower(users, with_mask=True), self.pin_tower(pins),
                None if extra is None else self.pin_tower(extra), self.scale)


def closest_embedding(users: torch.Tensor, mask: torch.Tensor, pins: torch.Tensor) -> torch.Tensor:
    """(B, D): for each row, the user embedding (of (B, K, D), real ones per ``mask``) nearest its pin (B, D) by
    inner product: the one a multi-embedding user is trained through for that example."""
    if users.dim() == 2:
        return users
    scores = (users * pins.unsqueeze(1)).sum(-1).masked_fill(~mask, float("-inf"))   # (B, K)
    return users[torch.arange(len(users)), scores.argmax(1)]
