"""``retrieval retrain``: the gate, the lock, warm start, kills at three points, and cycles with a serving
follower. The cycles run as ``retrieval retrain`` subprocesses (as cron runs them) on their own small data dir."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from tests.conftest import SMALL
from training.config import Config, ConfigError, RetrainConfig
from training.retrain import RetrainBusy, decide, fresh_holdout, history, retrain_lock

RETRIEVAL = str(Path(sys.executable).parent / "retrieval")


# --- the gate, on figures ----------------------------------------------------------------------------------------
def _figs(m: float, cov: float = 0.3) -> dict[str, float]:
    return {"capped_recall@50": m, "coverage@50": cov}


def test_gate_accepts_within_tolerance_and_rejects_below_it():
    rc = RetrainConfig(tolerance=0.01)
    assert decide(_figs(0.30), _figs(0.30), rc) == (True, [])
    assert decide(_figs(0.295), _figs(0.30), rc)[0]                  # within the tolerance
    ok, reasons = decide(_figs(0.28), _figs(0.30), rc)
    assert not ok and "below live's 0.3000" in reasons[0]


def test_gate_rejects_a_coverage_collapse_and_a_floor_and_accepts_the_first_model():
    rc = RetrainConfig(min_coverage_ratio=0.5, min_metric=0.1)
    ok, reasons = decide(_figs(0.31, cov=0.1), _figs(0.30, cov=0.3), rc)
    assert not ok and "coverage@50" in reasons[0]
    ok, reasons = decide(_figs(0.05), None, rc)
    assert not ok and "retrain.min_metric" in reasons[0]
    assert decide(_figs(0.2), None, rc) == (True, [])                # nothing live: only the floor applies


def test_retrain_config_is_checked():
    assert RetrainConfig(every="6h").every_seconds == 6 * 3600
    assert RetrainConfig(every="0s").every_seconds == 0
    for bad in ({"every": "daily"}, {"tolerance": -0.1}, {"metric": "auc"}, {"cycles": 0}):
        with pytest.raises(ConfigError, match="retrain."):
            RetrainConfig(**bad)


def test_the_fresh_holdout_keeps_only_test_interactions_since_the_cut():
    from training.evaluation.split import temporal_split

    t0 = pd.Timestamp("2026-01-01", tz="UTC")
    rows = [(u, 100 + i, t0 + pd.Timedelta(days=i)) for u in range(1, 31) for i in range(10)]
    split = temporal_split(pd.DataFrame(rows, columns=["user_id", "pin_id", "event_timestamp"]), test_fraction=0.2)
    held, info = fresh_holdout(split, t0 + pd.Timedelta(days=9), min_users=5)
    assert info["holdout"] == "fresh" and info["users"] == 30 and info["interactions"] == 30
    assert held.test.sum() == 30 and split.test.sum() == 60
    assert (held.train != split.train).nnz == 0
    whole, info = fresh_holdout(split, t0 + pd.Timedelta(days=30), min_users=5)
    assert whole is split and info["holdout"] == "test" and "only 0 users" in info["note"]


# --- warm start --------------------------------------------------------------------------------------------------
def test_warm_start_copies_shared_weights_and_remaps_pin_rows(checkpoints):
    from training.model.checkpoint import build_model, load_checkpoint, placeholder_tables, train_config, warm_start
    from training.model.encoding import Encoder

    _, encoder, payload = load_checkpoint(checkpoints[0])
    state = encoder.state()
    old_ids = encoder.pin_ids
    new_ids = np.unique(np.concatenate([old_ids[::2], old_ids.max() + np.arange(1, 40)]))   # half kept, 39 new
    new_encoder = Encoder.from_state({**state, "pin_ids": new_ids})
    tc = train_config(payload["config"])
    model = build_model(new_encoder, tc, placeholder_tables(new_encoder, (payload.get("pretrained") or {}).get("dim")))
    counts = warm_start(model, new_encoder, payload)
    assert counts["remapped"] >= 1 and counts["copied"] > 10
    key = next(k for k in model.state_dict() if k.endswith("pin_embedding.weight"))
    table = model.state_dict()[key]
    old = payload["model"][key]
    kept = np.searchsorted(new_ids, old_ids[::2]) + 1
    assert np.allclose(table[kept].numpy(), old[np.arange(0, len(old_ids), 2) + 1].numpy())
    fresh = np.searchsorted(new_ids, old_ids.max() + np.arange(1, 40)) + 1
    assert not np.allclose(table[fresh].numpy(), 0) and table.shape[0] == len(new_ids) + 1


# --- the lock ----------------------------------------------------------------------------------------------------
def test_a_second_retrain_exits_at_once_with_a_message(tmp_path):
    cfg = Config(data_dir=str(tmp_path))
    with retrain_lock(cfg):
        with pytest.raises(RetrainBusy, match=f"pid {os.getpid()}"), retrain_lock(cfg):
            pass
        t0 = time.monotonic()
        out = subprocess.run([RETRIEVAL, "retrain", "--data_dir", str(tmp_path)], capture_output=True, text=True,
                             timeout=120)
    assert out.returncode == 75, out.stderr[-2000:]
    assert "another retrain is running" in out.stderr and f"pid {os.getpid()}" in out.stderr
    assert time.monotonic() - t0 < 60
    with retrain_lock(cfg):   # released with its holder
        pass


# --- real cycles on their own data dir ---------------------------------------------------------------------------
CYCLE_CONFIG = {
    "data": {**SMALL, "n_events": 30_000, "end_date": "2026-06-01"},
    "train": {"epochs": 3, "patience": 2, "batch_size": 256, "threads": 1},
    "index": {"verify_queries": 60},
    "retrain": {"min_holdout_users": 10},
}


SAME_DATA = ("--retrain.skip_unchanged", "false")   # retrain on the data of the live release (else skipped)


def _retrieval(data_dir: Path, config: Path, *args: str, pause: str | None = None, **kw) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k not in ("BENTOML_HOME", "RETRIEVAL_PAUSE_AT")}
    if pause:
        env["RETRIEVAL_PAUSE_AT"] = pause
    return subprocess.Popen([RETRIEVAL, *args, "--data_dir", str(data_dir), "--config", str(config)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def _finish(proc: subprocess.Popen, timeout: float = 600) -> dict:
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err[-4000:]
    start = 0 if out.startswith("{") else out.rindex("\n{") + 1   # Feast prints its progress on stdout first
    return json.loads(out[start:])


def _state(data_dir: Path) -> dict:
    return json.loads((data_dir / "releases" / "registry.json").read_text())


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A small synthetic world with a published release, made by `retrieval run` in a subprocess."""
    root = tmp_path_factory.mktemp("retrain")
    config = root / "config.yaml"
    config.write_text(yaml.safe_dump(CYCLE_CONFIG))
    data_dir = root / "data"
    _finish(_retrieval(data_dir, config, "run"), timeout=900)
    return data_dir, config


@pytest.mark.slow
def test_a_rejected_candidate_leaves_the_live_release_and_is_recorded(world):
    data_dir, config = world
    live = _state(data_dir)["live"]
    [skipped] = _finish(_retrieval(data_dir, config, "retrain"))["candidates"]   # no new data: nothing to learn
    assert skipped["decision"] == "skipped" and "no new data" in skipped["reasons"][0]
    out = _finish(_retrieval(data_dir, config, "retrain", "--retrain.min_metric", "0.99", *SAME_DATA))
    [row] = out["candidates"]
    assert row["decision"] == "rejected" and "retrain.min_metric" in row["reasons"][0]
    assert _state(data_dir)["live"] == live == row["live_after"]
    assert not (data_dir / "releases" / f"{row['model_version']}.json").exists()
    entry = history(Config(data_dir=str(data_dir)))[-1]
    assert entry["decision"] == "rejected" and set(entry["gate"]["figures"]) == {"candidate", "live"}
    assert entry["seconds"]["train"] > 0 and entry["seconds"]["validate"] > 0
    shown = subprocess.run([RETRIEVAL, "release", "history", "--data_dir", str(data_dir)], capture_output=True,
                           text=True, timeout=120)
    assert shown.returncode == 0, shown.stderr[-2000:]
    assert [r["decision"] for r in json.loads(shown.stdout)] == ["skipped", "rejected"]


@pytest.mark.slow
@pytest.mark.parametrize("point", ["retrain:data", "retrain:train", "insert"])
def test_a_retrain_killed_anywhere_leaves_the_live_release_serving(world, point):
    data_dir, config = world
    before = _state(data_dir)
    proc = _retrieval(data_dir, config, "retrain", "--retrain.tolerance", "1", *SAME_DATA, pause=point)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if f"paused at {point}" in line or (not line and proc.poll() is not None):
            break
    assert proc.poll() is None, f"the retrain ended before reaching {point}"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert _state(data_dir) == before
    status = subprocess.run([RETRIEVAL, "release", "status", "--data_dir", str(data_dir)], capture_output=True,
                            text=True, timeout=120, env={k: v for k, v in os.environ.items() if k != "BENTOML_HOME"})
    assert status.returncode == 0 and json.loads(status.stdout)["live"] == before["live"]


@pytest.mark.slow
def test_cycles_switch_the_service_with_no_failed_request_and_clean_up_after_kills(world):
    """Two cycles (the world moves on a week before each; each candidate warm-started for one epoch) while clients
    call the service: every request succeeds, each answer comes from a published version, the service ends on the
    new live release; the first cycle removes what the killed runs left; the online store was materialized
    incrementally and matches the offline store; the training set joined only the new labels; each candidate kept
    the live model's blend and prior weights and was evaluated by the gate alone."""
    from bentos.launcher import start, stop
    from tests.bentos.conftest import clients
    from tests.training.features.test_feast import SERVICES, assert_online_equals_offline
    from training.release.registry import Registry

    data_dir, config = world
    cfg = Config.load(config, {"data_dir": str(data_dir)})
    cfg.serve.port = _free_port()
    start_live = _state(data_dir)["live"]
    url = start(cfg, timeout_s=240)["url"]   # its own process, with the data dir's BentoML home
    try:
        user = Registry(cfg).live().example_user_id
        with clients(url, [user] * 4) as results:
            out = _finish(_retrieval(data_dir, config, "retrain", "--cycles", "2", "--every", "0s",
                                     "--retrain.simulate_days", "7", "--retrain.tolerance", "1",
                                     "--retrain.warm_start", "true", "--retrain.warm_epochs", "1",
                                     "--train.valid_users", "120"), timeout=1200)
            live = _state(data_dir)["live"]
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and (not results or results[-1][1].get("model_version") != live):
                time.sleep(0.5)
    finally:
        stop(cfg)
    assert out["failed"] == 0 and [c["decision"] for c in out["candidates"]] == ["accepted", "accepted"]
    assert live == out["candidates"][-1]["model_version"] != start_live
    codes = [status for status, _ in results]
    assert codes and all(c == 200 for c in codes), {c: codes.count(c) for c in set(codes)}
    served = {body["model_version"] for _, body in results}
    assert served <= {start_live, *(c["model_version"] for c in out["candidates"])} and live in served
    entries = history(cfg)[-2:]
    assert all(e["materialize"]["mode"] == "incremental" and sum(e["materialize"]["rows_written"].values()) > 0
               for e in entries)
    assert all(e["training_set"]["mode"] == "incremental" and 0 < e["training_set"]["joined_rows"]
               < e["training_set"]["rows"] / 2 for e in entries), [e["training_set"] for e in entries]
    assert all(e["fit"]["epochs_run"] == 1 and e["warm_start"] for e in entries)   # retrain.warm_epochs
    assert [e["fit"]["weights_kept_from"] for e in entries] == [e["live_before"] for e in entries]
    assert entries[0]["publish"]["cleaned"]["collections"], "the killed publish's collection was not removed"
    assert all(e["gate"]["holdout"]["holdout"] == "fresh" for e in entries)
    for e in entries:   # retrain.test_evaluation off: the gate's figures are the candidate's evaluation
        release = Registry(cfg).record(e["model_version"])
        assert release.metrics == {} and release.gate["figures"]["candidate"]["users"] > 0
    assert_online_equals_offline(cfg, SERVICES[0], "user_id", "user_features")


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_movielens_replay_moves_data_until_forward_across_runs(tmp_path):
    from training.config import DataConfig
    from training.retrain import _advance, _replayed

    cfg = Config(data_dir=str(tmp_path), data=DataConfig(source="movielens", until="1998-01-01"))
    moved, info = _advance(cfg, 14)
    assert moved.data.until.startswith("1998-01-15") and info["until"].startswith("1998-01-15")
    assert _replayed(cfg).data.until == moved.data.until      # the next run (a new process) starts from there
    assert _advance(cfg, 14)[0].data.until.startswith("1998-01-29")
    with pytest.raises(ValueError, match="data.until"):
        _advance(Config(data_dir=str(tmp_path / "other"), data=DataConfig(source="movielens")), 7)


def test_pruning_keeps_the_newest_checkpoints_and_every_published_one(tmp_path):
    from training.config import RetrainConfig
    from training.retrain import prune

    cfg = Config(data_dir=str(tmp_path), retrain=RetrainConfig(keep_checkpoints=2, keep_pretrained=1))
    versions = [f"tt-v{i}" for i in range(6)]
    for i, v in enumerate(versions):
        (tmp_path / "models" / v).mkdir(parents=True)
        (tmp_path / "models" / v / "model.pt").write_text("x")
        os.utime(tmp_path / "models" / v, (1_000_000 + i, 1_000_000 + i))
        (tmp_path / "pretrained" / f"t{i}").mkdir(parents=True)
        os.utime(tmp_path / "pretrained" / f"t{i}", (1_000_000 + i, 1_000_000 + i))
    (tmp_path / "releases").mkdir()
    (tmp_path / "releases" / "registry.json").write_text(json.dumps(
        {"live": "tt-v1", "history": ["tt-v0", "tt-v1"], "previous": ["tt-v0"]}))   # live and its rollback target
    out = prune(cfg)
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == ["tt-v0", "tt-v1", "tt-v4", "tt-v5"]
    assert sorted(out["checkpoints"]) == ["tt-v2", "tt-v3"]
    assert [p.name for p in (tmp_path / "pretrained").iterdir()] == ["t5"]
