"""Towers, the in-batch softmax, the logQ correction and the streaming frequency estimate."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from training.model.encoding import Encoder
from training.model.two_tower import StreamingFrequency, TwoTower, in_batch_softmax_loss


def frame(n: int = 6) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    return pd.DataFrame({
        "user_id": np.arange(n), "pin_id": 100 + np.arange(n) % 4, "age": [0, 25, 33, 70, 41, 19][:n],
        "gender": ["f", "m", "u", "f", None, "m"][:n], "segment": ["a", "b", "a", "c", "b", "a"][:n],
        "engagements_7d": rng.integers(0, 5, n), "engagements_30d": rng.integers(0, 20, n),
        "saves_30d": rng.integers(0, 5, n), "hides_30d": rng.integers(0, 3, n),
        "history_length": [0, 1, 2, 3, 60, 2][:n],
        "recent_pin_ids": [None, [101], [102, 999], [100, 101, 102], list(range(100, 160)), [103, 100]][:n],
        "recent_pin_ages_days": [None, [0.1], [0.5, 3.0], [1, 2, 3], [0.01] * 60, [10.0, 100.0]][:n],
        "top_interest_ids": [[], [1], [2, 3], [0, 1, 2], [4], [3, 1]][:n],
        "interest_id": [0, 1, 2, 3, 4, 0][:n], "decayed_engagement": rng.random(n) * 10,
        "pin_impressions_30d": rng.integers(0, 100, n), "pin_engagements_30d": rng.integers(0, 10, n),
        "pin_saves_30d": rng.integers(0, 5, n), "age_days": rng.random(n) * 30,
    })


def test_encoder_pads_truncates_and_maps_unknown_ids_to_zero():
    df = frame()
    enc = Encoder.fit(df, n_interests=5, history_length=50, top_interests=3)
    users = enc.users(df)
    assert users["seq"].shape == (6, 50) and users["seq"].dtype == torch.int64
    assert users["seq_valid"][0].sum() == 0                       # no history
    assert users["seq_valid"][2].tolist()[:2] == [True, False]    # 999 is unknown -> masked
    assert users["seq_valid"][4].sum() == 4                       # only 100..103 are in the vocabulary
    assert users["seq"][3, :3].tolist() == [1, 2, 3]              # 1-based positions in the sorted vocabulary
    assert users["top_interests"][0].tolist() == [0, 0, 0] and users["top_interests"][2].tolist()[:2] == [3, 4]
    assert Encoder.from_state(enc.state()).state() == enc.state()
    pins = enc.pins(df)
    assert pins["pin"].tolist() == [1, 2, 3, 4, 1, 2] and pins["interest"].tolist() == [1, 2, 3, 4, 5, 1]


def test_towers_output_unit_vectors_of_the_shared_dimension():
    df = frame()
    enc = Encoder.fit(df, n_interests=5)
    model = TwoTower(enc.n_pins, enc.n_interests, len(enc.genders), len(enc.segments), id_embed_dim=16, out_dim=8)
    model.eval()
    u, p = model(enc.users(df), enc.pins(df))
    assert u.shape == (6, 8) and p.shape == (6, 8)
    torch.testing.assert_close(u.norm(dim=1), torch.ones(6))
    torch.testing.assert_close(p.norm(dim=1), torch.ones(6))
    assert model.user_tower.pin_embedding is model.pin_tower.pin_embedding  # one id table for both towers


def test_sequence_dropout_acts_in_training_only():
    df = frame()
    enc = Encoder.fit(df, n_interests=5)
    users = enc.users(df)
    model = TwoTower(enc.n_pins, enc.n_interests, len(enc.genders), len(enc.segments), id_embed_dim=16, out_dim=8,
                     seq_dropout=0.5)
    model.eval()
    torch.testing.assert_close(model.user_tower(users), model.user_tower(users))
    model.train()
    torch.manual_seed(0)                                                # dropout = 0: no other randomness
    outs = [model.user_tower(users) for _ in range(4)]
    assert any(not torch.allclose(outs[0][4], o[4]) for o in outs[1:])   # row 4 has a history: it varies
    assert all(torch.isfinite(o).all() for o in outs)                   # rows left without history stay finite


def test_logq_correction_shifts_every_logit_by_minus_log_q():
    torch.manual_seed(0)
    u, p = F.normalize(torch.randn(5, 4), dim=1), F.normalize(torch.randn(5, 4), dim=1)
    log_q = torch.log(torch.tensor([0.5, 0.1, 0.05, 0.3, 0.05]))
    got = in_batch_softmax_loss(u, p, temperature=0.1, log_q=log_q)
    logits = u @ p.T / 0.1 - log_q[None, :]
    assert got.item() == pytest.approx(F.cross_entropy(logits, torch.arange(5)).item(), rel=1e-6)
    # a constant q changes nothing: only relative sampling probabilities matter
    flat = in_batch_softmax_loss(u, p, 0.1, log_q=torch.full((5,), -2.0))
    assert flat.item() == pytest.approx(in_batch_softmax_loss(u, p, 0.1).item(), rel=1e-6)
    # a popular negative (high q) is penalized less than without the correction
    plain = (u @ p.T / 0.1).softmax(1)[0, 3]
    corrected = (u @ p.T / 0.1 - log_q[None, :]).softmax(1)[0, 3]
    assert corrected < plain


def test_other_rows_copies_of_the_positive_are_not_negatives():
    u = F.normalize(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]), dim=1)
    p = u.clone()
    ids = torch.tensor([7, 8, 7])
    masked = in_batch_softmax_loss(u, p, 0.5, pin_ids=ids)
    logits = u @ p.T / 0.5
    logits[0, 2] = logits[2, 0] = float("-inf")
    assert masked.item() == pytest.approx(F.cross_entropy(logits, torch.arange(3)).item(), rel=1e-6)


def test_streaming_frequency_estimates_the_per_batch_probability():
    est = StreamingFrequency(buckets=1024, alpha=0.05, initial_gap=100.0)
    for step in range(1, 2001):
        ids = [1] + ([2] if step % 4 == 0 else []) + ([3] if step % 20 == 0 else [])
        est.update(torch.tensor(ids))
    q = est.log_q(torch.tensor([1, 2, 3])).exp()
    assert q.tolist() == pytest.approx([1.0, 0.25, 0.05], rel=0.1)


def test_mixed_negatives_extend_the_softmax_with_their_own_correction():
    torch.manual_seed(1)
    u, p = F.normalize(torch.randn(3, 4), dim=1), F.normalize(torch.randn(3, 4), dim=1)
    extra = F.normalize(torch.randn(2, 4), dim=1)
    ids, extra_ids = torch.tensor([1, 2, 3]), torch.tensor([2, 9])
    got = in_batch_softmax_loss(u, p, 0.2, pin_ids=ids, extra=extra, extra_log_q=torch.tensor([-1.0, -1.0]),
                                extra_ids=extra_ids)
    logits = torch.cat([u @ p.T / 0.2, u @ extra.T / 0.2 + 1.0], dim=1)
    logits[1, 3] = float("-inf")  # row 1's positive (pin 2) drawn as a random negative is masked
    assert got.item() == pytest.approx(F.cross_entropy(logits, torch.arange(3)).item(), rel=1e-6)
