"""The release registry: which release is live, the publish history, and one record per release.

A release binds one model version to its user tower (BentoML model ``user_tower:<version>``), its pin
collection (``<prefix>_<version>``), the feature services it reads (by role), the data snapshot, the interest
ids of that snapshot and the evaluation metrics. Under ``<data_dir>/releases/``:

    registry.json        {"live": version, "history": [published versions, oldest first],
                          "previous": [versions that were live before the live one, most recent last]}
    <version>.json       the release record

Every write is one atomic file replace; replacing ``registry.json`` is the switch the service sees.
``check_pair`` is the version guard: a user tower and a collection of different model versions are never
paired (publish and the service both call it).
"""

from __future__ import annotations

import fcntl
import json
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from training.config import Config
from training.io import atomic_write_text, sweep_temporaries


class VersionMismatch(RuntimeError):
    """A user tower and a collection of different model versions were about to be paired."""


class ReleaseError(RuntimeError):
    """A release cannot be published, restored or read."""


@dataclass
class Release:
    model_version: str
    collection: str
    index_uri: str
    alias: str
    user_tower: str
    """BentoML model tag of the user tower, ``user_tower:<version>``."""
    feature_services: dict[str, str]
    """Feature service by role: {"user": ..., "pin": ...}."""
    snapshot_id: str
    as_of: str
    metrics: dict[str, float]
    index: dict[str, Any]
    """Rows, index type and parameters, search parameters, timings and the verification result."""
    created_at: str
    interest_ids: list[int] = field(default_factory=list)
    """Every interest id of the release's data snapshot (what a request may filter on)."""
    example_user_id: int | None = None
    """A user with engagement history in the release's snapshot (for the printed example request)."""
    modes: list[str] = field(default_factory=lambda: ["single"])
    """Retrieval modes the model supports: 'single', plus 'multi' (multi-embedding) and 'conditional'."""
    default_mode: str = "single"
    """The mode a request gets when it names none: the best one measured for this model."""
    gate: dict[str, Any] = field(default_factory=dict)
    """How ``retrieval retrain`` validated it against the model live at the time (empty for a manual publish)."""
    project_version: str = ""
    """The project version (``training.__version__``) that trained the model ('' for a checkpoint written before
    checkpoints recorded it)."""

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Release:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def check_pair(tower_version: str, collection: str, collection_meta: dict[str, Any]) -> None:
    """Raise ``VersionMismatch`` unless the collection was built by the tower's model version."""
    built_by = collection_meta.get("model_version")
    if built_by != tower_version:
        raise VersionMismatch(f"user tower {tower_version!r} cannot search collection {collection!r}, "
                              f"built by model version {built_by!r}")


VERSION_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,200}")
"""A model version is a file-name-safe token: it names a record file and a collection, never a path."""


def check_version(version: object, where: str) -> str:
    if not isinstance(version, str) or not VERSION_PATTERN.fullmatch(version) or ".." in version:
        raise ReleaseError(f"{where}: {version!r} is not a model version (letters, digits, '.', '_', '-')")
    return version


def check_state(state: object, path: Path) -> dict[str, Any]:
    """The registry's content, validated: {"live": version | null, "history": [versions], "previous": [...]}."""
    if not isinstance(state, dict):
        raise ReleaseError(f"{path}: expected an object with live/history/previous, got {type(state).__name__}")
    missing = {"live", "history", "previous"} - set(state)
    if missing:
        raise ReleaseError(f"{path}: missing {sorted(missing)}")
    for key in ("history", "previous"):
        if not isinstance(state[key], list):
            raise ReleaseError(f"{path}: {key} must be a list, got {type(state[key]).__name__}")
        for v in state[key]:
            check_version(v, f"{path}: {key}")
    if state["live"] is not None:
        check_version(state["live"], f"{path}: live")
        if state["live"] not in state["history"]:
            raise ReleaseError(f"{path}: live {state['live']!r} is not in the history")
    return state


class Registry:
    """``<data_dir>/releases``: the live pointer, the publish history and one record per release."""

    def __init__(self, cfg: Config):
        self.dir = cfg.data_path / "releases"

    @contextmanager
    def lock(self) -> Iterator[None]:
        """Exclusive lock for publish / rollback / recover (released by the kernel if the holder dies)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        with open(self.dir / ".lock", "w") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def state(self) -> dict[str, Any]:
        """The validated registry (empty when none was ever written); ``ReleaseError`` names what is wrong."""
        path = self.dir / "registry.json"
        if not path.exists():
            return {"live": None, "history": [], "previous": []}
        try:
            raw = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise ReleaseError(f"{path}: not readable JSON ({e})") from e
        return check_state(raw, path)

    def write_state(self, state: dict[str, Any]) -> None:
        atomic_write_text(self.dir / "registry.json", json.dumps(state, indent=2))

    def record_path(self, version: str) -> Path:
        return self.dir / f"{check_version(version, 'release record')}.json"

    def record(self, version: str) -> Release:
        path = self.record_path(version)
        if not path.exists():
            raise ReleaseError(f"no release record for {version} at {path}")
        try:
            return Release.from_dict(json.loads(path.read_text()))
        except (OSError, ValueError, TypeError) as e:
            raise ReleaseError(f"{path}: not a readable release record ({e})") from e

    def save_record(self, release: Release) -> None:
        atomic_write_text(self.record_path(release.model_version), json.dumps(asdict(release), indent=2))

    def delete_record(self, version: str) -> None:
        self.record_path(version).unlink(missing_ok=True)

    def records(self) -> list[str]:
        return sorted(p.stem for p in self.dir.glob("*.json") if p.name != "registry.json")

    def sweep(self) -> None:
        """Remove what interrupted writes left (temporary files)."""
        if self.dir.exists():
            sweep_temporaries(self.dir)

    def live(self) -> Release | None:
        version = self.state()["live"]
        return self.record(version) if version else None
