"""Stage: the versioned pin index in Milvus.

``embed_corpus`` runs the pin tower over the live serving corpus (canonical pins, as dbt remapped them)
with the pin features the online store serves through ``pin_tower_v1``; ``publish`` checks whatever it indexes
against ``pin_embedding_schema`` (dimension, finite, unit norm, unique ids). ``build_collection`` writes one
collection per model version: pin id primary key, interest id scalar (filterable), canonical image
signature, decayed engagement and the embedding, with the model version and feature services in the
collection's description, in batched columnar inserts, flushed, indexed and loaded before use.
``verify`` compares the ANN top-k with exact (numpy) search on sampled user embeddings.

Where collections live (``IndexStore``): with ``index.uri`` set, every collection is on that Milvus
server. Empty (the default), each collection is its own embedded milvus-lite database under
``<data_dir>/milvus/<collection>/``: milvus-lite locks a database to one process, and one database per
version means the publisher builds the next version while the service keeps the live one open.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pandera.pandas as pa

from training.config import Config, IndexConfig

log = logging.getLogger(__name__)

EMBEDDING = "embedding"
SCALARS = ("pin_id", "interest_id", "image_signature", "decayed_engagement")
SIGNATURE_MAX = 256
METADATA_PROPERTY = "release_metadata"
"""Collection property holding the release's version metadata as JSON."""


class IndexBuildError(RuntimeError):
    """The index cannot be built or does not pass verification."""


def pin_embedding_schema(dim: int) -> pa.DataFrameSchema:
    """Contract of the pin embeddings before they reach the index."""

    def vectors_ok(col: pd.Series) -> pd.Series:
        shaped = col.map(lambda v: np.shape(v) == (dim,)).astype(bool)
        out = pd.Series(False, index=col.index)
        if shaped.any():
            a = np.stack(col[shaped].to_numpy()).astype(np.float64)
            out[shaped] = np.isfinite(a).all(axis=1) & (np.abs((a * a).sum(axis=1) - 1.0) < 1e-3)
        return out

    return pa.DataFrameSchema(
        {
            "pin_id": pa.Column("int64", unique=True, nullable=False),
            "interest_id": pa.Column("int64", pa.Check.ge(-1), nullable=False),
            "image_signature": pa.Column(str, pa.Check.str_length(0, SIGNATURE_MAX), nullable=False),
            "decayed_engagement": pa.Column("float32", pa.Check.ge(0), nullable=False),
            EMBEDDING: pa.Column(object, pa.Check(vectors_ok, element_wise=False,
                                                  error=f"{dim}-d, finite, unit norm"), nullable=False),
        },
        name="pin_embeddings", strict=True, coerce=True,
    )


@dataclass
class PinEmbeddings:
    """The serving corpus embedded by one model version (validated)."""

    frame: pd.DataFrame
    """pin_id, interest_id, image_signature, decayed_engagement, embedding (object column of float32 rows)."""

    @property
    def vectors(self) -> np.ndarray:
        return np.stack(self.frame[EMBEDDING].to_numpy()).astype(np.float32)

    def __len__(self) -> int:
        return len(self.frame)

    def validated(self) -> PinEmbeddings:
        """These embeddings if they pass ``pin_embedding_schema`` (else pandera's error names the failures)."""
        dim = len(self.frame[EMBEDDING].iloc[0]) if len(self.frame) else 0
        return PinEmbeddings(pin_embedding_schema(dim).validate(self.frame, lazy=True))


def corpus(cfg: Config) -> pd.DataFrame:
    """The live serving corpus (canonical pins only; dbt applied the pin -> canonical remapping)."""
    from training.data.snapshot import load_live

    return pd.read_parquet(load_live(cfg).table("serving_corpus"))


def embed_corpus(cfg: Config, model, encoder, batch: int = 8192) -> PinEmbeddings:
    """Pin tower over the serving corpus, with the online store's ``pin_tower_v1`` features (not yet checked:
    ``publish`` validates whatever it indexes)."""
    import torch

    from feature_repo.feature_services import PIN_TOWER_SERVICE
    from training.features import online_features

    pins = corpus(cfg)
    t0 = time.perf_counter()
    feats = online_features(cfg, PIN_TOWER_SERVICE, "pin_id", pins["pin_id"].to_numpy())
    t1 = time.perf_counter()
    x = encoder.pins(feats)
    with torch.no_grad():
        out = [model.pin_tower({k: v[i:i + batch] for k, v in x.items()}) for i in range(0, len(feats), batch)]
    if not out:
        raise IndexBuildError("the serving corpus is empty: nothing to index")
    vectors = torch.cat(out).numpy().astype(np.float32)
    frame = pd.DataFrame({
        "pin_id": pins["pin_id"].astype("int64"),
        "interest_id": pins["interest_id"].fillna(-1).astype("int64"),
        "image_signature": pins["image_signature"].fillna("").astype(str),
        "decayed_engagement": pins["decayed_engagement"].astype("float32"),
        EMBEDDING: list(vectors),
    })
    log.info("embedded %d corpus pins (online features %.1fs, tower %.1fs)", len(frame), t1 - t0,
             time.perf_counter() - t1)
    return PinEmbeddings(frame)


# --- where collections live ---------------------------------------------------------------------------------------


class IndexStore:
    """Milvus collections of this deployment: one server (``index.uri``) or one milvus-lite file each."""

    def __init__(self, cfg: Config):
        self.ic: IndexConfig = cfg.index
        self.root = cfg.data_path / "milvus"

    @property
    def embedded(self) -> bool:
        return not self.ic.uri

    def collection_name(self, model_version: str) -> str:
        return self.collection_of(model_version, self.ic.collection_prefix)

    @staticmethod
    def collection_of(model_version: str, prefix: str = "pins") -> str:
        """The collection of a model version: ``<prefix>_<version>`` with '-' and '.' as '_'."""
        return f"{prefix}_{model_version}".replace("-", "_").replace(".", "_")

    def uri(self, collection: str) -> str:
        """The URI a client opens to reach ``collection``."""
        if not self.embedded:
            return self.ic.uri
        return str(self.root / collection / "milvus.db")

    @contextmanager
    def client(self, collection: str, load: bool = False) -> Iterator[Any]:
        """A client that reaches ``collection``; ``load`` = load it for search first (a database reopened
        from disk holds its collections released)."""
        from pymilvus import MilvusClient

        uri = self.uri(collection)
        if self.embedded:
            Path(uri).parent.mkdir(parents=True, exist_ok=True)
        c = MilvusClient(uri=uri, token=self.ic.token)
        try:
            if load:
                c.load_collection(collection)
            yield c
        finally:
            c.close()
            if self.embedded:
                _release_embedded(uri)

    def collections(self) -> list[str]:
        """Every collection of this deployment (by prefix)."""
        prefix = f"{self.ic.collection_prefix}_"
        if self.embedded:
            return sorted(p.name for p in self.root.glob(f"{prefix}*") if p.is_dir())
        from pymilvus import MilvusClient

        c = MilvusClient(uri=self.ic.uri, token=self.ic.token)
        try:
            return sorted(n for n in c.list_collections() if n.startswith(prefix))
        finally:
            c.close()

    def drop(self, collection: str) -> None:
        """Drop the collection and its aliases (embedded: then delete its database)."""
        path = self.root / collection
        if not self.embedded or (path / "milvus.db").exists():
            try:
                with self.client(collection) as c:
                    if c.has_collection(collection):
                        if not self.embedded:   # milvus-lite 2.5 has no aliases; the live alias is re-pointed
                            for alias in c.list_aliases(collection).get("aliases", []):
                                if alias != self.ic.alias:
                                    c.drop_alias(alias)
                        c.drop_collection(collection)
            except Exception as e:  # noqa: BLE001 - embedded: a half-written database is deleted below anyway
                if not self.embedded:
                    raise
                log.warning("dropping %s through milvus failed (%s); deleting its files", collection, e)
        if self.embedded:
            shutil.rmtree(path, ignore_errors=True)

    def metadata(self, collection: str) -> dict[str, Any]:
        """The version metadata stored on the collection (its description)."""
        with self.client(collection) as c:
            return collection_metadata(c, collection)


def _release_embedded(uri: str) -> None:
    """Stop this process's milvus-lite server for ``uri`` and free its file lock: closing the client alone
    keeps the server (and the lock) until the process exits, so another process could not open it."""
    try:
        from milvus_lite.server_manager import server_manager_instance
    except ImportError:
        return
    server_manager_instance.release_server(uri)


def collection_metadata(client, collection: str) -> dict[str, Any]:
    """The version metadata of a collection: its ``METADATA_PROPERTY`` property (or, failing that, its
    description, where ``build_collection`` writes it too)."""
    info = client.describe_collection(collection)
    for text in ((info.get("properties") or {}).get(METADATA_PROPERTY, ""), info.get("description", "")):
        try:
            meta = json.loads(text)
        except (json.JSONDecodeError, TypeError):
            continue
        if isinstance(meta, dict) and "model_version" in meta:
            return meta
    raise IndexBuildError(f"collection {collection} has no version metadata")


# --- build -------------------------------------------------------------------------------------------------------


def index_params(ic: IndexConfig, rows: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """(build params, search params) of the configured index for ``rows`` vectors."""
    if ic.index_type == "IVF_FLAT":
        nlist = ic.nlist or int(np.clip(4 * math.sqrt(max(rows, 1)), 1, 4096))
        nlist = max(1, min(nlist, rows))
        return {"nlist": nlist}, {"nprobe": min(ic.nprobe, nlist)}
    if ic.index_type == "HNSW":
        return {"M": ic.hnsw_m, "efConstruction": 200}, {"ef": ic.hnsw_ef}
    return {}, {}


def build_collection(client, name: str, emb: PinEmbeddings, metadata: dict[str, Any], ic: IndexConfig,
                     on_progress=None) -> dict[str, Any]:
    """Create ``name`` with the version metadata, insert in batches, flush, index, load."""
    from pymilvus import DataType

    dim = emb.vectors.shape[1]
    description = json.dumps(metadata, sort_keys=True)
    schema = client.create_schema(auto_id=False, enable_dynamic_field=False, description=description)
    schema.add_field("pin_id", DataType.INT64, is_primary=True)
    schema.add_field("interest_id", DataType.INT64)
    schema.add_field("image_signature", DataType.VARCHAR, max_length=SIGNATURE_MAX)
    schema.add_field("decayed_engagement", DataType.FLOAT)
    schema.add_field(EMBEDDING, DataType.FLOAT_VECTOR, dim=dim)
    t0 = time.perf_counter()
    client.create_collection(name, schema=schema, properties={METADATA_PROPERTY: description})
    f = emb.frame
    vectors = emb.vectors
    cols = {c: f[c].to_numpy() for c in SCALARS}
    for start in range(0, len(f), ic.insert_batch):
        stop = min(start + ic.insert_batch, len(f))
        batch = {c: v[start:stop].tolist() for c, v in cols.items()}
        batch[EMBEDDING] = vectors[start:stop].tolist()
        client.insert(name, _rows(batch))
        if on_progress:
            on_progress(stop)
    client.flush(name)
    t1 = time.perf_counter()
    build, search = index_params(ic, len(f))
    params = client.prepare_index_params()
    params.add_index(field_name=EMBEDDING, index_type=ic.index_type, metric_type="IP", params=build)
    client.create_index(name, params)
    client.load_collection(name)
    t2 = time.perf_counter()
    log.info("collection %s: %d rows inserted in %.1fs, %s index + load in %.1fs", name, len(f), t1 - t0,
             ic.index_type, t2 - t1)
    return {"rows": len(f), "index_type": ic.index_type, "build_params": build, "search_params": search,
            "insert_seconds": round(t1 - t0, 3), "index_seconds": round(t2 - t1, 3)}


def _rows(columns: dict[str, list]) -> list[dict[str, Any]]:
    """Column batch -> the row dicts MilvusClient.insert takes."""
    names = list(columns)
    return [dict(zip(names, values, strict=True)) for values in zip(*columns.values(), strict=True)]


def row_count(client, name: str) -> int:
    res = client.query(name, filter="", output_fields=["count(*)"])
    return int(res[0]["count(*)"])


def search(client, name: str, vectors: np.ndarray, k: int, search_params: dict[str, Any],
           interests: list[int] | None = None, exclude: list[int] | None = None,
           output_fields: tuple[str, ...] = ()) -> list[list[dict[str, Any]]]:
    """ANN top-``k`` by inner product, optionally within ``interests`` and without ``exclude`` pins.
    One list per query of {"pin_id", "score", *output_fields}, best first. Ask for no output fields on the
    hot path: decoding them costs more than the search (1.5 ms for ids only vs 3.6 ms with two fields)."""
    filters = []
    if interests:
        filters.append(f"interest_id in {sorted(int(i) for i in interests)}")
    if exclude:
        filters.append(f"pin_id not in {sorted(int(i) for i in exclude)}")
    raw = client.search(name, data=np.asarray(vectors, np.float32).tolist(), limit=k, anns_field=EMBEDDING,
                        filter=" and ".join(filters), output_fields=list(output_fields),
                        search_params={"metric_type": "IP", "params": search_params})
    return [[{"pin_id": int(h["id"]), "score": float(h["distance"]),
              **{f: h["entity"].get(f) for f in output_fields}} for h in hits] for hits in raw]


def scalar_table(client, name: str, batch: int = 16_384) -> pd.DataFrame:
    """Every row's scalar fields (pin_id, interest_id, decayed_engagement) of a collection."""
    it = client.query_iterator(name, batch_size=batch, filter="",
                               output_fields=["pin_id", "interest_id", "decayed_engagement"])
    parts = []
    try:
        while rows := it.next():
            parts.append(pd.DataFrame(rows))
    finally:
        it.close()
    cols = ["pin_id", "interest_id", "decayed_engagement"]
    return pd.concat(parts, ignore_index=True)[cols] if parts else pd.DataFrame(columns=cols)


def exact_top_k(pin_vectors: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """Brute-force top-k row indices (by inner product) per query, best first."""
    scores = queries @ pin_vectors.T
    k = min(k, pin_vectors.shape[0])
    part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    order = np.argsort(-np.take_along_axis(scores, part, 1), axis=1)
    return np.take_along_axis(part, order, 1)


def verify(client, name: str, emb: PinEmbeddings, queries: np.ndarray, ic: IndexConfig,
           search_params: dict[str, Any], query_interests: np.ndarray | None = None) -> dict[str, Any]:
    """ANN recall@k against exact search for ``queries``, unfiltered and (with ``query_interests``) filtered to
    each query's interest. Recall = |ANN ∩ exact| / |exact| averaged over queries."""
    k = min(ic.verify_k, len(emb))
    ids = emb.frame["pin_id"].to_numpy()
    vectors = emb.vectors
    out: dict[str, Any] = {"k": k, "queries": len(queries)}
    exact = ids[exact_top_k(vectors, queries, k)]
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
            want = ids[sub][exact_top_k(vectors[sub], q[None, :], k)[0]]
            got = search(client, name, q[None, :], k, search_params, interests=[int(i)])[0]
            recalls.append(len({h["pin_id"] for h in got} & set(want)) / len(want))
        out["filtered_recall"] = float(np.mean(recalls)) if recalls else 1.0
    return out
