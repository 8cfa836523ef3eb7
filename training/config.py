"""The project's one typed configuration.

``Config`` holds every default, once. A YAML file (``--config FILE``, or ``RETRIEVAL_CONFIG`` for the
service) holds overrides only, and the command lines derive one ``--section.field`` flag per field from it,
with the field's docstring as help text (``add_config_flags`` / ``config_from_args``). Each section checks
its own values in ``__post_init__`` and names the offending field in the error. The dbt project's variables
are the ``TransformConfig`` fields marked ``dbt_var``; ``retrieval`` always passes them to dbt.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import json
import os
import re
import typing
from dataclasses import dataclass, field
from datetime import UTC, datetime, time
from functools import cache
from pathlib import Path
from typing import Any

import yaml

REPO_ROOT = Path(__file__).resolve().parent.parent
"""The checkout: where feature_store.yaml, dbt_project/ and feature_repo/ live."""

CONFIG_ENV = "RETRIEVAL_CONFIG"
"""Environment variable naming a YAML file of overrides (read by the service and by every command)."""
DATA_DIR_ENV = "RETRIEVAL_DATA_DIR"
"""Environment variable naming the data dir (default: ``.data`` in the checkout)."""


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field."""


def _check(cond: bool, name: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"config {name}: {msg}")


def _positive(section: Any, prefix: str, *names: str) -> None:
    """Every named field of ``section`` must be > 0 (errors name ``<prefix>.<field>``)."""
    for name in names:
        _check(getattr(section, name) > 0, f"{prefix}.{name}", f"must be > 0, got {getattr(section, name)}")


def _identifier(value: str, name: str) -> None:
    _check(re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", value) is not None, name,
           "letters, digits and underscores, not starting with a digit")


def parse_utc(value: str) -> datetime:
    """Parse an ISO date or datetime as an aware UTC datetime."""
    dt = datetime.fromisoformat(value)
    return dt.replace(tzinfo=UTC) if dt.tzinfo is None else dt.astimezone(UTC)


@dataclass
class DataConfig:
    """Where raw events come from and how the synthetic generator shapes them."""

    source: str = "synthetic"
    """Raw data source: 'synthetic' (embedded default) or 'movielens'."""
    movielens_path: str = ""
    """MovieLens directory: ML-100k files (u.data, u.item, u.user), ML-1M / ML-10M files (ratings.dat, movies.dat[,
    users.dat]) or ml-latest csv (ratings.csv, movies.csv)."""
    until: str = ""
    """Cut the data stage at this UTC date (ISO, midnight): events, pins, users and follows at or after it are left
    out before dbt computes anything (the `until` dbt var), so the snapshot's as_of is at most this date. Replays
    any source by time (MovieLens: move it forward each retrain); empty = no cut."""
    seed: int = 7
    """Random seed of the synthetic generator; same seed and sizes give byte-identical raw files."""
    n_users: int = 3000
    """Synthetic: number of users."""
    n_pins: int = 8000
    """Synthetic: number of pins (including near-duplicate copies)."""
    n_events: int = 400_000
    """Synthetic: approximate number of raw events (impressions plus engagements)."""
    n_interests: int = 24
    """Synthetic: number of interests (topics)."""
    days: int = 120
    """Synthetic: length of the event history in days."""
    end_date: str = "2026-11-01"
    """Synthetic: the (exclusive) UTC end of the event history."""
    duplicate_fraction: float = 0.1
    """Synthetic: fraction of pins that are near-duplicate copies of another pin's image."""
    zipf_exponent: float = 1.05
    """Synthetic: exponent of the Zipf-like pin popularity within an interest."""
    other_surface_share: float = 0.25
    """Synthetic: share of impressions shown on the other surfaces (split evenly between search and related)
    instead of Homefeed. They come from the same user–pin affinity process, so their engagements say as much
    about a user's tastes; only Homefeed ones become labels, all feed the cross-surface pre-training mart."""

    def __post_init__(self) -> None:
        _check(self.source in ("synthetic", "movielens"), "data.source",
               f"must be 'synthetic' or 'movielens', got {self.source!r}")
        _positive(self, "data", "n_users", "n_pins", "n_events", "n_interests", "days")
        _check(0 <= self.duplicate_fraction < 1, "data.duplicate_fraction", "must be in [0, 1)")
        _check(self.zipf_exponent > 0, "data.zipf_exponent", "must be > 0")
        _check(0 <= self.other_surface_share < 0.5, "data.other_surface_share",
               f"must be in [0, 0.5) (homefeed stays the majority), got {self.other_surface_share}")
        try:
            parse_utc(self.end_date)
        except ValueError as e:
            raise ConfigError(f"config data.end_date: not an ISO date: {self.end_date!r}") from e
        if self.until:
            try:
                until = parse_utc(self.until)
            except ValueError as e:
                raise ConfigError(f"config data.until: not an ISO date: {self.until!r}") from e
            _check(until.time() == time(0), "data.until",
                   f"must be a date (midnight UTC; snapshots end at a midnight), got {self.until!r}")

    @property
    def until_utc(self) -> datetime | None:
        """``until`` as an aware UTC datetime (None: no cut)."""
        return parse_utc(self.until) if self.until else None


@dataclass
class ContractConfig:
    """The pandera contracts on raw inputs."""

    max_bad_fraction: float = 0.01
    """Fail the stage when more than this fraction of a file's rows is quarantined."""
    min_timestamp: str = "1990-01-01"
    """Earliest accepted event/creation timestamp (UTC)."""
    max_future_days: int = 1
    """Timestamps more than this many days after the run time are rejected."""
    chunk_rows: int = 1_000_000
    """The events file is checked and staged this many rows at a time (a parquet row group each), so the contract's
    memory is bounded by the part, not the file (about 1 GiB per million rows of pandas frames and checks). It
    changes how, not what: a snapshot's content and id do not depend on it."""

    def rules(self) -> dict[str, Any]:
        """The settings that decide what the contract accepts (part of a snapshot's id and lineage)."""
        return {k: v for k, v in vars(self).items() if k != "chunk_rows"}

    def __post_init__(self) -> None:
        _positive(self, "contracts", "chunk_rows")
        _check(0 <= self.max_bad_fraction <= 1, "contracts.max_bad_fraction", "must be in [0, 1]")
        _check(self.max_future_days >= 0, "contracts.max_future_days", "must be >= 0")
        try:
            parse_utc(self.min_timestamp)
        except ValueError as e:
            raise ConfigError(f"config contracts.min_timestamp: not an ISO date: {self.min_timestamp!r}") from e


def dbt_var(default: Any = dataclasses.MISSING, **kw: Any) -> Any:
    """A TransformConfig field that is also a variable of the dbt project (``vars:`` in dbt_project.yml)."""
    return field(default=default, metadata={"dbt_var": True}, **kw)


def _default_engagement_weights() -> dict[str, float]:
    return {"closeup": 1.0, "click": 2.0, "save": 4.0, "hide": 0.0}


@dataclass
class TransformConfig:
    """The dbt stage. Fields marked ``dbt_var`` are passed as ``--vars``; dbt_project.yml repeats their
    defaults for a plain ``dbt build`` (a test keeps the two equal)."""

    half_life_days: float = dbt_var(14.0)
    """Half-life of the time-decayed engagement, in days."""
    corpus_window_days: int = dbt_var(90)
    """Only engagement in this many days before the data's end counts toward the serving corpus."""
    corpus_size: int = dbt_var(100_000)
    """Maximum number of (canonical) pins in the serving corpus."""
    history_length: int = dbt_var(50)
    """Length of the user's recent-engaged-pins sequence feature."""
    top_interests: int = dbt_var(3)
    """Number of interest ids in the user's top-interests feature."""
    impression_window_days: int = dbt_var(90)
    """Window of the user's impressions by interest (``user_impressions``, every surface)."""
    engagement_weights: dict[str, float] = dbt_var(default_factory=_default_engagement_weights)
    """Weight of each engagement type in the decayed engagement (hides are negative feedback: weight 0)."""
    threads: int = 2
    """DuckDB threads used by dbt."""
    memory_gib: float = 4.0
    """DuckDB's memory limit for dbt (GiB): past it, joins, aggregates and sorts spill to
    ``<data_dir>/tmp/dbt-spill`` instead of growing the process (DuckDB's own default is 80% of the machine's
    memory)."""
    keep_snapshots: int = 3
    """Finished data snapshots kept on disk (the live one is always kept)."""

    def __post_init__(self) -> None:
        _check(self.half_life_days > 0, "transform.half_life_days", "must be > 0")
        _positive(self, "transform", "corpus_window_days", "corpus_size", "history_length", "top_interests",
                  "impression_window_days", "threads", "memory_gib", "keep_snapshots")
        _check(set(self.engagement_weights) == {"closeup", "click", "save", "hide"}, "transform.engagement_weights",
               f"needs exactly closeup, click, save and hide, got {sorted(self.engagement_weights)}")
        _check(all(w >= 0 for w in self.engagement_weights.values()), "transform.engagement_weights",
               "weights must be >= 0")

    def dbt_vars(self) -> dict[str, Any]:
        """The dbt project's variables, from this config."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.metadata.get("dbt_var")}


@dataclass
class FeatureConfig:
    """Feast stores. Feature views, TTLs and feature services are declared in feature_repo/."""

    online_store: str = "sqlite"
    """Online store: 'sqlite' (embedded default, bulk writer) or 'redis' (scale-out)."""
    redis_connection: str = "localhost:6379"
    """Redis connection string when online_store is 'redis'."""
    historical_chunk_rows: int = 25_000
    """Point-in-time joins (training set, evaluation) call Feast's offline store with at most this many entity
    rows at a time, in time order. Its DuckDB join holds every feature row at or before each entity row (within
    the TTL) before keeping the newest, so one call over 748k labels spilled more than 45 GB to disk and failed;
    25,000 rows peaked at 5 GB there (the experiment log, docs/experiment-log.md)."""
    candidate_chunk_rows: int = 200_000
    """Entity rows per Feast call when the evaluation reads every candidate's pin features at the index refreshes
    (validation, test, the retrain gate, the report). The pin service joins a few narrow columns, so its calls can
    be larger than the training set's: at M (64k candidates at 20 refreshes, 1.3M rows) 200,000 rows took 5.6 s
    where 25,000 took 11.9 s, at the same peak memory (the experiment log)."""
    incremental_training_set: bool = True
    """A training set build that finds the previous one of the same lineage (a later cut or continuation of the same
    data, the same feature services) whose labels are unchanged up to its end joins only the labels after that end
    and appends them, copying the previous rows as they are; anything else (or false) rebuilds it whole. Both
    give the same file (a test asserts it)."""

    def __post_init__(self) -> None:
        _check(self.online_store in ("sqlite", "redis"), "features.online_store", "must be 'sqlite' or 'redis'")
        _positive(self, "features", "historical_chunk_rows", "candidate_chunk_rows")


@dataclass
class IndexConfig:
    """The versioned pin index (Milvus) and the release registry."""

    uri: str = ""
    """Milvus server URI (e.g. http://milvus:19530); empty = embedded milvus-lite, one database file per
    collection under <data_dir>/milvus, so building a new version never touches the file a service holds."""
    token: str = ""
    """Milvus server token ("user:password"), if the server needs one."""
    collection_prefix: str = "pins"
    """Collections are named <prefix>_<model version>."""
    alias: str = "pins_live"
    """Alias re-pointed at the live collection on publish and rollback (Milvus server; milvus-lite 2.5 has no
    aliases, so an embedded deployment switches through the release registry alone)."""
    index_type: str = "FLAT"
    """Vector index: FLAT (exact; the embedded default, see bench/bench_index.py), IVF_FLAT or HNSW (Milvus server;
    milvus-lite 2.5 has no HNSW and ignores IVF parameters)."""
    nlist: int = 0
    """IVF_FLAT clusters; 0 = 4·sqrt(rows), clipped to [1, 4096]."""
    nprobe: int = 16
    """IVF_FLAT clusters searched per query; publish raises it (×2 steps) until verification passes."""
    hnsw_m: int = 16
    """HNSW graph degree."""
    hnsw_ef_construction: int = 200
    """HNSW build breadth (a better graph for a slower build; publish cannot raise it after the build)."""
    hnsw_ef: int = 128
    """HNSW search breadth (also raised by publish when verification needs it)."""
    partition_key: bool = True
    """Milvus server: the interest id is the collection's partition key, so a search filtered to a few interests
    visits their partitions' own HNSW graphs. On 1M pins (bench/bench_service.py; docs/experiment-log.md) it is the
    only layout measured that passes publish's recall gate: without it unfiltered recall@100 was 0.939 at ef 1024;
    with 8 partitions filtered recall was 0.916. It costs unfiltered searches, which visit every partition.
    milvus-lite has no partitions and ignores it."""
    partitions: int = 0
    """Milvus server, with ``partition_key``: the collection's number of partitions the interests hash into (each
    with its own segments and graphs; an unfiltered search visits all of them); 0 = Milvus' default (64)."""
    insert_batch: int = 10_000
    """Rows per insert call."""
    verify_queries: int = 200
    """Sampled users whose ANN top-k is compared with exact search before a release goes live."""
    verify_k: int = 100
    """k of the verification recall."""
    min_recall: float = 0.95
    """A release goes live only if ANN recall@verify_k against exact search reaches this."""
    keep_releases: int = 3
    """Published releases kept (collection, user tower, record); older ones are deleted."""

    def __post_init__(self) -> None:
        _check(self.index_type in ("IVF_FLAT", "HNSW", "FLAT"), "index.index_type", "must be IVF_FLAT, HNSW or FLAT")
        _positive(self, "index",
                  "nprobe", "hnsw_m", "hnsw_ef_construction", "hnsw_ef", "insert_batch", "verify_queries", "verify_k",
                  "keep_releases")
        _check(self.nlist >= 0, "index.nlist", "must be >= 0")
        _check(0 <= self.partitions <= 4096, "index.partitions", "must be in [0, 4096] (0 = Milvus' default)")
        _check(0 < self.min_recall <= 1, "index.min_recall", "must be in (0, 1]")
        _identifier(self.collection_prefix, "index.collection_prefix")
        _identifier(self.alias, "index.alias")


@dataclass
class ServeConfig:
    """The BentoML retrieval service (bentos/service.py)."""

    host: str = "127.0.0.1"
    """Address `make run` serves on."""
    port: int = 3000
    """Port `make run` serves on."""
    max_k: int = 1000
    """Largest k a request may ask for."""
    max_interests: int = 64
    """Most interest ids one request may filter on."""
    max_body_bytes: int = 16_384
    """Larger request bodies get 413."""
    max_header_bytes: int = 16_384
    """A request whose header block (request line and headers) is larger gets 431 and its connection is closed, as
    soon as that much has been read (bentos/http_limits.py)."""
    header_seconds: float = 5.0
    """A connection that has not sent a request's complete header block this long after it opened (or after the
    request's first byte, on a kept-alive connection) gets 408 and is closed."""
    poll_seconds: float = 1.0
    """How often the service checks the registry for a new live release."""
    threads: int = 8
    """Request threads per worker (sync API methods run on this many threads)."""
    workers: int = 1
    """Worker processes (each loads the live release)."""
    max_in_flight: int = 32
    """Most requests in flight per worker: past the worker's limit POST /retrieve is refused at once with 503 +
    Retry-After. The limit starts here and adapts to the latency of the admitted requests, never above this and never
    below ``min_in_flight`` (bentos/admission.py)."""
    min_in_flight: int = 4
    """The adaptive in-flight limit never falls below this."""
    latency_target_seconds: float = 0.5
    """The admitted requests' latency the in-flight limit aims at: it falls when more than a tenth of the requests of
    a quarter second took longer, and rises while none did and the limit was reached."""
    shed_delay_seconds: float = 1.0
    """A request past the in-flight limit gets its 503 this long after its headers arrived (its connection reads
    nothing meanwhile), so a client that sends again at once on a 503 cannot spin the worker (bentos/http_limits.py).
    0 answers at once."""
    shed_rate: float = 100.0
    """Most 503s a worker writes per second while it sheds: a refused request waits for its answer
    max(``shed_delay_seconds``, refusals waiting / ``shed_rate``) seconds, so however many clients send again at once,
    refusing costs the worker a bounded share of its time (bentos/http_limits.py)."""
    max_batch: int = 32
    """Most concurrent requests whose feature reads, user-tower passes and ANN searches run as one batch
    (bentos/batching.py; batches form only under load, nothing waits to fill one)."""
    body_seconds: float = 5.0
    """A request body that has not fully arrived after this long gets 408."""
    request_seconds: float = 10.0
    """Server-side timeout of one request."""
    store_timeout_seconds: float = 1.0
    """Longest wait on the online store (e.g. a locked SQLite file) before a request gets 503."""

    def __post_init__(self) -> None:
        _positive(self, "serve", "port", "max_k", "max_interests", "max_body_bytes", "max_header_bytes",
                  "header_seconds", "threads", "workers", "min_in_flight", "latency_target_seconds", "shed_rate",
                  "max_in_flight", "max_batch", "body_seconds", "request_seconds", "store_timeout_seconds")
        _check(self.poll_seconds > 0, "serve.poll_seconds", "must be > 0")
        _check(self.shed_delay_seconds >= 0, "serve.shed_delay_seconds", "must be >= 0")
        _check(self.min_in_flight <= self.max_in_flight, "serve.min_in_flight",
               f"must be <= serve.max_in_flight ({self.max_in_flight}), got {self.min_in_flight}")


@dataclass
class IngestConfig:
    """Real-time engagement ingestion: POST /events on the service (bentos/ingest.py, training/features/realtime.py).
    Accepted events go to a durable append-only log (``<data_dir>/events/ingest.db``, SQLite in WAL mode) before the
    answer, the affected users' recent-engagement features are pushed to the online store through Feast, and the
    next ``retrieval build`` reads the log like the raw files."""

    log: str = "sqlite"
    """Where acknowledged events are kept: 'sqlite' (``<data_dir>/events/ingest.db``, WAL, ``synchronous=FULL``: the
    service's workers on one machine) or 'redis' (a stream on the Redis server: service machines share it; its
    durability is the server's, ``appendonly yes`` with ``appendfsync always``)."""
    redis_connection: str = ""
    """host:port of the Redis that holds the log when ``log`` is 'redis'; empty = ``features.redis_connection``."""
    max_events: int = 1000
    """Most events one POST /events may carry; a larger batch gets 400 and nothing of it is applied."""
    max_body_bytes: int = 1_048_576
    """Larger POST /events bodies get 413."""
    max_future_seconds: float = 300.0
    """An event stamped later than the service's clock plus this is refused (clock skew allowance)."""
    lock_seconds: float = 2.0
    """Longest wait for the event log (one writer at a time per data dir) before a batch gets 503 + Retry-After."""

    def __post_init__(self) -> None:
        _positive(self, "ingest", "max_events", "max_body_bytes", "lock_seconds")
        _check(self.log in ("sqlite", "redis"), "ingest.log", f"must be 'sqlite' or 'redis', got {self.log!r}")
        _check(self.max_future_seconds >= 0, "ingest.max_future_seconds", "must be >= 0")


def _choice(value: str, name: str, options: tuple[str, ...]) -> None:
    _check(value in options, name, f"must be one of {', '.join(options)}, got {value!r}")


@dataclass
class PretrainConfig:
    """Pre-trained ID embeddings (``retrieval pretrain``): user and pin tables learned on a window of engagement
    that ends where the two-tower's training window begins (``train.window_fraction``)."""

    method: str = "ridge_svd"
    """'ridge_svd' (default): the low-rank ridge item-item model of the window's engagements, from a truncated
    sparse SVD (memory O(engagements + pins × dim), nothing pins × pins); 'contrastive': user and pin tables trained
    with an in-batch softmax (+ logQ) on every positive engagement of the window, every surface, no positive
    downsampling; 'ease_svd': a rank-``dim`` factorisation of EASE's item-item matrix, which inverts a dense
    pins × pins matrix (small catalogs only: refused above ``max_dense_gib``). All give history-side and
    candidate-side pin tables; users = their pooled history."""
    dim: int = 48
    """Width of the pre-trained tables."""
    recency: float = 10.0
    """A user's history is pooled with weights exp(-r / recency), r = rank from the newest engagement (0 = newest);
    the same pooling as the towers' pre-trained history field."""
    epochs: int = 30
    """contrastive: maximum epochs (early stopping on the held-back newest tenth of the window)."""
    batch_size: int = 1024
    """contrastive: examples per step."""
    lr: float = 0.01
    """contrastive: Adam learning rate."""
    temperature: float = 0.1
    """contrastive: softmax temperature of the table scores."""
    l2: float = 500.0
    """ease_svd: EASE's λ."""
    ridge: float = 1.0
    """ridge_svd: the ridge λ relative to the mean squared singular value kept (each direction of singular value s
    is kept with weight s² / (s² + λ))."""
    pop_exponent: float = 0.15
    """ridge_svd: each pin's column is scaled by (its window engagements)^-β before the factorisation (β = this;
    0 = plain binary engagements; larger β lets less popular pins shape the subspace)."""
    max_dense_gib: float = 4.0
    """ease_svd: the largest dense pins × pins working set it may allocate (3 float64 matrices, estimated before
    anything is allocated); above it the pre-training stops with an error naming ridge_svd."""
    seed: int = 0
    """Seed of the contrastive training and of the SVD's start vector."""

    def __post_init__(self) -> None:
        _choice(self.method, "pretrain.method", ("contrastive", "ease_svd", "ridge_svd"))
        _positive(self, "pretrain", "dim", "recency", "epochs", "batch_size", "lr", "temperature", "l2", "ridge",
                  "max_dense_gib")
        _check(self.pop_exponent >= 0, "pretrain.pop_exponent", f"must be >= 0, got {self.pop_exponent}")


@dataclass
class TrainConfig:
    """The two-tower model and its training."""

    backbone: str = "mlp"
    """Feature crossing in both towers: 'mlp' (concatenated field tokens through an MLP), 'masknet' (parallel
    MaskNet, Pinterest's variant) or 'dhen' (MLP ∥ MaskNet, then MLP ∥ transformer over the field tokens)."""
    id_embed_dim: int = 64
    """Width of the learned id, interest and sequence-item embeddings."""
    field_dim: int = 32
    """Width of each field token (each feature group is projected to one layer-normalised token)."""
    hidden_dim: int = 256
    """Width of the backbone's hidden layers."""
    masknet_blocks: int = 4
    """MaskNet / DHEN: parallel mask blocks."""
    out_dim: int = 64
    """Width of the shared user/pin vector space (the ANN index dimension)."""
    normalize: bool = True
    """Unit-normalise both towers' outputs (cosine; the pin bias, if any, stays outside). Off: raw inner product
    (the index searches by inner product either way)."""
    pin_bias: bool = True
    """Reserve the last dimension for a per-pin bias: the user tower's last output is the constant 1 and the pin
    tower's is a learned scalar, so <u, p> = <u', p'> + b_p and popularity is one coordinate (with ``normalize``,
    u' and p' are unit vectors and the bias comes on top)."""
    temperature: float = 0.05
    """Softmax temperature τ at initialisation: logits = <u, p> / τ."""
    learn_temperature: bool = True
    """Learn τ (as a log-scale) with the model."""
    history_encoder: str = "pool"
    """How the learned history is read: 'pool' (attention pooling next to a mean) or 'transformer' (one
    transformer layer over the sequence, then the attention pooling)."""
    history_recency: float = 10.0
    """Recency scale of the pre-trained history field: item r (0 = newest) weighs exp(-r / history_recency)."""
    multi_embedding: int = 0
    """Multi-embedding users: up to this many user embeddings per user (K_max), one per cluster of the history
    (maxmin-initialised, single-assignment routing); a user with n history items keeps the first
    max(1, min(K_max, ceil(log2 n))). 0 = one embedding per user."""
    routing_iterations: int = 3
    """Routing rounds of the history clustering."""
    cluster_features: bool = True
    """Multi-embedding: the history is clustered by content (pin + interest embeddings, not recency), every item
    among the clusters the user keeps, and each embedding reads its own cluster's learned mean and interest mix and
    its own wide interest cross (the cluster's interests keep their log share of the whole history, the others get
    the floor of an interest never engaged with) in place of the whole history's; the pre-trained fields stay the
    whole history's. False (artifacts written before the switch): clusters over the recency-aware items, and only
    the attended-history field differs between a user's embeddings."""
    conditional: bool = False
    """Conditional retrieval: the user tower also reads an interest id (early fusion, one field like the others;
    a learned "no condition" value when none is given)."""
    condition_rate: float = 0.5
    """Conditional training: the share of examples conditioned on their target pin's interest (the others learn
    the unconditioned use)."""
    dropout: float = 0.1
    """Dropout inside the tower MLPs."""
    seq_dropout: float = 0.4
    """Training only: each item of the user's learned history sequence is dropped with this probability."""
    wide_counts: bool = True
    """With ``pin_bias``: the pin's log engagement counts also enter its bias linearly (a wide part beside the
    deep towers), since a layer-normalised field keeps little of a count's magnitude."""
    wide_interest: bool = True
    """With ``pin_bias``: a wide cross beside the deep towers, the user's smoothed log interest shares (from the
    history) against the pin's one-hot interest, with a learned scale; adds the number of interests to the index
    dimension."""
    impression_interests: bool = True
    """With ``wide_interest``: the user's interest shares of the wide cross also count what they were shown, their
    impressions of every surface by interest over ``impression_window_days`` (the ``user_impressions`` feature,
    a daily batch). A ranking system shows users what it believes they like, so impressions sample their interests
    several times more densely than engagements. Off: the shares of the engagement history alone."""
    pin_rates: bool = True
    """The pin tower also reads its 30-day counts as per-day rates over the days the pin was exposed (a young pin's
    counts cover its age only) and the idle days since its last feature row (which age it and thin its rates);
    off: the log counts and the age alone."""
    popularity_prior: bool = True
    """With ``pin_bias``: after training, a weight on the pin's log impression rate (its 30-day impressions per
    exposed day, an input of the pin tower) is added to its bias coordinate, chosen on validation recall@``valid_k``
    over ``training.train.PRIOR_GRID`` and kept only when its cross-fitted gain over no prior is above one standard
    error (as the blend weight). The training loss calibrates popularity for the training window; how much of it a
    top-K list should take at serving time is a retrieval choice, made on validation. Off: the towers as trained."""
    pin_id_dropout: float = 0.0
    """Training only: each pin the pin tower embeds is read as an unknown pin (no learned id, no pre-trained
    vector) with this probability, so the tower also learns to score pins from their features alone: the pins
    created after the training window, which it meets at serving time."""
    pretrained: str = "frozen"
    """Pre-trained ID embeddings (``retrieval pretrain``): 'none', 'frozen' (as Pinterest: not updated, dropout on
    top) or 'finetune' (initialised from the table, trained)."""
    pretrained_dropout: float = 0.5
    """Dropout on the pre-trained embeddings while training."""
    pretrained_blend: bool = True
    """Also append the pre-trained history pool / pin vector to the towers' outputs as their own subspace, so a
    score is w_learned · learned + w_table · pre-trained, with the weights chosen on validation after training
    (the index dimension becomes out_dim + pretrain.dim)."""
    blend_table: str = "refit"
    """Which table the blended subspace reads: 'refit' (default, chosen on validation), the same pre-training refit
    after training on everything before the evaluation (on train for the validation figure the blend weight is
    chosen by; on train + validation for the test evaluation and the released model, as the baselines are
    refit), so the subspace also knows the training window's engagements; 'training', the table the towers were
    trained with (it ends where the training window starts). The towers' fields keep the non-overlapping table
    either way."""
    blend_validation: str = "horizon"
    """Which validation table the blend weight is chosen with ('refit' only): 'horizon' (default), the pre-training
    refit on ``Split.horizon_matched()``'s train part, which ends round((t - v) / 2) rows before each user's
    validation part, so that validation targets sit as far past the table's data on average as test targets sit
    past the table refit on train + validation (test is ~2.5× validation's length); 'adjacent', refit on all of
    train (validation targets right after its data). A collaborative table ages faster than the towers where
    engagement drifts to fresh pins: chosen at validation's shorter horizon, its weight did not hold on test."""
    allow_overlapping_pretrain: bool = False
    """Ablation only: accept a pre-trained table whose window overlaps the training window (never the default)."""
    window_fraction: float = 0.3
    """The two-tower trains on the newest ``window_fraction`` of the training interactions (by time); the
    pre-trained table must end before that window starts. 1 = every interaction (then pre-training is off)."""
    negatives: str = "in_batch"
    """'in_batch' (the scalable default: other rows' positives, logQ-corrected) or 'full' (a softmax over every pin
    of the vocabulary; only for small catalogues)."""
    random_negatives: int = 0
    """Extra negatives per step drawn uniformly from the pin vocabulary (mixed negative sampling); 0 = off."""
    random_negative_share: float = 0.0
    """Extra uniform negatives per step as a share of the pin vocabulary (rounded; used when ``random_negatives`` is
    0), so their number follows the catalog's size; 0 = off."""
    logq: bool = True
    """Subtract the streaming log sampling probability of each in-batch pin (logQ correction)."""
    logq_prime: bool = False
    """Start the logQ estimates at the training examples' pin frequencies (each pin's expected gap between the
    batches it is in) instead of a flat guess the stream corrects only after hundreds of batches."""
    logq_weight: float = 1.0
    """Scale of the logQ correction: logits - logq_weight · log q (1 = the unbiased correction)."""
    hide_negatives: bool = False
    """Hides as hard negatives: each example's softmax also holds one of its user's hides (label 0: negative
    feedback on a pin the user was shown) from before the example, drawn uniformly, with that pin's features at the
    hide and no sampling correction. Only with 'in_batch' negatives; a no-op on data without hides (MovieLens)."""
    batch_size: int = 1024
    """Positive pairs per step."""
    target_window: int = 1
    """Each example's positive is drawn uniformly from the user's next ``target_window`` engagements (its own
    label and those after it, within the training window); 1 = next-engagement prediction."""
    user_weight_power: float = 0.0
    """Example weight n_u^-power (n_u = the user's examples): 0 = every example counts once, 1 = every user counts
    once, as the per-user mean of the evaluation does."""
    lr: float = 0.003
    """AdamW learning rate."""
    lr_schedule: str = "constant"
    """'constant' or 'cosine' (decay to 0 over ``epochs``)."""
    weight_decay: float = 0.0
    """AdamW weight decay (of the dense parameters only when the pin id table is sparse: ``id_optimizer``)."""
    id_optimizer: str = "auto"
    """How the learned pin id table (a row per vocabulary pin) is optimized: 'adamw', with the rest of the model
    (a dense gradient: every step updates every row, so a step's cost follows the vocabulary); 'sparse_adam', sparse
    gradients under its own ``torch.optim.SparseAdam``, which updates only the rows a step looked up (a step's cost
    follows the batch; no weight decay on the table); 'auto': 'sparse_adam' when the vocabulary has more than
    ``sparse_id_rows`` pins, else 'adamw'. The two reach the same validation recall on MovieLens-100k and the
    synthetic default (docs/experiment-log.md); `bench/bench_optimizer_step.py` measures a step of each."""
    sparse_id_rows: int = 200_000
    """With ``id_optimizer`` 'auto': the vocabulary size above which the pin id table is optimized sparsely."""
    epochs: int = 100
    """Maximum epochs: a safety net, not a schedule (runs stop by validation; the report says when the cap hit)."""
    patience: int = 6
    """Stop after this many epochs without a better validation recall@valid_k."""
    min_epochs: int = 12
    """Early stopping does not stop before this many epochs: the first epochs' validation recall can peak and dip
    before it climbs (measured on the synthetic default, where a run otherwise stopped at its epoch-1 figure)."""
    valid_k: int = 50
    """K of the validation recall used for early stopping."""
    valid_users: int = 10_000
    """Validation (each epoch's figure, the blend's and the popularity prior's choice) scores at most this many
    users, a fixed sample (by ``seed``) of those with validation rows (``Split.valid_sample``); 0 = every one. Each
    validated user is ranked against every pin, so validation costs users × pins per epoch and per weight tried: the
    cap keeps it linear in the pins on a large catalog (at 30,000 users / 64,000 candidates, 10,000 instead of all
    28,500 validation users took an epoch from ~65 to ~50 s and the blend's and prior's choices from 14.5 to 8.75
    minutes, the same test figure; docs/experiment-log.md). Catalogs with fewer users (MovieLens-100k, the
    synthetic default) validate on every one. The test evaluation always scores every user."""
    index_refresh_days: int = 1
    """Evaluation protocol (validation, test, the retrain gate): each user is scored against candidate vectors
    embedded from the pin features as of the pin index's last refresh at or before the user's cut-off, refreshes
    falling on every ``index_refresh_days``-th UTC midnight since 1970-01-01: 1 = daily, as ``retrain.every`` = 1d
    publishes a freshly embedded collection every day (a pin's feature row is written at the midnight after each
    active day, so a refresh reads every finished day)."""
    seed: int = 0
    """Seed of initialization, shuffling and dropout."""
    threads: int = 2
    """torch CPU threads per process."""

    def __post_init__(self) -> None:
        _positive(self, "train", "id_embed_dim", "field_dim", "hidden_dim", "masknet_blocks", "out_dim", "batch_size",
                  "target_window", "epochs", "patience", "min_epochs", "valid_k", "threads", "history_recency",
                  "index_refresh_days", "sparse_id_rows")
        _choice(self.backbone, "train.backbone", ("mlp", "masknet", "dhen"))
        _choice(self.history_encoder, "train.history_encoder", ("pool", "transformer"))
        _choice(self.pretrained, "train.pretrained", ("none", "frozen", "finetune"))
        _choice(self.negatives, "train.negatives", ("in_batch", "full"))
        _choice(self.lr_schedule, "train.lr_schedule", ("constant", "cosine"))
        _choice(self.id_optimizer, "train.id_optimizer", ("auto", "adamw", "sparse_adam"))
        _check(self.temperature > 0, "train.temperature", "must be > 0")
        _check(0 <= self.dropout < 1, "train.dropout", "must be in [0, 1)")
        _check(0 <= self.seq_dropout < 1, "train.seq_dropout", "must be in [0, 1)")
        _check(0 <= self.pin_id_dropout < 1, "train.pin_id_dropout", "must be in [0, 1)")
        _check(0 <= self.pretrained_dropout < 1, "train.pretrained_dropout", "must be in [0, 1)")
        _choice(self.blend_table, "train.blend_table", ("training", "refit"))
        _choice(self.blend_validation, "train.blend_validation", ("horizon", "adjacent"))
        _check(0 < self.window_fraction <= 1, "train.window_fraction", "must be in (0, 1]")
        _check(self.pretrained == "none" or self.window_fraction < 1, "train.window_fraction",
               "must be < 1 with pre-trained ids: the table's window ends where the training window starts")
        _check(self.multi_embedding >= 0, "train.multi_embedding", "must be >= 0 (0 = one embedding)")
        _check(self.multi_embedding != 1, "train.multi_embedding", "1 is the single embedding: use 0")
        _check(0 <= self.condition_rate <= 1, "train.condition_rate", "must be in [0, 1]")
        _check(self.routing_iterations >= 1, "train.routing_iterations", "must be >= 1")
        _check(self.logq_weight >= 0, "train.logq_weight", "must be >= 0")
        _check(self.valid_users >= 0, "train.valid_users", "must be >= 0 (0 = every user with validation rows)")
        _check(self.random_negatives >= 0, "train.random_negatives", "must be >= 0 (0 = off)")
        _check(0 <= self.random_negative_share <= 1, "train.random_negative_share", "must be in [0, 1] (0 = off)")
        _check(not self.hide_negatives or self.negatives == "in_batch", "train.hide_negatives",
               "needs train.negatives = 'in_batch' (the full softmax already holds every pin)")
        _check(self.user_weight_power >= 0, "train.user_weight_power", "must be >= 0")
        _check(self.lr > 0, "train.lr", "must be > 0")

    def sparse_ids(self, n_pins: int) -> bool:
        """Whether a pin id table of ``n_pins`` rows gets sparse gradients and SparseAdam (``id_optimizer``)."""
        return self.id_optimizer == "sparse_adam" or (self.id_optimizer == "auto" and n_pins > self.sparse_id_rows)


@dataclass
class ReportConfig:
    """``retrieval report``: the two-tower variants next to the baselines on one split."""

    seeds: int = 3
    """Training seeds of every two-tower row (same split); the table shows mean ± std."""
    variants: str = "default,backbone,pretrained,negatives"
    """Comma-separated ablation groups (training/evaluation/report.py: VARIANT_GROUPS; also 'wide', 'objective',
    'extra'); 'default' alone = the default config only."""
    baselines: str = "popularity,item-knn,als,ease,ease-recency,sansa"
    """Comma-separated baselines, each tuned on validation and refit on train + validation; one that cannot run
    here (a catalog over its memory limit, an optional package missing) is skipped with one line saying why."""

    grids: str = ""
    """JSON object replacing baselines' tuning grids, by baseline name: '{"als": {"factors": [16, 32], "alpha":
    [40, 100]}, "item-knn": [50, 100]}' (item-knn takes a list of k; the others a parameter -> values map, each
    parameter listed replacing that parameter's values, the rest kept). For large catalogs, where a full grid
    costs hours; the report records every baseline's grid."""

    def __post_init__(self) -> None:
        _positive(self, "report", "seeds")
        if self.grids.strip():
            try:
                grids = json.loads(self.grids)
            except json.JSONDecodeError as e:
                raise ConfigError(f"config report.grids: not JSON ({e.msg} at character {e.pos})") from None
            _check(isinstance(grids, dict), "report.grids", "a JSON object (baseline name -> grid)")


@dataclass
class RetrainConfig:
    """``retrieval retrain``: refresh the data, train a candidate, validate it against the live model on the newest
    data, publish it (or record why not), prune (training/retrain.py)."""

    every: str = "1d"
    """Interval between the starts of two cycles of an in-process loop (``--cycles`` > 1): a number with s, m, h
    or d ("30s", "6h", "1d"; "0s" = back to back). Cron or a Kubernetes CronJob run one cycle per call instead."""
    cycles: int = 1
    """Cycles to run in this process (1 = one retrain, what cron runs)."""
    simulate_days: int = 0
    """Demo and benchmark only: before each cycle, move the data on by this many days: the synthetic world is
    continued (``retrieval generate --continue``), a MovieLens replay moves ``data.until`` forward. 0 = take the
    raw data as the ingestion left it (production)."""
    skip_unchanged: bool = True
    """Skip the cycle after the data stage (recorded as 'skipped') when the new snapshot is the one the live
    release was trained on: no new data, nothing to learn."""
    warm_start: bool = False
    """Initialise the candidate from the live checkpoint (shared weights copied, pin ids remapped) instead of from
    scratch."""
    warm_epochs: int = 0
    """With ``warm_start``: the candidate trains at most this many epochs and may stop after the first (early stopping
    from epoch 1), as it starts from a model already trained on all but the newest days; 0 = ``train.epochs`` and
    ``train.min_epochs`` as for a fresh model."""
    keep_live_weights: bool = True
    """With ``warm_start``: the candidate keeps the live model's pre-trained blend and popularity-prior weights
    instead of choosing them on validation again (each choice ranks the validation users against every pin once per
    weight tried, minutes on a large catalog); the gate still compares the candidate with the live model. A live
    model without them (another config): chosen as for a fresh model."""
    test_evaluation: bool = False
    """Also score the candidate on the whole test part, as ``retrieval train`` does (its checkpoint's and release's
    ``metrics``). Off (default): the gate's scores of the candidate and the live model on the fresh holdout are the
    cycle's evaluation (in the history line and the release's ``gate``) and the release's ``metrics`` stay empty; at
    M the whole-test evaluation took 49 s of a cycle (the experiment log)."""
    metric: str = "capped_recall@50"
    """The gate's figure (a key of the harness's metrics)."""
    tolerance: float = 0.005
    """The candidate passes when its ``metric`` >= live's - tolerance on the fresh holdout."""
    min_metric: float = 0.0
    """And when its ``metric`` reaches this floor (an absolute guard, e.g. against a broken data day)."""
    min_coverage_ratio: float = 0.25
    """And when its coverage@50 (share of the candidates in someone's top 50) is >= this × live's: a guard against a
    collapse onto a few popular pins (popularity's coverage@50 is ~0.01 on the synthetic default), not a ranking
    figure. Healthy models measured 0.24–0.88 there, a candidate down to 0.49 × live's; at 0.5 this guard kept a
    warm-started live model with inflated coverage (0.60) against three better candidates (bench_retrain)."""
    min_holdout_users: int = 20
    """The fresh holdout is the test interactions at or after the live model's data end; with fewer users than
    this it is the whole test part (the record says which)."""
    pretrain_every_days: float = 7.0
    """Refresh the pre-trained ID table when the newest usable one ends more than this many days before the
    candidate's training window starts (the table never overlaps the window)."""
    keep_checkpoints: int = 4
    """Checkpoints kept under <data_dir>/models: the newest ones, plus always those of the published releases
    (the live one and its rollback target among them)."""
    keep_pretrained: int = 2
    """Pre-trained tables kept (the newest)."""

    def __post_init__(self) -> None:
        _check(re.fullmatch(r"\d+(\.\d+)?[smhd]", self.every) is not None, "retrain.every",
               f"a number with s, m, h or d (e.g. 30s, 6h, 1d), got {self.every!r}")
        _positive(self, "retrain", "cycles", "keep_checkpoints", "keep_pretrained", "pretrain_every_days")
        _check(self.simulate_days >= 0, "retrain.simulate_days", "must be >= 0")
        _check(self.warm_epochs >= 0, "retrain.warm_epochs", "must be >= 0 (0 = train.epochs, as a fresh model)")
        _check(self.tolerance >= 0, "retrain.tolerance", "must be >= 0")
        _check(0 <= self.min_metric <= 1, "retrain.min_metric", "must be in [0, 1]")
        _check(0 <= self.min_coverage_ratio <= 1, "retrain.min_coverage_ratio", "must be in [0, 1]")
        _check(self.min_holdout_users >= 1, "retrain.min_holdout_users", "must be >= 1")
        _check(re.fullmatch(r"(capped_)?recall@\d+|ndcg@\d+", self.metric) is not None, "retrain.metric",
               f"recall@K, capped_recall@K or ndcg@K, got {self.metric!r}")

    @property
    def every_seconds(self) -> float:
        return float(self.every[:-1]) * {"s": 1, "m": 60, "h": 3600, "d": 86400}[self.every[-1]]


def _default_data_dir() -> str:
    return os.environ.get(DATA_DIR_ENV, str(REPO_ROOT / ".data"))


@dataclass
class Config:
    """Everything a run needs. Sections mirror the pipeline stages."""

    data_dir: str = field(default_factory=_default_data_dir)
    """Root of all generated state (raw files, snapshots, Feast registry and online store, models, releases);
    default $RETRIEVAL_DATA_DIR, else .data in the checkout."""
    data: DataConfig = field(default_factory=DataConfig)
    contracts: ContractConfig = field(default_factory=ContractConfig)
    transform: TransformConfig = field(default_factory=TransformConfig)
    features: FeatureConfig = field(default_factory=FeatureConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    index: IndexConfig = field(default_factory=IndexConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)
    ingest: IngestConfig = field(default_factory=IngestConfig)
    report: ReportConfig = field(default_factory=ReportConfig)
    retrain: RetrainConfig = field(default_factory=RetrainConfig)


    @property
    def data_path(self) -> Path:
        return Path(self.data_dir).expanduser().resolve()

    @property
    def bentoml_home(self) -> Path:
        """This deployment's BentoML home (its model store holds the user towers); ``bentoml serve`` and
        ``bentoml build`` run with BENTOML_HOME set to it."""
        return self.data_path / "bentoml"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> Config:
        return _from_dict(cls, raw, prefix="")

    @classmethod
    def load(cls, path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> Config:
        """Defaults, then the YAML file of overrides (``path``, else ``$RETRIEVAL_CONFIG`` when set), then dotted
        overrides like {'data.seed': 3}."""
        raw: dict[str, Any] = {}
        path = path or os.environ.get(CONFIG_ENV) or None
        if path is not None:
            p = Path(path)
            if not p.exists():
                raise ConfigError(f"config file not found: {p}")
            raw = yaml.safe_load(p.read_text()) or {}
        for key, value in (overrides or {}).items():
            node = raw
            *parents, leaf = key.split(".")
            for part in parents:
                node = node.setdefault(part, {})
            node[leaf] = value
        return cls.from_dict(raw)


def _from_dict(cls: type, raw: dict[str, Any], prefix: str) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"config {prefix.rstrip('.') or '<root>'}: expected a mapping, got {type(raw).__name__}")
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(known))
    if unknown:
        raise ConfigError(f"config {prefix}{unknown[0]}: unknown field (known: {', '.join(known)})")
    kwargs = {}
    for name, value in raw.items():
        ftype = _field_type(cls, name)
        if dataclasses.is_dataclass(ftype):
            kwargs[name] = _from_dict(ftype, value, prefix=f"{prefix}{name}.")
        else:
            kwargs[name] = _coerce(value, ftype, f"{prefix}{name}")
    return cls(**kwargs)


@cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _field_type(cls: type, name: str) -> Any:
    return _hints(cls)[name]


def _coerce(value: Any, ftype: Any, name: str) -> Any:
    try:
        if ftype is bool:
            if isinstance(value, str):
                if value.lower() in ("1", "true", "yes"):
                    return True
                if value.lower() in ("0", "false", "no"):
                    return False
                raise ValueError(value)
            return bool(value)
        if typing.get_origin(ftype) is dict:
            if isinstance(value, str):   # a command-line flag: YAML / JSON text
                value = yaml.safe_load(value)
            if not isinstance(value, dict):
                raise ValueError(value)
            return {str(k): float(v) for k, v in value.items()}
        if ftype in (int, float, str):
            if ftype is int and isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return ftype(value)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"config {name}: expected {_type_name(ftype)}, got {value!r}") from e
    return value


@cache
def field_docs(cls: type) -> dict[str, str]:
    """Attribute docstrings (the string literal right under a field) of a dataclass."""
    tree = ast.parse(inspect.getsource(cls))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs: dict[str, str] = {}
    for prev, node in zip(body, body[1:], strict=False):
        if (
            isinstance(prev, ast.AnnAssign)
            and isinstance(prev.target, ast.Name)
            and isinstance(node, ast.Expr)
            and isinstance(node.value, ast.Constant)
            and isinstance(node.value.value, str)
        ):
            docs[prev.target.id] = node.value.value
    return docs


def iter_fields(cls: type = Config, prefix: str = ""):
    """Yield (dotted name, type, default, doc) for every leaf field; the CLI is built from this."""
    defaults = cls()
    docs = field_docs(cls)
    for f in dataclasses.fields(cls):
        ftype = _field_type(cls, f.name)
        if dataclasses.is_dataclass(ftype):
            yield from iter_fields(ftype, prefix=f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", ftype, getattr(defaults, f.name), docs.get(f.name, "")


def _type_name(ftype: Any) -> str:
    return "mapping" if typing.get_origin(ftype) is dict else ftype.__name__


def add_config_flags(parser) -> None:
    """Add ``--config FILE`` and one ``--section.field`` flag per config field to an argparse parser."""
    parser.add_argument("--config", help=f"YAML file of config overrides (default: ${CONFIG_ENV} when set)")
    group = parser.add_argument_group("config (see training/config.py)")
    for name, ftype, default, doc in iter_fields():
        group.add_argument(f"--{name}", dest=f"cfg:{name}", type=str, metavar=_type_name(ftype).upper(),
                           help=f"{doc} [default: {default}]")


def config_from_args(args) -> Config:
    """The config of parsed ``add_config_flags`` arguments: defaults, the YAML file, then the flags."""
    overrides = {k[4:]: v for k, v in vars(args).items() if k.startswith("cfg:") and v is not None}
    return Config.load(args.config, overrides)
