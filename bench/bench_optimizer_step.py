"""The cost of one optimizer step over the id embedding tables as the vocabulary grows.

Two dense ``nn.Embedding(n, 64)`` tables (the towers' pin-id tables) under ``torch.optim.AdamW``, as
``training.train`` builds them, with a fixed number of lookups a step: a dense table's gradient is the size of the
whole table and AdamW updates every row's moments, so a step's cost follows the vocabulary, not the batch.

    .venv/bin/python bench/bench_optimizer_step.py [--rows 65000 400000 1000000] [--lookups 61440] [--threads 1]
"""

from __future__ import annotations

import argparse
import time

import torch


def step_ms(rows: int, lookups: int, steps: int = 5) -> float:
    """Mean milliseconds of ``steps`` forward + backward + AdamW steps after one warm-up step."""
    tables = [torch.nn.Embedding(rows, 64) for _ in range(2)]
    opt = torch.optim.AdamW([t.weight for t in tables], lr=1e-3, weight_decay=1e-4)
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
        print(f"{rows:>9,} rows × 2 tables: {step_ms(rows, args.lookups):7.1f} ms a step")


if __name__ == "__main__":
    main()
