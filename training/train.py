"""Stage: train the two-tower model on the point-in-time training set, with early stopping on validation.

``TwoTowerScorer`` plugs the model into the evaluation harness (``training.evaluate``) exactly like the
baselines: ``fit(split)`` trains on the split's train part, ``score(user_idx)`` ranks every candidate.
Inputs come only from the Feast training set: the model trains on each positive label's point-in-time
features; for evaluation, a user is represented by the features of their first held-out interaction
(history strictly before it), and candidates by pin features fetched through the ``pin_tower_v1``
feature service at a few times no later than that.
"""

from __future__ import annotations

import copy
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
from tqdm import tqdm

from training.config import Config, TrainConfig
from training.encoding import Encoder, take
from training.evaluate import Split, evaluate
from training.model import TwoTower, in_batch_softmax_loss

log = logging.getLogger(__name__)

KEYS = ["user_id", "pin_id", "event_timestamp"]
PIN_TIME_POINTS = 8
"""Pin features for evaluation are fetched at this many times (quantiles of the users' cut-off times)."""


def init_distributed() -> bool:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1); gloo works on CPU."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("gloo")
        return True
    return False


def _rank() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def build_model(encoder: Encoder, tc: TrainConfig) -> TwoTower:
    torch.manual_seed(tc.seed)
    return TwoTower(encoder.n_pins, encoder.n_interests, len(encoder.genders), len(encoder.segments),
                    embed_dim=tc.embed_dim, dim=tc.dim, dropout=tc.dropout, temperature=tc.temperature,
                    seq_dropout=tc.seq_dropout)


@dataclass
class FitResult:
    best_epoch: int
    best_valid: float
    epochs_run: int
    seconds: float
    seconds_to_best: float
    examples_per_s: float
    history: list[dict[str, float]] = field(default_factory=list)


def train_model(model: TwoTower, encoder: Encoder, examples: pd.DataFrame, tc: TrainConfig,
                epochs: int | None = None, validate=None) -> FitResult:
    """Train on positive pairs ``examples`` (training-set rows). ``validate(model) -> float`` is called
    after each epoch; the best epoch's weights are restored. Runs unchanged under torchrun (DDP, gloo):
    every rank takes its shard of each epoch's permutation; gradients are averaged by DDP."""
    torch.set_num_threads(tc.threads)
    rank, world = _rank()
    users, pins = encoder.users(examples), encoder.pins(examples)
    pin_idx = pins["pin"]
    future = FutureTargets(examples, tc.target_window)
    # for mixed negatives: each vocabulary pin's latest features among the examples (its PIT row)
    latest = examples.assign(_pin=pin_idx.numpy()).sort_values("event_timestamp").drop_duplicates("_pin", keep="last")
    vocab_pins = encoder.pins(latest)
    n_vocab = len(latest)
    n = len(examples)
    net: torch.nn.Module = model
    if world > 1:
        net = torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=False)
    opt = torch.optim.AdamW(model.parameters(), lr=tc.lr, weight_decay=tc.weight_decay)
    gen = torch.Generator().manual_seed(tc.seed)
    best = (-math.inf, 0, None)
    history: list[dict[str, float]] = []
    t0 = time.perf_counter()
    seconds_to_best = 0.0
    epochs = epochs or tc.epochs
    seen = 0
    for epoch in range(1, epochs + 1):
        model.train()
        perm = torch.randperm(n, generator=gen)
        steps = n // (tc.batch_size * world) or 1
        total = 0.0
        bar = tqdm(range(steps), desc=f"epoch {epoch}", leave=False, disable=True if rank else None)
        for step in bar:
            batch = perm[(step * world + rank) * tc.batch_size:(step * world + rank + 1) * tc.batch_size]
            target = future.sample(batch, gen)
            all_ids = _gather(pin_idx[target]) if world > 1 else pin_idx[target]
            model.frequency.update(all_ids)
            u, p = net(take(users, batch), take(pins, target))
            log_q = tc.logq_weight * model.frequency.log_q(pin_idx[target]) if tc.logq else None
            extra = extra_log_q = extra_ids = None
            if tc.random_negatives:
                pick = torch.randint(0, n_vocab, (tc.random_negatives,), generator=gen)
                extra_x = take(vocab_pins, pick)
                extra, extra_ids = model.pin_tower(extra_x), extra_x["pin"]
                extra_log_q = (torch.full((len(pick),), tc.logq_weight * math.log(tc.random_negatives / n_vocab))
                               if tc.logq else None)
            loss = in_batch_softmax_loss(u, p, tc.temperature, log_q=log_q, pin_ids=pin_idx[target], extra=extra,
                                         extra_log_q=extra_log_q, extra_ids=extra_ids)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.item()
            seen += len(batch) * world
            if step % 20 == 0:
                bar.set_postfix(loss=f"{loss.item():.3f}")
        row = {"epoch": epoch, "loss": total / steps, "seconds": time.perf_counter() - t0}
        if validate is not None:
            model.eval()
            row["valid"] = float(validate(model))
            if row["valid"] > best[0]:
                best = (row["valid"], epoch, copy.deepcopy(model.state_dict()))
                seconds_to_best = row["seconds"]
        history.append(row)
        if rank == 0:
            log.info("epoch %d loss %.4f%s (%.1fs)", epoch, row["loss"],
                     f" valid recall@{tc.valid_k} {row['valid']:.4f}" if "valid" in row else "", row["seconds"])
        if validate is not None and epoch - best[1] >= tc.patience:
            break
    seconds = time.perf_counter() - t0
    if best[2] is not None:
        model.load_state_dict(best[2])
    else:
        best = (math.nan, len(history), None)
        seconds_to_best = seconds
    model.eval()
    return FitResult(best_epoch=best[1], best_valid=best[0], epochs_run=len(history), seconds=seconds,
                     seconds_to_best=seconds_to_best, examples_per_s=seen / seconds, history=history)


class FutureTargets:
    """Draws each example's positive from the same user's next ``window`` examples (itself included).

    Rows are ordered per user by time (ties by row order); example i's candidates are the rows at sorted
    positions pos(i) .. pos(i) + min(window, rows left for the user) - 1. window = 1 returns the batch itself.
    """

    def __init__(self, examples: pd.DataFrame, window: int):
        n = len(examples)
        self.window = window
        users = pd.factorize(examples["user_id"])[0]
        ts = examples["event_timestamp"].astype("int64").to_numpy()   # order only: ns or µs since the epoch
        order = np.lexsort((np.arange(n), ts, users))
        pos = np.empty(n, dtype=np.int64)
        pos[order] = np.arange(n)
        sorted_users = users[order]
        group_end = np.searchsorted(sorted_users, sorted_users, side="right") if n else np.zeros(0, np.int64)
        # sorted_users is sorted by construction (lexsort's last key), so searchsorted finds each group's end
        self.order = torch.from_numpy(order)
        self.pos = torch.from_numpy(pos)
        self.count = torch.from_numpy(np.minimum(window, group_end[pos] - pos))

    def sample(self, batch: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        if self.window == 1:
            return batch
        offset = (torch.rand(len(batch), generator=gen, dtype=torch.float64) * self.count[batch]).long()
        return self.order[self.pos[batch] + offset]


def _gather(x: torch.Tensor) -> torch.Tensor:
    out = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(out, x.contiguous())
    return torch.cat(out)


class TwoTowerScorer:
    """The two-tower model behind the harness's ``Scorer`` protocol.

    ``fit(split)`` trains on the train part with early stopping on validation recall. It is not refit on
    train + validation (unlike the baselines): validation interactions still reach the model at test time,
    as the users' point-in-time history features. ``prepare(on)`` embeds users and candidates for ``on``.
    """

    def __init__(self, cfg: Config, training_set: pd.DataFrame, n_interests: int):
        self.cfg = cfg
        self.tc = cfg.train
        self.training_set = training_set
        self.n_interests = n_interests
        self.result: FitResult | None = None
        self.model: TwoTower | None = None
        self.encoder: Encoder | None = None
        self._pin_cache: dict[pd.Timestamp, pd.DataFrame] = {}

    # --- the harness protocol ---------------------------------------------------------------------------------
    def fit(self, split: Split) -> None:
        parts = split.frame[KEYS + ["part"]]
        rows = self.training_set.merge(parts, on=KEYS, how="inner")
        train = rows[rows["part"] == "train"].reset_index(drop=True)
        self.encoder = Encoder.fit(train, self.n_interests, history_length=self.cfg.transform.history_length,
                                   top_interests=self.cfg.transform.top_interests)
        self.model = build_model(self.encoder, self.tc)
        self.split = split
        if split.is_merged:
            raise ValueError("the two-tower model early-stops on validation: fit it on a split with validation")

        def validate(_model: TwoTower) -> float:
            self.prepare("valid")
            k = self.tc.valid_k
            return evaluate(self, split, ks=(k,), on="valid", curve_k=k, ndcg_k=10, interest_k=k)[f"recall@{k}"]

        self.result = train_model(self.model, self.encoder, train, self.tc, validate=validate)
        log.info("two-tower fit: best epoch %s, %.1fs to best, %.0f examples/s", self.result.best_epoch,
                 self.result.seconds_to_best, self.result.examples_per_s)

    def score(self, user_idx: np.ndarray) -> np.ndarray:
        u = self._user_vectors[user_idx]                          # (n, D)
        bucket = self._user_bucket[user_idx]                      # (n,)
        out = np.empty((len(user_idx), self._pin_vectors.shape[1]), dtype=np.float32)
        for b in np.unique(bucket):
            rows = bucket == b
            out[rows] = u[rows] @ self._pin_vectors[b].T
        return out

    # --- embeddings for an evaluation phase -------------------------------------------------------------------
    @torch.no_grad()
    def prepare(self, on: Literal["valid", "test"]) -> None:
        """Embed every evaluable user at their cut-off (first ``on`` interaction) and the candidates at
        ``PIN_TIME_POINTS`` times; each user is scored against the latest pin snapshot not after them."""
        assert self.model is not None and self.encoder is not None
        split = self.split
        first = (split.frame[split.frame["part"] == on].sort_values(["event_timestamp", "pin_id"])
                 .drop_duplicates("user_id"))
        rows = first[KEYS + ["user_idx"]].merge(self.training_set, on=KEYS, how="left")
        dim = self.tc.dim
        self._user_vectors = np.zeros((split.n_users, dim), dtype=np.float32)
        self._user_bucket = np.zeros(split.n_users, dtype=np.int64)
        users = self.encoder.users(rows)
        self._user_vectors[rows["user_idx"].to_numpy()] = _embed(self.model.user_tower, users)
        cutoffs = rows["event_timestamp"]
        times = sorted(set(cutoffs.quantile(np.linspace(0, 1, PIN_TIME_POINTS), interpolation="lower")))
        self._user_bucket[rows["user_idx"].to_numpy()] = np.searchsorted(times, cutoffs, side="right") - 1
        self._pin_vectors = np.stack([_embed(self.model.pin_tower, self.encoder.pins(self._pins_at(t)))
                                      for t in times])       # (T, n_items, D)

    def _pins_at(self, t: pd.Timestamp) -> pd.DataFrame:
        """Pin features of every candidate as of ``t`` through the pin feature service (Feast offline)."""
        if t not in self._pin_cache:
            from feature_repo.feature_services import PIN_TOWER_SERVICE
            from training.features import historical_features

            entity = pd.DataFrame({"pin_id": self.split.items, "event_timestamp": t})
            df = historical_features(self.cfg, entity, PIN_TOWER_SERVICE)
            self._pin_cache[t] = df.set_index("pin_id").loc[self.split.items].reset_index()
        return self._pin_cache[t]

    def checkpoint(self) -> dict[str, Any]:
        assert self.model is not None and self.encoder is not None
        return {"config": asdict(self.tc), "encoder": self.encoder.state(), "model": self.model.state_dict(),
                "fit": asdict(self.result) if self.result else None}


def _embed(tower: torch.nn.Module, x: dict[str, torch.Tensor], batch: int = 4096) -> np.ndarray:
    n = len(next(iter(x.values())))
    return torch.cat([tower(take(x, torch.arange(i, min(i + batch, n)))) for i in range(0, n, batch)]).numpy()


def save_checkpoint(payload: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(payload, tmp)
    tmp.replace(path)
