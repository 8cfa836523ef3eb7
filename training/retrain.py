"""``retrieval retrain``: the auto-retraining loop. One cycle:

1. **data**: (demo: move the data on by ``retrain.simulate_days``) a new snapshot (contracts + dbt), switched
   live (the cycle stops here, recorded as skipped, when it is the live release's own snapshot); Feast
   materialized incrementally; the point-in-time training set (only the new labels joined and appended when the
   snapshot continues the previous one); the pre-trained ID table refreshed when
   ``retrain.pretrain_every_days`` says so (never overlapping the candidate's training window);
2. **train** a candidate, from scratch or warm-started from the live checkpoint (``retrain.warm_start``, for at most
   ``retrain.warm_epochs`` epochs, keeping the live model's blend and prior weights: ``retrain.keep_live_weights``);
3. **validate**: candidate and live model scored by the same harness on the same fresh holdout: the test
   interactions at or after the live model's data end (unseen by both); the gate (``decide``) compares
   ``retrain.metric`` with a tolerance, an absolute floor and the coverage; publish adds its ANN recall check;
4. **publish** (the synchronized rollout: collection built and verified, user tower stored, then the alias and the
   registry switch at once; the service follows) or **reject** (the live release is untouched);
5. **prune** checkpoints and pre-trained tables (snapshots and releases are pruned by their own stages; the live
   release and its rollback target never are).

Every candidate, accepted, rejected or failed, is one line of ``<data_dir>/releases/candidates.jsonl`` with its
gate figures and stage timings (``retrieval release history``). One lock per data dir: a second retrain exits
at once with a message naming the holder. A cycle killed anywhere leaves the live release serving: the data
snapshot switch, the checkpoint write and the publish switch are each one atomic rename, and the next cycle
removes what the dead one left (publish's recovery; checkpoints that no release or newer run owns are pruned).
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pandas as pd

from training import pipeline
from training.config import Config, RetrainConfig, parse_utc
from training.io import atomic_write_text
from training.release.index import IndexBuildError
from training.release.publish import CHECKPOINT_FILE, pause_point, publish
from training.release.registry import Registry, Release, ReleaseError

log = logging.getLogger(__name__)

HISTORY_FILE = "candidates.jsonl"
PUBLISH_FIELDS = ("collection", "rows", "verification", "search_params", "cleaned", "pruned")
FIT_FIELDS = ("best_epoch", "epochs_run", "seconds_to_best", "hit_epoch_cap", "best_valid")
LOCK_FILE = ".retrain.lock"


class RetrainBusy(RuntimeError):
    """Another retrain holds the data dir's lock."""

    exit_status = 75
    """What `retrieval retrain` exits with (EX_TEMPFAIL: try again later); other errors exit with 2."""


@contextmanager
def retrain_lock(cfg: Config) -> Iterator[None]:
    """One retrain per data dir; the kernel releases the lock when its holder dies (even by SIGKILL)."""
    cfg.data_path.mkdir(parents=True, exist_ok=True)
    path = cfg.data_path / LOCK_FILE
    fh = open(path, "a+")   # noqa: SIM115 - held for the whole block
    try:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as e:
            fh.seek(0)
            holder = fh.read().strip() or "unknown"
            raise RetrainBusy(f"another retrain is running on {cfg.data_path} ({holder}); this one exits without "
                              "doing anything (the running one will publish or reject its candidate)") from e
        fh.seek(0)
        fh.truncate()
        fh.write(f"pid {os.getpid()}, since {datetime.now(UTC).isoformat(timespec='seconds')}")
        fh.flush()
        yield
    finally:
        fh.close()


# --- the gate ----------------------------------------------------------------------------------------------------
def decide(candidate: dict[str, float], live: dict[str, float] | None, rc: RetrainConfig) -> tuple[bool, list[str]]:
    """The gate on figures of the same holdout: (accepted, the reasons of a rejection). ``live`` None: nothing is
    live (or it could not be scored), only the floor applies."""
    m = rc.metric
    reasons = []
    if candidate[m] < rc.min_metric:
        reasons.append(f"{m} {candidate[m]:.4f} is below retrain.min_metric {rc.min_metric}")
    if live is not None:
        if candidate[m] < live[m] - rc.tolerance:
            reasons.append(f"{m} {candidate[m]:.4f} is below live's {live[m]:.4f} - retrain.tolerance {rc.tolerance}")
        cov, live_cov = candidate.get("coverage@50", 1.0), live.get("coverage@50", 0.0)
        if cov < rc.min_coverage_ratio * live_cov:
            reasons.append(f"coverage@50 {cov:.4f} collapsed below retrain.min_coverage_ratio {rc.min_coverage_ratio}"
                           f" x live's {live_cov:.4f}")
    return not reasons, reasons


def fresh_holdout(split, since: pd.Timestamp | None, min_users: int):
    """(split whose test part holds only interactions at or after ``since``, description). Too few users with such
    interactions (or no ``since``): the whole test part."""
    test = split.frame[split.frame["part"] == "test"]
    if since is not None:
        fresh = test[test["event_timestamp"] >= since]
        users = fresh["user_id"].nunique()
        if users >= min_users:
            return split.test_since(since), {"holdout": "fresh", "since": since.isoformat(), "users": int(users),
                                             "interactions": len(fresh)}
        note = f"only {users} users interacted since {since.isoformat()} (< retrain.min_holdout_users)"
    else:
        note = "no live model data end to cut at"
    return split, {"holdout": "test", "note": note, "users": int(test["user_id"].nunique()),
                   "interactions": len(test)}


GATE_FIGURES = ("recall@10", "recall@50", "capped_recall@10", "capped_recall@50", "capped_recall@100", "ndcg@10",
                "coverage@50", "users")


def score_checkpoint(cfg: Config, path: Path, ts: pd.DataFrame, split, allowed_ids=None) -> dict[str, float]:
    """The harness's test figures of a checkpoint's model on ``split`` (the users' features from ``ts``);
    ``allowed_ids``: only these pins can be retrieved (e.g. an old index's corpus), default every candidate."""
    import numpy as np

    from training.evaluation.harness import evaluate
    from training.evaluation.scorer import TwoTowerScorer
    from training.model.checkpoint import load_checkpoint

    model, encoder, payload = load_checkpoint(path)
    scorer = TwoTowerScorer(cfg, model, encoder, ts, split, payload["feature_services"]["pin"]).prepare("test")
    if allowed_ids is not None:
        blocked = ~np.isin(split.items, allowed_ids)
        score = scorer.score
        scorer.score = lambda user_idx: np.where(blocked, -np.inf, score(user_idx)).astype(np.float32)
    result = evaluate(scorer, split, on="test")
    return {k: round(float(result[k]), 5) for k in GATE_FIGURES if k in result}


def validate(cfg: Config, candidate: Path, live_checkpoint: Path | None, live_as_of: str | None,
             loaded=None) -> dict[str, Any]:
    """Candidate and live model on the same fresh holdout of the live training set, and the gate's decision.
    ``loaded``: ``load_split(cfg)`` already read, e.g. by the candidate's training in the same cycle (the
    candidates' pin features it read at the index refreshes are then read once for both)."""
    from training.evaluation.split import load_split

    ts, split, _ = loaded or load_split(cfg, features="fit")
    since = pd.Timestamp(parse_utc(live_as_of)) if live_as_of else None
    held, holdout = fresh_holdout(split, since, cfg.retrain.min_holdout_users)
    figures = {"candidate": score_checkpoint(cfg, candidate, ts, held)}
    live_note = None
    if live_checkpoint is not None:
        try:
            figures["live"] = score_checkpoint(cfg, live_checkpoint, ts, held)
        except Exception as e:  # noqa: BLE001 - a live model the new data cannot feed is a finding, not a crash
            live_note = f"the live model could not be scored on the new training set: {e}"
    elif live_as_of is not None:
        live_note = "the live release's checkpoint was pruned or moved: nothing to compare with"
    accepted, reasons = decide(figures["candidate"], figures.get("live"), cfg.retrain)
    return {"accepted": accepted, "reasons": reasons, "metric": cfg.retrain.metric, "tolerance": cfg.retrain.tolerance,
            "figures": figures, "holdout": holdout, **({"note": live_note} if live_note else {})}


# --- one cycle ---------------------------------------------------------------------------------------------------
def _live(cfg: Config) -> tuple[Release | None, Path | None]:
    """(the live release, its checkpoint if still on disk)."""
    release = Registry(cfg).live()
    if release is None:
        return None, None
    path = cfg.data_path / "models" / release.model_version / CHECKPOINT_FILE
    return release, path if path.exists() else None


def _advance(cfg: Config, days: int) -> tuple[Config, dict[str, Any]]:
    """Move the data on by ``days`` (demo / benchmark): continue the synthetic world, or move a replay's
    ``data.until`` (kept in <data_dir>/retrain/replay.json between runs)."""
    if cfg.data.source == "synthetic":
        return cfg, pipeline.continue_raw(cfg, days)
    state_file = cfg.data_path / "retrain" / "replay.json"
    if state_file.exists():
        until = parse_utc(json.loads(state_file.read_text())["until"])
    elif cfg.data.until:
        until = parse_utc(cfg.data.until)
    else:
        raise ValueError("retrain.simulate_days replays MovieLens by time: set data.until to where the replay starts")
    until += timedelta(days=days)
    state_file.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(state_file, json.dumps({"until": until.isoformat()}))
    return replace(cfg, data=replace(cfg.data, until=until.isoformat())), {"until": until.isoformat()}


def _replayed(cfg: Config) -> Config:
    """``cfg`` with the replay's current ``data.until``, when a MovieLens replay is under way."""
    state_file = cfg.data_path / "retrain" / "replay.json"
    if cfg.data.source != "movielens" or not state_file.exists():
        return cfg
    return replace(cfg, data=replace(cfg.data, until=json.loads(state_file.read_text())["until"]))


def _pretrain_due(cfg: Config) -> tuple[bool, str]:
    """Whether the pre-trained table needs a refresh for the live training set's window."""
    if cfg.train.pretrained == "none":
        return False, "the model uses no pre-trained ids"
    from training.evaluation.split import load_split
    from training.model.pretrained import latest_usable

    _, split, _ = load_split(cfg, features=False)
    start = split.window_start(cfg.train.window_fraction).to_pydatetime()
    try:
        table = latest_usable(cfg.data_path / "pretrained", start)
    except (FileNotFoundError, ValueError):
        return True, "no usable table"
    age = (start - table.end).total_seconds() / 86400
    if age > cfg.retrain.pretrain_every_days:
        return True, f"the newest usable table ends {age:.1f} days before the training window"
    return False, f"table {table.table_id} ends {age:.1f} days before the training window"


def cycle(cfg: Config) -> dict[str, Any]:
    """One retrain under the lock; returns its history line (also appended to candidates.jsonl)."""
    with retrain_lock(cfg):
        return _cycle(cfg)


def _cycle(cfg: Config) -> dict[str, Any]:
    started = datetime.now(UTC)
    seconds: dict[str, float] = {}
    entry: dict[str, Any] = {"started_at": started.isoformat(timespec="seconds"), "seconds": seconds,
                             "warm_start": cfg.retrain.warm_start}
    live, live_ckpt = _live(cfg)
    live_version, live_as_of = (live.model_version, live.as_of or None) if live else (None, None)
    entry["live_before"] = live_version
    cfg = _replayed(cfg)

    def stage(name: str, fn):
        t0 = time.perf_counter()
        try:
            return fn()
        finally:
            seconds[name] = round(time.perf_counter() - t0, 2)
            log.info("retrain stage %s: %.1fs", name, seconds[name])

    try:
        if cfg.retrain.simulate_days:
            cfg, entry["advanced"] = stage("advance", lambda: _advance(cfg, cfg.retrain.simulate_days))
        built = stage("data", lambda: pipeline.build(cfg))
        entry.update(snapshot_id=built["snapshot_id"], as_of=built["as_of"])
        pause_point("retrain:data")
        if cfg.retrain.skip_unchanged and live and built["snapshot_id"] == live.snapshot_id:
            entry["decision"] = "skipped"
            entry["gate"] = {"reasons": [f"no new data: snapshot {built['snapshot_id']} is the live release's "
                                         "(retrain.skip_unchanged)"]}
            log.info("retrain skipped: %s", entry["gate"]["reasons"][0])
            return entry
        mat = stage("materialize", lambda: pipeline.features(cfg))
        entry["materialize"] = {k: mat.get(k) for k in ("mode", "rows_written", "seconds")}
        built_set = stage("training_set", lambda: pipeline.training_set(cfg))
        entry["training_set"] = {k: built_set.get(k) for k in ("mode", "rows", "joined_rows")}
        due, why = _pretrain_due(cfg)
        entry["pretrain"] = {"refreshed": due, "why": why}
        if due:
            entry["pretrain"]["table"] = stage("pretrain", lambda: pipeline.pretrain(cfg))["table_id"]
        init = live_ckpt if cfg.retrain.warm_start else None
        if cfg.retrain.warm_start and init is None:
            entry["warm_start_note"] = "no live checkpoint: trained from scratch"
        fit_cfg = cfg
        if init is not None and cfg.retrain.warm_epochs:
            fit_cfg = replace(cfg, train=replace(cfg.train, epochs=cfg.retrain.warm_epochs, min_epochs=1))
        keep = init is not None and cfg.retrain.keep_live_weights
        loaded: dict[str, Any] = {}

        def train_stage() -> dict[str, Any]:
            from training.evaluation.split import load_split

            loaded["split"] = load_split(cfg, features="fit")   # read once: the candidate's training and the gate
            return pipeline.train(fit_cfg, init_from=init, keep_weights=keep, loaded=loaded["split"],
                                  test=cfg.retrain.test_evaluation)

        trained = stage("train", train_stage)
        entry["model_version"] = trained["model_version"]
        entry["fit"] = {k: trained["fit"][k] for k in FIT_FIELDS if k in trained["fit"]}
        kept = [w["kept_from"] for w in (trained["fit"].get("blend"), trained["fit"].get("prior")) if w and
                "kept_from" in w]
        entry["fit"]["weights_kept_from"] = kept[0] if kept else None
        pause_point("retrain:train")
        gate = stage("validate", lambda: validate(cfg, Path(trained["checkpoint"]), live_ckpt, live_as_of,
                                                  loaded=loaded.pop("split")))
        entry["gate"] = gate
        if gate["accepted"]:
            try:
                out = stage("publish", lambda: publish(cfg, Path(trained["checkpoint"]), gate=gate))
                entry["decision"] = "accepted"
                entry["publish"] = {k: out[k] for k in PUBLISH_FIELDS}
            except (IndexBuildError, ReleaseError) as e:   # publish's own checks (ANN recall, rows) reject it
                entry["decision"] = "rejected"
                entry["gate"]["reasons"] = [*gate["reasons"], f"publish: {e}"]
        else:
            entry["decision"] = "rejected"
    except Exception as e:
        entry["decision"] = "failed"
        entry["error"] = f"{type(e).__name__}: {e}"
        raise
    finally:
        if "decision" in entry:   # not on a kill or Ctrl-C: the next cycle starts over
            if entry["decision"] != "failed":
                entry["pruned"] = prune(cfg)
            entry["live_after"] = Registry(cfg).state()["live"]
            entry["finished_at"] = datetime.now(UTC).isoformat(timespec="seconds")
            _append_history(cfg, entry)
    log.info("retrain %s: %s (live %s -> %s)%s", entry.get("model_version", "-"), entry["decision"], live_version,
             entry["live_after"], "" if entry["decision"] == "accepted" else f": {entry['gate']['reasons']}")
    return entry


def _append_history(cfg: Config, entry: dict[str, Any]) -> None:
    path = Registry(cfg).dir / HISTORY_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    line = json.dumps(entry, default=str) + "\n"
    with open(path, "a") as fh:   # one write of one line, O_APPEND: a crash loses the line, never half of it
        fh.write(line)
        fh.flush()
        os.fsync(fh.fileno())


def history(cfg: Config) -> list[dict[str, Any]]:
    """Every candidate a retrain produced, oldest first (``retrieval release history``)."""
    path = Registry(cfg).dir / HISTORY_FILE
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue   # a line cut by a full disk: skip it, keep the rest readable
    return out


def summary(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One short row per candidate: decision, gate figures (candidate vs live), reasons, seconds by stage."""
    rows = []
    for e in entries:
        gate = e.get("gate") or {}
        figs = gate.get("figures", {})
        m = gate.get("metric", "capped_recall@50")
        rows.append({"finished_at": e.get("finished_at"), "model_version": e.get("model_version"),
                     "decision": e.get("decision"), "as_of": e.get("as_of"),
                     m: {who: f.get(m) for who, f in figs.items()}, "holdout": gate.get("holdout", {}).get("holdout"),
                     "reasons": gate.get("reasons") or ([e["error"]] if e.get("error") else []),
                     "live_after": e.get("live_after"), "seconds": e.get("seconds")})
    return rows


# --- retention ---------------------------------------------------------------------------------------------------
def prune(cfg: Config) -> dict[str, list[str]]:
    """Delete checkpoints beyond ``retrain.keep_checkpoints`` (never one of a published release) and pre-trained
    tables beyond ``retrain.keep_pretrained``."""
    state = Registry(cfg).state()
    keep_versions = set(state["history"]) | ({state["live"]} if state["live"] else set())
    out: dict[str, list[str]] = {"checkpoints": [], "pretrained": []}
    models = cfg.data_path / "models"
    if models.exists():
        dirs = sorted((p for p in models.iterdir() if p.is_dir()), key=lambda p: p.stat().st_mtime)
        newest = {p.name for p in dirs[-cfg.retrain.keep_checkpoints:]}
        for p in dirs:
            if p.name not in keep_versions and p.name not in newest:
                shutil.rmtree(p, ignore_errors=True)
                out["checkpoints"].append(p.name)
    tables = cfg.data_path / "pretrained"
    if tables.exists():
        dirs = sorted((p for p in tables.iterdir() if p.is_dir()), key=lambda p: p.stat().st_mtime)
        for p in dirs[:-cfg.retrain.keep_pretrained]:
            shutil.rmtree(p, ignore_errors=True)
            out["pretrained"].append(p.name)
    return out


# --- the loop ----------------------------------------------------------------------------------------------------
def retrain(cfg: Config) -> dict[str, Any]:
    """``retrieval retrain``: ``retrain.cycles`` cycles, one every ``retrain.every`` (a failed cycle is recorded and
    the loop goes on; the result counts it)."""
    rc = cfg.retrain
    entries = []
    failures = 0
    for i in range(rc.cycles):
        t0 = time.monotonic()
        try:
            entries.append(cycle(cfg))
        except RetrainBusy:
            raise
        except Exception as e:
            if rc.cycles == 1:
                raise
            failures += 1
            log.exception("retrain cycle %d of %d failed: %s", i + 1, rc.cycles, e)
        if i + 1 < rc.cycles:
            wait = rc.every_seconds - (time.monotonic() - t0)
            if wait > 0:
                log.info("next retrain cycle in %.0fs", wait)
                time.sleep(wait)
    return {"cycles": rc.cycles, "failed": failures, "candidates": summary(entries)}
