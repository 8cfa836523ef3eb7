"""The cost of one optimizer step over the id embedding tables as the vocabulary grows.

Two ``nn.Embedding(n, 64)`` tables with a fixed number of lookups a step, under each of the optimizers
``training.train.optimizers`` builds: dense tables under ``torch.optim.AdamW`` (``train.id_optimizer`` 'adamw'), whose
gradient is the size of the whole table and whose step updates every row's moments, so a step's cost follows the
vocabulary; and sparse-gradient tables under ``torch.optim.SparseAdam`` ('sparse_adam'), whose step reads
and writes only the rows looked up.

    .venv/bin/python bench/bench_optimizer_step.py [--rows 65000 400000 1000000] [--lookups 61440] [--threads 1]
"""

from __future__ import annotations

import argparse
import time

import torch


def step_ms(rows: int, lookups: int, sparse: bool, steps: int = 5) -> float:
    """Mean milliseconds of ``steps`` forward + backward + optimizer steps after one warm-up step."""
    tables = [torch.nn.Embedding(rows, 64, sparse=sparse) for _ in range(2)]
    weights = [t.weight for t in tables]
    opt = torch.optim.SparseAdam(weights, lr=1e-3) if sparse else torch.optim.AdamW(weights, lr=1e-3)
    idx = torch.randint(0, rows, (lookups,))
    t0 = 0.0
    for i in range(steps + 1):
        if i == 1:
            t0 = time.perf_counter()
        loss = sum(t(idx).sum() for t in tables)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return (time.perf_counter() - t0) / steps * 1000


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[65_000, 400_000, 1_000_000])
    ap.add_argument("--lookups", type=int, default=61_440, help="ids looked up per step (1,024 rows × 60)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    for rows in args.rows:
        dense, sparse = step_ms(rows, args.lookups, False), step_ms(rows, args.lookups, True)
        print(f"{rows:>9,} rows × 2 tables: AdamW (dense) {dense:7.1f} ms a step, SparseAdam {sparse:7.1f} ms")


if __name__ == "__main__":
    main()
