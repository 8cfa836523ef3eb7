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
from training.train import train

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
    assert ckpt["feature_services"] == {"user": "user_tower_v1", "pin": "pin_tower_v1"}
    assert ckpt["snapshot_id"] and ckpt["config"]["epochs"] == 3 and ckpt["fit"]["world_size"] == 1
    assert ckpt["config"]["backbone"] == backbone and ckpt["pretrained"]["table_id"]
    assert ckpt["pretrained"]["window_end"] <= ckpt["fit"]["window_start"]   # the non-overlap rule, recorded
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
