"""What every benchmark script ends with: its provenance, the rows as JSON, and a markdown table.

The JSON goes to ``docs/results/<name>.json`` by default (``--out`` elsewhere); ``make docs-gen`` renders the
Benchmarks pages from those files, each table with the command, commit, machine and date of its run.
"""

from __future__ import annotations

import json
import resource
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "docs" / "results"
"""Where the benchmarks write their JSON (what the documentation renders)."""
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from training.provenance import describe_machine, provenance  # noqa: E402


def peak_rss_mib() -> dict[str, float]:
    """Peak resident memory of this process and of its finished children (MiB). A child's figure includes the pages
    it shared with this process when it was forked, so it is never below this process's RSS at that moment."""
    return {"self": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "children": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, 1)}


def write_results(out: str | Path, document: dict[str, Any]) -> dict[str, Any]:
    """Write ``{"provenance", "peak_rss_mib", **document}`` to ``out`` and return it."""
    doc = {"provenance": provenance(), "peak_rss_mib": peak_rss_mib(), **document}
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(doc, indent=2, default=str) + "\n")
    return doc


def save_and_print(out: str | Path, meta: dict[str, Any], rows: list[dict[str, Any]], header: list[str],
                   line: Callable[[dict[str, Any]], list[str]]) -> None:
    """Write {"provenance", "peak_rss_mib", "meta", "rows"} to ``out`` and print the provenance and a markdown table
    (``line(row)`` -> cells)."""
    doc = write_results(out, {"meta": meta, "rows": rows})
    p = doc["provenance"]
    print(f"\n{p['command']} at {p['commit']} on {describe_machine(p['machine'])}, {p['date']}; {meta}\n")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for r in rows:
        print("| " + " | ".join(line(r)) + " |")
    print(f"\nwrote {out}; rerun: {p['command']}")


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
