"""Stage: the evaluation of the multi-embedding and conditional modes next to the single embedding
(``retrieval report --report.variants modes``: extra tables in report.md / report.json).

Every figure ranks the full candidate set through the harness's ``rank`` (the user's train + validation items
excluded, ties by index, capped recall = hits / min(|relevant|, K)); users are embedded at their first test
interaction with the same tower calls as the service (``bentos/retriever.py``: ``tower(x, with_mask=True)``
-> (B, K, D) + which embeddings are real; a condition is ``x["condition"]`` = interest id + 1, the first
embedding of the conditioned output is its vector).

- **Single vs multi**: capped recall@10/50/100 with a pin's score = its best inner product over the user's real
  embeddings (K = ``k_for_length(history length, K_max)``, the tower's own cut), and, for multi, the served
  merge: each embedding's top list taken round-robin (``clustering.round_robin``). Diversity of the top
  ``DIVERSITY_K``: distinct interests per list, intra-list diversity (mean pairwise 1 − cosine of the retrieved
  pins' vectors: the pin tower's output as scored, without the pin-bias coordinate), catalogue coverage.
- **First k embeddings**: the same recall with only embeddings 1..k (k = 1..K_max; a user with fewer keeps all
  theirs): maxmin initialisation makes the first ones the most representative.
- **By number of dominant interests** (synthetic; the generator's ``GroundTruth.dominant``): per-user capped
  recall@50, averaged within users with 1..5 dominant interests.
- **Per-interest**: for each evaluated user and each interest c among their relevant test items, one row:
  relevant = their relevant items of c, candidates = the pins of c (filter), query = the unconditioned user
  (best over its embeddings) or, for a conditional tower, the user conditioned on c. Mean over (user, interest)
  pairs, overall and by the interest's popularity bucket (tertiles of the interests by their interactions in the
  data the model saw: head / torso / tail).
- **Conditions merged round-robin** (as the service's conditional mode): per user, one list per condition
  (filtered to it; conditioned on it for a conditional tower), merged round-robin, against the user's whole
  relevant set; the conditions are the followed interests at the cut-off (``followed_interest_ids``, synthetic
  data) or the inferred top interests (``top_interest_ids``). A user without conditions gets the unconditioned
  list (the service does the same).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch

from training.evaluation.harness import rank
from training.evaluation.metrics import coverage, recall_curve
from training.evaluation.scorer import best_of
from training.evaluation.split import Split
from training.model.clustering import round_robin
from training.model.encoding import take

KS = (10, 50, 100)
"""Cut-offs of the recall tables."""
CONDITION_KS = (10, 50)
"""Cut-offs of the per-interest table."""
BATCH_BYTES = 64 * 2**20
"""Bound on one batch's score matrix (best_of holds a few of them)."""
DIVERSITY_K = 50
DOMINANT_K = 50
BUCKETS = ("head", "torso", "tail")
CONDITIONS = {"followed": "followed_interest_ids", "top interests": "top_interest_ids"}
"""Condition sets of the round-robin table: label -> training-set column (at the user's cut-off)."""


# --- building blocks (pure numpy) -------------------------------------------------------------------------------

def capped_recalls(hits: np.ndarray, n_relevant: np.ndarray, ks: Sequence[int]) -> dict[str, np.ndarray]:
    """Per-row capped recall@k, k in ``ks`` ((n,) each), from the ranked hits (n, depth)."""
    curve = recall_curve(hits, n_relevant, capped=True)
    return {f"capped_recall@{k}": curve[:, min(k, hits.shape[1]) - 1] for k in ks}


def merge_round_robin(lists: Sequence[np.ndarray], depth: int) -> np.ndarray:
    """(n, depth) int32: for each row, the first ``depth`` distinct items of the rows' ranked lists taken in turns
    (``clustering.round_robin``, the service's merge); ``lists`` are (n, d_i) item indices, -1 = empty slot."""
    n = len(lists[0])
    out = np.full((n, depth), -1, dtype=np.int32)
    for r in range(n):
        hits = [[{"pin_id": int(i)} for i in lst[r] if i >= 0] for lst in lists]
        merged = [h["pin_id"] for h in round_robin(hits, depth)]
        out[r, : len(merged)] = merged
    return out


def hits_of(topk: np.ndarray, relevant: sp.csr_matrix) -> np.ndarray:
    """(n, depth) bool: which ranked items (-1 = none) are relevant in the rows of ``relevant`` (n, n_items)."""
    rel = relevant.toarray().astype(bool)
    return np.take_along_axis(rel, np.maximum(topk, 0), axis=1) & (topk >= 0)


def distinct_interests(topk: np.ndarray, item_interest: np.ndarray) -> np.ndarray:
    """(n,) number of distinct interests among each row's ranked items (-1 slots ignored)."""
    interest = np.where(topk >= 0, item_interest[np.maximum(topk, 0)], -1)
    ordered = np.sort(interest, axis=1)
    new = (ordered[:, 1:] != ordered[:, :-1]) & (ordered[:, 1:] >= 0)
    return new.sum(1) + (ordered[:, 0] >= 0)


def intra_list_diversity(vectors: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """(n,) mean pairwise 1 − cosine over each row's valid vectors ((n, k, D), valid (n, k)); NaN below two.
    With unit rows p_i: Σ_{i≠j} cos = |Σ p_i|² − m, so no (k, k) matrix is formed."""
    norm = np.linalg.norm(vectors, axis=-1, keepdims=True)
    unit = np.where(norm > 0, vectors / np.maximum(norm, 1e-12), 0.0) * valid[..., None]
    m = valid.sum(1).astype(np.float64)
    total = (unit.sum(1) ** 2).sum(-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(m >= 2, 1.0 - (total - m) / (m * (m - 1)), np.nan)


def popularity_buckets(counts: Mapping[int, float]) -> dict[int, str]:
    """interest id -> 'head' / 'torso' / 'tail': the interests sorted by descending count (ties by id), cut in
    three groups of (nearly) equal size, the larger groups first."""
    order = sorted(counts, key=lambda i: (-counts[i], i))
    return {int(i): BUCKETS[b] for b, part in enumerate(np.array_split(np.array(order, dtype=np.int64), 3))
            for i in part}


def mean_by(values: Mapping[str, np.ndarray], groups: np.ndarray, names: Sequence[Any]) -> dict[str, dict[str, float]]:
    """For each group name: {metric: mean over the rows of that group, 'rows': count} (groups without rows are
    left out)."""
    out = {}
    for name in names:
        sel = groups == name
        if sel.any():
            out[str(name)] = {**{k: float(np.nanmean(v[sel])) for k, v in values.items()}, "rows": int(sel.sum())}
    return out


def _means(values: Mapping[str, np.ndarray]) -> dict[str, float]:
    return {k: float(np.nanmean(v)) for k, v in values.items()}


def id_lists(column: pd.Series | None, n: int) -> list[list[int]]:
    """A list feature (arrays, lists, None / NaN) as n lists of ints (no column: n empty lists)."""
    if column is None:
        return [[] for _ in range(n)]
    out = []
    for v in column:
        out.append([] if v is None or (np.isscalar(v) and pd.isna(v)) else [int(i) for i in v])
    return out


# --- the evaluation of one trained model ----------------------------------------------------------------------------

def user_embeddings(tower: torch.nn.Module, x: dict[str, torch.Tensor], condition: np.ndarray | None = None,
                    batch: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """(n, K, D) user vectors and (n, K) which are real (K = 1 for one embedding), through the serving call
    ``tower(x, with_mask=True)``; ``condition`` (n,) interest id + 1 per row (0 = none), conditional towers."""
    n = len(next(iter(x.values())))
    vecs, masks = [], []
    with torch.no_grad():
        for i in range(0, n, batch):
            idx = torch.arange(i, min(i + batch, n))
            xb = take(x, idx)
            if condition is not None:
                xb["condition"] = torch.as_tensor(condition[i:i + batch], dtype=torch.long)
            out, keep = tower(xb, with_mask=True)
            if out.dim() == 2:
                out = out[:, None, :]
            vecs.append(out.numpy())
            masks.append(keep.numpy())
    return np.concatenate(vecs), np.concatenate(masks)


class _Ranker:
    """Ranks rows (a user, or a user with a condition) over the split's candidates with the harness."""

    def __init__(self, split: Split, bucket: np.ndarray, pins: np.ndarray, on: str = "test"):
        self.split, self.bucket, self.pins = split, bucket, pins
        self.excluded = split.excluded(on)
        self.depth = min(max(KS), split.n_items)
        self.diversity_pins = pins
        """(T, n_items, D') the pin vectors whose cosines the intra-list diversity averages."""

    def rank(self, users: np.ndarray, vectors: np.ndarray, relevant: sp.csr_matrix,
             only: np.ndarray | None = None, depth: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(topk, hits) of rows for split users ``users`` with query vectors (n, K, D) (zero rows = not real);
        ``only`` (n,) restricts each row's candidates to that interest."""
        interest = self.split.item_interest

        def score(rows: np.ndarray) -> np.ndarray:
            s = best_of(vectors[rows], self.bucket[users[rows]], self.pins)
            if only is not None:
                s[interest[None, :] != only[rows, None]] = -np.inf
            return s

        return rank(score, users, relevant, self.excluded, depth or self.depth, batch_bytes=BATCH_BYTES)


def evaluate_modes(model, encoder, scorer, split: Split, *, dominant: Mapping[int, int] | None = None,
                   on: str = "test") -> dict[str, Any]:
    """The modes' figures of one trained two-tower model (``training.train.Trained``'s model, encoder and
    scorer, the scorer already ``prepare``d on ``on``); ``dominant``: user id -> number of dominant interests
    (synthetic ground truth). See the module docstring."""
    tower = model.user_tower
    tower.eval()
    rows = scorer.cutoff_rows(on)
    relevant_all = split.relevant(on)
    n_rel_all = np.diff(relevant_all.indptr)
    rows = rows[n_rel_all[rows["user_idx"].to_numpy()] > 0].reset_index(drop=True)
    users = rows["user_idx"].to_numpy()
    x = encoder.users(rows)
    vectors, mask = user_embeddings(tower, x)
    vectors = vectors * mask[..., None]
    k_max = vectors.shape[1]
    pins = np.asarray(scorer.pin_vectors)   # every refresh at once: the modes group is an ablation, not a stage
    ranker = _Ranker(split, scorer.user_bucket, pins, on)
    if model.pin_tower.pin_bias:   # diversity by direction: the pin-bias coordinate is popularity, not content
        ranker.diversity_pins = np.delete(pins, model.pin_tower.out.out_features - 1, axis=-1)
    relevant = relevant_all[users]
    n_rel = n_rel_all[users]
    out: dict[str, Any] = {"k_max": int(k_max), "users": int(len(users)),
                           "embeddings_per_user": float(mask.sum(1).mean())}

    # single vs multi: best over the embeddings; the served round-robin merge for multi
    topk, hits = ranker.rank(users, vectors, relevant)
    scoring = {"max": {**_means(capped_recalls(hits, n_rel, KS)), **_diversity(topk, users, ranker)}}
    if k_max > 1:
        per = [ranker.rank(users, vectors[:, j:j + 1], relevant)[0] for j in range(k_max)]
        merged = merge_round_robin(per, ranker.depth)
        rr_hits = hits_of(merged, relevant)
        scoring["round_robin"] = {**_means(capped_recalls(rr_hits, n_rel, KS)), **_diversity(merged, users, ranker)}
        out["first_k"] = {str(k): _means(capped_recalls(ranker.rank(users, vectors[:, :k], relevant)[1], n_rel, KS))
                          for k in range(1, k_max + 1)}
    out["scoring"] = scoring
    if dominant is not None:
        groups = np.array([dominant.get(int(u), -1) for u in split.users[users]])
        out["by_dominant"] = mean_by(capped_recalls(hits, n_rel, (DOMINANT_K,)), groups, range(1, 6))

    # per-interest: (user, interest) pairs, filtered to the interest
    interest = split.item_interest
    counts = np.asarray(ranker.excluded.sum(axis=0)).ravel()
    known = interest >= 0
    freq = pd.Series(counts[known]).groupby(interest[known]).sum()
    buckets = popularity_buckets(freq.to_dict())
    pair_row, pair_interest = _pairs(relevant, interest)
    pair_rel = _restrict(relevant[pair_row], interest, pair_interest)
    pair_n = np.diff(pair_rel.indptr)
    queries = {"unconditioned": vectors[pair_row]}
    conditional = bool(getattr(tower, "conditional", False))
    if conditional:
        queries["conditioned"] = _conditioned(tower, x, pair_row, pair_interest)
    pair_bucket = np.array([buckets.get(int(c), "tail") for c in pair_interest])
    per_interest = {}
    for name, q in queries.items():
        _, h = ranker.rank(users[pair_row], q, pair_rel, only=pair_interest, depth=max(CONDITION_KS))
        rec = capped_recalls(h, pair_n, CONDITION_KS)
        per_interest[name] = {"overall": {**_means(rec), "rows": len(pair_row)}, **mean_by(rec, pair_bucket, BUCKETS)}
    out["per_interest"] = per_interest
    out["buckets"] = {b: sorted(i for i, v in buckets.items() if v == b) for b in BUCKETS}

    # conditions (followed / inferred top interests) merged round-robin, against the whole relevant set
    conditions: dict[str, Any] = {"none (single list)": {**_means(capped_recalls(hits, n_rel, KS)),
                                                         "users_with": int(len(users))}}
    n_interests = encoder.n_interests
    for label, column in CONDITIONS.items():
        if column not in rows.columns:
            continue
        lists = id_lists(rows[column], len(rows))
        lists = [[c for c in cs if 0 <= c < n_interests] for cs in lists]   # interests the model knows
        with_any = np.array([len(cs) > 0 for cs in lists])
        if not with_any.any():
            continue
        c_row = np.repeat(np.arange(len(rows)), [len(cs) for cs in lists])
        c_int = np.array([c for cs in lists for c in cs], dtype=np.int64)
        ways = {"filtered": vectors[c_row]}
        if conditional:
            ways["conditioned"] = _conditioned(tower, x, c_row, c_int)
        conditions[label] = {"users_with": int(with_any.sum())}
        for way, q in ways.items():
            top_c, _ = ranker.rank(users[c_row], q, relevant[c_row], only=c_int)
            merged = _merge_per_user(top_c, c_row, topk, with_any, ranker.depth)
            conditions[label][way] = _means(capped_recalls(hits_of(merged, relevant), n_rel, KS))
    out["conditions"] = conditions
    return out


def _diversity(topk: np.ndarray, users: np.ndarray, ranker: _Ranker) -> dict[str, float]:
    top = topk[:, :DIVERSITY_K]
    valid = top >= 0
    pins = ranker.diversity_pins[ranker.bucket[users][:, None], np.maximum(top, 0)]       # (n, k, D)
    return {f"distinct_interests@{DIVERSITY_K}": float(distinct_interests(top, ranker.split.item_interest).mean()),
            f"ild@{DIVERSITY_K}": float(np.nanmean(intra_list_diversity(pins, valid))),
            f"coverage@{DIVERSITY_K}": coverage(top, ranker.split.n_items)}


def _pairs(relevant: sp.csr_matrix, item_interest: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(row, interest) of every distinct interest among each row's relevant items (unknown interests skipped)."""
    row = np.repeat(np.arange(relevant.shape[0]), np.diff(relevant.indptr))
    pairs = pd.DataFrame({"row": row, "interest": item_interest[relevant.indices]})
    pairs = pairs[pairs["interest"] >= 0].drop_duplicates().sort_values(["row", "interest"])
    return pairs["row"].to_numpy(), pairs["interest"].to_numpy(np.int64)


def _restrict(relevant: sp.csr_matrix, item_interest: np.ndarray, interest: np.ndarray) -> sp.csr_matrix:
    """Row r of ``relevant`` keeping only the items of interest ``interest[r]``."""
    coo = relevant.tocoo()
    keep = item_interest[coo.col] == interest[coo.row]
    out = sp.csr_matrix((coo.data[keep], (coo.row[keep], coo.col[keep])), shape=relevant.shape)
    out.sort_indices()
    return out


def _conditioned(tower, x: dict[str, torch.Tensor], row: np.ndarray, interest: np.ndarray) -> np.ndarray:
    """(n, 1, D): the tower's first embedding for user rows ``row`` conditioned on ``interest`` (as served)."""
    vecs, _ = user_embeddings(tower, take(x, torch.as_tensor(row)), condition=interest + 1)
    return vecs[:, :1]


def _merge_per_user(lists: np.ndarray, owner: np.ndarray, fallback: np.ndarray, has: np.ndarray,
                    depth: int) -> np.ndarray:
    """Per user, their condition lists (rows of ``lists`` owned by them, in order) merged round-robin; users
    without conditions keep ``fallback``."""
    out = fallback[:, :depth].copy()
    starts = np.searchsorted(owner, np.arange(len(has)))
    ends = np.searchsorted(owner, np.arange(len(has)), side="right")
    for u in np.flatnonzero(has):
        out[u] = merge_round_robin([lists[i:i + 1] for i in range(starts[u], ends[u])], depth)[0]
    return out


# --- across seeds, and the report's tables ----------------------------------------------------------------------

def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """Nested figures as {'a/b/c': value} (numbers only)."""
    out: dict[str, float] = {}
    for k, v in d.items():
        if isinstance(v, Mapping):
            out.update(flatten(v, f"{prefix}{k}/"))
        elif isinstance(v, (int, float, np.number)) and not isinstance(v, bool):
            out[f"{prefix}{k}"] = float(v)
    return out


def aggregate(runs: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, float]]:
    """Mean and std (ddof 1; 0 for one run) over seeds of every figure, keyed like ``flatten``."""
    flat = [flatten(r) for r in runs]
    keys = [k for k in flat[0] if all(k in f for f in flat)]
    return {"mean": {k: float(np.mean([f[k] for f in flat])) for k in keys},
            "std": {k: float(np.std([f[k] for f in flat], ddof=1)) if len(flat) > 1 else 0.0 for k in keys}}


def markdown(variants: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """The report's mode tables for the variants that carry ``modes`` (aggregated by ``aggregate``)."""
    rows = {label: v["modes"] for label, v in variants.items() if v.get("modes")}
    if not rows:
        return []

    def cell(agg: Mapping[str, Any], key: str) -> str:
        if key not in agg["mean"]:
            return ""
        return f"{agg['mean'][key]:.3f} ± {agg['std'][key]:.3f}"

    rk = [f"capped_recall@{k}" for k in KS]
    lines = ["## Multi-embedding and conditional retrieval", "",
             "Users at their first test interaction, full ranking, train + validation items excluded; recall@K = "
             "hits / min(|relevant|, K); mean ± std over the seeds (training/evaluation/modes.py).", "",
             f"### Single vs multi: recall and diversity of the top {DIVERSITY_K}", "",
             "| model | embeddings / user | scoring | recall@10 | recall@50 | recall@100 | distinct interests | "
             "intra-list diversity | coverage |", "|---|---:|---|---:|---:|---:|---:|---:|---:|"]
    div = [f"distinct_interests@{DIVERSITY_K}", f"ild@{DIVERSITY_K}", f"coverage@{DIVERSITY_K}"]
    for label, agg in rows.items():
        for way, name in (("max", "best over embeddings"), ("round_robin", "round-robin (as served)")):
            if f"scoring/{way}/{rk[0]}" in agg["mean"]:
                lines.append(f"| {label} | {agg['mean']['embeddings_per_user']:.2f} | {name} | "
                             + " | ".join(cell(agg, f"scoring/{way}/{m}") for m in rk + div) + " |")
    first = {label: agg for label, agg in rows.items() if any(k.startswith("first_k/") for k in agg["mean"])}
    if first:
        lines += ["", "### Recall of the first k embeddings alone (best over embeddings 1..k)", "",
                  "| model | k | recall@10 | recall@50 | recall@100 |", "|---|---:|---:|---:|---:|"]
        for label, agg in first.items():
            for k in range(1, int(agg["mean"]["k_max"]) + 1):
                lines.append(f"| {label} | {k} | " + " | ".join(cell(agg, f"first_k/{k}/{m}") for m in rk) + " |")
    dom = {label: agg for label, agg in rows.items() if any(k.startswith("by_dominant/") for k in agg["mean"])}
    if dom:
        lines += ["", f"### Recall@{DOMINANT_K} by the user's number of dominant interests (generator's ground "
                      "truth; users in brackets)", "",
                  "| model | " + " | ".join(str(n) for n in range(1, 6)) + " |", "|---|" + "---:|" * 5]
        for label, agg in dom.items():
            parts = []
            for n in range(1, 6):
                key = f"by_dominant/{n}/capped_recall@{DOMINANT_K}"
                users = agg["mean"].get(f"by_dominant/{n}/rows")
                parts.append(f"{cell(agg, key)} ({users:.0f})" if key in agg["mean"] else "")
            lines.append(f"| {label} | " + " | ".join(parts) + " |")
    ck = [f"capped_recall@{k}" for k in CONDITION_KS]
    lines += ["", "### Per-interest recall: candidates filtered to the interest, relevant = the user's test items of "
                  "it, one row per (user, interest)", "",
              "| model | query | pairs | " + " | ".join(f"{b} R@{k}" for b in ("overall", *BUCKETS)
                                                       for k in CONDITION_KS) + " |",
              "|---|---|---:|" + "---:|" * (2 * (1 + len(BUCKETS)))]
    for label, agg in rows.items():
        for q in ("unconditioned", "conditioned"):
            if f"per_interest/{q}/overall/{ck[0]}" not in agg["mean"]:
                continue
            pairs = agg["mean"][f"per_interest/{q}/overall/rows"]
            lines.append(f"| {label} | {q} + filter | {pairs:.0f} | "
                         + " | ".join(cell(agg, f"per_interest/{q}/{b}/{m}") for b in ("overall", *BUCKETS)
                                      for m in ck) + " |")
    lines += ["", "Popularity buckets: interests by their interactions in train + validation, in thirds "
                  "(report.json: `modes.buckets` of each run).", "",
              "### Conditions merged round-robin (one list per condition, against all the user's test items)", "",
              "| model | conditions | users with any | list per condition | recall@10 | recall@50 | recall@100 |",
              "|---|---|---:|---|---:|---:|---:|"]
    for label, agg in rows.items():
        m = agg["mean"]
        lines.append(f"| {label} | none (single list) | {m['conditions/none (single list)/users_with']:.0f} | | "
                     + " | ".join(cell(agg, f"conditions/none (single list)/{r}") for r in rk) + " |")
        for cond in CONDITIONS:
            for way, name in (("filtered", "unconditioned + filter"), ("conditioned", "conditioned + filter")):
                if f"conditions/{cond}/{way}/{rk[0]}" in m:
                    lines.append(f"| {label} | {cond} | {m[f'conditions/{cond}/users_with']:.0f} | {name} | "
                                 + " | ".join(cell(agg, f"conditions/{cond}/{way}/{r}") for r in rk) + " |")
    return [*lines, ""]
