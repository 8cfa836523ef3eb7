"""Multi-embedding users: the engagement history clustered into up to K_max interests (capsule-style routing), and
the round-robin merge of their retrievals.

- ``maxmin_centres``: deterministic initialisation. The first centre is the newest valid history item; each next
  centre is the valid item whose largest cosine similarity to the centres chosen so far is smallest (the item
  least like any of them). Padding is never a centre; a history with fewer valid items than K leaves the
  remaining centres invalid.
- ``route``: single-assignment routing (modified from capsule networks' dynamic routing): each valid item joins
  exactly one cluster, the one whose centre is most similar; a cluster's vector is the mean of its items,
  normalised (the squash); the vectors become the next centres; ``iterations`` rounds. Gradients flow to the
  item embeddings through the means (the assignment itself is a discrete choice).
- ``k_for_length``: how many embeddings a user with ``n`` history items gets, MIND's
  ``max(1, min(K_max, ceil(log2(n))))``; because maxmin makes the first centres the most spread, the first K are
  the most representative ones to keep.
- ``round_robin``: merge several ranked lists by taking the first of each, then the second of each, ... skipping
  pins already taken; every pin keeps which list (embedding or interest) found it.

Shapes: B = batch, L = history length, E = item width, K = K_max.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F


def maxmin_centres(items: torch.Tensor, valid: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, K) item positions of the centres and (B, K) bool which are valid. ``items`` (B, L, E), ``valid``
    (B, L), position 0 = the newest item."""
    b, length, _ = items.shape
    unit = F.normalize(items, dim=-1)
    sim = unit @ unit.transpose(1, 2)                                    # (B, L, L)
    neg_inf = torch.finfo(sim.dtype).min
    first = torch.where(valid.any(1), valid.float().argmax(1), torch.zeros(b, dtype=torch.long))   # newest valid
    chosen = [first]
    taken = F.one_hot(first, length).bool() & valid
    closest = sim[torch.arange(b), first]                                # (B, L): max similarity to the centres
    for _ in range(1, k):
        candidates = valid & ~taken
        score = closest.masked_fill(~candidates, float("inf"))
        nxt = score.argmin(1)
        ok = candidates.any(1)
        chosen.append(torch.where(ok, nxt, torch.zeros_like(nxt)))
        taken = taken | (F.one_hot(nxt, length).bool() & ok[:, None])
        closest = torch.maximum(closest, sim[torch.arange(b), nxt].masked_fill(~ok[:, None], neg_inf))
    idx = torch.stack(chosen, 1)                                         # (B, K)
    n_valid = valid.sum(1)
    centre_ok = torch.arange(k)[None, :] < n_valid[:, None]
    return idx, centre_ok


def route(items: torch.Tensor, valid: torch.Tensor, k: int, iterations: int = 3, limit: torch.Tensor | None = None
          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(B, K, E) unit cluster vectors, (B, K) bool which clusters are valid (non-empty), (B, L) the cluster of each
    item (-1 for padding). ``limit`` (B,), optional: each row's number of clusters (at most K; the first centres):
    every valid item then joins one of those."""
    b, length, e = items.shape
    idx, centre_ok = maxmin_centres(items, valid, k)
    if limit is not None:
        centre_ok = centre_ok & (torch.arange(k)[None, :] < limit[:, None])
    unit = F.normalize(items, dim=-1)
    centres = torch.gather(unit, 1, idx.unsqueeze(-1).expand(b, k, e))  # (B, K, E)
    assign = torch.full((b, length), -1, dtype=torch.long)
    clusters = centres
    for _ in range(max(1, iterations)):
        sim = (unit @ F.normalize(centres, dim=-1).transpose(1, 2)).masked_fill(~centre_ok[:, None, :], float("-inf"))
        assign = torch.where(valid, sim.argmax(-1), torch.full_like(assign, -1))       # single assignment
        member = F.one_hot(assign.clamp(min=0), k).float() * valid.unsqueeze(-1).float()   # (B, L, K)
        counts = member.sum(1)                                                          # (B, K)
        sums = member.transpose(1, 2) @ items                                            # (B, K, E)
        clusters = F.normalize(sums / counts.clamp(min=1).unsqueeze(-1), dim=-1)
        centres = torch.where((counts > 0).unsqueeze(-1), clusters, centres)
    ok = centre_ok & (counts > 0)
    return clusters * ok.unsqueeze(-1).float(), ok, assign


def k_for_length(n: torch.Tensor | int, k_max: int) -> torch.Tensor | int:
    """How many embeddings a history of ``n`` items gets: max(1, min(K_max, ceil(log2(n))))."""
    if isinstance(n, int):
        return max(1, min(k_max, math.ceil(math.log2(n)) if n > 1 else 1))
    logs = torch.ceil(torch.log2(n.clamp(min=1).float())).long()
    return logs.clamp(min=1, max=k_max)


def round_robin(lists: Sequence[Sequence[dict[str, Any]]], k: int, key: str = "pin_id",
                source: str = "source") -> list[dict[str, Any]]:
    """The first ``k`` distinct hits of ``lists`` taken in turns (1st of each list, 2nd of each, ...); each hit
    is tagged with ``source`` = the index of the list that found it first."""
    out: list[dict[str, Any]] = []
    seen: set = set()
    depth = max((len(x) for x in lists), default=0)
    for r in range(depth):
        for i, hits in enumerate(lists):
            if r < len(hits) and hits[r][key] not in seen:
                seen.add(hits[r][key])
                out.append({**hits[r], source: i})
                if len(out) == k:
                    return out
    return out
