"""Model quality on one dataset: the data stage, then `retrieval report` (the two-tower default over seeds next to
the tuned baselines, and the generator's oracle on synthetic data), written where the documentation reads it.

    .venv/bin/python bench/bench_model.py --dataset synthetic          # the world `make run` trains on
    .venv/bin/python bench/bench_model.py --dataset ml100k [--ml100k ../shared/datasets/ml-100k]
    .venv/bin/python bench/bench_model.py --dataset synthetic-medium --seeds 1   # 30k users, 100k pins, 4M events

Writes docs/results/model-<dataset>.json (``--out``): the report's JSON (every run's metrics, the baselines, the
verdict, the effective config) with the provenance of this run and the peak memory; ``make docs-gen`` renders the
Benchmarks → Model quality page and the model card from it. ``--variants`` adds ablation groups
(training/evaluation/report.py: VARIANT_GROUPS); ``--keep-data`` reuses a data dir that holds a training set.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from common import RESULTS, write_results  # noqa: E402  (bench/common.py)

from training.config import Config  # noqa: E402

ML100K_DEFAULT = ROOT.parent / "shared" / "datasets" / "ml-100k"
WORLDS = {"synthetic": {}, "synthetic-medium": {"data.n_users": 30_000, "data.n_pins": 100_000,
                                                "data.n_events": 4_000_000}}
"""The synthetic worlds: the default one (``make run``'s) and a medium catalog, 12× its pins (same generator,
same structure, only the sizes differ)."""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dataset", choices=[*WORLDS, "ml100k"], default="synthetic")
    ap.add_argument("--ml100k", default=str(ML100K_DEFAULT), help="ML-100k directory (u.data, u.item, u.user)")
    ap.add_argument("--data-dir", help="data dir (default .data/bench_model/<dataset>)")
    ap.add_argument("--keep-data", action="store_true", help="reuse the data dir's training set when it has one")
    ap.add_argument("--variants", default="default", help="report.variants: ablation groups next to the default")
    ap.add_argument("--seeds", type=int, default=3, help="training seeds per two-tower row")
    ap.add_argument("--grids", default="", help="report.grids: JSON replacing baselines' tuning grids (large catalogs)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (train.threads)")
    ap.add_argument("--out", help="JSON output (default docs/results/model-<dataset>.json)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    logging.captureWarnings(True)
    logging.getLogger("py.warnings").setLevel(logging.ERROR)

    from training import pipeline
    from training.evaluation.report import report

    data_dir = Path(args.data_dir or ROOT / ".data" / "bench_model" / args.dataset)
    overrides = {"report.variants": args.variants, "report.seeds": args.seeds, "train.threads": args.threads,
                 "report.grids": args.grids,
                 **WORLDS.get(args.dataset, {})}
    if args.dataset == "ml100k":
        if not (Path(args.ml100k) / "u.data").exists():
            sys.exit(f"bench_model: no ML-100k at {args.ml100k} (u.data); download it from "
                     "https://grouplens.org/datasets/movielens/100k/ and pass --ml100k DIR")
        overrides.update({"data.source": "movielens", "data.movielens_path": str(Path(args.ml100k).resolve())})
    cfg = Config.load(overrides={"data_dir": str(data_dir), **overrides})

    t0 = time.perf_counter()
    data_seconds = None
    if not (args.keep_data and (cfg.data_path / "training" / "training_set.parquet").exists()):
        data_seconds = pipeline.run_data(cfg, regenerate=True)
    out = report(cfg)
    doc = json.loads((Path(out["report"]).parent / "report.json").read_text())
    doc.pop("provenance", None)   # this run's own, with the peak memory, replaces it
    target = Path(args.out or RESULTS / f"model-{args.dataset}.json")
    written = write_results(target, {"dataset": args.dataset, "data_stage_seconds": data_seconds,
                                     "wall_seconds": round(time.perf_counter() - t0, 1), **doc})
    for line in doc["verdict"]["lines"]:
        print(line)
    print(f"\nwrote {target}; rerun: {written['provenance']['command']}")


if __name__ == "__main__":
    main()
    sys.stdout.flush()
    os._exit(0)   # skip interpreter teardown (duckdb's bindings report spurious leaks when Feast's connections go)
