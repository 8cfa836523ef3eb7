"""Training runs unchanged under torchrun with DDP (gloo on CPU): both ranks end with identical weights."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from training.dataset import training_set_path

pytestmark = pytest.mark.slow


def test_two_ranks_end_with_identical_weights(pipeline_cfg, tmp_path):
    torchrun = Path(sys.executable).parent / "torchrun"
    worker = Path(__file__).parent / "ddp_worker.py"
    res = subprocess.run([str(torchrun), "--nproc_per_node=2", "--master_port=29517", str(worker),
                          str(training_set_path(pipeline_cfg)), str(tmp_path)],
                         capture_output=True, text=True, timeout=300, cwd=Path(__file__).parents[2])
    assert res.returncode == 0, res.stderr[-3000:]
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    a, b = r0["state"], r1["state"]
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    # both ranks really trained: weights moved away from the (seeded, shared) initialization
    assert not torch.equal(a["pin_tower.head.0.weight"], r0["init"]["pin_tower.head.0.weight"])
    assert torch.equal(r0["init"]["pin_tower.head.0.weight"], r1["init"]["pin_tower.head.0.weight"])
