"""Deterministic synthetic Pinterest-like raw data with a known ground truth.

Generative process (U users, P pins, K interests, latent dimension d = ``LATENT_DIM``):

- Interests: ``K`` centroids ``c_k ~ N(0, CENTROID_STD² I_d)``.
- Users: a segment (country-like, non-uniform shares) with its own log-prior over interests; 1–5
  (mostly 2–4) dominant interests drawn without replacement from that prior (kept in the ground truth,
  ``GroundTruth.dominant``); the mixture
  ``θ_u = 0.9·Dirichlet-like weights on the dominant interests + 0.1·Dirichlet(0.5) background``;
  a taste vector ``z_u ~ N(0, I_d / d)``; a lognormal activity level; age, gender, signup time.
- Pins: a primary interest ``k_p``; ``v_p = c_k + N(0, PIN_NOISE_STD² I_d)``; Zipf-like popularity
  ``∫_r^{r+1} x^-s dx ≈ r^-s`` (s = ``zipf_exponent``) of a random rank r within the interest,
  which is sampled exactly by inverting the continuous CDF; ``created_at`` spread over the
  history (``PRE_HISTORY_SHARE`` of originals before it); a random 64-bit image signature.
  A ``duplicate_fraction`` of pins are near-duplicates of an older original: same signature and
  interest, ``v`` within ``DUPLICATE_NOISE_STD`` of the original's, created strictly later.
  Pin (user) ids increase with creation order (index) and are not dense.
- Trends: ``log w_k(t) = a_k sin(2πt/T_k + φ_k) + b_k (t/days - 1/2)`` (t in days since the start),
  evaluated at the hour of each impression; ``b_k`` makes some interests trend up, some down.
- Impressions: user ∝ activity, time uniform; interest ∝ ``θ_u ∘ w(t)``; pin within the interest
  ∝ ``pop_p · exp(a_up / τ)`` with affinity ``a_up = z_u·v_p``, by sampling-importance-resampling
  (``CANDIDATES`` popularity-weighted proposals, Gumbel-max on ``a/τ``). An impression before the
  pin's ``created_at`` is moved uniformly into ``[created_at, end)``.
- Outcome of an impression: none / closeup / click / save / hide with multinomial logits
  ``OUTCOME_BIAS + OUTCOME_SLOPE·a`` (higher affinity → more saves, lower → more hides); an
  engagement row follows its impression after 1–30 s.
- Surface of an impression: ``search`` or ``related`` with probability ``other_surface_share / 2``
  each, else ``homefeed``; its engagement carries the same surface. The surface is a label on
  impressions drawn by the process above, not a process of its own, so other-surface engagements
  hold the same signal about a user's tastes as Homefeed ones (what makes them worth pre-training
  on); query intent and seed pins are not modelled. It is drawn from its own random stream (one
  uniform per impression: search below ``share / 2``, related from ``1 - share / 2``): the share
  changes which events are Homefeed, never the events themselves or the ground truth, and a larger
  share only moves Homefeed impressions to the other surfaces.
- Impressions are generated in chunks until the row count reaches ``n_events``; the last chunk
  is cut so the total is ``n_events`` (or one less, when an impression and its engagement would
  straddle the limit).

- Follows (``user_follows``): each dominant interest is followed with probability ``FOLLOW_DOMINANT`` and one
  random other interest with probability ``FOLLOW_OTHER``, at a time uniform in the ``FOLLOW_WINDOW_DAYS`` after
  signup (clipped before the history's end). Drawn from their own random stream, so adding them changed no
  other table and no ground truth.

- Continuation (``continue_world``, ``retrieval generate --continue --days N``): the same world goes on for N more
  days after ``end_date``: same users, pins plus new ones at the history's daily creation rates, the trends
  moving on, events at the history's last-week volume, each day from its own random stream (``CONTINUE_STREAM``)
  so the result does not depend on how the days are split into calls; the ground truth is extended.

Output is byte-identical for the same config on the same platform (numpy version and CPU).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Collection
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from training.config import DataConfig, parse_utc
from training.data.raw import EVENT_TYPES, SURFACES, TABLES, RawTables

log = logging.getLogger(__name__)

LATENT_DIM = 8
TEMPERATURE = 0.5
"""τ of the taste term: pins within an interest are chosen ∝ popularity · exp(z_u·v_p / τ)."""
CENTROID_STD = 0.7
PIN_NOISE_STD = 0.7
DUPLICATE_NOISE_STD = 0.05
CANDIDATES = 8
"""Popularity-weighted proposals per impression for sampling-importance-resampling."""
CHUNK_IMPRESSIONS = 800_000
"""Impressions per chunk (~1M rows with their engagements)."""
PRE_HISTORY_SHARE = 0.3
PRE_HISTORY_DAYS = 365
SIGNUP_BEFORE_SHARE = 0.75
SIGNUP_BEFORE_DAYS = 3 * 365
DOMINANT_COUNTS = np.array([1, 2, 3, 4, 5])
DOMINANT_SHARES = np.array([0.1, 0.3, 0.3, 0.2, 0.1])
BACKGROUND_SHARE = 0.1

# Outcome codes index EVENT_TYPES: 0 is "no engagement" for outcomes and "impression" for rows.
OUTCOME_BIAS = np.array([0.0, -2.2, -2.6, -3.0, -3.5])
OUTCOME_SLOPE = np.array([0.0, 0.6, 0.8, 1.4, -1.2])
POSITIVE_OUTCOMES = np.array([1, 2, 3])
"""closeup, click, save: the engagement types counted as positive interactions."""
SCORE_TERMS = ("interest", "popularity", "affinity")
"""The terms of ``GroundTruth.scores``."""

SURFACE_STREAM = 1
"""Spawn key of the surface draws' random stream (independent of the main stream seeded by ``seed``)."""
FOLLOW_STREAM = 2
"""Spawn key of the follow draws' random stream."""
FOLLOW_DOMINANT = 0.7
"""Probability that a user follows each of their dominant interests."""
FOLLOW_OTHER = 0.2
"""Probability that a user also follows one random interest outside their dominant ones."""
FOLLOW_WINDOW_DAYS = 30
"""A follow happens uniformly within this many days after signup."""

US_PER_SECOND = 1_000_000
US_PER_HOUR = 3600 * US_PER_SECOND
US_PER_DAY = 24 * US_PER_HOUR
IMPRESSION_MARGIN_US = 60 * US_PER_SECOND
"""Impressions end this long before ``end_date`` so their engagements (≤ 30 s later) stay inside."""

TOPICS = (
    "home_decor", "recipes", "fashion", "diy_crafts", "travel", "weddings", "fitness", "beauty",
    "gardening", "art", "photography", "quotes", "kids", "pets", "cars", "tattoos",
    "architecture", "hair", "technology", "film_music", "outdoors", "health", "education", "humor",
)  # fmt: skip
SEGMENTS = ("US", "BR", "GB", "DE", "FR", "IN", "MX", "JP", "CA", "AU")
SEGMENT_SHARES = np.array([0.3, 0.12, 0.1, 0.09, 0.08, 0.08, 0.07, 0.06, 0.05, 0.05])
GENDERS = ("f", "m", "u")
GENDER_SHARES = np.array([0.6, 0.32, 0.08])


@dataclass
class GroundTruth:
    """Latent parameters of a synthetic data set; enough to score every (user, pin) pair."""

    user_ids: np.ndarray
    """(U,) int64, ascending."""
    pin_ids: np.ndarray
    """(P,) int64, ascending; the column order of ``scores``."""
    theta: np.ndarray
    """(U, K) interest mixture per user (rows sum to 1; interests without pins are 0)."""
    z: np.ndarray
    """(U, d) user taste vectors."""
    v: np.ndarray
    """(P, d) pin latent vectors."""
    pin_interest: np.ndarray
    """(P,) int64 primary interest of each pin."""
    popularity: np.ndarray
    """(P,) Zipf popularity weight (unnormalised; compared within an interest)."""
    duplicate_of: np.ndarray
    """(P,) int64 pin id of the original a near-duplicate copies, -1 for originals."""
    trend_amplitude: np.ndarray
    """(K,) a_k."""
    trend_period_days: np.ndarray
    """(K,) T_k."""
    trend_phase: np.ndarray
    """(K,) φ_k."""
    trend_drift: np.ndarray
    """(K,) b_k."""
    trend_mean: np.ndarray
    """(K,) trend weight w_k averaged over the hours of the history (of the whole history from ``start_us`` to
    ``end_us``, continued days included, once the world is continued)."""
    start_us: int
    """Start of the history, microseconds since the epoch (UTC)."""
    end_us: int
    """Exclusive end of the history, microseconds since the epoch (UTC)."""
    temperature: float
    """τ: within an interest, pins are drawn ∝ popularity · exp(z_u·v_p / τ)."""
    outcome_bias: np.ndarray
    """(5,) outcome logits at zero affinity, indexed like ``EVENT_TYPES`` (0 = no engagement)."""
    outcome_slope: np.ndarray
    """(5,) change of the outcome logits per unit affinity."""
    dominant: np.ndarray | None = None
    """(U, K) bool: the user's dominant interests (1–5 per user); None in files written before it was kept."""
    trend_days: int | None = None
    """Length in days of the generated history, the time scale of the trend's drift term; set once the world is
    continued (``continue_world``: ``end_us`` moves on, the drift keeps its slope); None = ``end_us - start_us``."""

    @property
    def n_dominant(self) -> np.ndarray:
        """(U,) number of dominant interests of each user."""
        if self.dominant is None:
            raise ValueError("this ground truth predates the dominant interests: regenerate the data")
        return self.dominant.sum(axis=1)

    @property
    def history_days(self) -> int:
        """Days of the generated history (before any continuation): the drift term's time scale."""
        if self.trend_days is not None:
            return int(self.trend_days)
        return int(round((self.end_us - self.start_us) / US_PER_DAY))

    def log_trend(self, t_days: np.ndarray) -> np.ndarray:
        """(T, K) log trend weights at ``t_days`` (shape (T,), days since the history start; beyond ``end_us`` too)."""
        days = self.history_days
        params = (self.trend_amplitude, self.trend_period_days, self.trend_phase, self.trend_drift)
        return _log_trend(t_days, *params, days)

    def trend_weights(self, at: datetime | str | None = None) -> np.ndarray:
        """(K,) trend weights at ``at`` (naive means UTC), or the time average when ``at`` is None."""
        if at is None:
            return self.trend_mean
        ts = pd.Timestamp(at)
        ts = ts.tz_localize("UTC") if ts.tzinfo is None else ts.tz_convert("UTC")
        t_days = (ts.value // 1000 - self.start_us) / US_PER_DAY
        return np.exp(self.log_trend(np.array([t_days])))[0]

    def scores(self, user_ids: np.ndarray, at: datetime | str | None = None,
               terms: Collection[str] = SCORE_TERMS) -> np.ndarray:
        """(len(user_ids), P) float32 true log-rate of a positive engagement with each pin.

        ``log p(k_p | u) + log p(p | u, k_p) + log P(closeup/click/save | a_up)`` where
        ``p(k | u) ∝ θ_uk w_k`` (``w`` = the time-averaged trend, or the trend at ``at``) and
        ``p(p | u, k) ∝ pop_p exp(a_up / τ)`` over the pins of interest ``k``. The generator
        draws pins by resampling a finite number of proposals, so its empirical distribution is
        this one tempered toward popularity; the ranking it implies is the generator's target.
        Columns follow ``self.pin_ids``. ``terms`` keeps a subset of the ``SCORE_TERMS`` (for diagnostics):
        'interest' is ``log p(k_p | u)``, 'popularity' the ``pop_p`` factor and 'affinity' the ``a_up`` factor
        together with the outcome term.
        """
        unknown = set(terms) - set(SCORE_TERMS)
        if unknown:
            raise ValueError(f"unknown score terms {sorted(unknown)} (known: {', '.join(SCORE_TERMS)})")
        uidx = index_of(self.user_ids, np.asarray(user_ids), "user_ids")
        w = self.trend_weights(at)
        mix = self.theta[uidx] * w
        with np.errstate(divide="ignore"):
            log_interest = np.log(mix) - np.log(mix.sum(axis=1, keepdims=True))
        affinity = self.z[uidx] @ self.v.T
        logit = (np.log(self.popularity) if "popularity" in terms else 0.0) + (
            affinity / self.temperature if "affinity" in terms else np.zeros_like(affinity))
        # Normalise within each interest: log-sum-exp over the pins of every non-empty interest.
        order = np.argsort(self.pin_interest, kind="stable")
        _, starts, counts = np.unique(self.pin_interest[order], return_index=True, return_counts=True)
        sorted_logit = logit[:, order]
        peak = np.maximum.reduceat(sorted_logit, starts, axis=1)
        lse = peak + np.log(np.add.reduceat(np.exp(sorted_logit - np.repeat(peak, counts, axis=1)), starts, axis=1))
        log_pin = np.empty_like(logit)
        log_pin[:, order] = sorted_logit - np.repeat(lse, counts, axis=1)
        del sorted_logit, logit
        if "affinity" in terms:
            positive, total = np.zeros_like(affinity), np.zeros_like(affinity)
            for code, (bias, slope) in enumerate(zip(self.outcome_bias, self.outcome_slope, strict=True)):
                rate = np.exp(bias + slope * affinity)
                total += rate
                if code in POSITIVE_OUTCOMES:
                    positive += rate
            log_pin += np.log(positive) - np.log(total)
        if "interest" in terms:
            log_pin += log_interest[:, self.pin_interest]
        return log_pin.astype(np.float32)

    def save(self, path: str | Path) -> None:
        """Write every field to one ``.npz`` file at exactly ``path``."""
        with open(path, "wb") as f:
            np.savez(f, **{fld.name: np.asarray(getattr(self, fld.name)) for fld in dataclasses.fields(self)
                           if getattr(self, fld.name) is not None})

    @classmethod
    def load(cls, path: str | Path) -> GroundTruth:
        """Read a file written by ``save`` (optional fields missing from older files stay None)."""
        with np.load(path, allow_pickle=False) as data:
            values = {fld.name: data[fld.name] for fld in dataclasses.fields(cls) if fld.name in data.files}
        return cls(**{name: value.item() if value.ndim == 0 else value for name, value in values.items()})


def _log_trend(
    t_days: np.ndarray, amplitude: np.ndarray, period: np.ndarray, phase: np.ndarray, drift: np.ndarray, days: float
) -> np.ndarray:
    """(T, K) log trend weights at ``t_days`` (shape (T,)) for (K,) trend parameters."""
    t = np.asarray(t_days, dtype=np.float64)[:, None]
    return amplitude * np.sin(2 * np.pi * t / period + phase) + drift * (t / days - 0.5)


def index_of(sorted_ids: np.ndarray, ids: np.ndarray, what: str) -> np.ndarray:
    """(n,) positions of ``ids`` (shape (n,)) in the ascending ``sorted_ids``; unknown ids raise ValueError."""
    pos = np.searchsorted(sorted_ids, ids)
    found = pos < len(sorted_ids)
    found[found] = sorted_ids[pos[found]] == ids[found]
    if not found.all():
        unknown = ids[~found]
        raise ValueError(f"{what}: {len(unknown)} ids unknown to the ground truth, e.g. {unknown[:3].tolist()}")
    return pos


def _utc(us: np.ndarray) -> pd.DatetimeIndex:
    """Microseconds since the epoch (shape (n,)) as datetime64[us, UTC]."""
    return pd.DatetimeIndex(us.astype(np.int64).view("datetime64[us]")).tz_localize("UTC")


def _iso(us: int) -> str:
    """Microseconds since the epoch as an ISO UTC time."""
    return pd.Timestamp(us * 1000, tz="UTC").isoformat()


def _increasing_ids(rng: np.random.Generator, n: int, base: int) -> np.ndarray:
    """(n,) unique, strictly increasing, non-dense int64 ids starting above ``base``."""
    return base + np.cumsum(rng.integers(1, 8, n, dtype=np.int64))


def _interest_names(k: int) -> list[str]:
    return list(TOPICS[:k]) if k <= len(TOPICS) else [f"interest_{i:02d}" for i in range(k)]


@dataclass
class _Pins:
    """Pins in creation (= id) order; arrays of shape (P,) or (P, d)."""

    ids: np.ndarray
    interest: np.ndarray
    v: np.ndarray
    popularity: np.ndarray
    rank: np.ndarray
    """1-based popularity rank within the pin's interest."""
    created_us: np.ndarray
    signature: np.ndarray
    duplicate_of: np.ndarray
    interest_share: np.ndarray
    """(K,) the interests' shares of the original pins (what a new original pin's interest is drawn from)."""


def _zipf_cdf(x: np.ndarray, s: float) -> np.ndarray:
    """∫_1^x t^-s dt, elementwise."""
    if s == 1:
        return np.log(x)
    return np.expm1((1 - s) * np.log(x)) / (1 - s)


def _zipf_inverse_cdf(y: np.ndarray, s: float) -> np.ndarray:
    """The x with ``_zipf_cdf(x, s) == y``, elementwise."""
    if s == 1:
        return np.exp(y)
    return np.exp(np.log1p((1 - s) * y) / (1 - s))


def _make_pins(rng: np.random.Generator, cfg: DataConfig, centroids: np.ndarray, start_us: int, end_us: int) -> _Pins:
    n_pins, n_interests, dim = cfg.n_pins, len(centroids), centroids.shape[1]
    n_dup = min(round(cfg.duplicate_fraction * n_pins), n_pins - 1)
    n_orig = n_pins - n_dup
    # Every interest gets a pin when there are enough; interest sizes are uneven.
    share = rng.dirichlet(np.full(n_interests, 5.0))
    seeded = min(n_interests, n_orig)
    interest = np.concatenate([np.arange(seeded), rng.choice(n_interests, n_orig - seeded, p=share)])
    v = centroids[interest] + rng.normal(0.0, PIN_NOISE_STD, (n_orig, dim))
    before = rng.random(n_orig) < PRE_HISTORY_SHARE
    last_original = end_us - 2 * US_PER_HOUR
    created = np.where(
        before,
        start_us - rng.integers(0, PRE_HISTORY_DAYS * US_PER_DAY, n_orig),
        rng.integers(start_us, last_original, n_orig),
    )
    signature = rng.integers(0, np.iinfo(np.uint64).max, n_orig, dtype=np.uint64, endpoint=True)

    src = rng.choice(n_orig, n_dup)
    last_duplicate = end_us - US_PER_HOUR
    span = last_duplicate - created[src] - US_PER_SECOND
    dup_created = created[src] + US_PER_SECOND + (rng.random(n_dup) * span).astype(np.int64)
    interest = np.concatenate([interest, interest[src]])
    v = np.concatenate([v, v[src] + rng.normal(0.0, DUPLICATE_NOISE_STD, (n_dup, dim))])
    created = np.concatenate([created, dup_created])
    signature = np.concatenate([signature, signature[src]])
    source = np.concatenate([np.full(n_orig, -1), src])

    order = np.lexsort((np.arange(n_pins), created))
    rank_of = np.empty(n_pins, dtype=np.int64)
    rank_of[order] = np.arange(n_pins)
    ids = _increasing_ids(rng, n_pins, base=10_000_000)
    source = source[order]
    duplicate_of = np.where(source >= 0, ids[rank_of[np.maximum(source, 0)]], -1)
    interest, v, created, signature = interest[order], v[order], created[order], signature[order]

    # Zipf-like popularity by a random rank within each interest.
    by_interest = np.lexsort((rng.random(n_pins), interest))
    group_start = np.searchsorted(interest[by_interest], interest[by_interest], side="left")
    rank = np.empty(n_pins, dtype=np.int64)
    rank[by_interest] = np.arange(n_pins) - group_start + 1
    return _Pins(
        ids=ids,
        interest=interest.astype(np.int64),
        v=v,
        popularity=_zipf_popularity(rank, cfg.zipf_exponent),
        rank=rank,
        created_us=created,
        signature=_hex(signature),
        duplicate_of=duplicate_of,
        interest_share=share,
    )


def _hex(signature: np.ndarray) -> np.ndarray:
    """(n,) uint64 image signatures as 16-digit hex strings."""
    return np.array([f"{s:016x}" for s in signature.tolist()], dtype=object)


def _zipf_popularity(rank: np.ndarray, s: float) -> np.ndarray:
    """Zipf-like popularity ``∫_r^{r+1} x^-s dx`` of 1-based ranks ``r``."""
    return _zipf_cdf(rank + 1.0, s) - _zipf_cdf(rank.astype(np.float64), s)


@dataclass
class _Users:
    """Users in id order; arrays of shape (U,), (U, K) or (U, d)."""

    ids: np.ndarray
    theta: np.ndarray
    z: np.ndarray
    activity: np.ndarray
    age: np.ndarray
    gender: np.ndarray
    segment: np.ndarray
    signup_us: np.ndarray
    dominant: np.ndarray
    """(U, K) bool: the dominant interests."""


def _make_users(rng: np.random.Generator, cfg: DataConfig, has_pins: np.ndarray, start_us: int, end_us: int) -> _Users:
    n_users, n_interests = cfg.n_users, cfg.n_interests
    segment = rng.choice(len(SEGMENTS), n_users, p=SEGMENT_SHARES)
    segment_prior = rng.normal(0.0, 0.8, (len(SEGMENTS), n_interests))
    n_dominant = np.minimum(rng.choice(DOMINANT_COUNTS, n_users, p=DOMINANT_SHARES), n_interests)
    # Gumbel top-n: n_dominant interests without replacement, ∝ exp(segment prior).
    keys = segment_prior[segment] + rng.gumbel(size=(n_users, n_interests))
    rank = np.empty((n_users, n_interests), dtype=np.int64)
    np.put_along_axis(rank, np.argsort(-keys, axis=1), np.arange(n_interests)[None, :], axis=1)
    dominant = rng.gamma(2.0, size=(n_users, n_interests)) * (rank < n_dominant[:, None])
    background = rng.dirichlet(np.full(n_interests, 0.5), size=n_users)
    theta = (1 - BACKGROUND_SHARE) * dominant / dominant.sum(axis=1, keepdims=True) + BACKGROUND_SHARE * background
    theta *= has_pins
    theta /= theta.sum(axis=1, keepdims=True)
    before = rng.random(n_users) < SIGNUP_BEFORE_SHARE
    signup = np.where(
        before,
        start_us - rng.integers(0, SIGNUP_BEFORE_DAYS * US_PER_DAY, n_users),
        rng.integers(start_us, end_us, n_users),
    )
    return _Users(
        ids=_increasing_ids(rng, n_users, base=1_000_000),
        theta=theta,
        z=rng.normal(0.0, 1.0 / np.sqrt(LATENT_DIM), (n_users, LATENT_DIM)),
        activity=rng.lognormal(0.0, 1.0, n_users),
        age=np.clip(np.round(13 + rng.gamma(3.0, 7.0, n_users)), 13, 80).astype(np.int64),
        gender=np.array(GENDERS, dtype=object)[rng.choice(len(GENDERS), n_users, p=GENDER_SHARES)],
        segment=np.array(SEGMENTS, dtype=object)[segment],
        signup_us=signup,
        dominant=(rank < n_dominant[:, None]) & has_pins,
    )


def _make_follows(cfg: DataConfig, dominant: np.ndarray, signup_us: np.ndarray, end_us: int) -> pd.DataFrame:
    """(user position, interest, time) of every follow, from the follow stream (see the module docstring);
    ``dominant`` (U, K) bool, ``signup_us`` (U,)."""
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence(cfg.seed, spawn_key=(FOLLOW_STREAM,))))
    n_users, n_interests = dominant.shape
    follows = dominant & (rng.random((n_users, n_interests)) < FOLLOW_DOMINANT)
    other_keys = np.where(dominant, -np.inf, rng.random((n_users, n_interests)))
    other = other_keys.argmax(axis=1)
    extra = (rng.random(n_users) < FOLLOW_OTHER) & np.isfinite(other_keys.max(axis=1))
    follows[np.flatnonzero(extra), other[extra]] = True
    user, interest = np.nonzero(follows)
    at = signup_us[user] + rng.integers(0, FOLLOW_WINDOW_DAYS * US_PER_DAY, len(user))
    return pd.DataFrame({"user": user, "interest_id": interest.astype(np.int64),
                         "at": np.minimum(at, end_us - US_PER_SECOND)})


@dataclass
class _Events:
    """Event rows (unsorted); arrays of shape (n,): user and pin positions, type code, time, surface code
    (index into ``SURFACES``)."""

    user: np.ndarray
    pin: np.ndarray
    code: np.ndarray
    ts: np.ndarray
    surface: np.ndarray


Proposer = Callable[[np.ndarray, np.random.Generator], np.ndarray]
"""(interest of each impression (n,), rng) -> (n, CANDIDATES) popularity-weighted candidate pin positions."""


def _rank_proposals(pins: _Pins, n_interests: int, s: float) -> Proposer:
    """Proposals of the generated history: ranks are a permutation within each interest, so a popularity-weighted
    rank is the integer part of a draw from the continuous Zipf density on [1, size + 1) (inverse CDF)."""
    # Pins ordered by (interest, rank): interest k's rank r is at lo[k] + r - 1.
    by_rank = np.lexsort((pins.rank, pins.interest))
    lo = np.searchsorted(pins.interest[by_rank], np.arange(n_interests), side="left")
    size = np.bincount(pins.interest, minlength=n_interests)
    mass = _zipf_cdf(size + 1.0, s)

    def propose(k: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        x = _zipf_inverse_cdf(rng.random((len(k), CANDIDATES)) * mass[k][:, None], s)
        rank = np.clip(x.astype(np.int64), 1, size[k][:, None])
        return by_rank[lo[k][:, None] + rank - 1]

    return propose


def _popularity_proposals(interest: np.ndarray, popularity: np.ndarray, n_interests: int) -> Proposer:
    """Proposals ∝ any popularity within each interest (the continued world, whose new pins' popularities are not
    a rank permutation): inverse CDF on the cumulative popularity of the interest's pins. For a rank permutation
    this is the same distribution as ``_rank_proposals``."""
    order = np.argsort(interest, kind="stable")
    cum = np.cumsum(popularity[order])
    lo = np.searchsorted(interest[order], np.arange(n_interests), side="left")
    hi = np.searchsorted(interest[order], np.arange(n_interests), side="right")
    base = np.where(lo > 0, cum[np.maximum(lo - 1, 0)], 0.0)
    mass = np.where(hi > lo, cum[np.maximum(hi - 1, 0)] - base, 0.0)

    def propose(k: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        target = base[k][:, None] + rng.random((len(k), CANDIDATES)) * mass[k][:, None]
        pos = np.clip(np.searchsorted(cum, target, side="right"), lo[k][:, None], hi[k][:, None] - 1)
        return order[pos]

    return propose


@dataclass
class _EventProcess:
    """What the impression process reads: users (arrays of shape (U,), (U, K), (U, d)), pins ((P, d), (P,)), the
    truth's temperature and outcome model, and the surface share."""

    activity: np.ndarray
    theta: np.ndarray
    z: np.ndarray
    pin_v: np.ndarray
    pin_created_us: np.ndarray
    propose: Proposer
    temperature: float
    outcome_bias: np.ndarray
    outcome_slope: np.ndarray
    other_surface_share: float


def _make_events(
    rng: np.random.Generator, surface_rng: np.random.Generator, proc: _EventProcess, n_rows: int, start_us: int,
    end_us: int, trend_by_hour: np.ndarray, progress: bool = True,
) -> _Events:
    """``n_rows`` (or one less) impressions and engagements in ``[start_us, end_us)``; ``trend_by_hour``
    (hours, K) holds w_k at the midpoint of each hour from ``start_us``."""
    n_users, n_interests = proc.theta.shape
    impression_end = end_us - IMPRESSION_MARGIN_US
    user_cdf = np.cumsum(proc.activity)
    theta = proc.theta.astype(np.float32)
    trend_by_hour = trend_by_hour.astype(np.float32)
    v = proc.pin_v
    share = proc.other_surface_share

    parts: list[_Events] = []
    total = 0
    chunk = min(CHUNK_IMPRESSIONS, n_rows)
    weights = np.empty((chunk, n_interests), dtype=np.float32)
    trend = np.empty_like(weights)
    with tqdm(total=n_rows, unit="row", unit_scale=True, desc="synthetic events",
              disable=None if progress else True) as bar:
        while total < n_rows:
            u = np.minimum(np.searchsorted(user_cdf, rng.random(chunk) * user_cdf[-1], side="right"), n_users - 1)
            ts = rng.integers(start_us, impression_end, chunk)
            np.take(theta, u, axis=0, out=weights)
            np.take(trend_by_hour, (ts - start_us) // US_PER_HOUR, axis=0, out=trend)
            weights *= trend
            np.cumsum(weights, axis=1, out=weights)
            # A threshold in (0, total] never lands on a zero-weight interest (one without pins).
            threshold = (1.0 - rng.random(chunk)) * weights[:, -1]
            k = np.minimum((weights < threshold[:, None]).sum(axis=1), n_interests - 1)
            cand = proc.propose(k, rng)
            zu = proc.z[u]
            taste = np.empty((chunk, CANDIDATES))
            for j in range(CANDIDATES):
                taste[:, j] = np.einsum("ij,ij->i", zu, v[cand[:, j]])
            pick = np.argmax(taste / proc.temperature + rng.gumbel(size=(chunk, CANDIDATES)), axis=1)
            rows = np.arange(chunk)
            p, affinity = cand[rows, pick], taste[rows, pick]
            created = proc.pin_created_us[p]
            early = np.flatnonzero(ts < created)
            ts[early] = created[early] + (rng.random(len(early)) * (impression_end - created[early])).astype(np.int64)
            outcome_cdf = np.cumsum(np.exp(proc.outcome_bias + proc.outcome_slope * affinity[:, None]), axis=1)
            outcome = (outcome_cdf < (rng.random(chunk) * outcome_cdf[:, -1])[:, None]).sum(axis=1).astype(np.int8)
            delay = rng.integers(US_PER_SECOND, 30 * US_PER_SECOND, chunk, endpoint=True)

            n_rows_cum = np.cumsum(1 + (outcome > 0))
            keep = int(np.searchsorted(n_rows_cum, n_rows - total, side="right"))
            u, p, ts, outcome, delay = u[:keep], p[:keep], ts[:keep], outcome[:keep], delay[:keep]
            draw = surface_rng.random(keep)  # the i-th impression gets the i-th draw, whatever the chunking
            surface = np.select([draw < share / 2, draw >= 1 - share / 2], [1, 2], 0).astype(np.int8)
            eng = np.flatnonzero(outcome > 0)
            part = _Events(
                user=np.concatenate([u, u[eng]]).astype(np.int32),
                pin=np.concatenate([p, p[eng]]).astype(np.int32),
                code=np.concatenate([np.zeros(keep, dtype=np.int8), outcome[eng]]),
                ts=np.concatenate([ts, ts[eng] + delay[eng]]),
                surface=np.concatenate([surface, surface[eng]]),
            )
            parts.append(part)
            total += len(part.ts)
            bar.update(len(part.ts))
            if keep < chunk:
                break
    return _Events(*(np.concatenate([getattr(part, f.name) for part in parts]) for f in dataclasses.fields(_Events)))


def _sort_events(ev: _Events) -> np.ndarray:
    """(n,) permutation ordering the rows by (time, user, pin, type, surface).

    User and pin positions are in id order, so this sorts by ids too. Timestamps are microseconds
    and nearly unique: sort by time, then re-sort only the runs of tied times by all keys.
    """
    order = np.argsort(ev.ts)
    sorted_ts = ev.ts[order]
    tied = np.flatnonzero(sorted_ts[1:] == sorted_ts[:-1])
    if len(tied):
        pos = np.union1d(tied, tied + 1)
        sub = order[pos]
        order[pos] = sub[np.lexsort((ev.surface[sub], ev.code[sub], ev.pin[sub], ev.user[sub], ev.ts[sub]))]
    return order


@dataclass
class _World:
    """Everything ``generate`` draws before the events: the fixed part of the world."""

    start_us: int
    end_us: int
    centroids: np.ndarray
    """(K, d) interest centroids."""
    pins: _Pins
    users: _Users
    amplitude: np.ndarray
    period: np.ndarray
    phase: np.ndarray
    drift: np.ndarray


def _make_world(rng: np.random.Generator, cfg: DataConfig) -> _World:
    """The main stream's draws before the events, in order: centroids first, then pins, users and trends."""
    end_us = pd.Timestamp(parse_utc(cfg.end_date)).value // 1000
    start_us = end_us - cfg.days * US_PER_DAY
    centroids = rng.normal(0.0, CENTROID_STD, (cfg.n_interests, LATENT_DIM))
    pins = _make_pins(rng, cfg, centroids, start_us, end_us)
    has_pins = np.bincount(pins.interest, minlength=cfg.n_interests) > 0
    users = _make_users(rng, cfg, has_pins, start_us, end_us)
    amplitude = rng.uniform(0.1, 0.6, cfg.n_interests)
    period = rng.uniform(7.0, max(14.0, 2.0 * cfg.days), cfg.n_interests)
    phase = rng.uniform(0.0, 2 * np.pi, cfg.n_interests)
    drift = rng.normal(0.0, 0.7, cfg.n_interests)
    return _World(start_us, end_us, centroids, pins, users, amplitude, period, phase, drift)


def _trend_by_hour(truth: GroundTruth, first_hour: int, hours: int) -> np.ndarray:
    """(hours, K) trend weights at the midpoints of ``hours`` hours from hour ``first_hour`` of the history."""
    return np.exp(truth.log_trend((np.arange(first_hour, first_hour + hours) + 0.5) / 24))


def generate(cfg: DataConfig) -> tuple[RawTables, GroundTruth]:
    """Generate the raw tables and the latent ground truth for ``cfg`` (deterministic by ``cfg.seed``)."""
    rng = np.random.Generator(np.random.PCG64(cfg.seed))
    world = _make_world(rng, cfg)
    start_us, end_us, pins, users = world.start_us, world.end_us, world.pins, world.users
    hour_midpoints = (np.arange(cfg.days * 24) + 0.5) / 24
    params = (world.amplitude, world.period, world.phase, world.drift)
    trend_by_hour = np.exp(_log_trend(hour_midpoints, *params, cfg.days))

    truth = GroundTruth(
        user_ids=users.ids,
        pin_ids=pins.ids,
        theta=users.theta,
        z=users.z,
        v=pins.v,
        pin_interest=pins.interest,
        popularity=pins.popularity,
        duplicate_of=pins.duplicate_of,
        trend_amplitude=world.amplitude,
        trend_period_days=world.period,
        trend_phase=world.phase,
        trend_drift=world.drift,
        trend_mean=trend_by_hour.mean(axis=0),
        start_us=start_us,
        end_us=end_us,
        temperature=TEMPERATURE,
        outcome_bias=OUTCOME_BIAS.copy(),
        outcome_slope=OUTCOME_SLOPE.copy(),
        dominant=users.dominant,
    )
    surface_rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence(cfg.seed, spawn_key=(SURFACE_STREAM,))))
    proc = _EventProcess(
        activity=users.activity, theta=users.theta, z=users.z, pin_v=pins.v, pin_created_us=pins.created_us,
        propose=_rank_proposals(pins, cfg.n_interests, cfg.zipf_exponent), temperature=truth.temperature,
        outcome_bias=truth.outcome_bias, outcome_slope=truth.outcome_slope,
        other_surface_share=cfg.other_surface_share,
    )
    ev = _make_events(rng, surface_rng, proc, cfg.n_events, start_us, end_us, trend_by_hour)
    first_event = np.full(cfg.n_users, np.iinfo(np.int64).max)
    np.minimum.at(first_event, ev.user, ev.ts)
    active = first_event < np.iinfo(np.int64).max
    lead = rng.integers(US_PER_SECOND, 7 * US_PER_DAY, cfg.n_users)
    signup = np.where(active, np.minimum(users.signup_us, first_event - lead), users.signup_us)
    follows = _make_follows(cfg, users.dominant, signup, end_us)

    order = _sort_events(ev)
    events = pd.DataFrame(
        {
            "user_id": users.ids[ev.user[order]],
            "pin_id": pins.ids[ev.pin[order]],
            "event_type": np.array(EVENT_TYPES, dtype=object)[ev.code[order]],
            "event_timestamp": _utc(ev.ts[order]),
            "surface": np.array(SURFACES, dtype=object)[ev.surface[order]],
        }
    )
    del ev, order
    tables = RawTables(
        users=pd.DataFrame(
            {
                "user_id": users.ids,
                "age": users.age,
                "gender": users.gender,
                "segment": users.segment,
                "signup_at": _utc(signup),
            }
        ),
        interests=pd.DataFrame(
            {"interest_id": np.arange(cfg.n_interests, dtype=np.int64), "name": _interest_names(cfg.n_interests)}
        ),
        pins=pd.DataFrame(
            {
                "pin_id": pins.ids,
                "interest_id": pins.interest,
                "image_signature": pins.signature,
                "created_at": _utc(pins.created_us),
            }
        ),
        events=events,
        user_follows=pd.DataFrame(
            {"user_id": users.ids[follows["user"].to_numpy()], "interest_id": follows["interest_id"].to_numpy(),
             "followed_at": _utc(follows["at"].to_numpy())}
        ),
    )
    counts = events["event_type"].value_counts()
    surfaces = events["surface"].value_counts()
    log.info(
        "generated %s users (%s active), %s pins (%s near-duplicates), %s interests, %s events over %d days: %s; %s; "
        "%s follows",
        f"{cfg.n_users:,}",
        f"{int(active.sum()):,}",
        f"{cfg.n_pins:,}",
        f"{int((pins.duplicate_of >= 0).sum()):,}",
        cfg.n_interests,
        f"{len(events):,}",
        cfg.days,
        ", ".join(f"{t}={int(counts.get(t, 0)):,}" for t in EVENT_TYPES),
        ", ".join(f"{s}={int(surfaces.get(s, 0)):,}" for s in SURFACES),
        f"{len(follows):,}",
    )
    return tables, truth


CONTINUE_STREAM = 3
"""Spawn key of the continued days' random streams: day ``i`` after the generated history (0 = the first) draws
from ``SeedSequence(seed, spawn_key=(CONTINUE_STREAM, i))``, its surfaces from ``(CONTINUE_STREAM, i,
SURFACE_STREAM)``."""


def load_world(raw_dir: str | Path) -> tuple[RawTables, GroundTruth]:
    """The raw tables and ground truth of the synthetic world in ``raw_dir`` (what ``retrieval generate`` wrote);
    ValueError naming the problem when the folder holds none (MovieLens raw data, or nothing)."""
    raw_dir = Path(raw_dir)
    truth_path = raw_dir / "ground_truth.npz"
    if not truth_path.exists():
        held = ("raw data without a ground truth (MovieLens or other ingested data)"
                if (raw_dir / "events.parquet").exists() else "no raw data")
        raise ValueError(f"no synthetic world to continue in {raw_dir}: it holds {held}; `retrieval generate` creates "
                         "one (only the synthetic world continues; MovieLens is replayed by time with --data.until)")
    missing = [f"{t}.parquet" for t in TABLES if not (raw_dir / f"{t}.parquet").exists()]
    if missing:
        raise ValueError(f"incomplete synthetic world in {raw_dir}: {', '.join(missing)} missing; "
                         "regenerate it with `retrieval generate`")
    frames = {t: pd.read_parquet(raw_dir / f"{t}.parquet") for t in TABLES}
    follows = raw_dir / "user_follows.parquet"
    tables = RawTables(**frames, user_follows=pd.read_parquet(follows) if follows.exists() else None)
    return tables, GroundTruth.load(truth_path)


def _check_same_world(cfg: DataConfig, world: _World, truth: GroundTruth) -> None:
    """ValueError unless ``truth`` is the world ``cfg`` generates (the first ``cfg.n_pins`` pins: later ones are
    continued days')."""
    problems = []
    if len(truth.user_ids) != cfg.n_users:
        problems.append(f"data.n_users={cfg.n_users}, the world has {len(truth.user_ids)} users")
    if len(truth.trend_amplitude) != cfg.n_interests:
        problems.append(f"data.n_interests={cfg.n_interests}, the world has {len(truth.trend_amplitude)} interests")
    if len(truth.pin_ids) < cfg.n_pins:
        problems.append(f"data.n_pins={cfg.n_pins}, the world has only {len(truth.pin_ids)} pins")
    if truth.start_us != world.start_us or truth.history_days != cfg.days:
        problems.append(f"data.end_date={cfg.end_date} and data.days={cfg.days} give a history from "
                        f"{_iso(world.start_us)}, the world's starts at {_iso(truth.start_us)} and was generated "
                        f"over {truth.history_days} days")
    if not problems:
        n = cfg.n_pins
        pairs = {
            "user_ids": (truth.user_ids, world.users.ids), "theta": (truth.theta, world.users.theta),
            "z": (truth.z, world.users.z), "pin_ids": (truth.pin_ids[:n], world.pins.ids),
            "v": (truth.v[:n], world.pins.v), "pin_interest": (truth.pin_interest[:n], world.pins.interest),
            "popularity": (truth.popularity[:n], world.pins.popularity),
            "duplicate_of": (truth.duplicate_of[:n], world.pins.duplicate_of),
            "trend": (np.stack([truth.trend_amplitude, truth.trend_period_days, truth.trend_phase, truth.trend_drift]),
                      np.stack([world.amplitude, world.period, world.phase, world.drift])),
        }
        differ = [name for name, (a, b) in pairs.items() if a.shape != b.shape or not np.array_equal(a, b)]
        if differ:
            problems.append(f"its {', '.join(differ)} do not match what data.seed={cfg.seed} with these sizes "
                            "generates (another data.seed, data.n_pins, data.duplicate_fraction or "
                            "data.zipf_exponent?)")
    if problems:
        raise ValueError("the config does not match the stored synthetic world: " + "; ".join(problems)
                         + ". Continue it with the --data.* values it was generated with.")


def _trim_to_truth(tables: RawTables, truth: GroundTruth) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The stored pins and events, without what an interrupted continuation wrote past the ground truth's end (the
    ground truth is written last: rows after its end are redone, identically, from the day streams)."""
    end = pd.Timestamp(truth.end_us * 1000, tz="UTC")
    pins, events = tables.pins, tables.events
    extra_pins = ~pins["pin_id"].isin(truth.pin_ids) & (pins["created_at"] >= end)
    extra_events = events["event_timestamp"] >= end
    if extra_pins.any() or extra_events.any():
        log.warning("dropping %s pins and %s events after the ground truth's end %s: the leftovers of an interrupted "
                    "continuation (its days are drawn again)", f"{int(extra_pins.sum()):,}",
                    f"{int(extra_events.sum()):,}", end)
        pins, events = pins[~extra_pins].reset_index(drop=True), events[~extra_events].reset_index(drop=True)
    if not np.array_equal(pins["pin_id"].to_numpy(np.int64), truth.pin_ids):
        raise ValueError("pins.parquet does not hold the ground truth's pins (in id order): the raw folder mixes "
                         "two worlds; regenerate it with `retrieval generate`")
    if not np.array_equal(tables.users["user_id"].to_numpy(np.int64), truth.user_ids):
        raise ValueError("users.parquet does not hold the ground truth's users: regenerate with `retrieval generate`")
    if "surface" not in events.columns:
        raise ValueError("events.parquet predates surfaces: regenerate the world with `retrieval generate`")
    return pins, events


@dataclass
class _PinState:
    """Every pin of the world so far, in id (= creation) order; arrays of shape (P,) or (P, d)."""

    ids: np.ndarray
    interest: np.ndarray
    v: np.ndarray
    popularity: np.ndarray
    created_us: np.ndarray
    signature: np.ndarray
    duplicate_of: np.ndarray

    def extend(self, new: _PinState) -> _PinState:
        return _PinState(*(np.concatenate([getattr(self, f.name), getattr(new, f.name)])
                           for f in dataclasses.fields(_PinState)))


def _new_pins(
    rng: np.random.Generator, cfg: DataConfig, world: _World, pins: _PinState, day_start: int,
    per_day: tuple[float, float],
) -> _PinState:
    """The pins created during one continued day: Poisson numbers of originals and near-duplicates at the history's
    daily rates (``per_day``), drawn like the generated ones (see ``continue_world``)."""
    n_interests, dim = world.centroids.shape
    n_orig, n_dup = rng.poisson(per_day[0]), rng.poisson(per_day[1])
    interest = rng.choice(n_interests, n_orig, p=world.pins.interest_share)
    v = world.centroids[interest] + rng.normal(0.0, PIN_NOISE_STD, (n_orig, dim))
    created = rng.integers(day_start, day_start + US_PER_DAY - 2 * US_PER_HOUR, n_orig)
    signature = rng.integers(0, np.iinfo(np.uint64).max, n_orig, dtype=np.uint64, endpoint=True)
    originals = np.flatnonzero(pins.duplicate_of < 0)
    src = originals[rng.choice(len(originals), n_dup)]   # all created before the day: the copy comes later
    dup_created = rng.integers(day_start, day_start + US_PER_DAY - US_PER_HOUR, n_dup)
    interest = np.concatenate([interest, pins.interest[src]]).astype(np.int64)
    v = np.concatenate([v, pins.v[src] + rng.normal(0.0, DUPLICATE_NOISE_STD, (n_dup, dim))])
    created = np.concatenate([created, dup_created])
    signature = np.concatenate([_hex(signature), pins.signature[src]])
    duplicate_of = np.concatenate([np.full(n_orig, -1, dtype=np.int64), pins.ids[src]])

    n = n_orig + n_dup
    order = np.lexsort((np.arange(n), created))
    interest, v, created, signature, duplicate_of = (
        interest[order], v[order], created[order], signature[order], duplicate_of[order])
    ids = _increasing_ids(rng, n, base=int(pins.ids[-1]))
    # Popularity: a rank uniform over the positions of the grown interest (its size with this pin), the marginal
    # of a generated pin's rank; the other pins keep theirs.
    by_interest = np.lexsort((np.arange(n), interest))
    earlier = np.empty(n, dtype=np.int64)
    earlier[by_interest] = np.arange(n) - np.searchsorted(interest[by_interest], interest[by_interest], side="left")
    grown = np.bincount(pins.interest, minlength=n_interests)[interest] + earlier + 1
    rank = rng.integers(1, grown, endpoint=True) if n else np.zeros(0, dtype=np.int64)
    return _PinState(ids=ids, interest=interest, v=v, popularity=_zipf_popularity(rank, cfg.zipf_exponent),
                     created_us=created, signature=signature, duplicate_of=duplicate_of)


def continue_world(
    cfg: DataConfig, tables: RawTables, truth: GroundTruth, days: int
) -> tuple[RawTables, GroundTruth, dict[str, int | str]]:
    """The world of ``tables`` and ``truth`` (generated by ``generate(cfg)``, perhaps continued already) with the
    next ``days`` days appended; returns the extended tables and ground truth and what was added.

    The same world goes on: the same users (taste, interest mixture, activity: the activity, like the centroids,
    is not stored, and is recomputed from ``cfg.seed`` by replaying ``generate``'s draws before the events, which
    must reproduce the stored ground truth, else ValueError), the same pins plus new ones, the trends moving on
    (``GroundTruth.log_trend`` beyond the history: the sinusoid and the drift term keep going), and the events of
    the same process at the volume of the history's last week (a seventh of it a day: the generated volume climbs
    toward the history's end, since impressions drawn before their pin's creation move after it). Each day draws
    from its own
    stream (``CONTINUE_STREAM``), so continuing by 7 days twice gives the same data as 14 days once.

    - New pins: each day, Poisson numbers of originals and near-duplicates at the history's daily rates (the pins
      of each kind created inside the generated history, per day). An original's interest is drawn from the
      interests' shares of the generated pins, its ``v`` around the interest centroid, its time uniform in the
      day (up to 2 h before its end); a near-duplicate copies an original created before the day (same
      interest and signature, ``v`` within ``DUPLICATE_NOISE_STD``). Popularity: a rank drawn uniformly from
      1..n+1, n = the interest's pins so far, and the Zipf weight of that rank, so a new pin's popularity has
      the distribution of a generated pin's in an interest of the grown size; existing pins keep their
      popularity (old ground truth entries and the events drawn under them stay valid). Ranks are then no longer
      a permutation within the interest: events are proposed ∝ popularity directly (``_popularity_proposals``,
      the same distribution as the history's rank sampler).
    - Users, their sign-up times and follows are unchanged (no new users; follows clipped at the history's end
      stay where they were).
    - Ground truth: pins appended (ids, v, interest, popularity, duplicate_of), ``end_us`` moved on,
      ``trend_days`` set to the generated history's length (the drift's time scale), ``trend_mean`` the mean over
      every hour of the extended history (``trend_weights(at)`` gives the trend at any time of it).
    - Appends only: the stored rows are unchanged, every new event is at or after the old end (a day ends
      ``IMPRESSION_MARGIN_US`` after its last impression, so engagements stay inside their day).
    """
    if days < 1:
        raise ValueError(f"continue by at least one day, got {days}")
    world = _make_world(np.random.Generator(np.random.PCG64(cfg.seed)), cfg)
    _check_same_world(cfg, world, truth)
    pins_df, events_df = _trim_to_truth(tables, truth)
    elapsed = truth.end_us - world.end_us
    if elapsed % US_PER_DAY:
        raise ValueError(f"the ground truth's end is not a whole number of days after the history's ({elapsed} us)")
    history = events_df["event_timestamp"] < pd.Timestamp(world.end_us * 1000, tz="UTC")
    if int(history.sum()) not in (cfg.n_events - 1, cfg.n_events):
        raise ValueError(f"data.n_events={cfg.n_events:,} does not match the stored world: its generated history has "
                         f"{int(history.sum()):,} events. Continue it with the --data.* values it was generated with.")
    truth = dataclasses.replace(truth, trend_days=cfg.days)
    # the rate at the history's end, not its mean: impressions drawn before their pin existed were moved after its
    # creation, so the generated volume climbs toward the end (default world: 7k events in the first week, 74k in
    # the last); the world goes on at its last week's volume
    last_week = pd.Timestamp((world.end_us - 7 * US_PER_DAY) * 1000, tz="UTC")
    week_rows = int((history & (events_df["event_timestamp"] >= last_week)).sum())
    in_history = world.pins.created_us >= world.start_us
    copy = world.pins.duplicate_of >= 0
    per_day = (float((in_history & ~copy).sum()) / cfg.days, float((in_history & copy).sum()) / cfg.days)
    pins = _PinState(
        ids=truth.pin_ids, interest=truth.pin_interest, v=truth.v, popularity=truth.popularity,
        created_us=pd.DatetimeIndex(pins_df["created_at"]).as_unit("us").asi8,
        signature=pins_df["image_signature"].to_numpy(object), duplicate_of=truth.duplicate_of,
    )
    n_old_pins = len(pins.ids)
    first_day = elapsed // US_PER_DAY
    new_events: list[pd.DataFrame] = []
    for day in tqdm(range(first_day, first_day + days), desc="continued days", unit="day", disable=None):
        day_start = world.end_us + day * US_PER_DAY
        rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence(cfg.seed, spawn_key=(CONTINUE_STREAM, day))))
        surface_rng = np.random.Generator(np.random.PCG64(
            np.random.SeedSequence(cfg.seed, spawn_key=(CONTINUE_STREAM, day, SURFACE_STREAM))))
        pins = pins.extend(_new_pins(rng, cfg, world, pins, day_start, per_day))
        proc = _EventProcess(
            activity=world.users.activity, theta=truth.theta, z=truth.z, pin_v=pins.v, pin_created_us=pins.created_us,
            propose=_popularity_proposals(pins.interest, pins.popularity, cfg.n_interests),
            temperature=truth.temperature, outcome_bias=truth.outcome_bias, outcome_slope=truth.outcome_slope,
            other_surface_share=cfg.other_surface_share,
        )
        n_rows = (day + 1) * week_rows // 7 - day * week_rows // 7
        trend = _trend_by_hour(truth, (day_start - truth.start_us) // US_PER_HOUR, 24)
        ev = _make_events(rng, surface_rng, proc, n_rows, day_start, day_start + US_PER_DAY, trend, progress=False)
        order = _sort_events(ev)
        new_events.append(pd.DataFrame({
            "user_id": truth.user_ids[ev.user[order]],
            "pin_id": pins.ids[ev.pin[order]],
            "event_type": np.array(EVENT_TYPES, dtype=object)[ev.code[order]],
            "event_timestamp": _utc(ev.ts[order]),
            "surface": np.array(SURFACES, dtype=object)[ev.surface[order]],
        }))
    end_us = world.end_us + (first_day + days) * US_PER_DAY
    hours = (end_us - truth.start_us) // US_PER_HOUR
    truth = dataclasses.replace(
        truth, pin_ids=pins.ids, v=pins.v, pin_interest=pins.interest, popularity=pins.popularity,
        duplicate_of=pins.duplicate_of, end_us=end_us, trend_mean=_trend_by_hour(truth, 0, hours).mean(axis=0),
    )
    new = slice(n_old_pins, None)
    added_pins = pd.DataFrame({"pin_id": pins.ids[new], "interest_id": pins.interest[new],
                               "image_signature": pins.signature[new], "created_at": _utc(pins.created_us[new])})
    appended = pd.concat(new_events, ignore_index=True)
    out = dataclasses.replace(
        tables, pins=pd.concat([pins_df, added_pins], ignore_index=True),
        events=pd.concat([events_df, appended], ignore_index=True),
    )
    summary: dict[str, int | str] = {
        "days": days, "from": _iso(end_us - days * US_PER_DAY), "to": _iso(end_us),
        "pins": len(added_pins), "near_duplicates": int((pins.duplicate_of[new] >= 0).sum()), "events": len(appended),
        "total_pins": len(out.pins), "total_events": len(out.events),
    }
    log.info("continued the world by %d days to %s: %s new pins (%s near-duplicates), %s new events",
             days, summary["to"], f"{summary['pins']:,}", f"{summary['near_duplicates']:,}", f"{summary['events']:,}")
    return out, truth, summary
