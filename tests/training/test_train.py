"""A short real training run on the Feast training set, its evaluation, the checkpoint reload and the
exported user tower."""

from __future__ import annotations

import dataclasses
import io

import pandas as pd
import pytest
import torch

from training.model.checkpoint import (
    ArtifactError,
    export_user_tower,
    load_checkpoint,
    load_user_tower,
    save_user_tower,
)
from training.model.towers import run_tower
from training.train import PRIOR_GRID, train

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("backbone", ["mlp", "masknet", "dhen"])
def test_short_training_run_beats_chance_and_reloads(pipeline_cfg, checkpoints, backbone):
    cfg = dataclasses.replace(pipeline_cfg, train=dataclasses.replace(pipeline_cfg.train, epochs=3, patience=3,
                                                                      batch_size=256, threads=1, backbone=backbone))
    out = train(cfg)   # the `checkpoints` fixture pre-trained the ID table this run picks
    test = out["test"]
    # a random ranking puts ~50/items of the relevant items in the top 50. Three epochs on 30% of a small world,
    # with a table pre-trained before that window: a smoke test of learning, not of quality (`retrieval report`)
    assert test["recall@50"] > 1.5 * 50 / test["items"]
    model, enc, ckpt = load_checkpoint(out["checkpoint"])
    assert ckpt["model_version"] == out["model_version"]
    assert ckpt["feature_services"] == {"user": "user_tower_v2", "pin": "pin_tower_v1"}
    assert ckpt["snapshot_id"] and ckpt["config"]["epochs"] == 3 and ckpt["fit"]["world_size"] == 1
    assert ckpt["config"]["backbone"] == backbone and ckpt["pretrained"]["table_id"]
    assert ckpt["pretrained"]["window_end"] <= ckpt["fit"]["window_start"]   # the non-overlap rule, recorded
    prior = ckpt["fit"]["prior"]             # the popularity prior: chosen on validation, kept in the pin tower
    assert prior["weight"] in PRIOR_GRID and set(prior["valid"]) == {str(w) for w in PRIOR_GRID}
    assert float(model.pin_tower.prior) == prior["weight"] and ckpt["config"]["popularity_prior"]
    rows = pd.read_parquet(pipeline_cfg.data_path / "training" / "training_set.parquet").head(64)
    with torch.no_grad():
        u = model.user_tower(enc.users(rows))
        p = model.pin_tower(enc.pins(rows))
    assert u.shape == p.shape == (64, model.user_tower.dim) and torch.isfinite(u).all() and torch.isfinite(p).all()


def test_exported_user_tower_is_small_and_reproduces_the_training_model(pipeline_cfg, checkpoints, tmp_path):
    model, enc, payload = load_checkpoint(checkpoints[0])
    path = tmp_path / "user_tower.pt"
    save_user_tower(export_user_tower(payload, model, "pins_x"), path)
    tower, enc2, meta = load_user_tower(path)
    assert meta["model_version"] == payload["model_version"] and meta["collection"] == "pins_x"
    exported = torch.load(path, weights_only=True)["user_tower"]
    assert not any("frequency" in k or k.startswith("pin_tower") for k in exported)
    assert path.stat().st_size < 0.5 * checkpoints[0].stat().st_size   # no pin tower, no logQ buffers
    rows = pd.read_parquet(pipeline_cfg.data_path / "training" / "training_set.parquet").sample(300, random_state=1)
    expected = run_tower(model.user_tower, enc.users(rows))
    assert (run_tower(tower, enc2.users(rows)) == expected).all()   # bit for bit


def test_the_prior_choice_scores_each_weight_as_the_pin_tower_would(pipeline_cfg, checkpoints):
    """``TwoTowerScorer.with_prior`` (the prior's choice ranks every weight from one embedding of the candidates)
    gives the scores of the pin tower run with that prior, for the blended model as trained."""
    import numpy as np

    from training.evaluation.harness import user_recall
    from training.evaluation.scorer import TwoTowerScorer
    from training.evaluation.split import load_split

    model, enc, payload = load_checkpoint(checkpoints[0])
    ts, split, manifest = load_split(pipeline_cfg)
    scorer = TwoTowerScorer(pipeline_cfg, model, enc, ts, split, manifest["feature_services"]["pin"])
    users = np.flatnonzero(np.diff(split.valid.indptr) > 0)[:200]
    model.pin_tower.set_prior(0.0)
    scorer.prepare("valid")
    fast = {w: scorer.with_prior(w) for w in (0.0, 0.3, 1.0)}
    fast_scores = {w: s.score(users) for w, s in fast.items()}
    fast_recall = {w: user_recall(s, split, 50) for w, s in fast.items()}
    assert not np.allclose(fast_scores[0.0], fast_scores[1.0])      # the prior moves the scores
    for w in fast:
        model.pin_tower.set_prior(w)
        scorer.prepare("valid")
        np.testing.assert_allclose(fast_scores[w], scorer.score(users), rtol=1e-5, atol=1e-5)
        assert np.abs(fast_recall[w] - user_recall(scorer, split, 50)).mean() < 1e-3


def test_artifacts_refuse_pickled_code(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("ran code from a checkpoint",))

    path = tmp_path / "model.pt"
    buf = io.BytesIO()
    torch.save({"config": {}, "encoder": {}, "model": Evil(), "model_version": "x"}, buf)
    path.write_bytes(buf.getvalue())
    with pytest.raises(ArtifactError, match="not a model artifact"):
        load_checkpoint(path)
    with pytest.raises(ArtifactError, match="no such file"):
        load_user_tower(tmp_path / "missing.pt")


def test_early_stopping_waits_for_min_epochs_then_for_patience():
    from training.config import TrainConfig
    from training.train import should_stop

    tc = TrainConfig(patience=6, min_epochs=12)
    assert not should_stop(7, 1, tc)        # epoch 1 was best, 6 epochs without a better one, but before min_epochs
    assert not should_stop(11, 1, tc)
    assert should_stop(12, 1, tc)
    assert not should_stop(12, 7, tc)       # past min_epochs: patience counts from the best epoch
    assert should_stop(13, 7, tc)


def test_sparse_ids_update_only_the_rows_a_step_looked_up():
    """With ``train.id_optimizer`` 'sparse_adam' the pin id table has its own SparseAdam: a step changes the rows it
    looked up and leaves every other row (and its moments) as it was, however many steps ago that row was seen; the
    rest of the model stays under AdamW. With 'adamw', AdamW's momentum keeps moving rows the step did not look up.
    'auto' picks the sparse table above ``sparse_id_rows`` pins."""
    from training.config import TrainConfig
    from training.model.towers import PinTower
    from training.train import optimizers

    def run(sparse: bool) -> tuple[list[torch.optim.Optimizer], torch.Tensor, torch.Tensor]:
        torch.manual_seed(0)
        tc = TrainConfig(id_optimizer="sparse_adam" if sparse else "adamw", out_dim=8)
        tower = PinTower(50, 3, tc)
        opts = optimizers(tower, tc)
        x = {"pin": torch.tensor([1, 2, 2, 7]), "interest": torch.tensor([1, 2, 0, 3]), "counts": torch.rand(4, 12)}
        for pins in ([1, 2, 2, 7], [3, 4, 4, 5]):   # the second step does not look up pins 1, 2, 7
            x["pin"] = torch.tensor(pins)
            before = tower.pin_embedding.weight.detach().clone()
            for o in opts:
                o.zero_grad(set_to_none=True)
            tower(x).sum().backward()
            for o in opts:
                o.step()
        return opts, before, tower.pin_embedding.weight.detach()

    opts, before, after = run(sparse=True)
    assert [type(o).__name__ for o in opts] == ["AdamW", "SparseAdam"]
    assert [p.shape for p in opts[1].param_groups[0]["params"]] == [(50, 64)]   # the id table alone
    assert not any(p.shape == (50, 64) for p in opts[0].param_groups[0]["params"])
    changed = set(torch.nonzero((after != before).any(1)).flatten().tolist())
    assert changed == {3, 4, 5}
    opts, before, after = run(sparse=False)
    assert [type(o).__name__ for o in opts] == ["AdamW"]
    assert {1, 2, 7} <= set(torch.nonzero((after != before).any(1)).flatten().tolist())
    assert PinTower(50, 3, TrainConfig(sparse_id_rows=49)).pin_embedding.sparse
    assert not PinTower(50, 3, TrainConfig(sparse_id_rows=50)).pin_embedding.sparse


def test_a_hard_negative_is_one_of_the_users_hides_from_before_the_example():
    import pandas as pd
    import torch

    from training.train import HideNegatives

    t = pd.Timestamp("2026-01-01", tz="UTC")
    day = pd.Timedelta(days=1)
    examples = pd.DataFrame({"user_id": [1, 1, 1, 2, 3], "event_timestamp": [t, t + 2 * day, t + 5 * day, t + day,
                                                                             t + 9 * day]})
    hides = pd.DataFrame({"user_id": [1, 2, 1, 1, 9], "pin_id": [10, 20, 11, 12, 90],
                          "event_timestamp": [t + day, t + 3 * day, t + 2 * day, t + 8 * day, t]})
    h = HideNegatives(examples, hides)
    # user 1's hides before each example: none at t; pins 10, 11 at t + 2d (one in the same second counts);
    # 10, 11 at t + 5d (pin 12 comes later). User 2's hide is after its example; user 3 has none.
    assert h.count.tolist() == [0, 2, 2, 0, 0]
    gen = torch.Generator().manual_seed(0)
    drawn = {i: set() for i in range(5)}
    for _ in range(200):
        row, has = h.sample(torch.arange(5), gen)
        assert has.tolist() == [False, True, True, False, False]
        assert ((row >= 0) & (row < len(h.rows))).all()
        for i in (1, 2):
            drawn[i].add(int(h.rows["pin_id"].iloc[int(row[i])]))
    assert drawn[1] == drawn[2] == {10, 11}


def test_hide_negatives_need_the_in_batch_softmax():
    import pytest

    from training.config import ConfigError, TrainConfig

    TrainConfig(hide_negatives=True)
    with pytest.raises(ConfigError, match="train.hide_negatives"):
        TrainConfig(hide_negatives=True, negatives="full")


def test_a_fit_on_the_fit_rows_is_the_fit_on_the_whole_training_set(pipeline_cfg, checkpoints):
    """`retrieval train` reads the feature columns of the rows a fit uses (``load_split(cfg, features='fit')``):
    those rows equal the whole training set's, the split is the same, and the model trained on them has the same
    weights, blend and prior as the one trained on the whole training set."""
    from training.evaluation.split import fit_rows, load_split
    from training.train import fingerprint, fit

    cfg = dataclasses.replace(pipeline_cfg, train=dataclasses.replace(
        pipeline_cfg.train, epochs=1, min_epochs=1, patience=1, batch_size=256, threads=1, valid_users=200))
    whole, split, manifest = load_split(cfg)
    rows, rows_split, _ = load_split(cfg, features="fit")
    keep = fit_rows(whole, split, split.window_start(cfg.train.window_fraction))
    assert 0 < len(rows) == keep.sum() < len(whole)
    expected = whole[keep].reset_index(drop=True)
    assert list(rows.columns) == list(expected.columns)
    for name in rows.columns:   # list columns stay in Arrow (one buffer a column): the same values
        if isinstance(rows[name].dtype, pd.ArrowDtype):
            got = [None if v is pd.NA else list(v) for v in rows[name]]
            assert got == [None if v is None else list(v) for v in expected[name]], name
        else:
            pd.testing.assert_series_equal(rows[name], expected[name])
    pd.testing.assert_frame_equal(rows_split.frame, split.frame)
    a, b = fit(cfg, whole, split, manifest), fit(cfg, rows, rows_split, manifest)
    assert fingerprint(a.model) == fingerprint(b.model)
    assert (a.result.blend, a.result.prior) == (b.result.blend, b.result.prior)
