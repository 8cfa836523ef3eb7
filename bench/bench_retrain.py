"""What auto-retraining buys on drifting data: weekly retrain cycles on the synthetic world.

Week 0 is `retrieval run` on the synthetic default (400k events over 120 days). Then, each week, the world moves
on 7 days (`retrieval generate --continue`: same users and pins, new pins, interest trends moving on) and one
`retrieval retrain` cycle runs (data, materialize, train, validate, publish). On that cycle's fresh holdout (the
test interactions of the new week, unseen by every model below) the same harness scores:

  (a) frozen      the week-0 model and its week-0 index: only pins of the week-0 serving corpus can be retrieved;
  (b) fresh index the week-0 model over the current candidates (its pin tower re-embeds new pins, no retraining);
  (c) retrained   the model that served the week: the release live when the week began (retrained every week,
                  through the gate);
  (c') candidate  the model this cycle trains (what goes live for the next week if the gate accepts it);
  (d) oracle      the generator's ground truth with the interest trends of the holdout's middle.

    .venv/bin/python bench/bench_retrain.py [--weeks 8] [--data-dir .data/bench_retrain] [--warm-start]

Writes docs/results/retraining.json and docs/results/retraining.png (recall per week; cycle seconds by stage).
The world ends on --end-date (default 2026-09-01) so that 8 more weeks stay in the past for the contracts.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from bench.common import RESULTS, save_and_print  # noqa: E402
from training.config import Config, DataConfig, RetrainConfig  # noqa: E402

METRICS = ("capped_recall@50", "recall@50", "capped_recall@10")
STAGES = ("advance", "data", "materialize", "training_set", "pretrain", "train", "validate", "publish")


def figures(result: dict) -> dict[str, float]:
    return {k: round(float(result[k]), 4) for k in METRICS} | {"users": int(result["users"])}


def oracle(cfg: Config, split, at: pd.Timestamp) -> dict[str, float]:
    from training.data.synthetic import GroundTruth
    from training.evaluation.harness import evaluate
    from training.evaluation.oracle import Oracle

    o = Oracle(GroundTruth.load(cfg.data_path / "raw" / "ground_truth.npz"), at=at)
    o.fit(split)
    return figures(evaluate(o, split, on="test"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--weeks", type=int, default=8)
    ap.add_argument("--data-dir", default=str(ROOT / ".data" / "bench_retrain"))
    ap.add_argument("--end-date", default="2026-09-01", help="end of the week-0 history (data.end_date)")
    ap.add_argument("--warm-start", action="store_true", help="candidates warm-start from the live checkpoint")
    ap.add_argument("--out", default=str(RESULTS / "retraining.json"))
    args = ap.parse_args()

    from training import pipeline
    from training.data.snapshot import load_live
    from training.evaluation.split import load_split
    from training.release.registry import Registry
    from training.retrain import cycle, fresh_holdout, score_checkpoint

    data_dir = Path(args.data_dir)
    shutil.rmtree(data_dir, ignore_errors=True)
    cfg = Config(data_dir=str(data_dir), data=DataConfig(end_date=args.end_date),
                 retrain=RetrainConfig(simulate_days=7, warm_start=args.warm_start))
    t0 = time.perf_counter()
    week0 = pipeline.run_all(cfg)
    week0_seconds = round(time.perf_counter() - t0, 1)
    reg = Registry(cfg)
    frozen_dir = data_dir / "bench_week0"
    frozen_dir.mkdir()
    frozen = frozen_dir / "model.pt"
    shutil.copy(data_dir / "models" / week0["model_version"] / "model.pt", frozen)
    corpus0 = pd.read_parquet(load_live(cfg).table("serving_corpus"), columns=["pin_id"])["pin_id"].to_numpy()

    rows = []
    for week in range(1, args.weeks + 1):
        live = reg.live()
        live_ckpt = data_dir / "models" / live.model_version / "model.pt"
        kept = frozen_dir / f"live_week{week}.pt"   # the model that serves this week, safe from pruning
        shutil.copy(live_ckpt, kept)
        t0 = time.perf_counter()
        entry = cycle(cfg)
        wall = round(time.perf_counter() - t0, 1)
        ts, split, manifest = load_split(cfg)
        held, holdout = fresh_holdout(split, pd.Timestamp(live.as_of), cfg.retrain.min_holdout_users)
        as_of = pd.Timestamp(entry["as_of"])
        row = {
            "week": week, "as_of": entry["as_of"], "decision": entry["decision"], "holdout": holdout,
            "frozen": score_checkpoint(cfg, frozen, ts, held, allowed_ids=corpus0),
            "fresh_index": score_checkpoint(cfg, frozen, ts, held),
            "retrained": score_checkpoint(cfg, kept, ts, held),
            "candidate": entry["gate"]["figures"]["candidate"],
            "oracle": oracle(cfg, held, as_of - pd.Timedelta(days=3.5)),
            "seconds": entry["seconds"], "cycle_seconds": wall,
            "events": int(load_live(cfg).manifest["rows"].get("fct_engagements", 0)),
            "materialize": entry.get("materialize"), "pretrain": entry.get("pretrain"),
            "live_after": entry.get("live_after"), "reasons": entry["gate"]["reasons"],
        }
        rows.append(row)
        print(json.dumps({k: row[k] for k in ("week", "decision", "cycle_seconds")} |
                         {m: row[m]["capped_recall@50"] for m in ("frozen", "fresh_index", "retrained", "candidate",
                                                                   "oracle")}), flush=True)
        kept.unlink()

    meta = {"weeks": args.weeks, "end_date": args.end_date, "warm_start": args.warm_start,
            "week0": week0, "week0_seconds": week0_seconds}
    header = ["week", "decision", "frozen", "fresh index", "retrained", "candidate", "oracle", "cycle s",
              *STAGES, "label rows"]

    def line(r):
        c = [r[m]["capped_recall@50"] for m in ("frozen", "fresh_index", "retrained", "candidate", "oracle")]
        return [str(r["week"]), r["decision"], *(f"{x:.3f}" for x in c), f"{r['cycle_seconds']:.0f}",
                *(f"{r['seconds'].get(s, 0):.0f}" for s in STAGES), f"{r['events']:,}"]

    save_and_print(args.out, meta, rows, header, line)
    plot(rows, Path(args.out).with_suffix(".png"), args.warm_start)


def plot(rows: list[dict], path: Path, warm: bool) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    weeks = [r["week"] for r in rows]
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(12, 4.2))
    for key, label, style in (("oracle", "(d) oracle", "k--"),
                              ("candidate", "(c') candidate (trained this week)", "C2:"),
                              ("retrained", "(c) auto-retrained (served the week)", "C2-o"),
                              ("fresh_index", "(b) week-0 model, fresh index", "C1-s"),
                              ("frozen", "(a) week-0 model and index", "C3-^")):
        ax.plot(weeks, [r[key]["capped_recall@50"] for r in rows], style, label=label)
    ax.set_xlabel("week after the first release")
    ax.set_ylabel("capped recall@50 on the week's held-out interactions")
    ax.set_title("Drift: what retraining buys" + (" (warm start)" if warm else ""))
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    bottom = np.zeros(len(rows))
    for i, stage in enumerate(STAGES):
        vals = np.array([r["seconds"].get(stage, 0.0) for r in rows])
        bx.bar(weeks, vals, bottom=bottom, label=stage, color=f"C{i}")
        bottom += vals
    bx.axhline(300, color="k", ls="--", lw=1, label="5 min budget")
    bx.set_xlabel("week")
    bx.set_ylabel("seconds")
    bx.set_title("Retrain cycle wall time by stage")
    bx.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"plot: {path}")


if __name__ == "__main__":
    main()
