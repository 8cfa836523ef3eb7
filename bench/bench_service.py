"""Benchmark: the retrieval service end to end (`bentoml serve` on loopback) at 100k and 1M pins, next to
the in-process floor measured in the same run.

Needs a data dir where `make run` (or `retrieval run`) has trained a model. For each corpus size N, the
bench publishes a release of that model whose collection holds N pins: the serving corpus plus synthetic
pins around the real ones (``--synthetic``, see ``corpus_of_size``), through the normal publish path
(verification included), and searches that collection alone at the params its verification settled on. It then
starts the service and drives POST /retrieve (k=100, users with history, exclude_seen) at concurrency 1, 8, 16
and 32 from a client
process of threads, and reports p50/p99 latency, throughput and errors. The floor is the work of one
request done in process without HTTP, BentoML or Milvus: Feast online features + user tower + exact numpy
top-k over the same N vectors. It stops a service already running on the data dir (milvus-lite opens a
database in one process only) and rolls back to the release that was live before.

    .venv/bin/python bench/bench_service.py [--data-dir .data] [--sizes 100000 1000000] [--seconds 10]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import httpx  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common import RESULTS, save_and_print, timed_searches  # noqa: E402  (bench/common.py)

from bentos.launcher import start, stop  # noqa: E402
from training.config import Config  # noqa: E402
from training.evaluation.metrics import top_k  # noqa: E402
from training.features.store import feature_store  # noqa: E402
from training.model.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from training.model.towers import run_tower  # noqa: E402
from training.release.embeddings import PinEmbeddings, embed_corpus  # noqa: E402
from training.release.index import EMBEDDING, IndexStore  # noqa: E402
from training.release.publish import latest_checkpoint, publish, rollback, sample_users  # noqa: E402
from training.release.registry import Registry  # noqa: E402

USER_SERVICE, PIN_SERVICE = "user_tower_v2", "pin_tower_v1"


def corpus_of_size(cfg: Config, model, encoder, n: int, seed: int = 0, synthetic: str = "perturbed") -> PinEmbeddings:
    """The live serving corpus embedded, plus synthetic pins, n in all.

    ``perturbed``: each synthetic pin is a random real pin's vector (and interest) plus Gaussian noise with the
    real corpus's own covariance at 0.3 of its scale: pins around the real ones, in the few directions the pin
    tower actually uses (8 principal axes carry 96% of the real corpus's variance; isotropic noise in all 112
    dimensions would make a corpus no trained tower produces). ``tower``: synthetic pins with
    random interests and engagement counts and ids unknown to the model, through the same pin tower; their vectors
    depend on a handful of features only, so they are near-duplicates (median nearest-neighbour cosine 0.999999
    among 200k of them, against 0.995 between the real pins), which makes recall@100 against exact search a matter
    of breaking ties."""
    real = embed_corpus(cfg, model, encoder, PIN_SERVICE).frame
    extra = n - len(real)
    if extra <= 0:
        return PinEmbeddings(real.head(n).reset_index(drop=True))
    rng = np.random.default_rng(seed)
    ids = np.arange(extra, dtype=np.int64) + 900_000_000
    if synthetic == "perturbed":
        base = np.stack(real[EMBEDDING].to_numpy()).astype(np.float32)
        _, sv, vt = np.linalg.svd(base - base.mean(0), full_matrices=False)
        spread = (sv / np.sqrt(len(base)))[:, None] * vt   # rows: the corpus's principal axes, scaled by their std
        src = rng.integers(0, len(base), extra)
        vectors = np.empty((extra, base.shape[1]), dtype=np.float32)
        for lo in range(0, extra, 65536):
            b = base[src[lo:lo + 65536]]
            vectors[lo:lo + 65536] = b + 0.3 * rng.normal(size=(len(b), len(sv))).astype(np.float32) @ spread
        interests = real["interest_id"].to_numpy()[src].astype("int64")
        engagement = real["decayed_engagement"].to_numpy()[src]
    elif synthetic == "tower":
        feats = pd.DataFrame({
            "pin_id": ids, "interest_id": rng.integers(0, encoder.n_interests, extra),
            "decayed_engagement": rng.exponential(1.0, extra).astype(np.float32),
            "pin_impressions_30d": rng.poisson(20, extra), "pin_engagements_30d": rng.poisson(3, extra),
            "pin_saves_30d": rng.poisson(1, extra), "age_days": rng.uniform(0, 90, extra),
        })
        vectors = run_tower(model.pin_tower, encoder.pins(feats), batch=65536)
        interests, engagement = feats.interest_id.astype("int64").to_numpy(), feats.decayed_engagement.to_numpy()
    else:
        raise ValueError(f"synthetic pins: {synthetic!r} is not perturbed or tower")
    synth = pd.DataFrame({"pin_id": ids, "interest_id": interests,
                          "image_signature": [f"bench{i}" for i in range(extra)],
                          "decayed_engagement": engagement, EMBEDDING: list(vectors)})
    return PinEmbeddings(pd.concat([real, synth], ignore_index=True))


def users_with_history(cfg: Config, n: int = 500) -> list[int]:
    from training.data.snapshot import load_live

    seq = pd.read_parquet(load_live(cfg).table("user_sequence"), columns=["user_id", "history_length"])
    ids = seq.loc[seq.history_length >= 5, "user_id"].unique()
    return [int(i) for i in np.random.default_rng(0).choice(ids, size=min(n, len(ids)), replace=False)]


def floor(cfg: Config, model, encoder, emb: PinEmbeddings, users: list[int], k: int) -> dict[str, float]:
    """In-process work of one request: online features + user tower + exact top-k (numpy)."""
    store = feature_store(cfg)
    vectors = emb.vectors
    lat = []
    torch.set_num_threads(1)
    for i, u in enumerate(users[:300] * 2):
        t = time.perf_counter()
        feats = store.online(USER_SERVICE, "user_id", [u])
        with torch.no_grad():
            q = model.user_tower(encoder.users(feats))
        q = (q[:, 0] if q.dim() == 3 else q).numpy()
        top_k(q @ vectors.T, k)
        if i >= 20:   # warm-up
            lat.append(time.perf_counter() - t)
    a = np.asarray(lat) * 1e3
    return {"p50_ms": float(np.percentile(a, 50)), "p99_ms": float(np.percentile(a, 99))}


def index_alone(cfg: Config, model, encoder, emb: PinEmbeddings, release: dict[str, Any], n_queries: int = 300,
                k: int = 100) -> list[dict[str, Any]]:
    """The published collection searched directly with the search params its verification settled on: p50/p99
    and recall@k against exact search of user-tower queries, unfiltered and filtered to 1 and 2 interests."""
    store = IndexStore(cfg)
    users = sample_users(cfg, model, encoder, release["feature_services"]["user"], n_queries, seed=1)
    queries = np.stack(users["vector"].to_numpy()).astype(np.float32)
    params = release["index"]["search_params"]
    vectors, ids = emb.vectors, emb.frame["pin_id"].to_numpy()
    interest = emb.frame["interest_id"].to_numpy()
    rng, known = np.random.default_rng(2), np.unique(interest)
    top = users["top_interest"].to_numpy()
    first = np.where(top >= 0, top, rng.choice(known, len(users)))
    other = rng.choice(known, len(users))
    filters = {"none": [None] * len(users), "1 interest": [[int(i)] for i in first],
               "2 interests": [sorted({int(i), int(j)}) for i, j in zip(first, other, strict=True)]}
    rows = []
    with store.client(release["collection"], load=True) as client:
        for fname, fs in filters.items():
            truths = []
            for q, f in zip(queries, fs, strict=True):
                sub = np.arange(len(ids)) if f is None else np.flatnonzero(np.isin(interest, f))
                truths.append(ids[sub][top_k(q[None, :] @ vectors[sub].T, min(k, len(sub)))[0]])
            r = timed_searches(client, release["collection"], queries, fs, truths, k, params)
            rows.append({"pins": len(emb), "mode": f"index alone {params}, filter: {fname}", **r, "concurrency": 1})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def load(url: str, users: list[int], concurrency: int, seconds: float, k: int,
         mode: str | None = None) -> dict[str, float]:
    lat: list[float] = []
    stages: list[dict[str, float]] = []
    errors = [0]
    stop_at = time.monotonic() + seconds

    def worker(offset: int) -> None:
        with httpx.Client(base_url=url, timeout=30) as c:
            i = offset
            while time.monotonic() < stop_at:
                body = {"user_id": users[i % len(users)], "k": k, **({"mode": mode} if mode else {})}
                t = time.perf_counter()
                try:
                    r = c.post("/retrieve", json=body)
                    ok = r.status_code == 200
                    if ok:
                        stages.append(r.json()["timings_ms"])
                except httpx.HTTPError:
                    ok = False
                dt = time.perf_counter() - t
                if ok:
                    lat.append(dt)
                else:
                    errors[0] += 1
                i += concurrency

    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker, args=(j,)) for j in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    a = np.asarray(lat) * 1e3
    return {"concurrency": concurrency, "requests": len(lat), "errors": errors[0], "rps": len(lat) / wall,
            "p50_ms": float(np.percentile(a, 50)), "p99_ms": float(np.percentile(a, 99)),
            "server_p50_ms": {name: round(float(np.median([t[name] for t in stages])), 2)
                              for name in (stages[0] if stages else {})}}


def overload(url: str, users: list[int], clients: int, seconds: float, k: int) -> dict[str, Any]:
    """``clients`` concurrent keep-alive connections for ``seconds``, each sending its next request as soon as the
    last is answered (after a 1 s pause when it was shed, as its Retry-After asks): how many were answered, how
    many shed with 503, the latency of each, and anything else (errors). The client writes HTTP/1.1 on raw asyncio
    streams: httpx's pool costs more CPU than the server at this many connections, which would measure the
    client."""
    import asyncio
    from urllib.parse import urlsplit

    host, port = urlsplit(url).hostname, urlsplit(url).port
    ok: list[float] = []
    shed: list[float] = []
    other = [0]

    async def request(reader, writer, user: int) -> int:
        body = json.dumps({"user_id": user, "k": k}).encode()
        writer.write(b"POST /retrieve HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n"
                     b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        await writer.drain()
        status = int((await reader.readline()).split()[1])
        length = 0
        while (line := await reader.readline()) not in (b"\r\n", b""):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":")[1])
        await reader.readexactly(length)
        return status

    async def client(offset: int, stop_at: float) -> None:
        i, conn = offset, None
        while time.monotonic() < stop_at:
            t = time.perf_counter()
            status = 0
            try:
                if conn is None:
                    conn = await asyncio.open_connection(host, port)
                status = await request(*conn, users[i % len(users)])
                (ok if status == 200 else shed if status == 503 else []).append(time.perf_counter() - t)
                other[0] += status not in (200, 503)
            except (OSError, ValueError, IndexError, asyncio.IncompleteReadError):
                other[0] += 1
                conn = None
            i += clients
            if status == 503:
                await asyncio.sleep(1.0)
        if conn is not None:
            conn[1].close()

    async def run() -> float:
        stop_at = time.monotonic() + seconds
        t0 = time.perf_counter()
        await asyncio.gather(*(client(j, stop_at) for j in range(clients)))
        return time.perf_counter() - t0

    wall = asyncio.run(run())
    a, b = np.asarray(ok or [np.nan]) * 1e3, np.asarray(shed or [np.nan]) * 1e3
    return {"concurrency": clients, "requests": len(ok), "shed_503": len(shed), "errors": other[0],
            "rps": len(ok) / wall, "p50_ms": float(np.nanpercentile(a, 50)), "p99_ms": float(np.nanpercentile(a, 99)),
            "shed_p50_ms": float(np.nanpercentile(b, 50)), "shed_p99_ms": float(np.nanpercentile(b, 99))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data-dir", default=str(ROOT / ".data"))
    ap.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 16, 32])
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--k", type=int, default=100)
    ap.add_argument("--port", type=int, default=3100)
    ap.add_argument("--config", default=None, help="YAML config of the deployment, e.g. the one `retrieval stack up` "
                    "prints (Milvus server + Redis)")
    ap.add_argument("--workers", type=int, nargs="+", default=[1], help="service worker processes to measure")
    ap.add_argument("--checkpoint", default=None, help="model to serve (default: the newest checkpoint); every "
                    "retrieval mode it supports is measured at concurrency 1 and 16")
    ap.add_argument("--synthetic", choices=["perturbed", "tower"], default="perturbed",
                    help="how pins beyond the serving corpus are made (see corpus_of_size)")
    ap.add_argument("--overload", type=int, default=1000, help="clients of the overload level (0: skip)")
    ap.add_argument("--overload-seconds", type=float, default=20.0)
    ap.add_argument("--out", default=str(RESULTS / "service.json"))
    args = ap.parse_args()
    cfg = Config.load(args.config, overrides={"data_dir": args.data_dir})
    cfg = dataclasses.replace(cfg, serve=dataclasses.replace(cfg.serve, port=args.port),
                              index=dataclasses.replace(cfg.index, keep_releases=100))
    stop(cfg)
    was_live = Registry(cfg).state()["live"]
    checkpoint = Path(args.checkpoint) if args.checkpoint else latest_checkpoint(cfg)
    model, encoder, payload = load_checkpoint(checkpoint)
    users = users_with_history(cfg)
    rows = []
    published = 0
    try:
        for n in args.sizes:
            emb = corpus_of_size(cfg, model, encoder, n, synthetic=args.synthetic)
            # the same model under a bench version, so that each size is its own release
            version = f"{payload['model_version']}-bench{n}-{int(time.time())}"
            bench_ckpt = cfg.data_path / "bench_models" / version / "model.pt"   # not under models/: never "latest"
            bench_ckpt.parent.mkdir(parents=True, exist_ok=True)
            save_checkpoint({**payload, "model_version": bench_ckpt.parent.name}, bench_ckpt)
            t0 = time.perf_counter()
            out = publish(cfg, bench_ckpt, embeddings=emb)
            published += 1
            build = time.perf_counter() - t0
            print(f"published {out['live']}: {len(emb):,} pins in {build:.1f}s, recall {out['verification']}",
                  flush=True)
            release = Registry(cfg).record(out["live"])
            rows.extend(index_alone(cfg, model, encoder, emb, dataclasses.asdict(release), k=args.k))
            fl = floor(cfg, model, encoder, emb, users, args.k)
            rows.append({"pins": len(emb), "mode": "in-process floor", **fl})
            print(json.dumps(rows[-1]), flush=True)
            for workers in args.workers:
                served = dataclasses.replace(cfg, serve=dataclasses.replace(cfg.serve, workers=workers))
                label = f"bentoml serve, {workers} worker{'s' if workers > 1 else ''}"
                info = start(served)
                try:
                    load(info["url"], users, 4, 3.0, args.k)   # warm-up
                    for c in args.concurrency:
                        rows.append({"pins": len(emb), "mode": label, **load(info["url"], users, c,
                                                                                args.seconds, args.k)})
                        print(json.dumps(rows[-1]), flush=True)
                    modes = httpx.get(info["url"] + "/metadata").json()["release"]["modes"]
                    for mode in modes if len(modes) > 1 and workers == args.workers[0] else []:
                        for c in (1, 16):
                            rows.append({"pins": len(emb), "mode": f"{label}, mode={mode}",
                                         **load(info["url"], users, c, args.seconds, args.k, mode=mode)})
                            print(json.dumps(rows[-1]), flush=True)
                    if args.overload and workers == args.workers[0]:
                        rows.append({"pins": len(emb), "mode": f"{label}, overload",
                                     **overload(info["url"], users, args.overload, args.overload_seconds, args.k)})
                        print(json.dumps(rows[-1]), flush=True)
                finally:
                    stop(served)
    finally:
        for _ in range(published):
            if was_live is not None and Registry(cfg).state()["live"] != was_live:
                rollback(cfg)
    meta = {"k": args.k, "seconds_per_level": args.seconds, "model": payload["model_version"],
            "index": cfg.index.uri or "embedded milvus-lite", "index_type": cfg.index.index_type,
            "online_store": cfg.features.online_store}
    save_and_print(args.out, meta, rows,
                   ["pins", "mode", "concurrency", "requests", "errors", "req/s", "p50 ms", "p99 ms",
                    "shed 503 (p50 / p99 ms)", "in the server p50 ms"],
                   lambda r: [f"{r['pins']:,}", r["mode"], str(r.get("concurrency", "")), str(r.get("requests", "")),
                              str(r.get("errors", "")), f"{r['rps']:.0f}" if r.get("rps") else "", f"{r['p50_ms']:.1f}",
                              f"{r['p99_ms']:.1f}",
                              f"{r['shed_503']} ({r['shed_p50_ms']:.1f} / {r['shed_p99_ms']:.1f})" if "shed_503" in r
                              else "", " / ".join(f"{v:.1f}" for v in r.get("server_p50_ms", {}).values())])

if __name__ == "__main__":
    main()
    sys.stdout.flush()
    os._exit(0)
