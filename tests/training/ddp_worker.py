"""Launched by test_ddp.py under torchrun: a few DDP steps on a real training set, then each rank saves
its weights. Usage: torchrun --nproc_per_node=2 tests/training/ddp_worker.py TRAINING_SET OUT_DIR"""

import sys
from pathlib import Path

import pandas as pd
import torch
import torch.distributed as dist

from training.config import TrainConfig
from training.encoding import Encoder
from training.train import build_model, init_distributed, train_model

if __name__ == "__main__":
    assert init_distributed(), "expected to run under torchrun with WORLD_SIZE > 1"
    ts = pd.read_parquet(sys.argv[1])
    ts = ts[ts["label"] == 1].reset_index(drop=True)
    tc = TrainConfig(batch_size=256, epochs=1, threads=1, dim=16, embed_dim=16)
    enc = Encoder.fit(ts, n_interests=int(ts["interest_id"].max()) + 1)
    model = build_model(enc, tc)
    init = {k: v.clone() for k, v in model.state_dict().items()}
    result = train_model(model, enc, ts.head(256 * 2 * 5), tc, epochs=1)
    rank = dist.get_rank()
    payload = {"state": model.state_dict(), "init": init, "examples_per_s": result.examples_per_s}
    torch.save(payload, Path(sys.argv[2]) / f"rank{rank}.pt")
    dist.destroy_process_group()
