"""Stage: the two-tower model next to the baselines, in one run, on one split, and the report files.

``retrieval report`` fits popularity, item-kNN and tuned ALS (and, on synthetic data, scores the generator's
oracle) and the two-tower model (``training.train.fit``), evaluates all of them on the test part with the
same harness and writes ``report.md``, ``results.json`` and PNG plots.

Protocol (``training.evaluation``): per user, the last 20% of positive interactions are test and the last
10% of the rest validation; full ranking over every canonical pin in the interactions, excluding the
user's train items; interactions sharing a timestamp are ordered by a fixed hash (many ML-100k ratings share
a second, and its ids follow catalogue order). The headline recall@K divides hits by min(|relevant|, K) (the
normalized recall that the ML-100k reference figures use); plain recall (÷ |relevant|) is reported too.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from training.config import Config
from training.data.snapshot import raw_dir
from training.evaluation.harness import evaluate
from training.evaluation.split import load_split

log = logging.getLogger(__name__)


def report(cfg: Config, out_dir: Path | None = None) -> dict[str, Any]:
    """Every model on the same split with the same metric code; writes the report."""
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    from training.evaluation.baselines import ImplicitALS, ItemKNN, Popularity, fit_tune_evaluate
    from training.train import fit

    ts, split, manifest = load_split(cfg)
    results: dict[str, dict[str, Any]] = {}
    for name, scorer in (("popularity", Popularity()), ("item-kNN", ItemKNN()), ("ALS tuned", ImplicitALS())):
        t0 = time.perf_counter()
        results[name] = fit_tune_evaluate(scorer, split)[0]
        log.info("%s: recall@50 %.4f (%.1fs)", name, results[name]["capped_recall@50"], time.perf_counter() - t0)
    trained = fit(cfg, ts, split, manifest)
    results["two-tower"] = evaluate(trained.scorer.prepare("test"), split, on="test")
    results["two-tower"]["fit_seconds"] = round(trained.result.seconds, 2)
    truth_path = raw_dir(cfg) / "ground_truth.npz"
    services = ", ".join(manifest["feature_services"].values())
    notes = [f"Data snapshot `{manifest['snapshot_id']}`, training set through {services}; "
             f"{split.n_users} users, {split.n_items} candidate pins. recall@K = hits / min(|relevant|, K); "
             "plain recall = hits / |relevant|.",
             f"Two-tower: best epoch {trained.result.best_epoch}, {trained.result.seconds_to_best:.1f}s to the best "
             f"checkpoint, {trained.result.examples_per_s:,.0f} examples/s."]
    if cfg.data.source == "synthetic" and truth_path.exists():
        from training.data.synthetic import GroundTruth
        from training.evaluation.oracle import Oracle

        oracle = Oracle(GroundTruth.load(truth_path))
        oracle.fit(split)
        results["oracle"] = evaluate(oracle, split, on="test")
        ratio = results["two-tower"]["recall@50"] / results["oracle"]["recall@50"]
        notes.append(f"Two-tower plain recall@50 is {ratio:.1%} of the generator's oracle.")
    out = out_dir or cfg.data_path / "reports" / manifest["snapshot_id"]
    md = write_report(results, out, title=f"Retrieval report ({cfg.data.source})", notes=notes)
    log.info("report %s", md)
    keys = ("capped_recall@10", "capped_recall@50", "capped_recall@100", "recall@50", "ndcg@10", "coverage@50",
            "logpop@50")
    return {"report": str(md), **{m: {k: round(r[k], 4) for k in keys if k in r} for m, r in results.items()}}


def write_report(
    results: Mapping[str, Mapping[str, Any]],
    out_dir: str | Path,
    title: str,
    notes: Sequence[str] = (),
) -> Path:
    """Write ``report.md`` (models × metrics table, per-interest recall), ``results.json`` and PNG plots.

    ``results`` maps a model name to an ``evaluate`` output. Plots: ``recall_curve.png`` (recall@K for
    K = 1..curve length, every model) and, when the results carry per-interest recall,
    ``recall_by_interest.png``. ``notes`` are extra markdown lines under the table. Returns the .md path.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if not results:
        raise ValueError("no results to report")
    lines = [f"# {title}", "", format_table(results), ""]
    lines += [*notes, ""] if notes else []

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, res in results.items():
        curve = res.get("recall_curve") or []
        ax.plot(np.arange(1, len(curve) + 1), curve, label=name)
    ax.set_xlabel("K")
    ax.set_ylabel("recall@K")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "recall_curve.png", dpi=120)
    plt.close(fig)
    lines += ["![recall@K](recall_curve.png)", ""]

    interest_key = next((k for r in results.values() for k in r if k.endswith("_by_interest") and "@" in k), None)
    if interest_key is not None:
        interests = sorted({i for r in results.values() for i in r.get(interest_key, {})}, key=_interest_sort_key)
        support = next(iter(results.values())).get("relevant_by_interest", {})
        header = "| interest | relevant | " + " | ".join(results) + " |"
        lines += [f"## {interest_key.replace('_by_interest', '')} by interest of the relevant items", ""]
        lines += [header, "|" + "---|" * (len(results) + 2)]
        for i in interests:
            vals = " | ".join(_fmt(r.get(interest_key, {}).get(i)) for r in results.values())
            lines.append(f"| {i} | {support.get(i, '')} | {vals} |")
        lines += ["", "![per-interest recall](recall_by_interest.png)", ""]
        fig, ax = plt.subplots(figsize=(min(14, max(7, 0.4 * len(interests) + 2)), 4.5))
        width = 0.8 / len(results)
        x = np.arange(len(interests))
        for j, (name, res) in enumerate(results.items()):
            vals = [res.get(interest_key, {}).get(i, np.nan) for i in interests]
            ax.bar(x + j * width - 0.4 + width / 2, vals, width, label=name)
        ax.set_xticks(x, interests, rotation=60, fontsize=8)
        ax.set_ylabel(interest_key.replace("_by_interest", ""))
        ax.set_xlabel("interest")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / "recall_by_interest.png", dpi=120)
        plt.close(fig)

    (out / "results.json").write_text(json.dumps(results, indent=2, default=_jsonable))
    md = out / "report.md"
    md.write_text("\n".join(lines))
    return md


def format_table(results: Mapping[str, Mapping[str, Any]]) -> str:
    """Markdown table, one row per model, one column per scalar metric (recall, ndcg, coverage, logpop)."""
    order = ("recall@", "capped_recall@", "ndcg@", "coverage@", "logpop@")
    cols = [
        k
        for prefix in order
        for k in sorted(
            {k for r in results.values() for k in r if k.startswith(prefix) and "_by_" not in k},
            key=lambda s: int(s.split("@")[1]),
        )
    ]
    cols += ["users"]
    lines = ["| model | " + " | ".join(cols) + " |", "|---|" + "---:|" * len(cols)]
    for name, res in results.items():
        lines.append(f"| {name} | " + " | ".join(_fmt(res.get(c)) for c in cols) + " |")
    return "\n".join(lines)


def _fmt(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.3f}" if abs(v) < 10 else f"{v:.1f}"
    return str(v)


def _interest_sort_key(i: str) -> tuple[int, str]:
    return (int(i), "") if i.lstrip("-").isdigit() else (10**9, i)


def _jsonable(v: Any) -> Any:
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, np.ndarray):
        return v.tolist()
    raise TypeError(f"not JSON serializable: {type(v).__name__}")
