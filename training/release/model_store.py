"""User towers in the BentoML model store, through BentoML's public API (``bentoml.models``).

Each published release stores its exported user tower (``training.model.checkpoint.export_user_tower``) as the
BentoML model ``user_tower:<version>``, labelled with its model version and collection. The store is the data
dir's ``bentoml/models``: BentoML reads ``BENTOML_HOME`` once per process, so ``use_model_store`` sets it
before the first model-store call and refuses a second, different data dir in the same process (the service
and ``bentoml build`` run with ``BENTOML_HOME=<data_dir>/bentoml``; ``retrieval-service`` sets it).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from training.config import Config
from training.model.checkpoint import load_user_tower, save_user_tower
from training.release.registry import ReleaseError, VersionMismatch

USER_TOWER_MODEL = "user_tower"
EXPORT_FILE = "user_tower.pt"


def use_model_store(cfg: Config) -> None:
    """Make this process's BentoML model store the data dir's (``BENTOML_HOME``), before BentoML resolves it."""
    want = cfg.bentoml_home
    have = os.environ.get("BENTOML_HOME")
    if have is None:
        os.environ["BENTOML_HOME"] = str(want)
    elif Path(have).expanduser().resolve() != want.resolve():
        raise ReleaseError(f"BENTOML_HOME is {have}, but the user towers of data dir {cfg.data_path} live in {want}: "
                           f"set BENTOML_HOME={want} (one data dir per process)")
    os.environ.setdefault("BENTOML_DO_NOT_TRACK", "True")


def tag_of(version: str) -> str:
    return f"{USER_TOWER_MODEL}:{version}"


def store_user_tower(cfg: Config, export: dict[str, Any], meta: dict[str, Any]) -> str:
    """Save an exported user tower as ``user_tower:<version>``; returns the tag."""
    import bentoml

    use_model_store(cfg)
    tag = tag_of(export["model_version"])
    labels = {"model_version": export["model_version"], "collection": export["collection"]}
    with bentoml.models.create(tag, labels=labels, metadata=meta) as m:
        save_user_tower(export, Path(m.path_of(EXPORT_FILE)))
    return tag


def open_user_tower(cfg: Config, tag: str):
    """(user tower, encoder, export metadata) of a stored tower; checks its label against the file it holds."""
    import bentoml

    use_model_store(cfg)
    ref = bentoml.models.get(tag)
    tower, encoder, meta = load_user_tower(Path(ref.path_of(EXPORT_FILE)))
    if ref.info.labels.get("model_version") != meta["model_version"]:
        raise VersionMismatch(f"{tag}: label {ref.info.labels.get('model_version')!r} but the tower is "
                              f"{meta['model_version']!r}")
    return tower, encoder, meta


def stored_user_towers(cfg: Config) -> dict[str, Any]:
    """version -> BentoML model of every stored user tower."""
    import bentoml
    from bentoml.exceptions import NotFound

    use_model_store(cfg)
    try:
        return {str(m.tag.version): m for m in bentoml.models.list(USER_TOWER_MODEL)}
    except NotFound:
        return {}


def delete_user_tower(cfg: Config, version: str) -> None:
    """Delete ``user_tower:<version>``, also when a killed publish left it half-written."""
    import shutil

    import bentoml

    use_model_store(cfg)
    try:
        bentoml.models.delete(tag_of(version))
    except Exception:  # noqa: BLE001 - absent, or half-written by a killed publish: remove the files
        shutil.rmtree(cfg.bentoml_home / "models" / USER_TOWER_MODEL / version, ignore_errors=True)
