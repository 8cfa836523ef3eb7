"""pandera contracts at the data boundaries.

Raw inputs (``validate_raw``): every row of ``users``, ``interests``, ``pins``, ``events`` and the optional
``user_follows`` is either
accepted (written to ``<build>/staged/``, the only thing dbt reads) or quarantined (written to
``<build>/quarantine/<table>.parquet`` with a reason per row). Nothing is dropped silently: for every
file, input rows == accepted + quarantined is asserted. A missing file, a missing column or an empty
file is an error naming the file; so is a file whose quarantined fraction exceeds
``contracts.max_bad_fraction`` (the message names the file, the worst column and the count).

An events file without a ``surface`` column (written before surfaces existed, or external data that only
knows one feed) is read as all Homefeed: the column is added before the checks, with one INFO line saying so.
A file that has the column is held to it like any other: a null or unknown surface is quarantined.

``user_follows`` is optional (MovieLens has none): without the file, or with an empty one, an empty table is
staged; a file with rows is held to its contract like the others (known users and interests, valid times).

Training set (``TRAINING_SET_SCHEMA``): the point-in-time join's output, checked before it is written.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import pandera.pandas as pa
import pyarrow as pa_arrow
import pyarrow.parquet as pq

from training.config import ContractConfig, parse_utc
from training.data.raw import EVENT_TYPES, HOMEFEED, OPTIONAL_TABLES, SCHEMAS, SURFACES, TABLES, to_arrow
from training.io import ParquetAppender, atomic_path, atomic_write_parquet

log = logging.getLogger(__name__)


class ContractError(ValueError):
    """Raw input that cannot be accepted; the message names the file and what is wrong."""


@dataclass
class TableReport:
    """What the contract did with one raw file."""

    path: str
    input_rows: int
    accepted: int
    quarantined: int
    reasons: dict[str, int] = field(default_factory=dict)
    """Failed check -> number of rows, e.g. {'events.user_id: isin(known users)': 3}."""


def _time_range(cfg: ContractConfig, now: datetime | None) -> tuple[pd.Timestamp, pd.Timestamp]:
    now = now or datetime.now(UTC)
    return pd.Timestamp(parse_utc(cfg.min_timestamp)), pd.Timestamp(now + timedelta(days=cfg.max_future_days))


def raw_schema(table: str, known: dict[str, np.ndarray], lo: pd.Timestamp, hi: pd.Timestamp) -> pa.DataFrameSchema:
    """The pandera contract of one raw table. ``known`` holds the accepted ids of tables it references."""
    ts_check = pa.Check.in_range(lo, hi, error=f"between {lo.date()} and {hi.date()}")

    def ids(name: str) -> pa.Check:
        return pa.Check.isin(known.get(name, []), error=f"known {name}")

    int_id = dict(dtype="Int64", nullable=False)
    ts = dict(dtype="datetime64[us, UTC]", nullable=False)
    if table == "events" and "pins" not in known:
        raise ValueError("validate pins before events")
    columns = {
        "users": {
            "user_id": pa.Column(**int_id, unique=True, report_duplicates="exclude_first"),
            "age": pa.Column("Int64", pa.Check.in_range(0, 120), nullable=False),
            "gender": pa.Column(str, nullable=False),
            "segment": pa.Column(str, nullable=False),
            "signup_at": pa.Column(**ts, checks=ts_check),
        },
        "interests": {
            "interest_id": pa.Column(**int_id, unique=True, report_duplicates="exclude_first"),
            "name": pa.Column(str, nullable=False),
        },
        "pins": {
            "pin_id": pa.Column(**int_id, unique=True, report_duplicates="exclude_first"),
            "interest_id": pa.Column(**int_id, checks=ids("interests")),
            "image_signature": pa.Column(str, pa.Check.str_length(min_value=1), nullable=False),
            "created_at": pa.Column(**ts, checks=ts_check),
        },
        "events": {
            "user_id": pa.Column(**int_id, checks=ids("users")),
            "pin_id": pa.Column(**int_id, checks=ids("pins")),
            "event_type": pa.Column(str, pa.Check.isin(EVENT_TYPES), nullable=False),
            "event_timestamp": pa.Column(**ts, checks=ts_check),
            "surface": pa.Column(str, pa.Check.isin(SURFACES), nullable=False),
        },
        "user_follows": {
            "user_id": pa.Column(**int_id, checks=ids("users")),
            "interest_id": pa.Column(**int_id, checks=ids("interests")),
            "followed_at": pa.Column(**ts, checks=ts_check),
        },
    }[table]
    return pa.DataFrameSchema(columns, name=table, strict=False)


def _coerce(df: pd.DataFrame, table: str) -> tuple[pd.DataFrame, pd.Series]:
    """Cast each column to its contract type value by value. Returns the cast frame and, per row, the
    reason a value could not be cast ('' when fine). Uncastable values become nulls."""
    schema = SCHEMAS[table]
    out = pd.DataFrame(index=df.index)
    reasons = pd.Series("", index=df.index, dtype=object)
    for name in schema.names:
        col = df[name]
        kind = schema.field(name).type
        if pa_arrow.types.is_integer(kind):
            if pd.api.types.is_integer_dtype(col.dtype):
                cast = col.astype("Int64")
            else:
                num = pd.to_numeric(col, errors="coerce")
                whole = num.notna() & np.isfinite(num.astype(float)) & (num.astype(float) % 1 == 0)
                cast = num.where(whole).astype("Float64").astype("Int64")
        elif pa_arrow.types.is_timestamp(kind):
            if not isinstance(col.dtype, pd.DatetimeTZDtype):
                col = pd.to_datetime(col, errors="coerce", utc=True, format="mixed").where(col.notna(), col)
            cast = pd.to_datetime(col, errors="coerce", utc=True).dt.floor("us").astype("datetime64[us, UTC]")
        else:
            cast = col.where(col.isna(), col.astype(str))
        bad = cast.isna() & col.notna()
        if bad.any():
            reasons[bad] += f"{table}.{name}: not a valid {kind}; "
        out[name] = cast
    return out, reasons


def check_table(
    table: str, df: pd.DataFrame, schema: pa.DataFrameSchema, path: Path
) -> tuple[pd.DataFrame, pd.DataFrame, TableReport]:
    """Split a raw frame into accepted rows (typed) and quarantined rows (as text, with a reason)."""
    if table == "events" and "surface" not in df.columns:
        log.info("contract events: %s has no surface column; reading all %s rows as %s", path, f"{len(df):,}", HOMEFEED)
        df = df.assign(surface=HOMEFEED)
    missing = [c for c in SCHEMAS[table].names if c not in df.columns]
    if missing:
        expected = ", ".join(SCHEMAS[table].names)
        raise ContractError(f"{path}: missing column(s) {', '.join(missing)} (expected {expected})")
    df = df.reset_index(drop=True)
    typed, reasons = _coerce(df, table)
    try:
        schema.validate(typed, lazy=True)
    except pa.errors.SchemaErrors as err:
        cases = err.failure_cases.dropna(subset=["index"])
        cases = cases[~cases["check"].astype(str).str.startswith(("dtype(", "coerce_dtype("))]
        for (column, check), rows in cases.groupby(["column", "check"])["index"]:
            idx = rows.astype(int).unique()
            if check == "not_nullable":  # a value that could not be cast is already explained
                idx = idx[~reasons.iloc[idx].str.contains(f"{table}.{column}: not a valid", regex=False).to_numpy()]
            reasons.iloc[idx] += f"{table}.{column}: {check}; "
        unindexed = err.failure_cases[err.failure_cases["index"].isna()]
        if len(unindexed):
            raise ContractError(f"{path}: {unindexed.iloc[0]['column']}: {unindexed.iloc[0]['check']}") from err
    bad = reasons != ""
    accepted = typed[~bad]
    quarantined = df[bad].astype(str).assign(
        row_number=np.flatnonzero(bad.to_numpy()), reason=reasons[bad].str.rstrip("; ")
    )
    counts = Counter(r for rs in quarantined["reason"] for r in rs.split("; "))
    report = TableReport(str(path), len(df), len(accepted), len(quarantined), dict(counts.most_common()))
    assert report.input_rows == report.accepted + report.quarantined, report
    return accepted, quarantined, report


def _read(path: Path, optional: bool = False, probe: bool = False) -> pd.DataFrame | None:
    """The raw file as a frame; an optional table's missing or empty file is None. ``probe``: only check that the
    file exists, is parquet and has rows (its metadata), and return None."""
    if optional and not path.exists():
        return None
    if not path.exists():
        raise ContractError(
            f"raw input not found: {path} (expected {', '.join(t + '.parquet' for t in TABLES)} in {path.parent}; "
            "run `retrieval generate` or `retrieval ingest --data.movielens_path DIR` first)"
        )
    try:
        if probe:
            if pq.ParquetFile(path).metadata.num_rows == 0:
                raise ContractError(f"{path}: the file has no rows")
            return None
        df = pq.read_table(path).to_pandas()
    except ContractError:
        raise
    except Exception as e:  # noqa: BLE001 - any reader error becomes a contract error naming the file
        raise ContractError(f"{path}: cannot be read as parquet: {e}") from e
    if df.empty:
        if optional:
            return None
        raise ContractError(f"{path}: the file has no rows")
    return df


def validate_raw(
    raw_dir: Path, out_dir: Path, cfg: ContractConfig, now: datetime | None = None
) -> dict[str, TableReport]:
    """Validate the raw tables in dependency order; write accepted rows to ``out_dir/staged`` and
    quarantined rows to ``out_dir/quarantine``. Raises ContractError when a file is unusable. The events file is
    checked ``cfg.chunk_rows`` rows at a time (``_stage_events``); the other tables, whose ids must be unique, whole."""
    lo, hi = _time_range(cfg, now)
    known: dict[str, np.ndarray] = {}
    reports: dict[str, TableReport] = {}
    for table in ("interests", "users", "pins", "events", *OPTIONAL_TABLES):
        path = raw_dir / f"{table}.parquet"
        if table == "events":
            reports[table] = _stage_events(raw_dir, out_dir, raw_schema(table, known, lo, hi), cfg, reports)
            continue
        df = _read(path, optional=table in OPTIONAL_TABLES)
        if df is None:
            log.info("contract %s: no rows in %s, staging an empty table", table, path)
            atomic_write_parquet(SCHEMAS[table].empty_table(), out_dir / "staged" / f"{table}.parquet")
            continue
        accepted, quarantined, report = check_table(table, df, raw_schema(table, known, lo, hi), path)
        reports[table] = report
        if report.quarantined:
            atomic_write_parquet(pa_arrow.Table.from_pandas(quarantined, preserve_index=False),
                                 out_dir / "quarantine" / f"{table}.parquet")
        _check_fraction(report, table, out_dir, cfg)
        atomic_write_parquet(to_arrow(table, accepted), out_dir / "staged" / f"{table}.parquet")
        key = {"interests": "interest_id", "users": "user_id", "pins": "pin_id"}.get(table)
        if key:
            known[table] = accepted[key].to_numpy(dtype=np.int64)
        _log_report(table, report)
    return reports


def _check_fraction(report: TableReport, table: str, out_dir: Path, cfg: ContractConfig) -> None:
    qpath = out_dir / "quarantine" / f"{table}.parquet"
    if report.quarantined:
        reasons = ", ".join(f"{k}: {v}" for k, v in list(report.reasons.items())[:3])
        log.warning("contract %s: quarantined %s of %s rows -> %s (%s)", table, f"{report.quarantined:,}",
                    f"{report.input_rows:,}", qpath, reasons)
    fraction = report.quarantined / report.input_rows
    if fraction > cfg.max_bad_fraction:
        worst, count = next(iter(report.reasons.items()))
        raise ContractError(
            f"{report.path}: {report.quarantined:,} of {report.input_rows:,} rows ({fraction:.1%}) failed the "
            f"contract, above contracts.max_bad_fraction={cfg.max_bad_fraction}; most frequent: {worst} ({count:,} "
            f"rows); quarantined rows with reasons: {qpath}"
        )


def _log_report(table: str, report: TableReport) -> None:
    log.info("contract %s: %s rows in, %s accepted, %s quarantined", table,
             f"{report.input_rows:,}", f"{report.accepted:,}", f"{report.quarantined:,}")


def _read_parts(path: Path, rows: int) -> Iterator[pd.DataFrame]:
    """The raw file as frames of at most ``rows`` rows, in file order; errors as ``_read``'s."""
    _read(path, probe=True)
    try:
        for batch in pq.ParquetFile(path).iter_batches(batch_size=rows):
            yield batch.to_pandas()
    except Exception as e:  # noqa: BLE001 - any reader error becomes a contract error naming the file
        raise ContractError(f"{path}: cannot be read as parquet: {e}") from e


def _stage_events(raw_dir: Path, out_dir: Path, schema: pa.DataFrameSchema, cfg: ContractConfig,
                  reports: dict[str, TableReport]) -> TableReport:
    """The events contract one part of ``cfg.chunk_rows`` rows at a time: each part's accepted rows are appended to
    the staged file and its quarantined rows (numbered by their row in the file) to the quarantine file, then the
    accepted ingested events; the fraction check is on the whole file's counts. The staged file appears whole or
    not at all (not when the check fails); the quarantine file is written whenever a row was quarantined."""
    path = raw_dir / "events.parquet"
    staged, qpath = out_dir / "staged" / "events.parquet", out_dir / "quarantine" / "events.parquet"
    counts: Counter[str] = Counter()
    totals = [0, 0, 0]   # input, accepted, quarantined
    with atomic_path(staged) as tmp:
        good = ParquetAppender(tmp)
        bad = ParquetAppender(out_dir / ".events-quarantine.part")
        try:
            for df in _read_parts(path, cfg.chunk_rows):
                accepted, quarantined, report = check_table("events", df, schema, path)
                if len(quarantined):
                    bad.write(pa_arrow.Table.from_pandas(quarantined.assign(
                        row_number=quarantined["row_number"] + totals[0]), preserve_index=False))
                if len(accepted):
                    good.write(to_arrow("events", accepted))
                counts.update(report.reasons)
                totals = [totals[0] + report.input_rows, totals[1] + report.accepted,
                          totals[2] + report.quarantined]
        finally:
            bad.close()
        if bad.writer is not None:
            qpath.parent.mkdir(parents=True, exist_ok=True)
            bad.path.replace(qpath)
        report = TableReport(str(path), totals[0], totals[1], totals[2], dict(counts.most_common()))
        _check_fraction(report, "events", out_dir, cfg)   # raised inside: the staged file is not written
        ingested = _ingested(raw_dir, schema, reports)
        if ingested is not None and len(ingested):
            good.write(to_arrow("events", ingested))
        if good.writer is None:
            good.write(SCHEMAS["events"].empty_table())
        good.close()
    _log_report("events", report)
    return report


INGESTED_EVENTS = "ingested_events"
"""The events the service ingested in real time (POST /events), exported from its log by ``retrieval build``
(``training.features.realtime.export``): one row per event id, held to the events contract and staged with the raw
events."""


def _ingested(raw_dir: Path, schema: pa.DataFrameSchema, reports: dict[str, TableReport]) -> pd.DataFrame | None:
    """The accepted ingested events, staged after the raw ones (each event id once; the service refused the rest
    before logging them, so a quarantined row here means the contract or the data changed since)."""
    path = raw_dir / f"{INGESTED_EVENTS}.parquet"
    df = _read(path, optional=True)
    if df is None:
        return None
    df = df.drop_duplicates("event_id")
    accepted, quarantined, report = check_table("events", df.drop(columns=["event_id"]), schema, path)
    reports[INGESTED_EVENTS] = report
    if report.quarantined:
        log.warning("contract %s: quarantined %s of %s ingested events (%s)", INGESTED_EVENTS,
                    f"{report.quarantined:,}", f"{report.input_rows:,}",
                    ", ".join(f"{k}: {v}" for k, v in list(report.reasons.items())[:3]))
    log.info("contract %s: %s ingested events added to the raw events", INGESTED_EVENTS, f"{report.accepted:,}")
    return accepted


def _not_after_label(column: str) -> pa.Check:
    return pa.Check(
        lambda df: df[column].isna() | (df[column] <= df["event_timestamp"]),
        name=f"{column} <= event_timestamp",
        error=f"{column} is newer than the label's event_timestamp (feature leakage)",
    )


TRAINING_SET_SCHEMA = pa.DataFrameSchema(
    {
        "user_id": pa.Column("int64", nullable=False),
        "pin_id": pa.Column("int64", nullable=False),
        "event_timestamp": pa.Column("datetime64[ns, UTC]", nullable=False),
        "label": pa.Column("int64", pa.Check.isin([0, 1]), nullable=False),
        "user_features_at": pa.Column("datetime64[ns, UTC]", nullable=True),
        "user_sequence_at": pa.Column("datetime64[ns, UTC]", nullable=True),
        "user_impressions_at": pa.Column("datetime64[ns, UTC]", nullable=True),
        "pin_features_at": pa.Column("datetime64[ns, UTC]", nullable=True),
        "recent_pin_ids": pa.Column(object, nullable=True),
        "interest_id": pa.Column("Int64", nullable=True),
    },
    checks=[_not_after_label(c)
            for c in ("user_features_at", "user_sequence_at", "user_impressions_at", "pin_features_at")],
    name="training_set",
    strict=False,
    coerce=True,
)
"""Contract of the point-in-time training set: keys and labels present, no feature newer than its label."""
