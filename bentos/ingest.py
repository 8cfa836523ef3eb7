"""Real-time engagement ingestion behind ``POST /events``: validate a batch, log it durably, push fresh features.

A batch is applied whole or not at all:

- the request model (``bentos/service.py``) checks shapes and types (400, naming ``events.<row>.<field>``);
- a request the schema accepts can still be refused by the live data, the clock or the log; each such refusal is a
  409 (the request is well formed, what it asks conflicts with the service's state) and ``details`` lists every
  bad row with its field and reason: a row that fails the raw events' pandera contract
  (``training.data.contracts.raw_schema``: a user or pin the live snapshot does not know, a time before
  ``contracts.min_timestamp``) or is stamped later than the service's clock plus ``ingest.max_future_seconds``; two
  events of the batch with one ``event_id`` and different content; an event id already logged with other content.
  Nothing of the batch is written. Copies of one event within a batch count once, like a resent event;
- otherwise the new events are committed to the event log before the answer (an event id already logged with the
  same content counts as a duplicate and changes nothing), then the affected users' ``user_sequence`` rows are
  pushed online (``training.features.realtime``). A log that cannot be written in ``ingest.lock_seconds`` is a
  503 and nothing is acknowledged; a failed push after the commit is a 503 too, and the events stay logged: the
  retry finds them as duplicates and pushes what is pending.
"""

from __future__ import annotations

import logging
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from training.config import Config, parse_utc
from training.data.contracts import check_table, raw_schema
from training.features.realtime import LogConflict, LogUnavailable, SequencePusher, open_log

log = logging.getLogger(__name__)


class IngestError(ValueError):
    """A batch refused as a whole; ``status`` 400 / 409, ``details`` one entry per bad row."""

    def __init__(self, status: int, message: str, field: str | None = None, details: list[dict] | None = None):
        super().__init__(message)
        self.status = status
        self.field = field
        self.details = details


class PushFailed(RuntimeError):
    """The events are logged but the online store did not take the fresh features (the retry pushes them)."""


class Ingestor:
    """Validation against the live snapshot, the event log and the push, for one service process."""

    def __init__(self, cfg: Config, features=None):
        self.cfg = cfg
        self.log = open_log(cfg)
        self.pusher = SequencePusher(cfg, features)
        self._schema: tuple[Path, Any] | None = None
        self._lock = threading.Lock()

    def schema(self):
        """The raw events contract with the live snapshot's accepted users and pins as the known ids (built once per
        live snapshot). Its upper time bound is open: the future is checked against the clock per batch."""
        link = (self.cfg.data_path / "live").resolve()
        with self._lock:
            if self._schema is None or self._schema[0] != link:
                import pyarrow.parquet as pq

                known = {
                    "users": pq.read_table(link / "staged" / "users.parquet", columns=["user_id"]).column(0).to_numpy(),
                    "pins": pq.read_table(link / "staged" / "pins.parquet", columns=["pin_id"]).column(0).to_numpy(),
                }
                lo = pd.Timestamp(parse_utc(self.cfg.contracts.min_timestamp))
                self._schema = (link, raw_schema("events", known, lo, pd.Timestamp.max.tz_localize(UTC)))
            return self._schema[1]

    def validate(self, events: list[dict[str, Any]], now: datetime | None = None) -> tuple[pd.DataFrame, int]:
        """The batch as a typed frame (each event once) and how many copies of its events it held, or IngestError
        naming every bad row."""
        now = now or datetime.now(UTC)
        df = pd.DataFrame(events, columns=["event_id", "user_id", "pin_id", "event_type", "event_timestamp",
                                           "surface"])
        copies = df.duplicated(keep="first").to_numpy()   # the same event sent twice in one batch: counted once
        conflict = np.zeros(len(df), dtype=bool)
        conflict[~copies] = df["event_id"][~copies].duplicated(keep=False).to_numpy()
        if conflict.any():
            rows = np.flatnonzero(conflict).tolist()
            raise IngestError(409, f"event_id repeated within the batch with different content: "
                                   f"{sorted(set(df['event_id'][conflict]))[:5]}; nothing was applied",
                              "events.event_id", [{"row": r, "field": f"events.{r}.event_id",
                                                   "message": f"event_id {df['event_id'][r]!r} appears more than once "
                                                              "in the batch with different content"} for r in rows])
        details = []
        # Bounds first, on the instants as sent: a year the schema allows (1 to 9999) can lie outside what a pandas
        # timestamp holds (1677 to 2262), so out-of-bounds rows are refused here and stand in as the lower bound for
        # the contract's other checks.
        lo = parse_utc(self.cfg.contracts.min_timestamp)
        horizon = now + timedelta(seconds=self.cfg.ingest.max_future_seconds)
        instants = [datetime.fromisoformat(t) if isinstance(t, str) else t for t in df["event_timestamp"]]
        for r, t in enumerate(instants):
            if t > horizon:
                details.append({"row": r, "field": f"events.{r}.event_timestamp",
                                "message": f"{t.isoformat()} is in the future: later than the service's clock "
                                           f"{now.isoformat(timespec='seconds')} + ingest.max_future_seconds "
                                           f"({self.cfg.ingest.max_future_seconds:g})"})
            elif t < lo:
                details.append({"row": r, "field": f"events.{r}.event_timestamp",
                                "message": f"{t.isoformat()} is before contracts.min_timestamp "
                                           f"({self.cfg.contracts.min_timestamp})"})
        df["event_timestamp"] = [lo if not lo <= t <= horizon else t for t in instants]
        accepted, quarantined, _ = check_table("events", df.drop(columns=["event_id"]), self.schema(),
                                               Path("POST /events"))
        for r, reason in zip(quarantined["row_number"], quarantined["reason"], strict=True):
            for part in reason.split("; "):
                column = part.split(":")[0].removeprefix("events.")
                details.append({"row": int(r), "field": f"events.{int(r)}.{column}", "message": _explain(part)})
        if details:
            details.sort(key=lambda d: (d["row"], d["field"]))
            first = details[0]
            raise IngestError(409, f"{len({d['row'] for d in details})} of {len(df)} events failed the events "
                                   f"contract, nothing was applied; first: {first['field']}: {first['message']}",
                              first["field"], details)
        once = np.flatnonzero(~copies)
        return (accepted.iloc[once].assign(event_id=df["event_id"].astype(str).to_numpy()[once]),
                int(copies.sum()))

    def ingest(self, events: list[dict[str, Any]]) -> dict[str, Any]:
        """Validate, log (durable before this returns) and push; the answer's counts."""
        t0 = time.perf_counter()
        frame, copies = self.validate(events)
        try:
            appended = self.log.append(frame)
        except LogConflict as e:
            raise IngestError(409, f"{e}; nothing of the batch was written", "events.event_id",
                              [{"row": r, "field": f"events.{r}.event_id",
                                "message": f"event_id {i!r} is logged with different content"}
                               for r, i in zip(e.rows, e.ids, strict=True)]) from e
        t1 = time.perf_counter()
        try:
            pushed = self.log.flush(self.pusher, upto=appended.last_seq if appended.new else None)
        except LogUnavailable:
            raise
        except Exception as e:  # noqa: BLE001 - an online-store fault: the events are logged and will be pushed
            raise PushFailed(f"online store: {type(e).__name__}: {str(e).splitlines()[0][:200]}; the "
                             f"{appended.new} new events are logged and will be pushed by the next batch or "
                             "retry") from e
        return {"accepted": appended.new, "duplicates": appended.duplicates + copies, "users_pushed": pushed["rows"],
                "timings_ms": {"validate_and_log": round((t1 - t0) * 1e3, 3),
                               "push": round((time.perf_counter() - t1) * 1e3, 3)}}

    def catch_up(self) -> dict[str, int]:
        """Push whatever the log holds past its push watermark (events committed before a crash or a failed push)."""
        return self.log.flush(self.pusher)


def _explain(reason: str) -> str:
    """A contract failure as a sentence: 'events.user_id: known users' -> 'not one of the known users ...'."""
    column, _, check = reason.partition(": ")
    if check.startswith("known "):
        return f"not one of the {check.removeprefix('known ')} of the live data snapshot"
    return check or reason
