"""Benchmark: the pin index (training.index) at 100k and 1M pins, next to exact numpy search in the same run.

For each size and index type: build time (batched inserts + flush, then index + load), single-query top-k
latency p50/p99 unfiltered, with one interest and with two interests, and ANN recall@k against exact
search. The floor is numpy brute force (one BLAS thread, same queries, same filters). Vectors are unit
64-d, drawn around 256 centres with interests tied to the centres (like trained pin embeddings), and
queries are perturbed pins. Runs through the same ``build_collection`` / ``search`` code as ``publish``.

    .venv/bin/python bench/bench_index.py [--sizes 100000 1000000] [--index-types FLAT IVF_FLAT]
    .venv/bin/python bench/bench_index.py --server http://127.0.0.1:PORT --index-types HNSW --ef 128 256 512
        (a Milvus server, e.g. `retrieval stack up`; the interest is the partition key, as publish builds it;
        one row per search ef)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common import RESULTS, save_and_print, timed_searches  # noqa: E402  (bench/common.py)

from training.config import Config, IndexConfig  # noqa: E402
from training.evaluation.metrics import top_k  # noqa: E402
from training.release.embeddings import PinEmbeddings  # noqa: E402
from training.release.index import EMBEDDING, IndexStore, build_collection  # noqa: E402

DIM = 64
N_INTERESTS = 20


def make_pins(n: int, seed: int = 0) -> tuple[PinEmbeddings, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(256, DIM)).astype(np.float32)
    cluster = rng.integers(0, 256, n)
    x = centres[cluster] + 0.6 * rng.normal(size=(n, DIM)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    interest = np.where(rng.random(n) < 0.8, cluster % N_INTERESTS, rng.integers(0, N_INTERESTS, n))
    frame = pd.DataFrame({"pin_id": np.arange(n, dtype=np.int64) + 10_000_000, "interest_id": interest.astype(np.int64),
                          "image_signature": [f"s{i}" for i in range(n)],
                          "decayed_engagement": rng.exponential(1.0, n).astype(np.float32), EMBEDDING: list(x)})
    return PinEmbeddings(frame), x


def percentiles(seconds: list[float]) -> tuple[float, float]:
    a = np.asarray(seconds) * 1e3
    return float(np.percentile(a, 50)), float(np.percentile(a, 99))


def run_size(n: int, index_types: list[str], queries: int, k: int, work: Path, server: str | None = None,
             efs: list[int] | None = None) -> list[dict]:
    emb, x = make_pins(n)
    rng = np.random.default_rng(1)
    q = x[rng.integers(0, n, queries)] + 0.3 * rng.normal(size=(queries, DIM)).astype(np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    filters = {"none": [None] * queries,
               "1 interest": [[int(i)] for i in rng.integers(0, N_INTERESTS, queries)],
               "2 interests": [sorted({int(i), int((i + 7) % N_INTERESTS)})
                               for i in rng.integers(0, N_INTERESTS, queries)]}
    ids = emb.frame["pin_id"].to_numpy()
    interest = emb.frame["interest_id"].to_numpy()

    def exact(qv: np.ndarray, f: list[int] | None) -> np.ndarray:
        if f is None:
            return ids[top_k(qv[None, :] @ x.T, k)[0]]
        sub = np.flatnonzero(np.isin(interest, f))
        return ids[sub][top_k(qv[None, :] @ x[sub].T, k)[0]]

    rows = []
    truth: dict[str, list[np.ndarray]] = {}
    for name, fs in filters.items():   # the floor: numpy brute force, same queries and filters
        lat, res = [], []
        for qv, f in zip(q, fs, strict=True):
            t = time.perf_counter()
            res.append(exact(qv, f))
            lat.append(time.perf_counter() - t)
        truth[name] = res
        p50, p99 = percentiles(lat)
        rows.append({"pins": n, "engine": "numpy exact (floor)", "filter": name, "p50_ms": p50, "p99_ms": p99,
                     "recall": 1.0, "build_s": 0.0})
    for index_type in index_types:
        shutil.rmtree(work, ignore_errors=True)
        cfg = Config(data_dir=str(work), index=IndexConfig(index_type=index_type, uri=server or ""))
        store = IndexStore(cfg)
        name = f"pins_bench_{index_type.lower()}_{n}"
        t0 = time.perf_counter()
        with store.client(name) as client:
            info = build_collection(client, name, emb, {"model_version": "bench"}, cfg.index)
            build_s = time.perf_counter() - t0
            engine = "milvus server" if server else "milvus-lite"
            settings = [{**info["search_params"], "ef": ef} for ef in efs] if index_type == "HNSW" and efs \
                else [info["search_params"]]
            for params in settings:
                for fname, fs in filters.items():
                    r = timed_searches(client, name, q, fs, truth[fname], k, params)
                    rows.append({"pins": n, "engine": f"{engine} {index_type} {info['build_params'] or ''} "
                                                      f"{params or ''}".strip(),
                                 "filter": fname, "p50_ms": r["p50_ms"], "p99_ms": r["p99_ms"],
                                 "recall": r["recall"], "build_s": build_s, "insert_s": info["insert_seconds"],
                                 "index_s": info["index_seconds"]})
                    print(json.dumps(rows[-1]), flush=True)
        store.drop(name)
    shutil.rmtree(work, ignore_errors=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    ap.add_argument("--index-types", nargs="+", default=["FLAT", "IVF_FLAT"])
    ap.add_argument("--queries", type=int, default=300)
    ap.add_argument("--k", type=int, default=100)
    ap.add_argument("--work", default=str(ROOT / ".data" / "bench_index"))
    ap.add_argument("--server", default=None, help="Milvus server URI (default: embedded milvus-lite)")
    ap.add_argument("--ef", type=int, nargs="*", default=[], help="HNSW search ef values to measure")
    ap.add_argument("--out", default=str(RESULTS / "pin-index.json"))
    args = ap.parse_args()
    import milvus_lite
    import pymilvus

    rows = []
    for n in args.sizes:
        rows += run_size(n, args.index_types, args.queries, args.k, Path(args.work), args.server, args.ef)
    meta = {"pymilvus": pymilvus.__version__, "milvus_lite": getattr(milvus_lite, "__version__", "?"),
            "k": args.k, "queries": args.queries}
    header = ["pins", "engine", "filter", "p50 ms", "p99 ms", f"recall@{args.k}", "build s"]
    save_and_print(args.out, meta, rows, header,
                   lambda r: [f"{r['pins']:,}", r["engine"], r["filter"], f"{r['p50_ms']:.1f}", f"{r['p99_ms']:.1f}",
                              f"{r['recall']:.3f}", f"{r['build_s']:.1f}"])

if __name__ == "__main__":
    main()
    sys.stdout.flush()
    os._exit(0)
