"""Baselines through the harness: popularity and item-kNN on toy data, ALS and the oracle on small synthetic data."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from training.config import DataConfig
from training.data.synthetic import GroundTruth, generate
from training.evaluation.baselines import (
    EASE,
    ImplicitALS,
    ItemKNN,
    Popularity,
    fit_tune_evaluate,
    history_weights,
    tune_knn,
)
from training.evaluation.harness import evaluate
from training.evaluation.oracle import Oracle
from training.evaluation.split import Split, temporal_split

POSITIVE = ("closeup", "click", "save")


def _split(rows: list[tuple[int, int, str]], items: list[int] | None = None) -> Split:
    return Split.from_frame(pd.DataFrame(rows, columns=["user_id", "pin_id", "part"]), items)


def test_popularity_ranks_by_train_counts_and_skips_own_items() -> None:
    # Train counts: 1 -> 3 rows, 2 -> 2, 3 -> 1, 4 -> 0.
    split = _split(
        [
            (1, 1, "train"), (2, 1, "train"), (3, 1, "train"), (1, 2, "train"), (2, 2, "train"), (3, 3, "train"),
            (1, 3, "test"), (2, 4, "test"), (3, 2, "test"),
        ],
        items=[1, 2, 3, 4],
    )  # fmt: skip
    pop = Popularity()
    pop.fit(split)
    assert pop.score(np.array([0, 2])).tolist() == [[3, 2, 1, 0]] * 2
    res = evaluate(pop, split, ks=(1, 2))
    # user 1 (seen 1, 2): ranks 3, 4 -> hit at 1; user 2 (seen 1, 2): 3, 4 -> hit at 2; user 3 (seen 1, 3): 2, 4 -> 1.
    assert res["recall@1"] == pytest.approx(2 / 3) and res["recall@2"] == 1.0
    assert res["ndcg@10"] == pytest.approx((1 + 1 / math.log2(3) + 1) / 3)


def test_item_knn_cosine_on_a_known_matrix() -> None:
    # Users 1, 2 engaged with A, B; user 3 with C, D; user 4 with A only (test: B).
    a, b, c, d = 1, 2, 3, 4
    split = _split(
        [
            (1, a, "train"), (1, b, "train"), (2, a, "train"), (2, b, "train"), (3, c, "train"), (3, d, "train"),
            (4, a, "train"), (4, b, "test"),
        ]
    )  # fmt: skip
    knn = ItemKNN()
    knn.fit(split)
    # sim(A, B) = 2 / sqrt(3 * 2); sim(C, D) = 1; across the two groups 0; diagonal 0.
    expected = np.array(
        [[0, 2 / math.sqrt(6), 0, 0], [2 / math.sqrt(6), 0, 0, 0], [0, 0, 0, 1], [0, 0, 1, 0]], dtype=np.float32
    )
    np.testing.assert_allclose(np.asarray(knn.sim), expected, rtol=1e-6)
    np.testing.assert_allclose(knn.score(np.array([3])), [[0, 2 / math.sqrt(6), 0, 0]], rtol=1e-6)
    assert evaluate(knn, split, ks=(1,))["recall@1"] == 1.0
    # k = 1 keeps each row's strongest neighbour: the same here; the pruned matrix is sparse.
    knn.set_k(1)
    np.testing.assert_allclose(knn.sim.toarray(), expected, rtol=1e-6)


def test_item_knn_neighbourhood_pruning_keeps_the_top_k_per_row() -> None:
    rng = np.random.default_rng(1)
    rows = [(u, int(i), "train") for u in range(30) for i in rng.choice(20, 6, replace=False)]
    split = _split(rows, items=list(range(20)))
    full, pruned = ItemKNN(), ItemKNN(k=3)
    full.fit(split)
    pruned.fit(split)
    dense = np.asarray(full.sim)
    assert np.allclose(np.diag(dense), 0) and np.allclose(dense, dense.T, atol=1e-6)
    p = pruned.sim.toarray()
    assert ((p > 0).sum(axis=1) <= 3).all()
    for i in range(20):
        kept = np.flatnonzero(p[i])
        assert np.allclose(p[i, kept], dense[i, kept])
        assert dense[i, kept].min() >= np.sort(dense[i])[-3] - 1e-6


@pytest.fixture(scope="module")
def synthetic() -> tuple[Split, GroundTruth]:
    tables, truth = generate(DataConfig(n_users=300, n_pins=800, n_events=60_000, seed=11))
    ev = tables.events
    pos = ev[ev["event_type"].isin(POSITIVE)]
    interest = tables.pins.set_index("pin_id")["interest_id"]
    return temporal_split(pos, item_interest=interest), truth


def test_als_beats_popularity_and_the_oracle_beats_both(synthetic: tuple[Split, GroundTruth]) -> None:
    split, truth = synthetic
    pop, _ = fit_tune_evaluate(Popularity(), split)
    als, records = fit_tune_evaluate(
        ImplicitALS(iterations=10), split, grid={"factors": [16, 32], "regularization": [0.1], "alpha": [10.0]}
    )
    oracle, _ = fit_tune_evaluate(Oracle(truth), split)
    assert len(records) == 2 and records[0]["recall@50"] >= records[1]["recall@50"]
    assert als["params"] == records[0]["params"] and als["params"]["factors"] in (16, 32)
    assert als["recall@50"] > pop["recall@50"] + 0.02, (als["recall@50"], pop["recall@50"])
    assert oracle["recall@50"] > als["recall@50"], (oracle["recall@50"], als["recall@50"])
    assert als["coverage@50"] > pop["coverage@50"] and als["logpop@50"] < pop["logpop@50"]
    assert set(als["recall@50_by_interest"]) <= {str(i) for i in range(24)}


def test_als_is_deterministic_and_knn_tuning_refits(synthetic: tuple[Split, GroundTruth]) -> None:
    split, _ = synthetic
    scores = []
    for _ in range(2):
        als = ImplicitALS(factors=16, iterations=5)
        als.fit(split)
        scores.append(als.score(np.arange(5)))
    np.testing.assert_allclose(scores[0], scores[1], rtol=1e-5, atol=1e-6)
    knn = ItemKNN()
    records = tune_knn(knn, split, grid=(None, 20))
    assert len(records) == 2 and knn.k == records[0]["params"]["k"]
    res, _ = fit_tune_evaluate(knn, split, grid=(None, 20))
    assert 0 < res["recall@50"] <= 1 and res["params"]["k"] in (None, 20)


def test_ease_is_the_closed_form_and_ranks_co_engaged_items() -> None:
    a, b, c, d = 1, 2, 3, 4
    split = _split(
        [
            (1, a, "train"), (1, b, "train"), (2, a, "train"), (2, b, "train"), (3, c, "train"), (3, d, "train"),
            (4, a, "train"), (4, b, "test"),
        ]
    )  # fmt: skip
    ease = EASE(l2=1.0)
    ease.fit(split)
    x = (split.train > 0).toarray().astype(np.float64)
    p = np.linalg.inv(x.T @ x + np.eye(4))
    b_expected = np.eye(4) - p / np.diag(p)[None, :]
    np.testing.assert_allclose(ease.b, b_expected, atol=1e-5)
    assert np.diag(ease.b).tolist() == [0, 0, 0, 0]
    assert evaluate(ease, split, ks=(1,))["recall@1"] == 1.0   # A -> B, never C or D


def test_recency_weights_follow_the_split_order() -> None:
    frame = pd.DataFrame({"user_id": [1, 1, 1, 1], "pin_id": [10, 11, 12, 13],
                          "part": ["train", "train", "train", "test"]})
    split = Split.from_frame(frame)
    w = history_weights(split, recency=1.0).toarray()[0]
    np.testing.assert_allclose(w, [np.exp(-2), np.exp(-1), 1.0, 0.0], rtol=1e-6)   # newest train item weighs 1
    assert history_weights(split, None).toarray()[0].tolist() == [1, 1, 1, 0]


def test_ease_is_tuned_on_validation(synthetic: tuple[Split, GroundTruth]) -> None:
    split, _ = synthetic
    res, records = fit_tune_evaluate(EASE(), split, grid={"l2": (10.0, 500.0), "recency": (None, 20.0)})
    assert len(records) == 4 and res["params"] == records[0]["params"]
    assert records[0]["recall@50"] >= records[-1]["recall@50"] and res["capped_recall@50"] > 0.1


def test_baselines_score_from_history_strictly_before_the_first_held_out_instant() -> None:
    # User 1's session at t=5 holds B (train) and C (test): B is training data, not scoring history.
    # Every other user co-engages A with D and B with C, so a baseline reading B at scoring time would rank C first.
    t = pd.Timestamp("2024-01-01")
    rows = [(1, 1, 0, "train"), (1, 2, 5, "train"), (1, 3, 5, "test")]
    for u in range(2, 8):
        rows += [(u, 1, 0, "train"), (u, 4, 1, "train")] if u % 2 else [(u, 2, 0, "train"), (u, 3, 1, "train")]
    frame = pd.DataFrame(rows, columns=["user_id", "pin_id", "seconds", "part"])
    frame["event_timestamp"] = t + pd.to_timedelta(frame.pop("seconds"), unit="s")
    split = Split.from_frame(frame)
    assert split.train[0].toarray().tolist() == [[1, 1, 0, 0]]
    assert split.history()[0].toarray().tolist() == [[1, 0, 0, 0]]          # B, tied with the test instant, left out
    assert split.merged().history()[0].toarray().tolist() == [[1, 0, 0, 0]]
    assert split.history()[1:].toarray().tolist() == split.train[1:].toarray().tolist()   # no ties: all of train
    assert history_weights(split, 1.0).toarray()[0].tolist() == [1, 0, 0, 0]  # A is the newest history item now
    for scorer in (EASE(l2=1.0), ItemKNN(), ImplicitALS(factors=4, iterations=5, num_threads=1)):
        scorer.fit(split)
        s = scorer.score(np.array([0]))[0]
        assert s[3] > s[2], type(scorer).__name__   # D (A's neighbour) above C (B's)
    als = ImplicitALS(factors=4, iterations=5, num_threads=1)
    als.fit(split)
    untied = ImplicitALS(factors=4, iterations=5, num_threads=1)
    untied.fit(Split.from_frame(frame.assign(event_timestamp=frame["event_timestamp"]
                                             - pd.to_timedelta((frame["pin_id"] == 2) * 1, unit="s"))))
    np.testing.assert_allclose(als.user_factors[1:], untied.user_factors[1:], rtol=1e-5)   # others as fitted


def test_item_knn_tuning_on_a_catalog_too_large_for_the_dense_matrix_prunes_once_and_matches_the_dense_path(
        synthetic: tuple[Split, GroundTruth], monkeypatch: pytest.MonkeyPatch) -> None:
    from training.evaluation import baselines

    split, _ = synthetic
    dense = tune_knn(ItemKNN(), split, grid=(10, 50))
    monkeypatch.setattr(baselines, "DENSE_SIMILARITY_BYTES", 1024)
    knn = ItemKNN()
    sparse = tune_knn(knn, split, grid=(None, 10, 50))          # None is dropped: no dense matrix here
    assert [r["params"] for r in sparse] == [r["params"] for r in dense]
    assert [r["recall@50"] for r in sparse] == pytest.approx([r["recall@50"] for r in dense], abs=1e-6)
    direct = ItemKNN(k=10)
    direct.fit(split)
    np.testing.assert_allclose(baselines._prune_sparse_rows(knn.sim, 10).toarray(), direct.sim.toarray(),
                               atol=1e-6)
    with pytest.raises(baselines.CatalogTooLarge, match="too large"):
        tune_knn(ItemKNN(), split, grid=(None,))


def test_sansa_is_close_to_ease_where_both_run_and_scores_zero_for_items_without_train_rows(
        synthetic: tuple[Split, GroundTruth]) -> None:
    pytest.importorskip("sansa", reason="the optional 'sansa' extra (needs SuiteSparse to build)")
    from training.evaluation.baselines import SANSA

    split, _ = synthetic
    ease, sansa = EASE(l2=50.0), SANSA(l2=50.0, neighbours=split.n_items)
    ease.fit(split)
    sansa.fit(split)
    users = np.arange(50)
    a, b = ease.score(users), sansa.score(users)
    assert a.shape == b.shape == (50, split.n_items)
    cold = np.flatnonzero(np.asarray(split.train.sum(axis=0)).ravel() == 0)
    assert len(cold) and np.allclose(b[:, cold], 0)
    top_a, top_b = np.argsort(-a, axis=1)[:, :50], np.argsort(-b, axis=1)[:, :50]
    overlap = np.mean([len(set(x) & set(y)) / 50 for x, y in zip(top_a, top_b, strict=True)])
    assert overlap > 0.6, overlap


def test_a_report_without_the_sansa_package_skips_it_with_a_line_naming_the_extra(monkeypatch) -> None:
    import builtins

    from training.evaluation.baselines import SANSA
    from training.evaluation.report import skip_reason

    real_import = builtins.__import__

    def no_sansa(name, *args, **kwargs):
        if name == "sansa":
            raise ImportError("No module named 'sansa'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_sansa)
    rows = [(u, i, "train") for u in range(6) for i in range(4)] + [(u, 4, "valid") for u in range(6)]
    with pytest.raises(ImportError, match="sansa") as err:
        SANSA().fit(_split(rows, items=list(range(6))))
    line = skip_reason(err.value)
    assert "pip install -e '.[sansa]'" in line and "SuiteSparse" in line and "No module named 'sansa'" in line
