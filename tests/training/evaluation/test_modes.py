"""The modes' evaluation (training/evaluation/modes.py) on tiny hand-made inputs: round-robin and best-of scoring,
per-interest recall, popularity buckets, diversity, aggregation and the report tables."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

from training.evaluation import modes
from training.evaluation.split import Split


def test_merge_round_robin_takes_turns_skips_repeats_and_pads():
    a = np.array([[1, 2, 3], [4, -1, -1]])
    b = np.array([[2, 5, 6], [-1, -1, -1]])
    merged = modes.merge_round_robin([a, b], depth=5)
    # 1st of each (1, 2), then 2nd of each (2 is taken, 5), then 3rd (3, 6): the first five distinct
    assert merged.tolist() == [[1, 2, 5, 3, 6], [4, -1, -1, -1, -1]]


def test_capped_recalls_and_hits_of():
    topk = np.array([[0, 2, -1], [1, 0, 2]])
    relevant = sp.csr_matrix(np.array([[1, 0, 1], [0, 0, 1]], dtype=bool))
    hits = modes.hits_of(topk, relevant)
    assert hits.tolist() == [[True, True, False], [False, False, True]]
    rec = modes.capped_recalls(hits, np.array([2, 1]), (1, 3))
    assert rec["capped_recall@1"].tolist() == [1.0, 0.0]           # ÷ min(|relevant|, 1)
    assert rec["capped_recall@3"].tolist() == [1.0, 1.0]


def test_distinct_interests_and_intra_list_diversity():
    item_interest = np.array([0, 0, 1, 2])
    assert modes.distinct_interests(np.array([[0, 1, 2], [3, -1, -1], [0, 1, -1]]), item_interest).tolist() == [2, 1, 1]
    v = np.array([[[1.0, 0.0], [2.0, 0.0], [0.0, 1.0]],      # cosines 1, 0, 0 -> mean 1 − cos = 2/3
                  [[1.0, 0.0], [-3.0, 0.0], [9.0, 9.0]]])    # the third slot is padding: 1 − (−1) = 2
    valid = np.array([[True, True, True], [True, True, False]])
    np.testing.assert_allclose(modes.intra_list_diversity(v, valid), [2 / 3, 2.0])
    assert np.isnan(modes.intra_list_diversity(v[:1], np.array([[True, False, False]])))[0]


def test_popularity_buckets_are_thirds_by_descending_count():
    b = modes.popularity_buckets({0: 5.0, 1: 50.0, 2: 1.0, 3: 20.0, 4: 20.0, 5: 0.0, 6: 7.0})
    # 7 interests: 3 head, 2 torso, 2 tail; ties by id
    assert b == {1: "head", 3: "head", 4: "head", 6: "torso", 0: "torso", 2: "tail", 5: "tail"}


def test_mean_by_groups_and_id_lists():
    out = modes.mean_by({"r": np.array([1.0, 0.0, 0.5])}, np.array([1, 1, 3]), range(1, 4))
    assert out == {"1": {"r": 0.5, "rows": 2}, "3": {"r": 0.5, "rows": 1}}
    col = pd.Series([np.array([3, 1]), None, [], np.nan])
    assert modes.id_lists(col, 4) == [[3, 1], [], [], []]
    assert modes.id_lists(None, 2) == [[], []]


def _tiny_split() -> Split:
    """2 users, 6 items in interests 0 (items 0-2) and 1 (items 3-5); user 0 trained on item 0."""
    frame = pd.DataFrame({"user_id": [10, 10, 10, 10, 20, 20, 20],
                          "pin_id": [100, 101, 104, 105, 102, 103, 105],
                          "part": ["train", "test", "test", "test", "train", "test", "valid"]})
    interest = {100: 0, 101: 0, 102: 0, 103: 1, 104: 1, 105: 1}
    return Split.from_frame(frame, items=[100, 101, 102, 103, 104, 105], item_interest=interest)


def test_ranker_best_of_embeddings_and_the_interest_filter():
    split = _tiny_split()
    e = np.eye(6, dtype=np.float32)
    pins = e[None]                                                 # one snapshot: pin i = e_i
    ranker = modes._Ranker(split, np.zeros(2, dtype=np.int64), pins)
    # user 0: two embeddings, one pointing at item 4, one at item 1 (weaker); user 1: item 3
    vectors = np.zeros((2, 2, 6), dtype=np.float32)
    vectors[0, 0] = 2 * e[4] + 0.1 * e[2]
    vectors[0, 1] = e[1]
    vectors[1, 0] = e[3]
    users = np.array([0, 1])
    relevant = split.relevant("test")[users]
    topk, hits = ranker.rank(users, vectors, relevant, depth=3)
    # a pin's score is its best inner product over the user's embeddings; the train item 0 is excluded
    assert topk[0].tolist() == [4, 1, 2]
    assert hits[0].tolist() == [True, True, False]
    # user 1's validation item 5 is excluded for the test ranking, so is train item 2
    assert 5 not in topk[1] and 2 not in topk[1] and topk[1, 0] == 3
    # per-interest: user 0 conditioned on interest 1, only interest-1 candidates, relevant = its items of 1
    rows, interest = modes._pairs(relevant, split.item_interest)
    assert rows.tolist() == [0, 0, 1] and interest.tolist() == [0, 1, 1]
    pair_rel = modes._restrict(relevant[rows], split.item_interest, interest)
    assert [sorted(r.indices) for r in pair_rel] == [[1], [4, 5], [3]]
    topk, hits = ranker.rank(users[rows], vectors[rows], pair_rel, only=interest, depth=3)
    assert set(topk[0][topk[0] >= 0]) <= {1, 2} and set(topk[1][topk[1] >= 0]) <= {3, 4, 5}
    rec = modes.capped_recalls(hits, np.diff(pair_rel.indptr), (1,))["capped_recall@1"]
    assert rec.tolist() == [1.0, 1.0, 1.0]


def test_merge_per_user_keeps_the_fallback_without_conditions():
    lists = np.array([[1, 2], [3, 4], [5, 6]])
    owner = np.array([0, 0, 2])
    fallback = np.array([[9, 8], [7, 6], [0, 0]])
    out = modes._merge_per_user(lists, owner, fallback, np.array([True, False, True]), depth=2)
    assert out.tolist() == [[1, 3], [7, 6], [5, 6]]


class _Tower(torch.nn.Module):
    """A stand-in user tower with the serving signature: two embeddings (the second one only for rows with
    v[1] == 0) and a
    condition that adds the interest id to every coordinate."""

    conditional = True

    def forward(self, x, with_mask=False):
        base = x["v"][:, None, :].repeat(1, 2, 1)
        base = base + x.get("condition", torch.zeros(len(base), dtype=torch.long))[:, None, None].float()
        keep = torch.stack([torch.ones(len(base), dtype=torch.bool), x["v"][:, 1] == 0], 1)
        out = base * keep[..., None].float()
        return (out, keep) if with_mask else out


def test_user_embeddings_use_the_serving_call_and_conditions():
    x = {"v": torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])}
    vecs, mask = modes.user_embeddings(_Tower(), x, batch=2)
    assert vecs.shape == (3, 2, 2) and mask.tolist() == [[True, True], [True, False], [True, False]]
    assert vecs[1, 1].tolist() == [0.0, 0.0]
    cond = modes._conditioned(_Tower(), x, np.array([2, 0]), np.array([4, 0]))
    assert cond.shape == (2, 1, 2) and cond[:, 0].tolist() == [[6.0, 6.0], [2.0, 1.0]]    # interest + 1 added


def test_aggregate_and_markdown():
    run = {"k_max": 2, "users": 2, "embeddings_per_user": 1.5,
           "scoring": {"max": {"capped_recall@10": 0.2, "capped_recall@50": 0.4, "capped_recall@100": 0.5,
                               "distinct_interests@50": 3.0, "ild@50": 0.5, "coverage@50": 0.1},
                       "round_robin": {"capped_recall@10": 0.1, "capped_recall@50": 0.3, "capped_recall@100": 0.5,
                                       "distinct_interests@50": 4.0, "ild@50": 0.6, "coverage@50": 0.2}},
           "first_k": {"1": {"capped_recall@10": 0.1, "capped_recall@50": 0.2, "capped_recall@100": 0.3},
                       "2": {"capped_recall@10": 0.2, "capped_recall@50": 0.4, "capped_recall@100": 0.5}},
           "by_dominant": {"1": {"capped_recall@50": 0.5, "rows": 1}},
           "per_interest": {"unconditioned": {"overall": {"capped_recall@10": 0.3, "capped_recall@50": 0.6,
                                                          "rows": 4},
                                              "head": {"capped_recall@10": 0.4, "capped_recall@50": 0.7, "rows": 2}}},
           "buckets": {"head": [1], "torso": [0], "tail": [2]},
           "conditions": {"none (single list)": {"capped_recall@10": 0.2, "capped_recall@50": 0.4,
                                                 "capped_recall@100": 0.5, "users_with": 2}}}
    other = {**run, "scoring": {**run["scoring"], "max": {**run["scoring"]["max"], "capped_recall@10": 0.4}}}
    agg = modes.aggregate([run, other])
    assert agg["mean"]["scoring/max/capped_recall@10"] == pytest.approx(0.3)
    assert agg["std"]["scoring/max/capped_recall@10"] == pytest.approx(np.std([0.2, 0.4], ddof=1))
    assert "buckets/head" not in agg["mean"]                       # lists are not figures
    md = "\n".join(modes.markdown({"multi": {"modes": agg}, "plain": {}}))
    assert "| multi | 1.50 | round-robin (as served) | 0.100 ± 0.000 |" in md
    assert "| multi | 2 | 0.200 ± 0.000 | 0.400 ± 0.000 | 0.500 ± 0.000 |" in md
    assert "0.500 ± 0.000 (1)" in md and "| multi | unconditioned + filter | 4 |" in md
    assert "plain" not in md
    assert modes.markdown({"plain": {}}) == []
