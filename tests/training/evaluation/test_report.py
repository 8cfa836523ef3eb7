"""`retrieval report` on the small world: baselines once, the two-tower rows as mean ± std over seeds, the verdict
against the best baseline, report.md and report.json with every field the report promises."""

from __future__ import annotations

import dataclasses
import json

import pytest

from training.config import Config, ConfigError
from training.evaluation.report import _grid, _verdict, report

pytestmark = pytest.mark.slow


def test_report_runs_seeds_and_writes_md_and_json(pipeline_cfg, checkpoints, tmp_path):
    cfg = dataclasses.replace(
        pipeline_cfg,
        train=dataclasses.replace(pipeline_cfg.train, epochs=2, patience=1, batch_size=256, threads=1),
        report=dataclasses.replace(pipeline_cfg.report, seeds=2, variants="default,negatives",
                                   baselines="popularity,ease,sansa", grids='{"ease": {"l2": [100, 500]}}'))
    out = report(cfg, out_dir=tmp_path)
    data = json.loads((tmp_path / "report.json").read_text())
    assert data["data"] == "synthetic" and data["seeds"] == 2 and data["pending_variants"] == 0
    sansa = "SANSA, scalable EASE (tuned, recency-weighted history)"
    assert set(data["baselines"]) | set(data["skipped_baselines"]) == {
        "popularity", "EASE (tuned)", sansa, "oracle (generator's ground truth)"}
    assert sansa in data["baselines"] or "pip install" in data["skipped_baselines"][sansa]
    assert data["baselines"]["EASE (tuned)"]["grid"]["l2"] == [100, 500]
    assert data["baselines"]["EASE (tuned)"]["params"]["l2"] in (100, 500)
    rows = data["two_tower"]
    assert list(rows) == ["two-tower (default config)", "full softmax", "hides as hard negatives"]
    for row in rows.values():
        assert len(row["runs"]) == 2 and [r["seed"] for r in row["runs"]] == [0, 1]
        for key in ("examples_per_s", "seconds_to_best", "user_tower_ms", "hit_epoch_cap", "best_epoch", "valid",
                    "blend_weight", "prior_weight"):
            assert key in row["runs"][0], key
        assert row["mean"]["capped_recall@50"] == pytest.approx(
            sum(r["capped_recall@50"] for r in row["runs"]) / 2)
        assert row["config"]["train"]["epochs"] == 2
    assert rows["full softmax"]["config"]["train"]["negatives"] == "full"
    assert rows["hides as hard negatives"]["config"]["train"]["hide_negatives"] is True
    md = (tmp_path / "report.md").read_text()
    assert "**Verdict**" in md and "± " in md and out["verdict"]
    assert "towers alone (blend weight 0)" in md and "Paired per-user differences" in md
    default = rows["two-tower (default config)"]
    assert all("towers_alone" in r for r in default["runs"])
    paired = data["verdict"]["paired"]["two-tower (default config)"]["capped_recall@50"]["EASE (tuned)"]
    assert paired["low"] <= paired["diff"] <= paired["high"]
    import numpy as np

    arrays = np.load(tmp_path / "per_user.npz")
    assert "two-tower (default config)" in arrays["labels"].tolist()
    assert "Popularity prior weights chosen on validation: " in md


def test_verdict_wins_only_when_mean_minus_std_and_the_paired_interval_clear_every_baseline():
    import numpy as np

    def row(mean, std, valid):
        m = {"capped_recall@10": mean, "capped_recall@50": mean, "valid": valid}
        return {"mean": m, "std": {"capped_recall@10": std, "capped_recall@50": std}}

    rng = np.random.default_rng(0)
    users = np.arange(400)

    def per_user(level, noise=0.05):
        values = np.clip(level + rng.normal(0, noise, len(users)), 0, 1)
        return {"user_ids": users, "capped_recall@10": values, "capped_recall@50": values}

    baselines = {"A": {"capped_recall@10": 0.30, "capped_recall@50": 0.30},
                 "B": {"capped_recall@10": 0.20, "capped_recall@50": 0.35},
                 "oracle (x)": {"capped_recall@10": 0.9, "capped_recall@50": 0.9}}   # never a baseline to beat
    base_users = {"A": per_user(0.30), "B": per_user(0.35)}
    rows = {"default": row(0.36, 0.02, 0.5), "other": row(0.37, 0.001, 0.6)}
    v = _verdict(rows, baselines, {**base_users, "default": [per_user(0.36)], "other": [per_user(0.40)] * 2})
    assert v["best_by_validation"] == "other" and v["default"] == "default"
    m = v["metrics"]
    assert m["default"]["capped_recall@50"]["best_baseline"] == "B" and not m["default"]["capped_recall@50"]["wins"]
    assert m["other"]["capped_recall@50"]["wins"] and m["other"]["capped_recall@10"]["best_baseline"] == "A"
    interval = v["paired"]["other"]["capped_recall@50"]["B"]
    assert interval["low"] > 0 and interval["users"] == 400 and interval["low"] < interval["diff"] < interval["high"]
    # the same means, but per user the row is no better than B: no win, whatever mean − std says
    noisy = _verdict(rows, baselines, {**base_users, "default": [per_user(0.36)],
                                       "other": [{**base_users["B"], "capped_recall@10": base_users["B"]
                                                  ["capped_recall@10"] + rng.normal(0, 0.3, len(users))}]})
    assert not noisy["metrics"]["other"]["capped_recall@50"]["wins"]
    assert noisy["paired"]["other"]["capped_recall@50"]["B"]["low"] <= 0


def test_a_row_validated_at_another_blend_horizon_is_not_a_candidate_for_the_best_config():
    def row(valid, horizon):
        m = {"capped_recall@10": 0.3, "capped_recall@50": 0.4, "valid": valid}
        return {"mean": m, "std": {"capped_recall@10": 0.0, "capped_recall@50": 0.0},
                "config": {"train": {"blend_validation": horizon}}}

    baselines = {"A": {"capped_recall@10": 0.2, "capped_recall@50": 0.3}}
    v = _verdict({"default": row(0.49, "horizon"), "adjacent": row(0.50, "adjacent"),
                  "masknet": row(0.495, "horizon")}, baselines)
    # the adjacent row's validation figure is measured with a fresher table: higher, and not comparable
    assert v["best_by_validation"] == "masknet" and v["not_compared_by_validation"] == ["adjacent"]


def test_an_overlapping_table_ablation_is_not_a_candidate_for_the_best_config():
    def row(valid, overlap):
        m = {"capped_recall@10": 0.3, "capped_recall@50": 0.4, "valid": valid}
        return {"mean": m, "std": {"capped_recall@10": 0.0, "capped_recall@50": 0.0},
                "config": {"train": {"blend_validation": "horizon", "allow_overlapping_pretrain": overlap}}}

    baselines = {"A": {"capped_recall@10": 0.2, "capped_recall@50": 0.3}}
    v = _verdict({"default": row(0.49, False), "overlapping": row(0.50, True), "finetune": row(0.489, False)},
                 baselines)
    # the overlapping table breaks the non-overlap rule that every usable config keeps: an ablation, never a pick
    assert v["best_by_validation"] == "default" and v["ablation_only"] == ["overlapping"]
    assert v["not_compared_by_validation"] == []


def test_a_run_finds_the_published_report_of_its_own_data_and_config(tmp_path, monkeypatch):
    """`retrieval run` prints the published mean ± std next to its one-seed test figures, but only for the same
    snapshot (data and transform config) and the same model config (seeds and threads aside)."""
    import json

    from training.config import Config
    from training.evaluation import report as report_module

    cfg = Config()
    runs = [{"capped_recall@10": a, "capped_recall@50": b} for a, b in ((0.18, 0.38), (0.19, 0.39), (0.20, 0.40))]
    doc = {"snapshot_id": "abc", "config": {**cfg.to_dict(), "train": {**cfg.to_dict()["train"], "seed": 2}},
           "verdict": {"default": "d"}, "two_tower": {"d": {"runs": runs}},
           "provenance": {"commit": "1234567", "date": "2026-12-06T00:00:00+00:00"}}
    (tmp_path / "model-synthetic.json").write_text(json.dumps(doc))
    monkeypatch.setattr(report_module, "PUBLISHED", tmp_path)
    ref = report_module.published_reference(cfg, "abc")
    assert ref["seeds"] == 3 and ref["capped_recall@50"] == {"mean": 0.39, "std": 0.01, "min": 0.38, "max": 0.4}
    assert report_module.published_reference(cfg, "other snapshot") is None
    cfg.train.lr = cfg.train.lr * 2
    assert report_module.published_reference(cfg, "abc") is None


def test_report_grids_replace_a_baselines_values_and_name_what_is_wrong():
    cfg = Config.load(overrides={"report.grids": '{"als": {"factors": [16, 32]}, "item-knn": [50, null]}'})
    als = _grid(cfg, "als")
    assert als["factors"] == (16, 32) and als["alpha"] == (1.0, 10.0, 40.0)    # the rest kept
    assert _grid(cfg, "item-knn") == (50, None)
    assert _grid(cfg, "sansa")["l2"] == (5.0, 20.0, 100.0, 500.0)               # no entry: the default grid
    assert _grid(cfg, "popularity") is None
    with pytest.raises(ConfigError, match="report.grids: not JSON"):
        Config.load(overrides={"report.grids": "{als: 1}"})
    for name, grids, message in [("als", '{"alss": {}}', r"no grid to replace for \['alss'\]"),
                                 ("als", '{"als": {"factor": [8]}}', r"als has no parameter \['factor'\]"),
                                 ("als", '{"als": {"factors": []}}', "als.factors takes a non-empty list"),
                                 ("item-knn", '{"item-knn": [0]}', "item-knn takes a non-empty list of k")]:
        with pytest.raises(ValueError, match=message):
            _grid(Config.load(overrides={"report.grids": grids}), name)
