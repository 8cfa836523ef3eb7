"""Multi-embedding pieces: maxmin initialisation, single-assignment routing, K by history length, and the
round-robin merge."""

from __future__ import annotations

import torch

from training.model.clustering import k_for_length, maxmin_centres, round_robin, route


def _items() -> tuple[torch.Tensor, torch.Tensor]:
    # three tight groups along three axes; position 0 is the newest item; the last two slots are padding
    e = torch.eye(3)
    rows = [e[0], e[0] * 0.9 + 0.1 * e[1], e[1], e[1] * 0.95, e[2], e[0] * 1.1, torch.zeros(3), torch.zeros(3)]
    items = torch.stack(rows).unsqueeze(0)
    valid = torch.tensor([[True] * 6 + [False] * 2])
    return items, valid


def test_maxmin_starts_at_the_newest_item_spreads_and_never_picks_padding():
    items, valid = _items()
    idx, ok = maxmin_centres(items, valid, 3)
    assert idx[0, 0].item() == 0                     # the newest valid item
    groups = {0: 0, 1: 0, 5: 0, 2: 1, 3: 1, 4: 2}
    assert {groups[i] for i in idx[0].tolist()} == {0, 1, 2} and ok.all()   # one centre per group
    idx, ok = maxmin_centres(items, valid, 8)
    assert ok[0].tolist() == [True] * 6 + [False] * 2 and not set(idx[0, :6].tolist()) & {6, 7}
    # a history that starts with padding: the first centre is the first valid item
    shifted, shifted_valid = items.roll(2, dims=1), valid.roll(2, dims=1)
    assert maxmin_centres(shifted, shifted_valid, 1)[0][0, 0].item() == 2


def test_routing_assigns_each_item_to_exactly_one_cluster():
    items, valid = _items()
    clusters, ok, assign = route(items, valid, 3, iterations=3)
    assert clusters.shape == (1, 3, 3) and ok.all()
    a = assign[0].tolist()
    assert a[6:] == [-1, -1] and all(0 <= c < 3 for c in a[:6])      # every valid item in one cluster, padding none
    assert a[0] == a[1] == a[5] and a[2] == a[3] and len({a[0], a[2], a[4]}) == 3
    torch.testing.assert_close(clusters.norm(dim=-1), torch.ones(1, 3))
    # gradient reaches the items through the cluster means
    leaf = items.clone().requires_grad_(True)
    route(leaf, valid, 3)[0].sum().backward()
    assert leaf.grad[0, :6].abs().sum() > 0 and leaf.grad[0, 6:].abs().sum() == 0


def test_a_limit_routes_every_item_among_the_first_clusters_only():
    items, valid = _items()
    clusters, ok, assign = route(items, valid, 3, iterations=3, limit=torch.tensor([2]))
    a = assign[0].tolist()
    assert ok[0].tolist() == [True, True, False] and (clusters[0, 2] == 0).all()
    assert all(c in (0, 1) for c in a[:6]) and a[6:] == [-1, -1]     # no valid item is left in a dropped cluster


def test_k_by_history_length():
    assert [k_for_length(n, 4) for n in (0, 1, 2, 3, 4, 5, 8, 9, 100)] == [1, 1, 1, 2, 2, 3, 3, 4, 4]
    assert k_for_length(torch.tensor([0, 1, 2, 3, 4, 5, 8, 9, 100]), 4).tolist() == [1, 1, 1, 2, 2, 3, 3, 4, 4]


def test_round_robin_merge_order_dedup_and_source():
    a = [{"pin_id": 1}, {"pin_id": 2}, {"pin_id": 3}]
    b = [{"pin_id": 2}, {"pin_id": 4}]
    c = [{"pin_id": 5}, {"pin_id": 1}, {"pin_id": 6}]
    merged = round_robin([a, b, c], k=5)
    assert [h["pin_id"] for h in merged] == [1, 2, 5, 4, 3]          # 1st of each, then 2nd of each, no repeats
    assert [h["source"] for h in merged] == [0, 1, 2, 1, 0]
    assert [h["pin_id"] for h in round_robin([a, b, c], k=100)] == [1, 2, 5, 4, 3, 6]
