"""A trained two-tower model behind the harness's ``Scorer`` protocol.

Inputs come only from the Feast training set: a user is represented by the features of their first held-out
interaction (history strictly before it), and candidates by pin features fetched through the pin feature
service at the pin index's refreshes (``train.index_refresh_days``), so nothing from the evaluated period leaks
in. Each user is scored against the latest refresh at or before their cut-off.
"""

from __future__ import annotations

import weakref
from collections import OrderedDict
from typing import Literal

import numpy as np
import pandas as pd
import torch

from training.config import Config
from training.evaluation.split import KEYS, Split
from training.io import release_memory
from training.model.encoding import PIN_IMPRESSION_RATE, Encoder, take
from training.model.towers import run_tower
from training.model.two_tower import TwoTower

_RAW: dict[int, dict[tuple[str, pd.Timestamp], pd.DataFrame]] = {}
"""Candidates' raw feature rows per live split (by the id of its interaction frame, dropped with it, so the views of
one split, ``Split.test_since`` and ``Split.valid_sample``, share them): (pin feature service, refresh time) -> rows
in ``split.items`` order."""
PIN_BATCH = 8192
"""Rows per pin-tower call when embedding the candidates of every refresh. Cache-bound: on a 2-core AMD EPYC (stop 32,
ML-100k's 283,655 distinct validation rows, median of 10) 8,192 took 0.77 s, 4,096 0.88 s, 32,768 1.18 s; an older
Xeon had measured 32,768 1.8× faster than 4,096."""
SNAPSHOT_BYTES = 1 << 30
"""Most bytes of candidate vectors held at once (``PinSnapshots``). When every refresh's vectors fit (ML-100k and
the synthetic default: 150–210 MB), they are computed up front, each distinct input row once; otherwise refreshes
are embedded on first use and the least recently used dropped, the harness ranking users in refresh order so that
each is embedded once per evaluation (30,000 users over 64,300 candidates validate at 106 refreshes: 4 GB)."""


class PinSnapshots:
    """The candidates' vectors at each index refresh, indexed like a (T, n_items, D) array by ``best_of``.
    ``np.asarray(snapshots)`` stacks them all (diagnostics and the modes ablation)."""

    def __init__(self, tower: torch.nn.Module, inputs: list[dict[str, torch.Tensor]], n_items: int, dim: int,
                 max_bytes: int = SNAPSHOT_BYTES):
        self.tower, self.inputs = tower, inputs
        self.shape = (len(inputs), n_items, dim)
        self.max_kept = max(2, max_bytes // max(1, 4 * n_items * dim))
        self._kept: OrderedDict[int, np.ndarray] = OrderedDict()
        self._state = _state_of(tower)
        self.embedded_rows = 0
        """Input rows run through the tower so far."""
        if len(inputs) <= self.max_kept:
            self._embed_all()

    def _embed_all(self) -> None:
        """Every refresh at once, each distinct input row once (a pin whose features did not change between two
        refreshes is embedded once)."""
        stacked = {name: torch.cat([x[name] for x in self.inputs]) for name in self.inputs[0]}
        raw = np.concatenate([v.reshape(len(v), -1).numpy().view(np.uint8).reshape(len(v), -1)
                              for v in stacked.values()], axis=1)
        _, first, inverse = np.unique(raw.view(np.dtype((np.void, raw.shape[1]))).ravel(), return_index=True,
                                      return_inverse=True)
        vectors = self._run(take(stacked, torch.from_numpy(first)))
        every = vectors[inverse.ravel()].reshape(self.shape[0], self.shape[1], -1)
        for t in range(self.shape[0]):
            self._kept[t] = every[t]

    def _run(self, x: dict[str, torch.Tensor]) -> np.ndarray:
        if _state_of(self.tower) != self._state:
            raise RuntimeError("the pin tower changed after prepare(): prepare again before scoring")
        was_training = self.tower.training
        self.tower.eval()
        try:
            vectors = run_tower(self.tower, x, batch=PIN_BATCH)
        finally:
            self.tower.train(was_training)
        self.embedded_rows += len(vectors)
        return vectors

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, t: int | np.integer) -> np.ndarray:
        t = int(t)
        if t in self._kept:
            self._kept.move_to_end(t)
            return self._kept[t]
        vectors = self._run(self.inputs[t])
        self._kept[t] = vectors
        while len(self._kept) > self.max_kept:
            self._kept.popitem(last=False)
        return vectors

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        out = np.stack([self[t] for t in range(len(self))])
        return out if dtype is None else out.astype(dtype)


class TwoTowerScorer:
    """Scores a split's candidates with a trained model. ``prepare(on)`` embeds the users and candidates for an
    evaluation phase ('valid' or 'test'); ``fit`` does nothing (training is ``training.train.fit``)."""

    def __init__(self, cfg: Config, model: TwoTower, encoder: Encoder, training_set: pd.DataFrame, split: Split,
                 pin_service: str):
        self.cfg = cfg
        self.model = model
        self.encoder = encoder
        self.training_set = training_set
        self.split = split
        self.pin_service = pin_service
        self._pin_cache: dict[pd.Timestamp, dict[str, torch.Tensor]] = {}
        self._user_vectors = self._user_bucket = self._pin_vectors = self._prior_rates = None

    def fit(self, split: Split) -> None:
        if split is not self.split:
            raise ValueError("a TwoTowerScorer scores the split its model was trained on")

    def score(self, user_idx: np.ndarray) -> np.ndarray:
        """A pin's score is its best inner product with any of the user's embeddings (one, or up to K)."""
        return best_of(self._user_vectors[user_idx], self._user_bucket[user_idx], self._pin_vectors)

    def prepare(self, on: Literal["valid", "test"]) -> TwoTowerScorer:
        """Embed every evaluable user at their cut-off (first ``on`` interaction) and the candidates at every index
        refresh some user is scored at."""
        self.model.eval()
        split = self.split
        rows = self.cutoff_rows(on)
        users = run_tower(self.model.user_tower, self.encoder.users(rows))
        if users.ndim == 2:
            users = users[:, None, :]                            # (n, K, D): K = 1 for one embedding
        self._user_vectors = np.zeros((split.n_users, *users.shape[1:]), dtype=np.float32)
        self._user_bucket = np.zeros(split.n_users, dtype=np.int64)
        self._user_vectors[rows["user_idx"].to_numpy()] = users
        cutoffs = rows["event_timestamp"]
        times, self._user_bucket[rows["user_idx"].to_numpy()] = time_points(cutoffs,
                                                                            self.cfg.train.index_refresh_days)
        self._fetch(times)
        inputs = [self._pin_cache[t] for t in times]
        dim = run_tower(self.model.pin_tower, take(inputs[0], torch.arange(1))).shape[1]
        self._pin_vectors = PinSnapshots(self.model.pin_tower, inputs, len(split.items), dim)   # (T, n_items, D)
        self._prior_rates = None
        return self

    def order(self, user_idx: np.ndarray) -> np.ndarray:
        """Positions of ``user_idx`` in refresh order (after ``prepare``): the harness ranks users in this order, so
        each refresh's candidates are embedded once even when they do not all fit in ``SNAPSHOT_BYTES``."""
        return np.argsort(self._user_bucket[user_idx], kind="stable")

    def cutoff_rows(self, on: Literal["valid", "test"]) -> pd.DataFrame:
        """Each evaluable user's training-set row at their first ``on`` interaction (its point-in-time features),
        with ``user_idx``: what the user tower reads for them."""
        split = self.split
        first = (split.frame[split.frame["part"] == on].sort_values(["event_timestamp", "pin_id"])
                 .drop_duplicates("user_id"))
        return first[KEYS + ["user_idx"]].merge(self.training_set, on=KEYS, how="left")

    @property
    def pin_vectors(self) -> PinSnapshots:
        """(T, n_items, D) candidate vectors at the index refreshes (after ``prepare``; embedded on first use)."""
        return self._pin_vectors

    @property
    def user_bucket(self) -> np.ndarray:
        """(n_users,) the pin snapshot each user is scored against (after ``prepare``)."""
        return self._user_bucket

    def with_prior(self, weight: float) -> _WithPrior:
        """A scorer over the vectors ``prepare`` computed, with the pin tower's popularity prior at ``weight``
        instead of the one it was prepared with, without running the towers again: the prior adds weight ×
        ``logit_unit`` × the pin's log impression rate (at the refresh) to the pin's bias coordinate, which each of
        a user's embeddings reads with the same coefficient (1, times the learned part's blend weight), so a pin's
        score moves by the same amount for all of them."""
        tower = self.model.pin_tower
        if tower.prior is None:
            raise ValueError("this pin tower has no popularity prior (train.popularity_prior and train.pin_bias)")
        learned = float(tower.blend[0]) if tower.blend_dim is not None else 1.0
        step = (float(weight) - float(tower.prior)) * tower.logit_unit * learned
        if self._prior_rates is None:   # (T, n_items), once per prepare for every weight tried
            self._prior_rates = np.stack([x["counts"][:, PIN_IMPRESSION_RATE].numpy()
                                          for x in self._pin_vectors.inputs])
        return _WithPrior(self, (step * self._prior_rates).astype(np.float32))

    def reweighted(self, split_dim: int, first: float, second: float) -> _Reweighted:
        """A scorer over the vectors ``prepare`` computed, with the coordinates before ``split_dim`` weighted by
        ``first`` and the rest by ``second`` (a blend of two subspaces, without running the towers again)."""
        return _Reweighted(self, split_dim, first, second)

    def fetch(self, on: Literal["valid", "test"]) -> None:
        """Read the candidates' features at every refresh an ``on`` user is scored at (``prepare`` does it when
        needed; ``training.train.fit`` calls it before the first epoch, so the seconds to the best checkpoint
        count training and validation, not this one-off read)."""
        self._fetch(time_points(self.cutoff_rows(on)["event_timestamp"], self.cfg.train.index_refresh_days)[0])

    def _fetch(self, times: list[pd.Timestamp]) -> None:
        """Pin-tower inputs of every candidate at each of ``times`` not read yet: the pin feature service (Feast
        offline) for all of them in one point-in-time join (chunked by ``features.candidate_chunk_rows``), encoded
        once per time and kept (the encoder does not change during a fit; every epoch's validation reuses them).
        The raw rows are shared by every scorer of the same split (or a view of it) and service in the process (a
        report trains many models on one split; a retrain cycle's gate scores two on the split its candidate was
        trained on)."""
        missing = [t for t in times if t not in self._pin_cache]
        if not missing:
            return
        shared = _shared_rows(self.split)
        unread = [t for t in missing if (self.pin_service, t) not in shared]
        if unread:
            from training.features.store import feature_store

            items = self.split.items
            entity = pd.DataFrame({"pin_id": np.tile(items, len(unread)),
                                   "event_timestamp": pd.DatetimeIndex(unread).repeat(len(items))})
            df = feature_store(self.cfg).historical(entity, self.pin_service,
                                                    chunk=self.cfg.features.candidate_chunk_rows)
            at = pd.to_datetime(df["event_timestamp"], utc=True)
            for t in unread:
                rows = df[(at == t).to_numpy()]
                if len(rows) != len(items):
                    raise RuntimeError(f"the pin feature service returned {len(rows)} rows at {t} for {len(items)} "
                                       "pins")
                shared[(self.pin_service, t)] = rows.set_index("pin_id").loc[items].reset_index()
            del df, at
        for t in missing:
            self._pin_cache[t] = self.encoder.pins(shared[(self.pin_service, t)])
        release_memory()


def _state_of(module: torch.nn.Module) -> list[tuple[int, int]]:
    """Identity and in-place version of every parameter and buffer: changes with any update of the weights."""
    return [(id(t), t._version) for t in [*module.parameters(), *module.buffers()]]   # noqa: SLF001


class _View:
    """A scorer over the vectors a ``TwoTowerScorer`` prepared: fitted and ordered as that scorer."""

    def __init__(self, base: TwoTowerScorer):
        self.base = base

    def fit(self, split: Split) -> None:
        self.base.fit(split)

    def order(self, user_idx: np.ndarray) -> np.ndarray:
        return self.base.order(user_idx)


class _Reweighted(_View):
    def __init__(self, base: TwoTowerScorer, split_dim: int, first: float, second: float):
        super().__init__(base)
        self.users = base._user_vectors.copy()                    # noqa: SLF001 - the same scorer's vectors
        self.users[..., :split_dim] *= first
        self.users[..., split_dim:] *= second
        self.pins = base._pin_vectors                             # noqa: SLF001

    def score(self, user_idx: np.ndarray) -> np.ndarray:
        return best_of(self.users[user_idx], self.base._user_bucket[user_idx], self.pins)   # noqa: SLF001


class _WithPrior(_View):
    def __init__(self, base: TwoTowerScorer, delta: np.ndarray):
        super().__init__(base)
        self.delta = delta

    def score(self, user_idx: np.ndarray) -> np.ndarray:
        out = self.base.score(user_idx)
        out += self.delta[self.base._user_bucket[user_idx]]      # noqa: SLF001 - the same scorer's buckets
        return out


def _shared_rows(split: Split) -> dict[tuple[str, pd.Timestamp], pd.DataFrame]:
    key = id(split.frame)
    if key not in _RAW:
        _RAW[key] = {}
        weakref.finalize(split.frame, _RAW.pop, key, None)
    return _RAW[key]


def time_points(cutoffs: pd.Series, refresh_days: int) -> tuple[list[pd.Timestamp], np.ndarray]:
    """The index refreshes some cut-off is scored at (sorted; refreshes at every ``refresh_days``-th UTC midnight
    since 1970-01-01), and each cut-off's refresh: the latest at or before it."""
    at = pd.to_datetime(cutoffs, utc=True)
    refresh = at.dt.floor(f"{int(refresh_days)}D")
    times = sorted(set(refresh))
    return times, np.searchsorted(pd.DatetimeIndex(times), pd.DatetimeIndex(refresh))


def best_of(users: np.ndarray, bucket: np.ndarray, pins: np.ndarray) -> np.ndarray:
    """(n, items): each pin's best inner product over a user's real embeddings. users (n, K, D), zero rows for
    the embeddings a user does not have; bucket (n,) the pin snapshot of each user; pins (T, items, D)."""
    real = np.abs(users).sum(-1) > 0                                  # (n, K)
    out = np.full((len(users), pins.shape[1]), -np.inf, dtype=np.float32)
    for t in np.unique(bucket):
        rows = bucket == t
        for k in range(users.shape[1]):
            s = users[rows, k] @ pins[t].T
            s[~real[rows, k]] = -np.inf
            out[rows] = np.maximum(out[rows], s)
    return out
