"""Real-time ingestion: throughput, push-to-visible latency under load, and no acknowledged event lost across kill -9.

Starts the service of a data dir that holds a live release (`make run`'s by default), then:

  1. ingestion alone: closed-loop clients POST /events batches of new events for a while (events/s, batch latency);
  2. push-to-visible: while background clients ingest --events-per-s and others ask /retrieve at --retrieve-rps
     (open loop), a probe repeatedly takes a pin from a user's top 100, saves it (POST /events, time = now) and asks
     /retrieve until the pin is gone (it is now in the user's recent pins, which the answer leaves out): the time
     from sending the event to the first answer that reflects it;
  3. kill -9: clients ingest batches of unique events (a batch without an answer is sent again, same ids, until it is
     acknowledged) while the service's processes are killed with SIGKILL at random points, --kills times, each time
     restarted; then every acknowledged event id must be in the log exactly once, and nothing may be left unpushed.

    .venv/bin/python bench/bench_ingest.py [--data-dir .data] [--seconds 20] [--kills 20] [--out FILE]

Events are saves and clicks on Homefeed by users with history, on pins of the live corpus, stamped with the wall
clock; they stay in the data dir's event log (a later `retrieval build` reads them): point --data-dir at a copy when
that matters.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sqlite3
import sys
import threading
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench_service import users_with_history  # noqa: E402  (bench/bench_service.py)
from common import RESULTS, save_and_print  # noqa: E402  (bench/common.py)

from bentos.launcher import start, stop  # noqa: E402
from training.config import Config  # noqa: E402
from training.features.realtime import log_path  # noqa: E402


def now_iso() -> str:
    return datetime.now(UTC).isoformat()


class World:
    """Users with history and corpus pins to make events from."""

    def __init__(self, cfg: Config):
        import pandas as pd

        from training.data.snapshot import load_live

        self.users = users_with_history(cfg)
        self.pins = pd.read_parquet(load_live(cfg).table("serving_corpus"), columns=["pin_id"]).pin_id.to_numpy()
        self.rng = np.random.default_rng(1)
        self.lock = threading.Lock()

    def batch(self, n: int, prefix: str) -> list[dict[str, Any]]:
        with self.lock:
            users = self.rng.choice(self.users, n)
            pins = self.rng.choice(self.pins, n)
            kinds = self.rng.choice(["save", "click"], n)
        stamp = now_iso()
        return [{"event_id": f"{prefix}-{uuid.uuid4().hex}", "user_id": int(u), "pin_id": int(p), "event_type": str(k),
                 "event_timestamp": stamp, "surface": "homefeed"} for u, p, k in zip(users, pins, kinds, strict=True)]


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def ingest_alone(url: str, world: World, clients: int, seconds: float, batch: int) -> dict[str, Any]:
    import httpx

    lat: list[float] = []
    events = [0]
    errors = [0]
    stop_at = time.monotonic() + seconds

    def run() -> None:
        with httpx.Client(base_url=url, timeout=30) as c:
            while time.monotonic() < stop_at:
                body = {"events": world.batch(batch, "alone")}
                t = time.perf_counter()
                r = c.post("/events", json=body)
                if r.status_code == 200:
                    lat.append(time.perf_counter() - t)
                    events[0] += r.json()["accepted"]
                else:
                    errors[0] += 1

    t0 = time.monotonic()
    threads = [threading.Thread(target=run) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.monotonic() - t0
    return {"phase": "ingestion alone", "clients": clients, "batch": batch, "events_per_s": events[0] / wall,
            "batches": len(lat), "p50_ms": pct(lat, 50) * 1e3, "p99_ms": pct(lat, 99) * 1e3, "errors": errors[0]}


def push_to_visible(url: str, world: World, seconds: float, events_per_s: float, batch: int, retrieve_rps: float,
                    ) -> dict[str, Any]:
    """Open-loop background ingestion and retrieval; the probe measures send -> first answer without the pin."""
    import httpx

    done = threading.Event()
    counts = {"events": 0, "ingest_errors": 0, "retrieves": 0, "retrieve_errors": 0}
    ingest_lat: list[float] = []
    retrieve_lat: list[float] = []

    def paced(rate: float, work) -> None:
        with httpx.Client(base_url=url, timeout=30) as c:
            nxt = time.monotonic()
            while not done.is_set():
                work(c)
                nxt += 1.0 / rate
                time.sleep(max(0.0, nxt - time.monotonic()))

    def ingest(c) -> None:
        t = time.perf_counter()
        r = c.post("/events", json={"events": world.batch(batch, "load")})
        if r.status_code == 200:
            counts["events"] += r.json()["accepted"]
            ingest_lat.append(time.perf_counter() - t)
        else:
            counts["ingest_errors"] += 1

    def retrieve(c) -> None:
        t = time.perf_counter()
        r = c.post("/retrieve", json={"user_id": int(world.rng.choice(world.users)), "k": 100})
        counts["retrieves" if r.status_code == 200 else "retrieve_errors"] += 1
        if r.status_code == 200:
            retrieve_lat.append(time.perf_counter() - t)

    # four pacers per load so one slow answer does not stall the rate
    threads = [threading.Thread(target=paced, args=(events_per_s / batch / 4, ingest)) for _ in range(4)]
    threads += [threading.Thread(target=paced, args=(retrieve_rps / 4, retrieve)) for _ in range(4)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    visible: list[float] = []
    misses = 0
    rng = np.random.default_rng(2)
    with httpx.Client(base_url=url, timeout=30) as c:
        while time.monotonic() - t0 < seconds:
            user = int(rng.choice(world.users))
            before = c.post("/retrieve", json={"user_id": user, "k": 100}).json()
            if before.get("retrieval") != "learned" or not before["pins"]:
                continue
            pin = before["pins"][0]["pin_id"]
            event = {"event_id": f"probe-{uuid.uuid4().hex}", "user_id": user, "pin_id": pin, "event_type": "save",
                     "event_timestamp": now_iso(), "surface": "homefeed"}
            sent = time.perf_counter()
            if c.post("/events", json={"events": [event]}).status_code != 200:
                misses += 1
                continue
            while True:
                pins = {p["pin_id"] for p in c.post("/retrieve", json={"user_id": user, "k": 100}).json()["pins"]}
                if pin not in pins:
                    visible.append(time.perf_counter() - sent)
                    break
                if time.perf_counter() - sent > 10:
                    misses += 1
                    break
            time.sleep(0.2)
    wall = time.monotonic() - t0
    done.set()
    for t in threads:
        t.join()
    return {"phase": "push-to-visible under load", "events_per_s": counts["events"] / wall,
            "retrieve_rps": counts["retrieves"] / wall, "probes": len(visible), "not_visible_in_10s": misses,
            "visible_p50_ms": pct(visible, 50) * 1e3, "visible_p99_ms": pct(visible, 99) * 1e3,
            "visible_max_ms": max(visible) * 1e3 if visible else float("nan"),
            "ingest_p99_ms": pct(ingest_lat, 99) * 1e3, "retrieve_p99_ms": pct(retrieve_lat, 99) * 1e3,
            "ingest_errors": counts["ingest_errors"], "retrieve_errors": counts["retrieve_errors"]}


def kill_cycles(cfg: Config, world: World, kills: int, batch: int, clients: int, seed: int = 3) -> dict[str, Any]:
    """Kill -9 the service at random points while clients ingest; every acknowledged id must be logged once."""
    import httpx

    acked: set[str] = set()
    sent_ids: set[str] = set()
    duplicates_reported = [0]
    lock = threading.Lock()
    done = threading.Event()
    url = f"http://{cfg.serve.host}:{cfg.serve.port}"

    def client() -> None:
        pending: list[dict] | None = None
        with httpx.Client(base_url=url, timeout=5) as c:
            while not done.is_set():
                if pending is None:
                    pending = world.batch(batch, run)
                    with lock:
                        sent_ids.update(e["event_id"] for e in pending)
                try:
                    r = c.post("/events", json={"events": pending})
                except httpx.HTTPError:
                    time.sleep(0.2)   # the service is down: send the same batch again
                    continue
                if r.status_code == 200:
                    with lock:
                        acked.update(e["event_id"] for e in pending)
                        duplicates_reported[0] += r.json()["duplicates"]
                    pending = None
                else:
                    time.sleep(0.2)

    rng = np.random.default_rng(seed)
    run = f"kill-{uuid.uuid4().hex[:8]}"   # this run's ids: the log may hold earlier runs' events
    start(cfg)
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    restarts = []
    for _ in range(kills):
        time.sleep(float(rng.uniform(0.5, 3.0)))
        pids = json.loads((cfg.data_path / "serve.pid").read_text())
        for pid in [pids["pid"], *pids.get("descendants", [])]:
            try:
                os.kill(int(pid), signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.2)
        t = time.perf_counter()
        start(cfg)
        restarts.append(time.perf_counter() - t)
    time.sleep(2.0)
    done.set()
    for t in threads:
        t.join()
    stop(cfg)
    with sqlite3.connect(log_path(cfg)) as con:
        logged = [r[0] for r in con.execute("select event_id from events where event_id like ?", (f"{run}-%",))]
        mark = (con.execute("select value from meta where key = 'pushed_seq'").fetchone() or (0,))[0]
        top = con.execute("select max(seq) from events").fetchone()[0] or 0
    logged_set = set(logged)
    return {"phase": "kill -9", "kills": kills, "acknowledged": len(acked), "sent": len(sent_ids),
            "logged": len(logged), "lost": len(acked - logged_set), "duplicate_rows": len(logged) - len(logged_set),
            "logged_not_acknowledged": len(logged_set - acked), "duplicates_reported_on_retry": duplicates_reported[0],
            "unpushed_after_restart": top - mark, "restart_s_mean": float(np.mean(restarts))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data-dir", default=str(ROOT / ".data"))
    ap.add_argument("--port", type=int, default=3300)
    ap.add_argument("--seconds", type=float, default=20.0, help="seconds of each timed phase")
    ap.add_argument("--batch", type=int, default=50, help="events per POST /events (an event collector's batch)")
    ap.add_argument("--clients", type=int, default=4, help="closed-loop ingestion clients (phases 1 and 3)")
    ap.add_argument("--events-per-s", type=float, default=220.0,
                    help="background ingestion rate in phase 2 (open-loop pacing lands a few percent under it)")
    ap.add_argument("--retrieve-rps", type=float, default=50.0, help="background /retrieve rate in phase 2")
    ap.add_argument("--kills", type=int, default=20)
    ap.add_argument("--config", default=None, help="YAML config of the deployment")
    ap.add_argument("--out", default=str(RESULTS / "ingest.json"))
    args = ap.parse_args()
    cfg = Config.load(args.config, overrides={"data_dir": args.data_dir, "serve.port": args.port})
    world = World(cfg)
    rows = []
    info = start(cfg)
    try:
        ingest_alone(info["url"], world, 1, 3.0, args.batch)   # warm-up
        rows.append(ingest_alone(info["url"], world, args.clients, args.seconds, args.batch))
        print(json.dumps(rows[-1]), flush=True)
        rows.append(push_to_visible(info["url"], world, args.seconds, args.events_per_s, args.batch,
                                    args.retrieve_rps))
        print(json.dumps(rows[-1]), flush=True)
    finally:
        stop(cfg)
    if args.kills:
        rows.append(kill_cycles(cfg, world, args.kills, args.batch, args.clients))
        print(json.dumps(rows[-1]), flush=True)
    meta = {"batch": args.batch, "clients": args.clients, "events_per_s_target": args.events_per_s,
            "retrieve_rps_target": args.retrieve_rps, "online_store": cfg.features.online_store,
            "serve_workers": cfg.serve.workers}

    def line(r: dict[str, Any]) -> list[str]:
        if r["phase"] == "ingestion alone":
            return [r["phase"], f"{r['events_per_s']:.0f} events/s ({r['clients']} clients, batches of {r['batch']})",
                    f"batch p50 {r['p50_ms']:.0f} ms, p99 {r['p99_ms']:.0f} ms", f"{r['errors']} errors"]
        if r["phase"].startswith("push"):
            return [r["phase"], f"{r['events_per_s']:.0f} events/s + {r['retrieve_rps']:.0f} retrieve/s",
                    f"push-to-visible p50 {r['visible_p50_ms']:.0f} ms, p99 {r['visible_p99_ms']:.0f} ms "
                    f"({r['probes']} probes, {r['not_visible_in_10s']} not visible in 10 s)",
                    f"{r['ingest_errors'] + r['retrieve_errors']} errors"]
        return [r["phase"], f"{r['kills']} kills, {r['acknowledged']:,} events acknowledged",
                f"{r['lost']} lost, {r['duplicate_rows']} duplicate rows, {r['unpushed_after_restart']} unpushed",
                f"{r['duplicates_reported_on_retry']} retried events found logged"]

    save_and_print(args.out, meta, rows, ["phase", "load", "result", "other"], line)


if __name__ == "__main__":
    main()
    sys.stdout.flush()
    os._exit(0)
