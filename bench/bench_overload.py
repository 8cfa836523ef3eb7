"""The service under overload: goodput, accepted latency and liveness with far more clients than it can serve.

Starts the service of a data dir that holds a live release (`make run`'s by default) and drives POST /retrieve
with closed-loop clients (each sends its next request when the last is answered) on the same machine:

  1. 8, 16 and 32 clients: the best throughput the service reaches (the floor the overload levels are compared with);
  2. 256 and 1,000 clients, each level twice: clients that send again at once after a 503, and clients that wait
     the Retry-After the 503 asks for.

At every level a separate process asks GET /healthz 20 times a second (its latency is the liveness a probe sees).
Goodput is requests answered 200 within the level's seconds, per second (answers still pending when the level ends
are waited for, counted in the latencies, not in goodput); the ratio to the best of step 1 is the figure to watch.

    .venv/bin/python bench/bench_overload.py [--data-dir .data] [--seconds 20] [--out docs/results/overload.json]

The client writes HTTP/1.1 on raw asyncio streams (httpx costs more CPU than the server at these counts).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import multiprocessing as mp
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench_service import users_with_history  # noqa: E402  (bench/bench_service.py)
from common import RESULTS, save_and_print  # noqa: E402  (bench/common.py)

from bentos.launcher import get_json, start, stop  # noqa: E402
from training.config import Config  # noqa: E402


def _probe(host: str, port: int, seconds: float, out: mp.Queue) -> None:
    """GET /healthz every 50 ms on one kept-alive connection (reopened after a failure); latencies in s."""
    import http.client

    lat: list[float] = []
    failed = 0
    conn = None
    stop_at = time.monotonic() + seconds
    while time.monotonic() < stop_at:
        t = time.perf_counter()
        try:
            if conn is None:
                conn = http.client.HTTPConnection(host, port, timeout=10)
            conn.request("GET", "/healthz")
            r = conn.getresponse()
            r.read()
            if r.status == 200:
                lat.append(time.perf_counter() - t)
            else:
                failed += 1
        except (OSError, http.client.HTTPException):
            failed += 1
            conn = None
        time.sleep(max(0.0, 0.05 - (time.perf_counter() - t)))
    out.put({"lat": lat, "failed": failed})


async def _drive(host: str, port: int, users: list[int], clients: int, seconds: float, k: int,
                 honor_retry_after: bool) -> dict[str, Any]:
    ok: list[float] = []
    shed: list[float] = []
    other = [0]
    in_window = [0]   # answered 200 before the level's end (answers still pending then are drained, not counted)

    async def request(reader, writer, user: int) -> tuple[int, int]:
        body = json.dumps({"user_id": user, "k": k}).encode()
        writer.write(b"POST /retrieve HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n"
                     b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        await writer.drain()
        status = int((await reader.readline()).split()[1])
        length, retry, close = 0, 1, False
        while (line := await reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                length = int(value)
            elif name == b"retry-after":
                retry = int(value)
            elif name == b"connection" and value.strip().lower() == b"close":
                close = True
        await reader.readexactly(length)
        return status, retry if not close else -retry

    async def client(offset: int, stop_at: float) -> None:
        i, conn = offset, None
        while time.monotonic() < stop_at:
            t = time.perf_counter()
            status, retry = 0, 1
            try:
                if conn is None:
                    conn = await asyncio.open_connection(host, port)
                status, retry = await request(*conn, users[i % len(users)])
                (ok if status == 200 else shed if status == 503 else []).append(time.perf_counter() - t)
                in_window[0] += status == 200 and time.monotonic() <= stop_at
                other[0] += status not in (200, 503)
                if retry < 0:   # the server closed the connection
                    conn[1].close()
                    conn, retry = None, -retry
            except (OSError, ValueError, IndexError, asyncio.IncompleteReadError):
                other[0] += 1
                conn = None
            i += clients
            if status == 503 and honor_retry_after:
                await asyncio.sleep(retry)
        if conn is not None:
            conn[1].close()

    stop_at = time.monotonic() + seconds
    t0 = time.perf_counter()
    await asyncio.gather(*[client(j, stop_at) for j in range(clients)])
    wall = time.perf_counter() - t0   # the level's seconds plus the drain of the answers pending at its end
    a, b = np.asarray(ok) * 1e3, np.asarray(shed) * 1e3

    def pct(x: np.ndarray, q: float) -> float:
        return float(np.percentile(x, q)) if len(x) else float("nan")

    return {"requests": len(ok), "goodput_rps": in_window[0] / seconds, "p50_ms": pct(a, 50), "p99_ms": pct(a, 99),
            "shed_503": len(shed), "shed_p50_ms": pct(b, 50), "shed_p99_ms": pct(b, 99), "errors": other[0],
            "seconds": seconds, "drained_seconds": wall - seconds}


def level(url: str, users: list[int], clients: int, seconds: float, k: int, honor: bool) -> dict[str, Any]:
    from urllib.parse import urlsplit

    host, port = urlsplit(url).hostname, urlsplit(url).port
    q: mp.Queue = mp.Queue()
    prober = mp.get_context("fork").Process(target=_probe, args=(host, port, seconds, q), daemon=True)
    prober.start()
    row = asyncio.run(_drive(host, port, users, clients, seconds, k, honor))
    probe = q.get(timeout=seconds + 30)
    prober.join(10)
    h = np.asarray(probe["lat"]) * 1e3
    _, meta = get_json(f"{url}/metadata", timeout=10)
    return {"clients": clients, "after_503": "waits Retry-After" if honor else "sends again at once", **row,
            "healthz_p50_ms": float(np.percentile(h, 50)) if len(h) else float("nan"),
            "healthz_p99_ms": float(np.percentile(h, 99)) if len(h) else float("nan"),
            "healthz_max_ms": float(h.max()) if len(h) else float("nan"), "healthz_failed": probe["failed"],
            "admission_after": meta.get("admission")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data-dir", default=str(ROOT / ".data"))
    ap.add_argument("--port", type=int, default=3200)
    ap.add_argument("--baseline", type=int, nargs="+", default=[8, 16, 32], help="closed-loop clients (floor)")
    ap.add_argument("--overload", type=int, nargs="+", default=[256, 1000], help="closed-loop clients (overload)")
    ap.add_argument("--seconds", type=float, default=20.0, help="seconds per overload level (baseline: half)")
    ap.add_argument("--k", type=int, default=100)
    ap.add_argument("--config", default=None, help="YAML config of the deployment")
    ap.add_argument("--out", default=str(RESULTS / "overload.json"))
    args = ap.parse_args()
    cfg = Config.load(args.config, overrides={"data_dir": args.data_dir, "serve.port": args.port})
    users = users_with_history(cfg)
    info = start(cfg)
    rows = []
    try:
        level(info["url"], users, 4, 3.0, args.k, True)   # warm-up
        for clients in args.baseline:
            rows.append({"phase": "baseline", **level(info["url"], users, clients, args.seconds / 2, args.k, True)})
            print(json.dumps(rows[-1]), flush=True)
        best = max(r["goodput_rps"] for r in rows)
        for clients in args.overload:
            for honor in (False, True):
                row = level(info["url"], users, clients, args.seconds, args.k, honor)
                rows.append({"phase": "overload", **row, "goodput_ratio": row["goodput_rps"] / best})
                print(json.dumps(rows[-1]), flush=True)
    finally:
        stop(cfg)
    meta = {"k": args.k, "best_baseline_rps": best, "serve": dataclasses.asdict(cfg.serve),
            "index": cfg.index.uri or "embedded milvus-lite", "online_store": cfg.features.online_store}
    save_and_print(args.out, meta, rows,
                   ["clients", "after a 503", "goodput req/s", "of best", "accepted p50 / p99 ms", "shed 503",
                    "errors", "/healthz p50 / p99 ms"],
                   lambda r: [str(r["clients"]), r["after_503"], f"{r['goodput_rps']:.0f}",
                              f"{r['goodput_ratio']:.0%}" if "goodput_ratio" in r else "",
                              f"{r['p50_ms']:.0f} / {r['p99_ms']:.0f}", f"{r['shed_503']:,}", str(r["errors"]),
                              f"{r['healthz_p50_ms']:.1f} / {r['healthz_p99_ms']:.1f}"])


if __name__ == "__main__":
    main()
    sys.stdout.flush()
    os._exit(0)
