"""Fast SQLite materialization for Feast (written against feast 0.67.0).

Two pluggable classes, both configured from feature_store.yaml:

    online_store:
      type: fast_sqlite.FastSqliteOnlineStore   # SqliteOnlineStore subclass
      path: data/online.db
    batch_engine:
      type: training.fast_sqlite.FastLocalComputeEngine  # LocalComputeEngine subclass

FastSqliteOnlineStore
    * same tables, schema, read path, update/teardown/plan as SqliteOnlineStore (only
      the write path is overridden), so stock SqliteOnlineStore.online_read returns the
      same values and the db can be switched back to `type: sqlite` at any time;
    * online_write_batch(): same protos-in interface and stored bytes as stock, but
      keys are serialized once per entity and rows go in as multi-row upserts;
    * online_write_arrow(): new entry point taking a pyarrow Table. Builds the
      ValueProto wire bytes and v3 entity-key bytes column-wise with numpy (no
      ValueProto objects) for the common type pairs; any other column is converted
      by Feast's own python_values_to_proto_values(), so the bytes are identical.
    * writes run in one transaction per batch, sorted by entity key, with
      PRAGMA synchronous=OFF and a 256 MB page cache (both restored afterwards).

FastLocalComputeEngine
    * LocalComputeEngine whose materialization plan stays in Arrow: no pandas round
      trip in the (no-op) filter node, dedup by numpy lexsort (pyarrow group_by
      fallback) with LocalDedupNode's rule (latest event_ts, then created_ts, per
      join key), and the table goes to online_write_arrow() when the online store
      has it (otherwise it does exactly what LocalOutputNode does).
      get_historical_features is inherited unchanged.

Works with `feast materialize`, `feast materialize-incremental`, store.materialize*(),
store.write_to_online_store() and store.get_online_features(). The module only has to
be importable (`feast` CLI commands add the repo dir to sys.path; for the Python API
use PYTHONPATH or install it).
"""
from __future__ import annotations

import itertools
import struct
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from datetime import datetime
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from feast.infra.common.materialization_job import (
    MaterializationJobStatus,
    MaterializationTask,
)
from feast.infra.compute_engines.local import nodes as _local_nodes
from feast.infra.compute_engines.local.arrow_table_value import ArrowTableValue
from feast.infra.compute_engines.local.compute import (
    LocalComputeEngine,
    LocalComputeEngineConfig,
)
from feast.infra.compute_engines.local.feature_builder import LocalFeatureBuilder
from feast.infra.compute_engines.local.job import LocalMaterializationJob
from feast.infra.compute_engines.local.local_node import LocalNode
from feast.infra.key_encoding_utils import serialize_entity_key
from feast.infra.online_stores.helpers import extract_text_and_num
from feast.infra.online_stores.sqlite import (
    SqliteOnlineStore,
    SqliteOnlineStoreConfig,
    _quote_id,
    _table_id,
)
from feast.protos.feast.types.Value_pb2 import ValueType as _ProtoValueType
from feast.type_map import python_values_to_proto_values
from feast.utils import _convert_arrow_to_proto, to_naive_utc
from feast.value_type import ValueType
from pydantic import StrictStr

try:  # only exists in recent Feast; parity with _convert_arrow_to_proto
    from feast.utils import _validate_vector_field_lengths
except ImportError:  # pragma: no cover
    _validate_vector_field_lengths = None

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
    # any "<module path>.FastSqliteOnlineStore" (SqliteOnlineStore._get_db_path only
    # accepts types ending in "SqliteOnlineStore", so keep the class name suffix)
    type: StrictStr = "fast_sqlite.FastSqliteOnlineStore"  # type: ignore[assignment]

    bulk_synchronous: Literal["OFF", "NORMAL", "FULL", "EXTRA", "DEFAULT"] = "OFF"
    """PRAGMA synchronous used while a materialization batch is written ("DEFAULT"
    leaves the connection's setting alone). Restored afterwards."""

    bulk_cache_size_mb: int = 256
    """Page cache used while a batch is written (restored afterwards); 0 = leave alone."""

    skip_older_writes: bool = False
    """False (default) = stock semantics: the last write wins. True = an upsert only
    replaces a stored row if its event_ts (whole seconds, as stored) is >= the stored
    one, i.e. materializing an older window never clobbers newer values."""


class FastLocalComputeEngineConfig(LocalComputeEngineConfig):
    type: StrictStr = "fast_sqlite.FastLocalComputeEngine"  # type: ignore[assignment]


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
    w = arr.dtype.itemsize
    return a.view(np.uint8).reshape(-1), mask.astype(np.int64) * w


def _masked_varint(u: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    flat, ln = _varint(u[mask])
    lens = np.zeros(len(u), dtype=np.int64)
    lens[mask] = ln
    return flat, lens


def _split(flat: np.ndarray, lens: np.ndarray) -> list[bytes]:
    """Column -> list of Python bytes objects."""
    buf = flat.tobytes()
    off = _offsets(lens).tolist()
    return [buf[a:b] for a, b in zip(off[:-1], off[1:], strict=False)]


def _tag(field: int, wire: int) -> bytes:
    return bytes([(field << 3) | wire]) if field < 16 else bytes(
        [((field << 3) | wire) & 0x7F | 0x80, (field << 3 | wire) >> 7]
    )


def _valid_mask(arr: pa.Array) -> np.ndarray:
    if arr.null_count == 0:
        return np.ones(len(arr), dtype=bool)
    return arr.is_valid().to_numpy(zero_copy_only=False)


def _ints_as_u64(arr: pa.Array) -> np.ndarray:
    """int* arrow array -> uint64 two's complement (protobuf int32/int64 varint)."""
    a = arr.fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)
    return a.view(np.uint64)


_INT_TYPES = (pa.int8(), pa.int16(), pa.int32(), pa.int64(), pa.uint8(), pa.uint16(), pa.uint32())
_INT32_TYPES = (pa.int8(), pa.int16(), pa.int32(), pa.uint8(), pa.uint16())

# scalar: ValueType -> (field number, arrow types accepted on the fast path)
_SCALARS = {
    ValueType.INT64: (4, _INT_TYPES),
    ValueType.INT32: (3, _INT32_TYPES),
    ValueType.DOUBLE: (5, (pa.float64(),)),
    ValueType.FLOAT: (6, (pa.float32(),)),
    ValueType.BOOL: (7, (pa.bool_(),)),
    ValueType.STRING: (2, (pa.string(), pa.large_string())),
    ValueType.BYTES: (1, (pa.binary(), pa.large_binary())),
}
# packed numeric lists: ValueType -> (field number, arrow child types accepted)
_LISTS = {
    ValueType.INT64_LIST: (14, _INT_TYPES),
    ValueType.INT32_LIST: (13, _INT32_TYPES),
    ValueType.DOUBLE_LIST: (15, (pa.float64(),)),
    ValueType.FLOAT_LIST: (16, (pa.float32(),)),
}


def _fast_supported(vt: ValueType, typ: pa.DataType) -> bool:
    if vt in _SCALARS:
        return typ in _SCALARS[vt][1]
    if vt in _LISTS and (pa.types.is_list(typ) or pa.types.is_large_list(typ)):
        return typ.value_type in _LISTS[vt][1]
    return False


def _join(head: tuple[np.ndarray, np.ndarray], payload: bytes | None = None,
          pstart: np.ndarray | None = None, pend: np.ndarray | None = None) -> list[bytes]:
    """Per-row bytes = head_i (+ payload[pstart_i:pend_i])."""
    heads = _split(*head)
    if payload is None:
        return heads
    return [h + payload[a:b] for h, a, b in zip(heads, pstart.tolist(), pend.tolist())]


def _encode_scalar(vt: ValueType, arr: pa.Array):
    """-> (values, texts, nums|None, valid). Mirrors _python_value_to_proto_value +
    extract_text_and_num for the (ValueType, arrow type) pairs in _SCALARS."""
    field = _SCALARS[vt][0]
    valid = _valid_mask(arr)
    n = len(arr)
    if vt in (ValueType.INT64, ValueType.INT32):
        u = _ints_as_u64(arr)
        vals = _join(_concat([_const(_tag(field, 0), valid), _masked_varint(u, valid)], n))
        ints = u.view(np.int64)
        texts = [str(x) if ok else None for x, ok in zip(ints.tolist(), valid.tolist())]
        return vals, texts, ints.astype(np.float64), valid
    if vt in (ValueType.DOUBLE, ValueType.FLOAT):
        x = arr.fill_null(0).to_numpy(zero_copy_only=False)
        valid = valid & ~np.isnan(x)  # pd.isnull(NaN) -> empty Value in stock
        wire = 1 if vt == ValueType.DOUBLE else 5
        vals = _join(_concat([_const(_tag(field, wire), valid), _fixed(x, valid)], n))
        f64 = x.astype(np.float64)
        texts = [str(v) if ok else None for v, ok in zip(f64.tolist(), valid.tolist())]
        return vals, texts, f64, valid
    if vt == ValueType.BOOL:
        x = arr.fill_null(False).to_numpy(zero_copy_only=False).astype(np.uint8)
        vals = _join(_concat([_const(_tag(field, 0), valid), _fixed(x, valid)], n))
        texts = [("True" if v else "False") if ok else None
                 for v, ok in zip(x.tolist(), valid.tolist())]
        return vals, texts, x.astype(np.float64), valid
    # STRING / BYTES: tag + varint(len) + raw bytes sliced out of the arrow data buffer
    big = pa.types.is_large_string(arr.type) or pa.types.is_large_binary(arr.type)
    arr = arr.cast(pa.large_binary() if big else pa.binary())
    bufs = arr.buffers()
    offs = np.frombuffer(bufs[1], dtype=np.int64 if big else np.int32)[
        arr.offset: arr.offset + n + 1].astype(np.int64)
    data = bufs[2].to_pybytes() if bufs[2] is not None else b""
    slen = np.diff(offs)
    head = _concat([_const(_tag(field, 2), valid),
                    _masked_varint(slen.astype(np.uint64), valid)], n)
    vals = _join(head, data, offs[:-1], np.where(valid, offs[1:], offs[:-1]))
    texts = arr.cast(pa.large_string()).to_pylist() if vt == ValueType.STRING else None
    return vals, texts, None, valid


def _encode_list(vt: ValueType, arr: pa.Array):
    """Packed numeric list: tag + varint(len(inner)) + inner, with
    inner = 0x0A + varint(len(p)) + p  (inner empty for [], whole Value empty for null)."""
    field, _ = _LISTS[vt]
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
    if vt in (ValueType.INT64_LIST, ValueType.INT32_LIST):
        eflat, elen = _varint(elems.astype(np.int64).view(np.uint64))
        ecum = np.zeros(len(elen) + 1, dtype=np.int64)
        np.cumsum(elen, out=ecum[1:])
        rowend = np.cumsum(cnt)
        pend = ecum[rowend]
        pstart = ecum[rowend - cnt]
        payload = eflat.tobytes()
    else:
        w = elems.dtype.itemsize
        payload = np.ascontiguousarray(elems).astype(elems.dtype.newbyteorder("<"), copy=False).tobytes()
        pend = np.cumsum(cnt) * w
        pstart = pend - cnt * w
    plen = pend - pstart
    nonempty = cnt > 0
    ilen = np.where(nonempty, 1 + _varint(plen.astype(np.uint64))[1] + plen, 0)
    head = _concat([_const(_tag(field, 2), valid), _masked_varint(ilen.astype(np.uint64), valid),
                    _const(b"\x0a", nonempty), _masked_varint(plen.astype(np.uint64), nonempty)], n)
    return _join(head, payload, pstart, pend), None, None, valid


def _child_has_nulls(arr: pa.Array) -> bool:
    return (pa.types.is_list(arr.type) or pa.types.is_large_list(arr.type)) and \
        arr.flatten().null_count > 0


def _encode_column_fallback(vt: ValueType, arr: pa.Array, compute_num: bool):
    """Exactly what Feast does: python_values_to_proto_values(to_numpy()) + SerializeToString."""
    protos = python_values_to_proto_values(arr.to_numpy(zero_copy_only=False), vt)
    values = [p.SerializeToString() for p in protos]
    tn = [extract_text_and_num(p, compute_num) for p in protos]
    return values, [t for t, _ in tn], [v for _, v in tn]


def encode_feature_column(vt: ValueType, arr: pa.Array, compute_num: bool = False):
    """-> (Value bytes per row, value_text per row, value_num per row)."""
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    if not _fast_supported(vt, arr.type) or _child_has_nulls(arr):
        return _encode_column_fallback(vt, arr, compute_num)
    if vt in _SCALARS:
        vals, texts, num, valid = _encode_scalar(vt, arr)
    else:
        vals, texts, num, valid = _encode_list(vt, arr)
    n = len(arr)
    if texts is None:
        texts = [None] * n
    if compute_num and num is not None:
        nums = [x if ok else None for x, ok in zip(num.tolist(), valid.tolist())]
    else:
        nums = [None] * n
    return vals, texts, nums


# ---- entity keys (serialize_entity_key, version 3) --------------------------
_KEY_FAST = {
    ValueType.INT64: (_ProtoValueType.INT64, np.dtype("<i8"), _INT_TYPES),
    ValueType.INT32: (_ProtoValueType.INT32, np.dtype("<i4"), _INT32_TYPES),
    ValueType.STRING: (_ProtoValueType.STRING, None, (pa.string(), pa.large_string())),
}


def _key_part(vt: ValueType, arr: pa.Array, n: int):
    """One join key column -> column of  type(<I) + len(<I) + bytes."""
    spec = _KEY_FAST.get(vt)
    if spec is not None and arr.null_count == 0 and arr.type in spec[2]:
        ptype, dt, _ = spec
        allrows = np.ones(n, dtype=bool)
        if dt is not None:
            vals = arr.to_numpy(zero_copy_only=False).astype(dt)
            head = struct.pack("<II", ptype, dt.itemsize)
            return _concat([_const(head, allrows), _fixed(vals, allrows)], n)
        enc = [s.encode("utf8") for s in arr.to_pylist()]
        lens = np.fromiter((len(b) for b in enc), dtype=np.int64, count=n)
        hdr = np.empty((n, 2), dtype="<u4")
        hdr[:, 0] = ptype
        hdr[:, 1] = lens
        flat = np.frombuffer(b"".join(enc), dtype=np.uint8)
        return _concat([(hdr.view(np.uint8).reshape(-1), np.full(n, 8, dtype=np.int64)),
                        (flat, lens)], n)
    # generic: Feast's own conversion and value serializer (ValueError on nulls, like stock)
    from feast.infra.key_encoding_utils import _serialize_val

    protos = python_values_to_proto_values(arr.to_numpy(zero_copy_only=False), vt)
    out = []
    for p in protos:
        b, t = _serialize_val(p.WhichOneof("val"), p, 3)
        out.append(struct.pack("<II", t, len(b)) + b)
    lens = np.fromiter((len(b) for b in out), dtype=np.int64, count=n)
    return np.frombuffer(b"".join(out), dtype=np.uint8), lens


def encode_entity_keys(table: pa.Table, join_keys: dict[str, ValueType],
                       version: int) -> list[bytes]:
    """Same bytes as serialize_entity_key(EntityKeyProto(join_keys, values), version)
    for every row (version 3 only; other versions use Feast's function)."""
    n = table.num_rows
    names = list(join_keys)
    if version != 3 or not names:
        protos = {k: python_values_to_proto_values(
            table.column(k).to_numpy(zero_copy_only=False), vt) for k, vt in join_keys.items()}
        from feast.protos.feast.types.EntityKey_pb2 import EntityKey as EntityKeyProto
        return [serialize_entity_key(EntityKeyProto(join_keys=names,
                                                    entity_values=[protos[k][i] for k in names]),
                                     entity_key_serialization_version=version)
                for i in range(n)]
    keys_sorted = names if len(names) == 1 else sorted(names)
    prefix = [struct.pack("<I", len(keys_sorted))]
    for k in keys_sorted:
        kb = k.encode("utf8")
        prefix.append(struct.pack("<II", _ProtoValueType.STRING, len(kb)) + kb)
    allrows = np.ones(n, dtype=bool)
    parts = [_const(b"".join(prefix), allrows)]
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
class FastSqliteOnlineStore(SqliteOnlineStore):
    """SqliteOnlineStore with a bulk write path. Reads, schema, update/teardown and
    plan are inherited unchanged."""

    # ---- helpers -------------------------------------------------------------
    def _write_layout(self, config, table):
        conn = self._get_conn(config)
        table_name = _table_id(config.project, table,
                               config.registry.enable_online_feature_view_versioning)
        has_num = False
        if getattr(config.online_store, "enable_openai_compatible_store", False):
            has_num = self._check_table_has_value_num(conn, table_name)
        cols = ["entity_key", "feature_name", "value", "value_text"]
        if has_num:
            cols.append("value_num")
        cols += ["event_ts", "created_ts"]
        upd = ", ".join(f"{c} = excluded.{c}" for c in cols[2:])
        sql = (f"INSERT INTO {_quote_id(table_name)} ({', '.join(cols)}) "
               f"VALUES ({', '.join('?' * len(cols))}) "
               f"ON CONFLICT(entity_key, feature_name) DO UPDATE SET {upd}")
        if getattr(config.online_store, "skip_older_writes", False):
            sql += " WHERE excluded.event_ts >= event_ts OR event_ts IS NULL"
        return conn, sql, has_num

    def _stock_only(self, config) -> bool:
        # vector columns need per-type python work; keep Feast's implementation
        return bool(getattr(config.online_store, "vector_enabled", False))

    @contextmanager
    def _bulk(self, conn, config):
        """One transaction, with per-connection pragmas that are restored afterwards."""
        cfg_sync = getattr(config.online_store, "bulk_synchronous", "OFF")
        cache_mb = getattr(config.online_store, "bulk_cache_size_mb", 256)
        old_sync = conn.execute("PRAGMA synchronous").fetchone()[0]
        old_cache = conn.execute("PRAGMA cache_size").fetchone()[0]
        if cfg_sync != "DEFAULT":
            conn.execute(f"PRAGMA synchronous={cfg_sync}")
        if cache_mb:
            conn.execute(f"PRAGMA cache_size={-1024 * int(cache_mb)}")
        try:
            with conn:  # one transaction
                yield
        finally:
            conn.execute(f"PRAGMA synchronous={int(old_sync)}")
            conn.execute(f"PRAGMA cache_size={int(old_cache)}")

    # ---- protos in (same interface as stock) --------------------------------
    def online_write_batch(self, config, table, data, progress) -> None:
        """Same input and stored bytes as SqliteOnlineStore.online_write_batch (used by
        push / write_to_online_store and by the stock LocalComputeEngine)."""
        if self._stock_only(config):
            return super().online_write_batch(config, table, data, progress)
        if not data:
            return
        conn, sql, has_num = self._write_layout(config, table)
        ver = config.entity_key_serialization_version
        fnames = list(data[0][1].keys())
        if any(list(values.keys()) != fnames for _, values, _, _ in data):
            # ragged feature dicts: plain executemany, row by row like stock
            def rows():
                for entity_key, values, ts, cts in data:
                    kb = serialize_entity_key(entity_key, entity_key_serialization_version=ver)
                    ts = to_naive_utc(ts)
                    cts = to_naive_utc(cts) if cts is not None else None
                    for fname, val in values.items():
                        text, num = extract_text_and_num(val, has_num)
                        yield (kb, fname, val.SerializeToString(), text) + \
                            ((num,) if has_num else ()) + (ts, cts)

            with self._bulk(conn, config):
                conn.executemany(sql, rows())
        else:
            keys = [serialize_entity_key(ek, entity_key_serialization_version=ver)
                    for ek, _, _, _ in data]
            # datetimes are bound as-is: Feast's sqlite3 adapter stores int(ts.timestamp())
            cols: list[tuple[str, list | None]] = [
                ("ts", [to_naive_utc(ts) for _, _, ts, _ in data]),
                ("cts", [to_naive_utc(c) if c is not None else None for _, _, _, c in data]),
            ]
            feats = []
            for fname in fnames:
                protos = [values[fname] for _, values, _, _ in data]
                tn = [extract_text_and_num(v, has_num) for v in protos]
                feats.append((fname, len(cols)))
                cols += [("v", [v.SerializeToString() for v in protos]),
                         ("t", [t for t, _ in tn]),
                         ("n", [x for _, x in tn] if has_num else None)]
            self._write_columns(conn, table, config, keys, cols, feats, has_num)
        if progress:
            progress(len(data))

    # ---- arrow in ------------------------------------------------------------
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
        if self._stock_only(config):
            # (single chunk: _convert_arrow_fv_to_proto only reads to_batches()[0])
            rows = _convert_arrow_to_proto(arrow_table.combine_chunks(), table, join_keys)
            super().online_write_batch(config, table, rows, progress)
            return len(rows)
        if _validate_vector_field_lengths is not None:
            _validate_vector_field_lengths(arrow_table, table)
        conn, _, has_num = self._write_layout(config, table)

        keys = encode_entity_keys(arrow_table, join_keys,
                                  config.entity_key_serialization_version)
        # Sort rows by entity-key bytes here, on the arrow side (one take() instead of
        # permuting every encoded column later); stable, so duplicates keep their order.
        order = np.argsort(np.array(keys), kind="stable")
        if n > 1 and not (order[1:] > order[:-1]).all():
            arrow_table = arrow_table.take(order)
            keys = [keys[i] for i in order.tolist()]
        src = table.batch_source
        cols: list[tuple[str, list | None]] = [
            ("ts", encode_timestamps(arrow_table.column(src.timestamp_field), n)),
            ("cts", encode_timestamps(arrow_table.column(src.created_timestamp_column), n)
             if src.created_timestamp_column else None),
        ]
        feats = []
        for f in table.features:
            vals, texts, nums = encode_feature_column(
                f.dtype.to_value_type(), arrow_table.column(f.name), has_num)
            feats.append((f.name, len(cols)))
            cols += [("v", vals), ("t", texts), ("n", nums if has_num else None)]

        self._write_columns(conn, table, config, keys, cols, feats, has_num, presorted=True)
        if progress:
            progress(n)
        return n

    def _write_columns(self, conn, table, config, keys, cols, feats, has_num, presorted=False):
        """keys: entity-key bytes per entity; cols: [ts, created_ts, (value, text, num)
        per feature] lists aligned with keys (None = all NULL); feats: (name, index of
        its value column in cols)."""
        # Insert in entity-key order (B-tree locality for the PK and _ek indexes).
        # Stable, so duplicates keep their relative order (later row wins).
        order = np.arange(len(keys)) if presorted else np.argsort(np.array(keys), kind="stable")
        if len(order) > 1 and not (order[1:] > order[:-1]).all():
            o = order.tolist()
            keys = [keys[i] for i in o]
            cols = [(kind, None if c is None else [c[i] for i in o]) for kind, c in cols]
        # all-None columns become SQL NULL literals instead of bound parameters
        cols = [(kind, None if c is None or all(v is None for v in c) else c)
                for kind, c in cols]
        self._insert_entities(conn, table, config, keys, cols, feats, has_num)

    # entities per INSERT statement; each contributes len(features) VALUES rows
    ENTITIES_PER_STATEMENT = 64

    def _insert_entities(self, conn, table, config, keys, cols, feats, has_num):
        """Multi-row upsert with numbered parameters: per entity the key and the
        timestamps are bound once and shared by its len(features) VALUES rows."""
        slots: dict[int, int] = {}  # index in cols -> parameter slot within an entity
        bound = [keys]
        for i, (_, c) in enumerate(cols):
            if c is not None:
                bound.append(c)
                slots[i] = len(bound)  # 1-based; slot 1 is the key
        width = len(bound)

        def ref(i, base):
            return f"?{base + slots[i]}" if i in slots else "NULL"

        table_name = _table_id(config.project, table,
                               config.registry.enable_online_feature_view_versioning)
        colnames = ["entity_key", "feature_name", "value", "value_text"] + \
            (["value_num"] if has_num else []) + ["event_ts", "created_ts"]
        upd = ", ".join(f"{c} = excluded.{c}" for c in colnames[2:])
        tail = f" ON CONFLICT(entity_key, feature_name) DO UPDATE SET {upd}"
        if getattr(config.online_store, "skip_older_writes", False):
            tail += " WHERE excluded.event_ts >= event_ts OR event_ts IS NULL"

        def statement(n_ent):
            rows = []
            for e in range(n_ent):
                b = e * width
                for fname, ci in feats:
                    vals = [f"?{b + 1}", "'" + fname.replace("'", "''") + "'",
                            ref(ci, b), ref(ci + 1, b)]
                    if has_num:
                        vals.append(ref(ci + 2, b))
                    vals += [ref(0, b), ref(1, b)]
                    rows.append("(" + ",".join(vals) + ")")
            return (f"INSERT INTO {_quote_id(table_name)} ({', '.join(colnames)}) VALUES "
                    + ",".join(rows) + tail)

        n = len(keys)
        per = max(1, min(self.ENTITIES_PER_STATEMENT, 30000 // width,
                         max(1, 2000 // max(1, len(feats)))))
        flat = list(itertools.chain.from_iterable(zip(*bound, strict=False)))
        full = n // per * per
        step = per * width
        with self._bulk(conn, config):
            if full:
                conn.executemany(statement(per),
                                 (flat[i:i + step] for i in range(0, full * width, step)))
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


def _latest_per_key_numpy(tbl: pa.Table, keys: list[str], sort_cols: list[str]):
    """Row indices of the latest (sort_cols) row per key; ties -> last row in the input.
    None when a column is not a null-free integer/temporal column (pyarrow path then)."""
    cols = [_as_sortable_int64(tbl.column(c)) for c in list(keys) + list(sort_cols)]
    if any(c is None for c in cols):
        return None
    k, s = cols[:len(keys)], cols[len(keys):]
    # np.lexsort is stable; last key is the primary one
    order = np.lexsort(tuple(reversed(s)) + tuple(reversed(k)))
    last = np.ones(len(order), dtype=bool)
    for kc in k:
        ks = kc[order]
        last[:-1] &= ks[1:] == ks[:-1]
    last[:-1] = ~last[:-1]
    return np.sort(order[last])


def _latest_per_key_arrow(tbl: pa.Table, keys: list[str], sort_cols: list[str]):
    """General version of _latest_per_key_numpy (any key types, nulls sort first)."""
    aux = pa.table({**{f"k{i}": tbl.column(k) for i, k in enumerate(keys)},
                    **{f"s{i}": tbl.column(c) for i, c in enumerate(sort_cols)},
                    "__i": pa.array(np.arange(tbl.num_rows, dtype=np.int64))})
    names = [f"s{i}" for i in range(len(sort_cols))] + ["__i"]
    try:  # pyarrow >= 25: per-key null placement
        opts = pc.SortOptions(sort_keys=[(c, "ascending", "at_start") for c in names])
    except (TypeError, ValueError):
        opts = pc.SortOptions(sort_keys=[(c, "ascending") for c in names],
                              null_placement="at_start")
    aux = aux.take(pc.sort_indices(aux, options=opts))
    last = aux.group_by([f"k{i}" for i in range(len(keys))], use_threads=False) \
              .aggregate([("__i", "last")])
    return np.sort(last.column("__i_last").to_numpy())


class ArrowDedupNode(LocalNode):
    """LocalDedupNode without pandas: keep, per join key, the row with the greatest
    (timestamp, created_timestamp) -- the same rule as LocalDedupNode's
    sort_values(desc).drop_duplicates(). Exact ties: the row that comes last in the
    offline store's output (pandas' quicksort leaves that order unspecified)."""

    def __init__(self, name, column_info, inputs=None):
        super().__init__(name, inputs=inputs)
        self.column_info = column_info

    def execute(self, context) -> ArrowTableValue:
        tbl: pa.Table = self.get_single_table(context).data.combine_chunks()
        keys = self.column_info.join_keys_columns
        if keys and tbl.num_rows:
            sort_cols = [self.column_info.timestamp_column]
            cts = self.column_info.created_timestamp_column
            if cts and cts in tbl.column_names:
                sort_cols.append(cts)
            winners = _latest_per_key_numpy(tbl, keys, sort_cols)
            if winners is None:
                winners = _latest_per_key_arrow(tbl, keys, sort_cols)
            tbl = tbl.take(winners)
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
        node = ArrowDedupNode("dedup", self.get_column_info(view), inputs=[input_node])
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
            return LocalMaterializationJob(job_id=job_id,
                                           status=MaterializationJobStatus.SUCCEEDED)
        except Exception as e:
            return LocalMaterializationJob(job_id=job_id,
                                           status=MaterializationJobStatus.ERROR, error=e)
