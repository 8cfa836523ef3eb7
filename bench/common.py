"""What every benchmark script ends with: the machine facts, the rows as JSON, and a markdown table."""

from __future__ import annotations

import json
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any


def machine() -> dict[str, Any]:
    return {"machine": f"{platform.machine()}, {os.cpu_count()} cores", "load_avg_at_end": os.getloadavg()}


def save_and_print(out: str | Path, meta: dict[str, Any], rows: list[dict[str, Any]], header: list[str],
                   line: Callable[[dict[str, Any]], list[str]]) -> None:
    """Write {"meta", "rows"} to ``out`` and print ``meta`` and a markdown table (``line(row)`` -> cells)."""
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    print(f"\n{meta}\n")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for r in rows:
        print("| " + " | ".join(line(r)) + " |")


def timed_searches(client, name: str, queries, filters: list, truths: list, k: int,
                   params: dict[str, Any], warmup: int = 10) -> dict[str, float]:
    """One ANN search per query (``filters[i]``: its interests, or None), timed one at a time after ``warmup``
    untimed ones: p50/p99 ms and recall@k against ``truths[i]`` (the exact top-k ids)."""
    import numpy as np

    from training.release.index import search

    for q, f in zip(queries[:warmup], filters[:warmup], strict=False):
        search(client, name, q[None, :], k, params, interests=f)
    lat, rec = [], []
    for q, f, want in zip(queries, filters, truths, strict=True):
        t = time.perf_counter()
        got = search(client, name, q[None, :], k, params, interests=f)[0]
        lat.append(time.perf_counter() - t)
        rec.append(len({h["pin_id"] for h in got} & set(want)) / len(want))
    a = np.asarray(lat) * 1e3
    return {"p50_ms": float(np.percentile(a, 50)), "p99_ms": float(np.percentile(a, 99)),
            "recall": float(np.mean(rec)), "requests": len(lat)}
