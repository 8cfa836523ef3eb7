"""The documentation: the README stays a five-minute read, generated pages are never stale, and the site builds
strictly (no broken link, anchor or missing page)."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
README_MAX_LINES = 250
# Words that describe how the project was developed rather than what it is: never in the README or the docs
# (the experiment log and the changelog are history: they may date and version things, never number work rounds).
DEVELOPMENT_LABELS = re.compile(r"\b(stop|issue|session|round)\s+#?\d+\b|\bthis session\b|\bwork[- ]round\b|"
                                r"\bnot re-measured since\b", re.IGNORECASE)


def _generate_module():
    spec = importlib.util.spec_from_file_location("docs_generate", ROOT / "docs" / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_readme_is_short_and_speaks_of_the_project_only():
    text = README.read_text()
    lines = text.splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines (at most {README_MAX_LINES})"
    assert "make run" in lines[lines.index("```bash") + 1] and "make test" in lines[lines.index("```bash") + 2], \
        "the README's first commands are make run and make test"
    found = [(i + 1, m.group(0)) for i, line in enumerate(lines) for m in DEVELOPMENT_LABELS.finditer(line)]
    assert not found, f"README.md names development rounds: {found}"


def test_docs_speak_of_the_project_only():
    found = []
    for path in sorted((ROOT / "docs").rglob("*.md")):
        for i, line in enumerate(path.read_text().splitlines()):
            for m in DEVELOPMENT_LABELS.finditer(line):
                found.append(f"{path.relative_to(ROOT)}:{i + 1}: {m.group(0)}")
    for path in (ROOT / "CHANGELOG.md",):
        found += [f"{path.name}:{i + 1}: {m.group(0)}" for i, line in enumerate(path.read_text().splitlines())
                  for m in DEVELOPMENT_LABELS.finditer(line)]
    assert not found, "development labels in the documentation:\n" + "\n".join(found)


def test_generated_pages_are_up_to_date():
    """`make docs-gen` rewrites the reference (from the code) and the benchmark pages (from docs/results/*.json);
    a change to the config, the CLI, the API, the contracts, the dbt models or the Feast objects must come with
    regenerated pages."""
    stale = _generate_module().stale()
    assert not stale, f"generated pages are stale, run `make docs-gen`: {stale}"


def test_every_results_file_names_its_provenance():
    for path in sorted((ROOT / "docs" / "results").glob("*.json")):
        doc = json.loads(path.read_text())
        p = doc.get("provenance", {})
        missing = [k for k in ("command", "commit", "version", "machine", "date") if not p.get(k)]
        assert not missing, f"{path.name}: provenance lacks {missing}"


def test_changelog_follows_keep_a_changelog_and_names_the_version():
    from training import __version__

    text = (ROOT / "CHANGELOG.md").read_text()
    assert "## [Unreleased]" in text
    versions = re.findall(r"^## \[(\d+\.\d+\.\d+)\] - (\d{4}-\d{2}-\d{2})$", text, re.MULTILINE)
    assert versions and versions[0][0] == __version__, \
        f"the newest CHANGELOG entry {versions[:1]} is not the package version {__version__}"


@pytest.mark.slow
def test_site_builds_strictly(tmp_path):
    if importlib.util.find_spec("mkdocs") is None:
        pytest.fail("mkdocs is not installed: `make install` installs the docs extra")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    out = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                         cwd=ROOT, capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    assert (tmp_path / "site" / "index.html").exists()
    assert (tmp_path / "site" / "reference" / "http-api" / "index.html").exists()


def test_every_docker_run_example_names_the_model_store():
    """The image's BENTOML_HOME is BentoML's own; the data dir's model store must be named on every `docker run`
    (docs/how-to/container.md explains why), or the service never becomes ready."""
    missing = []
    for path in [README, *sorted((ROOT / "docs").rglob("*.md"))]:
        text = path.read_text().replace("\\\n", " ")
        for line in text.splitlines():
            if re.search(r"^\s*docker run\b", line) and "--entrypoint" not in line and "BENTOML_HOME" not in line:
                missing.append(f"{path.relative_to(ROOT)}: {line.strip()}")
    assert not missing, "docker run without -e BENTOML_HOME=/data/bentoml:\n" + "\n".join(missing)
