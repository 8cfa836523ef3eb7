"""Fast SQLite materialization for Feast (written against feast 0.67.0), for this project's feature views.

Two pluggable classes, configured in feature_store.yaml:

    online_store:
      type: feature_repo.infra.fast_sqlite.FastSqliteOnlineStore   # SqliteOnlineStore subclass
      path: .data/feast/online.db
    batch_engine:
      type: feature_repo.infra.fast_sqlite.FastLocalComputeEngine  # LocalComputeEngine subclass
    entity_key_serialization_version: 3

FastSqliteOnlineStore
    * adds one method, online_write_arrow(); tables, schema, reads, update/teardown/plan and
      online_write_batch() (push / write_to_online_store) are stock SqliteOnlineStore's, so the db
      can be switched back to `type: sqlite` at any time;
    * online_write_arrow() takes a pyarrow Table and stores the rows stock materialization would
      (same value bytes, value_text, entity keys and timestamps). Value bytes are built column-wise
      with numpy (no ValueProto objects) for INT64 <- int64, DOUBLE <- float64, STRING <- string /
      large_string, INT64_LIST <- list<int64> and DOUBLE_LIST <- list<double> (list or large_list,
      no null elements); any other column (UNIX_TIMESTAMP, other arrow types) goes through Feast's
      own python_values_to_proto_values(), so its bytes are Feast's by construction;
    * entity keys: entity_key_serialization_version 3 only (ValueError otherwise); INT64 join keys
      in null-free int64 columns are encoded with numpy, any other key with Feast's serializer;
    * timestamps: integer math when the process' local zone is UTC, Feast's conversion otherwise;
    * one transaction per batch, rows sorted by entity key and written as multi-row upserts (the
      last write wins, as in stock), with PRAGMA synchronous=OFF and a 256 MB page cache, both
      restored afterwards. No value_num column and no vectors: online_write_arrow() refuses
      enable_openai_compatible_store and vector_enabled.

FastLocalComputeEngine
    * LocalComputeEngine whose materialization plan stays in Arrow: the filter node is skipped for
      views without a filter (it would be a pandas round trip that changes nothing); dedup keeps
      LocalDedupNode's rule (latest event timestamp, then created timestamp, per join key) with a
      numpy lexsort, for null-free integer join keys and timestamp columns only (ValueError naming
      the view and columns otherwise); the output node hands the table to online_write_arrow()
      (with an online store without it, e.g. Redis, it does exactly what LocalOutputNode does).
      get_historical_features is inherited unchanged.
"""

from __future__ import annotations

import itertools
import sqlite3
import struct
import threading
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
from feast.infra.common.materialization_job import MaterializationJobStatus, MaterializationTask
from feast.infra.compute_engines.local import nodes as _local_nodes
from feast.infra.compute_engines.local.arrow_table_value import ArrowTableValue
from feast.infra.compute_engines.local.compute import LocalComputeEngine, LocalComputeEngineConfig
from feast.infra.compute_engines.local.feature_builder import LocalFeatureBuilder
from feast.infra.compute_engines.local.job import LocalMaterializationJob
from feast.infra.compute_engines.local.local_node import LocalNode
from feast.infra.key_encoding_utils import _serialize_val
from feast.infra.online_stores.helpers import extract_text_and_num
from feast.infra.online_stores.sqlite import SqliteOnlineStore, SqliteOnlineStoreConfig, _quote_id, _table_id
from feast.protos.feast.types.Value_pb2 import ValueType as _ProtoValueType
from feast.type_map import python_values_to_proto_values
from feast.utils import to_naive_utc
from feast.value_type import ValueType
from pydantic import StrictStr

__all__ = [
    "FastSqliteOnlineStore",
    "FastSqliteOnlineStoreConfig",
    "FastLocalComputeEngine",
    "FastLocalComputeEngineConfig",
]


# =============================================================================
# Configuration classes (Feast resolves "<module>.<Class>" -> "<Class>Config")
# =============================================================================
class FastSqliteOnlineStoreConfig(SqliteOnlineStoreConfig):
    # SqliteOnlineStore._get_db_path only accepts types ending in "SqliteOnlineStore": keep the class name suffix
    type: StrictStr = "feature_repo.infra.fast_sqlite.FastSqliteOnlineStore"  # type: ignore[assignment]

    busy_timeout_seconds: float = 5.0
    """Longest wait for a lock held by another connection before a read or write fails (the service sets its
    own, short one: a request should fail fast with 503, not hang)."""


class FastLocalComputeEngineConfig(LocalComputeEngineConfig):
    type: StrictStr = "feature_repo.infra.fast_sqlite.FastLocalComputeEngine"  # type: ignore[assignment]


# =============================================================================
# Column-wise protobuf / entity-key encoding
# =============================================================================
# A "column" is (flat: np.uint8[total], lens: np.int64[n]); row i is
# flat[off[i]:off[i+1]] with off = [0] + cumsum(lens).

_EMPTY_U8 = np.zeros(0, dtype=np.uint8)


def _offsets(lens: np.ndarray) -> np.ndarray:
    off = np.zeros(len(lens) + 1, dtype=np.int64)
    np.cumsum(lens, out=off[1:])
    return off


def _varint(u: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Protobuf base-128 varints of uint64 values -> (flat bytes, per-value length)."""
    u = np.ascontiguousarray(u, dtype=np.uint64)
    n = len(u)
    if n == 0:
        return _EMPTY_U8, np.zeros(0, dtype=np.int64)
    maxlen = max(1, (int(u.max()).bit_length() + 6) // 7)
    lens = np.ones(n, dtype=np.int64)
    for k in range(1, maxlen):
        lens += u >= np.uint64(1 << (7 * k))
    mat = np.empty((n, maxlen), dtype=np.uint8)
    for k in range(maxlen):
        group = ((u >> np.uint64(7 * k)) & np.uint64(0x7F)).astype(np.uint8)
        mat[:, k] = group | ((lens > k + 1).astype(np.uint8) << 7)
    if maxlen == 1:
        return mat.reshape(-1), lens
    return mat[np.arange(maxlen) < lens[:, None]], lens


def _concat(parts: Sequence[tuple[np.ndarray, np.ndarray]], n: int):
    """Row-wise concatenation of several columns -> one column."""
    lens = np.zeros(n, dtype=np.int64)
    for _, ln in parts:
        lens += ln
    off = _offsets(lens)
    out = np.empty(int(off[-1]), dtype=np.uint8)
    pos = off[:-1].copy()
    for flat, ln in parts:
        tot = len(flat)
        if tot:
            src_off = _offsets(ln)
            # destination index of every byte of this part
            dst = np.repeat(pos - src_off[:-1], ln) + np.arange(tot, dtype=np.int64)
            out[dst] = flat
        pos += ln
    return out, lens


def _const(b: bytes, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Constant byte string on rows where mask is True, empty elsewhere."""
    k = int(mask.sum())
    flat = np.tile(np.frombuffer(b, dtype=np.uint8), k)
    return flat, mask.astype(np.int64) * len(b)


def _fixed(arr: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Little-endian fixed width values on rows where mask is True."""
    a = np.ascontiguousarray(arr[mask]).astype(arr.dtype.newbyteorder("<"), copy=False)
    return a.view(np.uint8).reshape(-1), mask.astype(np.int64) * arr.dtype.itemsize


def _masked_varint(u: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    flat, ln = _varint(u[mask])
    lens = np.zeros(len(u), dtype=np.int64)
    lens[mask] = ln
    return flat, lens


def _split(flat: np.ndarray, lens: np.ndarray) -> list[bytes]:
    """Column -> list of Python bytes objects."""
    buf = flat.tobytes()
    off = _offsets(lens).tolist()
    return [buf[a:b] for a, b in zip(off[:-1], off[1:], strict=True)]


def _tag(field: int, wire: int) -> bytes:
    return bytes([(field << 3) | wire])  # field < 16: one byte


def _valid_mask(arr: pa.Array) -> np.ndarray:
    if arr.null_count == 0:
        return np.ones(len(arr), dtype=bool)
    return arr.is_valid().to_numpy(zero_copy_only=False)


# Value proto field number and the arrow type(s) on the fast path (for lists: the child type)
_SCALARS = {
    ValueType.INT64: (4, (pa.int64(),)),
    ValueType.DOUBLE: (5, (pa.float64(),)),
    ValueType.STRING: (2, (pa.string(), pa.large_string())),
}
_LISTS = {
    ValueType.INT64_LIST: (14, pa.int64()),
    ValueType.DOUBLE_LIST: (15, pa.float64()),
}


def _fast_supported(vt: ValueType, typ: pa.DataType) -> bool:
    if vt in _SCALARS:
        return typ in _SCALARS[vt][1]
    if vt in _LISTS and (pa.types.is_list(typ) or pa.types.is_large_list(typ)):
        return typ.value_type == _LISTS[vt][1]
    return False


def _join(head: tuple[np.ndarray, np.ndarray], payload: bytes | None = None,
          pstart: np.ndarray | None = None, pend: np.ndarray | None = None) -> list[bytes]:
    """Per-row bytes = head_i (+ payload[pstart_i:pend_i])."""
    heads = _split(*head)
    if payload is None:
        return heads
    return [h + payload[a:b] for h, a, b in zip(heads, pstart.tolist(), pend.tolist(), strict=True)]


def _encode_scalar(vt: ValueType, arr: pa.Array) -> tuple[list[bytes], list[str | None]]:
    """-> (values, texts). Mirrors _python_value_to_proto_value + extract_text_and_num for _SCALARS."""
    field = _SCALARS[vt][0]
    valid = _valid_mask(arr)
    n = len(arr)
    if vt == ValueType.INT64:
        u = arr.fill_null(0).to_numpy(zero_copy_only=False).view(np.uint64)  # two's complement varint
        vals = _join(_concat([_const(_tag(field, 0), valid), _masked_varint(u, valid)], n))
        texts = [str(x) if ok else None for x, ok in zip(u.view(np.int64).tolist(), valid.tolist(), strict=True)]
        return vals, texts
    if vt == ValueType.DOUBLE:
        x = arr.fill_null(0).to_numpy(zero_copy_only=False)
        valid = valid & ~np.isnan(x)  # pd.isnull(NaN) -> empty Value in stock
        vals = _join(_concat([_const(_tag(field, 1), valid), _fixed(x, valid)], n))
        texts = [str(v) if ok else None for v, ok in zip(x.tolist(), valid.tolist(), strict=True)]
        return vals, texts
    # STRING: tag + varint(len) + raw bytes sliced out of the arrow data buffer
    big = pa.types.is_large_string(arr.type)
    arr = arr.cast(pa.large_binary() if big else pa.binary())
    bufs = arr.buffers()
    offs = np.frombuffer(bufs[1], dtype=np.int64 if big else np.int32)[
        arr.offset: arr.offset + n + 1].astype(np.int64)
    data = bufs[2].to_pybytes() if bufs[2] is not None else b""
    slen = np.diff(offs)
    head = _concat([_const(_tag(field, 2), valid), _masked_varint(slen.astype(np.uint64), valid)], n)
    vals = _join(head, data, offs[:-1], np.where(valid, offs[1:], offs[:-1]))
    return vals, arr.cast(pa.large_string()).to_pylist()


def _encode_list(vt: ValueType, arr: pa.Array) -> list[bytes]:
    """Packed numeric list: tag + varint(len(inner)) + inner, with
    inner = 0x0A + varint(len(p)) + p  (inner empty for [], whole Value empty for null)."""
    field = _LISTS[vt][0]
    n = len(arr)
    valid = _valid_mask(arr)
    if pa.types.is_list(arr.type):
        arr = arr.cast(pa.large_list(arr.type.value_type))
    offs = arr.offsets.to_numpy().astype(np.int64)  # already accounts for slicing
    cnt = np.where(valid, np.diff(offs), 0)
    child = arr.values.to_numpy(zero_copy_only=False)
    if valid.all():
        elems = child[offs[0]: offs[-1]]
    else:  # drop the children of null rows
        keep = np.repeat(valid, np.diff(offs))
        elems = child[offs[0]: offs[-1]][keep]
    if vt == ValueType.INT64_LIST:
        eflat, elen = _varint(np.ascontiguousarray(elems).view(np.uint64))
        ecum = _offsets(elen)
        rowend = np.cumsum(cnt)
        pend = ecum[rowend]
        pstart = ecum[rowend - cnt]
        payload = eflat.tobytes()
    else:  # DOUBLE_LIST
        payload = np.ascontiguousarray(elems, dtype="<f8").tobytes()
        pend = np.cumsum(cnt) * 8
        pstart = pend - cnt * 8
    plen = pend - pstart
    nonempty = cnt > 0
    ilen = np.where(nonempty, 1 + _varint(plen.astype(np.uint64))[1] + plen, 0)
    head = _concat([_const(_tag(field, 2), valid), _masked_varint(ilen.astype(np.uint64), valid),
                    _const(b"\x0a", nonempty), _masked_varint(plen.astype(np.uint64), nonempty)], n)
    return _join(head, payload, pstart, pend)


def _encode_column_fallback(vt: ValueType, arr: pa.Array) -> tuple[list[bytes], list[str | None]]:
    """Exactly what Feast does: python_values_to_proto_values(to_numpy()) + SerializeToString."""
    protos = python_values_to_proto_values(arr.to_numpy(zero_copy_only=False), vt)
    return [p.SerializeToString() for p in protos], [extract_text_and_num(p, False)[0] for p in protos]


def encode_feature_column(vt: ValueType, arr: pa.Array | pa.ChunkedArray) -> tuple[list[bytes], list[str | None]]:
    """-> (Value bytes per row, value_text per row)."""
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    if not _fast_supported(vt, arr.type) or (vt in _LISTS and arr.flatten().null_count > 0):
        return _encode_column_fallback(vt, arr)
    if vt in _SCALARS:
        return _encode_scalar(vt, arr)
    return _encode_list(vt, arr), [None] * len(arr)


# ---- entity keys (serialize_entity_key, version 3) --------------------------
def _key_part(vt: ValueType, arr: pa.Array, n: int) -> tuple[np.ndarray, np.ndarray]:
    """One join key column -> column of  type(<I) + len(<I) + value bytes."""
    if vt == ValueType.INT64 and arr.type == pa.int64() and arr.null_count == 0:
        allrows = np.ones(n, dtype=bool)
        head = struct.pack("<II", _ProtoValueType.INT64, 8)
        return _concat([_const(head, allrows), _fixed(arr.to_numpy(), allrows)], n)
    return _key_part_fallback(vt, arr, n)


def _key_part_fallback(vt: ValueType, arr: pa.Array, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Feast's own conversion and value serializer (ValueError on nulls, like stock)."""
    protos = python_values_to_proto_values(arr.to_numpy(zero_copy_only=False), vt)
    out = []
    for p in protos:
        b, t = _serialize_val(p.WhichOneof("val"), p, 3)
        out.append(struct.pack("<II", t, len(b)) + b)
    lens = np.fromiter((len(b) for b in out), dtype=np.int64, count=n)
    return np.frombuffer(b"".join(out), dtype=np.uint8), lens


def encode_entity_keys(table: pa.Table, join_keys: dict[str, ValueType], version: int) -> list[bytes]:
    """Same bytes as serialize_entity_key(EntityKeyProto(join_keys, values), 3) for every row."""
    if version != 3:
        raise ValueError(f"FastSqliteOnlineStore encodes entity keys with entity_key_serialization_version 3 only; "
                         f"the repo config (feature_store.yaml) sets entity_key_serialization_version: {version}")
    n = table.num_rows
    keys_sorted = sorted(join_keys)
    prefix = [struct.pack("<I", len(keys_sorted))]
    for k in keys_sorted:
        kb = k.encode("utf8")
        prefix.append(struct.pack("<II", _ProtoValueType.STRING, len(kb)) + kb)
    parts = [_const(b"".join(prefix), np.ones(n, dtype=bool))]
    for k in keys_sorted:
        parts.append(_key_part(join_keys[k], table.column(k).combine_chunks(), n))
    return _split(*_concat(parts, n))


# ---- timestamps -> what the sqlite3 datetime adapter stores -----------------
def _local_is_utc() -> bool:
    return all(int(datetime(y, m, 1).timestamp()) ==
               int((np.datetime64(f"{y}-{m:02d}-01") - np.datetime64("1970-01-01")) / np.timedelta64(1, "s"))
               for y in (1990, 2024) for m in (1, 7))


def encode_timestamps(arr: pa.ChunkedArray | None, n: int) -> list[int | None]:
    """Stock path: pd.to_datetime(col.to_numpy()) -> to_pydatetime -> to_naive_utc ->
    sqlite adapter int(naive.timestamp()) (interprets the naive UTC wall clock in the
    process' local zone). Reproduced with integer math when the local zone is UTC."""
    if arr is None:
        return [None] * n
    arr = arr.combine_chunks() if isinstance(arr, pa.ChunkedArray) else arr
    if pa.types.is_timestamp(arr.type) and arr.null_count == 0 and _local_is_utc():
        us = arr.cast(pa.timestamp(arr.type.unit)).cast(pa.int64()).to_numpy()
        us = {"s": us * 1_000_000, "ms": us * 1000, "us": us, "ns": us // 1000}[arr.type.unit]
        sec, frac = np.divmod(us, 1_000_000)
        # int(sec + frac/1e6) truncates toward zero
        return (sec + ((sec < 0) & (frac > 0))).tolist()
    import pandas as pd
    from feast.utils import _coerce_datetime

    return [int(to_naive_utc(_coerce_datetime(v)).timestamp())
            for v in pd.to_datetime(arr.to_numpy(zero_copy_only=False))]


# =============================================================================
# Online store
# =============================================================================
_BULK_CACHE_KIB = 256 * 1024  # page cache while a batch is written (PRAGMA cache_size=-KiB)


@contextmanager
def _bulk(conn):
    """One transaction with PRAGMA synchronous=OFF and a 256 MB page cache, both restored afterwards."""
    old_sync = conn.execute("PRAGMA synchronous").fetchone()[0]
    old_cache = conn.execute("PRAGMA cache_size").fetchone()[0]
    conn.execute("PRAGMA synchronous=OFF")
    conn.execute(f"PRAGMA cache_size={-_BULK_CACHE_KIB}")
    try:
        with conn:  # one transaction
            yield
    finally:
        conn.execute(f"PRAGMA synchronous={int(old_sync)}")
        conn.execute(f"PRAGMA cache_size={int(old_cache)}")


class FastSqliteOnlineStore(SqliteOnlineStore):
    """SqliteOnlineStore plus online_write_arrow(), and one connection per thread (with a bounded lock wait):
    a slow or blocked read holds up its own request, not every request of the process. A connection that hit
    an error is dropped, so the next use reopens the file (a file restored after corruption is picked up
    without a restart). Everything else is inherited unchanged."""

    def _get_conn(self, config):
        local = self.__dict__.setdefault("_local", threading.local())
        conn = getattr(local, "conn", None)
        if conn is None:
            db_path = self._get_db_path(config)
            Path(db_path).parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(db_path, detect_types=sqlite3.PARSE_DECLTYPES | sqlite3.PARSE_COLNAMES,
                                   check_same_thread=False,
                                   timeout=getattr(config.online_store, "busy_timeout_seconds", 5.0))
            local.conn = conn
        return conn

    def _drop_conn(self) -> None:
        local = self.__dict__.get("_local")
        conn = getattr(local, "conn", None) if local is not None else None
        if conn is not None:
            local.conn = None
            try:
                conn.close()
            except sqlite3.Error:
                pass

    def online_read(self, config, table, entity_keys, requested_features=None):
        try:
            return super().online_read(config, table, entity_keys, requested_features)
        except sqlite3.Error:
            self._drop_conn()
            raise

    def teardown(self, config, tables, entities):
        self._drop_conn()
        super().teardown(config, tables, entities)

    # entities per INSERT statement; each contributes len(features) VALUES rows
    ENTITIES_PER_STATEMENT = 64

    def online_write_arrow(self, config, table, arrow_table: pa.Table,
                           join_keys: dict[str, ValueType],
                           progress: Callable[[int], Any] | None = None) -> int:
        """Write one stored row per (arrow row, feature). The caller dedups; if an entity
        appears twice the later arrow row wins, as with online_write_batch.
        Column names are the feature view's feature names / join keys / batch_source
        timestamp columns (what LocalOutputNode hands to _convert_arrow_to_proto)."""
        n = arrow_table.num_rows
        if n == 0:
            return 0
        for setting in ("enable_openai_compatible_store", "vector_enabled"):
            if getattr(config.online_store, setting, False):
                raise ValueError(f"FastSqliteOnlineStore.online_write_arrow does not support {setting}: true "
                                 "(use `type: sqlite` and the `local` batch engine)")
        keys = encode_entity_keys(arrow_table, join_keys, config.entity_key_serialization_version)
        # Insert in entity-key order (B-tree locality for the PK and _ek indexes): one take() on the
        # arrow side. Stable, so duplicates keep their order (the later row wins).
        order = np.argsort(np.array(keys), kind="stable")
        if n > 1 and not (order[1:] > order[:-1]).all():
            arrow_table = arrow_table.take(order)
            keys = [keys[i] for i in order.tolist()]
        src = table.batch_source
        cts = src.created_timestamp_column
        # cols: event_ts, created_ts, then (value, value_text) per feature; None = all NULL
        cols: list[list | None] = [encode_timestamps(arrow_table.column(src.timestamp_field), n),
                                   encode_timestamps(arrow_table.column(cts), n) if cts else None]
        feats = []  # (feature name, index of its value column in cols)
        for f in table.features:
            feats.append((f.name, len(cols)))
            cols += encode_feature_column(f.dtype.to_value_type(), arrow_table.column(f.name))
        # all-None columns become SQL NULL literals instead of bound parameters
        cols = [None if c is None or all(v is None for v in c) else c for c in cols]
        self._insert_entities(config, table, keys, cols, feats)
        if progress:
            progress(n)
        return n

    def _insert_entities(self, config, table, keys, cols, feats):
        """Multi-row upsert with numbered parameters: per entity the key and the
        timestamps are bound once and shared by its len(features) VALUES rows."""
        slots: dict[int, int] = {}  # index in cols -> parameter slot within an entity
        bound = [keys]
        for i, c in enumerate(cols):
            if c is not None:
                bound.append(c)
                slots[i] = len(bound)  # 1-based; slot 1 is the key
        width = len(bound)

        def ref(i, base):
            return f"?{base + slots[i]}" if i in slots else "NULL"

        table_name = _table_id(config.project, table, config.registry.enable_online_feature_view_versioning)
        colnames = ["entity_key", "feature_name", "value", "value_text", "event_ts", "created_ts"]
        upd = ", ".join(f"{c} = excluded.{c}" for c in colnames[2:])
        head = f"INSERT INTO {_quote_id(table_name)} ({', '.join(colnames)}) VALUES "
        tail = f" ON CONFLICT(entity_key, feature_name) DO UPDATE SET {upd}"

        def statement(n_ent):
            rows = []
            for e in range(n_ent):
                b = e * width
                for fname, ci in feats:
                    name = "'" + fname.replace("'", "''") + "'"
                    rows.append(f"(?{b + 1},{name},{ref(ci, b)},{ref(ci + 1, b)},{ref(0, b)},{ref(1, b)})")
            return head + ",".join(rows) + tail

        n = len(keys)
        per = max(1, min(self.ENTITIES_PER_STATEMENT, 30000 // width, max(1, 2000 // max(1, len(feats)))))
        flat = list(itertools.chain.from_iterable(zip(*bound, strict=True)))
        full = n // per * per
        step = per * width
        conn = self._get_conn(config)
        with _bulk(conn):
            if full:
                conn.executemany(statement(per), (flat[i:i + step] for i in range(0, full * width, step)))
            if full < n:
                conn.execute(statement(n - full), flat[full * width:])


# =============================================================================
# Compute engine: keep materialization in Arrow end to end
# =============================================================================
def _as_sortable_int64(col: pa.ChunkedArray) -> np.ndarray | None:
    """int64 view of an integer / timestamp / date column without nulls, else None."""
    t = col.type
    if col.null_count:
        return None
    if pa.types.is_timestamp(t) or pa.types.is_date64(t) or pa.types.is_time64(t):
        col = col.cast(pa.int64())
    elif pa.types.is_date32(t) or pa.types.is_time32(t):
        col = col.cast(pa.int32())
    elif not (pa.types.is_integer(t) and t != pa.uint64()):
        return None
    return col.to_numpy().astype(np.int64, copy=False)


def _latest_per_key(tbl: pa.Table, keys: list[str], sort_cols: list[str], view: str) -> np.ndarray:
    """Row indices of the latest (sort_cols) row per key, sorted; ties -> last row in the input."""
    names = list(keys) + list(sort_cols)
    cols = [_as_sortable_int64(tbl.column(c)) for c in names]
    bad = [f"{c} ({tbl.column(c).type}{', with nulls' if tbl.column(c).null_count else ''})"
           for c, v in zip(names, cols, strict=True) if v is None]
    if bad:
        raise ValueError(f"FastLocalComputeEngine dedups on null-free integer join keys and timestamps only; "
                         f"feature view {view!r} has {', '.join(bad)} (use the stock `local` batch engine)")
    k, s = cols[:len(keys)], cols[len(keys):]
    # np.lexsort is stable; last key is the primary one
    order = np.lexsort(tuple(reversed(s)) + tuple(reversed(k)))
    last = np.ones(len(order), dtype=bool)
    for kc in k:
        ks = kc[order]
        last[:-1] &= ks[1:] == ks[:-1]
    last[:-1] = ~last[:-1]
    return np.sort(order[last])


class ArrowDedupNode(LocalNode):
    """LocalDedupNode without pandas: keep, per join key, the row with the greatest
    (timestamp, created_timestamp) -- the same rule as LocalDedupNode's
    sort_values(desc).drop_duplicates(). Exact ties: the row that comes last in the
    offline store's output (pandas' quicksort leaves that order unspecified)."""

    def __init__(self, name, column_info, view_name: str, inputs=None):
        super().__init__(name, inputs=inputs)
        self.column_info = column_info
        self.view_name = view_name

    def execute(self, context) -> ArrowTableValue:
        tbl: pa.Table = self.get_single_table(context).data.combine_chunks()
        keys = self.column_info.join_keys_columns
        if keys and tbl.num_rows:
            sort_cols = [self.column_info.timestamp_column]
            cts = self.column_info.created_timestamp_column
            if cts and cts in tbl.column_names:
                sort_cols.append(cts)
            tbl = tbl.take(_latest_per_key(tbl, keys, sort_cols, self.view_name))
        out = ArrowTableValue(tbl)
        context.node_outputs[self.name] = out
        return out


class ArrowOutputNode(_local_nodes.LocalOutputNode):
    """LocalOutputNode that hands Arrow to online_write_arrow() when available."""

    def execute(self, context) -> ArrowTableValue:
        online_store = context.online_store
        if not (self.feature_view.online and hasattr(online_store, "online_write_arrow")):
            return super().execute(context)
        input_table = self.get_single_table(context).data
        output = ArrowTableValue(data=input_table)
        context.node_outputs[self.name] = output
        if input_table.num_rows == 0:
            return output
        join_keys = {e.name: e.dtype.to_value_type() for e in self.feature_view.entity_columns}
        bs = context.repo_config.materialization_config.online_write_batch_size
        batches = [input_table] if bs is None else [
            pa.Table.from_batches([b]) for b in input_table.to_batches(max_chunksize=bs)]
        for b in batches:
            online_store.online_write_arrow(context.repo_config, self.feature_view, b, join_keys)
        if self.feature_view.offline:
            context.offline_store.offline_write_batch(
                config=context.repo_config, feature_view=self.feature_view,
                table=input_table, progress=lambda x: None)
        return output


class FastLocalFeatureBuilder(LocalFeatureBuilder):
    def build_filter_node(self, view, input_node):
        # For materialization there is no entity_df, so LocalFilterNode only applies
        # view.filter; without one it is a pandas round trip that changes nothing.
        if isinstance(self.task, MaterializationTask) and not getattr(view, "filter", None):
            return input_node
        return super().build_filter_node(view, input_node)

    def build_dedup_node(self, view, input_node):
        node = ArrowDedupNode("dedup", self.get_column_info(view), view.name, inputs=[input_node])
        self.nodes.append(node)
        return node

    def build_output_nodes(self, view, input_node):
        node = ArrowOutputNode("output", self.dag_root.view, inputs=[input_node])
        self.nodes.append(node)
        return node


class FastLocalComputeEngine(LocalComputeEngine):
    """LocalComputeEngine whose materialization plan stays in Arrow.
    get_historical_features is inherited unchanged."""

    def _materialize_one(self, registry, task: MaterializationTask, **kwargs):
        job_id = f"{task.feature_view.name}-{task.start_time}-{task.end_time}"
        context = self.get_execution_context(registry, task)
        backend = self._get_backend(context)
        try:
            plan = FastLocalFeatureBuilder(registry, task, backend=backend).build()
            plan.execute(context)
            return LocalMaterializationJob(job_id=job_id, status=MaterializationJobStatus.SUCCEEDED)
        except Exception as e:
            return LocalMaterializationJob(job_id=job_id, status=MaterializationJobStatus.ERROR, error=e)
