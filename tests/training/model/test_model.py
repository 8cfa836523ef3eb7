"""Towers, the in-batch softmax, the logQ correction and the streaming frequency estimate."""

from __future__ import annotations

from datetime import datetime

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from training.config import TrainConfig
from training.model.backbones import MaskBlock, ParallelMaskNet
from training.model.encoding import PIN_COUNT_COLUMNS, PIN_IMPRESSION_RATE, PIN_NUMERIC, Encoder
from training.model.pretrained import PretrainedError, PretrainedTable, check_window, latest_usable
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


def tc(**kw) -> TrainConfig:
    base = dict(id_embed_dim=16, field_dim=8, hidden_dim=32, out_dim=8, dropout=0.0, seq_dropout=0.0,
                pretrained="none", window_fraction=1.0, wide_counts=False, wide_interest=False)
    return TrainConfig(**{**base, **kw})


def build(df: pd.DataFrame, table: PretrainedTable | None = None, **kw) -> tuple[Encoder, TwoTower]:
    enc = Encoder.fit(df, n_interests=5, extra_pin_ids=None if table is None else table.pin_ids,
                      user_ids=None if table is None else table.user_ids)
    torch.manual_seed(0)
    tables = None if table is None else table.aligned(enc.pin_ids, enc.user_ids)
    return enc, TwoTower(enc.n_pins, enc.n_interests, len(enc.genders), len(enc.segments), tc(**kw), 50, tables)


def test_encoder_pads_truncates_and_maps_unknown_ids_to_zero():
    df = frame()
    enc = Encoder.fit(df, n_interests=5, history_length=50, top_interests=3)
    users = enc.users(df)
    assert users["seq"].shape == (6, 50) and users["seq"].dtype == torch.int64
    assert users["seq_valid"][0].sum() == 0                       # no history
    assert users["seq_valid"][4].sum() == 50                      # 60 items truncated to the newest 50
    assert users["seq"][3, :3].tolist() == [1, 2, 3]              # 1-based positions in the sorted vocabulary
    assert users["top_interests"][0].tolist() == [0, 0, 0] and users["top_interests"][2].tolist()[:2] == [3, 4]
    # history items carry their pin's interest (+1); 999 is in the vocabulary (a history pin) but has no interest
    assert users["seq_interest"][3, :3].tolist() == [1, 2, 3] and users["seq_interest"][2, :2].tolist() == [3, 0]
    unknown = enc.users(df.assign(recent_pin_ids=[[5555]] * 6, recent_pin_ages_days=[[1.0]] * 6))
    assert unknown["seq_valid"].sum() == 0                        # never seen in training: masked
    state = Encoder.from_state(enc.state()).state()
    assert {k: (v.tolist() if torch.is_tensor(v) else v) for k, v in state.items()} == {
        k: (v.tolist() if torch.is_tensor(v) else v) for k, v in enc.state().items()}
    pins = enc.pins(df)
    assert pins["interest"].tolist() == [1, 2, 3, 4, 5, 1]
    # the online store's answer (column -> list, no DataFrame on the request path) encodes identically
    for i in range(len(df)):
        online = {c: [df[c].iloc[i]] for c in df.columns}
        for name, tensor in enc.users(online).items():
            assert torch.equal(tensor, users[name][i:i + 1]), (i, name)


def test_pin_counts_are_also_read_as_rates_over_the_exposed_days():
    now = pd.Timestamp("2026-06-30", tz="UTC")
    df = pd.DataFrame({"pin_id": [1, 2, 3, 4, 5], "interest_id": [0] * 5, "decayed_engagement": [0.0] * 5,
                       "pin_impressions_30d": [20, 20, 0, 20, None], "pin_engagements_30d": [4, 4, 0, 4, None],
                       "pin_saves_30d": [1, 1, 0, 1, None], "age_days": [2.0, 400.0, 0.0, 2.0, None],
                       "pin_features_at": [now, now, now, now - pd.Timedelta(days=10), pd.NaT],
                       "event_timestamp": now})
    enc = Encoder.fit(df.assign(user_id=0), n_interests=1)
    counts = enc.pins(df)["counts"].double()
    assert counts.shape == (5, PIN_NUMERIC)
    stale, rates = counts[:, len(PIN_COUNT_COLUMNS)], counts[:, len(PIN_COUNT_COLUMNS) + 1:]
    n = torch.tensor([20.0, 4.0, 1.0], dtype=torch.float64) + 0.5
    torch.testing.assert_close(rates[0], torch.log(n / 2.5))      # 20 impressions in a 2-day life
    torch.testing.assert_close(rates[1], torch.log(n / 30.5))     # an old pin's are 20 in the 30-day window
    assert rates[2].abs().max() == 0                              # just created, nothing yet: no evidence either way
    # the row is 10 days old at scoring time: 10 idle days since, the pin is 12 days old
    torch.testing.assert_close(stale, torch.tensor([0.0, 0.0, 0.0, np.log1p(10.0), 0.0], dtype=torch.float64))
    torch.testing.assert_close(rates[3], torch.log(n / 12.5))
    # no feature row at all: an old idle pin (window-long exposure), not a new one
    torch.testing.assert_close(rates[4], torch.full((3,), np.log(0.5 / 30.5), dtype=torch.float64))
    # an explicit scoring time (publish: the snapshot's end) replaces each row's event time
    later = enc.pins(df, now=now + pd.Timedelta(days=5))["counts"].double()
    torch.testing.assert_close(later[0, len(PIN_COUNT_COLUMNS)], torch.tensor(np.log1p(5.0), dtype=torch.float64))
    # a frame without the count or time columns (an unknown pin) still encodes
    assert enc.pins(df[["pin_id", "interest_id"]])["counts"].shape == (5, PIN_NUMERIC)


@pytest.mark.parametrize("backbone", ["mlp", "masknet", "dhen"])
@pytest.mark.parametrize("normalize, pin_bias", [(True, False), (True, True), (False, True)])
def test_towers_output_vectors_of_the_shared_dimension(backbone, normalize, pin_bias):
    df = frame()
    enc, model = build(df, backbone=backbone, normalize=normalize, pin_bias=pin_bias)
    model.eval()
    (u, _), p, _, _ = model(enc.users(df), enc.pins(df))
    assert u.shape == (6, 8) and p.shape == (6, 8)
    assert model.user_tower.pin_embedding is model.pin_tower.pin_embedding  # one id table for both towers
    if pin_bias:
        assert (u[:, -1] == 1).all()                                      # the user's bias coordinate
        head_u, head_p = u[:, :-1], p[:, :-1]
    else:
        head_u, head_p = u, p
    if normalize:
        torch.testing.assert_close(head_u.norm(dim=1), torch.ones(6))
        torch.testing.assert_close(head_p.norm(dim=1), torch.ones(6))


@pytest.mark.parametrize("backbone", ["mlp", "masknet", "dhen"])
def test_every_branch_of_the_backbone_receives_gradient(backbone):
    df = frame()
    enc, model = build(df, backbone=backbone, history_encoder="transformer")
    model.train()
    (u, _), p, _, _ = model(enc.users(df), enc.pins(df))
    in_batch_softmax_loss(u, p, model.scale).backward()
    silent = [n for n, prm in model.named_parameters()
              if prm.requires_grad and (prm.grad is None or not prm.grad.abs().sum() > 0)
              and not n.endswith(("age.weight", "gender.weight", "segment.weight", "recency.weight"))
              and "embedding" not in n]
    assert not silent, silent   # every layer of every branch (MLP, MaskNet blocks, transformer) learns


def test_masknet_block_is_mlp_b_of_x_times_mlp_a_of_x():
    torch.manual_seed(0)
    block = MaskBlock(width=6, hidden=4, dropout=0.0)
    x = torch.randn(3, 6)
    torch.testing.assert_close(block(x), block.out(x * block.mask(x)))
    net = ParallelMaskNet(width=6, hidden=4, blocks=4, dropout=0.0)
    assert net(x).shape == (3, 4)


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_parallel_masknet_is_its_blocks_side_by_side_on_both_paths_and_reads_per_block_checkpoints(dropout):
    torch.manual_seed(0)
    blocks = [MaskBlock(width=6, hidden=4, dropout=dropout).eval() for _ in range(4)]
    net = ParallelMaskNet(width=6, hidden=4, blocks=4, dropout=dropout).eval()
    for p in net.bottleneck.parameters():
        torch.nn.init.normal_(p)
    # a checkpoint written when the blocks were modules of their own
    old = {f"blocks.{i}.{k}": v for i, b in enumerate(blocks) for k, v in b.state_dict().items()}
    old.update({f"bottleneck.{k}": v for k, v in net.bottleneck.state_dict().items()})
    fresh = ParallelMaskNet(width=6, hidden=4, blocks=4, dropout=dropout).eval()
    fresh.load_state_dict(old)
    x = torch.randn(ParallelMaskNet.STACKED_ROWS + 1, 6)   # one row past the stacked path: the block loop
    expected = net.bottleneck(torch.cat([b(x) for b in blocks], dim=-1))
    torch.testing.assert_close(fresh(x), expected)
    torch.testing.assert_close(fresh(x[:3]), expected[:3])                 # the stacked path: the same function
    fresh.train()
    torch.manual_seed(1)
    fresh(x[:3]).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in fresh.parameters())


def test_a_warm_start_reads_masknet_blocks_from_a_checkpoint_written_before_they_were_stacked():
    from training.model.checkpoint import warm_start

    df = frame()
    enc, model = build(df, backbone="dhen")                  # a ParallelMaskNet in both towers' first layer
    stacked = model.state_dict()
    per_block = dict(stacked)                                 # the same weights as the per-block modules held them
    nets = [(name, m) for name, m in model.named_modules() if isinstance(m, ParallelMaskNet)]
    assert len(nets) == 2
    for prefix, net in nets:
        for name, path in net._paths.items():
            for part in ("weight", "bias"):
                transpose = name in net._LAYERS and part == "weight"
                for i, t in enumerate(per_block.pop(f"{prefix}.{name}_{part}")):
                    per_block[f"{prefix}.blocks.{i}.{path}.{part}"] = t.T if transpose else t[0]
    counts = {}
    for source in (stacked, per_block):
        _, target = build(df, backbone="dhen")
        with torch.no_grad():
            for p in target.parameters():
                p.add_(1.0)
        counts[len(source)] = warm_start(target, enc, {"encoder": enc.state(), "model": source})
        assert all(torch.equal(v, stacked[k]) for k, v in target.state_dict().items()), "a tensor was left fresh"
    assert counts[len(per_block)] == counts[len(stacked)] and counts[len(stacked)]["fresh"] == 0
    assert len(per_block) > len(stacked) and any(".blocks.3.mask.0.weight" in k for k in per_block)


def test_sequence_dropout_acts_in_training_only():
    df = frame()
    enc, model = build(df, seq_dropout=0.5)
    users = enc.users(df)
    model.eval()
    torch.testing.assert_close(model.user_tower(users), model.user_tower(users))
    model.train()
    torch.manual_seed(0)                                                # dropout = 0: no other randomness
    outs = [model.user_tower(users) for _ in range(4)]
    assert any(not torch.allclose(outs[0][4], o[4]) for o in outs[1:])   # row 4 has a history: it varies
    assert all(torch.isfinite(o).all() for o in outs)                   # rows left without history stay finite


def test_pin_id_dropout_reads_pins_as_unknown_in_training_only():
    df = frame()
    table = _table(df)
    enc, model = build(df, table=table, pretrained="frozen", pretrained_dropout=0.0, window_fraction=0.5,
                       pin_id_dropout=0.999999)
    pins = enc.pins(df)
    unknown = {**pins, "pin": torch.zeros_like(pins["pin"])}           # every id unknown, the features kept
    model.train()
    torch.testing.assert_close(model.pin_tower(pins), model.pin_tower(unknown))   # ids (and table rows) dropped
    model.eval()
    torch.testing.assert_close(model.pin_tower(pins), model.pin_tower(pins))
    assert not torch.allclose(model.pin_tower(pins), model.pin_tower(unknown))    # serving reads the ids


def test_wide_counts_enter_the_pin_bias_linearly_and_start_at_zero():
    df = frame()
    enc, model = build(df, wide_counts=True)
    _, plain = build(df)
    missing, unexpected = model.load_state_dict(plain.state_dict(), strict=False)   # the same deep weights
    assert not unexpected and sorted(missing) == ["pin_tower.wide.bias", "pin_tower.wide.weight"]
    pins = enc.pins(df)
    model.eval()
    plain.eval()
    torch.testing.assert_close(model.pin_tower(pins), plain.pin_tower(pins))   # zero-initialised: no change yet
    with torch.no_grad():
        model.pin_tower.wide.weight.zero_()
        model.pin_tower.wide.weight[0, 0] = 2.0
    shifted = model.pin_tower(pins)
    torch.testing.assert_close(shifted[:, :-1], plain.pin_tower(pins)[:, :-1])
    unit = model.pin_tower.logit_unit                                  # one logit at the initial temperature
    torch.testing.assert_close(shifted[:, -1] - plain.pin_tower(pins)[:, -1], unit * 2.0 * pins["counts"][:, 0])


def test_the_popularity_prior_adds_its_weight_times_the_log_impression_rate_to_the_pin_bias_only():
    df = frame()
    enc, model = build(df, wide_counts=True)
    model.eval()
    pins = enc.pins(df)
    assert "pin_tower.prior" in dict(model.named_buffers())              # a buffer: kept in the checkpoint, not trained
    before = model.pin_tower(pins)
    model.pin_tower.set_prior(0.3)
    after = model.pin_tower(pins)
    torch.testing.assert_close(after[:, :-1], before[:, :-1])          # every coordinate but the bias is unchanged
    rate = pins["counts"][:, PIN_IMPRESSION_RATE]
    expected = np.log((df["pin_impressions_30d"] + 0.5) / (np.minimum(df["age_days"], 30.0) + 0.5))
    np.testing.assert_allclose(rate.numpy(), expected, rtol=1e-5)       # the 30-day impressions per exposed day
    torch.testing.assert_close(after[:, -1] - before[:, -1], model.pin_tower.logit_unit * 0.3 * rate)
    users = model.user_tower(enc.users(df))
    assert (users[:, -1] == 1).all()                                   # the user side's bias coordinate stays 1
    _, without = build(df, wide_counts=True, popularity_prior=False)
    assert without.pin_tower.prior is None and "pin_tower.prior" not in without.state_dict()
    with pytest.raises(ValueError, match="no popularity prior"):
        without.pin_tower.set_prior(0.1)
    _, no_bias = build(df, pin_bias=False)                              # no bias coordinate to carry it
    assert no_bias.pin_tower.prior is None


def test_wide_interest_cross_adds_the_scaled_log_share_of_the_pins_interest():
    df = frame()
    enc, model = build(df, wide_interest=True, multi_embedding=0)
    model.eval()
    users, pins = enc.users(df), enc.pins(df)
    u, p = model.user_tower(users), model.pin_tower(pins)
    k = enc.n_interests
    assert model.user_tower.learned_dim == model.pin_tower.learned_dim == 8 + k == u.shape[1] == p.shape[1]
    cross_u, cross_p = u[:, 8:], p[:, 8:]
    torch.testing.assert_close(cross_p, F.one_hot(pins["interest"], k + 1)[:, 1:].float())
    counts = torch.zeros(len(df), k + 1).scatter_add_(1, users["seq_interest"], users["seq_valid"].float())[:, 1:]
    shares = (counts + 0.1) / (counts.sum(1, keepdim=True) + 0.1 * k)
    torch.testing.assert_close(cross_u, model.user_tower.cross_scale * torch.log(shares))
    # the cross's part of a score: scale * log share of the pin's interest
    part = cross_u @ cross_p.T
    i = int(pins["interest"][2]) - 1
    torch.testing.assert_close(part[3, 2], model.user_tower.cross_scale * torch.log(shares[3, i]))
    unknown = model.pin_tower({**pins, "interest": torch.zeros_like(pins["interest"])})[:, 8:]
    torch.testing.assert_close(cross_u @ unknown.T,                  # unknown interest: the mean log share, no boost
                               (model.user_tower.cross_scale * torch.log(shares).mean(1))[:, None].expand(6, 6))


def test_impressions_by_interest_are_encoded_densely_and_counted_in_the_cross_only_when_switched_on():
    df = frame().assign(impressed_interest_ids=[None, [0, 3], [2], [], [4, 1], [1]],
                        impressed_interest_counts=[None, [5, 2], [7], [], [1, 9], [3]])
    enc, model = build(df, wide_interest=True, multi_embedding=0)
    users = enc.users(df)
    k = enc.n_interests
    assert users["impressed"].shape == (6, k + 1)                      # column interest + 1; 0 (unknown) stays 0
    assert users["impressed"][1].tolist() == [0, 5, 0, 0, 2, 0] and users["impressed"][0].sum() == 0
    assert users["impressed"][4].tolist() == [0, 0, 9, 0, 0, 1]
    assert enc.users(frame())["impressed"].sum() == 0                 # rows without the feature: nothing shown
    with pytest.raises(ValueError, match="differ in length"):
        enc.users(df.assign(impressed_interest_counts=[None, [5], [7], [], [1, 9], [3]]))
    model.eval()
    history = torch.zeros(6, k + 1).scatter_add_(1, users["seq_interest"], users["seq_valid"].float())

    def expected_cross(counts):
        c = counts[:, 1:]
        return model.user_tower.cross_scale * torch.log((c + 0.1) / (c.sum(1, keepdim=True) + 0.1 * k))

    torch.testing.assert_close(model.user_tower(users)[:, 8:], expected_cross(history + users["impressed"]))
    _, off = build(df, wide_interest=True, multi_embedding=0, impression_interests=False)
    off.eval()
    torch.testing.assert_close(off.user_tower(users)[:, 8:], expected_cross(history))
    # the deep part does not read them: only the cross moves
    torch.testing.assert_close(model.user_tower(users)[:, :8], off.user_tower(users)[:, :8])


def _table(df: pd.DataFrame, end: str = "2026-01-01T00:00:00+00:00") -> PretrainedTable:
    pins = np.array([100, 101, 102, 103], np.int64)
    rng = np.random.default_rng(1)
    return PretrainedTable(table_id="t1", method="ease_svd", window_start="2025-01-01T00:00:00+00:00",
                           window_end=end, pin_ids=pins, context=rng.normal(size=(4, 3)).astype(np.float32),
                           target=rng.normal(size=(4, 3)).astype(np.float32), user_ids=np.array([1, 2], np.int64),
                           users=rng.normal(size=(2, 3)).astype(np.float32), meta={})


def test_frozen_pretrained_tables_are_aligned_dropped_out_and_blended():
    df = frame()
    table = _table(df)
    enc, model = build(df, table=table, pretrained="frozen", pretrained_dropout=0.5, window_fraction=0.5)
    frozen = [n for n, _ in model.named_parameters() if n.endswith(("pretrained.weight", "pretrained_users.weight"))]
    assert not frozen and "pin_tower.pretrained.weight" in dict(model.named_buffers())   # buffers: no gradient
    aligned = model.pin_tower.pretrained.weight
    assert aligned.shape == (enc.n_pins, 3) and aligned[0].abs().sum() == 0     # row 0 = unknown / padding
    torch.testing.assert_close(aligned[1 + int(np.searchsorted(enc.pin_ids, 102))], torch.from_numpy(table.target[2]))
    model.eval()
    (u, _), p, _, _ = model(enc.users(df), enc.pins(df))
    assert u.shape == (6, 8 + 3)                                        # learned space + pre-trained subspace
    assert u[:, 8:].abs().sum() == 0                                    # blend (1, 0) while training
    for tower in (model.user_tower, model.pin_tower):
        tower.set_blend(0.0, 1.0)
    (u, _), p, _, _ = model(enc.users(df), enc.pins(df))
    # pre-trained scores alone: u = Σ_r exp(-r/10) P[h_r] over the whole history, p = Q[pin]
    hist = [102, 103]                                                    # row 2: [102, 999] -> 999 unknown
    w = np.exp(-np.arange(2) / 10.0) * np.array([1.0, 0.0])
    pool = sum(wi * table.context[table.pin_ids.tolist().index(h)] if h in table.pin_ids else 0 for wi, h in
               zip(w, [102, 999], strict=True))
    torch.testing.assert_close(u[2, 8:], torch.from_numpy(np.asarray(pool, np.float32)))
    torch.testing.assert_close(p[2, 8:], torch.from_numpy(table.target[2]))
    assert hist   # (documentation of the row used)
    with pytest.raises(ValueError, match="blend weights must be >= 0"):   # √w of a negative weight is a NaN
        model.pin_tower.set_blend(1.0, -0.01)


def test_a_refit_blend_table_changes_the_blended_subspace_only_and_survives_both_artifacts(tmp_path):
    from training.model.checkpoint import export_user_tower, load_checkpoint, load_user_tower, save_user_tower

    df = frame()
    table = _table(df)
    enc, model = build(df, table=table, pretrained="frozen", window_fraction=0.5)
    model.eval()
    for tower in (model.user_tower, model.pin_tower):
        tower.set_blend(1.0, 1.0)
    (u0, _), p0, _, _ = model(enc.users(df), enc.pins(df))
    newer = _table(df)
    newer.context, newer.target = newer.context * -2.0, newer.target + 1.0
    model.set_blend_tables(newer.aligned(enc.pin_ids, enc.user_ids))
    (u1, _), p1, _, _ = model(enc.users(df), enc.pins(df))
    torch.testing.assert_close(u1[:, :8], u0[:, :8])                    # the learned part reads the same fields
    torch.testing.assert_close(p1[:, :8], p0[:, :8])
    torch.testing.assert_close(u1[:, 8:], -2.0 * u0[:, 8:])             # the subspace pools the new history table
    row = 1 + int(np.searchsorted(enc.pin_ids, 102))
    torch.testing.assert_close(p1[2, 8:], torch.from_numpy(newer.target[2]))
    assert model.pin_tower.blend_table.weight.shape == model.pin_tower.pretrained.weight.shape
    assert model.pin_tower.pretrained.weight[row].tolist() == pytest.approx(table.target[2].tolist())
    with pytest.raises(ValueError, match="blended subspace is 3-d"):
        model.pin_tower.set_blend_table(torch.zeros(enc.n_pins, 4))
    with pytest.raises(ValueError, match="rows"):
        model.pin_tower.set_blend_table(torch.zeros(enc.n_pins + 1, 3))
    payload = {"config": __import__("dataclasses").asdict(tc(pretrained="frozen", window_fraction=0.5)),
               "encoder": enc.state(), "model": model.state_dict(), "model_version": "v1",
               "feature_services": {}, "pretrained": {"dim": 3}}
    torch.save(payload, tmp_path / "model.pt")
    loaded, _, _ = load_checkpoint(tmp_path / "model.pt")
    (u2, _), p2, _, _ = loaded(enc.users(df), enc.pins(df))
    torch.testing.assert_close(u2, u1)
    torch.testing.assert_close(p2, p1)
    save_user_tower(export_user_tower(payload, loaded, "c1"), tmp_path / "user_tower.pt")
    tower, _, _ = load_user_tower(tmp_path / "user_tower.pt")
    torch.testing.assert_close(tower(enc.users(df)), u1)


def test_pretrained_window_must_end_by_the_training_window(tmp_path):
    df = frame()
    start = datetime.fromisoformat("2026-01-01T00:00:00+00:00")
    check_window(_table(df, "2026-01-01T00:00:00+00:00"), start)                      # ends exactly there: fine
    with pytest.raises(PretrainedError, match="overlaps the training window"):
        check_window(_table(df, "2026-01-02T00:00:00+00:00"), start)
    check_window(_table(df, "2026-01-02T00:00:00+00:00"), start, allow_overlap=True)  # the ablation only
    old, new, late = (_table(df, e) for e in ("2025-06-01T00:00:00+00:00", "2025-12-01T00:00:00+00:00",
                                              "2026-02-01T00:00:00+00:00"))
    for i, t in enumerate((old, new, late)):
        t.table_id = f"t{i}"
        t.save(tmp_path)
    assert latest_usable(tmp_path, start).table_id == "t1"             # the newest that does not overlap
    with pytest.raises(PretrainedError, match="no pre-trained table .* ends by"):
        latest_usable(tmp_path, datetime.fromisoformat("2025-01-01T00:00:00+00:00"))
    loaded = PretrainedTable.load(tmp_path / "t1")
    np.testing.assert_array_equal(loaded.context, new.context) and loaded.window_end == new.window_end


def test_logq_correction_shifts_every_logit_by_minus_log_q():
    torch.manual_seed(0)
    u, p = F.normalize(torch.randn(5, 4), dim=1), F.normalize(torch.randn(5, 4), dim=1)
    log_q = torch.log(torch.tensor([0.5, 0.1, 0.05, 0.3, 0.05]))
    got = in_batch_softmax_loss(u, p, scale=10.0, log_q=log_q)
    logits = u @ p.T / 0.1 - log_q[None, :]
    assert got.item() == pytest.approx(F.cross_entropy(logits, torch.arange(5)).item(), rel=1e-6)
    # a constant q changes nothing: only relative sampling probabilities matter
    flat = in_batch_softmax_loss(u, p, 10.0, log_q=torch.full((5,), -2.0))
    assert flat.item() == pytest.approx(in_batch_softmax_loss(u, p, 10.0).item(), rel=1e-6)
    # a popular negative (high q) is penalized less than without the correction
    plain = (u @ p.T / 0.1).softmax(1)[0, 3]
    corrected = (u @ p.T / 0.1 - log_q[None, :]).softmax(1)[0, 3]
    assert corrected < plain


def test_other_rows_copies_of_the_positive_are_not_negatives():
    u = F.normalize(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]), dim=1)
    p = u.clone()
    ids = torch.tensor([7, 8, 7])
    masked = in_batch_softmax_loss(u, p, 2.0, pin_ids=ids)
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


def test_primed_frequencies_start_where_the_stream_settles():
    """Priming from an epoch's positives gives each pin the gap the stream measures when batches are drawn from
    them, so the correction is right from the first step; the default alpha takes hundreds of batches to get
    there from the flat guess."""
    gen = torch.Generator().manual_seed(0)
    epoch = torch.cat([torch.full((600,), 1), torch.full((60,), 2), torch.full((6,), 3), torch.arange(10, 344)])
    batch = 64
    primed, flat = StreamingFrequency(buckets=4096), StreamingFrequency(buckets=4096)
    primed.prime(epoch, batch)
    ids = torch.tensor([1, 2, 3])
    expected = 1 - (1 - torch.tensor([600, 60, 6]) / len(epoch)) ** batch
    start = primed.log_q(ids).exp()
    assert start.tolist() == pytest.approx(expected.tolist(), rel=1e-5)
    for _ in range(300):   # about 30 epochs of uniform batches
        drawn = epoch[torch.randint(0, len(epoch), (batch,), generator=gen)]
        primed.update(drawn)
        flat.update(drawn)
    assert primed.log_q(ids).exp().tolist() == pytest.approx(expected.tolist(), rel=0.15)
    assert flat.log_q(ids[:1]).exp().item() < 0.2   # pin 1 is in every batch, the unprimed stream still says 1 in 5
    assert start[0] > 0.99


def test_mixed_negatives_extend_the_softmax_with_their_own_correction():
    torch.manual_seed(1)
    u, p = F.normalize(torch.randn(3, 4), dim=1), F.normalize(torch.randn(3, 4), dim=1)
    extra = F.normalize(torch.randn(2, 4), dim=1)
    ids, extra_ids = torch.tensor([1, 2, 3]), torch.tensor([2, 9])
    got = in_batch_softmax_loss(u, p, 5.0, pin_ids=ids, extra=extra, extra_log_q=torch.tensor([-1.0, -1.0]),
                                extra_ids=extra_ids)
    logits = torch.cat([u @ p.T / 0.2, u @ extra.T / 0.2 + 1.0], dim=1)
    logits[1, 3] = float("-inf")  # row 1's positive (pin 2) drawn as a random negative is masked
    assert got.item() == pytest.approx(F.cross_entropy(logits, torch.arange(3)).item(), rel=1e-6)


def test_a_hard_negative_is_one_more_column_of_its_own_row_only():
    torch.manual_seed(2)
    u, p = F.normalize(torch.randn(3, 4), dim=1), F.normalize(torch.randn(3, 4), dim=1)
    hard = F.normalize(torch.randn(3, 4), dim=1)
    ids, hard_ids = torch.tensor([1, 2, 3]), torch.tensor([5, 6, 3])
    got = in_batch_softmax_loss(u, p, 5.0, pin_ids=ids, hard=hard, hard_valid=torch.tensor([True, False, True]),
                                hard_ids=hard_ids)
    own = (u * hard).sum(-1) / 0.2
    own[1] = float("-inf")   # row 1 has no hide
    own[2] = float("-inf")   # row 2's hide is its own positive (pin 3)
    logits = torch.cat([u @ p.T / 0.2, own.unsqueeze(1)], dim=1)
    assert got.item() == pytest.approx(F.cross_entropy(logits, torch.arange(3)).item(), rel=1e-6)
    # a row's hard negative pushes its own loss up and no other row's
    alone = in_batch_softmax_loss(u, p, 5.0, pin_ids=ids, hard=hard, hard_valid=torch.tensor([True, False, False]))
    base = F.cross_entropy(u @ p.T / 0.2, torch.arange(3), reduction="none")
    with_first = F.cross_entropy(torch.cat([u @ p.T / 0.2, own.unsqueeze(1).masked_fill(
        torch.tensor([[False], [True], [True]]), float("-inf"))], 1), torch.arange(3), reduction="none")
    assert with_first[0] > base[0] and torch.allclose(with_first[1:], base[1:])
    assert alone.item() == pytest.approx(with_first.mean().item(), rel=1e-6)


def test_multi_embedding_users_get_k_by_history_length_and_train_through_the_closest():
    from training.model.two_tower import closest_embedding

    df = frame()
    enc, model = build(df, multi_embedding=3)
    model.eval()
    u, mask = model.user_tower(enc.users(df), with_mask=True)
    assert u.shape == (6, 3, 8) and mask.shape == (6, 3)
    # history lengths 0, 1, 2, 3, 50, 2 -> K = 1, 1, 1, 2, 3, 1 (every user keeps at least the first)
    assert mask.sum(1).tolist() == [1, 1, 1, 2, 3, 1]
    assert (u[~mask] == 0).all() and (u[mask].abs().sum(-1) > 0).all()
    (uu, m), p, _, _ = model(enc.users(df), enc.pins(df))
    picked = closest_embedding(uu, m, p)
    best = (uu * p.unsqueeze(1)).sum(-1).masked_fill(~m, float("-inf")).argmax(1)
    torch.testing.assert_close(picked, uu[torch.arange(6), best])


def test_each_multi_embedding_reads_its_own_clusters_interests_in_the_wide_cross():
    from training.model.clustering import k_for_length, route

    df = frame()
    df.at[4, "recent_pin_ids"] = [100, 101, 102, 103] * 15         # a long history over four interests
    enc, model = build(df, multi_embedding=3, wide_interest=True)
    model.eval()
    x = enc.users(df)
    u, mask = model.user_tower(x, with_mask=True)
    ut = model.user_tower
    items = ut.pin_embedding(x["seq"]) + ut.interest_embedding(x["seq_interest"])   # clustered by content
    _, ok, assign = route(items, x["seq_valid"], 3, ut.routing_iterations, k_for_length(x["seq_valid"].sum(1), 3))
    n = enc.n_interests
    history = x["seq_interest"][4][x["seq_valid"][4]]
    whole = torch.bincount(history, minlength=n + 1)[1:].float()
    for j in range(3):
        if not ok[4, j]:
            continue
        own = torch.bincount(x["seq_interest"][4][(assign[4] == j) & x["seq_valid"][4]], minlength=n + 1)[1:]
        # the cluster's interests keep their share of the whole history (a small cluster is not raised), the
        # others get the floor of an interest never engaged with
        shares = (torch.where(own > 0, whole, 0.0) + 0.1) / (whole.sum() + 0.1 * n)
        torch.testing.assert_close(u[4, j, 8:], ut.cross_scale * torch.log(shares))
    assert mask[4].sum() == 3 and not torch.allclose(u[4, 0, 8:], u[4, 1, 8:])
    # switched off (and in an artifact written before the switch): every embedding reads the whole history's cross
    enc, plain = build(df, multi_embedding=3, wide_interest=True, cluster_features=False)
    plain.eval()
    w = plain.user_tower(x)
    torch.testing.assert_close(w[4, 1, 8:], w[4, 0, 8:])


def test_the_conditioned_tower_changes_with_the_condition_and_none_is_the_unconditioned_use():
    df = frame()
    enc, model = build(df, conditional=True)
    model.eval()
    x = enc.users(df)
    plain = model.user_tower(x)
    none = model.user_tower({**x, "condition": torch.zeros(6, dtype=torch.long)})
    torch.testing.assert_close(plain, none)                 # no condition given = the learned "no condition"
    on = model.user_tower({**x, "condition": torch.full((6,), 3, dtype=torch.long)})
    other = model.user_tower({**x, "condition": torch.full((6,), 4, dtype=torch.long)})
    assert not torch.allclose(on, plain) and not torch.allclose(on, other)


def test_an_artifact_written_before_the_added_switches_rebuilds_without_them():
    from dataclasses import asdict

    from training.model.checkpoint import ADDED_SWITCHES, train_config

    old = {k: v for k, v in asdict(tc()).items() if k not in ADDED_SWITCHES}
    assert all(getattr(train_config(old), k) == v for k, v in ADDED_SWITCHES.items())
    new = tc(wide_counts=True, wide_interest=True, pin_rates=True)
    assert train_config(asdict(new)) == new                          # a current artifact keeps what it says
    enc, model = build(frame(), wide_counts=True, pin_rates=False)     # the old pin tower: log counts and age only
    assert model.pin_tower.wide.in_features == len(PIN_COUNT_COLUMNS)
    assert model.pin_tower(enc.pins(frame())).shape[0] == len(frame())


def test_a_blend_weight_is_kept_only_when_its_cross_fitted_gain_is_above_one_standard_error():
    from training.train import BLEND_GRID, gated_best

    rng = np.random.default_rng(0)
    learned = rng.random(2000)
    clear = learned + rng.normal(0.05, 0.05, 2000)            # +.05 for the average user, SE ≈ .05 / √2000
    best, gain, se = gated_best({0.0: learned, 0.3: learned.copy(), 3.0: clear, float("inf"): clear - 0.01})
    assert best == 3.0 and gain > 10 * se
    assert gated_best({0.0: learned, 0.1: learned.copy()})[0] == 0.0   # a tie goes to the earlier weight
    best, gain, se = gated_best({0.0: learned, 1.0: learned + 0.5})  # every user gains the same: no noise at all
    assert best == 1.0 and gain == pytest.approx(0.5) and se == pytest.approx(0.0, abs=1e-9)
    # No weight helps, each is the towers' recall plus its own noise: the best weight's own paired gain clears one
    # SE most of the time (the winner's curse); measured on the users that did not choose it, rarely.
    naive = kept = 0
    for trial in range(40):
        g = np.random.default_rng(trial)
        base = g.random(1000)
        per_user = {w: base if w == 0.0 else base + g.normal(0.0, 0.05, 1000) for w in BLEND_GRID}
        best, gain, se = gated_best(per_user)
        diff = per_user[best] - base
        naive += diff.mean() > diff.std(ddof=1) / np.sqrt(len(diff))
        kept += best != 0.0 and gain > se
    assert naive >= 30 and kept <= 12, (naive, kept)


def test_the_popularity_prior_is_chosen_on_validation_and_kept_only_above_its_standard_error(monkeypatch):
    import training.train as train_module

    df = frame()
    _, model = build(df, wide_counts=True)
    rng = np.random.default_rng(0)
    base = rng.random(3000)

    class Scorer:   # per-user validation recall as a function of the prior weight a view of it ranks with
        def __init__(self, gain):
            self.gain, self.prepared, self.weights = gain, [], []

        def prepare(self, on):
            self.prepared.append(on)
            return self

        def with_prior(self, w):
            self.weights.append(w)
            return self, w

    def recalls(views, split, k):   # one pass over the users for every weight
        return [base + s.gain(w) + rng.normal(0.0, 0.01, len(base)) * (w > 0) for s, w in views]

    monkeypatch.setattr(train_module, "user_recalls", recalls)
    peaked = Scorer(lambda w: 0.02 - 0.1 * (w - 0.3) ** 2 if w else 0.0)   # a clear gain, best at 0.3
    chosen = train_module.choose_prior(model, peaked, None, 50)
    assert peaked.weights == pytest.approx(train_module.PRIOR_GRID)
    assert peaked.prepared == ["valid"]                # embedded once, on validation, never on test
    assert chosen["weight"] == pytest.approx(0.3) and float(model.pin_tower.prior) == pytest.approx(0.3)
    assert chosen["gain_over_none"] > chosen["gain_se"] and set(chosen["valid"]) == {str(w) for w in
                                                                                    train_module.PRIOR_GRID}
    flat = Scorer(lambda w: -0.02 * w)                                      # every weight hurts: the towers as trained
    chosen = train_module.choose_prior(model, flat, None, 50)
    assert chosen["weight"] == 0.0 and float(model.pin_tower.prior) == 0.0
