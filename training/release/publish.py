"""Stage: publish a release (build, verify, switch), roll back, recover, and report the releases.

``publish`` embeds the serving corpus with the checkpoint's pin tower, builds the new collection completely,
verifies its row count and its ANN recall against exact search on sampled user embeddings, stores the exported
user tower, and only then switches the alias and the registry (``training.release.registry``: one atomic file
replace is the switch the service sees). ``rollback`` makes the release that was live before the live one live
again (a rolled-back release never comes back by a later rollback). Both hold an exclusive lock on the
registry. A publish killed at any point leaves ``registry.json`` untouched, so the live release keeps serving;
the next publish (or ``recover``) deletes whatever the dead one left (collections, towers, records not in the
registry) and re-points the alias at the live collection.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from training.config import Config, IndexConfig
from training.data.snapshot import load_live
from training.evaluation.metrics import top_k
from training.features.store import feature_store
from training.model.checkpoint import export_user_tower, load_checkpoint, train_config
from training.model.towers import run_tower
from training.release.embeddings import PinEmbeddings, embed_corpus
from training.release.index import IndexBuildError, IndexStore, build_collection, collection_metadata, row_count, search
from training.release.model_store import delete_user_tower, store_user_tower, stored_user_towers, tag_of
from training.release.registry import Registry, Release, ReleaseError, check_pair

log = logging.getLogger(__name__)

CHECKPOINT_FILE = "model.pt"
PAUSE_ENV = "RETRIEVAL_PAUSE_AT"
"""Fault injection for the crash tests: a publish pauses (sleeps) when it reaches the named point."""


def latest_checkpoint(cfg: Config) -> Path:
    found = sorted((cfg.data_path / "models").glob(f"*/{CHECKPOINT_FILE}"), key=lambda p: p.stat().st_mtime)
    if not found:
        raise FileNotFoundError(f"no checkpoint under {cfg.data_path / 'models'}: run `retrieval train`")
    return found[-1]


def pause_point(name: str) -> None:
    """Crash-test hook: when $RETRIEVAL_PAUSE_AT == name, announce it and sleep until killed."""
    if os.environ.get(PAUSE_ENV) == name:
        print(f"paused at {name}", file=sys.stderr, flush=True)
        time.sleep(3600)


def sample_users(cfg: Config, model, encoder, user_service: str, n: int, seed: int = 0) -> pd.DataFrame:
    """``n`` sampled users of the live snapshot with what the service would compute for them: user_id,
    ``vector`` (the user tower over the online store's features through ``user_service``), ``top_interest``
    (-1 when none) and ``history_length``."""
    ids = pd.read_parquet(load_live(cfg).table("user_profile"), columns=["user_id"])["user_id"].unique()
    ids = np.random.default_rng(seed).choice(ids, size=min(n, len(ids)), replace=False)
    feats = feature_store(cfg).online_frame(user_service, "user_id", ids)
    vectors = run_tower(model.user_tower, encoder.users(feats)).astype(np.float32)
    if vectors.ndim == 3:   # multi-embedding: the first (most representative) embedding checks the index
        vectors = vectors[:, 0]
    return pd.DataFrame({
        "user_id": ids.astype(np.int64),
        "vector": list(vectors),
        "top_interest": feats["top_interest_ids"].map(lambda v: int(v[0]) if v is not None and len(v) else -1),
        "history_length": pd.to_numeric(feats["history_length"], errors="coerce").fillna(0).astype(int),
    })


def _recall_ok(result: dict[str, Any], min_recall: float) -> bool:
    """Verification passes when both the unfiltered and the filtered recall reach ``min_recall``."""
    return min(result["recall"], result.get("filtered_recall", 1.0)) >= min_recall


def _verify_with_escalation(client, name: str, emb: PinEmbeddings, queries: np.ndarray, interests: np.ndarray,
                            cfg: Config, info: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Verify; while recall is short of ``index.min_recall``, double nprobe (up to nlist) or ef, 3 times at most."""
    params = dict(info["search_params"])
    knob = "nprobe" if "nprobe" in params else "ef" if "ef" in params else None
    cap = info["build_params"].get("nlist", 1 << 16)
    raises = 0
    while True:
        result = verify(client, name, emb, queries, cfg.index, params, query_interests=interests)
        log.info("verify %s with %s: recall@%d %.4f, filtered %.4f", name, params, result["k"], result["recall"],
                 result.get("filtered_recall", float("nan")))
        if _recall_ok(result, cfg.index.min_recall) or knob is None or raises == 3 or params[knob] >= cap:
            return result, params
        params[knob] = min(params[knob] * 2, cap)
        raises += 1


def publish(cfg: Config, checkpoint: Path | None = None, embeddings: PinEmbeddings | None = None,
            gate: dict[str, Any] | None = None) -> dict[str, Any]:
    """Build, verify and switch to the release of ``checkpoint`` (default: the newest one). ``embeddings``:
    pins already embedded by this checkpoint's pin tower (default: embed the live serving corpus). ``gate``: the
    retrain's validation figures, kept in the release record."""
    import torch

    reg = Registry(cfg)
    store = IndexStore(cfg)
    ic = cfg.index
    with reg.lock():
        cleaned = _recover(cfg, reg, store)
        path = checkpoint or latest_checkpoint(cfg)
        model, encoder, payload = load_checkpoint(path)
        services = payload["feature_services"]
        version = payload["model_version"]
        state = reg.state()
        if version in state["history"]:
            raise ReleaseError(f"model version {version} is already published; `retrieval release rollback` "
                               "or train a new version")
        name = store.collection_name(version)
        t0 = time.perf_counter()
        pause_point("embed")
        torch.set_num_threads(max(1, cfg.train.threads))
        tc = train_config(payload["config"])
        modes = ["single", *(["multi"] if tc.multi_embedding > 1 else []), *(["conditional"] if tc.conditional else [])]
        unit_norm = tc.normalize and not tc.pin_bias and not (tc.pretrained != "none" and tc.pretrained_blend)
        emb = (embed_corpus(cfg, model, encoder, services["pin"]) if embeddings is None
               else embeddings).validated(unit_norm)
        t_embed = time.perf_counter() - t0
        tag = tag_of(version)
        meta = {"model_version": version, "project_version": payload.get("project_version", ""),
                "user_tower": tag, "feature_services": services,
                "snapshot_id": payload["snapshot_id"], "created_at": datetime.now(UTC).isoformat(timespec="seconds")}
        try:
            with store.client(name) as client:
                pause_point("create")
                info = build_collection(client, name, emb, meta, ic, on_progress=lambda n: pause_point("insert"))
                rows = row_count(client, name)
                if rows != len(emb):
                    raise IndexBuildError(f"{name}: {rows} rows after flush, expected {len(emb)}")
                check_pair(version, name, collection_metadata(client, name))
                users = sample_users(cfg, model, encoder, services["user"], ic.verify_queries, seed=cfg.train.seed)
                queries = np.stack(users["vector"].to_numpy()) if len(users) else np.zeros((0, emb.vectors.shape[1]))
                verification, params = _verify_with_escalation(client, name, emb, queries,
                                                               users["top_interest"].to_numpy(), cfg, info)
                info["search_params"] = params
                info["verification"] = verification
                if not _recall_ok(verification, ic.min_recall):
                    raise IndexBuildError(f"{name}: ANN recall@{verification['k']} {verification['recall']:.3f} "
                                      f"(filtered {verification.get('filtered_recall', float('nan')):.3f}) is below "
                                      f"index.min_recall {ic.min_recall} even with {params}")
            pause_point("tower")
            store_user_tower(cfg, export_user_tower(payload, model, name), meta)
            example = users.sort_values(["history_length", "user_id"], ascending=[False, True]).head(1)
            release = Release(
                model_version=version, collection=name, index_uri=store.uri(name), alias=ic.alias, user_tower=tag,
                feature_services=dict(services), snapshot_id=payload["snapshot_id"],
                as_of=str(payload.get("as_of", "")), metrics=dict(payload.get("metrics", {})),
                index={**info, "embed_seconds": round(t_embed, 3),
                       "publish_seconds": round(time.perf_counter() - t0, 3)},
                created_at=meta["created_at"], interest_ids=list(payload["interest_ids"]),
                example_user_id=int(example["user_id"].iloc[0]) if len(example) else None, modes=modes,
                default_mode="multi" if "multi" in modes else "single", gate=dict(gate or {}),
                project_version=payload.get("project_version", ""))
            reg.save_record(release)
        except BaseException:
            store.drop(name)
            delete_user_tower(cfg, version)
            reg.delete_record(version)
            raise
        pause_point("switch")
        if not store.embedded:
            _point_alias(store, name)
        previous = state["live"]
        reg.write_state({"live": version, "history": [*state["history"], version],
                         "previous": [*state["previous"], previous] if previous else state["previous"]})
        log.info("release %s is live (collection %s, previous %s)", version, name, previous)
        pruned = _prune(cfg, reg, store)
    return {"live": version, "previous": previous, "collection": name, "user_tower": tag,
            "rows": info["rows"], "verification": info["verification"], "search_params": info["search_params"],
            "seconds": release.index["publish_seconds"], "cleaned": cleaned, "pruned": pruned}


def rollback(cfg: Config) -> dict[str, Any]:
    """Make the release that was live before the live one live again."""
    reg = Registry(cfg)
    store = IndexStore(cfg)
    with reg.lock():
        state = reg.state()
        live, previous = state["live"], [v for v in state["previous"] if v in state["history"]]
        if live is None:
            raise ReleaseError("nothing is live: publish a release first")
        if not previous:
            raise ReleaseError(f"no release was live before {live} (or it was pruned): nothing to roll back to")
        target = previous.pop()
        release = reg.record(target)
        if not store.embedded:   # embedded: the service may hold the database open; it checks the pair on load
            check_pair(target, release.collection, store.metadata(release.collection))
            _point_alias(store, release.collection)
        reg.write_state({"live": target, "history": state["history"], "previous": previous})
        log.info("rolled back from %s to %s", live, target)
    return {"live": target, "rolled_back": live, "collection": release.collection}


def recover(cfg: Config) -> dict[str, Any]:
    """Delete what interrupted publishes left behind and re-point the alias at the live collection."""
    reg = Registry(cfg)
    with reg.lock():
        return _recover(cfg, reg, IndexStore(cfg))


def status(cfg: Config) -> dict[str, Any]:
    reg = Registry(cfg)
    state = reg.state()
    out = []
    for v in state["history"]:
        r = reg.record(v)
        out.append({"model_version": v, "live": v == state["live"], "collection": r.collection,
                    "rows": r.index.get("rows"), "recall": r.index.get("verification", {}).get("recall"),
                    "created_at": r.created_at})
    return {"live": state["live"], "releases": out}


def _recover(cfg: Config, reg: Registry, store: IndexStore) -> dict[str, list[str]]:
    state = reg.state()
    kept = set(state["history"])
    keep_collections = {store.collection_name(v) for v in kept}
    cleaned: dict[str, list[str]] = {"collections": [], "user_towers": [], "records": []}
    for name in store.collections():
        if name not in keep_collections:
            store.drop(name)
            cleaned["collections"].append(name)
    for version in stored_user_towers(cfg):
        if version not in kept:
            delete_user_tower(cfg, version)
            cleaned["user_towers"].append(version)
    for version in reg.records():
        if version not in kept:
            reg.delete_record(version)
            cleaned["records"].append(version)
    reg.sweep()
    if state["live"] and not store.embedded:
        _point_alias(store, store.collection_name(state["live"]))
    if any(cleaned.values()):
        log.warning("recovered from an interrupted publish: %s", cleaned)
    return cleaned


def _prune(cfg: Config, reg: Registry, store: IndexStore) -> list[str]:
    state = reg.state()
    history = state["history"]
    n = cfg.index.keep_releases
    keep = set(history[-n:]) | {state["live"]} | set(state["previous"][-1:])   # newest, live, rollback target
    gone = [v for v in history if v not in keep]
    if not gone:
        return []
    reg.write_state({"live": state["live"], "history": [v for v in history if v in keep],
                     "previous": [v for v in state["previous"] if v in keep]})
    for v in gone:
        store.drop(store.collection_name(v))
        delete_user_tower(cfg, v)
        reg.delete_record(v)
    log.info("pruned releases %s", gone)
    return gone


def _point_alias(store: IndexStore, collection: str) -> None:
    """Server mode: make ``index.alias`` name ``collection``."""
    alias = store.ic.alias
    with store.client(collection) as c:
        # which collection holds the alias, asked without describe_alias (a missing alias is an RPC error that
        # pymilvus logs with a traceback)
        current = next((name for name in c.list_collections()
                        if alias in c.list_aliases(name).get("aliases", [])), None)
        if current is None:
            c.create_alias(collection, alias)
        elif current != collection:
            c.alter_alias(collection, alias)


def verify(client, name: str, emb: PinEmbeddings, queries: np.ndarray, ic: IndexConfig,
           search_params: dict[str, Any], query_interests: np.ndarray | None = None) -> dict[str, Any]:
    """ANN recall@k against exact search for ``queries``, unfiltered and (with ``query_interests``) filtered to
    each query's interest. Recall = |ANN ∩ exact| / |exact| averaged over queries."""
    k = min(ic.verify_k, len(emb))
    ids = emb.frame["pin_id"].to_numpy()
    vectors = emb.vectors
    out: dict[str, Any] = {"k": k, "queries": len(queries)}
    exact = ids[top_k(queries @ vectors.T, k)]
    hits = search(client, name, queries, k, search_params)
    out["recall"] = float(np.mean([len({h["pin_id"] for h in got} & set(want)) / len(want)
                                   for got, want in zip(hits, exact, strict=True)])) if len(queries) else 1.0
    if query_interests is not None and len(queries):
        interest = emb.frame["interest_id"].to_numpy()
        recalls = []
        for q, i in zip(queries, query_interests, strict=True):
            sub = np.flatnonzero(interest == i)
            if not len(sub):
                continue
            want = ids[sub][top_k(q[None, :] @ vectors[sub].T, min(k, len(sub)))[0]]
            got = search(client, name, q[None, :], k, search_params, interests=[int(i)])[0]
            recalls.append(len({h["pin_id"] for h in got} & set(want)) / len(want))
        out["filtered_recall"] = float(np.mean(recalls)) if recalls else 1.0
    return out
