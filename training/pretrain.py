"""Stage: pre-trained ID embeddings (``retrieval pretrain``).

The data: every positive engagement of every surface (dbt mart ``fct_pretrain_engagements``), no positive
downsampling, inside the window that ends where the two-tower's training window starts
(``Split.window_start(train.window_fraction)``) and, per user, before their first held-out interaction of the
evaluation split (``Split.cutoffs``): nothing a model is later evaluated on reaches the table.

Three methods (``pretrain.method``), all giving a history-side pin table P, a candidate-side pin table Q and a user
table U, used as ``u = Σ_r exp(-r/recency) · P[h_r]`` (the user's history, newest first) against ``Q[pin]``:

- ``ridge_svd`` (default): the low-rank ridge item-item model. The binary (users × pins) window matrix, each pin's
  column scaled by its engagements^-β, is factorised by a truncated sparse SVD (ARPACK) at rank ``pretrain.dim``;
  P = Q = V diag(√(s² / (s² + λ))). Memory O(engagements + pins × dim), time O(engagements × dim) per iteration:
  the default because it scales with the catalog, and on ML-100k and the synthetic data it matched or beat
  ``ease_svd`` on validation.
- ``contrastive``: P, Q and U trained with an in-batch softmax (logQ-corrected by the pins' frequencies in the
  window, accidental hits masked): every engagement is predicted from the recency-pooled P of the user's other
  window engagements (set completion), and from U[user]. Early stopping on the newest tenth of the window.
- ``ease_svd``: EASE's item-item matrix B on the window (λ = ``pretrain.l2``), factorised
  B ≈ (U_B √S)(V_B √S)ᵀ at rank ``pretrain.dim``: P = U_B √S, Q = V_B √S; U = each user's pooled P. It inverts a
  dense pins × pins matrix (O(pins²) memory, O(pins³) time), so it refuses, before allocating, a window whose
  estimated working set exceeds ``pretrain.max_dense_gib``.

The table is saved under ``<data_dir>/pretrained/<table id>/`` with its window; ``retrieval train`` takes the
newest table that ends by its own training window's start (``training.model.pretrained.latest_usable``). With
``train.blend_table = 'refit'`` training also refits the same method on later windows (``WINDOWS``) for the blended
subspace only (``training.train.refit_tables``); those live in the checkpoint, not under pretrained/.
"""

from __future__ import annotations

import logging
import math
import time
from datetime import UTC, datetime
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from training.config import Config, PretrainConfig
from training.data.snapshot import load_live
from training.evaluation.baselines import CatalogTooLarge, ease_weights
from training.evaluation.split import Split, load_split
from training.model.pretrained import PretrainedTable, recency_weights

log = logging.getLogger(__name__)

EVENTS_TABLE = "fct_pretrain_engagements"


def pretrained_root(cfg: Config):
    return cfg.data_path / "pretrained"


def window_events(cfg: Config, split: Split, end: pd.Timestamp,
                  held_out: tuple[str, ...] = ("valid", "test")) -> pd.DataFrame:
    """The pre-training engagements: user_id, pin_id, event_timestamp, sorted by user then time; before ``end``
    and before each user's first interaction of the ``held_out`` parts."""
    snap = load_live(cfg)
    ev = pd.read_parquet(snap.table(EVENTS_TABLE), columns=["user_id", "pin_id", "event_timestamp"])
    keep = (ev["event_timestamp"] < end).to_numpy() & split.before_cutoffs(ev, held_out)
    ev = ev[keep].sort_values(["user_id", "event_timestamp", "pin_id"], kind="stable").reset_index(drop=True)
    if ev.empty:
        raise ValueError(f"no engagement before {end} to pre-train on: lower train.window_fraction")
    return ev


def pool_users(ev: pd.DataFrame, pin_rows: np.ndarray, context: np.ndarray, length: int,
               scale: float) -> tuple[np.ndarray, np.ndarray]:
    """(user ids, (n_users, k) Σ_r w_r P[h_r] over each user's newest ``length`` window engagements)."""
    last = ev.groupby("user_id", sort=True).tail(length)
    rank = last.groupby("user_id").cumcount(ascending=False).to_numpy()
    w = recency_weights(length, scale)[rank]
    user_ids, user_idx = np.unique(last["user_id"].to_numpy(np.int64), return_inverse=True)
    out = np.zeros((len(user_ids), context.shape[1]), dtype=np.float32)
    np.add.at(out, user_idx, w[:, None] * context[pin_rows[last.index.to_numpy()]])
    return user_ids, out


def dense_bytes(n_pins: int) -> int:
    """What ``ease_weights`` holds at once for ``n_pins`` pins: the Gram matrix, its inverse and B, float64."""
    return 3 * 8 * n_pins * n_pins


def ease_svd(ev: pd.DataFrame, pc: PretrainConfig, length: int) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    from scipy.sparse.linalg import svds

    n_pins = int(ev["pin_id"].nunique())
    need = dense_bytes(n_pins)
    if need > pc.max_dense_gib * 2**30:
        raise CatalogTooLarge(
            f"pretrain.method ease_svd inverts a dense pins × pins matrix: {n_pins:,} pins in the window need "
            f"{need / 2**30:.1f} GiB, over pretrain.max_dense_gib = {pc.max_dense_gib:g}; use "
            "--pretrain.method ridge_svd (memory grows with engagements + pins × dim) or raise the limit")
    pin_ids, pin_rows, x = engagement_matrix(ev)
    b = ease_weights(x, pc.l2)
    k = min(pc.dim, len(pin_ids) - 1)
    u, s, vt = svds(b, k=k, rng=np.random.default_rng(pc.seed))   # ARPACK's start vector: reproducible
    order = np.argsort(-s)
    u, s, vt = u[:, order], s[order], vt[order]
    context = np.zeros((len(pin_ids), pc.dim), np.float32)
    target = np.zeros((len(pin_ids), pc.dim), np.float32)
    context[:, :k] = u * np.sqrt(s)
    target[:, :k] = vt.T * np.sqrt(s)
    user_ids, users = pool_users(ev, pin_rows, context, length, pc.recency)
    return ({"pin_ids": pin_ids, "context": context, "target": target, "user_ids": user_ids, "users": users},
            {"singular_values_top5": s[:5].round(4).tolist()})


def engagement_matrix(ev: pd.DataFrame) -> tuple[np.ndarray, np.ndarray, Any]:
    """(pin ids, each event's pin row, the binary (users × pins) CSR of the window) — nnz-sized."""
    import scipy.sparse as sp

    pin_ids, pin_rows = np.unique(ev["pin_id"].to_numpy(np.int64), return_inverse=True)
    _, user_rows = np.unique(ev["user_id"].to_numpy(np.int64), return_inverse=True)
    x = sp.csr_matrix((np.ones(len(ev), np.float32), (user_rows, pin_rows)),
                      shape=(int(user_rows.max()) + 1, len(pin_ids)))
    x.data[:] = 1.0
    return pin_ids, pin_rows, x


def ridge_svd(ev: pd.DataFrame, pc: PretrainConfig, length: int) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """The low-rank ridge item-item model: with X̃ = X·diag(n_j^-β) (n_j = pin j's window engagements, β =
    ``pretrain.pop_exponent``) and its rank-``dim`` truncated SVD X̃ ≈ U S Vᵀ, the ridge regression of X̃ on itself
    restricted to that subspace is B = V diag(s² / (s² + λ)) Vᵀ; P = Q = V diag(√(s² / (s² + λ))), with
    λ = ``pretrain.ridge`` × the mean of the kept s² (relative, so one setting carries across catalog sizes).
    Memory O(nnz + pins · dim), time O(nnz · dim) per Lanczos step: nothing pins × pins is formed."""
    import scipy.sparse as sp
    from scipy.sparse.linalg import svds

    pin_ids, pin_rows, x = engagement_matrix(ev)
    counts = np.asarray(x.sum(axis=0)).ravel()
    if pc.pop_exponent:
        x = x @ sp.diags(np.power(np.maximum(counts, 1.0), -pc.pop_exponent).astype(np.float32), format="csr")
    k = min(pc.dim, min(x.shape) - 1)
    v0 = np.random.default_rng(pc.seed).standard_normal(min(x.shape))
    _, s, vt = svds(x, k=k, v0=v0)
    order = np.argsort(-s)
    s, vt = s[order], vt[order]
    lam = pc.ridge * float(np.mean(s ** 2))
    shrink = np.sqrt(s ** 2 / (s ** 2 + lam))
    context = np.zeros((len(pin_ids), pc.dim), np.float32)
    context[:, :k] = vt.T * shrink
    user_ids, users = pool_users(ev, pin_rows, context, length, pc.recency)
    return ({"pin_ids": pin_ids, "context": context, "target": context.copy(), "user_ids": user_ids,
             "users": users}, {"singular_values_top5": s[:5].round(4).tolist(), "ridge_lambda": round(lam, 4)})


def contrastive(ev: pd.DataFrame, pc: PretrainConfig, length: int,
                threads: int) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """In-batch softmax over pins for every engagement of the window, predicted from the user's other window
    engagements (their newest ``length``, recency-pooled through P; the target itself left out) and from U[user]:
    set completion, the way the towers then read a history."""
    torch.set_num_threads(threads)
    gen = torch.Generator().manual_seed(pc.seed)
    pin_ids, pin_rows = np.unique(ev["pin_id"].to_numpy(np.int64), return_inverse=True)
    user_ids, user_rows = np.unique(ev["user_id"].to_numpy(np.int64), return_inverse=True)
    n, n_pins = len(ev), len(pin_ids)
    # each user's newest `length` window engagements (ev is sorted by user, then time), newest first, +1 (0 = pad)
    newest = ev.assign(_pin=pin_rows + 1, _user=user_rows).groupby("_user", sort=True).tail(length)
    rank = newest.groupby("_user").cumcount(ascending=False).to_numpy()
    H = np.zeros((len(user_ids), length), dtype=np.int64)
    H[newest["_user"].to_numpy(), rank] = newest["_pin"].to_numpy()
    H = torch.from_numpy(H)
    order = np.argsort(ev["event_timestamp"].to_numpy(), kind="stable")
    n_valid = max(1, n // 10) if n >= 50 else 0
    valid_idx, train_idx = order[n - n_valid:], order[: n - n_valid]
    counts = np.bincount(pin_rows[train_idx], minlength=n_pins).astype(np.float64) + 1.0
    log_q = torch.from_numpy(np.log(pc.batch_size * counts / counts.sum())).float()
    w = torch.from_numpy(recency_weights(length, pc.recency))
    P = torch.nn.Embedding(n_pins + 1, pc.dim, padding_idx=0)
    Q = torch.nn.Embedding(n_pins, pc.dim)
    U = torch.nn.Embedding(len(user_ids), pc.dim)
    for table in (P, Q, U):
        torch.nn.init.normal_(table.weight, std=0.05)
    with torch.no_grad():
        P.weight[0].zero_()
    opt = torch.optim.Adam([*P.parameters(), *Q.parameters(), *U.parameters()], lr=pc.lr)
    J, UU = torch.from_numpy(pin_rows.astype(np.int64)), torch.from_numpy(user_rows.astype(np.int64))

    def pooled(rows: torch.Tensor) -> torch.Tensor:
        h = H[UU[rows]]                                                      # (B, L)
        keep = (h != J[rows, None] + 1).float() * w[None, :]                 # the target leaves its own context
        return (P(h) * keep.unsqueeze(-1)).sum(1)                            # (B, k)

    def valid_recall(k: int = 50) -> float:
        if not n_valid:
            return math.nan
        rows = torch.from_numpy(valid_idx)
        with torch.no_grad():
            top = (pooled(rows) @ Q.weight.T).topk(min(k, n_pins), dim=1).indices
        return float((top == J[rows, None]).any(1).float().mean())

    best = (-math.inf, 0, None)
    history = []
    t0 = time.perf_counter()
    for epoch in range(1, pc.epochs + 1):
        perm = torch.from_numpy(train_idx)[torch.randperm(len(train_idx), generator=gen)]
        total = 0.0
        steps = max(1, len(perm) // pc.batch_size)
        for step in range(steps):
            rows = perm[step * pc.batch_size:(step + 1) * pc.batch_size]
            target = J[rows]
            q = Q(target)                                                    # (B, k)
            same = target[:, None] == target[None, :]
            same.fill_diagonal_(False)
            loss = 0.0
            for query in (pooled(rows), U(UU[rows])):
                logits = (query @ q.T) / pc.temperature - log_q[target][None, :]
                logits = logits.masked_fill(same, float("-inf"))
                loss = loss + F.cross_entropy(logits, torch.arange(len(rows)))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            with torch.no_grad():
                P.weight[0].zero_()
            total += float(loss.detach())
        recall = valid_recall()
        history.append({"epoch": epoch, "loss": total / steps, "valid_recall@50": recall})
        log.info("pretrain epoch %d loss %.4f valid held-out engagement recall@50 %.4f", epoch, total / steps, recall)
        if recall > best[0]:
            best = (recall, epoch, [t.detach().clone() for t in (P.weight, Q.weight, U.weight)])
        elif epoch - best[1] >= 3:
            break
    p_w, q_w, u_w = best[2] if best[2] is not None else (P.weight, Q.weight, U.weight)
    tables = {"pin_ids": pin_ids, "context": p_w[1:].numpy().copy(), "target": q_w.numpy().copy(),
              "user_ids": user_ids, "users": u_w.numpy().copy()}
    return tables, {"best_epoch": best[1], "valid_recall@50": best[0], "epochs_run": len(history),
                    "seconds": round(time.perf_counter() - t0, 2), "history": history}


CALIBRATION_BLOCK_BYTES = 128 << 20
"""Largest users × pins score block ``calibrated`` holds at once (never the whole users × pins matrix)."""


def calibrated(tables: dict[str, np.ndarray], ev: pd.DataFrame, length: int,
               scale: float) -> tuple[dict[str, np.ndarray], float]:
    """The tables scaled (P, Q and U alike) so that a user's best pin scores 1 on average: the towers' softmax
    temperature then means the same whatever the method or the data."""
    pin_rows = np.searchsorted(tables["pin_ids"], ev["pin_id"].to_numpy(np.int64))
    _, pooled = pool_users(ev, pin_rows, tables["context"], length, scale)
    target = tables["target"]
    block = max(1, CALIBRATION_BLOCK_BYTES // (4 * max(len(target), 1)))   # users scored at once: bounded memory
    best = np.concatenate([(pooled[i:i + block] @ target.T).max(axis=1) for i in range(0, len(pooled), block)])
    c = float(np.mean(best[best > 0])) if (best > 0).any() else 1.0
    f = 1.0 / np.sqrt(c)
    return {**tables, **{k: (tables[k] * f).astype(np.float32) for k in ("context", "target", "users")}}, c


WINDOWS = ("window", "train", "horizon", "valid")
"""Where a table's data ends (``pretrain(until=...)``): 'window', at the two-tower's training window start and
before each user's held-out parts (the table the towers read); 'train', after the last train interaction and before
each user's held-out parts (the overlap ablation's table, and the blend table of the validation figure with
``train.blend_validation = 'adjacent'``); 'horizon', as 'train' on ``Split.horizon_matched()`` (each user's data ends
round((t - v) / 2) rows before their validation part: the blend table of the validation figure by default, as far
behind the validation targets as the 'valid' table is behind test's); 'valid', after the last validation
interaction and before each user's test part (the blend table of the test evaluation and of the released model:
refit on train + validation, as the baselines are)."""


def pretrain(cfg: Config, split: Split, snapshot_id: str, until: str = "window") -> PretrainedTable:
    """A table for ``split`` on the data before ``until`` (``WINDOWS``)."""
    if until not in WINDOWS:
        raise ValueError(f"pretrain: until must be one of {WINDOWS}, got {until!r}")
    pc = cfg.pretrain
    if until == "horizon":
        split = split.horizon_matched()
    parts = {"window": ("train",), "train": ("train",), "horizon": ("train",), "valid": ("train", "valid")}[until]
    frame = split.frame[split.frame["part"].isin(parts)]
    end = (split.window_start(cfg.train.window_fraction) if until == "window"
           else frame["event_timestamp"].max() + pd.Timedelta(microseconds=1))
    held_out = ("test",) if until == "valid" else ("valid", "test")
    t0 = time.perf_counter()
    ev = window_events(cfg, split, end, held_out)
    length = cfg.transform.history_length
    if pc.method == "ease_svd":
        tables, info = ease_svd(ev, pc, length)
    elif pc.method == "ridge_svd":
        tables, info = ridge_svd(ev, pc, length)
    else:
        tables, info = contrastive(ev, pc, length, cfg.train.threads)
    tables, info["score_scale"] = calibrated(tables, ev, length, pc.recency)
    created = datetime.now(UTC)
    start = ev["event_timestamp"].min()
    table_id = f"{pc.method}-{snapshot_id}-{pd.Timestamp(end):%Y%m%dT%H%M%S}-{created:%Y%m%d%H%M%S%f}"
    meta = {"config": vars(pc), "snapshot_id": snapshot_id, "events": len(ev), "until": until,
            "created_at": created.isoformat(), "seconds": round(time.perf_counter() - t0, 2), **info}
    table = PretrainedTable(table_id=table_id, method=pc.method, window_start=pd.Timestamp(start).isoformat(),
                            window_end=pd.Timestamp(end).isoformat(), meta=meta, **tables)
    log.info("pre-trained %s table on %s engagements in [%s, %s): %d pins, %d users (%.1fs)", pc.method,
             f"{len(ev):,}", table.window_start, table.window_end, len(table.pin_ids), len(table.user_ids),
             meta["seconds"])
    return table


def pretrain_stage(cfg: Config) -> dict[str, Any]:
    """``retrieval pretrain``: a table for the live training set's split, saved under <data_dir>/pretrained."""
    _, split, manifest = load_split(cfg, features=False)
    table = pretrain(cfg, split, manifest["snapshot_id"])
    folder = table.save(pretrained_root(cfg))
    summary = {k: v for k, v in table.manifest().items() if k not in ("history", "config")}
    return {"table": str(folder), **summary}
