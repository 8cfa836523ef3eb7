"""`retrieval train` under torchrun trains with 2 DDP ranks (gloo on CPU): rank 0 writes the one checkpoint,
rank 1 writes nothing, and both ranks end with identical weights."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow


def test_cli_under_torchrun_trains_two_ranks_and_rank0_alone_writes(pipeline_cfg, checkpoints, tmp_path):
    """(``checkpoints`` pre-trained the ID table the ranks pick.)"""
    bin_dir = Path(sys.executable).parent
    models = pipeline_cfg.data_path / "models"
    before = set(models.glob("*/model.pt"))
    cmd = [str(bin_dir / "torchrun"), "--nproc_per_node=2", "--master_port=29517",
           "--log-dir", str(tmp_path / "logs"), "--redirects", "1", str(bin_dir / "retrieval"),
           "train", "--data_dir", pipeline_cfg.data_dir, "--train.epochs", "2", "--train.patience", "2",
           "--train.batch_size", "256", "--train.threads", "1"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    written = set(models.glob("*/model.pt")) - before
    assert len(written) == 1, written   # rank 0 alone wrote a checkpoint
    ckpt = torch.load(next(iter(written)), weights_only=True)
    fit = ckpt["fit"]
    assert fit["world_size"] == 2 and len(fit["rank_fingerprints"]) == 2
    assert fit["rank_fingerprints"][0] == fit["rank_fingerprints"][1]   # identical weights on both ranks
    by_rank = {int(p.parent.name): json.loads(p.read_text()) for p in (tmp_path / "logs").rglob("stdout.log")}
    assert by_rank[0]["model_version"] == ckpt["model_version"]
    assert by_rank[1] == {"rank": 1, "world_size": 2, "wrote": None}
