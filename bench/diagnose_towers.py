"""Where a trained two-tower's score comes from, on validation and on test.

Usage: ``python bench/diagnose_towers.py --data-dir D [--checkpoint D/models/<version>/model.pt]`` (a data dir after
``retrieval train``; the newest checkpoint by default). The towers' learned score is
``<head_u, head_p> + bias_p + <cross_u, onehot_p>``: the deep part (unit vectors), the pin's bias coordinate (the
MLP's bias output + the wide part over the pin's log counts and rates + the popularity prior) and the wide interest
cross (the user's scaled log interest shares). Prints capped recall@10 / @50 of:

1. the whole score and each part taken away (the pre-trained subspace kept at its chosen blend weight);
2. the pin bias recomposed: ``a · MLP bias + b · wide part + r · log impression rate`` (r in logits at the initial
   temperature, as ``train.popularity_prior``), the user side as trained, for a small grid; the row best on
   validation is marked. It says whether what training learned about a pin's popularity holds beyond validation.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import numpy as np
import torch

from training.config import Config
from training.evaluation.harness import evaluate
from training.evaluation.scorer import TwoTowerScorer, best_of, time_points
from training.evaluation.split import load_split
from training.model.checkpoint import load_checkpoint
from training.model.encoding import PIN_IMPRESSION_RATE


class _Vectors:
    def __init__(self, users: np.ndarray, bucket: np.ndarray, pins: np.ndarray):
        self.users, self.bucket, self.pins = users, bucket, pins

    def fit(self, split) -> None:
        pass

    def score(self, idx: np.ndarray) -> np.ndarray:
        return best_of(self.users[idx], self.bucket[idx], self.pins)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", required=True)
    ap.add_argument("--checkpoint", help="default: the newest under <data-dir>/models")
    args = ap.parse_args()
    logging.disable(logging.INFO)
    cfg = Config.load(None, {"data_dir": args.data_dir})
    path = Path(args.checkpoint) if args.checkpoint else max((cfg.data_path / "models").glob("*/model.pt"),
                                                             key=lambda p: p.stat().st_mtime)
    ts, split, manifest = load_split(cfg)
    model, encoder, payload = load_checkpoint(path)
    pins, users = model.pin_tower, model.user_tower
    if not (model.user_tower.pin_bias and pins.wide is not None):
        raise SystemExit(f"{path}: the decomposition needs the pin bias coordinate and the wide part")
    out, cross = users.out.out_features, users.cross_dim
    prior = 0.0 if pins.prior is None else float(pins.prior)
    learned_weight, unit = float(users.blend[0]) ** 0.5, float(pins.logit_unit)   # √w: each side carries it
    print(f"{path}: popularity prior {prior}, blend {users.blend.tolist()}, cross scale {users.cross_scale.item():.4f}")
    scorer = TwoTowerScorer(cfg, model, encoder, ts, split, manifest["feature_services"]["pin"])
    parts = {"whole score": (1, 1, 1), "without the deep head": (0, 1, 1), "without the pin bias": (1, 0, 1),
             "without the interest cross": (1, 1, 0), "the pin bias + the interest cross alone": (0, 1, 1)}
    grid = [(a, b, r) for a, b in ((1, 1), (1, 0), (0, 1), (0, 0)) for r in (0.0, 0.25, 0.5, 0.75, 1.0)]
    rows: dict[str, dict[str, tuple[float, float]]] = {}
    for on in ("valid", "test"):
        scorer.prepare(on)
        u, p, bucket = scorer._user_vectors, np.asarray(scorer.pin_vectors), scorer.user_bucket   # noqa: SLF001
        times = time_points(scorer.cutoff_rows(on)["event_timestamp"], cfg.train.index_refresh_days)[0]
        inputs = [scorer._pin_cache[t]["counts"] for t in times]                      # noqa: SLF001
        with torch.no_grad():
            wide = np.stack([pins.wide(c[:, :pins.n_numeric]).numpy()[:, 0] for c in inputs]) * unit * learned_weight
        rate = np.stack([c[:, PIN_IMPRESSION_RATE].numpy() for c in inputs]) * unit * learned_weight
        mlp = p[..., out - 1] - wide - prior * rate

        def recall(users_, pins_, on=on, bucket=bucket):
            m = evaluate(_Vectors(users_, bucket, pins_), split, on=on)
            return round(m["capped_recall@10"], 4), round(m["capped_recall@50"], 4)

        for label, (head, bias, wide_cross) in parts.items():
            v = u.copy()
            v[..., :out - 1] *= head
            v[..., out - 1] *= bias
            v[..., out:out + cross] *= wide_cross
            if label.endswith("alone"):
                v[..., out + cross:] = 0.0
            rows.setdefault(label, {})[on] = recall(v, p)
        for a, b, r in grid:
            q = p.copy()
            q[..., out - 1] = a * mlp + b * wide + r * rate
            rows.setdefault(f"pin bias = {a} MLP + {b} wide + {r} log impression rate", {})[on] = recall(u, q)
    print("1. the parts (valid / test: capped R@10, R@50)")
    for label in parts:
        print(f"   {label:62s} valid {rows[label]['valid']} test {rows[label]['test']}")
    print("2. the pin bias recomposed")
    keys = [k for k in rows if k.startswith("pin bias")]
    best = max(keys, key=lambda k: rows[k]["valid"][1])
    for k in keys:
        mark = "  <- best on validation" if k == best else ""
        print(f"   {k:62s} valid {rows[k]['valid']} test {rows[k]['test']}{mark}")


if __name__ == "__main__":
    main()
