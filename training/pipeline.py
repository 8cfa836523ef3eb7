"""The main job, stage by stage. Each function is one CLI subcommand; ``run_data`` chains the data stages."""

from __future__ import annotations

import logging
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from training.config import Config
from training.data import snapshot

log = logging.getLogger(__name__)


def make_raw(cfg: Config) -> dict[str, int]:
    """Source stage: synthetic generator (default) or MovieLens ingest -> ``<data_dir>/raw``."""
    from training.data.raw import write_raw

    out = snapshot.raw_dir(cfg)
    if cfg.data.source == "movielens":
        from training.data.movielens import ingest

        if not cfg.data.movielens_path:
            raise ValueError("data.source is 'movielens' but data.movielens_path is empty: "
                             "pass --data.movielens_path DIR")
        tables = ingest(cfg.data.movielens_path, cfg.contracts.max_bad_fraction)
        (out / "ground_truth.npz").unlink(missing_ok=True)
    else:
        from training.data.synthetic import generate

        tables, truth = generate(cfg.data)
        out.mkdir(parents=True, exist_ok=True)
        truth.save(out / "ground_truth.npz")
    return write_raw(tables, out)


def continue_raw(cfg: Config, days: int, now: datetime | None = None) -> dict[str, Any]:
    """Source stage, continued: append the next ``days`` days of the synthetic world in ``<data_dir>/raw``
    (``training.data.synthetic.continue_world``; ``cfg.data`` must be the config the world was generated with).

    Refuses (ValueError) when the folder holds no synthetic world, when the config does not match it, and when the
    continued world would end more than ``contracts.max_future_days`` after ``now`` (the wall clock): the build's
    contract rejects such timestamps, so continuing past it would only make data no snapshot can be built from.
    Simulations of future weeks start the world further back (``--data.end_date``) or raise
    ``--contracts.max_future_days`` for the build as well. Files are replaced atomically, the ground truth last:
    it marks what is complete, and a continuation killed before it is redone identically by the next one.
    Returns what was appended and the new end."""
    from training.data.raw import to_arrow
    from training.data.synthetic import US_PER_DAY, continue_world, load_world
    from training.io import atomic_path, atomic_write_parquet

    if days < 1:
        raise ValueError(f"--days must be >= 1, got {days}")
    out = snapshot.raw_dir(cfg)
    tables, truth = load_world(out)
    now = now or datetime.now(UTC)
    end = datetime.fromtimestamp((truth.end_us + days * US_PER_DAY) / 1e6, UTC)
    limit = now + timedelta(days=cfg.contracts.max_future_days)
    if end > limit:
        latest = datetime.fromtimestamp(truth.end_us / 1e6, UTC)
        raise ValueError(
            f"continuing the world (now ending {latest:%Y-%m-%d}) by {days} days would end it on {end:%Y-%m-%d}, more "
            f"than contracts.max_future_days={cfg.contracts.max_future_days} after now ({now:%Y-%m-%d %H:%M} UTC): "
            "the build's contract rejects future timestamps. Continue by fewer days, start the world earlier "
            "(--data.end_date), or raise --contracts.max_future_days (then for every build of this data too)")
    tables, truth, summary = continue_world(cfg.data, tables, truth, days)
    for name in ("pins", "events"):
        atomic_write_parquet(to_arrow(name, getattr(tables, name)), out / f"{name}.parquet")
    with atomic_path(out / "ground_truth.npz") as tmp:
        truth.save(tmp)
    return summary


def build(cfg: Config) -> dict[str, Any]:
    """Contracts + dbt build, then switch ``live`` to the new snapshot."""
    snap = snapshot.build(cfg)
    snapshot.switch_live(cfg, snap)
    m = snap.manifest
    return {"snapshot_id": snap.id, "path": str(snap.path), "as_of": m["as_of"], "rows": m["rows"]}


def features(cfg: Config) -> dict[str, Any]:
    """Feast apply + materialize of the live snapshot."""
    from training.features import realtime
    from training.features.store import feature_store

    snap = snapshot.load_live(cfg)
    store = feature_store(cfg)
    store.apply()
    state = store.materialize(snap.as_of, snap.id, lineage=snap.lineage)
    pushed = realtime.repush(cfg, store, snap.manifest.get("ingested_through_seq", 0))
    if pushed and pushed["users"]:
        log.info("event log: pushed %d users' features again (events logged after the snapshot)", pushed["users"])
    return state


def training_set(cfg: Config) -> dict[str, Any]:
    from training.features.training_set import build_training_set

    return build_training_set(cfg)


def run_data(cfg: Config, regenerate: bool = True) -> dict[str, float]:
    """Every data stage: source -> contracts -> dbt -> Feast apply/materialize -> training set."""
    seconds: dict[str, float] = {}
    stages = [("source", make_raw), ("build", build), ("features", features), ("training_set", training_set)]
    for name, fn in stages:
        if name == "source" and not regenerate and (snapshot.raw_dir(cfg) / "events.parquet").exists():
            continue
        t0 = time.perf_counter()
        fn(cfg)
        seconds[name] = round(time.perf_counter() - t0, 2)
        log.info("stage %s done in %.1fs", name, seconds[name])
    return seconds


def run_all(cfg: Config, regenerate: bool = True, data_only: bool = False) -> dict[str, Any]:
    """The main job: every data stage, then the pre-trained ID embeddings (when the model uses them), training
    and a published release (what the service serves)."""
    seconds: dict[str, Any] = run_data(cfg, regenerate=regenerate)
    if data_only:
        return seconds
    from training.release.publish import publish

    results = {}
    stages = [("pretrain", pretrain)] if cfg.train.pretrained != "none" else []
    for name, fn in (*stages, ("train", train), ("publish", publish)):
        t0 = time.perf_counter()
        results[name] = fn(cfg)
        seconds[name] = round(time.perf_counter() - t0, 2)
        log.info("stage %s done in %.1fs", name, seconds[name])
    test = {k: round(v, 4) for k, v in results["train"]["test"].items() if k.startswith("capped_recall")}
    out = {"seconds": seconds, "model_version": results["publish"]["live"], "test": test}
    from training.evaluation.report import published_reference

    reference = published_reference(cfg, snapshot.load_live(cfg).id)
    if reference is not None:
        out["reference"] = reference
        log.info("test capped_recall@10 %.4f, @50 %.4f (one seed); the published report of this data and config: "
                 "%.4f ± %.4f and %.4f ± %.4f over %d seeds (%s): %s", test["capped_recall@10"],
                 test["capped_recall@50"], reference["capped_recall@10"]["mean"], reference["capped_recall@10"]["std"],
                 reference["capped_recall@50"]["mean"], reference["capped_recall@50"]["std"], reference["seeds"],
                 reference["measured"], reference["page"])
    return out


def pretrain(cfg: Config) -> dict[str, Any]:
    from training.pretrain import pretrain_stage

    return pretrain_stage(cfg)


def train(cfg: Config, init_from: Path | None = None, keep_weights: bool = False, loaded=None,
          test: bool = True) -> dict[str, Any]:
    from training.train import train as train_stage

    return train_stage(cfg, init_from=init_from, keep_weights=keep_weights, loaded=loaded, test=test)


def retrain(cfg: Config) -> dict[str, Any]:
    from training.retrain import retrain as retrain_stage

    return retrain_stage(cfg)


def report(cfg: Config) -> dict[str, Any]:
    from training.evaluation.report import report as report_stage

    return report_stage(cfg)
