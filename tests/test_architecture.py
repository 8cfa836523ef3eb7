"""The architecture, enforced: import-linter's contracts (pyproject.toml [tool.importlinter]) hold, and they do
catch a forbidden import (checked on a copy of the packages with one bad line added)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LINT = str(Path(sys.executable).parent / "lint-imports")


def _lint(cwd: Path, pythonpath: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(pythonpath)}
    return subprocess.run([LINT, "--config", str(cwd / "pyproject.toml"), "--no-cache"], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def test_import_contracts_are_kept():
    out = _lint(REPO, REPO)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    assert "0 broken" in out.stdout


def test_a_forbidden_import_breaks_the_contracts(tmp_path):
    for pkg in ("training", "bentos", "feature_repo"):
        shutil.copytree(REPO / pkg, tmp_path / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pyproject.toml", tmp_path / "pyproject.toml")
    retriever = tmp_path / "bentos" / "retriever.py"
    retriever.write_text(retriever.read_text() + "\nimport training.train  # noqa: E402,F401\n")
    out = _lint(tmp_path, tmp_path)
    assert out.returncode != 0
    assert "bentos is not allowed to import training.train" in out.stdout
