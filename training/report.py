"""Stage: train the two-tower model and evaluate it next to the baselines, in one run, on one split.

``retrieval train`` fits the model on the live training set (temporal split, early stopping on
validation) and writes the checkpoint; ``retrieval report`` also fits popularity, item-kNN and tuned ALS
(and, on synthetic data, scores the generator's oracle), evaluates all of them on the test part with the
same harness and writes ``report.md``, ``results.json`` and PNG plots.

Protocol (``training.evaluate``): per user, the last 20% of positive interactions are test and the last
10% of the rest validation; full ranking over every canonical pin in the interactions, excluding the
user's train items; interactions sharing a timestamp are ordered by a fixed hash (ML-100k has 76% ties,
and its ids follow catalogue order). The headline recall@K divides hits by min(|relevant|, K) (the
normalized recall that the ML-100k reference figures use); plain recall (÷ |relevant|) is reported too.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pandas as pd

from training.config import Config
from training.data.snapshot import load_live, raw_dir
from training.dataset import SERVICES, training_set_path
from training.evaluate import Split, evaluate, interest_map, temporal_split, write_report
from training.train import TwoTowerScorer, save_checkpoint

log = logging.getLogger(__name__)


def load_split(cfg: Config) -> tuple[pd.DataFrame, Split, dict[str, Any]]:
    path = training_set_path(cfg)
    if not path.exists():
        raise FileNotFoundError(f"no training set at {path}: run `retrieval run` (or `retrieval training-set`)")
    manifest = json.loads(path.with_suffix(".json").read_text())
    ts = pd.read_parquet(path)
    split = temporal_split(ts, item_interest=interest_map(ts), tie_break="hash", seed=cfg.train.seed)
    return ts, split, manifest


def _n_interests(cfg: Config) -> int:
    snap = load_live(cfg)
    return int(pd.read_parquet(snap.path / "staged" / "interests.parquet")["interest_id"].max()) + 1


def train(cfg: Config) -> dict[str, Any]:
    """Fit the two-tower model on the live training set, evaluate it on test, save the checkpoint."""
    ts, split, manifest = load_split(cfg)
    scorer = TwoTowerScorer(cfg, ts, _n_interests(cfg))
    scorer.fit(split)
    scorer.prepare("test")
    result = evaluate(scorer, split, on="test")
    version = f"tt-{manifest['snapshot_id']}-{datetime.now(UTC):%Y%m%d-%H%M%S}"
    payload = {
        **scorer.checkpoint(),
        "model_version": version,
        "feature_services": list(SERVICES),
        "snapshot_id": manifest["snapshot_id"],
        "as_of": manifest["as_of"],
        "metrics": {k: v for k, v in result.items() if not isinstance(v, (list, dict))},
    }
    path = cfg.data_path / "models" / version / "model.pt"
    save_checkpoint(payload, path)
    log.info("checkpoint %s", path)
    fit = asdict(scorer.result)
    return {"model_version": version, "checkpoint": str(path), "test": payload["metrics"],
            "fit": {k: v for k, v in fit.items() if k != "history"}}


def report(cfg: Config, out_dir: Path | None = None) -> dict[str, Any]:
    """Every model on the same split with the same metric code; writes the report."""
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    from training.baselines import ImplicitALS, ItemKNN, Oracle, Popularity, fit_tune_evaluate

    ts, split, manifest = load_split(cfg)
    results: dict[str, dict[str, Any]] = {}
    for name, scorer in (("popularity", Popularity()), ("item-kNN", ItemKNN()), ("ALS tuned", ImplicitALS())):
        t0 = time.perf_counter()
        results[name] = fit_tune_evaluate(scorer, split)[0]
        log.info("%s: recall@50 %.4f (%.1fs)", name, results[name]["capped_recall@50"], time.perf_counter() - t0)
    scorer = TwoTowerScorer(cfg, ts, _n_interests(cfg))
    scorer.fit(split)
    scorer.prepare("test")
    results["two-tower"] = evaluate(scorer, split, on="test")
    results["two-tower"]["fit_seconds"] = round(scorer.result.seconds, 2)
    truth_path = raw_dir(cfg) / "ground_truth.npz"
    notes = [f"Data snapshot `{manifest['snapshot_id']}`, training set through {', '.join(SERVICES)}; "
             f"{split.n_users} users, {split.n_items} candidate pins. recall@K = hits / min(|relevant|, K); "
             "plain recall = hits / |relevant|.",
             f"Two-tower: best epoch {scorer.result.best_epoch}, {scorer.result.seconds_to_best:.1f}s to the best "
             f"checkpoint, {scorer.result.examples_per_s:,.0f} examples/s."]
    if cfg.data.source == "synthetic" and truth_path.exists():
        from training.data.synthetic import GroundTruth

        oracle = Oracle(GroundTruth.load(truth_path))
        oracle.fit(split)
        results["oracle"] = evaluate(oracle, split, on="test")
        ratio = results["two-tower"]["recall@50"] / results["oracle"]["recall@50"]
        notes.append(f"Two-tower plain recall@50 is {ratio:.1%} of the generator's oracle.")
    out = out_dir or cfg.data_path / "reports" / manifest["snapshot_id"]
    md = write_report(results, out, title=f"Retrieval report ({cfg.data.source})", notes=notes)
    log.info("report %s", md)
    keys = ("capped_recall@10", "capped_recall@50", "capped_recall@100", "recall@50", "ndcg@10", "coverage@50",
            "logpop@50")
    return {"report": str(md), **{m: {k: round(r[k], 4) for k in keys if k in r} for m, r in results.items()}}
