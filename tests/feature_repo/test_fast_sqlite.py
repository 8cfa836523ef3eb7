"""feature_repo.infra.fast_sqlite against stock Feast.

1. Encoders: the column encoders (fast path for the project's types, Feast's own conversion for any other), the
   entity-key encoder, the timestamp encoder and the dedup rule give exactly what Feast's own code gives (byte for
   byte), on a few hundred random rows per case; what is outside the fast module's scope raises a clear error.
2. End to end: two Feast repos on the same parquet source, one stock (`type: sqlite`, local engine), one
   fast (FastSqliteOnlineStore + FastLocalComputeEngine). After the same materializations,
   get_online_features and the raw sqlite rows must be identical.
"""

from __future__ import annotations

import math
import os
import sqlite3
import time
import zlib
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from feast import Entity, FeatureStore, FeatureView, Field, FileSource
from feast.infra.key_encoding_utils import serialize_entity_key
from feast.infra.online_stores.helpers import extract_text_and_num
from feast.infra.online_stores.sqlite import SqliteOnlineStore, adapt_datetime_epoch
from feast.protos.feast.types.EntityKey_pb2 import EntityKey
from feast.protos.feast.types.Value_pb2 import Value
from feast.repo_config import RepoConfig
from feast.type_map import python_values_to_proto_values
from feast.types import Array, Float64, Int64, String, UnixTimestamp
from feast.utils import _coerce_datetime, to_naive_utc
from feast.value_type import ValueType

import feature_repo.infra.fast_sqlite as fs

N_ROWS = 300
SEED = 20240101


def _rng(*salt) -> np.random.Generator:
    return np.random.default_rng([SEED, *(zlib.crc32(str(s).encode()) for s in salt)])


# =====================================================================================================
# 1. Encoders, byte for byte against Feast
# =====================================================================================================
INT_TYPES = {"int8": pa.int8(), "int16": pa.int16(), "int32": pa.int32(), "int64": pa.int64(),
             "uint8": pa.uint8(), "uint16": pa.uint16(), "uint32": pa.uint32()}


def _ints(rng: np.random.Generator, typ: pa.DataType, n: int, limit: int | None = None) -> np.ndarray:
    """Random integers over the whole range of `typ` (or within ±limit), extremes and 0/±1 up front."""
    dt = np.dtype(typ.to_pandas_dtype())
    info = np.iinfo(dt)
    lo, hi = (info.min, info.max) if limit is None else (max(info.min, -limit), min(info.max, limit))
    x = rng.integers(lo, hi, n, dtype=dt, endpoint=True)
    special = [v for v in (0, 1, -1, 127, 128, 2**53 + 1, -(2**31), lo, hi) if lo <= v <= hi]
    x[: len(special)] = special
    return x


def _mask(rng: np.random.Generator, n: int, p: float = 0.1) -> np.ndarray:
    return rng.random(n) < p


def _strings(rng: np.random.Generator, n: int) -> list[str]:
    alphabet = ["a", "Z", "é", "✓", "😀", " ", "'", "\x00", "漢"]
    out = ["", "a", "héllo ✓", "x" * 300]
    out += ["".join(rng.choice(alphabet, int(k))) for k in rng.integers(0, 12, n - len(out))]
    return out


def _list_array(rng: np.random.Generator, n: int, child: pa.Array | np.ndarray, p_null=0.1, p_empty=0.1,
                maxlen=20, large=False) -> pa.Array:
    """n lists (some null, some empty) whose children are the first values of `child`."""
    lens = rng.integers(0, maxlen, n)
    lens[rng.random(n) < p_empty] = 0
    off = np.concatenate([[0], np.cumsum(lens)]).astype(np.int64 if large else np.int32)
    cls = pa.LargeListArray if large else pa.ListArray
    return cls.from_arrays(pa.array(off), pa.array(child[: int(off[-1])]), mask=pa.array(_mask(rng, n, p_null)))


def _scalar_cases():
    """(id, ValueType, array factory, fast path expected)"""
    n = N_ROWS
    # With nulls, stock Feast sees the column as float64 (to_numpy), so it is only exact up to 2**53 (and
    # raises beyond 2**63 - 1): compare there. The fast path is exact everywhere, see test_large_int64_is_exact.
    yield ("INT64<-int64", ValueType.INT64,
           lambda r: pa.array(_ints(r, pa.int64(), n, limit=2**53), mask=_mask(r, n)), True)
    yield "INT64<-int64 no nulls", ValueType.INT64, lambda r: pa.array(_ints(r, pa.int64(), n)), True
    yield "INT64<-int64 sliced", ValueType.INT64, lambda r: pa.array(_ints(r, pa.int64(), n)).slice(37, 200), True

    def doubles(r):
        d = r.normal(size=n) * 10.0 ** r.integers(-300, 300, n)
        d[:7] = [0.0, -0.0, np.inf, -np.inf, np.nan, 5e-324, 1e-310]
        d[r.random(n) < 0.05] = np.nan
        return pa.array(d, mask=_mask(r, n))

    yield "DOUBLE<-float64 (nan, inf, -0, subnormal, nulls)", ValueType.DOUBLE, doubles, True
    yield "DOUBLE all null", ValueType.DOUBLE, lambda r: pa.array([None] * 10, type=pa.float64()), True
    yield "STRING<-string", ValueType.STRING, lambda r: pa.array(_strings(r, n), mask=_mask(r, n)), True
    yield ("STRING<-large_string", ValueType.STRING,
           lambda r: pa.array(_strings(r, n), type=pa.large_string(), mask=_mask(r, n)), True)
    yield ("STRING<-string sliced", ValueType.STRING,
           lambda r: pa.array(_strings(r, n), mask=_mask(r, n)).slice(37, 200), True)

    def string_null_slot_with_bytes(r):  # legal in Arrow: a null slot that still spans data bytes
        sa = pa.array(["aa", "bbb", "c", "dddd"])
        validity = pa.py_buffer(np.packbits([1, 0, 1, 1], bitorder="little").tobytes())
        return pa.Array.from_buffers(pa.string(), 4, [validity, *sa.buffers()[1:]])

    yield "STRING null slot owning bytes", ValueType.STRING, string_null_slot_with_bytes, True
    # not on the fast path: must fall back to Feast's own conversion
    for name, typ in INT_TYPES.items():
        if name != "int64":
            yield (f"INT64<-{name} (fallback)", ValueType.INT64,
                   lambda r, t=typ: pa.array(_ints(r, t, n), type=t, mask=_mask(r, n)), False)
    yield ("INT32<-int32 (fallback)", ValueType.INT32,
           lambda r: pa.array(_ints(r, pa.int32(), n), mask=_mask(r, n)), False)
    yield ("FLOAT<-float32 (fallback)", ValueType.FLOAT,
           lambda r: pa.array((r.normal(size=n) * 1e3).astype(np.float32), mask=_mask(r, n)), False)
    yield "BOOL<-bool (fallback)", ValueType.BOOL, lambda r: pa.array(r.random(n) < 0.5, mask=_mask(r, n)), False
    yield ("BYTES<-binary (fallback)", ValueType.BYTES,
           lambda r: pa.array([s.encode() for s in _strings(r, n)], mask=_mask(r, n)), False)
    yield ("BYTES without a non-empty value (fallback)", ValueType.BYTES,
           lambda r: pa.array([b"", None, b""], pa.binary()), False)
    yield ("STRING_LIST (fallback)", ValueType.STRING_LIST,
           lambda r: pa.array([["a", "é"], None, [], ["x" * 40]] * 5), False)
    yield "INT64<-float64 (fallback)", ValueType.INT64, lambda r: pa.array([1.0, None, 3.0] * 5), False
    yield ("UNIX_TIMESTAMP (fallback)", ValueType.UNIX_TIMESTAMP,
           lambda r: pa.array([datetime(2024, 1, 1, 12, 30), None] * 5, type=pa.timestamp("us")), False)


def _list_cases():
    n = N_ROWS
    for large in (False, True):
        kind = "large_list" if large else "list"
        yield (f"INT64_LIST<-{kind}<int64>", ValueType.INT64_LIST,
               lambda r, lg=large: _list_array(r, n, pa.array(_ints(r, pa.int64(), 20 * n)), large=lg), True)

    def dbl(r):
        x = r.normal(size=20 * n) * 10.0 ** r.integers(-30, 30, 20 * n)
        x[r.random(20 * n) < 0.05] = np.nan
        x[:4] = [np.inf, -np.inf, -0.0, 5e-324]
        return x

    for large in (False, True):
        kind = "large_list" if large else "list"
        yield (f"DOUBLE_LIST<-{kind}<float64> (nan inside)", ValueType.DOUBLE_LIST,
               lambda r, lg=large: _list_array(r, n, dbl(r), large=lg), True)
    yield ("INT64_LIST sliced", ValueType.INT64_LIST,
           lambda r: _list_array(r, n, r.integers(-(2**62), 2**62, 20 * n)).slice(17, 150), True)
    yield ("INT64_LIST all null", ValueType.INT64_LIST,
           lambda r: pa.array([None] * 10, type=pa.list_(pa.int64())), True)
    yield ("DOUBLE_LIST all empty", ValueType.DOUBLE_LIST,
           lambda r: pa.array([[]] * 10, type=pa.list_(pa.float64())), True)

    def null_slot_with_children(child_type):
        def make(r):
            la = pa.array([[1, 2], [3, 4, 5], [], [6]], type=pa.list_(pa.int64()))
            validity = pa.py_buffer(np.packbits([1, 0, 1, 1], bitorder="little").tobytes())
            arr = pa.Array.from_buffers(la.type, 4, [validity, la.buffers()[1]], children=[la.values])
            return arr.cast(pa.list_(child_type))
        return make

    yield "INT64_LIST null slot owning children", ValueType.INT64_LIST, null_slot_with_children(pa.int64()), True
    yield "DOUBLE_LIST null slot owning children", ValueType.DOUBLE_LIST, null_slot_with_children(pa.float64()), True
    # not on the fast path
    yield ("INT64_LIST<-list<int32> (fallback)", ValueType.INT64_LIST,
           lambda r: _list_array(r, n, pa.array(_ints(r, pa.int32(), 20 * n))), False)
    yield ("FLOAT_LIST<-list<float32> (fallback)", ValueType.FLOAT_LIST,
           lambda r: _list_array(r, n, dbl(r).astype(np.float32)), False)


ENCODER_CASES = list(_scalar_cases()) + list(_list_cases())


def _feast_column(vt: ValueType, arr: pa.Array):
    """What stock Feast stores for one column: _columns_to_proto_values + SqliteOnlineStore.online_write_batch."""
    protos = python_values_to_proto_values(arr.to_numpy(zero_copy_only=False), vt)
    return [p.SerializeToString() for p in protos], [extract_text_and_num(p, False)[0] for p in protos]


@pytest.mark.parametrize("case", ENCODER_CASES, ids=[c[0] for c in ENCODER_CASES])
def test_feature_column_encoding_is_feasts(case, monkeypatch):
    name, vt, make, fast = case
    arr = make(_rng(name))
    fallback_calls = []
    original = fs._encode_column_fallback
    monkeypatch.setattr(fs, "_encode_column_fallback", lambda *a: fallback_calls.append(1) or original(*a))

    values, texts = fs.encode_feature_column(vt, arr)
    assert bool(fallback_calls) is not fast, "fast path expected" if fast else "Feast fallback expected"

    exp_values, exp_texts = _feast_column(vt, arr)
    assert len(values) == len(texts) == len(arr)
    for i, (got, exp) in enumerate(zip(values, exp_values, strict=True)):
        assert type(got) is bytes and got == exp, (i, arr[i], got, exp)
    assert texts == exp_texts


def test_feature_column_encoding_accepts_chunked_arrays():
    r = _rng("chunked")
    chunks = [pa.array(_ints(r, pa.int64(), 50, limit=2**53), mask=_mask(r, 50)) for _ in range(3)]
    got = fs.encode_feature_column(ValueType.INT64, pa.chunked_array(chunks))
    assert got == fs.encode_feature_column(ValueType.INT64, pa.concat_arrays(chunks))
    assert got[0] == _feast_column(ValueType.INT64, pa.concat_arrays(chunks))[0]


# ---- entity keys ------------------------------------------------------------------------------------
def _key_table(r: np.random.Generator, n: int) -> pa.Table:
    cols = {f"k_{name}": pa.array(_ints(r, typ, n), type=typ) for name, typ in INT_TYPES.items()}
    strs = _strings(r, n)
    cols["k_string"] = pa.array(strs)
    cols["k_large_string"] = pa.array(strs, type=pa.large_string())
    cols["k_bytes"] = pa.array([s.encode() for s in strs])
    return pa.table(cols)


KEY_CASES = (
    # the project's keys (user_id, pin_id): INT64 in int64 columns, on the fast path
    [({"k_int64": ValueType.INT64}, True), ({"k_uint32": ValueType.INT64, "k_int64": ValueType.INT64}, False)]
    # anything else goes through Feast's own value serializer
    + [({f"k_{name}": ValueType.INT64}, False) for name in INT_TYPES if name != "int64"]
    + [({"k_int32": ValueType.INT32}, False), ({"k_string": ValueType.STRING}, False),
       ({"k_large_string": ValueType.STRING}, False), ({"k_bytes": ValueType.BYTES}, False)]
    + [
        # several join keys, deliberately not in sorted order
        ({"k_string": ValueType.STRING, "k_int64": ValueType.INT64}, False),
        ({"k_uint16": ValueType.INT32, "k_large_string": ValueType.STRING, "k_int8": ValueType.INT64}, False),
        ({"k_bytes": ValueType.BYTES, "k_int32": ValueType.INT32}, False),
    ]
)


@pytest.mark.parametrize("case", KEY_CASES, ids=["+".join(k) for k, _ in KEY_CASES])
def test_entity_keys_are_feasts(case, monkeypatch):
    join_keys, fast = case
    table = _key_table(_rng("keys"), N_ROWS)
    # two chunks, like an offline-store result
    table = pa.concat_tables([table.slice(0, 100), table.slice(100)])
    fallback_calls = []
    original = fs._key_part_fallback
    monkeypatch.setattr(fs, "_key_part_fallback", lambda *a: fallback_calls.append(1) or original(*a))
    got = fs.encode_entity_keys(table, join_keys, 3)
    assert bool(fallback_calls) is not fast, "fast path expected" if fast else "Feast fallback expected"
    # Feast's path: _columns_to_proto_values + _build_entity_keys + serialize_entity_key(v3)
    protos = {k: python_values_to_proto_values(table.column(k).to_numpy(zero_copy_only=False), vt)
              for k, vt in join_keys.items()}
    exp = [serialize_entity_key(EntityKey(join_keys=list(join_keys), entity_values=[protos[k][i] for k in join_keys]),
                                entity_key_serialization_version=3)
           for i in range(table.num_rows)]
    assert len(got) == len(exp)
    for i, (g, e) in enumerate(zip(got, exp, strict=True)):
        assert g == e, (i, table.slice(i, 1).to_pylist(), g, e)


def test_entity_key_serialization_version_other_than_3_is_refused():
    table = pa.table({"user_id": pa.array([1, 2, 3], pa.int64())})
    with pytest.raises(ValueError, match="entity_key_serialization_version: 2"):
        fs.encode_entity_keys(table, {"user_id": ValueType.INT64}, 2)


# ---- timestamps -------------------------------------------------------------------------------------
@contextmanager
def _local_timezone(tz: str):
    old = os.environ.get("TZ")
    os.environ["TZ"] = tz
    time.tzset()
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("TZ", None)
        else:
            os.environ["TZ"] = old
        time.tzset()


UNIT_SCALE = {"s": 1, "ms": 10**3, "us": 10**6, "ns": 10**9}


@pytest.mark.filterwarnings("ignore:Discarding nonzero nanoseconds")
@pytest.mark.parametrize("local_tz", ["UTC", "America/New_York"])
@pytest.mark.parametrize("tz", [None, "UTC", "Asia/Kolkata"])
@pytest.mark.parametrize("unit", list(UNIT_SCALE))
def test_timestamps_are_what_feast_stores(unit, tz, local_tz):
    r = _rng("ts", unit, tz)
    scale = UNIT_SCALE[unit]
    # 1938 .. 2033, negative epochs with sub-second parts included (truncation toward zero)
    raw = r.integers(-(10**9), 2 * 10**9, N_ROWS) * scale + r.integers(0, scale, N_ROWS)
    raw[:4] = [0, -1, 1, -scale]
    arr = pa.array(raw, type=pa.timestamp(unit, tz=tz))
    with _local_timezone(local_tz):
        got = fs.encode_timestamps(pa.chunked_array([arr[:100], arr[100:]]), N_ROWS)
        # _convert_arrow_fv_to_proto -> online_write_batch (to_naive_utc) -> sqlite3 adapter
        exp = [adapt_datetime_epoch(to_naive_utc(_coerce_datetime(v)))
               for v in pd.to_datetime(arr.to_numpy(zero_copy_only=False))]
    assert got == exp
    assert fs.encode_timestamps(None, 3) == [None, None, None]


@pytest.mark.xfail(strict=True, reason="known divergence: _local_is_utc() only probes 1990 and 2024, so in a zone "
                   "that is UTC today but was not earlier (Africa/Monrovia until 1972) the integer fast path stores "
                   "true epochs where Feast's adapter stores the naive UTC value read as local time")
def test_timestamps_in_a_zone_that_was_not_always_utc():
    arr = pa.array([0, -(10**15)], type=pa.timestamp("us", tz="UTC"))  # 1970-01-01, 1938-04-24
    with _local_timezone("Africa/Monrovia"):
        got = fs.encode_timestamps(pa.chunked_array([arr]), 2)
        exp = [adapt_datetime_epoch(to_naive_utc(_coerce_datetime(v)))
               for v in pd.to_datetime(arr.to_numpy(zero_copy_only=False))]
    assert got == exp


# ---- dedup ------------------------------------------------------------------------------------------
def _dedup_table(r: np.random.Generator, m: int = 2000) -> pa.Table:
    ts = r.integers(0, 10**4, m) * 10**6
    ts[np.arange(m) % 3 == 0] = 0  # many event_ts ties: the created timestamp decides
    return pa.table({"k1": r.integers(0, 300, m), "k2": pa.array(r.integers(0, 3, m), pa.int32()),
                     "ts": pa.array(ts, pa.timestamp("us", tz="UTC")),
                     "cr": pa.array(r.permutation(m), pa.timestamp("us"))})


@pytest.mark.parametrize("keys", [["k1"], ["k1", "k2"]])
def test_dedup_matches_stock_rule(keys):
    tbl = _dedup_table(_rng("dedup"))
    got = fs._latest_per_key(tbl, keys, ["ts", "cr"], "v")
    # LocalDedupNode: sort_values([ts, created], ascending=False).drop_duplicates(join keys)
    df = tbl.to_pandas()
    exp = np.sort(df.sort_values(by=["ts", "cr"], ascending=False).drop_duplicates(subset=keys).index.to_numpy())
    assert got.tolist() == exp.tolist()


def test_dedup_exact_ties_keep_the_last_row():
    tie = pa.table({"k": [1, 1, 2, 2], "ts": pa.array([5, 5, 1, 1], pa.timestamp("s"))})
    assert list(fs._latest_per_key(tie, ["k"], ["ts"], "v")) == [1, 3]


@pytest.mark.parametrize("table, bad", [
    (pa.table({"k": ["a", "b", "a"], "ts": pa.array([1, 2, 3], pa.timestamp("s"))}), "k (string)"),
    (pa.table({"k": [1.0, 2.0, 1.0], "ts": pa.array([1, 2, 3], pa.timestamp("s"))}), "k (double)"),
    (pa.table({"k": [1, None, 1], "ts": pa.array([1, 2, 3], pa.timestamp("s"))}), "k (int64, with nulls)"),
    (pa.table({"k": [1, 2, 1], "ts": pa.array([1, 2, None], pa.timestamp("s"))}), "ts (timestamp[s], with nulls)"),
], ids=["string key", "float key", "null key", "null timestamp"])
def test_dedup_refuses_non_integer_keys_and_null_timestamps(table, bad):
    with pytest.raises(ValueError, match=r"integer join keys and timestamps only; feature view 'my_view' has ") as e:
        fs._latest_per_key(table, ["k"], ["ts"], "my_view")
    assert bad in str(e.value)


# =====================================================================================================
# 2. End to end: stock vs fast Feast repos on the same parquet source
# =====================================================================================================
N_USERS = 120
ROWS_PER_USER = 4
UNKNOWN_USER = 10**6
START = datetime(2023, 12, 1, tzinfo=UTC)
MIDDLE = datetime(2024, 2, 1, tzinfo=UTC)
END = datetime(2024, 3, 15, tzinfo=UTC)
FEATURES = ["ev:cnt", "ev:score", "ev:name", "ev:seq", "ev:vec", "ev:at"]


def _make_events() -> pa.Table:
    r = _rng("events")
    n = N_USERS * ROWS_PER_USER
    uid = np.repeat(np.arange(N_USERS, dtype=np.int64), ROWS_PER_USER)
    t0 = np.datetime64("2024-01-01T00:00:00", "us").astype(np.int64)
    ts = t0 + r.integers(0, 50 * 86400 * 10**6, n)
    # every 5th user: its two newest rows share the event timestamp, the created timestamp decides
    per_user = ts.reshape(N_USERS, ROWS_PER_USER)
    tie_users = np.arange(N_USERS) % 5 == 0
    latest = t0 + 55 * 86400 * 10**6 + r.integers(0, 86400 * 10**6, N_USERS)
    per_user[tie_users, 0] = per_user[tie_users, 1] = latest[tie_users]
    created = ts + r.choice(10**9, n, replace=False)  # unique: no exact (event_ts, created_ts) ties
    seq = _list_array(r, n, r.integers(-(2**40), 2**40, 20 * n), p_null=0.1, p_empty=0.1)
    vec_vals = r.normal(size=20 * n)
    vec_vals[r.random(20 * n) < 0.03] = np.nan
    vec = _list_array(r, n, vec_vals, p_null=0.1, p_empty=0.1, maxlen=8)
    score = r.normal(size=n)
    score[r.random(n) < 0.05] = np.nan
    table = pa.table({
        "user_id": uid,
        "event_timestamp": pa.array(ts, pa.timestamp("us", tz="UTC")),
        "created": pa.array(created, pa.timestamp("us", tz="UTC")),
        "cnt": pa.array(r.integers(0, 100, n), mask=_mask(r, n)),
        "score": pa.array(score, mask=_mask(r, n, 0.05)),
        "name": pa.array([f"row{i}-é✓" for i in range(n)], mask=_mask(r, n, 0.05)),
        "seq": seq,
        "vec": vec,
        "big": pa.array(r.integers(2**60, 2**62, n), mask=_mask(r, n, 0.1)),
        "at": pa.array(t0 - r.integers(0, 400 * 86400 * 10**6, n), pa.timestamp("us", tz="UTC"), mask=_mask(r, n)),
    })
    return table.take(pa.array(r.permutation(n)))


@pytest.fixture(scope="module")
def events(tmp_path_factory):
    table = _make_events()
    path = tmp_path_factory.mktemp("source") / "events.parquet"
    pq.write_table(table, path)
    return path, table


def _objects(parquet_path):
    user = Entity(name="user", join_keys=["user_id"])
    src = FileSource(name="ev_src", path=str(parquet_path), timestamp_field="event_timestamp",
                     created_timestamp_column="created")
    ev = FeatureView(name="ev", entities=[user], ttl=timedelta(days=120), source=src, schema=[
        Field(name="user_id", dtype=Int64), Field(name="cnt", dtype=Int64), Field(name="score", dtype=Float64),
        Field(name="name", dtype=String), Field(name="seq", dtype=Array(Int64)),
        Field(name="vec", dtype=Array(Float64)), Field(name="at", dtype=UnixTimestamp)])
    big = FeatureView(name="ev_big", entities=[user], ttl=timedelta(days=120), source=src,
                      schema=[Field(name="user_id", dtype=Int64), Field(name="big", dtype=Int64)])
    return [user, src, ev, big]


def _store(root, kind: str, parquet_path, online: dict | None = None, write_batch_size: int | None = None):
    root.mkdir(parents=True)
    online_type = "sqlite" if kind == "stock" else "feature_repo.infra.fast_sqlite.FastSqliteOnlineStore"
    raw = {
        "project": "ev", "provider": "local", "registry": str(root / "registry.db"),
        "offline_store": {"type": "duckdb"},
        "online_store": {"type": online_type, "path": str(root / "online.db"), **(online or {})},
        "entity_key_serialization_version": 3,
    }
    if kind == "fast":
        raw["batch_engine"] = {"type": "feature_repo.infra.fast_sqlite.FastLocalComputeEngine"}
    if write_batch_size:
        raw["materialization"] = {"online_write_batch_size": write_batch_size}
    config = RepoConfig(**raw)
    config.repo_path = root
    store = FeatureStore(config=config)
    store.apply(_objects(parquet_path))
    provider = store._get_provider()
    is_fast = kind == "fast"
    assert isinstance(provider.online_store, fs.FastSqliteOnlineStore) is is_fast
    assert isinstance(provider.batch_engine, fs.FastLocalComputeEngine) is is_fast
    return store


@pytest.fixture
def arrow_writes(monkeypatch):
    """Rows per FastSqliteOnlineStore.online_write_arrow call; fails the test if a column of the e2e data set other
    than the UnixTimestamp one falls back to Feast's per-value conversion (the fast encoders must be the ones compared
    with stock)."""
    calls: list[int] = []
    write = fs.FastSqliteOnlineStore.online_write_arrow

    def spy(self, config, table, arrow_table, *args, **kwargs):
        calls.append(arrow_table.num_rows)
        return write(self, config, table, arrow_table, *args, **kwargs)

    fallback = fs._encode_column_fallback

    def no_fallback(vt, arr):
        if vt != ValueType.UNIX_TIMESTAMP:  # not on the fast path by design
            raise AssertionError(f"{vt} / {arr.type} is not on the fast path")
        return fallback(vt, arr)

    monkeypatch.setattr(fs.FastSqliteOnlineStore, "online_write_arrow", spy)
    monkeypatch.setattr(fs, "_encode_column_fallback", no_fallback)
    return calls


def _pair(tmp_path, events, **kw):
    return _store(tmp_path / "stock", "stock", events[0], **kw), _store(tmp_path / "fast", "fast", events[0], **kw)


def _normalize(x):
    """NaN-safe, comparable form of an online value (NaN != NaN, also inside lists)."""
    if isinstance(x, float) and math.isnan(x):
        return "NaN"
    if isinstance(x, list | tuple):
        return [_normalize(v) for v in x]
    return x


def _online(store, features=FEATURES) -> dict:
    rows = [{"user_id": i} for i in range(N_USERS)] + [{"user_id": UNKNOWN_USER}]
    resp = store.get_online_features(features=features, entity_rows=rows)
    out = {k: _normalize(v) for k, v in resp.to_dict().items()}
    names = list(resp.proto.metadata.feature_names.val)
    for name, res in zip(names, resp.proto.results, strict=True):
        out[f"{name}.__status"] = list(res.statuses)
        out[f"{name}.__ts"] = [(t.seconds, t.nanos) for t in res.event_timestamps]
    return out


def _raw(store, table="ev_ev", extra="") -> list[tuple]:
    db = store.config.online_store.path
    with sqlite3.connect(db) as conn:
        return conn.execute(
            f"SELECT entity_key, feature_name, value, value_text, event_ts, created_ts{extra} FROM {table} "
            "ORDER BY entity_key, feature_name").fetchall()


def _assert_same(stock, fast, features=FEATURES, table="ev_ev", extra=""):
    a, b = _online(stock, features), _online(fast, features)
    assert a.keys() == b.keys()
    for k in a:
        diff = [i for i, (x, y) in enumerate(zip(a[k], b[k], strict=True)) if x != y]
        assert not diff, (k, [(i, a[k][i], b[k][i]) for i in diff[:5]])
    rows_stock, rows_fast = _raw(stock, table, extra), _raw(fast, table, extra)
    assert rows_stock, "nothing was materialized"
    assert len(rows_stock) == len(rows_fast)
    for x, y in zip(rows_stock, rows_fast, strict=True):
        assert _normalize(list(x)) == _normalize(list(y)), (x, y)
    return b


def _epoch(ts) -> int:
    """What SqliteOnlineStore stores for a timestamp (its adapter reads the naive UTC value as local time)."""
    return adapt_datetime_epoch(to_naive_utc(pd.Timestamp(ts).to_pydatetime()))


def _oracle(table: pa.Table) -> pd.DataFrame:
    """Latest row per user by (event_timestamp, created), int64 kept exact."""
    df = table.to_pandas(types_mapper={pa.int64(): pd.Int64Dtype()}.get)
    return df.sort_values(["user_id", "event_timestamp", "created"]).drop_duplicates("user_id", keep="last") \
        .set_index("user_id")


def _stored_ts(store) -> dict[int, tuple[int, int]]:
    """user_id -> (event_ts, created_ts) as stored for feature `name`."""
    with sqlite3.connect(store.config.online_store.path) as conn:
        rows = conn.execute("SELECT entity_key, event_ts, created_ts FROM ev_ev WHERE feature_name = 'name'").fetchall()
    key_of = {serialize_entity_key(EntityKey(join_keys=["user_id"], entity_values=[Value(int64_val=u)]), 3): u
              for u in range(N_USERS)}
    return {key_of[k]: (e, c) for k, e, c in rows}


@pytest.mark.parametrize("local_tz", ["UTC", "America/New_York"])
def test_materialize_then_incremental_same_as_stock(tmp_path, events, local_tz, arrow_writes):
    with _local_timezone(local_tz):
        stock, fast = _pair(tmp_path, events)
        for st in (stock, fast):
            st.materialize(START, MIDDLE, feature_views=["ev"])
        _assert_same(stock, fast)
        first = _stored_ts(fast)
        for st in (stock, fast):
            st.materialize_incremental(END, feature_views=["ev"])
        got = _assert_same(stock, fast)
        stored = _stored_ts(fast)
        expected = {u: (_epoch(row.event_timestamp), _epoch(row.created)) for u, row in _oracle(events[1]).iterrows()}
    assert len(arrow_writes) == 2 and min(arrow_writes) > 0, "both runs must go through online_write_arrow"
    assert first != stored and len(stored) >= len(first), "the incremental run must update and add entities"

    # and both hold the latest row per user, ties broken by the created timestamp
    oracle = _oracle(events[1])
    assert got["name"][:N_USERS] == [None if pd.isna(v) else v for v in oracle.name.reindex(range(N_USERS))]
    assert got["cnt"][:N_USERS] == [None if pd.isna(v) else int(v) for v in oracle.cnt.reindex(range(N_USERS))]
    assert sum(v is not None for v in got["at"][:N_USERS]) > N_USERS // 2, "the UnixTimestamp feature must be stored"
    assert stored == expected
    ties = events[1].to_pandas().groupby("user_id").event_timestamp.agg(lambda s: (s == s.max()).sum() > 1)
    assert ties.sum() >= N_USERS // 5, "the data must exercise the created-timestamp tie-break"
    # the unknown entity: all features missing
    assert all(got[f.split(":")[1]][-1] is None for f in FEATURES)


def test_older_window_after_newer_same_as_stock(tmp_path, events, arrow_writes):
    """Stock semantics: the last write wins, even when it is older."""
    stock, fast = _pair(tmp_path, events)
    for st in (stock, fast):
        st.materialize(MIDDLE, END, feature_views=["ev"])
        st.materialize(START, MIDDLE, feature_views=["ev"])
    _assert_same(stock, fast)
    newest = _oracle(events[1])
    stored = _stored_ts(fast)
    stale = [u for u, (e, _) in stored.items() if e < _epoch(newest.event_timestamp[u])]
    assert stale, "some users must hold a row older than their newest one"


def test_batched_materialize_same_as_stock(tmp_path, events, arrow_writes):
    stock, fast = _pair(tmp_path, events, write_batch_size=100)
    for st in (stock, fast):
        st.materialize(START, END, feature_views=["ev"])  # arrow, in batches of 100 rows
    _assert_same(stock, fast)
    assert len(arrow_writes) == 2 and sum(arrow_writes) == N_USERS and max(arrow_writes) == 100


def test_only_the_arrow_write_path_and_connection_handling_are_added():
    """push / write_to_online_store, update and plan are stock SqliteOnlineStore's; reads are stock too, wrapped
    only to drop a connection that failed (per-thread connections, a bounded lock wait)."""
    for name in ("online_write_batch", "update", "plan"):
        assert getattr(fs.FastSqliteOnlineStore, name) is getattr(SqliteOnlineStore, name), name
    assert set(vars(fs.FastSqliteOnlineStore)) - set(vars(SqliteOnlineStore)) >= {"online_write_arrow", "_drop_conn"}


def test_each_thread_reads_through_its_own_connection_and_a_failed_one_is_reopened(tmp_path, events):
    import threading

    fast = _store(tmp_path / "fast", "fast", events[0])
    fast.materialize(START, END, feature_views=["ev"])
    store = fast._get_provider().online_store
    conns = {}

    def read(name):
        _online(fast, ["ev:cnt"])
        conns[name] = store._get_conn(fast.config)

    threads = [threading.Thread(target=read, args=(i,)) for i in range(2)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert conns[0] is not conns[1]
    before = store._get_conn(fast.config)
    store._drop_conn()
    assert store._get_conn(fast.config) is not before


def test_bulk_write_pragmas_are_restored():
    conn = sqlite3.connect(":memory:")
    before = [conn.execute(f"PRAGMA {p}").fetchone()[0] for p in ("synchronous", "cache_size")]
    with fs._bulk(conn):
        assert [conn.execute(f"PRAGMA {p}").fetchone()[0] for p in ("synchronous", "cache_size")] == [0, -256 * 1024]
    assert [conn.execute(f"PRAGMA {p}").fetchone()[0] for p in ("synchronous", "cache_size")] == before


def test_value_num_store_is_refused(tmp_path, events):
    fast = _store(tmp_path / "fast", "fast", events[0], online={"enable_openai_compatible_store": True})
    with pytest.raises(ValueError, match="enable_openai_compatible_store"):
        fast.materialize(START, END, feature_views=["ev"])


def test_large_int64_is_exact(tmp_path, events):
    """Stock rounds int64 columns with nulls through float64; the fast path must keep every bit."""
    fast = _store(tmp_path / "fast", "fast", events[0])
    fast.materialize(START, END, feature_views=["ev_big"])
    got = _online(fast, ["ev_big:big"])["big"][:N_USERS]
    oracle = _oracle(events[1]).big.reindex(range(N_USERS))
    assert got == [None if pd.isna(v) else int(v) for v in oracle]
