"""Benchmark: HNSW recall on a Milvus server for the trained model's pins as they are (inner product over vectors
of unequal norms) and through the index's inner-product-to-cosine reduction (``mips_transform``, what publish
does), at several ef, unfiltered and filtered to each query's top interest.

Needs a data dir where a model was trained with the deployment's config (the features in its online store), and a
Milvus server (`retrieval stack up`). The pins are the serving corpus plus synthetic pins around the real ones
(bench_service's ``corpus_of_size``); the queries are the user tower's, as in publish's verification.

    .venv/bin/python bench/bench_mips.py --config stack.yaml --data-dir D [--pins 300000] [--ef 128 256 512 1024]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench_service import corpus_of_size  # noqa: E402  (bench/bench_service.py)
from common import RESULTS, save_and_print  # noqa: E402

from training.config import Config  # noqa: E402
from training.model.checkpoint import load_checkpoint  # noqa: E402
from training.release.index import IndexStore, build_collection  # noqa: E402
from training.release.publish import latest_checkpoint, sample_users, verify  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", required=True, help="YAML with index.uri of a Milvus server (HNSW)")
    ap.add_argument("--data-dir", default=str(ROOT / ".data"))
    ap.add_argument("--pins", type=int, default=300_000)
    ap.add_argument("--ef", type=int, nargs="+", default=[128, 256, 512, 1024])
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--out", default=str(RESULTS / "mips.json"))
    args = ap.parse_args()
    cfg = Config.load(args.config, overrides={"data_dir": args.data_dir})
    if not cfg.index.uri or cfg.index.index_type != "HNSW":
        raise SystemExit("bench_mips needs index.uri (a Milvus server) and index.index_type HNSW in --config")
    model, encoder, payload = load_checkpoint(latest_checkpoint(cfg))
    emb = corpus_of_size(cfg, model, encoder, args.pins)
    norms = np.linalg.norm(emb.vectors, axis=1)
    users = sample_users(cfg, model, encoder, payload["feature_services"]["user"], args.queries, seed=0)
    queries = np.stack(users["vector"].to_numpy()).astype(np.float32)
    store, rows = IndexStore(cfg), []
    for mips in (False, True):
        name = f"pins_bench_mips_{int(mips)}_{int(time.time())}"
        try:
            with store.client(name) as client:
                t0 = time.perf_counter()
                info = build_collection(client, name, emb, {"model_version": "bench"}, cfg.index, mips=mips)
                build_s = time.perf_counter() - t0
                for ef in args.ef:
                    r = verify(client, name, emb, queries, cfg.index, {**info["search_params"], "ef": ef},
                               query_interests=users["top_interest"].to_numpy())
                    rows.append({"pins": len(emb), "stored": "reduced to cosine" if mips else "as they are (IP)",
                                 "ef": ef, "recall": r["recall"], "filtered_recall": r["filtered_recall"],
                                 "build_s": round(build_s, 1)})
                    print(json.dumps(rows[-1]), flush=True)
        finally:
            store.drop(name)
    meta = {"model": payload["model_version"], "index": cfg.index.uri,
            "build_params": info["build_params"], "partition_key": cfg.index.partition_key,
            "norms_min_median_max": [float(norms.min()), float(np.median(norms)), float(norms.max())]}
    save_and_print(args.out, meta, rows, ["pins", "pins stored", "ef", "recall@100", "filtered", "build s"],
                   lambda r: [f"{r['pins']:,}", r["stored"], str(r["ef"]), f"{r['recall']:.3f}",
                              f"{r['filtered_recall']:.3f}", f"{r['build_s']:.0f}"])


if __name__ == "__main__":
    main()
    sys.stdout.flush()
    os._exit(0)
