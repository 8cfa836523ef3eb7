"""The bento (bentos/bentofile.yaml): bentos/requirements.txt against constraints.txt and the installed dependency
tree, and its supply chain: one index, hashes (fast); then a real `bentoml build` with the network cut off (slow): the
generated Dockerfile, the requirements the image installs, and the sources the bento holds. The image itself is built
and run by `make container-test` (bentos/container_test.sh), not here."""

from __future__ import annotations

import importlib.metadata as md
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

REPO = Path(__file__).resolve().parents[2]
REQUIREMENTS = REPO / "bentos" / "requirements.txt"
CONSTRAINTS = REPO / "constraints.txt"
TORCH_LINKS = "https://download.pytorch.org/whl/cpu/torch/"
"""The PyTorch CPU wheel page for torch only, as find-links: no second index another package could come from."""
TORCH_CPU = "torch==2.13.0+cpu"
FROM_DEV_VENV = {"setuptools"}
"""Not in constraints.txt (milvus-lite 2.5 needs pkg_resources; pyproject.toml asks for a range): pinned to the
release in the dev venv."""
FROM_EXTRAS = {"redis", "hiredis", "async-timeout"}
"""Brought by feast[redis] within feast's ranges: neither in constraints.txt nor in the dev venv; pinned as resolved."""
HASH = re.compile(r"--hash=sha256:[0-9a-f]{64}")
TRAINING_ONLY = {"dbt-core", "dbt-duckdb", "implicit", "matplotlib", "threadpoolctl", "scipy", "pytest", "ruff"}
DEAD_PROXY = "http://127.0.0.1:9"
"""Nothing listens on the discard port: any download during the build fails."""
CUDA = re.compile(r"^(nvidia-(?!ml-py\b)\S+|triton\b|\S*cuda\S*|torch==\S+\+cu\d+)", re.IGNORECASE)
"""CUDA runtime wheels. nvidia-ml-py (NVML bindings, a bentoml dependency) is pure Python and allowed."""


def logical_lines(text: str) -> list[str]:
    """The lines of a requirements file without comments, continuation lines (`\\` at the end) joined."""
    lines, current = [], ""
    for raw in text.splitlines():
        line = raw.split(" #", 1)[0].strip() if not raw.lstrip().startswith("#") else ""
        continued = line.endswith("\\")
        current = " ".join(part for part in (current, line.removesuffix("\\").strip()) if part)
        if not continued:
            if current:
                lines.append(current)
            current = ""
    return [*lines, current] if current else lines


def parse(text: str) -> tuple[list[Requirement], list[str]]:
    """(requirements without their hashes, option lines such as --find-links) of a requirements file."""
    reqs, options = [], []
    for line in logical_lines(text):
        if line.startswith("-"):
            options.append(line)
        else:
            reqs.append(Requirement(HASH.sub("", line).strip()))
    return reqs, options


def hashes(text: str) -> dict[str, list[list[str]]]:
    """name -> the --hash lists of its lines (one list per line naming it)."""
    found: dict[str, list[list[str]]] = {}
    for line in logical_lines(text):
        if not line.startswith("-"):
            name = canonicalize_name(Requirement(HASH.sub("", line).strip()).name)
            found.setdefault(name, []).append(HASH.findall(line))
    return found


def constraints() -> dict[str, str]:
    pins, _ = parse(CONSTRAINTS.read_text())
    return {canonicalize_name(r.name): str(r.specifier).removeprefix("==") for r in pins}


def pin_errors(reqs: list[Requirement]) -> list[str]:
    """Every requirement is one `==`: equal to constraints.txt (torch: same release, CPU build), to the dev venv
    (FROM_DEV_VENV), or any release (FROM_EXTRAS)."""
    cons = constraints()
    errors = []
    for req in reqs:
        name = canonicalize_name(req.name)
        spec = str(req.specifier)
        if not spec.startswith("==") or "," in spec or "*" in spec:
            errors.append(f"{req}: not pinned to one release")
            continue
        version = Version(spec[2:])
        if name in FROM_EXTRAS:
            continue
        if name in FROM_DEV_VENV:
            if version != Version(md.version(name)):
                errors.append(f"{req}: the dev venv has {md.version(name)}")
        elif name not in cons:
            errors.append(f"{req}: not in constraints.txt")
        elif name == "torch":
            if version.public != cons[name] or version.local != "cpu":
                errors.append(f"{req}: want torch=={cons[name]}+cpu")
        elif version != Version(cons[name]):
            errors.append(f"{req}: constraints.txt has {cons[name]}")
    return errors


def closure(roots: dict[str, set[str]]) -> set[str]:
    """Installed distributions that ``roots`` (name -> extras) need on this platform, roots included."""
    seen: dict[str, set[str]] = {}
    stack = list(roots.items())
    while stack:
        name, extras = stack.pop()
        key = canonicalize_name(name)
        if key in seen and extras <= seen[key]:
            continue
        seen[key] = seen.get(key, set()) | extras
        try:
            requires = md.distribution(key).requires or []
        except md.PackageNotFoundError:
            continue
        for dep in map(Requirement, requires):
            if dep.marker is None or any(dep.marker.evaluate({"extra": e}) for e in ["", *seen[key]]):
                stack.append((dep.name, set(dep.extras)))
    return set(seen)


def listed() -> dict[str, set[str]]:
    reqs, _ = parse(REQUIREMENTS.read_text())
    return {canonicalize_name(r.name): set(r.extras) for r in reqs}


# --- fast: the requirements file -----------------------------------------------------------------------------------


def test_requirements_pins_match_constraints():
    reqs, options = parse(REQUIREMENTS.read_text())
    assert pin_errors(reqs) == []
    assert TORCH_CPU in {str(r) for r in reqs}
    names = [canonicalize_name(r.name) for r in reqs]
    assert len(names) == len(set(names)), "a package listed twice"
    assert not TRAINING_ONLY & set(names), "training/dev-only packages do not belong in the serving image"
    assert not [str(r) for r in reqs if CUDA.match(str(r))]
    # BentoML appends bentoml==<its version> (without hashes) to the bento's copy; listed here for its hashes
    assert f"bentoml=={constraints()['bentoml']}" in {str(r) for r in reqs}


def test_requirements_supply_chain():
    """PyPI is the only index (no --extra-index-url, so no index strategy to set); torch's CPU build comes from a
    find-links page of torch files only, with the hash of the wheel the image installs; every other package carries
    the hashes of its release's files."""
    text = REQUIREMENTS.read_text()
    _, options = parse(text)
    assert options == [f"--find-links {TORCH_LINKS}"]
    assert not re.search(r"^\s*(--extra-index-url|--index-url|-i|--trusted-host)\b", text, re.MULTILINE)
    found = hashes(text)
    # the PyTorch CPU page's torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl (the image's platform)
    assert found.pop("torch") == [["--hash=sha256:6746dbcbeb526eb61330b76b41ff1b4eb848951103a892eeb080dfa2b264667b"]]
    unhashed = sorted(name for name, lists in found.items() if not all(lists))
    assert not unhashed, f"add their --hash lines (docs/how-to/container.md): {unhashed}"
    assert all(len(set(h)) == len(h) for lists in found.values() for h in lists), "a hash listed twice"


def test_requirements_cover_their_dependencies():
    """No lock at build time: every dependency the listed packages have in the dev venv is listed (so pinned too)."""
    roots = listed()
    assert "bentoml" in roots
    missing = closure(roots) - set(roots) - FROM_EXTRAS
    assert not missing, f"pin these in bentos/requirements.txt (versions from constraints.txt): {sorted(missing)}"


# --- slow: the service's imports, a real build ---------------------------------------------------------------------

IMPORT_CHAIN = """
import importlib.metadata as md, json, sys, tempfile
import bentos.service, bentos.launcher
import feature_repo.infra.fast_sqlite
from pymilvus import MilvusClient
from milvus_lite.server_manager import server_manager_instance
from training.config import Config
from training.features.store import feature_store
feature_store(Config(data_dir=tempfile.mkdtemp()))  # the offline (DuckDB/ibis) and online store classes
owners = md.packages_distributions()
dists = set()
for name, mod in list(sys.modules.items()):
    where = str(getattr(mod, "__file__", None) or next(iter(getattr(mod, "__path__", None) or []), ""))
    if "." in name or "site-packages" not in where:
        continue
    dists.update(["setuptools"] if "/setuptools/_vendor/" in where else owners.get(name, []))
print(json.dumps(sorted(dists)))
"""


@pytest.mark.slow
def test_service_imports_only_listed_packages(tmp_path):
    """bentos.service and what a release load imports (user tower, Feast, Milvus), nothing of training's."""
    env = {**os.environ, "RETRIEVAL_DATA_DIR": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", IMPORT_CHAIN], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    imported = {canonicalize_name(d) for d in json.loads(out.stdout.strip().splitlines()[-1])}
    available = closure(listed())
    assert not imported - available - {"learned-retrieval"} - setuptools_vendored()
    assert not imported & TRAINING_ONLY


def setuptools_vendored() -> set[str]:
    """Packages setuptools carries a copy of: pkg_resources (milvus-lite imports it) takes one from the environment
    when it is installed (the dev venv has platformdirs, through the docs extra) and its own copy otherwise (the
    image), so the service needs none of them listed."""
    import importlib.util

    vendor = Path(importlib.util.find_spec("setuptools").submodule_search_locations[0]) / "_vendor"
    return {canonicalize_name(p.name.split("-")[0]) for p in vendor.glob("*.dist-info")}


@pytest.fixture(scope="module")
def bento(tmp_path_factory) -> dict:
    """`bentoml build -f bentos/bentofile.yaml .` from the repo root into a temporary BENTOML_HOME, offline."""
    tmp = tmp_path_factory.mktemp("bento")
    home, stub = tmp / "bentoml", tmp / "bin"
    stub.mkdir()
    calls = tmp / "uv-calls"
    # BentoML looks up a uv even without locking (and pip-installs one when none is found): a stub that records
    # and fails, so a lock or any other uv run would show.
    (stub / "uv").write_text(f'#!/bin/sh\necho "$*" >> "{calls}"\nexit 1\n')
    (stub / "uv").chmod(0o755)
    env = {k: v for k, v in os.environ.items()
           if k.lower() not in ("no_proxy", "all_proxy") and not k.startswith(("BENTOML_", "UV_", "PIP_"))}
    env.update(BENTOML_HOME=str(home), BENTOML_DO_NOT_TRACK="True", PIP_NO_INDEX="1",
               HTTP_PROXY=DEAD_PROXY, HTTPS_PROXY=DEAD_PROXY, http_proxy=DEAD_PROXY, https_proxy=DEAD_PROXY,
               PATH=os.pathsep.join([str(stub), str(Path(sys.executable).parent), "/usr/bin", "/bin"]))
    out = subprocess.run([sys.executable, "-m", "bentoml", "build", "-f", "bentos/bentofile.yaml", "."],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    log = out.stdout + out.stderr
    assert out.returncode == 0, log[-3000:]
    version = (home / "bentos" / "retrieval" / "latest").read_text().strip()
    path = home / "bentos" / "retrieval" / version
    return {"path": path, "log": log, "uv_calls": calls,
            "dockerfile": (path / "env" / "docker" / "Dockerfile").read_text(),
            "requirements": (path / "env" / "python" / "requirements.txt").read_text()}


@pytest.mark.slow
def test_build_ran_offline_without_locking(bento):
    assert "Successfully built Bento" in bento["log"]
    assert "Locking PyPI package versions" not in bento["log"]
    assert not (bento["path"] / "env" / "python" / "requirements.lock.txt").exists()
    assert not bento["uv_calls"].exists(), bento["uv_calls"].read_text()
    with pytest.raises(md.PackageNotFoundError):
        md.version("uv")  # not installed into the venv behind our back


@pytest.mark.slow
def test_dockerfile(bento):
    lines = [line.strip() for line in bento["dockerfile"].splitlines()]
    digest = "sha256:9c900dea9e8fb7e16277c179b555cc72d29a352dbc33cff48ad5a0412fd5bfc7"
    assert [line for line in lines if line.startswith("FROM ")] == [f"FROM python:3.11-slim@{digest} AS base-container"]
    # BentoML's Dockerfile generator, the same as without the pin: the pinned base changes only the FROM line
    assert any(line.startswith("RUN apt-get update && apt-get install") for line in lines)
    assert "RUN command -v uv >/dev/null || pip install uv" in lines
    install = next(i for i, line in enumerate(lines) if " pip install -r " in line)
    assert lines[install].endswith("uv --directory $INSTALL_ROOT pip install -r "
                                   "$BENTO_PATH/env/python/requirements.txt")
    env: dict[str, str] = {}
    args: dict[str, str] = {}
    for line in lines[:install]:  # ARG X=v / ENV X=v / ENV X=$X, in order: what the install step and the image see
        if m := re.fullmatch(r"ARG (\w+)=(.*)", line):
            args[m[1]] = m[2]
        elif m := re.fullmatch(r"ENV (\w+)=(.*)", line):
            # Docker expands $X to an ENV X set before, if any, and only else to the ARG X
            env[m[1]] = (env[m[1]] if m[1] in env else args.get(m[1], "")) if m[2] == f"${m[1]}" else m[2]
    assert env["RETRIEVAL_DATA_DIR"] == "/data"
    # BentoML's own, which an `envs` entry can't override (bentos/bentofile.yaml): a run passes
    # `-e BENTOML_HOME=/data/bentoml` (docs/how-to/container.md, bentos/container_test.sh)
    assert env["BENTOML_HOME"] == "/home/bentoml/"
    assert not [name for name in env if name.startswith(("UV_INDEX", "UV_EXTRA", "PIP_"))], "no index config"
    assert "--mount=type=secret" not in bento["dockerfile"], "a plain `docker build` must work too"
    assert "EXPOSE 3000" in lines and "USER bentoml" in lines
    assert [line for line in lines if line][-1] == 'ENTRYPOINT [ "/home/bentoml/bento/env/docker/entrypoint.sh" ]'
    entrypoint = (bento["path"] / "env" / "docker" / "entrypoint.sh").read_text()
    assert 'set -- bentoml serve "$@" "$BENTO_PATH"' in entrypoint


@pytest.mark.slow
def test_image_requirements(bento):
    """The bento's copy: ours with hashes and options as they are, plus BentoML's own bentoml line (uv checks the
    hashes of a package listed twice, once with hashes, as when listed once)."""
    reqs, options = parse(bento["requirements"])
    assert options == [f"--find-links {TORCH_LINKS}"]
    by_name: dict[str, set[str]] = {}
    for r in reqs:
        by_name.setdefault(canonicalize_name(r.name), set()).add(str(r))
    assert by_name["torch"] == {TORCH_CPU}
    assert by_name["bentoml"] == {f"bentoml=={constraints()['bentoml']}"} == {f"bentoml=={md.version('bentoml')}"}
    assert by_name["feast"] == {f"feast[duckdb,redis]=={constraints()['feast']}"}
    assert not [r for r in reqs if CUDA.match(str(r))]
    assert pin_errors(reqs) == []
    ours = REQUIREMENTS.read_text()
    assert {n: s for n, (s,) in by_name.items()} == {canonicalize_name(r.name): str(r) for r in parse(ours)[0]}
    image_hashes = hashes(bento["requirements"])
    assert image_hashes.pop("bentoml") == [*hashes(ours)["bentoml"], []]
    assert image_hashes == {n: h for n, h in hashes(ours).items() if n != "bentoml"}


@pytest.mark.slow
def test_bento_sources(bento):
    src = bento["path"] / "src"
    files = {p.relative_to(src).as_posix() for p in src.rglob("*") if p.is_file()}
    assert {"bentos/service.py", "bentos/retriever.py", "feature_store.yaml", "feature_repo/feature_views.py",
            "feature_repo/infra/fast_sqlite.py"} <= files
    online = {"training/__init__.py", "training/config.py", "training/io.py", "training/features/__init__.py",
              "training/features/store.py", "training/features/realtime.py", "training/release/__init__.py",
              "training/release/index.py", "training/data/__init__.py", "training/data/raw.py",
              "training/data/contracts.py",   # the raw events contract that POST /events validates with
              "training/release/registry.py", "training/release/model_store.py",
              *(p.relative_to(REPO).as_posix() for p in (REPO / "training" / "model").glob("*.py"))}
    assert {f for f in files if f.startswith("training/")} == online   # the online path, not the offline stages
    banned = {"tests", ".data", ".venv", "dbt_project", "bench", "__pycache__"}
    assert not [f for f in files if banned & set(f.split("/")) or f.endswith(".pyc")]
    meta = yaml.safe_load((bento["path"] / "bento.yaml").read_text())
    assert meta["service"] == "bentos.service:RetrievalService" and meta["name"] == "retrieval"
    assert meta["labels"]["project"] == "learned-retrieval" and meta["models"] == []
