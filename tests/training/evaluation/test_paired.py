"""Paired per-user intervals: the bootstrap the report's verdict reads, and the per-user figures it is fed."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from training.evaluation.harness import evaluate
from training.evaluation.paired import align, mean_over_runs, paired_interval
from training.evaluation.split import Split


def test_the_interval_brackets_the_mean_difference_and_is_reproducible():
    rng = np.random.default_rng(0)
    b = rng.uniform(0, 1, 2000)
    same = paired_interval(b, b)
    assert same["diff"] == 0 and same["low"] == same["high"] == 0
    a = np.clip(b + 0.05 + rng.normal(0, 0.1, len(b)), 0, 1)
    i = paired_interval(a, b)
    assert i["low"] < i["diff"] < i["high"] and i["low"] > 0 and i["users"] == 2000
    assert paired_interval(a, b) == i                                   # seeded
    noise = paired_interval(b + rng.normal(0, 0.2, len(b)), b)
    assert noise["low"] < 0 < noise["high"]                            # no difference: the interval holds 0
    with pytest.raises(ValueError, match="non-empty"):
        paired_interval(np.array([]), np.array([]))


def test_runs_are_aligned_by_user_id_and_averaged_over_seeds():
    one = {"user_ids": np.array([1, 2, 3]), "m": np.array([0.0, 1.0, 0.5])}
    two = {"user_ids": np.array([2, 3, 4]), "m": np.array([0.0, 0.5, 1.0])}
    mean = mean_over_runs([one, two], "m")
    np.testing.assert_array_equal(mean["user_ids"], [2, 3])
    np.testing.assert_allclose(mean["m"], [0.5, 0.5])
    a, b = align(one, two, "m")
    np.testing.assert_allclose(a, [1.0, 0.5])
    np.testing.assert_allclose(b, [0.0, 0.5])
    with pytest.raises(ValueError, match="share no user"):
        align(one, {"user_ids": np.array([9]), "m": np.array([1.0])}, "m")


def test_per_user_figures_average_to_the_reported_metric():
    rng = np.random.default_rng(3)
    rows = [(u, int(i), part) for u in range(40) for part, n in (("train", 8), ("valid", 2), ("test", 3))
            for i in rng.choice(60, n, replace=False)]
    frame = pd.DataFrame(rows, columns=["user_id", "pin_id", "part"]).drop_duplicates(["user_id", "pin_id"])
    split = Split.from_frame(frame, list(range(60)))

    class Random:
        def fit(self, split):
            pass

        def score(self, idx):
            return np.random.default_rng(int(idx[0])).uniform(size=(len(idx), split.n_items)).astype(np.float32)

    res = evaluate(Random(), split, ks=(10, 50), on="test", per_user=True)
    per = res["per_user"]
    assert len(per["user_ids"]) == res["users"]
    for k in (10, 50):
        assert per[f"capped_recall@{k}"].mean() == pytest.approx(res[f"capped_recall@{k}"], abs=1e-6)
