"""Stage: train the two-tower model on the point-in-time training set, with early stopping on validation.

``retrieval train`` fits the model on the live training set's temporal split (``training.evaluation.split``):
train-proper examples, early stopping on validation recall, then one evaluation on test, and writes the
checkpoint (``training.model.checkpoint``). The model trains on each positive label's point-in-time features;
validation and test go through the same harness as the baselines (``training.evaluation``).

Distributed: launched by ``torchrun --nproc_per_node=N``, the stage joins the process group itself (gloo on
CPU; ``WORLD_SIZE`` > 1). Every rank takes its shard of each epoch and DDP averages the gradients; rank 0
validates and broadcasts the figure, so every rank stops at the same epoch and restores the same weights;
only rank 0 evaluates on test and writes the checkpoint. The ranks' final weights are fingerprinted and the
fingerprints recorded in the checkpoint (``fit.rank_fingerprints``), so a divergence would show.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field, fields, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
from tqdm import tqdm

from training import __version__
from training.config import Config, PretrainConfig, TrainConfig
from training.evaluation.harness import evaluate, user_recalls
from training.evaluation.scorer import TwoTowerScorer
from training.evaluation.split import KEYS, Split, load_split
from training.model.checkpoint import build_model, load_checkpoint, save_checkpoint, warm_start
from training.model.encoding import Encoder, take
from training.model.pretrained import PretrainedTable, check_window, latest_usable
from training.model.two_tower import TwoTower, closest_embedding, full_softmax_loss, in_batch_softmax_loss

log = logging.getLogger(__name__)

BLEND_GRID = (0.0, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0, math.inf)
"""Weights of the pre-trained scores against the learned ones tried on validation (inf = the pre-trained scores
alone; 0 = the learned towers alone)."""
PRIOR_GRID = (0.0, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0)
"""Weights of the popularity prior tried on validation (logits at the initial temperature per unit of the pin's log
impression rate; ``train.popularity_prior``)."""
BLEND_FOLDS = 5
"""Folds of validation users for the blend gate's cross-fitted gain (``gated_best``)."""


def join_process_group() -> tuple[int, int]:
    """(rank, world size). Under torchrun (WORLD_SIZE > 1) joins the gloo process group first."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("gloo")
    return rank_and_world()


def rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def fingerprint(model: torch.nn.Module) -> str:
    """sha256 of every parameter and buffer, in state-dict order: equal fingerprints = identical weights."""
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


@dataclass
class FitResult:
    best_epoch: int
    best_valid: float
    epochs_run: int
    seconds: float
    seconds_to_best: float
    examples_per_s: float
    history: list[dict[str, float]] = field(default_factory=list)
    world_size: int = 1
    rank_fingerprints: list[str] = field(default_factory=list)
    """Each rank's final weights (``fingerprint``); all equal when DDP kept the ranks in step."""
    hit_epoch_cap: bool = False
    """True when the run ended at ``epochs`` while validation was still improving within ``patience``: the cap,
    not early stopping, ended it."""
    blend: dict[str, Any] | None = None
    """With the pre-trained blend: the weight chosen on validation and the figure of every weight tried."""
    prior: dict[str, Any] | None = None
    """With the popularity prior: the weight chosen on validation and the figure of every weight tried."""


def train_model(model: TwoTower, encoder: Encoder, examples: pd.DataFrame, tc: TrainConfig,
                epochs: int | None = None, validate=None, hides: pd.DataFrame | None = None) -> FitResult:
    """Train on positive pairs ``examples`` (training-set rows). ``validate(model) -> float`` is called after
    each epoch (on rank 0, which broadcasts the figure); the best epoch's weights are restored. Runs unchanged under
    torchrun (DDP, gloo): every rank takes its shard of each epoch's permutation; gradients are averaged.
    ``hides``: training-set rows of negative feedback (label 0), the hard negatives of ``tc.hide_negatives``."""
    torch.set_num_threads(tc.threads)
    rank, world = rank_and_world()
    users, pins = encoder.users(examples), encoder.pins(examples)
    pin_idx = pins["pin"]
    future = FutureTargets(examples, tc.target_window)
    # each vocabulary pin's latest features among the examples: mixed negatives and the full softmax use them
    latest = examples.assign(_pin=pin_idx.numpy()).sort_values("event_timestamp").drop_duplicates("_pin", keep="last")
    latest = latest.sort_values("_pin")
    vocab_pins = encoder.pins(latest)
    vocab_row = torch.full((encoder.n_pins,), -1, dtype=torch.long)
    vocab_row[torch.from_numpy(latest["_pin"].to_numpy())] = torch.arange(len(latest))
    n_vocab = len(latest)
    n_random = tc.random_negatives or round(tc.random_negative_share * n_vocab)
    n = len(examples)
    hard = HideNegatives(examples, hides) if tc.hide_negatives and hides is not None and len(hides) else None
    if tc.hide_negatives and hard is None:
        log.warning("train.hide_negatives: the training set has no hides (label 0), so no hard negative is added")
    hide_pins = None if hard is None else encoder.pins(hard.rows)
    user_codes, user_counts = np.unique(examples["user_id"].to_numpy(), return_inverse=True, return_counts=True)[1:]
    weights = (torch.from_numpy(user_counts[user_codes].astype(np.float32)) ** -tc.user_weight_power
               if tc.user_weight_power else None)
    net: torch.nn.Module = model
    if world > 1:
        net = torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=True)
    opts = optimizers(model, tc)
    epochs = epochs or tc.epochs
    steps = n // (tc.batch_size * world) or 1
    scheds = ([torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=epochs * steps) for o in opts]
              if tc.lr_schedule == "cosine" else [])
    if tc.logq and tc.logq_prime and tc.negatives != "full":
        model.frequency.prime(pin_idx, tc.batch_size * world)
    gen = torch.Generator().manual_seed(tc.seed)
    best = (-math.inf, 0, None)
    history: list[dict[str, float]] = []
    t0 = time.perf_counter()
    seconds_to_best = 0.0
    seen = 0
    for epoch in range(1, epochs + 1):
        model.train()
        perm = torch.randperm(n, generator=gen)
        total = 0.0
        bar = tqdm(range(steps), desc=f"epoch {epoch}", leave=False, disable=True if rank else None)
        for step in bar:
            batch = perm[(step * world + rank) * tc.batch_size:(step * world + rank + 1) * tc.batch_size]
            target = future.sample(batch, gen)
            w = None if weights is None else weights[batch]
            x_users = take(users, batch)
            if tc.conditional:   # condition on the target's interest for a share of the examples, none for the rest
                on = torch.rand(len(batch), generator=gen) < tc.condition_rate
                x_users["condition"] = torch.where(on, pins["interest"][target], torch.zeros_like(on, dtype=torch.long))
            if tc.negatives == "full":
                (u, mask), vocab, _, scale = net(x_users, vocab_pins)
                u = closest_embedding(u, mask, vocab[vocab_row[pin_idx[target]]])
                loss = full_softmax_loss(u, vocab, vocab_row[pin_idx[target]], scale, weights=w)
            else:
                all_ids = _gather(pin_idx[target]) if world > 1 else pin_idx[target]
                model.frequency.update(all_ids)
                extra_x = extra_log_q = extra_ids = None
                if n_random:
                    pick = torch.randint(0, n_vocab, (n_random,), generator=gen)
                    extra_x = take(vocab_pins, pick)
                    extra_ids = extra_x["pin"]
                    extra_log_q = (torch.full((len(pick),), tc.logq_weight * math.log(n_random / n_vocab))
                                   if tc.logq else None)
                hard_valid = hard_ids = None
                if hard is not None:   # the hard negatives go through the pin tower in the same call as the sampled
                    row, hard_valid = hard.sample(batch, gen)
                    hard_x = take(hide_pins, row)
                    hard_ids = hard_x["pin"]
                    extra_x = hard_x if extra_x is None else {k: torch.cat([extra_x[k], hard_x[k]]) for k in hard_x}
                (u, mask), p, extra, scale = net(x_users, take(pins, target), extra_x)
                hard_p = None
                if hard is not None:
                    extra, hard_p = (extra[:n_random] if n_random else None, extra[n_random:])
                u = closest_embedding(u, mask, p)
                log_q = tc.logq_weight * model.frequency.log_q(pin_idx[target]) if tc.logq else None
                loss = in_batch_softmax_loss(u, p, scale, log_q=log_q, pin_ids=pin_idx[target], weights=w,
                                             extra=extra, extra_log_q=extra_log_q, extra_ids=extra_ids,
                                             hard=hard_p, hard_valid=hard_valid, hard_ids=hard_ids)
            for o in opts:
                o.zero_grad(set_to_none=True)
            loss.backward()
            for o in opts:
                o.step()
            for sched in scheds:
                sched.step()
            total += loss.item()
            seen += len(batch) * world
            if step % 20 == 0:
                bar.set_postfix(loss=f"{loss.item():.3f}")
        row = {"epoch": epoch, "loss": total / steps, "seconds": time.perf_counter() - t0}
        if validate is not None:
            model.eval()
            row["valid"] = _on_rank0(lambda: float(validate(model)), rank, world)
            if row["valid"] > best[0]:
                best = (row["valid"], epoch, copy.deepcopy(model.state_dict()))
                seconds_to_best = row["seconds"]
        history.append(row)
        if rank == 0:
            log.info("epoch %d loss %.4f%s (%.1fs)", epoch, row["loss"],
                     f" valid recall@{tc.valid_k} {row['valid']:.4f}" if "valid" in row else "", row["seconds"])
        if validate is not None and should_stop(epoch, best[1], tc):
            break
    seconds = time.perf_counter() - t0
    if best[2] is not None:
        model.load_state_dict(best[2])
    else:
        best = (math.nan, len(history), None)
        seconds_to_best = seconds
    model.eval()
    prints = [fingerprint(model)]
    if world > 1:
        prints = [None] * world
        dist.all_gather_object(prints, fingerprint(model))
    return FitResult(best_epoch=best[1], best_valid=best[0], epochs_run=len(history),
                     seconds=seconds, seconds_to_best=seconds_to_best, examples_per_s=seen / max(seconds, 1e-9),
                     history=history, world_size=world, rank_fingerprints=prints,
                     hit_epoch_cap=validate is not None and len(history) == epochs and epochs - best[1] < tc.patience)


def optimizers(model: torch.nn.Module, tc: TrainConfig) -> list[torch.optim.Optimizer]:
    """AdamW over the trainable parameters; the id tables built with sparse gradients (``train.id_optimizer``) get
    their own ``SparseAdam`` instead, which updates only the rows a step looked up."""
    sparse = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding) and m.sparse}
    params = [p for p in model.parameters() if p.requires_grad]
    dense = [p for p in params if id(p) not in sparse]
    opts: list[torch.optim.Optimizer] = [torch.optim.AdamW(dense, lr=tc.lr, weight_decay=tc.weight_decay)]
    if len(dense) < len(params):
        opts.append(torch.optim.SparseAdam([p for p in params if id(p) in sparse], lr=tc.lr))
    return opts


def should_stop(epoch: int, best_epoch: int, tc: TrainConfig) -> bool:
    """Early stopping after ``epoch`` (1-based): ``patience`` epochs without a better validation figure, and never
    before ``min_epochs``."""
    return epoch >= tc.min_epochs and epoch - best_epoch >= tc.patience


def choose_blend(model: TwoTower, scorer: TwoTowerScorer, split: Split, k: int) -> dict[str, Any]:
    """Pick the weight of the pre-trained scores against the learned ones on validation recall@``k``
    (``BLEND_GRID``) and set it on both towers; returns every tried weight's figure. The towers run once: a
    blended score is learned + w · pre-trained, computed from the two subspaces. Rank 0 decides (broadcast).

    The best weight is kept only when its gain over the learned towers alone (weight 0) is above one standard
    error of the per-user differences (paired, on the same validation users), the gain measured on users the
    choice of weight did not see (``gated_best``): a gain within the noise of the validation users is no reason to
    leave the trained model, and a blend chosen on such a gain did not hold on test (docs/experiment-log.md)."""
    for tower in (model.user_tower, model.pin_tower):
        tower.set_blend(1.0, 1.0)
    scorer.prepare("valid")
    learned_dim = model.user_tower.learned_dim
    rank, _ = rank_and_world()
    recalls = (dict(zip(BLEND_GRID, user_recalls(   # one pass over the users: the candidates are embedded once
        [scorer.reweighted(learned_dim, *((0.0, 1.0) if math.isinf(w) else (1.0, w))) for w in BLEND_GRID],
        split, k), strict=True)) if rank == 0 else {})
    figures, best, gain, se, chosen = _gated_choice(BLEND_GRID, recalls.__getitem__)
    learned, table = (0.0, 1.0) if math.isinf(chosen) else (1.0, chosen)
    for tower in (model.user_tower, model.pin_tower):
        tower.set_blend(learned, table)
    log.info("pre-trained blend weight %s (best on validation %s; cross-fitted %+.4f ± %.4f over the learned towers "
             "alone; valid %s)", chosen, best, gain, se, {w: round(v, 4) for w, v in figures.items()})
    return {"weight": str(chosen), "learned": learned, "table": table, "valid": figures, "best": str(best),
            "gain_over_learned": gain, "gain_se": se}


def choose_prior(model: TwoTower, scorer: TwoTowerScorer, split: Split, k: int) -> dict[str, Any]:
    """Pick the popularity prior's weight (``PRIOR_GRID``) on validation recall@``k`` after training (and after the
    blend), kept only when its cross-fitted gain over no prior is above one standard error (``gated_best``), and set
    it on the pin tower; returns every tried weight's figure. Rank 0 decides (broadcast). The towers run once and
    every weight is ranked in one pass over the users (``TwoTowerScorer.with_prior``)."""
    rank, _ = rank_and_world()
    recalls = {}
    if rank == 0:
        scorer.prepare("valid")
        recalls = dict(zip(PRIOR_GRID, user_recalls([scorer.with_prior(w) for w in PRIOR_GRID], split, k),
                           strict=True))
    figures, best, gain, se, chosen = _gated_choice(PRIOR_GRID, recalls.__getitem__)
    model.pin_tower.set_prior(chosen)
    log.info("popularity prior %s (best on validation %s; cross-fitted %+.4f ± %.4f over no prior; valid %s)",
             chosen, best, gain, se, {w: round(v, 4) for w, v in figures.items()})
    return {"weight": chosen, "valid": figures, "best": best, "gain_over_none": gain, "gain_se": se}


def _gated_choice(grid: tuple[float, ...], per_user_recall) -> tuple[dict[str, float], float, float, float, float]:
    """(each weight's validation figure, the best weight, its cross-fitted gain over weight 0 and that gain's SE,
    the weight chosen: the best when its gain is above one SE, else 0) from ``per_user_recall(w)``, each weight's
    per-user validation recall (``gated_best``). Rank 0 computes and decides; every rank gets the result."""
    rank, world = rank_and_world()
    per_user = {w: per_user_recall(w) for w in grid} if rank == 0 else {}
    figures = {str(w): _on_rank0(lambda w=w: float(per_user[w].mean()), rank, world) for w in grid}
    decision = dict(zip(("best", "gain", "se"), gated_best(per_user), strict=True)) if rank == 0 else {}
    best, gain, se = (_on_rank0(lambda key=key: decision[key], rank, world) for key in ("best", "gain", "se"))
    return figures, best, gain, se, (best if gain > se else 0.0)


def gated_best(per_user: dict[float, np.ndarray], folds: int = BLEND_FOLDS) -> tuple[float, float, float]:
    """(the weight of the best mean, its cross-fitted gain over weight 0, the standard error of that gain) from
    each weight's per-user validation recall (the same users in the same order; ties go to the earlier weight).

    The best of several weights looks better than it is on the users it was chosen on (the winner's curse: with
    ten weights and no real gain, the best one's own paired gain is above one SE most of the time), so the gain is
    measured on users the choice did not see: the users are dealt into ``folds`` folds by position; on each fold
    the weight best on the other folds is compared with weight 0 (``choose_blend`` keeps ``best`` only when this
    gain is above its SE)."""
    weights = list(per_user)
    n = len(per_user[0.0])

    def best_on(users: np.ndarray) -> float:
        return max(weights, key=lambda w: (float(per_user[w][users].mean()), -weights.index(w)))

    best = best_on(np.ones(n, dtype=bool))
    if n < 2:
        return best, float((per_user[best] - per_user[0.0]).mean()) if n else 0.0, math.inf
    fold = np.arange(n) % min(folds, n)
    diff = np.empty(n)
    for f in np.unique(fold):
        held = fold == f
        chosen = best_on(~held)
        diff[held] = per_user[chosen][held] - per_user[0.0][held]
    return best, float(diff.mean()), float(diff.std(ddof=1) / math.sqrt(n))


def _on_rank0(fn, rank: int, world: int) -> float:
    """``fn()`` computed on rank 0 and broadcast to every rank."""
    value = torch.tensor([fn() if rank == 0 else 0.0], dtype=torch.float64)
    if world > 1:
        dist.broadcast(value, src=0)
    return float(value.item())


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
        return self.order[self.pos[batch] + _uniform_offsets(self.count[batch], gen)]


def _uniform_offsets(count: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """(B,) one offset per row drawn uniformly from 0 .. count - 1 (0 where count is 0)."""
    return (torch.rand(len(count), generator=gen, dtype=torch.float64) * count).long()


class HideNegatives:
    """Draws each example's hard negative: one of the same user's hides (label 0) at or before the example's time,
    uniformly. ``rows`` are the hides sorted by (user, time); ``sample`` returns (row of ``rows``, has-one mask)."""

    def __init__(self, examples: pd.DataFrame, hides: pd.DataFrame):
        self.rows = hides.sort_values(["user_id", "event_timestamp"], kind="stable").reset_index(drop=True)
        codes, _ = pd.factorize(pd.concat([self.rows["user_id"], examples["user_id"]], ignore_index=True))
        hide_user, example_user = codes[:len(self.rows)], codes[len(self.rows):]
        t0 = min(self.rows["event_timestamp"].min(), examples["event_timestamp"].min())
        hide_s = (self.rows["event_timestamp"] - t0).dt.total_seconds().to_numpy(np.int64)
        example_s = (examples["event_timestamp"] - t0).dt.total_seconds().to_numpy(np.int64)
        # one sortable key per (user, second): hides sorted by it; an example's hides are those of its user up to
        # its own key (a hide in the example's second counts as before it)
        hide_key = hide_user.astype(np.int64) << 32 | hide_s
        example_key = example_user.astype(np.int64) << 32 | example_s
        self.start = torch.from_numpy(np.searchsorted(hide_key, example_user.astype(np.int64) << 32, side="left"))
        self.count = torch.from_numpy(np.searchsorted(hide_key, example_key, side="right")) - self.start

    def sample(self, batch: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        count = self.count[batch]
        # a row without hides points at its user's slot, which may be past the last hide: clamp, then mask it
        row = (self.start[batch] + _uniform_offsets(count, gen)).clamp(max=max(len(self.rows) - 1, 0))
        return row, count > 0


def _gather(x: torch.Tensor) -> torch.Tensor:
    out = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(out, x.contiguous())
    return torch.cat(out)


@dataclass
class Trained:
    """A model fitted on a split's train part, with what the evaluation of it needs."""

    model: TwoTower
    encoder: Encoder
    result: FitResult
    scorer: TwoTowerScorer
    """The model behind the harness's Scorer protocol, on the split it was trained on."""
    window_start: str = ""
    """ISO UTC start of the training window."""
    pretrained: dict[str, Any] | None = None
    """The pre-trained table used: id, method, width and window."""


def refit_tables(cfg: Config, split: Split, snapshot_id: str,
                 table: PretrainedTable | None = None) -> dict[str, PretrainedTable]:
    """The blend tables of ``train.blend_table = 'refit'``: the pre-training of ``table`` (its recorded
    ``PretrainConfig``; default ``cfg.pretrain``) refit for the validation figure ('train': on the horizon-matched
    train part, or on all of train with ``train.blend_validation = 'adjacent'``) and on train + validation
    ('valid', the test evaluation's and the release's)."""
    from training.pretrain import pretrain

    if table is not None:
        known = {f.name for f in fields(PretrainConfig)}
        recorded = {k: v for k, v in (table.meta.get("config") or {}).items() if k in known}
        cfg = replace(cfg, pretrain=replace(cfg.pretrain, **recorded))
    validation = "horizon" if cfg.train.blend_validation == "horizon" else "train"
    return {"train": pretrain(cfg, split, snapshot_id, until=validation),
            "valid": pretrain(cfg, split, snapshot_id, until="valid")}


def kept_blend(model: TwoTower, init: dict[str, Any] | None) -> dict[str, Any] | None:
    """Set the blend weights of the checkpoint ``init`` on ``model`` and return them (marked ``kept_from``); None
    when ``init`` has none to give."""
    blend = ((init or {}).get("fit") or {}).get("blend")
    if not blend or "learned" not in blend:
        return None
    for tower in (model.user_tower, model.pin_tower):
        tower.set_blend(blend["learned"], blend["table"])
    log.info("pre-trained blend weight %s kept from %s", blend["weight"], init["model_version"])
    return {k: blend[k] for k in ("weight", "learned", "table")} | {"kept_from": init["model_version"]}


def kept_prior(model: TwoTower, init: dict[str, Any] | None) -> dict[str, Any] | None:
    """Set the popularity prior's weight of the checkpoint ``init`` on ``model`` and return it (marked
    ``kept_from``); None when ``init`` has none to give."""
    prior = ((init or {}).get("fit") or {}).get("prior")
    if not prior or "weight" not in prior:
        return None
    model.pin_tower.set_prior(prior["weight"])
    log.info("popularity prior %s kept from %s", prior["weight"], init["model_version"])
    return {"weight": prior["weight"], "kept_from": init["model_version"]}


def fit(cfg: Config, training_set: pd.DataFrame, split: Split, manifest: dict[str, Any],
        table: PretrainedTable | None = None, init: dict[str, Any] | None = None,
        blend_tables: dict[str, PretrainedTable] | None = None, keep_weights: bool = False) -> Trained:
    """Train on the split's train-proper examples of the training window with early stopping on validation
    recall@``valid_k``.

    The training window is the newest ``train.window_fraction`` of the train-proper interactions. With
    pre-trained IDs, ``table`` (default: the newest table under <data_dir>/pretrained that ends by the window's
    start) must not overlap it (``train.allow_overlapping_pretrain`` is for the ablation only). The towers are
    not refit on train + validation (unlike the baselines): validation interactions still reach the model at test
    time, as the users' point-in-time history features. With ``train.blend_table = 'refit'`` the blended
    subspace is refit: the blend weight is chosen with the table refit for validation (horizon-matched by default),
    and the returned model reads the one refit on train + validation (``blend_tables``: ``refit_tables``' result,
    computed when not given), ready for the test evaluation and the release. ``init``: a checkpoint payload to
    warm-start from (``training.model.checkpoint.warm_start``; a retrain's option), else a fresh initialisation;
    ``keep_weights``: take its blend and prior weights instead of choosing them on validation again."""
    if split.is_merged:
        raise ValueError("the two-tower model early-stops on validation: fit it on a split with validation")
    tc = cfg.train
    start = split.window_start(tc.window_fraction)
    if tc.pretrained != "none":
        if table is None:
            table = latest_usable(cfg.data_path / "pretrained", start.to_pydatetime(), tc.allow_overlapping_pretrain)
        check_window(table, start.to_pydatetime(), tc.allow_overlapping_pretrain)
    else:
        table = None
    train_parts = split.frame.loc[split.frame["part"] == "train", [*KEYS, "part"]]
    window = np.flatnonzero((training_set["event_timestamp"] >= start).to_numpy())
    at = (training_set[KEYS].iloc[window].assign(_row=window)   # the window's keys first: one copy of the rows
          .merge(train_parts, on=KEYS, how="inner"))
    train_rows = training_set.iloc[at["_row"].to_numpy()].reset_index(drop=True).assign(part=at["part"].to_numpy())
    if train_rows.empty:
        raise ValueError(f"no training example in the window starting {start}: raise train.window_fraction")
    encoder = Encoder.fit(train_rows, manifest["n_interests"], history_length=cfg.transform.history_length,
                          top_interests=cfg.transform.top_interests,
                          extra_pin_ids=None if table is None else table.pin_ids,
                          user_ids=None if table is None else table.user_ids,
                          pin_interest=training_set.drop_duplicates("pin_id").set_index("pin_id")["interest_id"])
    model = build_model(encoder, tc, None if table is None else table.aligned(encoder.pin_ids, encoder.user_ids))
    if init is not None:
        log.info("warm start from %s: %s", init["model_version"], warm_start(model, encoder, init))
        if model.pin_tower.prior is not None:   # the previous model's weight: this one trains without, then chooses
            model.pin_tower.set_prior(0.0)
    scorer = TwoTowerScorer(cfg, model, encoder, training_set, split, manifest["feature_services"]["pin"])
    scorer.fetch("valid")
    checked = split.valid_sample(tc.valid_users, tc.seed)   # the users validation scores (every one by default)

    def validate(_model: TwoTower) -> float:
        k = tc.valid_k
        return evaluate(scorer.prepare("valid"), checked, ks=(k,), on="valid", curve_k=k, ndcg_k=10,
                        interest_k=k)[f"recall@{k}"]

    log.info("two-tower fit on %s examples from %s%s; validation on %s users", f"{len(train_rows):,}", start,
             f" with pre-trained table {table.table_id}" if table is not None else "",
             f"{int((np.diff(checked.valid.indptr) > 0).sum()):,}")
    hides = training_set[training_set["label"] == 0] if "label" in training_set.columns else None
    result = train_model(model, encoder, train_rows, tc, validate=validate, hides=hides)
    log.info("two-tower fit: best epoch %s, %.1fs to best, %.0f examples/s", result.best_epoch,
             result.seconds_to_best, result.examples_per_s)
    info = None if table is None else {"table_id": table.table_id, "method": table.method, "dim": table.dim,
                                       "window_start": table.window_start, "window_end": table.window_end}
    refit = None
    if model.user_tower.blend_dim is not None:
        if tc.blend_table == "refit":
            refit = blend_tables or refit_tables(cfg, split, manifest["snapshot_id"], table)
            model.set_blend_tables(refit["train"].aligned(encoder.pin_ids, encoder.user_ids))
        result.blend = (kept_blend(model, init) if keep_weights else None) or choose_blend(model, scorer, checked,
                                                                                           tc.valid_k)
    if model.pin_tower.prior is not None:   # on validation, with the blend table validation is scored with
        result.prior = (kept_prior(model, init) if keep_weights else None) or choose_prior(model, scorer, checked,
                                                                                           tc.valid_k)
    if refit is not None:
        model.set_blend_tables(refit["valid"].aligned(encoder.pin_ids, encoder.user_ids))
        info["blend_table"] = {"table_id": refit["valid"].table_id, "window_start": refit["valid"].window_start,
                               "window_end": refit["valid"].window_end,
                               "validation_table_id": refit["train"].table_id,
                               "validation_table_until": refit["train"].meta.get("until")}
    return Trained(model, encoder, result, scorer, window_start=start.isoformat(), pretrained=info)


def train(cfg: Config, init_from: Path | None = None, keep_weights: bool = False,
          loaded: tuple[pd.DataFrame, Split, dict[str, Any]] | None = None, test: bool = True) -> dict[str, Any]:
    """The ``retrieval train`` stage: fit on the live training set, evaluate on test, save the checkpoint.
    Under torchrun every rank trains; rank 0 alone evaluates and writes. ``init_from``: a checkpoint to
    warm-start from (``retrieval retrain`` with ``retrain.warm_start``), ``keep_weights``: and keep its blend and
    prior weights (``retrain.keep_live_weights``); ``loaded``: ``load_split(cfg, features="fit")`` already read
    (a retrain cycle reads it once for training and the gate); ``test`` False: no test evaluation (empty
    ``metrics``: a retrain cycle's gate evaluates its candidate, ``retrain.test_evaluation``)."""
    rank, world = join_process_group()
    try:
        ts, split, manifest = loaded or load_split(cfg, features="fit")
        init = load_checkpoint(init_from)[2] if init_from is not None else None
        trained = fit(cfg, ts, split, manifest, init=init, keep_weights=keep_weights)
        if rank != 0:
            return {"rank": rank, "world_size": world, "wrote": None}
        result = evaluate(trained.scorer.prepare("test"), split, on="test") if test else {}
        version = f"tt-{manifest['snapshot_id']}-{datetime.now(UTC):%Y%m%d-%H%M%S}"
        payload = {
            "config": asdict(cfg.train),
            "encoder": trained.encoder.state(),
            "model": trained.model.state_dict(),
            "fit": {**asdict(trained.result), "window_start": trained.window_start},
            "pretrained": trained.pretrained,
            "model_version": version,
            "project_version": __version__,
            "feature_services": manifest["feature_services"],
            "interest_ids": manifest["interest_ids"],
            "snapshot_id": manifest["snapshot_id"],
            "as_of": manifest["as_of"],
            "metrics": {k: v for k, v in result.items() if not isinstance(v, (list, dict))},
            "warm_start": None if init is None else init["model_version"],
        }
        path = cfg.data_path / "models" / version / "model.pt"
        save_checkpoint(payload, path)
        log.info("checkpoint %s", path)
        fit_summary = {k: v for k, v in payload["fit"].items() if k != "history"}
        return {"model_version": version, "checkpoint": str(path), "test": payload["metrics"], "fit": fit_summary}
    finally:
        if world > 1:
            dist.destroy_process_group()
