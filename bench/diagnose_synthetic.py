"""Where the recall of the synthetic world comes from, and what a model can see of it.

Usage: ``python bench/diagnose_synthetic.py --data-dir D`` (a synthetic data dir after ``retrieval run``; the split is
the report's). Prints capped recall@10 / @50 on the report's split for:

1. the generator's ground truth taken apart: the interest term, the pin-popularity term and the affinity term alone
   and together, and with the pin's age boost added (the generator moves the impressions a pin would have had
   before its creation into its lifetime, so a pin created d days before the end is shown at days_total / d times
   its rate; the oracle ranks by the stationary rate);
2. how much of the held-out engagement falls on pins the ids cannot know: pins never engaged in the train part, and
   pins outside the pre-trained table of the default config (its window ends where the training window starts);
   and on pins no index could hold at the user's cut-off (created after it) or at the index refresh the user is
   scored at (``train.index_refresh_days``; 7 and 30 for comparison), with the oracle restricted to the pins that
   existed then: the ceiling of any model served from such an index;
3. a two-number scorer with no training: log of the user's smoothed interest shares in their train history plus beta
   times the log of the pin's popularity at the index refresh the user is scored at, as the two-tower scorer does
   (``train.index_refresh_days``). Popularity is the pin's Homefeed engagements or impressions (every user's) in the
   ``days`` before, as a count or as a rate per exposed day, (n + .5) / (min(age, days) + .5): a young pin's count
   covers its age only. The signal, form, ``days`` and ``beta`` are chosen on validation. The events are exact to the
   second here; the two-tower reads the same counts from daily feature rows. Then the same scorer with the shares
   counted over what the user was shown (impressions of every surface before the midnight that starts their
   cut-off's day, as the ``user_impressions`` feature that ``train.impression_interests`` adds to the towers' cross);
4. that scorer plus an affinity read from the pin's engagers: the cosine of a user vector with the mean vector of
   the users who engaged the pin in the 30 days before the refresh, for three kinds of user vectors: the pre-trained
   table's (what the towers have), the user's train pins' true latents minus their interest centroid (the best a
   learned id table could give), and the generator's true user vectors (the ceiling). It says how much a pin
   feature of recent engager ids could add (pins created after training get engagers within days).
"""

from __future__ import annotations

import argparse
import logging

import numpy as np
import pandas as pd
import scipy.sparse as sp

from training.config import Config
from training.data.snapshot import load_live
from training.data.synthetic import SCORE_TERMS, GroundTruth
from training.evaluation.harness import evaluate
from training.evaluation.oracle import Oracle
from training.evaluation.scorer import time_points
from training.evaluation.split import Split, load_split
from training.pretrain import pretrain


class _Scores:
    def __init__(self, fn):
        self.fn = fn

    def fit(self, split: Split) -> None:
        pass

    def score(self, user_idx: np.ndarray) -> np.ndarray:
        return self.fn(user_idx).astype(np.float32)


def _cutoffs(split: Split, on: str) -> pd.Series:
    """user index -> the time of the user's first ``on`` interaction (UTC)."""
    cut = split.cutoffs((on,))
    return pd.Series(pd.to_datetime(cut.to_numpy(), utc=True), index=pd.Index(split.users).get_indexer(cut.index))


def _log_shares(counts: np.ndarray, a: float = 0.1) -> np.ndarray:
    """(users, interests) log interest shares of per-user counts, smoothed by ``a`` pseudo-counts per interest spread
    like the interests' overall shares."""
    n_k = counts.shape[1]
    prior = counts.sum(axis=0) / counts.sum()
    return np.log((counts + a * n_k * prior) / (counts.sum(axis=1, keepdims=True) + a * n_k))


def _unit(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (zero rows stay zero)."""
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def _recall(fn, split: Split, on: str) -> tuple[float, float]:
    r = evaluate(_Scores(fn), split, on=on)
    return round(r["capped_recall@10"], 4), round(r["capped_recall@50"], 4)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", required=True)
    args = ap.parse_args()
    logging.disable(logging.INFO)
    cfg = Config.load(None, {"data_dir": args.data_dir})
    ts, split, manifest = load_split(cfg)
    raw = cfg.data_path / "raw"
    truth = GroundTruth.load(raw / "ground_truth.npz")
    fr = split.frame

    # 1. the ground truth taken apart (the age boost: log(days_total / days_left) for pins created in the history)
    created = pd.read_parquet(raw / "pins.parquet").set_index("pin_id")["created_at"].reindex(split.items)
    start, end = fr["event_timestamp"].min(), fr["event_timestamp"].max()
    left = np.maximum((end - created).dt.total_seconds().to_numpy(), 3600.0)
    boost = np.where((created > start).to_numpy(), np.log((end - start).total_seconds() / left), 0.0)
    print("1. ground truth terms (test: capped R@10, R@50)")
    for label, terms, age in [("full oracle (interest + popularity + affinity)", SCORE_TERMS, False),
                              ("interest + popularity (no affinity)", ("interest", "popularity"), False),
                              ("popularity + affinity (no interest)", ("popularity", "affinity"), False),
                              ("interest + affinity (no popularity)", ("interest", "affinity"), False),
                              ("full oracle + the pin's age boost", SCORE_TERMS, True)]:
        oracle = Oracle(truth, terms=terms)
        oracle.fit(split)
        fn = (lambda u, o=oracle: o.score(u) + boost[None, :]) if age else oracle.score
        print(f"   {label:55s} {_recall(fn, split, 'test')}", flush=True)

    # 2. held-out engagement on pins the ids cannot know
    seen = np.asarray(split.train.sum(axis=0)).ravel() > 0
    table = pretrain(cfg, split, manifest["snapshot_id"])
    in_table = np.isin(split.items, table.pin_ids)
    print(f"2. candidates in the pre-trained table (window ends {table.window_end}): {in_table.mean():.3f}")
    for on in ("valid", "test"):
        rel = np.asarray(split.relevant(on).sum(axis=0)).ravel()
        print(f"   {on}: held-out pairs on pins never engaged in train {rel[~seen].sum() / rel.sum():.3f}, "
              f"on pins outside the table {rel[~in_table].sum() / rel.sum():.3f}")
    oracle = Oracle(truth)
    oracle.fit(split)
    born = pd.to_datetime(created, utc=True).to_numpy()
    for on in ("valid", "test"):
        cut = _cutoffs(split, on)
        pairs = split.relevant(on).tocoo()
        for label, days in (("the cut-off", None), *((f"a refresh every {d} d", d) for d in
                                                      sorted({cfg.train.index_refresh_days, 7, 30}))):
            at = np.full(split.n_users, np.datetime64("NaT"), dtype=born.dtype)
            if days is None:
                at[cut.index.to_numpy()] = cut.to_numpy()
            else:
                times, which = time_points(cut, days)
                at[cut.index.to_numpy()] = np.asarray(times, dtype=born.dtype)[which]
            unborn = born[pairs.col] > at[pairs.row]

            def existing(u, at=at):
                s = oracle.score(u)
                s[born[None, :] > at[u][:, None]] = -np.inf
                return s
            print(f"   {on}: scored at {label:20s} held-out pairs on pins created after it {unborn.mean():.3f}; "
                  f"oracle on the pins that existed then {_recall(existing, split, on)}", flush=True)

    # 3. interest shares x recent pin engagement, point in time
    ki = split.item_interest
    n_k = int(ki.max()) + 1
    onehot = sp.csr_matrix((np.ones(len(ki)), (np.arange(len(ki)), ki)), shape=(len(ki), n_k))
    shares = _log_shares((split.train.tocsr() @ onehot).toarray())
    signals = {"engagements": (fr["event_timestamp"].to_numpy(), fr["item_idx"].to_numpy())}
    canonical = pd.read_parquet(load_live(cfg).table("pin_canonical_map")).set_index("pin_id")["canonical_pin_id"]
    events = pd.read_parquet(raw / "events.parquet",
                             columns=["user_id", "pin_id", "event_type", "event_timestamp", "surface"])
    shown = events[(events["event_type"] == "impression") & (events["surface"] == "homefeed")]
    item = pd.Series(np.arange(split.n_items), index=split.items).reindex(shown["pin_id"].map(canonical).to_numpy())
    keep = item.notna().to_numpy()
    signals["impressions"] = (shown["event_timestamp"].to_numpy()[keep], item.to_numpy()[keep].astype(np.int64))
    created_at = pd.to_datetime(created, utc=True)
    results: dict[tuple[str, str, int, float], dict[str, tuple[float, float]]] = {}
    shown_results: dict[tuple[int, float], dict[str, tuple[float, float]]] = {}
    refreshes: dict[str, tuple[list, np.ndarray]] = {}   # split part -> (refresh times, each user's refresh)

    def popularity(signal: str, form: str, days: int, times: list) -> np.ndarray:
        """(refreshes, n_items) log popularity of every candidate at each refresh time."""
        ev_t, ev_i = signals[signal]
        recent = np.stack([np.bincount(ev_i[(ev_t < t) & (ev_t >= t - pd.Timedelta(days=days))],
                                       minlength=split.n_items) for t in times]) + 0.5
        if form == "count":
            return np.log(recent)
        age = np.stack([np.clip((pd.Timestamp(t) - created_at).dt.total_seconds().to_numpy() / 86400, 0, None)
                        for t in times])
        return np.log(recent / (np.minimum(age, days) + 0.5))

    # the same shares counted over what each user was shown (impressions of every surface) before the midnight that
    # starts their cut-off's day, as the daily `user_impressions` feature the towers' interest cross reads
    seen_all = events[events["event_type"] == "impression"]
    seen_user = pd.Index(split.users).get_indexer(seen_all["user_id"].to_numpy())
    seen_k = pd.Series(ki, index=split.items).reindex(seen_all["pin_id"].map(canonical).to_numpy()).to_numpy()
    seen_ok = (seen_user >= 0) & ~np.isnan(seen_k)
    seen_t, seen_user, seen_k = seen_all["event_timestamp"].to_numpy()[seen_ok], seen_user[seen_ok], seen_k[seen_ok]

    def shown_shares(on: str) -> np.ndarray:
        day = pd.Series(pd.NaT, index=np.arange(split.n_users), dtype="datetime64[ns, UTC]")
        cut = _cutoffs(split, on)
        day[cut.index.to_numpy()] = cut.dt.floor("D").to_numpy()
        before = seen_t < day.to_numpy()[seen_user]
        counts = np.zeros((split.n_users, n_k))
        np.add.at(counts, (seen_user[before], seen_k[before].astype(np.int64)), 1.0)
        return _log_shares(counts)

    for on in ("valid", "test"):
        cut = _cutoffs(split, on)
        bucket = np.zeros(split.n_users, dtype=np.int64)
        times, bucket[cut.index.to_numpy()] = time_points(cut, cfg.train.index_refresh_days)
        refreshes[on] = (times, bucket)
        shown = shown_shares(on)
        for signal in signals:
            for days in (7, 14, 30):
                for form in ("count", "rate"):
                    pop = popularity(signal, form, days, times)
                    for beta in (0.5, 1.0):
                        def fn(u, pop=pop, beta=beta, bucket=bucket):
                            return shares[u][:, ki] + beta * pop[bucket[u]]
                        results.setdefault((signal, form, days, beta), {})[on] = _recall(fn, split, on)
                        if signal == "impressions" and form == "rate":
                            def shown_fn(u, pop=pop, beta=beta, bucket=bucket, shown=shown):
                                return shown[u][:, ki] + beta * pop[bucket[u]]
                            shown_results.setdefault((days, beta), {})[on] = _recall(shown_fn, split, on)
    best = max(results, key=lambda key: results[key]["valid"][1])
    print("3. interest shares + beta * log(pin popularity before the cut-off) (valid / test: capped R@10, R@50)")
    for (signal, form, days, beta), r in results.items():
        mark = "  <- chosen on validation" if (signal, form, days, beta) == best else ""
        print(f"   {signal:11s} {form:5s} days {days:2d} beta {beta:.1f}: valid {r['valid']} test {r['test']}{mark}")
    shown_best = max(shown_results, key=lambda key: shown_results[key]["valid"][1])
    print("   the shares counted over what the user was shown (every surface, before the cut-off's midnight) + beta *"
          " log impression rate:")
    for (days, beta), r in shown_results.items():
        mark = "  <- chosen on validation" if (days, beta) == shown_best else ""
        print(f"   shown       rate  days {days:2d} beta {beta:.1f}: valid {r['valid']} test {r['test']}{mark}")

    # 4. the pin's recent engagers pooled: an affinity term read from who engaged the pin, which a fresh pin has
    #    within days of its creation where its id has no training signal
    signal, form, days, beta = best
    ev_t, ev_i, ev_u = fr["event_timestamp"].to_numpy(), fr["item_idx"].to_numpy(), fr["user_idx"].to_numpy()
    truth_pin = pd.Index(truth.pin_ids).get_indexer(split.items)
    pin_v, pin_k = truth.v[truth_pin], truth.pin_interest[truth_pin]
    centroid = np.stack([truth.v[truth.pin_interest == k].mean(axis=0) if (truth.pin_interest == k).any()
                         else np.zeros(truth.v.shape[1]) for k in range(int(truth.pin_interest.max()) + 1)])
    in_table = pd.Index(table.user_ids).get_indexer(split.users)
    table_users = np.zeros((split.n_users, table.dim))
    table_users[in_table >= 0] = table.users[in_table[in_table >= 0]]
    user_vectors = {
        "the pre-trained table's user vectors": table_users,
        "the user's train pins' true latents minus their interest centroid": np.asarray(
            split.train.tocsr() @ (pin_v - centroid[pin_k])),
        "the generator's true user vectors z (the ceiling)": truth.z[pd.Index(truth.user_ids).get_indexer(split.users)],
    }
    shape = (split.n_items, split.n_users)
    print("4. the step-3 scorer chosen on validation + gamma * cos(user vector, mean vector of the pin's engagers "
          "in the 30 days before the refresh) (valid / test: capped R@10, R@50)")
    pops = {on: popularity(signal, form, days, times) for on, (times, _) in refreshes.items()}
    for label, vectors in user_vectors.items():
        unit = _unit(vectors)
        pooled = {on: [_unit(sp.csr_matrix((np.ones(m.sum()), (ev_i[m], ev_u[m])), shape=shape) @ unit)
                       .astype(np.float32)
                       for m in ((ev_t < t) & (ev_t >= t - pd.Timedelta(days=30)) for t in times)]
                  for on, (times, _) in refreshes.items()}   # per part: (n_items, d) per refresh, for every gamma
        for gamma in (0.5, 1.0, 2.0):
            row = {}
            for on, (_, bucket) in refreshes.items():
                def fn(u, pop=pops[on], pooled=pooled[on], bucket=bucket, unit=unit, gamma=gamma):
                    affinity = np.empty((len(u), split.n_items), dtype=np.float32)
                    for b in np.unique(bucket[u]):
                        rows = bucket[u] == b
                        affinity[rows] = unit[u[rows]] @ pooled[b].T
                    return shares[u][:, ki] + beta * pop[bucket[u]] + gamma * affinity
                row[on] = _recall(fn, split, on)
            print(f"   {label:68s} gamma {gamma:.1f}: valid {row['valid']} test {row['test']}", flush=True)


if __name__ == "__main__":
    main()
