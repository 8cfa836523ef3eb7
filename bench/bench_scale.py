"""Every stage of the pipeline at growing sizes: wall time, peak memory and rows per second, stage by stage.

Each stage runs as a user runs it, `retrieval <command> --data_dir D`, in its own process under `/usr/bin/time -v`
(Debian package `time`), so its peak resident memory is the stage's own. Sizes of the synthetic world:

  S  the default (3,000 users, 8,000 pins, 400k events)
  M  30,000 users, 100,000 pins, 4M events
  L  100,000 users, 1,000,000 pins, 20M events

Stages, in order: generate, build (pandera contracts + dbt), features (feast apply + materialize), training-set,
pretrain, train, publish (`retrieval release publish`: embed the corpus, write and verify the collection, switch),
retrain (one `retrieval retrain` cycle after the world moves on a day: build, incremental materialize and training
set, a candidate warm-started from the live model for at most 2 epochs, the gate against the live model, publish;
the gate's tolerance is 1 so that the cycle measured always publishes) and report (the default two-tower, one seed,
against the baselines; `--report-baselines` narrows them).

    .venv/bin/python bench/bench_scale.py --sizes S M [--root /work/scale] [--stages generate build ...]
        [--set train.threads=2 ...] [--out docs/results/scale.json]

A size's data dir is <root>/<size>; a run with the generate stage starts it afresh (removes what was there), a run
without it reruns the stages named on what earlier ones left. Rows of other sizes and stages already in --out are
kept (each names its commit), so sizes and stages can be measured in separate runs.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common import RESULTS, save_and_print  # noqa: E402  (bench/common.py)

from training import provenance  # noqa: E402

SIZES: dict[str, dict[str, int]] = {
    "S": {"data.n_users": 3_000, "data.n_pins": 8_000, "data.n_events": 400_000},
    "M": {"data.n_users": 30_000, "data.n_pins": 100_000, "data.n_events": 4_000_000},
    "L": {"data.n_users": 100_000, "data.n_pins": 1_000_000, "data.n_events": 20_000_000},
}
STAGES: dict[str, list[str]] = {
    "generate": ["generate"],
    "build": ["build"],
    "features": ["features"],
    "training-set": ["training-set"],
    "pretrain": ["pretrain"],
    "train": ["train"],
    "publish": ["release", "publish"],
    "retrain": ["retrain", "--retrain.simulate_days", "1", "--retrain.warm_start", "true", "--retrain.warm_epochs", "2",
                "--retrain.tolerance", "1"],
    "report": ["report", "--report.seeds", "1", "--report.variants", "default"],
}


def parquet_rows(path: Path) -> int | None:
    import pyarrow.parquet as pq

    files = [path] if path.is_file() else sorted(path.glob("**/*.parquet")) if path.is_dir() else []
    return sum(pq.ParquetFile(f).metadata.num_rows for f in files) if files else None


def stage_rows(stage: str, data_dir: Path) -> tuple[int | None, str]:
    """How many rows the stage is measured by, and what they are."""
    if stage in ("generate", "build", "features"):
        return parquet_rows(data_dir / "raw" / "events.parquet"), "events"
    if stage == "retrain":
        meta = data_dir / "training" / "training_set.json"
        return (json.loads(meta.read_text()).get("joined_rows") if meta.exists() else None), "training rows joined"
    if stage in ("training-set", "train"):
        meta = data_dir / "training" / "training_set.json"
        return (json.loads(meta.read_text())["rows"] if meta.exists() else None), "training rows"
    if stage == "pretrain":
        return parquet_rows(data_dir / "live" / "tables" / "fct_pretrain_engagements.parquet"), "engagements"
    if stage == "publish":
        return parquet_rows(data_dir / "live" / "tables" / "serving_corpus.parquet"), "corpus pins"
    if stage == "report":
        reports = sorted((data_dir / "reports").glob("*/report.json"), key=lambda p: p.stat().st_mtime)
        return (json.loads(reports[-1].read_text())["users"] if reports else None), "users evaluated"
    return None, ""


def timed_run(cmd: list[str], log: Path) -> dict[str, Any]:
    """Run cmd under /usr/bin/time -v; its wall seconds, peak RSS and exit status."""
    t0 = time.perf_counter()
    with log.open("w") as out:
        rc = subprocess.call(["/usr/bin/time", "-v", *cmd], stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
    wall = time.perf_counter() - t0
    text = log.read_text(errors="replace")
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", text)
    return {"rc": rc, "seconds": round(wall, 1), "peak_rss_gib": round(int(rss[1]) / 2**20, 3) if rss else None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", nargs="+", default=["S", "M"], choices=list(SIZES))
    ap.add_argument("--stages", nargs="+", default=list(STAGES), choices=list(STAGES))
    ap.add_argument("--root", default=str(ROOT / ".data" / "scale"), help="data dirs: <root>/<size>")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                    help="config overrides for every stage, e.g. train.threads=2 index.uri=http://127.0.0.1:19530")
    ap.add_argument("--report-baselines", default="popularity,item-knn,als,sansa")
    ap.add_argument("--out", default=str(RESULTS / "scale.json"))
    args = ap.parse_args()
    if not Path("/usr/bin/time").exists():
        sys.exit("bench_scale needs /usr/bin/time (Debian: apt-get install time)")
    out = Path(args.out)
    rerun = {(size, stage) for size in args.sizes for stage in args.stages}
    kept = [r for r in json.loads(out.read_text())["rows"] if (r["size"], r["stage"]) not in rerun] \
        if out.exists() else []
    rows: list[dict[str, Any]] = []
    commit = provenance.commit()   # per row: sizes measured in separate runs keep their own
    for size in args.sizes:
        data_dir = Path(args.root) / size
        if "generate" in args.stages and data_dir.exists():   # a new world: every later stage starts from nothing
            shutil.rmtree(data_dir)
        data_dir.mkdir(parents=True, exist_ok=True)
        flags = [f"--{k}={v}" for k, v in SIZES[size].items()]
        flags += [f"--{kv.split('=', 1)[0]}={kv.split('=', 1)[1]}" for kv in args.set]
        for stage in args.stages:
            cmd = [str(ROOT / ".venv" / "bin" / "retrieval"), *STAGES[stage], "--data_dir", str(data_dir), *flags]
            if stage == "report":
                cmd += ["--report.baselines", args.report_baselines]
            print(f"[{size}] {stage}: {' '.join(cmd[1:])}", flush=True)
            result = timed_run(cmd, data_dir / f"bench-{stage}.log")
            n, what = stage_rows(stage, data_dir)
            row = {"size": size, **{k.split(".")[1]: v for k, v in SIZES[size].items()}, "stage": stage,
                   "commit": commit, "overrides": args.set, **result, "rows": n, "rows_are": what,
                   "rows_per_s": round(n / result["seconds"], 1) if n and result["seconds"] else None}
            rows.append(row)
            print(json.dumps(row), flush=True)
            if result["rc"] != 0:
                print(f"[{size}] {stage} failed (exit {result['rc']}): see {data_dir / f'bench-{stage}.log'}",
                      flush=True)
                break
    meta = {"sizes": {s: SIZES[s] for s in args.sizes}, "overrides": args.set,
            "report_baselines": args.report_baselines}
    order = {s: i for i, s in enumerate(STAGES)}
    everything = sorted(kept + rows, key=lambda r: (list(SIZES).index(r["size"]), order[r["stage"]]))
    save_and_print(args.out, meta, everything,
                   ["size", "stage", "wall s", "peak RSS GiB", "rows", "rows/s"],
                   lambda r: [r["size"], r["stage"], f"{r['seconds']:.1f}",
                              f"{r['peak_rss_gib']:.2f}" if r["peak_rss_gib"] is not None else "",
                              f"{r['rows']:,} {r['rows_are']}" if r["rows"] else "",
                              f"{r['rows_per_s']:,.0f}" if r["rows_per_s"] else ""])


if __name__ == "__main__":
    main()
