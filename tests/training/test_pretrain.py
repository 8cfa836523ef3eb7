"""Pre-trained ID embeddings on the real data stage: the window (before the training window, before every
user's first held-out interaction, every surface), every method, and the non-overlap rule at training time."""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
import pytest

from training.evaluation.split import load_split
from training.model.pretrained import PretrainedError, PretrainedTable
from training.pretrain import pretrain, pretrain_stage, window_events

pytestmark = pytest.mark.slow


def _cfg(cfg, **pretrain_kw):
    return dataclasses.replace(cfg, pretrain=dataclasses.replace(cfg.pretrain, **pretrain_kw),
                               train=dataclasses.replace(cfg.train, threads=1))


def test_window_holds_nothing_a_model_is_evaluated_on(pipeline_cfg):
    ts, split, manifest = load_split(pipeline_cfg)
    end = split.window_start(pipeline_cfg.train.window_fraction)
    ev = window_events(pipeline_cfg, split, end)
    assert (ev["event_timestamp"] < end).all()
    cutoff = ev["user_id"].map(split.cutoffs())
    assert (cutoff.isna() | (ev["event_timestamp"] < cutoff)).all()
    held = split.frame[split.frame["part"] != "train"][["user_id", "pin_id", "event_timestamp"]]
    assert ev.merge(held, on=["user_id", "pin_id", "event_timestamp"]).empty
    from training.data.snapshot import load_live

    surfaces = pd.read_parquet(load_live(pipeline_cfg).table("fct_pretrain_engagements"))["surface"]
    assert set(surfaces) > {"homefeed"}   # cross-surface data reaches pre-training


def test_refit_windows_end_after_train_or_validation_and_never_reach_test(pipeline_cfg):
    cfg = _cfg(pipeline_cfg, dim=8)
    ts, split, manifest = load_split(cfg)
    matched = split.horizon_matched()
    moved = (matched.frame["part"] != split.frame["part"]).sum()
    assert moved > 0 and (matched.frame.loc[matched.frame["part"] != split.frame["part"], "part"] == "valid").all()
    for until, seen, held in (("train", ("train",), ("valid", "test")), ("valid", ("train", "valid"), ("test",)),
                              ("horizon", ("train",), ("valid", "test"))):
        table = pretrain(cfg, split, manifest["snapshot_id"], until=until)
        assert table.meta["until"] == until
        on = matched if until == "horizon" else split   # 'horizon': the train part of the horizon-matched split
        f = on.frame
        end = pd.Timestamp(table.window_end)
        assert end == f.loc[f["part"].isin(seen), "event_timestamp"].max() + pd.Timedelta(microseconds=1)
        ev = window_events(cfg, on, end, held)
        assert len(ev) == table.meta["events"]
        cutoff = ev["user_id"].map(f[f["part"].isin(held)].groupby("user_id")["event_timestamp"].min())
        assert (cutoff.isna() | (ev["event_timestamp"] < cutoff)).all()
        keys = ["user_id", "pin_id", "event_timestamp"]
        assert ev.merge(f[f["part"].isin(held)][keys], on=keys).empty            # nothing held out for it
        reached = ev.merge(f[f["part"].isin(seen)][keys], on=keys)
        assert set(f[f["part"].isin(seen)]["part"]) <= set(f.merge(reached, on=keys)["part"])   # what it may see
    with pytest.raises(ValueError, match="until must be one of"):
        pretrain(cfg, split, manifest["snapshot_id"], until="test")


@pytest.mark.parametrize("method", ["ridge_svd", "ease_svd", "contrastive"])
def test_every_method_gives_calibrated_tables_for_the_window(pipeline_cfg, method, tmp_path):
    cfg = _cfg(pipeline_cfg, method=method, epochs=3, dim=16)
    ts, split, manifest = load_split(cfg)
    table = pretrain(cfg, split, manifest["snapshot_id"])
    assert table.window_end == split.window_start(cfg.train.window_fraction).isoformat()
    assert table.context.shape == table.target.shape == (len(table.pin_ids), 16)
    assert table.users.shape == (len(table.user_ids), 16)
    assert all(np.isfinite(a).all() for a in (table.context, table.target, table.users))
    assert table.meta["score_scale"] > 0 and table.meta["events"] > 100
    loaded = PretrainedTable.load(table.save(tmp_path))
    np.testing.assert_array_equal(loaded.target, table.target)


def test_training_refuses_an_overlapping_table_and_records_the_one_it_used(pipeline_cfg):
    from training.train import fit

    cfg = _cfg(pipeline_cfg, dim=16)
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, epochs=1, patience=1, batch_size=256))
    ts, split, manifest = load_split(cfg)
    overlapping = pretrain(cfg, split, manifest["snapshot_id"], until="train")
    with pytest.raises(PretrainedError, match="overlaps the training window"):
        fit(cfg, ts, split, manifest, table=overlapping)
    ablation = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, allow_overlapping_pretrain=True))
    assert fit(ablation, ts, split, manifest, table=overlapping).pretrained["table_id"] == overlapping.table_id
    out = pretrain_stage(cfg)
    trained = fit(cfg, ts, split, manifest)   # the newest table on disk that ends by the window start
    assert trained.pretrained["table_id"] == out["table_id"]
    assert trained.result.blend is not None and trained.result.blend["weight"] in {
        str(w) for w in __import__("training.train", fromlist=["BLEND_GRID"]).BLEND_GRID}
    # the refit repeats the pre-training the table records (16-d), whatever the current pretrain section says
    refit = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, blend_table="refit"),
                                pretrain=dataclasses.replace(cfg.pretrain, dim=24))
    trained = fit(refit, ts, split, manifest)
    assert trained.model.pin_tower.blend_table.weight.shape[1] == 16
    blend = trained.pretrained["blend_table"]      # the towers' fields keep the non-overlapping table
    assert trained.pretrained["table_id"] == out["table_id"] and blend["table_id"] != out["table_id"]
    assert blend["window_end"] > trained.window_start and trained.model.pin_tower.blend_table is not None
    assert blend["validation_table_until"] == "horizon"    # the blend weight was chosen at test's horizon


def _events(n_users: int, n_pins: int, n: int, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    ev = pd.DataFrame({"user_id": rng.integers(0, n_users, n), "pin_id": rng.integers(0, n_pins, n),
                       "event_timestamp": pd.Timestamp("2026-01-01", tz="UTC")
                       + pd.to_timedelta(rng.integers(0, 10**6, n), unit="s")})
    return ev.sort_values(["user_id", "event_timestamp", "pin_id"]).reset_index(drop=True)


@pytest.mark.parametrize("method", ["ridge_svd", "ease_svd"])
def test_svd_methods_give_the_same_table_for_the_same_seed_in_any_process_state(method):
    """ARPACK starts from a random vector: unseeded, a table (and the towers that read it as features) differed
    between two runs of the same seed."""
    from training import pretrain as stage
    from training.config import PretrainConfig

    ev = _events(300, 400, 4000)
    pc = PretrainConfig(dim=16, seed=3)
    first, _ = getattr(stage, method)(ev, pc, 20)
    np.random.seed(12345)    # the global state a caller may have moved
    np.random.rand(7)
    second, _ = getattr(stage, method)(ev, pc, 20)
    for key in ("context", "target", "users"):
        np.testing.assert_array_equal(first[key], second[key])


def test_ease_svd_refuses_a_catalog_over_its_memory_limit_before_allocating_it():
    from training.config import PretrainConfig
    from training.evaluation.baselines import CatalogTooLarge
    from training.pretrain import dense_bytes, ease_svd

    ev = _events(300, 2000, 6000)
    n_pins = ev["pin_id"].nunique()
    limit = dense_bytes(n_pins) / 2**30 / 2
    with pytest.raises(CatalogTooLarge, match=r"ridge_svd") as err:
        ease_svd(ev, PretrainConfig(dim=8, max_dense_gib=limit), 20)
    assert f"{n_pins:,} pins" in str(err.value) and "pretrain.max_dense_gib" in str(err.value)


def test_ridge_svd_memory_grows_linearly_with_the_catalog(monkeypatch):
    """The default pre-training (the table and its score calibration) holds nothing pins × pins or users × pins:
    with 4× the pins, users and engagements its peak
    allocation (tracemalloc, which sees numpy's and scipy's arrays) grows about 4×, where a dense pins × pins
    method grows 16×."""
    import tracemalloc

    from training import pretrain as stage
    from training.config import PretrainConfig
    from training.pretrain import calibrated, ease_svd, ridge_svd

    pc = PretrainConfig(dim=16, max_dense_gib=64)
    monkeypatch.setattr(stage, "CALIBRATION_BLOCK_BYTES", 1 << 20)   # blocks at these small sizes too
    peaks = {}
    for method in (ridge_svd, ease_svd):
        for scale in (1, 4):
            ev = _events(1000 * scale, 600 * scale, 20000 * scale, seed=scale)
            tracemalloc.start()
            tables, _ = method(ev, pc, 20)
            if method is ridge_svd:
                calibrated(tables, ev, 20, pc.recency)     # the score scale: users × pins only in blocks
            peaks[method.__name__, scale] = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
    ridge = peaks["ridge_svd", 4] / peaks["ridge_svd", 1]
    dense = peaks["ease_svd", 4] / peaks["ease_svd", 1]
    assert ridge < 5.5, peaks
    assert dense > 10, peaks          # the check can tell the two apart


def test_the_pretraining_split_read_without_feature_columns_is_the_same_split(pipeline_cfg):
    from training.evaluation.split import SPLIT_COLUMNS

    _, full, _ = load_split(pipeline_cfg)
    ts, lean, _ = load_split(pipeline_cfg, features=False)
    assert list(ts.columns) == list(SPLIT_COLUMNS)
    pd.testing.assert_frame_equal(full.frame, lean.frame)
    for part in ("train", "valid", "test"):
        assert (getattr(full, part) != getattr(lean, part)).nnz == 0
    np.testing.assert_array_equal(full.item_interest, lean.item_interest)
