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
