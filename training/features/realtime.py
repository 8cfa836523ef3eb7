"""Real-time engagements: the durable event log, and the fresh user features it pushes online through Feast.

The service's ``POST /events`` (bentos/ingest.py) validates a batch, then:

1. ``EventLog.append`` writes the new events to ``<data_dir>/events/ingest.db`` (SQLite, WAL journal,
   ``synchronous=FULL``) in one transaction and commits before the service answers: an acknowledged event
   survives a kill -9. An event id already in the log with the same content is a duplicate and changes nothing
   (a retried batch is a no-op); with other content it is a conflict, and nothing of the batch is written.
2. ``EventLog.flush`` (one process at a time, under the log's push lock) recomputes the ``user_sequence``
   feature of every user with events newer than the log's push watermark, pushes the rows through Feast's push
   source ``user_sequence_push`` into the online store, then moves the watermark. Events committed but not yet
   pushed (a crash, a failed push) are pushed by the next flush, which the service also runs when it starts.
3. The next ``retrieval build`` reads the log's events (``export``) next to the raw files, so the batch models
   compute from exactly what was pushed; the snapshot records the last sequence number it holds, and
   ``retrieval features`` pushes again, after materializing, the users with events logged after it (``repush``):
   the batch values it writes never hide newer logged events.

The pushed row is what dbt's ``user_sequence`` model computes for the user's newest engagement: the last
``history_length`` positive Homefeed engagements (weight > 0, ``transform.engagement_weights``), each pin remapped to
its canonical pin by the live ``pin_canonical_map``, one entry per (canonical pin, instant), ordered by (time, pin)
and listed newest first, with ages in days from the newest engagement; the row is stamped 1 µs after it. It is
computed from the live snapshot's newest row of the user (which holds the batch's history) merged with the
user's logged events: the newest ``history_length`` of that union are the newest of the raw and logged events
together, and an event already in the snapshot (after a rebuild) is the same (instant, pin) pair, counted once.
The transform settings are the live snapshot's own (its manifest), not the service's config.

The daily aggregates (``user_features``: counts and top interests; ``user_impressions``) are stamped at the
midnight after each day and use only earlier events, in training and online alike, so a push cannot make them
fresher without serving values the towers never saw in training; they change at the next build.
"""

from __future__ import annotations

import fcntl
import json
import logging
import sqlite3
import threading
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from training.config import Config

log = logging.getLogger(__name__)

PUSH_SOURCE = "user_sequence_push"
"""The Feast push source of the ``user_sequence`` view (feature_repo/data_sources.py)."""
LABEL_SURFACE = "homefeed"
"""The surface whose engagements are labels and features (dbt's ``label_surface`` macro)."""
LOG_COLUMNS = ("event_id", "user_id", "pin_id", "event_type", "event_timestamp", "surface")
US = 1_000_000


def log_path(cfg: Config) -> Path:
    return cfg.data_path / "events" / "ingest.db"


class LogConflict(ValueError):
    """Event ids already logged with different content; ``rows`` are their positions in the batch."""

    def __init__(self, rows: list[int], ids: list[str]):
        super().__init__(f"event_id already logged with different content: {', '.join(map(repr, ids[:5]))}"
                         + (f" and {len(ids) - 5} more" if len(ids) > 5 else ""))
        self.rows = rows
        self.ids = ids


class LogUnavailable(RuntimeError):
    """The event log could not be written or locked in time (the batch may be retried)."""


@dataclass(frozen=True)
class Appended:
    new: int
    """Events written by this call."""
    duplicates: int
    """Events of the batch already in the log with the same content (not written again)."""
    last_seq: int
    """The log's sequence number of the batch's newest event (0 when nothing was written)."""


_SCHEMA = """
create table if not exists events (
    seq integer primary key autoincrement,
    event_id text not null unique,
    user_id integer not null,
    pin_id integer not null,
    event_type text not null,
    surface text not null,
    event_us integer not null,
    logged_us integer not null
);
create index if not exists events_user_time on events (user_id, event_us);
create table if not exists meta (key text primary key, value integer not null);
"""


class _Log:
    """What both event logs share: the flush (one pusher at a time, pushes shared by concurrent batches)."""

    timeout: float
    _flush_lock: threading.Lock

    def flush(self, pusher: SequencePusher, upto: int | None = None) -> dict[str, int]:
        """Push the fresh ``user_sequence`` of every user with events past the push watermark, then move it.

        One pusher at a time across processes (the log's push lock, waited for at most the log's timeout), and each
        reads the log after taking it, so a later push always holds every event of an earlier one: two workers never
        push one user's rows out of order. Appends are not held up meanwhile. A caller that only needs the events up
        to ``upto`` online returns at once when a push it waited for already carried them (concurrent batches share
        one push)."""
        with self._flush_lock:
            if upto is not None and self.pushed_seq() >= upto:
                return {"users": 0, "rows": 0, "pushed_seq": self.pushed_seq()}
            with self._push_lock():
                if upto is not None and self.pushed_seq() >= upto:
                    return {"users": 0, "rows": 0, "pushed_seq": self.pushed_seq()}
                mark, top = self.pushed_seq(), self.last_seq()
                users = self._users_between(mark, top)
                pushed = pusher.push(users, self._user_events) if users else 0
                self._set_mark(top)
                return {"users": len(users), "rows": pushed, "pushed_seq": top}

    def pending(self) -> int:
        """Logged events not yet pushed online."""
        return self.last_seq() - self.pushed_seq()

    # what each log implements
    def append(self, events: pd.DataFrame) -> Appended: ...
    def frame(self) -> pd.DataFrame: ...
    def count(self) -> int: ...
    def last_seq(self) -> int: ...
    def pushed_seq(self) -> int: ...
    def rewind(self, seq: int) -> None: ...
    def close(self) -> None: ...
    def _push_lock(self): ...
    def _users_between(self, mark: int, top: int) -> list[int]: ...
    def _user_events(self, users: list[int], since: int = 0, kinds: list[str] | None = None,
                     limit: int | None = None) -> pd.DataFrame:
        """The Homefeed events of ``users`` logged after sequence number ``since`` whose type is one of ``kinds``
        (None: every event of the users), each user's newest ``limit`` by time (None: all)."""
    def _set_mark(self, top: int) -> None: ...


class EventLog(_Log):
    """The append-only event log of a data dir in SQLite (the embedded default). One connection per thread; every
    process of the machine may append. Sequence numbers are SQLite's autoincrement row ids."""

    def __init__(self, path: Path, timeout: float = 2.0):
        self.path = Path(path)
        self.timeout = timeout
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        self._flush_lock = threading.Lock()
        self._lock_file = None
        with self._conn() as con:
            con.executescript(_SCHEMA)

    def _conn(self) -> sqlite3.Connection:
        con = getattr(self._local, "con", None)
        if con is None:
            con = sqlite3.connect(self.path, timeout=self.timeout, isolation_level=None, check_same_thread=True)
            con.execute("pragma journal_mode=wal")
            con.execute("pragma synchronous=full")   # a commit is on disk before it returns
            self._local.con = con
        return con

    def close(self) -> None:
        con = getattr(self._local, "con", None)
        if con is not None:
            con.close()
            self._local.con = None
        if self._lock_file is not None:
            self._lock_file.close()
            self._lock_file = None

    def append(self, events: pd.DataFrame) -> Appended:
        """Write ``events`` (LOG_COLUMNS; event_timestamp as UTC datetimes) in one transaction, committed before
        this returns. Raises LogConflict (nothing written) when an id is logged with other content."""
        rows = _log_rows(events)
        con = self._conn()
        try:
            con.execute("begin immediate")
        except sqlite3.OperationalError as e:
            raise LogUnavailable(f"event log {self.path}: {e}") from e
        try:
            existing: dict[str, tuple] = {}
            ids = [r[0] for r in rows]
            for i in range(0, len(ids), 500):
                part = ids[i:i + 500]
                q = ("select event_id, user_id, pin_id, event_type, surface, event_us from events where event_id in "
                     f"({','.join('?' * len(part))})")
                existing.update({r[0]: tuple(r) for r in con.execute(q, part)})
            conflicts = [i for i, r in enumerate(rows) if r[0] in existing and existing[r[0]] != r]
            if conflicts:
                raise LogConflict(conflicts, [rows[i][0] for i in conflicts])
            new = [r for r in rows if r[0] not in existing]
            now = int(time.time() * US)
            con.executemany("insert into events (event_id, user_id, pin_id, event_type, surface, event_us, logged_us) "
                            "values (?, ?, ?, ?, ?, ?, ?)", [(*r, now) for r in new])
            last = con.execute("select max(seq) from events").fetchone()[0] or 0 if new else 0
            con.execute("commit")
        except BaseException as e:
            con.execute("rollback")
            if isinstance(e, sqlite3.Error):
                raise LogUnavailable(f"event log {self.path}: {e}") from e
            raise
        return Appended(new=len(new), duplicates=len(rows) - len(new), last_seq=last)

    @contextmanager
    def _push_lock(self):
        if self._lock_file is None:
            self._lock_file = open(self.path.with_name(self.path.name + ".push.lock"), "a+")   # noqa: SIM115
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise LogUnavailable(f"event log {self.path}: another process has been pushing for over "
                                         f"{self.timeout:g} s") from None
                time.sleep(0.002)
        try:
            yield
        finally:
            fcntl.flock(self._lock_file, fcntl.LOCK_UN)

    def pushed_seq(self) -> int:
        row = self._conn().execute("select value from meta where key = 'pushed_seq'").fetchone()
        return row[0] if row else 0

    def _users_between(self, mark: int, top: int) -> list[int]:
        try:
            return [r[0] for r in self._conn().execute(
                "select distinct user_id from events where seq > ? and seq <= ?", (mark, top))]
        except sqlite3.Error as e:
            raise LogUnavailable(f"event log {self.path}: {e}") from e

    def _user_events(self, users: list[int], since: int = 0, kinds: list[str] | None = None,
                     limit: int | None = None) -> pd.DataFrame:
        columns = "user_id, pin_id, event_type, surface, event_us"
        if kinds is None:
            where, params = "seq > ?", [since]
        else:
            where = f"seq > ? and surface = ? and event_type in ({','.join('?' * len(kinds))})"
            params = [since, LABEL_SURFACE, *kinds]
        parts = []
        try:
            if limit is None:
                for i in range(0, len(users), 500):
                    part = users[i:i + 500]
                    parts.append(pd.read_sql_query(
                        f"select {columns} from events where {where} and user_id in ({','.join('?' * len(part))})",
                        self._conn(), params=[*params, *part]))
            else:   # bounded work per user, whatever the log holds: its newest events (index user_id, event_us)
                con = self._conn()
                rows = []
                for u in users:
                    rows += con.execute(f"select {columns} from events where user_id = ? and {where} "
                                        "order by event_us desc limit ?", [u, *params, limit]).fetchall()
                parts.append(pd.DataFrame(rows, columns=columns.split(", ")))
        except sqlite3.Error as e:
            raise LogUnavailable(f"event log {self.path}: {e}") from e
        return pd.concat(parts, ignore_index=True)

    def _set_mark(self, top: int) -> None:
        try:
            self._conn().execute("insert into meta (key, value) values ('pushed_seq', ?) "
                                 "on conflict (key) do update set value = max(value, excluded.value)", (top,))
        except sqlite3.Error as e:
            raise LogUnavailable(f"event log {self.path}: {e}") from e

    def last_seq(self) -> int:
        return self._conn().execute("select coalesce(max(seq), 0) from events").fetchone()[0]

    def rewind(self, seq: int) -> None:
        """Move the push watermark back to ``seq`` (when it is past it): the next flush pushes every user with events
        after ``seq`` again."""
        self._conn().execute("insert into meta (key, value) values ('pushed_seq', ?) on conflict (key) do update set "
                             "value = min(value, excluded.value)", (int(seq),))

    def count(self) -> int:
        return self._conn().execute("select count(*) from events").fetchone()[0]

    def frame(self) -> pd.DataFrame:
        """Every logged event in log order, with the raw events' columns and types plus ``event_id``."""
        df = pd.read_sql_query("select event_id, user_id, pin_id, event_type, event_us, surface from events "
                               "order by seq", self._conn())
        df["event_timestamp"] = pd.to_datetime(df.pop("event_us"), unit="us", utc=True).astype("datetime64[us, UTC]")
        return df[list(LOG_COLUMNS)]


_APPEND_LUA = """
local p, n = ARGV[1], tonumber(ARGV[2])
local conflicts = {}
for i = 0, n - 1 do
  local id, content = ARGV[3 + i * 3], ARGV[4 + i * 3]
  local old = redis.call('HGET', p .. ':ids', id)
  if old and old ~= content then table.insert(conflicts, i) end
end
if #conflicts > 0 then return {-1, conflicts} end
local new, last = 0, 0
for i = 0, n - 1 do
  local id, content, user = ARGV[3 + i * 3], ARGV[4 + i * 3], ARGV[5 + i * 3]
  if redis.call('HSETNX', p .. ':ids', id, content) == 1 then
    last = redis.call('INCR', p .. ':seq')
    redis.call('XADD', p .. ':stream', '*', 'seq', last, 'event', content)
    redis.call('RPUSH', p .. ':user:' .. user, last .. '|' .. content)
    new = new + 1
  end
end
return {new, last}
"""


class RedisEventLog(_Log):
    """The event log in Redis (``ingest.log redis``): several service machines share it. One Lua script per batch
    checks every event id and appends the new events atomically: a stream of every event in log order (what the
    build exports), a hash of event id -> content (idempotency), a list per user (what the push reads), and a
    counter for sequence numbers. An acknowledged event is as durable as the Redis server makes it: run it with
    ``appendonly yes`` and ``appendfsync always`` (``retrieval stack up`` does), or a replica that must acknowledge
    (``WAIT``), as the deployment requires. The push lock is a Redis key with an expiry."""

    def __init__(self, connection: str, timeout: float = 2.0, prefix: str = "retrieval:events"):
        import redis

        host, _, port = connection.rpartition(":")
        self.client = redis.Redis(host=host or "localhost", port=int(port or 6379), socket_timeout=timeout,
                                  socket_connect_timeout=timeout)
        self.timeout = timeout
        self.prefix = prefix
        self.path = f"redis://{connection}/{prefix}"
        self._flush_lock = threading.Lock()
        self._append = self.client.register_script(_APPEND_LUA)

    def _call(self, fn, *args, **kwargs):
        import redis

        try:
            return fn(*args, **kwargs)
        except redis.RedisError as e:
            raise LogUnavailable(f"event log {self.path}: {type(e).__name__}: {e}") from e

    def append(self, events: pd.DataFrame) -> Appended:
        rows = _log_rows(events)
        argv: list[Any] = [self.prefix, len(rows)]
        for r in rows:
            argv += [r[0], json.dumps(r, separators=(",", ":")), r[1]]
        out = self._call(self._append, args=argv)
        if int(out[0]) == -1:
            conflicts = [int(i) for i in out[1]]
            raise LogConflict(conflicts, [rows[i][0] for i in conflicts])
        return Appended(new=int(out[0]), duplicates=len(rows) - int(out[0]), last_seq=int(out[1]))

    def last_seq(self) -> int:
        return int(self._call(self.client.get, f"{self.prefix}:seq") or 0)

    def pushed_seq(self) -> int:
        return int(self._call(self.client.get, f"{self.prefix}:pushed") or 0)

    def count(self) -> int:
        return int(self._call(self.client.hlen, f"{self.prefix}:ids"))

    def rewind(self, seq: int) -> None:
        if self.pushed_seq() > seq:
            self._call(self.client.set, f"{self.prefix}:pushed", int(seq))

    def _set_mark(self, top: int) -> None:
        self._call(self.client.eval, "local v = tonumber(redis.call('GET', KEYS[1]) or '0') "
                   "if tonumber(ARGV[1]) > v then redis.call('SET', KEYS[1], ARGV[1]) end", 1,
                   f"{self.prefix}:pushed", int(top))

    def _entries(self, start: int, stop: int) -> list[tuple[int, tuple]]:
        """(sequence number, event) of the stream's entries with start < seq <= stop, in log order."""
        out = []
        for _, fields in self._call(self.client.xrange, f"{self.prefix}:stream"):
            seq = int(fields[b"seq"])
            if start < seq <= stop:
                out.append((seq, tuple(json.loads(fields[b"event"]))))
        return out

    def _users_between(self, mark: int, top: int) -> list[int]:
        # the stream's ids grow with the sequence numbers: read from the newest back to the mark
        users: set[int] = set()
        last = "+"
        while True:
            batch = self._call(self.client.xrevrange, f"{self.prefix}:stream", max=last, count=1000)
            if not batch:
                break
            for _, fields in batch:
                seq = int(fields[b"seq"])
                if seq <= mark:
                    return sorted(users)
                if seq <= top:
                    users.add(int(json.loads(fields[b"event"])[1]))
            last = "(" + batch[-1][0].decode()
        return sorted(users)

    def _user_events(self, users: list[int], since: int = 0, kinds: list[str] | None = None,
                     limit: int | None = None) -> pd.DataFrame:
        pipe = self.client.pipeline(transaction=False)
        for u in users:
            pipe.lrange(f"{self.prefix}:user:{u}", 0, -1)
        rows = []
        for items in self._call(pipe.execute):
            mine = []
            for item in items:
                seq, _, content = item.partition(b"|")
                e = json.loads(content)
                if int(seq) > since and (kinds is None or (e[4] == LABEL_SURFACE and e[3] in kinds)):
                    mine.append((e[1], e[2], e[3], e[4], e[5]))
            if limit is not None:
                mine = sorted(mine, key=lambda r: r[4], reverse=True)[:limit]
            rows += mine
        return pd.DataFrame(rows, columns=["user_id", "pin_id", "event_type", "surface", "event_us"])

    def frame(self) -> pd.DataFrame:
        events = [e for _, e in self._entries(0, self.last_seq())]
        df = pd.DataFrame(events, columns=["event_id", "user_id", "pin_id", "event_type", "surface", "event_us"])
        df["event_timestamp"] = pd.to_datetime(df.pop("event_us"), unit="us", utc=True).astype("datetime64[us, UTC]")
        return df[list(LOG_COLUMNS)]

    @contextmanager
    def _push_lock(self):
        token = uuid.uuid4().hex
        key = f"{self.prefix}:push-lock"
        deadline = time.monotonic() + self.timeout
        while not self._call(self.client.set, key, token, nx=True, px=int(max(self.timeout, 30.0) * 1000)):
            if time.monotonic() > deadline:
                raise LogUnavailable(f"event log {self.path}: another process has been pushing for over "
                                     f"{self.timeout:g} s")
            time.sleep(0.002)
        try:
            yield
        finally:
            self._call(self.client.eval, "if redis.call('GET', KEYS[1]) == ARGV[1] then "
                       "return redis.call('DEL', KEYS[1]) end return 0", 1, key, token)

    def close(self) -> None:
        self.client.close()


def open_log(cfg: Config) -> _Log:
    """The data dir's event log: SQLite under the data dir, or Redis (``ingest.log``)."""
    if cfg.ingest.log == "redis":
        return RedisEventLog(cfg.ingest.redis_connection or cfg.features.redis_connection, cfg.ingest.lock_seconds)
    return EventLog(log_path(cfg), timeout=cfg.ingest.lock_seconds)


def _log_rows(events: pd.DataFrame) -> list[tuple]:
    ts = pd.to_datetime(events["event_timestamp"], utc=True).astype("datetime64[us, UTC]")
    us = ts.astype("int64").to_numpy()
    return [(str(e), int(u), int(p), str(t), str(s), int(x)) for e, u, p, t, s, x in
            zip(events["event_id"], events["user_id"], events["pin_id"], events["event_type"], events["surface"], us,
                strict=True)]


def _has_log(cfg: Config) -> bool:
    """Whether the data dir may hold logged events (a Redis log always may; a SQLite one once its file exists)."""
    return cfg.ingest.log == "redis" or log_path(cfg).exists()


def export(cfg: Config, path: Path) -> tuple[int, int] | None:
    """Write the data dir's logged events to ``path`` (parquet, the raw events' columns plus ``event_id``) for the
    batch build: (events, the log's last sequence number), or None (and no file) when the log holds no event."""
    from training.io import atomic_write_parquet

    df, through = None, 0
    if _has_log(cfg):
        events = open_log(cfg)
        try:
            if events.count():
                df, through = events.frame(), events.last_seq()
        finally:
            events.close()
    if df is None:   # no file for an empty log: the snapshot id stays that of the raw files alone
        path.unlink(missing_ok=True)
        return None
    import pyarrow as pa

    table = pa.Table.from_pandas(df, preserve_index=False).cast(pa.schema([
        ("event_id", pa.string()), ("user_id", pa.int64()), ("pin_id", pa.int64()), ("event_type", pa.string()),
        ("event_timestamp", pa.timestamp("us", tz="UTC")), ("surface", pa.string())]))
    atomic_write_parquet(table, path)
    return len(df), through


def repush(cfg: Config, features, through_seq: int) -> dict[str, int] | None:
    """After a materialize of a snapshot that holds the log up to ``through_seq``: push again every user with events
    logged after it, so the batch values just written do not hide what the log holds beyond the snapshot."""
    if not _has_log(cfg):
        return None
    events = open_log(cfg)
    try:
        events.rewind(through_seq)
        return events.flush(SequencePusher(cfg, features))
    finally:
        events.close()


class SequencePusher:
    """Computes ``user_sequence`` rows from the live snapshot and logged events and pushes them through Feast."""

    def __init__(self, cfg: Config, features=None):
        self.cfg = cfg
        self._features = features
        self._snapshot: tuple[Path, dict[str, Any]] | None = None

    @property
    def features(self):
        if self._features is None:
            from training.features.store import feature_store

            self._features = feature_store(self.cfg)
        return self._features

    def live(self) -> dict[str, Any]:
        """The live snapshot's tables, transform settings and canonical map (re-read when ``live`` moves)."""
        link = (self.cfg.data_path / "live").resolve()
        if self._snapshot is None or self._snapshot[0] != link:
            manifest = json.loads((link / "manifest.json").read_text())
            import pyarrow.parquet as pq

            cmap = pq.read_table(link / "tables" / "pin_canonical_map.parquet",
                                 columns=["pin_id", "canonical_pin_id"]).to_pandas()
            order = np.argsort(cmap["pin_id"].to_numpy())
            transform = manifest["config"]["transform"]
            self._snapshot = (link, {
                "path": link, "history_length": int(transform["history_length"]),
                "base": BaseSequences(link / "tables" / "user_sequence.parquet"),
                "weights": {k: float(v) for k, v in transform["engagement_weights"].items()},
                "through_seq": int(manifest.get("ingested_through_seq", 0)),
                "pins": cmap["pin_id"].to_numpy(np.int64)[order],
                "canonical": cmap["canonical_pin_id"].to_numpy(np.int64)[order],
            })
        return self._snapshot[1]

    def warm(self) -> None:
        """Read the live snapshot's canonical map and newest sequences now rather than on the first push."""
        self.live()["base"].pairs([])

    def _logged(self, events: pd.DataFrame) -> dict[int, set[tuple[int, int]]]:
        """Each user's positive Homefeed engagements among ``events`` as (instant, canonical pin) pairs."""
        live = self.live()
        positive = events[(events["surface"] == LABEL_SURFACE)
                          & (events["event_type"].map(live["weights"]).fillna(0.0) > 0)]
        pins = positive["pin_id"].to_numpy(np.int64)
        at = np.searchsorted(live["pins"], pins).clip(0, max(len(live["pins"]) - 1, 0))
        known = live["pins"][at] == pins if len(live["pins"]) else np.zeros(len(pins), bool)
        logged: dict[int, set[tuple[int, int]]] = {}
        for u, t, p in zip(positive["user_id"].to_numpy()[known], positive["event_us"].to_numpy()[known],
                           live["canonical"][at][known], strict=True):
            logged.setdefault(int(u), set()).add((int(t), int(p)))
        return logged

    def events(self, users: list[int], fetch) -> pd.DataFrame:
        """The logged events the rows of ``users`` need, from a log's ``fetch(users, since, kinds, limit)``: the
        positive Homefeed events logged after the live snapshot (the earlier ones are in its rows), each user's
        newest 2 × ``history_length`` by time; a user whose newest events collapse to fewer distinct (instant,
        canonical pin) pairs than ``history_length`` gets all of them. The work per push is bounded by the users it
        pushes, however long the log."""
        live = self.live()
        n = live["history_length"]
        kinds = sorted(k for k, w in live["weights"].items() if w > 0)
        events = fetch(users, since=live["through_seq"], kinds=kinds, limit=2 * n)
        counts = events["user_id"].value_counts()
        logged = self._logged(events)
        full = [int(u) for u in counts.index[counts >= 2 * n] if len(logged.get(int(u), ())) < n]
        if full:
            events = pd.concat([events[~events.user_id.isin(full)],
                                fetch(full, since=live["through_seq"], kinds=kinds, limit=None)],
                               ignore_index=True)
        return events

    def rows(self, users: list[int], events: pd.DataFrame) -> pd.DataFrame:
        """The ``user_sequence`` row of each user that has at least one positive Homefeed engagement."""
        live = self.live()
        base = live["base"].pairs(users)
        logged = self._logged(events)
        out = []
        n = live["history_length"]
        for u in users:
            pairs = sorted(base.get(u, set()) | logged.get(u, set()))[-n:]
            if not pairs:
                continue
            out.append(sequence_row(u, pairs))
        return pd.DataFrame(out, columns=["user_id", "event_timestamp", "recent_pin_ids", "recent_pin_ages_days",
                                          "history_length", "user_sequence_at"])

    def push(self, users: list[int], events) -> int:
        """Push the rows of ``users``; ``events`` is their logged events, or a log's fetch function (``events``)."""
        rows = self.rows(users, events if isinstance(events, pd.DataFrame) else self.events(users, events))
        if len(rows):
            self.features.push(PUSH_SOURCE, rows)
        return len(rows)


def sequence_row(user_id: int, pairs: list[tuple[int, int]]) -> dict[str, Any]:
    """dbt's ``user_sequence`` row for the (instant in µs, canonical pin) pairs of a user, oldest first."""
    newest = pairs[-1][0]
    stamp = newest + 1
    newest_first = pairs[::-1]
    return {
        "user_id": int(user_id),
        "event_timestamp": pd.Timestamp(stamp, unit="us", tz="UTC"),
        "recent_pin_ids": [p for _, p in newest_first],
        "recent_pin_ages_days": [(_epoch(newest) - _epoch(t)) / 86400.0 for t, _ in newest_first],
        "history_length": len(pairs),
        "user_sequence_at": pd.Timestamp(stamp // US * US, unit="us", tz="UTC"),
    }


def _epoch(us):
    """Seconds since the epoch as DuckDB's ``epoch()`` computes them (milliseconds / 1e3 + the remaining
    microseconds / 1e6), so that ages computed here are the same doubles dbt writes, bit for bit. ``us``: an int or
    an int64 array."""
    return (us // 1000) / 1e3 + (us % 1000) / 1e6


class BaseSequences:
    """Each user's newest ``user_sequence`` row of a snapshot as (instant in µs, pin) pairs, read once (on first use)
    into flat arrays: users sorted, offsets, instants, pins (16 bytes per entry: 80 MB for 100,000 users with 50
    pins each). The instant of each entry is the newest engagement's (the row's time - 1 µs) minus its age
    (``_times``)."""

    def __init__(self, path: Path):
        self.path = path
        self._arrays: tuple[np.ndarray, ...] | None = None
        self._lock = threading.Lock()

    def _load(self) -> tuple[np.ndarray, ...]:
        with self._lock:
            if self._arrays is None:
                import duckdb

                with duckdb.connect() as con:
                    df = con.execute(
                        "select user_id, epoch_us(max(event_timestamp)) as stamp, "
                        "arg_max(recent_pin_ids, event_timestamp) as pins, arg_max(recent_pin_ages_days, "
                        f"event_timestamp) as ages from read_parquet('{self.path}') group by user_id order by user_id"
                    ).df()
                lens = df["pins"].map(len).to_numpy(np.int64)
                offsets = np.concatenate([[0], np.cumsum(lens)])
                empty = np.zeros(0, np.int64)
                pins = np.concatenate([np.asarray(p, np.int64) for p in df["pins"]]) if len(df) else empty
                times = np.concatenate([_times(int(s) - 1, np.asarray(a, float)) for s, a in
                                        zip(df["stamp"], df["ages"], strict=True)]) if len(df) else empty
                self._arrays = (df["user_id"].to_numpy(np.int64), offsets, times, pins)
            return self._arrays

    def pairs(self, users: list[int]) -> dict[int, set[tuple[int, int]]]:
        ids, offsets, times, pins = self._load()
        out: dict[int, set[tuple[int, int]]] = {}
        for u in users:
            i = int(np.searchsorted(ids, u))
            if i < len(ids) and ids[i] == u:
                a, b = offsets[i], offsets[i + 1]
                out[int(u)] = set(zip(times[a:b].tolist(), pins[a:b].tolist(), strict=True))
        return out


def _times(newest: int, ages: np.ndarray) -> np.ndarray:
    """The µs instants whose ages from ``newest`` (DuckDB's arithmetic) are exactly ``ages``. Rounding
    ``newest - age`` to the microsecond is exact for nearly every entry; for the few where the doubles' rounding
    moved it by one, the neighbour whose age matches bit for bit is taken."""
    guess = np.rint(newest - ages * 86400.0 * US).astype(np.int64)
    for delta in (0, -1, 1):
        t = guess + delta
        hit = (_epoch(newest) - _epoch(t)) / 86400.0 == ages
        if delta == 0:
            best, found = t.copy(), hit.copy()
        else:
            best[~found & hit] = t[~found & hit]
            found |= hit
    return best
