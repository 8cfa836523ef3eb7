"""Stage: the two-tower variants next to the baselines, in one run, on one split, and the report files.

``retrieval report`` tunes and fits the baselines once (popularity, item-kNN, ALS, EASE, EASE with a
recency-weighted history; on synthetic data also the generator's oracle) and trains every two-tower variant
(the default config and the ablation groups of ``report.variants``) with ``report.seeds`` seeds, evaluates all
of them on the test part with the same harness, and writes ``report.md`` (mean ± std, a verdict per metric),
``report.json`` (every run's metrics, each variant's config, examples/s, seconds to the best checkpoint, the user
tower's CPU time per request) and a recall@K plot.

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

from training.config import REPO_ROOT, Config
from training.data.snapshot import load_live, raw_dir
from training.evaluation.harness import evaluate
from training.evaluation.split import load_split
from training.provenance import describe_machine, provenance

log = logging.getLogger(__name__)


BASELINES = {
    "popularity": ("popularity", lambda: _baselines().Popularity()),
    "item-knn": ("item-kNN (tuned)", lambda: _baselines().ItemKNN()),
    "als": ("ALS (tuned)", lambda: _baselines().ImplicitALS()),
    "ease": ("EASE (tuned)", lambda: _baselines().EASE()),
    "ease-recency": ("EASE, recency-weighted history (tuned)", lambda: _baselines().EASE()),
    "sansa": ("SANSA, scalable EASE (tuned, recency-weighted history)", lambda: _baselines().SANSA()),
}
"""Report baselines: name -> (row label, factory). EASE with recency is tuned over recency scales too; SANSA's grid
(``baselines.SANSA_GRID``) includes them."""
EASE_RECENCY_GRID = {"l2": (100.0, 200.0, 500.0, 1000.0), "recency": (None, 10.0, 20.0, 50.0)}

VARIANT_GROUPS: dict[str, list[tuple[str, dict[str, Any]]]] = {
    "default": [("two-tower (default config)", {})],
    "backbone": [("backbone = mlp", {"train.backbone": "mlp"}), ("backbone = masknet", {"train.backbone": "masknet"}),
                 ("backbone = dhen", {"train.backbone": "dhen"})],
    "pretrained": [
        ("no pre-trained ids (all interactions)", {"train.pretrained": "none", "train.window_fraction": 1.0}),
        ("pre-trained ids fine-tuned", {"train.pretrained": "finetune"}),
        ("pre-trained ids frozen + dropout 0.5", {"train.pretrained": "frozen", "train.pretrained_dropout": 0.5}),
        ("frozen + dropout, OVERLAPPING window (ablation)", {"train.pretrained": "frozen",
                                                              "train.allow_overlapping_pretrain": True,
                                                              "overlap": True}),
        ("pre-training = contrastive", {"pretrain.method": "contrastive"}),
        ("pre-training = ridge_svd", {"pretrain.method": "ridge_svd"}),
        ("pre-training = ease_svd", {"pretrain.method": "ease_svd"}),
    ],
    "methods": [("pre-training = ridge_svd", {"pretrain.method": "ridge_svd"}),
                ("pre-training = ease_svd", {"pretrain.method": "ease_svd"})],
    "negatives": [("full softmax", {"train.negatives": "full"}),
                  ("hides as hard negatives", {"train.hide_negatives": True})],
    "blend": [("blend table as trained (not refit)", {"train.blend_table": "training"}),
              ("blend weight chosen at validation's own horizon", {"train.blend_validation": "adjacent"})],
    "prior": [("no popularity prior (towers as trained)", {"train.popularity_prior": False})],
    "optimizer": [("sparse pin-id table (SparseAdam)", {"train.id_optimizer": "sparse_adam"}),
                  ("dense pin-id table (AdamW)", {"train.id_optimizer": "adamw"})],
    "impressions": [("interest shares from engagements only (no impressions)", {"train.impression_interests": False})],
    "modes": [("multi-embedding (K_max=4)", {"train.multi_embedding": 4}),
              ("conditional", {"train.conditional": True})],
    "wide": [("no wide parts (deep towers only)", {"train.wide_counts": False, "train.wide_interest": False}),
             ("wide counts only", {"train.wide_interest": False}),
             ("no pin rates / idle days (log counts and age only)", {"train.pin_rates": False}),
             ("wide interest cross only", {"train.wide_counts": False}),
             ("pin-id dropout 0.25 (cold pins from features)", {"train.pin_id_dropout": 0.25}),
             ("training window 10% (table on the first 90%)", {"train.window_fraction": 0.1})],
    "objective": [("target window 10", {"train.target_window": 10}),
                  ("history transformer", {"train.history_encoder": "transformer"})],
    "extra": [("in-batch + 1024 uniform (mixed)", {"train.random_negatives": 1024}),
              ("no pre-trained blend (fields only)", {"train.pretrained_blend": False}),
              ("in-batch without logQ", {"train.logq": False}),
              ("logQ primed from the training counts", {"train.logq_prime": True}),
              ("frozen, no dropout", {"train.pretrained_dropout": 0.0}),
              ("every user counts once", {"train.user_weight_power": 1.0}),
              ("cosine learning-rate schedule", {"train.lr_schedule": "cosine"}),
              ("fixed temperature", {"train.learn_temperature": False}),
              ("raw inner product (no normalisation)", {"train.normalize": False})],
}
"""Named ablation groups: (row label, config overrides; ``overlap`` = pre-train a table that overlaps). With
'modes' every row of the report also gets the tables of ``training.evaluation.modes`` (single vs multi,
diversity, first k embeddings, by number of dominant interests, per-interest and conditioned recall)."""
HEADLINE = ("capped_recall@10", "capped_recall@50", "capped_recall@100", "recall@50", "ndcg@10", "coverage@50")


PUBLISHED = REPO_ROOT / "docs" / "results"
"""Where the documentation's model reports live (``bench/bench_model.py`` writes ``model-<dataset>.json``)."""


def published_reference(cfg: Config, snapshot_id: str) -> dict[str, Any] | None:
    """The published report (docs/results/model-*.json) of this very data (same snapshot id, which hashes the
    inputs and the transform config) and model config (seeds and threads aside), as {metric: mean, std, min, max
    over its seeds} of the default row, with the page that shows it; None when no published report matches."""
    ignore = {"train": {"seed", "threads"}, "pretrain": {"seed"}}
    for path in sorted(PUBLISHED.glob("model-*.json")):
        try:
            doc = json.loads(path.read_text())
            if doc.get("snapshot_id") != snapshot_id:
                continue
            same = all({k: v for k, v in doc["config"][section].items() if k not in skip}
                       == {k: v for k, v in json.loads(json.dumps(getattr(cfg, section).__dict__)).items()
                           if k not in skip} for section, skip in ignore.items())
            if not same:
                continue
            runs = doc["two_tower"][doc["verdict"]["default"]]["runs"]
        except (OSError, ValueError, KeyError, TypeError):
            continue
        figures = {}
        for metric in ("capped_recall@10", "capped_recall@50"):
            values = np.array([r[metric] for r in runs], dtype=float)
            figures[metric] = {"mean": round(float(values.mean()), 4),
                               "std": round(float(values.std(ddof=1)) if len(values) > 1 else 0.0, 4),
                               "min": round(float(values.min()), 4), "max": round(float(values.max()), 4)}
        return {"seeds": len(runs), **figures, "page": "docs/benchmarks/model.md",
                "measured": f"{doc['provenance']['commit']} on {doc['provenance']['date'][:10]}"}
    return None


def skip_reason(error: Exception) -> str:
    """The one line a report prints for a baseline it cannot run here."""
    if isinstance(error, ImportError):
        return f"the optional package is not installed ({error}); pip install -e '.[sansa]' (needs SuiteSparse)"
    return str(error)


def _baselines():
    from training.evaluation import baselines

    return baselines


def _variants(spec: str, cfg: Config) -> list[tuple[str, dict[str, Any]]]:
    """The report's two-tower rows: the default config first, then every group's rows that differ from it."""
    out, seen = [], set()
    for group in ["default", *[g.strip() for g in spec.split(",") if g.strip() and g.strip() != "default"]]:
        if group not in VARIANT_GROUPS:
            raise ValueError(f"report.variants: unknown group {group!r} (known: {', '.join(VARIANT_GROUPS)})")
        for label, overrides in VARIANT_GROUPS[group]:
            key = _effective(cfg, overrides)
            if key in seen:
                continue
            seen.add(key)
            out.append((label, overrides))
    return out


def _effective(cfg: Config, overrides: dict[str, Any]) -> str:
    c = _with(cfg, overrides)
    used = {"train": c.train, "pretrain": c.pretrain if c.train.pretrained != "none" else None,
            "overlap": bool(overrides.get("overlap"))}
    return json.dumps(used, default=lambda o: o.__dict__, sort_keys=True)


def _with(cfg: Config, overrides: dict[str, Any]) -> Config:
    raw = cfg.to_dict()
    for key, value in overrides.items():
        if key == "overlap":
            continue
        section, name = key.split(".")
        raw[section][name] = value
    return Config.from_dict(raw)


def user_tower_cost(model, encoder, rows, n: int = 200) -> dict[str, float]:
    """CPU time of the user tower for one request (one user, one torch thread; the calling thread's CPU time, so
    other load on the machine does not inflate it), p50 / p99 in ms over ``n`` users."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    sample = rows.sample(min(n, len(rows)), random_state=0)
    times = []
    try:
        with torch.no_grad():
            for i in range(len(sample)):
                x = encoder.users(sample.iloc[i:i + 1])
                t0 = time.thread_time()
                model.user_tower(x)
                times.append((time.thread_time() - t0) * 1e3)
    finally:
        torch.set_num_threads(threads)
    return {"p50_ms": float(np.percentile(times[10:], 50)), "p99_ms": float(np.percentile(times[10:], 99))}


def _grid(cfg: Config, name: str) -> Any:
    """The tuning grid of baseline ``name``: its default (None = the class's own), with ``report.grids``'s entry
    for it applied (a list of k for item-knn; per-parameter values replacing the default's for the others)."""
    from training.evaluation import baselines as b

    defaults: dict[str, Any] = {"item-knn": b.KNN_GRID, "als": b.ALS_GRID, "ease": b.EASE_GRID,
                                "ease-recency": EASE_RECENCY_GRID, "sansa": b.SANSA_GRID}
    given = json.loads(cfg.report.grids) if cfg.report.grids.strip() else {}
    unknown = sorted(set(given) - set(defaults))
    if unknown:
        raise ValueError(f"report.grids: no grid to replace for {unknown} (tuned baselines: {', '.join(defaults)})")
    if name not in given:
        return defaults.get(name)
    if name == "item-knn":
        ks = given[name]
        if not isinstance(ks, list) or not ks or not all(k is None or (isinstance(k, int) and k > 0) for k in ks):
            raise ValueError(f"report.grids: item-knn takes a non-empty list of k (positive integers or null), "
                             f"got {ks!r}")
        return tuple(ks)
    entry = given[name]
    if not isinstance(entry, dict):
        raise ValueError(f"report.grids: {name} takes a parameter -> values object, got {entry!r}")
    bad = sorted(set(entry) - set(defaults[name]))
    if bad:
        raise ValueError(f"report.grids: {name} has no parameter {bad} (its grid: {', '.join(defaults[name])})")
    for param, values in entry.items():
        if not isinstance(values, list) or not values:
            raise ValueError(f"report.grids: {name}.{param} takes a non-empty list of values, got {values!r}")
    return {**defaults[name], **{p: tuple(v) for p, v in entry.items()}}


def _aggregate(runs: list[dict[str, Any]]) -> dict[str, Any]:
    keys = [k for k, v in runs[0].items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
    mean = {k: float(np.mean([r[k] for r in runs])) for k in keys}
    std = {k: float(np.std([r[k] for r in runs], ddof=1)) if len(runs) > 1 else 0.0 for k in keys}
    curve = np.mean([r["recall_curve"] for r in runs], axis=0).tolist() if "recall_curve" in runs[0] else []
    return {"mean": mean, "std": std, "recall_curve": curve}


def report(cfg: Config, out_dir: Path | None = None) -> dict[str, Any]:
    """The baselines (tuned on validation, once) and every two-tower variant (``report.seeds`` training seeds)
    on one split with the same metric code; writes report.md, report.json and plots, and a verdict per metric."""
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    from training.evaluation.baselines import CatalogTooLarge, fit_tune_evaluate
    from training.pretrain import pretrain
    from training.train import fit, refit_tables

    names = [b.strip() for b in cfg.report.baselines.split(",") if b.strip()]
    for name in names:
        if name not in BASELINES:
            raise ValueError(f"report.baselines: unknown baseline {name!r} (known: {', '.join(BASELINES)})")
        _grid(cfg, name)     # a malformed report.grids fails here, not after hours of tuning
    ts, split, manifest = load_split(cfg)
    started = time.perf_counter()
    baselines: dict[str, dict[str, Any]] = {}
    skipped: dict[str, str] = {}
    per_user: dict[str, Any] = {}       # label -> evaluate's per_user (baselines) or a list of them (two-tower runs)
    for name in names:
        label, factory = BASELINES[name]
        t0 = time.perf_counter()
        grid = _grid(cfg, name)
        try:
            res, _ = fit_tune_evaluate(factory(), split, grid=grid, per_user=True)
        except (CatalogTooLarge, ImportError) as e:
            skipped[label] = why = skip_reason(e)
            log.warning("%s: skipped: %s", label, why)
            continue
        per_user[label] = res.pop("per_user")
        if grid is not None:
            res["grid"] = grid
        res["seconds"] = round(time.perf_counter() - t0, 2)
        baselines[label] = res
        log.info("%s: capped recall@10 %.4f @50 %.4f (%.1fs)", label, res["capped_recall@10"],
                 res["capped_recall@50"], res["seconds"])
    truth_path = raw_dir(cfg) / "ground_truth.npz"
    source = load_live(cfg).manifest.get("source", cfg.data.source)   # what the snapshot was built from
    truth = None
    if source == "synthetic" and truth_path.exists():
        from training.data.synthetic import GroundTruth
        from training.evaluation.oracle import Oracle

        truth = GroundTruth.load(truth_path)
        oracle = Oracle(truth)
        oracle.fit(split)
        baselines["oracle (generator's ground truth)"] = evaluate(oracle, split, on="test")
    with_modes = "modes" in [g.strip() for g in cfg.report.variants.split(",")]
    dominant = (dict(zip(truth.user_ids.tolist(), truth.n_dominant.tolist(), strict=True))
                if with_modes and truth is not None and truth.dominant is not None else None)

    tables: dict[str, Any] = {}
    variants: dict[str, dict[str, Any]] = {}
    out = Path(out_dir or cfg.data_path / "reports" / manifest["snapshot_id"])
    planned = _variants(cfg.report.variants, cfg)
    for label, overrides in planned:
        runs = []
        for seed in range(cfg.report.seeds):
            vc = _with(cfg, {**overrides, "train.seed": seed, "pretrain.seed": seed})
            table = None
            if vc.train.pretrained != "none":
                key = json.dumps([vars(vc.pretrain), vc.train.window_fraction, bool(overrides.get("overlap"))],
                                 sort_keys=True)
                if key not in tables:
                    tables[key] = pretrain(vc, split, manifest["snapshot_id"],
                                           until="train" if overrides.get("overlap") else "window")
                table = tables[key]
            refit = None
            if table is not None and vc.train.pretrained_blend and vc.train.blend_table == "refit":
                key = json.dumps(["refit", vars(vc.pretrain), vc.train.blend_validation], sort_keys=True)
                if key not in tables:
                    tables[key] = refit_tables(vc, split, manifest["snapshot_id"], table)
                refit = tables[key]
            trained = fit(vc, ts, split, manifest, table=table, blend_tables=refit)
            res = evaluate(trained.scorer.prepare("test"), split, on="test", per_user=True)
            per_user.setdefault(label, []).append(res.pop("per_user"))
            if (trained.result.blend or {}).get("learned"):   # the same model, blend weight 0: the towers' part
                alone = evaluate(trained.scorer.reweighted(trained.model.user_tower.learned_dim,
                                                           1.0 / trained.result.blend["learned"], 0.0),
                                 split, on="test", per_user=True)
                per_user.setdefault(f"{label} · towers alone", []).append(alone.pop("per_user"))
                res["towers_alone"] = {k: alone[k] for k in HEADLINE if k in alone}
            if with_modes:
                from training.evaluation.modes import evaluate_modes

                res["modes"] = evaluate_modes(trained.model, trained.encoder, trained.scorer, split,
                                              dominant=dominant)
            r = trained.result
            test_rows = ts[ts["label"] == 1]
            res.update({"seed": seed, "best_epoch": r.best_epoch, "epochs_run": r.epochs_run,
                        "hit_epoch_cap": r.hit_epoch_cap, "examples_per_s": r.examples_per_s,
                        "seconds_to_best": r.seconds_to_best, "fit_seconds": r.seconds,
                        "valid": (r.prior["valid"][str(r.prior["weight"])] if r.prior else
                                  r.blend["valid"][r.blend["weight"]] if r.blend else r.best_valid),
                        "blend_weight": (r.blend or {}).get("weight"),
                        "prior_weight": (r.prior or {}).get("weight"),
                        "user_tower_ms": user_tower_cost(trained.model, trained.encoder, test_rows)["p50_ms"]})
            runs.append(res)
            log.info("%s seed %d: capped recall@10 %.4f @50 %.4f (valid %.4f)", label, seed,
                     res["capped_recall@10"], res["capped_recall@50"], res["valid"])
        variants[label] = {"overrides": {k: v for k, v in overrides.items()},
                           "config": {"train": vars(_with(cfg, overrides).train),
                                      "pretrain": vars(_with(cfg, overrides).pretrain)},
                           "runs": runs, **_aggregate(runs)}
        if with_modes:
            from training.evaluation.modes import aggregate

            variants[label]["modes"] = aggregate([r["modes"] for r in runs])
        # the files are rewritten after every variant: an interrupted report keeps every finished row
        verdict = _verdict(variants, baselines, per_user)
        md = _write(out, cfg, source, manifest, split, baselines, variants, verdict, time.perf_counter() - started,
                    pending=len(planned) - len(variants), skipped=skipped, per_user=per_user)
    log.info("report %s", md)
    return {"report": str(md), "verdict": verdict["lines"],
            **{label: {k: round(v["mean"][k], 4) for k in HEADLINE} for label, v in variants.items()},
            **{label: {k: round(b[k], 4) for k in HEADLINE if k in b} for label, b in baselines.items()}}


def _verdict(variants: dict[str, dict[str, Any]], baselines: dict[str, dict[str, Any]],
             per_user: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The best two-tower config (by mean validation recall, never test) against the baselines on each headline
    metric: 'wins' only when mean − std over seeds is above the best baseline's test figure **and** the paired
    bootstrap 95% interval of the per-user difference (``training.evaluation.paired``; the row's per-user figure
    averaged over its seeds) is above 0 against every baseline, so one seed on a large catalog still gives a
    verdict. A row whose blend weight is chosen at another validation horizon than the default's
    (``train.blend_validation``) reports a validation figure on another scale: it is not a candidate. Nor is an
    ablation-only row (``train.allow_overlapping_pretrain``: a table that overlaps the training window)."""
    from training.evaluation.paired import align, mean_over_runs, paired_interval

    per_user = per_user or {}
    real = {k: v for k, v in baselines.items() if not k.startswith("oracle")}
    default = next(iter(variants))

    def train(label: str) -> dict[str, Any]:
        return variants[label].get("config", {}).get("train", {})

    comparable = [v for v in variants if train(v).get("blend_validation") == train(default).get("blend_validation")]
    allowed = [v for v in comparable if not train(v).get("allow_overlapping_pretrain")]
    best = max(allowed, key=lambda v: variants[v]["mean"]["valid"])
    lines = []
    out: dict[str, Any] = {"best_by_validation": best, "default": default, "metrics": {}, "paired": {},
                           "not_compared_by_validation": [v for v in variants if v not in comparable],
                           "ablation_only": [v for v in comparable if v not in allowed]}
    rows = list(dict.fromkeys([default, best]))
    rows += [f"{label} · towers alone" for label in rows if f"{label} · towers alone" in per_user]
    for label in rows:
        for metric in ("capped_recall@10", "capped_recall@50"):
            if label not in per_user:
                continue
            mine = mean_over_runs(per_user[label], metric)
            for base in real:
                if base in per_user:
                    a, b = align(mine, per_user[base], metric)
                    out["paired"].setdefault(label, {}).setdefault(metric, {})[base] = paired_interval(a, b)
    for label in dict.fromkeys([default, best]):
        v = variants[label]
        parts = []
        for metric in ("capped_recall@10", "capped_recall@50"):
            top = max(real, key=lambda b: real[b][metric])
            lo = v["mean"][metric] - v["std"][metric]
            intervals = out["paired"].get(label, {}).get(metric, {})
            above = bool(intervals) and all(i["low"] > 0 for i in intervals.values())
            won = lo > real[top][metric] and above
            weakest = min(intervals, key=lambda b: intervals[b]["low"]) if intervals else None
            out["metrics"].setdefault(label, {})[metric] = {"mean": v["mean"][metric], "std": v["std"][metric],
                                                            "best_baseline": top, "baseline": real[top][metric],
                                                            "paired_above_zero": above, "wins": won}
            paired = (f" (paired 95% interval vs {weakest}: [{intervals[weakest]['low']:+.3f}, "
                      f"{intervals[weakest]['high']:+.3f}])" if weakest else "")
            parts.append(f"{metric} {v['mean'][metric]:.3f} ± {v['std'][metric]:.3f} "
                         f"{'WINS over' if won else 'does NOT beat'} {top} {real[top][metric]:.3f}{paired}")
        tag = "default config" if label == default else "best config by validation"
        lines.append(f"{tag} ({label}): " + "; ".join(parts))
    out["lines"] = lines
    return out


def _write(out: Path, cfg: Config, source: str, manifest: dict[str, Any], split, baselines: dict[str, dict[str, Any]],
           variants: dict[str, dict[str, Any]], verdict: dict[str, Any], seconds: float, pending: int = 0,
           skipped: Mapping[str, str] | None = None, per_user: Mapping[str, Any] | None = None) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    prov = provenance()
    cols = ("capped_recall@10", "capped_recall@50", "capped_recall@100", "ndcg@10", "coverage@50")
    lines = [f"# Retrieval report ({source})", "",
             f"Data snapshot `{manifest['snapshot_id']}`; {split.n_users} users, {split.n_items} candidate pins. "
             "recall@K = hits / min(|relevant|, K) (capped); baselines tuned on validation and refit on "
             f"train + validation; two-tower rows: mean ± std over {cfg.report.seeds} training seeds, each early-"
             "stopped on validation; the best config is chosen by validation recall, never by test.", "",
             *[f"**Verdict**: {line}" for line in verdict["lines"]], "",
             f"Measured with `{prov['command']}` at commit {prov['commit'] or 'unknown'} (version {prov['version']}) "
             f"on {describe_machine(prov['machine'])}, {prov['date']}.", "",
             "| model | " + " | ".join(c.replace("capped_", "") for c in cols)
             + " | valid R@50 | examples/s | s to best | epochs (cap hit) | user tower p50 ms |",
             "|---|" + "---:|" * (len(cols) + 5)]
    for label, b in baselines.items():
        lines.append(f"| {label} | " + " | ".join(f"{b[c]:.3f}" for c in cols) + " | | | | | |")
    for label, v in variants.items():
        m, s, runs = v["mean"], v["std"], v["runs"]
        caps = sum(r["hit_epoch_cap"] for r in runs)
        lines.append(f"| {label} | " + " | ".join(f"{m[c]:.3f} ± {s[c]:.3f}" for c in cols)
                     + f" | {m['valid']:.3f} | {m['examples_per_s']:,.0f} | {m['seconds_to_best']:.1f} | "
                     f"{m['best_epoch']:.1f} / {m['epochs_run']:.1f}{f' ({caps} cap)' if caps else ''} | "
                     f"{m['user_tower_ms']:.2f} |")
        alone = [r["towers_alone"] for r in runs if "towers_alone" in r]
        if len(alone) == len(runs):
            am = {c: float(np.mean([a[c] for a in alone])) for c in cols}
            sd = {c: float(np.std([a[c] for a in alone], ddof=1)) if len(alone) > 1 else 0.0 for c in cols}
            lines.append(f"| {label} · towers alone (blend weight 0) | "
                         + " | ".join(f"{am[c]:.3f} ± {sd[c]:.3f}" for c in cols) + " | | | | | |")
    for label, why in (skipped or {}).items():
        lines += ["", f"Skipped: {label}: {why}."]
    if verdict.get("paired"):
        lines += ["", "Paired per-user differences (row − baseline, the row's per-user capped recall averaged over its "
                      "seeds; percentile bootstrap over users, 95%):", "",
                  "| row | baseline | Δ R@10 [95% interval] | Δ R@50 [95% interval] |", "|---|---|---:|---:|"]
        for label, by_metric in verdict["paired"].items():
            for base in by_metric.get("capped_recall@10", {}):
                cells = [f"{i['diff']:+.3f} [{i['low']:+.3f}, {i['high']:+.3f}]"
                         for i in (by_metric[m][base] for m in ("capped_recall@10", "capped_recall@50"))]
                lines.append(f"| {label} | {base} | {cells[0]} | {cells[1]} |")
    for key, why in (("not_compared_by_validation", "their blend weight is chosen at another validation horizon, "
                                                    "so their validation figures are on another scale"),
                     ("ablation_only", "ablation only: their pre-trained table overlaps the training window, which "
                                       "no config may use")):
        if verdict.get(key):
            lines += ["", f"Not candidates for the best config by validation ({why}): {', '.join(verdict[key])}."]
    if pending:
        lines += ["", f"**Partial**: {pending} more two-tower variant(s) planned; this file is rewritten as each "
                      "one finishes."]
    lines += ["", f"Report computed in {seconds / 60:.1f} min. Blend weights chosen on validation: "
              + "; ".join(f"{label}: {[r['blend_weight'] for r in v['runs']]}" for label, v in variants.items()
                          if any(r["blend_weight"] for r in v["runs"]))
              + ". Popularity prior weights chosen on validation: "
              + ("; ".join(f"{label}: {[r.get('prior_weight') for r in v['runs']]}" for label, v in variants.items()
                           if any(r.get("prior_weight") for r in v["runs"])) or "none kept (0 in every run)"), ""]
    if any(v.get("modes") for v in variants.values()):
        from training.evaluation.modes import markdown

        lines += markdown(variants)
    curves = {**{k: b for k, b in baselines.items()},
              **{k: {"recall_curve": v["recall_curve"]} for k, v in variants.items()}}
    _plot(curves, out / "recall_curve.png", f"Retrieval report ({source})")
    lines += ["![recall@K](recall_curve.png)", ""]
    if per_user:
        arrays = {}
        for i, runs in enumerate(per_user.values()):
            for j, run in enumerate(runs if isinstance(runs, list) else [runs]):
                arrays.update({f"{i}.{j}.{k}": np.asarray(v) for k, v in run.items()})
        np.savez_compressed(out / "per_user.npz", labels=np.array(list(per_user)), **arrays)
    (out / "report.json").write_text(json.dumps({"provenance": prov, "seconds": round(seconds, 1),
                                                 "config": cfg.to_dict(),
                                                 "data": source, "snapshot_id": manifest["snapshot_id"],
                                                 "users": split.n_users, "items": split.n_items,
                                                 "seeds": cfg.report.seeds, "pending_variants": pending,
                                                 "baselines": baselines, "skipped_baselines": skipped or {},
                                                 "two_tower": variants, "verdict": verdict},
                                                indent=2, default=_jsonable))
    md = out / "report.md"
    md.write_text("\n".join(lines))
    return md


def _plot(results: Mapping[str, Mapping[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for name, res in results.items():
        curve = res.get("recall_curve") or []
        ax.plot(np.arange(1, len(curve) + 1), curve, label=name, lw=1)
    ax.set_xlabel("K")
    ax.set_ylabel("recall@K")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


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
