"""Online retrieval: user id -> candidate pins, with the live release. ``bentos/service.py`` wraps this in HTTP.

Per request: the user's features from the Feast online store through the release's user feature service
(the one the model was trained with) -> the release's user tower -> ANN search in the release's
collection (filtered to the requested interests, without the user's recent pins when asked). A user
with no features or no history gets the cold-start answer: the release's collection ranked by decayed
engagement (within the requested interests), flagged as such. Request bounds (k, number of interests,
types) are the request model's job (``bentos/service.py``); what depends on the release (which interest
ids exist) is checked here.

Versions never mix: a ``LoadedRelease`` holds one user tower, one collection client and one corpus,
checked against each other at load (``check_pair``), and a request uses the one object it read at its
start. ``Retriever.refresh`` loads a newly published (or rolled back) release next to the current one
and swaps the reference; the old one is closed only after the requests that hold it have finished.
"""

from __future__ import annotations

import logging
import threading
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch

from bentos.batching import MicroBatcher
from training.config import Config
from training.features.store import feature_store
from training.model.clustering import round_robin
from training.release.index import IndexStore, collection_metadata, scalar_table, search
from training.release.model_store import open_user_tower
from training.release.registry import Registry, Release, ReleaseError, check_pair

log = logging.getLogger(__name__)


class RetrievalError(ValueError):
    """A request that cannot be answered as asked; ``field`` names the request field at fault. ``status`` 400: the
    request itself is wrong; 409: it is valid but the live release cannot answer it (a mode it was not trained for,
    an interest id not in its data), so another release may."""

    def __init__(self, field: str, message: str, status: int = 400):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.status = status


SEARCH_LIMIT = 16_384
"""Milvus' largest top-k."""
MAX_CONDITIONS = 16
"""Most interests a conditional request may name (one conditioned vector each)."""


def _first(vectors: torch.Tensor) -> torch.Tensor:
    """(n, D): the first (most representative) embedding of each user of a multi-embedding tower."""
    return vectors[:, 0] if vectors.dim() == 3 else vectors


@dataclass(frozen=True)
class _Query:
    """One single- or multi-mode request waiting for the batched user tower + search."""

    rel: LoadedRelease
    feats: dict[str, list]
    k: int
    interests: tuple[int, ...]
    seen: set[int]
    mode: str


def _unseen(hits: list[dict[str, Any]], seen: set[int]) -> list[dict[str, Any]]:
    return [h for h in hits if h["pin_id"] not in seen] if seen else hits


def _merge(lists: list[list[dict[str, Any]]], k: int) -> list[dict[str, Any]]:
    """The top ``k`` of one list, or several merged round-robin (each hit's ``source`` = its list; default 0)."""
    return lists[0][:k] if len(lists) == 1 else round_robin(lists, k)


def _pin(hit: dict[str, Any], source: str) -> dict[str, Any]:
    return {"pin_id": hit["pin_id"], "score": hit["score"], "interest_id": hit["interest_id"], "source": source}


class StoreUnavailable(RuntimeError):
    """The online store or the index failed or timed out; ``store`` names which (the request may be retried)."""

    def __init__(self, store: str, error: BaseException):
        super().__init__(f"{store} unavailable: {type(error).__name__}: {str(error).splitlines()[0][:200]}")
        self.store = store


class NotReady(RuntimeError):
    """No release is live yet."""


@dataclass
class LoadedRelease:
    """Everything one release needs to answer, loaded and cross-checked."""

    release: Release
    tower: Any
    """The release's user tower (eval mode)."""
    encoder: Any
    client: Any
    corpus: pd.DataFrame
    """The collection's pins: pin_id, interest_id, decayed_engagement, best decayed engagement first (cold start)."""
    pin_ids: np.ndarray
    """Sorted pin ids of the collection and their interests (``pin_interests``): interest of a hit without
    asking Milvus to decode fields."""
    pin_interests: np.ndarray
    interests: frozenset[int]
    user_service: str
    loaded_at: float = field(default_factory=time.time)
    _stack: ExitStack = field(default_factory=ExitStack, repr=False)
    _users: int = 0
    _closed: bool = False
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def version(self) -> str:
        return self.release.model_version

    def enter(self) -> bool:
        """Count a request in; False if this release was closed meanwhile (the caller reads the new one)."""
        with self._lock:
            if self._closed:
                return False
            self._users += 1
            return True

    def leave(self) -> None:
        """Count a request out."""
        with self._lock:
            self._users -= 1

    def close_if_idle(self) -> bool:
        with self._lock:
            if self._users or self._closed:
                return self._closed
            self._closed = True
        self._stack.close()
        return True


def load_release(cfg: Config, release: Release) -> LoadedRelease:
    """Load the user tower, open the collection and check that both are of ``release``'s version."""
    tower, encoder, meta = open_user_tower(cfg, release.user_tower)
    store = IndexStore(cfg)
    stack = ExitStack()
    try:
        client = stack.enter_context(store.client(release.collection, load=True))
        check_pair(meta["model_version"], release.collection, collection_metadata(client, release.collection))
        if meta["model_version"] != release.model_version:
            raise RuntimeError(f"release {release.model_version} points at user tower {meta['model_version']}")
        table = scalar_table(client, release.collection)
        corpus = table.sort_values(["decayed_engagement", "pin_id"], ascending=[False, True]).reset_index(drop=True)
        by_id = table.sort_values("pin_id")
        _warm_up(tower, encoder, client, release)
    except BaseException:
        stack.close()
        raise
    return LoadedRelease(release=release, tower=tower, encoder=encoder, client=client, corpus=corpus,
                         pin_ids=by_id["pin_id"].to_numpy(np.int64),
                         pin_interests=by_id["interest_id"].to_numpy(np.int64),
                         interests=frozenset(int(i) for i in release.interest_ids),
                         user_service=release.feature_services["user"], _stack=stack)


def _warm_up(tower, encoder, client, release: Release) -> None:
    """One user-tower pass and one search before the release serves: the first torch call and the first search
    of a fresh client are several times slower than the next ones."""
    empty = {"user_id": [0], "recent_pin_ids": [None], "recent_pin_ages_days": [None], "top_interest_ids": [None]}
    with torch.no_grad():
        vector = _first(tower(encoder.users(empty))).numpy()
    search(client, release.collection, vector, 10, release.index["search_params"])


class Retriever:
    """Answers retrieval requests with whatever release is live; ``refresh`` follows the registry."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.registry = Registry(cfg)
        self._current: LoadedRelease | None = None
        self._loaded: dict[str, LoadedRelease] = {}
        """Open releases by version: the current one and retired ones still finishing requests. A rollback
        to a retired release reuses it (one client per database file and process)."""
        self._switch = threading.Lock()
        self.features = feature_store(cfg, busy_timeout=cfg.serve.store_timeout_seconds)
        self._health: tuple[float, dict[str, Any]] = (0.0, {"ok": True})
        self._batched_features = MicroBatcher(self._read_features, cfg.serve.max_batch, "features")
        self._batched = MicroBatcher(self._embed_and_search, cfg.serve.max_batch, "user-tower+search")
        torch.set_num_threads(1)

    # --- release management --------------------------------------------------------------------------------
    @property
    def current(self) -> LoadedRelease | None:
        return self._current

    def refresh(self) -> bool:
        """Serve the registry's live release if it is not the one being served; True if it switched."""
        with self._switch:
            self._close_retired()
            live = self.registry.live()
            if live is None and self._current is not None:
                raise ReleaseError(f"the registry names no live release; still serving {self._current.version}")
            if live is None or (self._current and self._current.version == live.model_version):
                return False
            loaded = self._loaded.get(live.model_version)
            if loaded is None:
                loaded = self._loaded[live.model_version] = load_release(self.cfg, live)
                self._features(loaded, 0)   # warm the online store connection too
            old, self._current = self._current, loaded    # the switch: one reference assignment
            log.info("serving release %s (collection %s)%s", loaded.version, live.collection,
                     f", was {old.version}" if old else "")
            return True

    def _close_retired(self) -> None:
        for version, rel in list(self._loaded.items()):
            if rel is not self._current and rel.close_if_idle():
                del self._loaded[version]

    def close(self) -> None:
        with self._switch:
            self._current = None
            self._close_retired()
        self._batched_features.close()
        self._batched.close()

    # --- requests -------------------------------------------------------------------------------------------
    def retrieve(self, user_id: int, k: int = 100, interests: list[int] | None = None,
                 exclude_seen: bool = True, mode: str | None = None) -> dict[str, Any]:
        """The answer for one (already validated) request, from the release live when it started.

        ``mode`` (default: the release's best measured one): 'single' (one user vector), 'multi' (one vector
        per history cluster, their searches merged round-robin) or 'conditional' (one vector per interest,
        conditioned on it and searched within it: the requested ``interests``, else the user's inferred top
        interests; merged round-robin). Every pin says which embedding / interest found it (``source``).
        Concurrent requests share feature reads, and in single and multi mode user-tower passes and searches
        (``bentos.batching``)."""
        while True:
            rel = self._current
            if rel is None:
                raise NotReady("no release is live yet: run `retrieval release publish`")
            if rel.enter():
                break
        try:
            mode = mode or rel.release.default_mode
            if mode not in rel.release.modes:
                raise RetrievalError("mode", f"the live release {rel.version} does not support mode {mode!r} "
                                             f"(it supports {', '.join(rel.release.modes)})", status=409)
            if mode == "conditional" and interests and len(interests) > MAX_CONDITIONS:
                raise RetrievalError("interests", f"mode 'conditional' searches once per interest: at most "
                                                  f"{MAX_CONDITIONS}, got {len(interests)}")
            if interests:
                unknown = sorted(set(int(i) for i in interests) - rel.interests)
                if unknown:
                    raise RetrievalError("interests", f"unknown interest id(s) {unknown}: the live release "
                                                      f"{rel.version} knows the ids GET /metadata lists", status=409)
            t0 = time.perf_counter()
            feats = self._batched_features.submit((rel, user_id))
            t1 = time.perf_counter()
            history = feats["recent_pin_ids"][0] if "recent_pin_ids" in feats else None
            has_profile = any(feats[c][0] is not None for c in feats if c != "user_id")
            seen = set(history or []) if exclude_seen else set()
            timings = {"features": t1 - t0, "user_tower": 0.0, "search": 0.0}
            if not has_profile or not history:
                pins, how = self._cold_start(rel, k, interests, seen), "cold_start"
            else:
                how = "learned"
                conditions = (list(interests or []) or [int(i) for i in (feats.get("top_interest_ids") or [[]])[0]
                                                        or []]) if mode == "conditional" else []
                if conditions:
                    pins = self._conditional(rel, feats, k, conditions, seen, timings)
                else:   # single, multi, or conditional with nothing to condition on (the unconditioned vector)
                    pins, stage = self._batched.submit(_Query(rel, feats, k, tuple(sorted(interests or ())), seen,
                                                              "multi" if mode == "multi" else "single"))
                    timings.update(stage)
            return {
                "user_id": user_id,
                "pins": pins,
                "model_version": rel.version,
                "collection": rel.release.collection,
                "retrieval": how,
                "mode": mode if how == "learned" else None,
                "timings_ms": {name: round(seconds * 1e3, 3) for name, seconds in timings.items()},
            }
        finally:
            rel.leave()

    def _read_features(self, items: list[tuple[LoadedRelease, int]]) -> list[dict[str, list] | BaseException]:
        """Batch function: one online read per user feature service for the queued requests' users."""
        out: list[dict[str, list] | BaseException] = [None] * len(items)   # type: ignore[list-item]
        by_service: dict[str, list[int]] = {}
        for i, (rel, _) in enumerate(items):
            by_service.setdefault(rel.user_service, []).append(i)
        for service, idx in by_service.items():
            try:
                cols = self._online(service, [items[i][1] for i in idx])
            except StoreUnavailable as e:
                for i in idx:
                    out[i] = e
                continue
            for j, i in enumerate(idx):
                out[i] = {c: [v[j]] for c, v in cols.items()}
        return out

    def _embed_and_search(self, queries: list[_Query]) -> list[tuple[list[dict[str, Any]], dict[str, float]]
                                                                | BaseException]:
        """Batch function of the single and multi modes: one user-tower pass per release and one search per
        (release, interest filter) over every queued request's vectors (multi: its first K); each request keeps
        its top ``k`` without its seen pins (multi: its vectors' lists merged round-robin)."""
        out: list[Any] = [None] * len(queries)
        by_release: dict[int, list[int]] = {}
        for i, q in enumerate(queries):
            by_release.setdefault(id(q.rel), []).append(i)
        for idx in by_release.values():
            rel = queries[idx[0]].rel
            t0 = time.perf_counter()
            rows = {c: [queries[i].feats[c][0] for i in idx] for c in queries[idx[0]].feats}
            with torch.no_grad():
                vectors, keep = rel.tower(rel.encoder.users(rows), with_mask=True)
            if vectors.dim() == 2:
                vectors, keep = vectors[:, None], torch.ones(len(idx), 1, dtype=torch.bool)
            own = [vectors[j][keep[j]] if queries[i].mode == "multi" else vectors[j, :1] for j, i in enumerate(idx)]
            tower = time.perf_counter() - t0
            groups: dict[tuple[int, ...], list[int]] = {}
            for j, i in enumerate(idx):
                groups.setdefault(queries[i].interests, []).append(j)
            for interests, members in groups.items():
                t1 = time.perf_counter()
                limit = max(queries[idx[j]].k + len(queries[idx[j]].seen) for j in members)
                try:
                    lists = self._search(rel, torch.cat([own[j] for j in members]).numpy(), limit, list(interests))
                except StoreUnavailable as e:
                    for j in members:
                        out[idx[j]] = e
                    continue
                spent = {"user_tower": tower, "search": time.perf_counter() - t1}
                for j in members:
                    q = queries[idx[j]]
                    mine, lists = [_unseen(hits, q.seen) for hits in lists[:len(own[j])]], lists[len(own[j]):]
                    merged = _merge(mine, q.k)
                    out[idx[j]] = ([_pin(h, f"embedding:{h.get('source', 0)}") for h in merged], spent)
        return out

    def _conditional(self, rel: LoadedRelease, feats: dict[str, list], k: int, conditions: list[int],
                     seen: set[int], timings: dict[str, float]) -> list[dict]:
        """One vector per interest condition, conditioned on it (early fusion), searched within the conditions in
        one call; each keeps the hits of its own interest; merged round-robin."""
        t0 = time.perf_counter()
        x = rel.encoder.users(feats)
        with torch.no_grad():
            batch = {name: t.expand(len(conditions), *t.shape[1:]) for name, t in x.items()}
            batch["condition"] = torch.tensor([c + 1 for c in conditions])
            vectors = _first(rel.tower(batch)).numpy()
        t1 = time.perf_counter()
        lists = self._search(rel, vectors, k * len(conditions) + len(seen), sorted(set(conditions)))
        lists = [[h for h in _unseen(hits, seen) if h["interest_id"] == c][:k]
                 for hits, c in zip(lists, conditions, strict=True)]
        merged = _merge(lists, k)
        timings.update(user_tower=t1 - t0, search=time.perf_counter() - t1)
        return [_pin(h, f"interest:{conditions[h.get('source', 0)]}") for h in merged]

    @staticmethod
    def _search(rel: LoadedRelease, vectors: np.ndarray, limit: int, interests) -> list[list[dict[str, Any]]]:
        """ANN search in the release's collection, each hit given its interest from the release's pin table."""
        try:
            lists = search(rel.client, rel.release.collection, vectors, min(limit, SEARCH_LIMIT),
                           rel.release.index["search_params"], interests=interests)
        except Exception as e:  # noqa: BLE001 - an index fault is a 503, not a 500
            raise StoreUnavailable("index", e) from e
        last = max(len(rel.pin_ids) - 1, 0)
        for hits in lists:
            ids = np.fromiter((h["pin_id"] for h in hits), np.int64, len(hits))
            found = rel.pin_interests[np.searchsorted(rel.pin_ids, ids).clip(0, last)]
            for h, i in zip(hits, found, strict=True):
                h["interest_id"] = int(i)
        return lists

    def _features(self, rel: LoadedRelease, user_id: int) -> dict[str, list]:
        return self._online(rel.user_service, [user_id])

    def _online(self, service: str, user_ids: list[int]) -> dict[str, list]:
        try:
            return self.features.online(service, "user_id", user_ids)
        except Exception as e:  # noqa: BLE001 - any store fault (locked, corrupt, down) is a 503, not a 500
            raise StoreUnavailable("online store", e) from e

    def store_health(self, max_age: float = 1.0) -> dict[str, Any]:
        """Whether the online store answers (a fetch of an unknown user), checked at most every ``max_age`` s."""
        checked, health = self._health
        rel = self._current
        if rel is None or time.monotonic() - checked < max_age:
            return health
        try:
            self._features(rel, 0)
            health = {"ok": True}
        except StoreUnavailable as e:
            health = {"ok": False, "reason": str(e)}
        self._health = (time.monotonic(), health)
        return health

    @staticmethod
    def _cold_start(rel: LoadedRelease, k: int, interests: list[int] | None, seen: set[int]) -> list[dict[str, Any]]:
        c = rel.corpus
        if interests:
            c = c[c["interest_id"].isin(interests)]
        if seen:
            c = c[~c["pin_id"].isin(list(seen))]
        top = c.head(k)
        return [{"pin_id": int(p), "score": float(s), "interest_id": int(i), "source": "popular"}
                for p, s, i in zip(top["pin_id"], top["decayed_engagement"], top["interest_id"], strict=True)]

    def status(self) -> dict[str, Any]:
        rel = self._current
        if rel is None:
            return {"ready": False, "release": None}
        r = rel.release
        return {"ready": True, "release": {"model_version": r.model_version, "collection": r.collection,
                                           "user_tower": r.user_tower, "feature_services": r.feature_services,
                                           "snapshot_id": r.snapshot_id, "created_at": r.created_at,
                                           "example_user_id": r.example_user_id, "modes": r.modes,
                                           "default_mode": r.default_mode, "project_version": r.project_version,
                                           "loaded_at": rel.loaded_at, "corpus_pins": len(rel.corpus),
                                           "search_params": r.index.get("search_params")}}
