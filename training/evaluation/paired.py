"""Paired per-user comparisons of two scorers evaluated on the same users (``evaluate(..., per_user=True)``).

A verdict from means over seeds says little when there are one or two seeds (a large catalog) or when the
seeds share the data's noise: the users are the sample. ``paired_interval`` is the percentile bootstrap of the
mean per-user difference: users are resampled with replacement, the same users for both scorers, so what the two
have in common (a hard user is hard for both) cancels.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

BOOTSTRAP_SAMPLES = 2000
"""Bootstrap resamples of the users behind each interval."""


def align(a: Mapping[str, np.ndarray], b: Mapping[str, np.ndarray], metric: str) -> tuple[np.ndarray, np.ndarray]:
    """The two per-user arrays of ``metric`` on the users both evaluated, in one order (by user id)."""
    common, ia, ib = np.intersect1d(np.asarray(a["user_ids"]), np.asarray(b["user_ids"]), return_indices=True)
    if len(common) == 0:
        raise ValueError("the two evaluations share no user")
    return np.asarray(a[metric], np.float64)[ia], np.asarray(b[metric], np.float64)[ib]


def mean_over_runs(runs: Sequence[Mapping[str, np.ndarray]], metric: str) -> dict[str, np.ndarray]:
    """Per-user ``metric`` averaged over runs (seeds) on the users every run evaluated (``evaluate`` lists its users
    by ascending id)."""
    ids = np.asarray(runs[0]["user_ids"])
    for r in runs[1:]:
        ids = np.intersect1d(ids, np.asarray(r["user_ids"]))
    values = [np.asarray(r[metric], np.float64)[np.searchsorted(np.asarray(r["user_ids"]), ids)] for r in runs]
    return {"user_ids": ids, metric: np.mean(values, axis=0)}


def paired_interval(a: np.ndarray, b: np.ndarray, level: float = 0.95, samples: int = BOOTSTRAP_SAMPLES,
                    seed: int = 0, chunk: int = 100) -> dict[str, float]:
    """Mean of a − b over users and its percentile-bootstrap ``level`` interval (users resampled, paired).
    Memory: ``chunk`` × users indices at a time."""
    d = np.asarray(a, np.float64) - np.asarray(b, np.float64)
    if d.ndim != 1 or len(d) == 0:
        raise ValueError("paired_interval needs two equal-length, non-empty per-user arrays")
    rng = np.random.default_rng(seed)
    means = np.empty(samples)
    for start in range(0, samples, chunk):
        n = min(chunk, samples - start)
        means[start:start + n] = d[rng.integers(0, len(d), size=(n, len(d)))].mean(axis=1)
    lo, hi = np.quantile(means, [(1 - level) / 2, 1 - (1 - level) / 2])
    return {"diff": float(d.mean()), "low": float(lo), "high": float(hi), "users": int(len(d))}

