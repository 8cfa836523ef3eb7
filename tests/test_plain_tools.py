"""The plain tools work as a user types them from the repo root, with no environment variable: `dbt build`
builds a development target from the live snapshot's contract-checked inputs without touching the live
snapshot, and `feast apply` / `feast materialize <start> <end>` work on the live snapshot.

They run in a copy of the checkout (the declarative parts: dbt_project/, feature_repo/, feature_store.yaml,
.feastignore) whose `.data` is a copy of the test session's data dir, so the real checkout is never touched."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _digest(folder: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*.parquet")):
        h.update(p.name.encode() + p.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def checkout(pipeline_cfg, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("checkout")
    for name in ("dbt_project", "feature_repo"):
        shutil.copytree(REPO / name, root / name, ignore=shutil.ignore_patterns("__pycache__", "target", "logs"))
    for name in ("feature_store.yaml", ".feastignore"):
        shutil.copy(REPO / name, root / name)
    shutil.copytree(pipeline_cfg.data_path, root / ".data", symlinks=True,
                    ignore=shutil.ignore_patterns("milvus", "bentoml", "models", "releases", "*.log"))
    return root


def _run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RETRIEVAL_", "DBT_"))}
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def test_dbt_build_as_typed_builds_dev_and_leaves_live_alone(checkout):
    live_tables = (checkout / ".data" / "live").resolve() / "tables"
    before = _digest(live_tables)
    out = _run([str(BIN / "dbt"), "build", "--project-dir", "dbt_project", "--profiles-dir", "dbt_project"], checkout)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    dev = checkout / ".data" / "dev" / "tables"
    assert {"serving_corpus.parquet", "user_features.parquet", "pin_features.parquet"} <= {p.name for p in
                                                                                          dev.iterdir()}
    assert _digest(live_tables) == before


def test_feast_apply_and_materialize_as_typed(checkout):
    online = checkout / ".data" / "feast" / "online.db"
    online.unlink()   # apply creates the tables, materialize must fill them again
    apply = _run([str(BIN / "feast"), "apply"], checkout)
    assert apply.returncode == 0, apply.stdout[-3000:] + apply.stderr[-2000:]
    mat = _run([str(BIN / "feast"), "materialize", "2026-01-01T00:00:00", "2026-12-01T00:00:00"], checkout)
    assert mat.returncode == 0, mat.stdout[-3000:] + mat.stderr[-2000:]
    assert online.exists() and online.stat().st_size > 100_000
    views = _run([str(BIN / "feast"), "feature-views", "list"], checkout)
    assert views.returncode == 0 and {"user_features", "pin_features", "user_sequence"} <= set(views.stdout.split())
    # the sources it registered are the copy's own live tables, not the real checkout's
    listed = _run([str(BIN / "feast"), "data-sources", "describe", "user_features_source"], checkout)
    assert str(checkout / ".data" / "live" / "tables") in listed.stdout
