"""Non-neural baselines for the evaluation harness (``training.evaluation.harness``): every one is a ``Scorer``.

- ``Popularity``: global train interaction counts (the same list for everyone, minus their own items).
- ``ItemKNN``: item-item cosine similarity on the binary (user × item) train matrix; a user's score for
  item j is ``Σ_{i in user's train items} sim(i, j)``. With a neighbourhood size ``k`` every item keeps
  only its ``k`` most similar items (rows of the similarity matrix are pruned, as in Deshpande & Karypis'
  item-based top-N), tuned on validation.
- ``EASE``: Steck's embarrassingly shallow autoencoder (WWW 2019): the item-item matrix
  ``B = I - P·diag(1/diag(P))`` with ``P = (XᵀX + λI)⁻¹`` on the binary train matrix X, zero diagonal; a user's
  scores are ``x_u @ B``. With ``recency`` set, each of the user's train items enters ``x_u`` with weight
  ``exp(-r / recency)``, r = its rank from the user's newest interaction (0 = newest), instead of 1 (B is
  unchanged). λ and the recency scale are tuned on validation.
- ``SANSA``: Spišák et al.'s scalable EASE (RecSys 2023, the ``sansa`` package): a sparse approximate inverse
  of ``XᵀX + λI`` (incomplete Cholesky, then a sparse approximate inverse of its triangle) with a set weight
  density, so memory grows with that density × items², not items²; scored like EASE, from the binary or
  recency-weighted history. λ, the density (as neighbours per item) and the recency scale are tuned on
  validation. Optional (the ``sansa`` extra: scikit-sparse needs SuiteSparse's headers to build); the report
  skips it with one line when the package is missing.
- ``ImplicitALS``: the ``implicit`` library's CPU ALS (Hu, Koren & Volinsky) on confidences
  ``c = 1 + alpha · count`` (passed to implicit as the matrix of confidences with its own ``alpha`` at 1);
  scores are ``user_factors @ item_factors.T``, so the harness does the ranking and filtering; a user whose
  scoring history is shorter than their train rows (below) is re-solved from it (``recalculate_user``). Fixed
  ``random_state``; ``num_threads`` = 2 and BLAS limited to one thread (threadpoolctl) during fitting, as
  implicit recommends (the bench also sets OPENBLAS_NUM_THREADS=1).

Point-in-time scoring: every baseline fits on ``split.train`` but scores a user from their history
``Split.history_rows``, the train rows strictly before the user's first held-out interaction, as the towers'
point-in-time features do. Train rows at that very instant (ML-100k: a session's ratings share one second, and the
split orders them by a hash) stay training data; scored from them, EASE with a recency-weighted history reached
test R@50 .420 on ML-100k against .406 without them, information no served model has at request time.

Tuning protocol (``tune``): fit on ``split.train`` (train-proper), pick the hyperparameters with the best
validation recall@50, then set them on the scorer; the caller refits on ``split.merged()`` (train +
validation) before the test evaluation (``fit_tune_evaluate`` does all of it).
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import scipy.sparse as sp

from training.evaluation.harness import Scorer, evaluate
from training.evaluation.split import Split

log = logging.getLogger(__name__)

TUNE_METRIC = "recall@50"
DENSE_SIMILARITY_BYTES = 1 << 30
"""Largest full (k = None) item-item similarity matrix ItemKNN keeps dense."""
KNN_GRID: tuple[int | None, ...] = (None, 10, 20, 50, 100, 200, 400)
EASE_GRID: dict[str, Sequence[Any]] = {"l2": (50.0, 100.0, 200.0, 500.0, 1000.0, 2000.0),
                                       "recency": (None,)}
"""Plain EASE (unweighted history); add recency scales, e.g. (None, 10, 20, 50), for the recency-weighted one."""
EASE_MAX_ITEMS = 25_000
"""Largest catalogue EASE inverts densely (n_items² float32, twice)."""
SANSA_GRID: dict[str, Sequence[Any]] = {"l2": (5.0, 20.0, 100.0, 500.0), "neighbours": (100, 400),
                                        "recency": (None, 10.0, 20.0, 50.0)}
"""SANSA: λ, kept weights per item (density = neighbours / items) and the history's recency scale."""
SANSA_MAX_WEIGHTS = 20_000_000
"""Largest weight matrix (neighbours × items) the SANSA grid tries: its fit time grows with it (on 2 cores, 100
neighbours × 76k items took ~3 min, 400 × 76k over 15 min); larger grid values are dropped with a log line."""
ALS_GRID: dict[str, Sequence[Any]] = {
    "factors": (32, 64, 128),
    "regularization": (0.01, 0.1, 1.0),
    "alpha": (1.0, 10.0, 40.0),
    "iterations": (15, 30),
}


class _Unfitted(RuntimeError):
    pass


class Popularity:
    """Scores every item by its number of train interactions (rows of ``split.train``)."""

    def __init__(self) -> None:
        self.counts: np.ndarray | None = None

    def fit(self, split: Split) -> None:
        self.counts = np.asarray(split.train.sum(axis=0), dtype=np.float32).ravel()

    def score(self, user_idx: np.ndarray) -> np.ndarray:
        """(len(user_idx), n_items) float32: the same count row for every user."""
        if self.counts is None:
            raise _Unfitted("Popularity.fit first")
        return np.broadcast_to(self.counts, (len(user_idx), len(self.counts))).copy()


class ItemKNN:
    """Item-based collaborative filtering with cosine similarity on binary train interactions.

    ``sim(i, j) = |U_i ∩ U_j| / sqrt(|U_i| |U_j|)`` (U_i = users who engaged with i), ``sim(i, i) = 0``.
    With ``k`` set, row i keeps its ``k`` largest similarities. A user's score is
    ``x_u @ S`` with ``x_u`` the (n_items,) binary row of the user's scoring history.
    """

    def __init__(self, k: int | None = None) -> None:
        if k is not None and k < 1:
            raise ValueError(f"k must be >= 1 or None, got {k}")
        self.k = k
        self.x: sp.csr_matrix | None = None
        self.history: sp.csr_matrix | None = None
        self.sim: np.ndarray | sp.csr_matrix | None = None
        self._full: np.ndarray | None = None

    def fit(self, split: Split) -> None:
        self.x = sp.csr_matrix(split.train > 0, dtype=np.float32)
        self.history = sp.csr_matrix(split.history() > 0, dtype=np.float32)
        self._full = None
        self.sim = self._similarity(self.x, self.k)

    def set_k(self, k: int | None) -> None:
        """Change the neighbourhood size without recomputing the co-occurrences (after a k=None fit)."""
        if self.x is None:
            raise _Unfitted("ItemKNN.fit first")
        self.k = k
        self.sim = self._similarity(self.x, k)

    def score(self, user_idx: np.ndarray) -> np.ndarray:
        """(len(user_idx), n_items) float32 sums of similarities to each user's history items."""
        if self.history is None or self.sim is None:
            raise _Unfitted("ItemKNN.fit first")
        out = self.history[user_idx] @ self.sim
        return (out.toarray() if sp.issparse(out) else np.asarray(out)).astype(np.float32, copy=False)

    def _similarity(self, x: sp.csr_matrix, k: int | None) -> np.ndarray | sp.csr_matrix:
        """(n_items, n_items) cosine similarity, dense when k is None, else the row-pruned CSR."""
        n_items = x.shape[1]
        if self._full is None:
            if n_items * n_items * 4 > DENSE_SIMILARITY_BYTES:
                if k is None:
                    raise CatalogTooLarge(f"{n_items:,} items: the full similarity matrix is too large; set k")
                return _pruned_cosine_blocks(x, k)
            self._full = _cosine(x)
        if k is None or k >= n_items - 1:
            return self._full
        return _prune_rows(self._full, k)


class CatalogTooLarge(MemoryError, ValueError):
    """A method that cannot hold this catalog (a baseline, or the ``ease_svd`` pre-training), raised before anything
    large is allocated; the command line reports it as an error, the report skips that baseline with its message."""


class _GridTuned:
    """Parameters held in ``self.params`` and a grid search over them on validation (EASE, SANSA, ALS)."""

    name = ""
    params: dict[str, Any]

    def set_params(self, **params: Any) -> None:
        unknown = set(params) - set(self.params)
        if unknown:
            raise ValueError(f"unknown {self.name} parameters {sorted(unknown)}")
        self.params.update(params)

    def _grid_search(self, split: Split, grid: Mapping[str, Sequence[Any]]) -> list[dict[str, Any]]:
        """Every combination of ``grid`` fitted on train and scored on validation (``tune``); keeps the best."""
        configs = [dict(zip(grid, values, strict=True)) for values in itertools.product(*grid.values())]

        def setup(params: dict[str, Any]) -> Scorer:
            self.set_params(**params)
            return self

        records = tune(setup, split, configs)
        self.set_params(**records[0]["params"])
        return records


class EASE(_GridTuned):
    """Steck's EASE on binary train interactions, optionally with a recency-weighted history (see module doc)."""

    name = "EASE"

    def __init__(self, l2: float = 200.0, recency: float | None = None) -> None:
        self.params: dict[str, Any] = {"l2": float(l2), "recency": recency}
        self.b: np.ndarray | None = None
        self._fitted_l2: float | None = None
        self._split: Split | None = None
        self.x: sp.csr_matrix | None = None

    def fit(self, split: Split) -> None:
        n_items = split.n_items
        if n_items > EASE_MAX_ITEMS:
            raise CatalogTooLarge(f"EASE inverts a dense items × items matrix: {n_items:,} items is over "
                                  f"{EASE_MAX_ITEMS:,} (SANSA is the scalable EASE)")
        l2 = float(self.params["l2"])
        if self.b is None or self._split is not split or self._fitted_l2 != l2:   # B depends on λ and X only
            self.b = ease_weights(sp.csr_matrix(split.train > 0, dtype=np.float32), l2).astype(np.float32)
            self._fitted_l2, self._split = l2, split
        self.x = history_weights(split, self.params["recency"])

    def score(self, user_idx: np.ndarray) -> np.ndarray:
        """(len(user_idx), n_items) float32 ``x_u @ B``."""
        if self.x is None or self.b is None:
            raise _Unfitted("EASE.fit first")
        return np.asarray(self.x[user_idx] @ self.b, dtype=np.float32)

    def tune(self, split: Split, grid: Mapping[str, Sequence[Any]] | None = None) -> list[dict[str, Any]]:
        """Grid search of λ (and the recency scale) on validation recall@50; keeps the best parameters."""
        return self._grid_search(split, dict(EASE_GRID if grid is None else grid))


class SANSA(_GridTuned):
    """Scalable EASE (``sansa`` package) on binary train interactions, optionally with a recency-weighted history."""

    name = "SANSA"

    def __init__(self, l2: float = 100.0, neighbours: int = 200, recency: float | None = None) -> None:
        self.params: dict[str, Any] = {"l2": float(l2), "neighbours": int(neighbours), "recency": recency}
        self.weights: tuple[sp.csr_matrix, sp.csr_matrix] | None = None
        self._fitted: tuple[Any, ...] | None = None
        self._split: Split | None = None
        self.x: sp.csr_matrix | None = None

    def fit(self, split: Split) -> None:
        key = (self.params["l2"], self.params["neighbours"])
        if self.weights is None or self._split is not split or self._fitted != key:   # λ, density and X only
            import sansa

            logging.getLogger("sansa").setLevel(logging.ERROR)   # its factorisation-shift advice is not for users
            density = min(1.0, self.params["neighbours"] / max(split.n_items, 1))
            config = sansa.SANSAConfig(
                l2=float(self.params["l2"]), weight_matrix_density=density,
                gramian_factorizer_config=sansa.ICFGramianFactorizerConfig(),
                lower_triangle_inverter_config=sansa.UMRUnitLowerTriangleInverterConfig(scans=1, finetune_steps=5))
            model = sansa.SANSA(config)
            x = sp.csr_matrix(split.train > 0, dtype=np.float32)
            # sansa needs every item column non-empty; items without a train interaction score 0, as in EASE
            active = np.flatnonzero(np.diff(x.tocsc().indptr) > 0)
            model.fit(x[:, active].tocsr())
            pick = sp.csr_matrix((np.ones(len(active), np.float32), (active, np.arange(len(active)))),
                                 shape=(split.n_items, len(active)))
            w, w_r = model.weights
            self.weights = ((pick @ w).tocsr(), (w_r @ pick.T).tocsr())
            self._fitted, self._split = key, split
        self.x = history_weights(split, self.params["recency"])

    def score(self, user_idx: np.ndarray) -> np.ndarray:
        """(len(user_idx), n_items) float32 ``x_u @ Wᵀ @ W_r`` (SANSA's factorised B)."""
        if self.x is None or self.weights is None:
            raise _Unfitted("SANSA.fit first")
        latent = (self.x[user_idx] @ self.weights[0]).toarray()      # (users, items): dense, as the scores are
        return np.asarray((self.weights[1].T @ latent.T).T, dtype=np.float32)   # dense × sparse, no fill-in

    def tune(self, split: Split, grid: Mapping[str, Sequence[Any]] | None = None) -> list[dict[str, Any]]:
        """Grid search on validation recall@50 (``SANSA_GRID``); keeps the best parameters."""
        grid = dict(SANSA_GRID if grid is None else grid)
        fits = [n for n in grid["neighbours"] if n * split.n_items <= SANSA_MAX_WEIGHTS]
        if not fits:
            raise CatalogTooLarge(f"SANSA: even {min(grid['neighbours'])} neighbours × {split.n_items:,} items is over "
                                  f"{SANSA_MAX_WEIGHTS:,} weights (baselines.SANSA_MAX_WEIGHTS)")
        if len(fits) < len(grid["neighbours"]):
            log.info("SANSA: %s neighbours × %s items is over %s weights; tuning %s only",
                     [n for n in grid["neighbours"] if n not in fits], f"{split.n_items:,}", f"{SANSA_MAX_WEIGHTS:,}",
                     fits)
        grid["neighbours"] = fits
        return self._grid_search(split, grid)


def ease_weights(x: sp.csr_matrix, l2: float) -> np.ndarray:
    """EASE's closed-form item-item matrix of the binary (users, items) ``x``: ``B = -P / diag(P)``, zero diagonal,
    with ``P = (XᵀX + λI)⁻¹`` (float64). Shared by the baseline and the ``ease_svd`` pre-training."""
    gram = (x.T @ x).toarray().astype(np.float64)
    gram[np.diag_indices(gram.shape[0])] += l2
    p = np.linalg.inv(gram)
    b = -p / np.diag(p)[None, :]
    np.fill_diagonal(b, 0.0)
    return b


def history_weights(split: Split, recency: float | None) -> sp.csr_matrix:
    """(n_users, n_items) float32: 1 for every item of a user's scoring history (``Split.history_rows``), or, with
    ``recency``, ``exp(-r / recency)`` where r is the rank of the item's latest interaction there from the user's
    newest one (0 = newest; the split's order, so ties at equal timestamps follow its tie-break)."""
    binary = sp.csr_matrix(split.history() > 0, dtype=np.float32)
    if recency is None:
        return binary
    rows = split.history_rows[["user_idx", "item_idx"]]
    rows = rows.assign(rank=rows.groupby("user_idx").cumcount(ascending=False))   # 0 = the user's newest
    latest = rows.groupby(["user_idx", "item_idx"], sort=False)["rank"].min().reset_index()
    w = np.exp(-latest["rank"].to_numpy() / float(recency)).astype(np.float32)
    m = sp.coo_matrix((w, (latest["user_idx"].to_numpy(), latest["item_idx"].to_numpy())), shape=binary.shape)
    return m.tocsr()


class ImplicitALS(_GridTuned):
    """``implicit.cpu.als.AlternatingLeastSquares`` as a harness scorer (confidence ``1 + alpha · count``)."""

    name = "ALS"

    def __init__(
        self,
        factors: int = 64,
        regularization: float = 0.1,
        alpha: float = 10.0,
        iterations: int = 15,
        random_state: int = 42,
        num_threads: int = 2,
    ) -> None:
        self.params: dict[str, Any] = {
            "factors": factors,
            "regularization": regularization,
            "alpha": alpha,
            "iterations": iterations,
        }
        self.random_state = random_state
        self.num_threads = num_threads
        self.user_factors: np.ndarray | None = None
        self.item_factors: np.ndarray | None = None

    def fit(self, split: Split) -> None:
        from implicit.cpu.als import AlternatingLeastSquares
        from threadpoolctl import threadpool_limits

        conf = split.train.astype(np.float32, copy=True).tocsr()
        conf.data = 1.0 + float(self.params["alpha"]) * conf.data
        # implicit's own threads do the work; BLAS threads on top of them only contend.
        with threadpool_limits(1, "blas"):
            model = AlternatingLeastSquares(
                factors=int(self.params["factors"]),
                regularization=float(self.params["regularization"]),
                alpha=1.0,
                iterations=int(self.params["iterations"]),
                random_state=self.random_state,
                num_threads=self.num_threads,
                calculate_training_loss=False,
            )
            model.fit(conf, show_progress=False)
            # users whose scoring history lacks train rows (those at their first held-out instant) are re-solved
            # against the fitted item factors from that history alone, as a point-in-time model would see them
            history = split.history()
            changed = np.flatnonzero(np.asarray((split.train - history).sum(axis=1)).ravel() > 0)
            user_factors = np.array(model.user_factors, dtype=np.float32)
            if len(changed):
                rows = history[changed].astype(np.float32).tocsr()
                rows.data = 1.0 + float(self.params["alpha"]) * rows.data
                user_factors[changed] = model.recalculate_user(changed, rows)
        self.user_factors = user_factors
        self.item_factors = np.asarray(model.item_factors, dtype=np.float32)

    def score(self, user_idx: np.ndarray) -> np.ndarray:
        """(len(user_idx), n_items) float32 dot products of user and item factors."""
        if self.user_factors is None or self.item_factors is None:
            raise _Unfitted("ImplicitALS.fit first")
        return self.user_factors[user_idx] @ self.item_factors.T

    def tune(self, split: Split, grid: Mapping[str, Sequence[Any]] | None = None) -> list[dict[str, Any]]:
        """Grid search on validation recall@50 (fit on ``split.train``); keeps the best parameters.

        ``grid`` maps parameter names (factors, regularization, alpha, iterations) to candidate values
        (default ``ALS_GRID``, 54 fits). Returns one record per configuration (params, the validation
        metric, seconds), best first. Refit on ``split.merged()`` before evaluating on test.
        """
        return self._grid_search(split, dict(ALS_GRID if grid is None else grid))


def tune(
    setup: Callable[[dict[str, Any]], Scorer],
    split: Split,
    configs: Iterable[dict[str, Any]],
    metric: str = TUNE_METRIC,
) -> list[dict[str, Any]]:
    """Fit ``setup(params)`` on ``split.train`` for every config; rank them by validation ``metric``.

    Returns ``[{"params", metric, "seconds"}]`` sorted best first (ties keep the config order).
    """
    if split.is_merged:
        raise ValueError("tune needs the unmerged split (validation is the tuning target)")
    records = []
    for params in configs:
        t0 = time.perf_counter()
        scorer = setup(params)
        scorer.fit(split)
        res = evaluate(scorer, split, ks=(int(metric.split("@")[1]),), on="valid", curve_k=1, interest_k=1)
        records.append({"params": params, metric: res[metric], "seconds": round(time.perf_counter() - t0, 3)})
        log.info("tune %s: valid %s = %.4f (%.1fs)", params, metric, res[metric], records[-1]["seconds"])
    if not records:
        raise ValueError("no configuration to tune")
    return sorted(records, key=lambda r: -r[metric])


def tune_knn(knn: ItemKNN, split: Split, grid: Sequence[int | None] = KNN_GRID) -> list[dict[str, Any]]:
    """Pick ItemKNN's neighbourhood size on validation recall@50 (one co-occurrence computation). A catalog whose
    full similarity matrix is over ``DENSE_SIMILARITY_BYTES`` drops k = None from the grid and computes the
    pruned matrix once, at the largest k; each smaller k keeps the top of those rows (the same matrix as pruning
    the full one)."""
    if split.n_items * split.n_items * 4 > DENSE_SIMILARITY_BYTES:
        grid = [k for k in grid if k is not None]
        if not grid:
            raise CatalogTooLarge(f"{split.n_items:,} items: the full similarity matrix is too large; give k values")
        knn.k = max(grid)
        knn.fit(split)
        widest = knn.sim

        def setup_pruned(params: dict[str, Any]) -> Scorer:
            knn.sim = _prune_sparse_rows(widest, params["k"])
            return _Prefitted(knn)

        records = tune(setup_pruned, split, [{"k": k} for k in grid])
        knn.k = records[0]["params"]["k"]
        return records
    knn.k = None
    knn.fit(split)

    def setup(params: dict[str, Any]) -> Scorer:
        knn.set_k(params["k"])
        return _Prefitted(knn)

    records = tune(setup, split, [{"k": k} for k in grid])
    knn.k = records[0]["params"]["k"]
    return records


class _Prefitted:
    """Wraps a scorer whose fit already happened (``tune`` calls fit on every config)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def fit(self, split: Split) -> None:
        pass

    def score(self, user_idx: np.ndarray) -> np.ndarray:
        return self.inner.score(user_idx)


def fit_tune_evaluate(
    scorer: Scorer,
    split: Split,
    ks: Sequence[int] = (10, 50, 100),
    grid: Any = None,
    tuned: bool = True,
    per_user: bool = False,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Tune on validation (ItemKNN, EASE, SANSA, ImplicitALS when ``tuned``), refit on train + validation, evaluate
    on test.

    Returns the test results (plus ``fit_seconds``, ``tune_seconds`` and ``params`` when tuned) and the
    tuning records (empty when nothing was tuned).
    """
    records: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    if tuned and isinstance(scorer, (ImplicitALS, EASE, SANSA)):
        records = scorer.tune(split, grid)
    elif tuned and isinstance(scorer, ItemKNN):
        records = tune_knn(scorer, split, KNN_GRID if grid is None else grid)
    tune_seconds = time.perf_counter() - t0
    merged = split.merged()
    t0 = time.perf_counter()
    scorer.fit(merged)
    fit_seconds = time.perf_counter() - t0
    res = evaluate(scorer, merged, ks=ks, on="test", per_user=per_user)
    res["fit_seconds"] = round(fit_seconds, 3)
    if records:
        res["tune_seconds"] = round(tune_seconds, 3)
        res["params"] = records[0]["params"]
    return res, records


def _cosine(x: sp.csr_matrix) -> np.ndarray:
    """(n_items, n_items) float32 cosine similarity of the columns of the binary ``x``, zero diagonal."""
    co = (x.T @ x).toarray().astype(np.float32)
    norms = np.sqrt(np.diag(co)).astype(np.float32)
    norms[norms == 0] = 1.0
    co /= norms[:, None]
    co /= norms[None, :]
    np.fill_diagonal(co, 0.0)
    return co


def _prune_rows(sim: np.ndarray, k: int) -> sp.csr_matrix:
    """(n, n) CSR keeping the ``k`` largest entries of every row of the dense ``sim`` (ties by index)."""
    n = sim.shape[0]
    keep = np.argsort(-sim, axis=1, kind="stable")[:, :k]      # ties by index, whatever the matrix's shape
    vals = np.take_along_axis(sim, keep, axis=1)
    m = sp.csr_matrix((vals.ravel(), keep.ravel(), np.arange(0, n * k + 1, k)), shape=sim.shape)
    m.eliminate_zeros()
    m.sort_indices()
    return m


def _prune_sparse_rows(m: sp.csr_matrix, k: int) -> sp.csr_matrix:
    """The CSR ``m`` with each row's ``k`` largest entries kept (ties by column)."""
    rows, cols, vals = [], [], []
    for i in range(m.shape[0]):
        lo, hi = m.indptr[i], m.indptr[i + 1]
        if hi - lo > k:
            keep = lo + np.lexsort((m.indices[lo:hi], -m.data[lo:hi]))[:k]
        else:
            keep = np.arange(lo, hi)
        rows.append(np.full(len(keep), i))
        cols.append(m.indices[keep])
        vals.append(m.data[keep])
    out = sp.csr_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))), shape=m.shape)
    out.sort_indices()
    return out


def _pruned_cosine_blocks(x: sp.csr_matrix, k: int, block: int = 1024) -> sp.csr_matrix:
    """Row-pruned cosine similarity computed ``block`` rows at a time (for catalogues too big to hold dense)."""
    xt = x.T.tocsr()
    norms = np.sqrt(np.asarray(x.sum(axis=0)).ravel()).astype(np.float32)
    norms[norms == 0] = 1.0
    parts = []
    for start in range(0, x.shape[1], block):
        rows = np.arange(start, min(start + block, x.shape[1]))
        co = (xt[rows] @ x).toarray().astype(np.float32)
        co /= norms[rows][:, None]
        co /= norms[None, :]
        co[np.arange(len(rows)), rows] = 0.0
        parts.append(_prune_rows(co, min(k, x.shape[1] - 1)) if k < x.shape[1] - 1 else sp.csr_matrix(co))
    return sp.vstack(parts).tocsr()
