"""training.fast_sqlite against stock Feast.

1. Encoders: every column encoder, the entity-key encoder, the timestamp encoder and the dedup rule give
   exactly what Feast's own code gives (byte for byte), on a few hundred random rows per case.
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
from feast.infra.online_stores.sqlite import adapt_datetime_epoch
from feast.protos.feast.types.EntityKey_pb2 import EntityKey
from feast.protos.feast.types.Value_pb2 import Value
from feast.repo_config import RepoConfig
from feast.type_map import python_values_to_proto_values
from feast.types import Array, Float64, Int64, String
from feast.utils import _coerce_datetime, to_naive_utc
from feast.value_type import ValueType

import training.fast_sqlite as fs

N_ROWS = 300
SEED = 20240101


def _rng(*salt) -> np.random.Generator:
    return np.random.default_rng([SEED, *(zlib.crc32(str(s).encode()) for s in salt)])


# =====================================================================================================
# 1. Encoders, byte for byte against Feast
# =====================================================================================================
INT_TYPES = {"int8": pa.int8(), "int16": pa.int16(), "int32": pa.int32(), "int64": pa.int64(),
             "uint8": pa.uint8(), "uint16": pa.uint16(), "uint32": pa.uint32()}
INT32_OK = ("int8", "int16", "int32", "uint8", "uint16")  # arrow types FastSqlite encodes as INT32 itself


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
    for name, typ in INT_TYPES.items():
        # With nulls, stock Feast sees the column as float64 (to_numpy), so it is only exact up to 2**53 (and
        # raises beyond 2**63 - 1): compare there. The fast path is exact everywhere, see test_large_int64_is_exact.
        yield (f"INT64<-{name}", ValueType.INT64,
               lambda r, t=typ: pa.array(_ints(r, t, n, limit=2**53), type=t, mask=_mask(r, n)), True)
        yield (f"INT64<-{name} no nulls", ValueType.INT64, lambda r, t=typ: pa.array(_ints(r, t, n), type=t), True)
        if name in INT32_OK:
            yield (f"INT32<-{name}", ValueType.INT32,
                   lambda r, t=typ: pa.array(_ints(r, t, n), type=t, mask=_mask(r, n)), True)
            yield (f"INT32<-{name} no nulls", ValueType.INT32, lambda r, t=typ: pa.array(_ints(r, t, n), type=t), True)

    def doubles(r):
        d = r.normal(size=n) * 10.0 ** r.integers(-300, 300, n)
        d[:7] = [0.0, -0.0, np.inf, -np.inf, np.nan, 5e-324, 1e-310]
        d[r.random(n) < 0.05] = np.nan
        return pa.array(d, mask=_mask(r, n))

    def floats(r):
        f = (r.normal(size=n) * 1e3).astype(np.float32)
        f[:5] = [np.nan, np.inf, -np.inf, -0.0, np.float32(1e-45)]
        return pa.array(f, mask=_mask(r, n))

    yield "DOUBLE<-float64 (nan, inf, -0, subnormal, nulls)", ValueType.DOUBLE, doubles, True
    yield "FLOAT<-float32 (nan, inf, -0, nulls)", ValueType.FLOAT, floats, True
    yield "DOUBLE all null", ValueType.DOUBLE, lambda r: pa.array([None] * 10, type=pa.float64()), True
    yield "BOOL<-bool", ValueType.BOOL, lambda r: pa.array(r.random(n) < 0.5, mask=_mask(r, n)), True
    yield "BOOL<-bool no nulls", ValueType.BOOL, lambda r: pa.array(r.random(n) < 0.5), True
    yield "STRING<-string", ValueType.STRING, lambda r: pa.array(_strings(r, n), mask=_mask(r, n)), True
    yield ("STRING<-large_string", ValueType.STRING,
           lambda r: pa.array(_strings(r, n), type=pa.large_string(), mask=_mask(r, n)), True)
    yield ("STRING<-string sliced", ValueType.STRING,
           lambda r: pa.array(_strings(r, n), mask=_mask(r, n)).slice(37, 200), True)
    yield ("BYTES<-binary", ValueType.BYTES,
           lambda r: pa.array([s.encode() for s in _strings(r, n)], mask=_mask(r, n)), True)
    yield ("BYTES<-large_binary", ValueType.BYTES,
           lambda r: pa.array([s.encode() for s in _strings(r, n)], type=pa.large_binary(), mask=_mask(r, n)), True)

    def string_null_slot_with_bytes(r):  # legal in Arrow: a null slot that still spans data bytes
        sa = pa.array(["aa", "bbb", "c", "dddd"])
        validity = pa.py_buffer(np.packbits([1, 0, 1, 1], bitorder="little").tobytes())
        return pa.Array.from_buffers(pa.string(), 4, [validity, *sa.buffers()[1:]])

    yield "STRING null slot owning bytes", ValueType.STRING, string_null_slot_with_bytes, True
    # not on the fast path: must fall back to Feast's own conversion
    yield ("STRING_LIST (fallback)", ValueType.STRING_LIST,
           lambda r: pa.array([["a", "é"], None, [], ["x" * 40]] * 5), False)
    yield "INT64<-float64 (fallback)", ValueType.INT64, lambda r: pa.array([1.0, None, 3.0] * 5), False
    yield ("UNIX_TIMESTAMP (fallback)", ValueType.UNIX_TIMESTAMP,
           lambda r: pa.array([datetime(2024, 1, 1, 12, 30), None] * 5, type=pa.timestamp("us")), False)


def _list_cases():
    n = N_ROWS
    for name, typ in INT_TYPES.items():
        for large in (False, True):
            kind = "large_list" if large else "list"
            yield (f"INT64_LIST<-{kind}<{name}>", ValueType.INT64_LIST,
                   lambda r, t=typ, lg=large: _list_array(r, n, pa.array(_ints(r, t, 20 * n), type=t), large=lg),
                   True)
            if name in INT32_OK:
                yield (f"INT32_LIST<-{kind}<{name}>", ValueType.INT32_LIST,
                       lambda r, t=typ, lg=large: _list_array(r, n, pa.array(_ints(r, t, 20 * n), type=t), large=lg),
                       True)

    def dbl(r):
        x = r.normal(size=20 * n) * 10.0 ** r.integers(-30, 30, 20 * n)
        x[r.random(20 * n) < 0.05] = np.nan
        x[:4] = [np.inf, -np.inf, -0.0, 5e-324]
        return x

    for large in (False, True):
        kind = "large_list" if large else "list"
        yield (f"DOUBLE_LIST<-{kind}<float64> (nan inside)", ValueType.DOUBLE_LIST,
               lambda r, lg=large: _list_array(r, n, dbl(r), large=lg), True)
        yield (f"FLOAT_LIST<-{kind}<float32>", ValueType.FLOAT_LIST,
               lambda r, lg=large: _list_array(r, n, dbl(r).astype(np.float32), large=lg), True)
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


ENCODER_CASES = list(_scalar_cases()) + list(_list_cases())


def _feast_column(vt: ValueType, arr: pa.Array, compute_num: bool):
    """What stock Feast stores for one column: _columns_to_proto_values + SqliteOnlineStore.online_write_batch."""
    protos = python_values_to_proto_values(arr.to_numpy(zero_copy_only=False), vt)
    tn = [extract_text_and_num(p, compute_num) for p in protos]
    return [p.SerializeToString() for p in protos], [t for t, _ in tn], [x for _, x in tn]


def _same_num(a, b) -> bool:
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return a == b and type(a) is type(b)


@pytest.mark.parametrize("compute_num", [False, True], ids=["text", "text+num"])
@pytest.mark.parametrize("case", ENCODER_CASES, ids=[c[0] for c in ENCODER_CASES])
def test_feature_column_encoding_is_feasts(case, compute_num, monkeypatch):
    name, vt, make, fast = case
    arr = make(_rng(name))
    fallback_calls = []
    original = fs._encode_column_fallback
    monkeypatch.setattr(fs, "_encode_column_fallback", lambda *a: fallback_calls.append(1) or original(*a))

    values, texts, nums = fs.encode_feature_column(vt, arr, compute_num)
    assert bool(fallback_calls) is not fast, "fast path expected" if fast else "Feast fallback expected"

    exp_values, exp_texts, exp_nums = _feast_column(vt, arr, compute_num)
    assert len(values) == len(texts) == len(nums) == len(arr)
    for i, (got, exp) in enumerate(zip(values, exp_values, strict=True)):
        assert type(got) is bytes and got == exp, (i, arr[i], got, exp)
    assert texts == exp_texts
    bad = [i for i, (g, e) in enumerate(zip(nums, exp_nums, strict=True)) if not _same_num(g, e)]
    assert not bad, [(i, nums[i], exp_nums[i]) for i in bad[:5]]


@pytest.mark.xfail(strict=True, reason="known divergence: Feast stores a BYTES batch without a non-empty value as all "
                   "null (b''); fast_sqlite stores bytes_val=b'' (b'\\n\\x00') for the b'' rows")
@pytest.mark.parametrize("values", [[b"", None], [b"", b""]], ids=["empty+null", "all-empty"])
def test_bytes_column_without_non_empty_value_is_feasts(values):
    arr = pa.array(values, pa.binary())
    assert fs.encode_feature_column(ValueType.BYTES, arr)[0] == _feast_column(ValueType.BYTES, arr, False)[0]


def test_feature_column_encoding_accepts_chunked_arrays():
    r = _rng("chunked")
    chunks = [pa.array(_ints(r, pa.int64(), 50, limit=2**53), mask=_mask(r, 50)) for _ in range(3)]
    got = fs.encode_feature_column(ValueType.INT64, pa.chunked_array(chunks))
    assert got == fs.encode_feature_column(ValueType.INT64, pa.concat_arrays(chunks))
    assert got[0] == _feast_column(ValueType.INT64, pa.concat_arrays(chunks), False)[0]


# ---- entity keys ------------------------------------------------------------------------------------
def _key_table(r: np.random.Generator, n: int) -> pa.Table:
    cols = {f"k_{name}": pa.array(_ints(r, typ, n), type=typ) for name, typ in INT_TYPES.items()}
    strs = _strings(r, n)
    cols["k_string"] = pa.array(strs)
    cols["k_large_string"] = pa.array(strs, type=pa.large_string())
    cols["k_bytes"] = pa.array([s.encode() for s in strs])
    return pa.table(cols)


KEY_CASES = (
    [{f"k_{name}": ValueType.INT64} for name in INT_TYPES]
    + [{f"k_{name}": ValueType.INT32} for name in INT32_OK]
    + [{"k_string": ValueType.STRING}, {"k_large_string": ValueType.STRING}, {"k_bytes": ValueType.BYTES}]
    + [
        # several join keys, deliberately not in sorted order
        {"k_string": ValueType.STRING, "k_int64": ValueType.INT64},
        {"k_uint16": ValueType.INT32, "k_large_string": ValueType.STRING, "k_int8": ValueType.INT64},
        {"k_bytes": ValueType.BYTES, "k_int32": ValueType.INT32},
    ]
)


@pytest.mark.parametrize("join_keys", KEY_CASES, ids=["+".join(k) for k in KEY_CASES])
def test_entity_keys_are_feasts(join_keys):
    table = _key_table(_rng("keys"), N_ROWS)
    # two chunks, like an offline-store result
    table = pa.concat_tables([table.slice(0, 100), table.slice(100)])
    got = fs.encode_entity_keys(table, join_keys, 3)
    # Feast's path: _columns_to_proto_values + _build_entity_keys + serialize_entity_key(v3)
    protos = {k: python_values_to_proto_values(table.column(k).to_numpy(zero_copy_only=False), vt)
              for k, vt in join_keys.items()}
    exp = [serialize_entity_key(EntityKey(join_keys=list(join_keys), entity_values=[protos[k][i] for k in join_keys]),
                                entity_key_serialization_version=3)
           for i in range(table.num_rows)]
    assert len(got) == len(exp)
    for i, (g, e) in enumerate(zip(got, exp, strict=True)):
        assert g == e, (i, table.slice(i, 1).to_pylist(), g, e)


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
    a = fs._latest_per_key_numpy(tbl, keys, ["ts", "cr"])
    b = fs._latest_per_key_arrow(tbl, keys, ["ts", "cr"])
    # LocalDedupNode: sort_values([ts, created], ascending=False).drop_duplicates(join keys)
    df = tbl.to_pandas()
    exp = np.sort(df.sort_values(by=["ts", "cr"], ascending=False).drop_duplicates(subset=keys).index.to_numpy())
    assert a is not None
    assert a.tolist() == b.tolist() == exp.tolist()


def test_dedup_exact_ties_and_non_integer_keys():
    tie = pa.table({"k": [1, 1, 2, 2], "ts": pa.array([5, 5, 1, 1], pa.timestamp("s"))})
    assert list(fs._latest_per_key_numpy(tie, ["k"], ["ts"])) == [1, 3] == list(
        fs._latest_per_key_arrow(tie, ["k"], ["ts"]))
    # string keys / null timestamps: no numpy path, pyarrow path (nulls sort first)
    strkey = pa.table({"k": ["a", "b", "a", None, None], "ts": pa.array([1, 2, 3, 4, None], pa.timestamp("s"))})
    assert fs._latest_per_key_numpy(strkey, ["k"], ["ts"]) is None
    assert list(fs._latest_per_key_arrow(strkey, ["k"], ["ts"])) == [1, 2, 3]


# =====================================================================================================
# 2. End to end: stock vs fast Feast repos on the same parquet source
# =====================================================================================================
N_USERS = 120
ROWS_PER_USER = 4
UNKNOWN_USER = 10**6
START = datetime(2023, 12, 1, tzinfo=UTC)
MIDDLE = datetime(2024, 2, 1, tzinfo=UTC)
END = datetime(2024, 3, 15, tzinfo=UTC)
FEATURES = ["ev:cnt", "ev:score", "ev:name", "ev:seq", "ev:vec"]


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
        Field(name="vec", dtype=Array(Float64))])
    big = FeatureView(name="ev_big", entities=[user], ttl=timedelta(days=120), source=src,
                      schema=[Field(name="user_id", dtype=Int64), Field(name="big", dtype=Int64)])
    return [user, src, ev, big]


def _store(root, kind: str, parquet_path, online: dict | None = None, write_batch_size: int | None = None):
    root.mkdir(parents=True)
    online_type = "sqlite" if kind == "stock" else "training.fast_sqlite.FastSqliteOnlineStore"
    raw = {
        "project": "ev", "provider": "local", "registry": str(root / "registry.db"),
        "offline_store": {"type": "duckdb"},
        "online_store": {"type": online_type, "path": str(root / "online.db"), **(online or {})},
        "entity_key_serialization_version": 3,
    }
    if kind == "fast":
        raw["batch_engine"] = {"type": "training.fast_sqlite.FastLocalComputeEngine"}
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
    """Rows per FastSqliteOnlineStore.online_write_arrow call; fails the test if a column of the e2e data set
    falls back to Feast's per-value conversion (the fast encoders must be the ones compared with stock)."""
    calls: list[int] = []
    write = fs.FastSqliteOnlineStore.online_write_arrow

    def spy(self, config, table, arrow_table, *args, **kwargs):
        calls.append(arrow_table.num_rows)
        return write(self, config, table, arrow_table, *args, **kwargs)

    def no_fallback(vt, arr, compute_num):
        raise AssertionError(f"{vt} / {arr.type} is not on the fast path")

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


def test_skip_older_writes_keeps_the_newest(tmp_path, events):
    stock = _store(tmp_path / "stock", "stock", events[0])
    stock.materialize(START, END, feature_views=["ev"])
    fast = _store(tmp_path / "fast", "fast", events[0], online={"skip_older_writes": True})
    fast.materialize(MIDDLE, END, feature_views=["ev"])
    fast.materialize(START, MIDDLE, feature_views=["ev"])
    _assert_same(stock, fast)


def test_write_to_online_store_and_batched_materialize_same_as_stock(tmp_path, events, arrow_writes):
    stock, fast = _pair(tmp_path, events, write_batch_size=100)
    df = events[1].slice(0, 250).to_pandas().drop(columns=["big"])
    for st in (stock, fast):
        st.write_to_online_store("ev", df)  # protos -> online_write_batch
    _assert_same(stock, fast)
    for st in (stock, fast):
        st.materialize(START, END, feature_views=["ev"])  # arrow, in batches of 100 rows
    _assert_same(stock, fast)
    assert len(arrow_writes) == 2 and sum(arrow_writes) == N_USERS and max(arrow_writes) == 100


def test_ragged_online_write_batch_same_as_stock(tmp_path, events):
    stock, fast = _pair(tmp_path, events)
    now = datetime(2024, 5, 1, 12, 0, 0, 250000, tzinfo=UTC)
    data = [(EntityKey(join_keys=["user_id"], entity_values=[Value(int64_val=i % 40)]),
             {"cnt": Value(int64_val=i), **({"score": Value(double_val=i / 3)} if i % 3 else {})},
             now + timedelta(seconds=i), None if i % 2 else now) for i in range(150)]
    for st in (stock, fast):
        st._get_provider().online_store.online_write_batch(st.config, st.get_feature_view("ev"), data, None)
    _assert_same(stock, fast)


def test_value_num_column_same_as_stock(tmp_path, events, arrow_writes):
    stock, fast = _pair(tmp_path, events, online={"enable_openai_compatible_store": True})
    for st in (stock, fast):
        st.materialize(START, END, feature_views=["ev"])
    _assert_same(stock, fast, extra=", value_num")
    assert any(row[-1] is not None for row in _raw(fast, extra=", value_num"))


def test_large_int64_is_exact(tmp_path, events):
    """Stock rounds int64 columns with nulls through float64; the fast path must keep every bit."""
    fast = _store(tmp_path / "fast", "fast", events[0])
    fast.materialize(START, END, feature_views=["ev_big"])
    got = _online(fast, ["ev_big:big"])["big"][:N_USERS]
    oracle = _oracle(events[1]).big.reindex(range(N_USERS))
    assert got == [None if pd.isna(v) else int(v) for v in oracle]
