"""The versioned pin index in Milvus: where collections live, building one, searching one.

``build_collection`` writes one collection per model version: pin id primary key, interest id scalar
(filterable), canonical image signature, decayed engagement and the embedding, with the model version and
feature services in the collection's properties (and description), in batched inserts, flushed, indexed
and loaded before use. ``search`` is the one ANN query of the project (publish's verification and the
service both use it); ``scalar_table`` reads a collection's scalar fields (the service's cold start).

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
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from training.config import Config, IndexConfig

if TYPE_CHECKING:
    from training.release.embeddings import PinEmbeddings

log = logging.getLogger(__name__)

EMBEDDING = "embedding"
SCALARS = ("pin_id", "interest_id", "image_signature", "decayed_engagement")
SIGNATURE_MAX = 256
METADATA_PROPERTY = "release_metadata"
"""Collection property holding the release's version metadata as JSON."""
MIPS_NORM = "mips_max_norm"
"""Search-params key (stripped before Milvus sees them) of a collection stored with the inner-product-to-cosine
reduction: see ``mips_transform``."""


class IndexBuildError(RuntimeError):
    """The index cannot be built or does not pass verification."""


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
        return {"M": ic.hnsw_m, "efConstruction": ic.hnsw_ef_construction}, {"ef": ic.hnsw_ef}
    return {}, {}


def mips_transform(vectors: np.ndarray) -> tuple[np.ndarray, float]:
    """Pins of unequal norms made unit vectors with one more coordinate, ranking preserved exactly: with
    M = the largest norm, x -> [x, sqrt(M² - |x|²)] / M and a query q -> [q, 0], so q'·x' = q·x / M (Bachrach et
    al. 2014). HNSW over inner product needs it: on 300k of the default model's pins (the pin bias and the blended
    pre-trained score make their norms unequal) Milvus 2.3's HNSW recall@100 stayed at 0.43-0.45 from ef 128 to ef
    1024, and reached 0.98 at ef 128 through this reduction (bench/bench_mips.py)."""
    norms = np.linalg.norm(vectors, axis=1)
    top = float(norms.max()) if len(norms) else 1.0
    extra = np.sqrt(np.maximum(top * top - norms * norms, 0.0))[:, None]
    return (np.hstack([vectors, extra]) / top).astype(np.float32), top


def needs_mips_transform(ic: IndexConfig, vectors: np.ndarray) -> bool:
    """Approximate indexes over pins whose norms differ (exact FLAT search ranks inner products as they are)."""
    if ic.index_type == "FLAT" or not len(vectors):
        return False
    norms = np.linalg.norm(vectors, axis=1)
    return bool(norms.max() - norms.min() > 1e-3)


def build_collection(client, name: str, emb: PinEmbeddings, metadata: dict[str, Any], ic: IndexConfig,
                     on_progress=None, mips: bool | None = None) -> dict[str, Any]:
    """Create ``name`` with the version metadata, insert in batches, flush, index, load. An approximate index
    over pins of unequal norms stores them through ``mips_transform`` (``mips``: force it on or off; None =
    ``needs_mips_transform``, what publish uses); the returned search params then carry ``MIPS_NORM``, which
    ``search`` uses to pad queries and restore the inner products."""
    from pymilvus import DataType

    vectors = emb.vectors
    max_norm = None
    if needs_mips_transform(ic, vectors) if mips is None else mips:
        vectors, max_norm = mips_transform(vectors)
    dim = vectors.shape[1]
    description = json.dumps(metadata, sort_keys=True)
    schema = client.create_schema(auto_id=False, enable_dynamic_field=False, description=description)
    schema.add_field("pin_id", DataType.INT64, is_primary=True)
    # on a Milvus server the interest is the partition key (index.partition_key); milvus-lite 2.5 has no partitions
    schema.add_field("interest_id", DataType.INT64, is_partition_key=bool(ic.uri) and ic.partition_key)
    schema.add_field("image_signature", DataType.VARCHAR, max_length=SIGNATURE_MAX)
    schema.add_field("decayed_engagement", DataType.FLOAT)
    schema.add_field(EMBEDDING, DataType.FLOAT_VECTOR, dim=dim)
    t0 = time.perf_counter()
    partitioned = bool(ic.uri) and ic.partition_key
    client.create_collection(name, schema=schema, properties={METADATA_PROPERTY: description},
                             **({"num_partitions": ic.partitions} if partitioned and ic.partitions else {}))
    f = emb.frame
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
    if max_norm is not None:
        search = {**search, MIPS_NORM: max_norm}
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
           interests: list[int] | None = None,
           output_fields: tuple[str, ...] = ()) -> list[list[dict[str, Any]]]:
    """ANN top-``k`` by inner product, optionally within ``interests``: one list per query of
    {"pin_id", "score", *output_fields}, best first. Ask for no output fields on the hot path: decoding them can
    cost more than the search itself. (A user's seen pins are dropped by the caller from a ``k`` raised by their
    number: cheaper than a ``pin_id not in [...]`` filter, and it keeps the filter of a batch of users common.)"""
    flt = f"interest_id in {sorted(int(i) for i in interests)}" if interests else ""
    params = dict(search_params)
    scale = params.pop(MIPS_NORM, None)
    if "ef" in params:   # Milvus refuses an HNSW search whose ef is below k (a k raised by a user's seen pins)
        params["ef"] = max(int(params["ef"]), k)
    data = np.asarray(vectors, np.float32)
    if scale is not None:   # a collection stored through mips_transform: [q, 0], and q·x = distance · M
        data = np.hstack([data, np.zeros((len(data), 1), np.float32)])
    raw = client.search(name, data=data.tolist(), limit=k, anns_field=EMBEDDING,
                        filter=flt, output_fields=list(output_fields),
                        search_params={"metric_type": "IP", "params": params})
    scale = 1.0 if scale is None else float(scale)
    return [[{"pin_id": int(h["id"]), "score": float(h["distance"]) * scale,
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
