"""A short real training run on the Feast training set, its evaluation and the checkpoint reload."""

from __future__ import annotations

import dataclasses

import pandas as pd
import pytest
import torch

from training.encoding import Encoder
from training.report import train
from training.train import build_model

pytestmark = pytest.mark.slow


def test_short_training_run_beats_chance_and_reloads(pipeline_cfg):
    cfg = dataclasses.replace(pipeline_cfg, train=dataclasses.replace(pipeline_cfg.train, epochs=3, patience=3,
                                                                      batch_size=256, threads=1))
    out = train(cfg)
    test = out["test"]
    # 900 pins: a random ranking would put ~50/900 of the relevant items in the top 50
    assert test["recall@50"] > 3 * 50 / test["items"]
    ckpt = torch.load(out["checkpoint"], weights_only=False)
    assert ckpt["model_version"] == out["model_version"] and ckpt["feature_services"] == ["user_tower_v1",
                                                                                          "pin_tower_v1"]
    assert ckpt["snapshot_id"] and ckpt["config"]["epochs"] == 3
    enc = Encoder.from_state(ckpt["encoder"])
    model = build_model(enc, dataclasses.replace(cfg.train, **{k: ckpt["config"][k] for k in ("dim", "embed_dim")}))
    model.load_state_dict(ckpt["model"])
    model.eval()
    rows = pd.read_parquet(pipeline_cfg.data_path / "training" / "training_set.parquet").head(64)
    with torch.no_grad():
        u = model.user_tower(enc.users(rows))
        p = model.pin_tower(enc.pins(rows))
    assert u.shape == (64, cfg.train.dim) and torch.allclose(p.norm(dim=1), torch.ones(64))
