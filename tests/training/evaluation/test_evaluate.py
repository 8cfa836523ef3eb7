"""The evaluation harness: metrics on a hand-computed case, the split rules, exclusions, batching, the report."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

from training.evaluation.harness import evaluate, user_recall
from training.evaluation.metrics import ndcg_at_k, recall_at_k, recall_curve
from training.evaluation.report import format_table, write_report
from training.evaluation.split import Split, temporal_split

ITEMS = np.array([10, 20, 30, 40, 50])
INTEREST = {10: 0, 20: 0, 30: 1, 40: 1, 50: 2}


class FixedScorer:
    """Returns rows of a fixed (n_users, n_items) score matrix."""

    def __init__(self, scores: np.ndarray) -> None:
        self.scores = np.asarray(scores, dtype=np.float32)

    def fit(self, split: Split) -> None:
        pass

    def score(self, user_idx: np.ndarray) -> np.ndarray:
        return self.scores[user_idx].copy()


def _toy_split() -> Split:
    """3 users × 5 items with explicit parts.

    user 1: train 10 (twice), 20; test 40, 50, 10 (10 is a train item, so not relevant) -> relevant {40, 50}
    user 2: train 30; valid 40; test 40 (excluded: valid), 50                           -> relevant {50}
    user 3: train 10; test 20                                                          -> relevant {20}
    """
    rows = [
        (1, 10, "train"), (1, 10, "train"), (1, 20, "train"), (1, 40, "test"), (1, 50, "test"), (1, 10, "test"),
        (2, 30, "train"), (2, 40, "valid"), (2, 40, "test"), (2, 50, "test"),
        (3, 10, "train"), (3, 20, "test"),
    ]  # fmt: skip
    frame = pd.DataFrame(rows, columns=["user_id", "pin_id", "part"])
    return Split.from_frame(frame, ITEMS, INTEREST)


# Scores over items [10, 20, 30, 40, 50]. After exclusions the rankings are
#   user 1 (excl. 10, 20):      40, 50, 30          hits 1 1 0
#   user 2 (excl. 30, 40):      50, 20, 10          hits 1 0 0
#   user 3 (excl. 10):          50, 40, 30, 20      hits 0 0 0 1
TOY_SCORES = np.array([[5, 4, 1, 3, 2], [1, 2, 3, 4, 5], [0, 1, 2, 3, 4]])


def test_metrics_by_hand() -> None:
    res = evaluate(FixedScorer(TOY_SCORES), _toy_split(), ks=(1, 3), on="test", interest_k=3)
    assert res["users"] == 3 and res["items"] == 5
    # recall@1: 1/2, 1/1, 0/1; recall@3: 2/2, 1/1, 0/1 (denominator |relevant|).
    assert res["recall@1"] == pytest.approx((0.5 + 1 + 0) / 3)
    assert res["recall@3"] == pytest.approx((1 + 1 + 0) / 3)
    # capped: denominator min(|relevant|, K): user 1 at K=1 is 1/1.
    assert res["capped_recall@1"] == pytest.approx((1 + 1 + 0) / 3)
    assert res["capped_recall@3"] == pytest.approx(2 / 3)
    # The curve runs to the ranked depth (5 items): everyone's relevant items are within 4 ranks.
    assert res["recall_curve"] == pytest.approx([0.5, 2 / 3, 2 / 3, 1.0, 1.0])
    # NDCG@10: user 1 hits ranks 1, 2 of 2 relevant -> 1; user 2 rank 1 -> 1; user 3 rank 4 -> 1/log2(5).
    assert res["ndcg@10"] == pytest.approx((1 + 1 + 1 / math.log2(5)) / 3)
    # coverage@1: {40, 50}; coverage@3: every item appears in someone's top 3.
    assert res["coverage@1"] == pytest.approx(2 / 5)
    assert res["coverage@3"] == pytest.approx(1.0)
    # log-popularity: counts in train + valid = 10: 3 (user 1 twice, user 3), 20: 1, 30: 1, 40: 1, 50: 0.
    log2 = math.log(2)
    assert res["logpop@1"] == pytest.approx((log2 + 0 + 0) / 3)
    top3 = [log2, 0, log2] + [0, log2, math.log(4)] + [0, log2, log2]  # users 1, 2, 3
    assert res["logpop@3"] == pytest.approx(sum(top3) / 9)
    # per interest (top 3): interest 0 {user 3: 20} 0/1; interest 1 {user 1: 40} 1/1; interest 2 {50, 50} 2/2.
    assert res["recall@3_by_interest"] == pytest.approx({"0": 0.0, "1": 1.0, "2": 1.0})
    assert res["relevant_by_interest"] == {"0": 1, "1": 1, "2": 2}


def test_user_recall_is_each_users_share_of_evaluates_mean() -> None:
    per_user = user_recall(FixedScorer(TOY_SCORES), _toy_split(), 1, on="test")
    assert per_user.tolist() == pytest.approx([0.5, 1.0, 0.0])          # the users of test_metrics_by_hand
    for k in (1, 3):
        res = evaluate(FixedScorer(TOY_SCORES), _toy_split(), ks=(k,), on="test", interest_k=3)
        mean = user_recall(FixedScorer(TOY_SCORES), _toy_split(), k, on="test").mean()
        assert mean == pytest.approx(res[f"recall@{k}"])


def test_validation_excludes_train_proper_only() -> None:
    split = _toy_split()
    res = evaluate(FixedScorer(TOY_SCORES), split, ks=(1, 3), on="valid")
    # Only user 2 has a validation item (40), ranked 50, 40, 20, 10 with 30 excluded.
    assert res["users"] == 1
    assert res["recall@1"] == 0.0 and res["recall@3"] == 1.0
    assert res["ndcg@10"] == pytest.approx(1 / math.log2(3))
    merged = split.merged()
    assert merged.train.sum() == split.train.sum() + split.valid.sum() and merged.valid.nnz == 0
    with pytest.raises(ValueError, match="merged"):
        evaluate(FixedScorer(TOY_SCORES), merged, on="valid")
    # After the merge the test evaluation sees the same exclusions.
    assert evaluate(FixedScorer(TOY_SCORES), merged, ks=(1, 3))["recall@3"] == pytest.approx(2 / 3)


def test_batches_give_the_same_results() -> None:
    split = _toy_split()
    whole = evaluate(FixedScorer(TOY_SCORES), split, ks=(1, 3))
    one_by_one = evaluate(FixedScorer(TOY_SCORES), split, ks=(1, 3), batch_bytes=1)
    for key in ("recall@1", "recall@3", "ndcg@10", "coverage@3", "logpop@3", "recall_curve"):
        assert whole[key] == pytest.approx(one_by_one[key]), key


def test_recall_curve_matches_recall_at_k() -> None:
    rng = np.random.default_rng(0)
    n_users, n_items, depth = 40, 30, 12
    topk = np.stack([rng.permutation(n_items)[:depth] for _ in range(n_users)])
    relevant = [set(rng.choice(n_items, rng.integers(1, 8), replace=False).tolist()) for _ in range(n_users)]
    hits = np.array([[i in rel for i in row] for row, rel in zip(topk.tolist(), relevant, strict=True)])
    n_rel = np.array([len(r) for r in relevant])
    curve = recall_curve(hits, n_rel).mean(axis=0)
    for k in (1, 5, 12):
        assert curve[k - 1] == pytest.approx(recall_at_k(topk[:, :k], relevant))
    capped = recall_curve(hits, n_rel, capped=True)
    assert capped[:, 4] == pytest.approx(hits[:, :5].sum(1) / np.minimum(n_rel, 5))
    assert ((ndcg_at_k(hits, n_rel, 10) >= 0) & (ndcg_at_k(hits, n_rel, 10) <= 1 + 1e-12)).all()
    with pytest.raises(ValueError, match="relevant"):
        recall_curve(hits, np.zeros(n_users, dtype=int))


def _interactions(counts: dict[int, int], start: str = "2026-01-01") -> pd.DataFrame:
    """``counts[user]`` interactions per user, one minute apart, pins 100, 101, ... in time order."""
    rows = []
    for user, n in counts.items():
        for j in range(n):
            rows.append((user, 100 + j, pd.Timestamp(start, tz="UTC") + pd.Timedelta(minutes=j)))
    return pd.DataFrame(rows, columns=["user_id", "pin_id", "event_timestamp"])


def _parts(split: Split, user: int) -> list[str]:
    f = split.frame[split.frame["user_id"] == user].sort_values(["event_timestamp", "pin_id"])
    return f["part"].tolist()


def test_split_rules() -> None:
    split = temporal_split(_interactions({1: 10, 2: 5, 3: 1, 4: 2, 5: 3, 6: 38}))
    # 10: test ceil(2) = 2, valid ceil(0.1 * 8) = 1, train 7.
    assert _parts(split, 1) == ["train"] * 7 + ["valid"] + ["test"] * 2
    # 5: test 1; valid ceil(0.4) = 1 of the 4 left.
    assert _parts(split, 2) == ["train"] * 3 + ["valid"] + ["test"]
    # A single interaction: nothing to condition on, all train (never evaluated).
    assert _parts(split, 3) == ["train"]
    # 2: one test, one train, no validation (a lone train row stays train).
    assert _parts(split, 4) == ["train", "test"]
    # 3: one test, then one of the two left is validation.
    assert _parts(split, 5) == ["train", "valid", "test"]
    # 38: test ceil(7.6) = 8, valid ceil(3.0) = 3.
    assert _parts(split, 6) == ["train"] * 27 + ["valid"] * 3 + ["test"] * 8
    # The last rows (latest timestamps) are the test ones.
    user1 = split.frame[split.frame["user_id"] == 1]
    assert user1.loc[user1["part"] == "test", "pin_id"].tolist() == [108, 109]
    assert split.users.tolist() == [1, 2, 3, 4, 5, 6]
    assert split.train.shape == (6, 38) and split.items.tolist() == list(range(100, 138))


def test_the_horizon_matched_split_puts_validation_as_far_past_train_as_test_is_past_validation() -> None:
    split = temporal_split(_interactions({1: 10, 2: 5, 5: 3, 6: 38, 7: 100}))
    matched = split.horizon_matched()
    # 38: test 8, valid 3 -> round(2.5) = 3 train rows move (27 -> 24 train, 6 validation); test is untouched.
    assert _parts(matched, 6) == ["train"] * 24 + ["valid"] * 6 + ["test"] * 8
    # 100: test 20, valid 8 -> 6 more validation rows; the original validation targets' mean distance past the
    # last train row is then 6 + (8 + 1) / 2 = 10.5, test's past the last validation row (20 + 1) / 2 = 10.5.
    assert _parts(matched, 7) == ["train"] * 66 + ["valid"] * 14 + ["test"] * 20
    # 10: test 2, valid 1 -> round(0.5) = 1; 5 and 3 rows: test 1 = valid 1 -> nothing moves.
    assert _parts(matched, 1) == ["train"] * 6 + ["valid"] * 2 + ["test"] * 2
    assert _parts(matched, 2) == _parts(split, 2) and _parts(matched, 5) == _parts(split, 5)
    assert (matched.test != split.test).nnz == 0
    assert matched.train.sum() + matched.valid.sum() == split.train.sum() + split.valid.sum()
    # at least one train row stays: a user with 2 train rows, 1 validation and 4 test rows keeps one
    few = split.frame[split.frame["user_id"] == 1].copy()
    few["part"] = ["train", "train", "valid", "test", "test", "test", "test", "test", "test", "test"]
    odd = Split.from_frame(few, split.items).horizon_matched()
    assert _parts(odd, 1) == ["train"] + ["valid"] * 2 + ["test"] * 7
    with pytest.raises(ValueError, match="before merged"):
        split.merged().horizon_matched()


def test_a_validation_sample_scores_a_fixed_subset_of_users_and_leaves_the_rest_as_it_is() -> None:
    split = temporal_split(_interactions({u: 10 + u for u in range(1, 41)}))
    with_valid = set(np.flatnonzero(np.diff(split.valid.indptr) > 0))
    sample = split.valid_sample(15, seed=7)
    kept = set(np.flatnonzero(np.diff(sample.valid.indptr) > 0))
    assert len(kept) == 15 and kept < with_valid
    for u in kept:   # a sampled user's validation row is the split's, every other user's is empty
        assert (sample.valid[u] != split.valid[u]).nnz == 0
    assert (sample.train != split.train).nnz == 0 and (sample.test != split.test).nnz == 0
    assert sample.frame is split.frame and (sample.excluded("valid") != split.excluded("valid")).nnz == 0
    scores = np.random.default_rng(0).random((split.n_users, split.n_items)).astype(np.float32)
    assert len(user_recall(FixedScorer(scores), sample, 5)) == 15
    again = split.valid_sample(15, seed=7)
    assert (again.valid != sample.valid).nnz == 0
    assert split.valid_sample(0, 7) is split and split.valid_sample(len(with_valid), 7) is split


def test_split_ceil_ignores_float_noise_and_test_keeps_a_train_row() -> None:
    # 0.14 * 50 == 7.000000000000001: 7 test rows, not 8.
    split = temporal_split(_interactions({1: 50}), test_fraction=0.14, valid_fraction=0.0)
    assert _parts(split, 1).count("test") == 7 and "valid" not in _parts(split, 1)
    # A large fraction still leaves one train row.
    split = temporal_split(_interactions({1: 3}), test_fraction=0.9)
    assert _parts(split, 1) == ["train", "test", "test"]


def test_split_ties_labels_and_candidates() -> None:
    ts = pd.Timestamp("2026-01-01", tz="UTC")
    df = pd.DataFrame(
        {
            "user_id": [1, 1, 1, 1, 1],
            "pin_id": [30, 10, 20, 40, 99],
            "event_timestamp": [ts, ts, ts, ts + pd.Timedelta(hours=1), ts],
            "label": [1, 1, 1, 0, 1],
        }
    )
    # The hide (label 0) is dropped; pin 99 is outside the candidate set and dropped before splitting;
    # ties at equal timestamps are ordered by pin id: 10, 20, 30.
    split = temporal_split(df, items=[10, 20, 30, 40])
    f = split.frame.sort_values("pin_id")
    assert f["pin_id"].tolist() == [10, 20, 30]
    assert f["part"].tolist() == ["train", "valid", "test"]
    assert split.items.tolist() == [10, 20, 30, 40]
    # "hash" ties: a fixed order that does not depend on the input's row order.
    a = temporal_split(df, items=[10, 20, 30, 40], tie_break="hash").frame
    b = temporal_split(df.iloc[::-1], items=[10, 20, 30, 40], tie_break="hash").frame
    assert a.sort_values("pin_id")["part"].tolist() == b.sort_values("pin_id")["part"].tolist()
    with pytest.raises(ValueError, match="tie_break"):
        temporal_split(df, tie_break="random")  # type: ignore[arg-type]


def test_relevant_set_exclusions_and_skipped_users() -> None:
    rows = [
        (1, 10, "train"), (1, 10, "test"), (1, 20, "test"), (1, 20, "test"),  # relevant {20}: 10 was seen
        (2, 30, "train"), (2, 30, "test"),  # only a re-engagement: skipped
        (3, 40, "train"),  # no test rows: never evaluated
    ]  # fmt: skip
    split = Split.from_frame(pd.DataFrame(rows, columns=["user_id", "pin_id", "part"]))
    rel = split.relevant("test")
    assert rel[0].indices.tolist() == [1] and rel[1].nnz == 0 and rel[2].nnz == 0
    assert split.test[0, 1] == 2  # counts keep repeated rows
    res = evaluate(FixedScorer(np.ones((3, 4))), split, ks=(1,))
    assert res["users"] == 1 and res["recall@1"] == 1.0  # 20 is the only item left after excluding 10
    with pytest.raises(ValueError, match="no user"):
        evaluate(FixedScorer(np.ones((3, 4))), split, on="valid")


def test_write_report(tmp_path: Path) -> None:
    split = _toy_split()
    results = {
        "fixed": evaluate(FixedScorer(TOY_SCORES), split, ks=(1, 3)),
        "reversed": evaluate(FixedScorer(-TOY_SCORES), split, ks=(1, 3)),
    }
    md = write_report(results, tmp_path / "out", "toy", notes=["a note"])
    text = md.read_text()
    assert md.name == "report.md" and "# toy" in text and "a note" in text
    assert "| fixed |" in text and "| reversed |" in text and "recall@3" in text and "ndcg@10" in text
    for png in ("recall_curve.png", "recall_by_interest.png"):
        data = (tmp_path / "out" / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000, png
    assert (tmp_path / "out" / "results.json").exists()
    assert format_table(results).count("\n") == 3


def test_each_cut_off_is_scored_at_the_last_index_refresh_at_or_before_it() -> None:
    from training.evaluation.scorer import time_points

    cut = pd.Series(pd.to_datetime(["2026-03-02 23:59:59", "2026-03-02 00:00:00", "2026-03-01 00:00:01",
                                    "2026-03-09 12:00:00"], utc=True))
    times, which = time_points(cut, 1)
    assert [str(t) for t in times] == ["2026-03-01 00:00:00+00:00", "2026-03-02 00:00:00+00:00",
                                       "2026-03-09 00:00:00+00:00"]
    assert which.tolist() == [1, 1, 0, 2]                 # a refresh at the cut-off's own midnight counts
    refresh = pd.DatetimeIndex(times)[which]
    assert (refresh <= pd.DatetimeIndex(cut)).all() and (pd.DatetimeIndex(cut) - refresh < pd.Timedelta(days=1)).all()
    times, which = time_points(cut, 7)                    # weekly: every 7th midnight since 1970-01-01 (a Thursday)
    assert [str(t) for t in times] == ["2026-02-26 00:00:00+00:00", "2026-03-05 00:00:00+00:00"]
    assert which.tolist() == [0, 0, 0, 1]


def test_a_split_and_its_views_read_each_refresh_once_and_get_the_rows_in_candidate_order(monkeypatch) -> None:
    import training.features.store as store
    from training.config import Config
    from training.evaluation.scorer import TwoTowerScorer

    calls = []

    class Store:
        def historical(self, entity, service, chunk=None):
            assert chunk == Config().features.candidate_chunk_rows
            calls.append((service, sorted(set(entity["event_timestamp"]))))
            out = entity.iloc[::-1].reset_index(drop=True)        # Feast returns rows in its own order
            return out.assign(age_days=out["pin_id"] * 1.0 + out["event_timestamp"].dt.day)

    class Encoder:
        def pins(self, df):
            return {"age": df["age_days"].to_numpy(), "pin": df["pin_id"].to_numpy()}

    monkeypatch.setattr(store, "feature_store", lambda cfg: Store())
    split = _toy_split()
    day = [pd.Timestamp(f"2026-03-0{d}", tz="UTC") for d in (1, 2, 3)]
    first = TwoTowerScorer(Config(), None, Encoder(), None, split, "pin_svc")
    first._fetch(day[:2])
    second = TwoTowerScorer(Config(), None, Encoder(), None, split, "pin_svc")
    second._fetch(day)                                             # only the third day is new to the split
    assert calls == [("pin_svc", day[:2]), ("pin_svc", day[2:])]
    assert second._pin_cache[day[1]]["pin"].tolist() == ITEMS.tolist()
    assert second._pin_cache[day[1]]["age"].tolist() == (ITEMS + 2.0).tolist()
    view = dataclasses.replace(split, test=split.valid)            # a view, as Split.test_since makes (the gate's)
    TwoTowerScorer(Config(), None, Encoder(), None, view, "pin_svc")._fetch(day)
    TwoTowerScorer(Config(), None, Encoder(), None, split.valid_sample(1, 0), "pin_svc")._fetch(day)
    assert len(calls) == 2                                         # read by the split it is a view of
    TwoTowerScorer(Config(), None, Encoder(), None, _toy_split(), "pin_svc")._fetch(day[:1])
    assert len(calls) == 3                                         # another split reads its own


class _Dot(torch.nn.Module):
    """A pin tower over one input field: a linear map of it."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(3, 4)

    def forward(self, x: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.lin(x["f"])


def test_pin_snapshots_keep_a_bounded_number_of_refreshes_and_embed_each_once_in_refresh_order():
    from training.evaluation.harness import rank
    from training.evaluation.scorer import PinSnapshots, best_of

    torch.manual_seed(0)
    tower, n_items, n_times = _Dot(), 50, 6
    inputs = [{"f": torch.randn(n_items, 3)} for _ in range(n_times)]
    full = np.stack([tower(x).detach().numpy() for x in inputs])
    snaps = PinSnapshots(tower, inputs, n_items, 4, max_bytes=2 * 4 * n_items * 4)   # room for 2 refreshes
    assert snaps.shape == (n_times, n_items, 4) and snaps.max_kept == 2 and snaps.embedded_rows == 0
    np.testing.assert_allclose(np.asarray(snaps), full, rtol=1e-6)
    assert len(snaps._kept) == 2                                     # noqa: SLF001 - the bound holds
    every = PinSnapshots(tower, inputs, n_items, 4)                  # all fit: computed up front
    assert every.embedded_rows == n_times * n_items
    np.testing.assert_allclose(np.asarray(every), full, rtol=1e-6)

    rng = np.random.default_rng(0)
    users = rng.normal(size=(40, 1, 4)).astype(np.float32)
    bucket = rng.integers(0, n_times, 40)
    relevant = sp.random(40, n_items, density=0.1, format="csr", random_state=1) > 0
    excluded = sp.csr_matrix((40, n_items))
    expected = rank(lambda r: best_of(users[r], bucket[r], full), np.arange(40), relevant, excluded, 10,
                    batch_bytes=8 * 4 * n_items)
    lazy = PinSnapshots(tower, inputs, n_items, 4, max_bytes=2 * 4 * n_items * 4)
    got = rank(lambda r: best_of(users[r], bucket[r], lazy), np.arange(40), relevant, excluded, 10,
               batch_bytes=8 * 4 * n_items, order=np.argsort(bucket, kind="stable"))
    np.testing.assert_array_equal(got[0], expected[0])              # same ranking, results in row order
    np.testing.assert_array_equal(got[1], expected[1])
    assert lazy.embedded_rows == len(np.unique(bucket)) * n_items   # each refresh embedded once in refresh order
    with pytest.raises(ValueError, match="permutation"):
        rank(lambda r: best_of(users[r], bucket[r], lazy), np.arange(40), relevant, excluded, 10,
             order=np.zeros(40, dtype=int))

    with torch.no_grad():
        tower.lin.weight.add_(1.0)                                   # the tower changes after prepare
    stale = PinSnapshots(tower, inputs, n_items, 4, max_bytes=0)
    with torch.no_grad():
        tower.lin.bias.add_(1.0)
    with pytest.raises(RuntimeError, match="prepare again"):
        stale[0]


def test_a_candidate_whose_features_did_not_change_between_refreshes_is_embedded_once() -> None:
    from training.evaluation.scorer import PinSnapshots

    class Tower(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = torch.nn.Parameter(torch.tensor([[1.0, 2.0], [0.5, -1.0]]))

        def forward(self, x: dict[str, torch.Tensor]) -> torch.Tensor:
            return x["counts"] @ self.w + x["pin"][:, None].float()

    pins = torch.arange(1, 5)
    counts = torch.tensor([[0.0, 1.0], [1.0, 1.0], [2.0, 0.5], [3.0, 0.0]])
    later = counts.clone()
    later[2, 1] = 0.25                                           # one pin's features change on day 2
    inputs = [{"pin": pins, "counts": counts}, {"pin": pins, "counts": later}, {"pin": pins, "counts": later.clone()}]
    tower = Tower()
    snaps = PinSnapshots(tower, inputs, 4, 2)
    assert snaps.embedded_rows == 5                              # 5 distinct rows of 12
    with torch.no_grad():
        for t, x in enumerate(inputs):                           # every (refresh, pin) gets its own inputs' vector
            np.testing.assert_allclose(snaps[t], tower(x).numpy())
