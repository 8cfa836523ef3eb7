"""Model artifacts: build a model from its config, the training checkpoint, and the exported user tower.

- **Checkpoint** (``<data_dir>/models/<version>/model.pt``, written by ``retrieval train``): the
  ``TrainConfig``, the encoder state, the whole ``TwoTower`` state (logQ frequency buffers included), the model
  version, the feature services by role, the data snapshot, the fit summary and the test metrics. Publishing
  and evaluation start from it.
- **User-tower export** (what the service loads): only what a request needs: the ``UserTower`` weights
  (with the shared pin-id and interest tables it reads), the encoder state, the config, the model version
  and the collection it is paired with. No pin tower, no logQ buffers, no training state.

Both are plain tensors, numbers, strings, lists and dicts, and are only ever loaded with
``torch.load(weights_only=True)``: a file holding anything else (pickled code) is refused.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from training.config import TrainConfig
from training.io import atomic_path
from training.model.backbones import stack_masknet_blocks
from training.model.encoding import Encoder
from training.model.towers import Tower, UserTower
from training.model.two_tower import TwoTower

USER_TOWER_FORMAT = "user_tower/1"
"""Format tag of an exported user tower (checked on load)."""


class ArtifactError(ValueError):
    """A checkpoint or exported tower that cannot be loaded; the message names the file and why."""


ADDED_SWITCHES = {"wide_counts": False, "wide_interest": False, "pin_rates": False, "blend_table": "training",
                  "cluster_features": False, "popularity_prior": False,
                  "impression_interests": False}
"""Model switches added after artifacts were first written, with the value that rebuilds an artifact written
before them (their defaults changed the model's shape or what it was trained with)."""


def train_config(state: dict[str, Any]) -> TrainConfig:
    """The ``TrainConfig`` stored in an artifact (fields this code no longer has are ignored; switches it predates
    take ``ADDED_SWITCHES``)."""
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    return TrainConfig(**{**ADDED_SWITCHES, **{k: v for k, v in state.items() if k in known}})


def placeholder_tables(encoder: Encoder, dim: int | None) -> dict[str, torch.Tensor] | None:
    """Zero pre-trained tables of the right shapes (filled by loading a state dict), or None without them."""
    if dim is None:
        return None
    return {"context": torch.zeros(encoder.n_pins, dim), "target": torch.zeros(encoder.n_pins, dim),
            "users": torch.zeros(encoder.n_users, dim)}


def build_model(encoder: Encoder, tc: TrainConfig, tables: dict[str, torch.Tensor] | None = None) -> TwoTower:
    """A freshly initialised two-tower model (seeded by ``tc.seed``) sized for ``encoder``'s vocabularies, with
    the pre-trained ``tables`` aligned to them (``PretrainedTable.aligned``), if any."""
    torch.manual_seed(tc.seed)
    return TwoTower(encoder.n_pins, encoder.n_interests, len(encoder.genders), len(encoder.segments), tc,
                    encoder.history_length, tables)


def build_user_tower(encoder: Encoder, tc: TrainConfig, pretrained_dim: int | None) -> UserTower:
    """A user tower alone, with its own pin-id, interest and pre-trained tables (filled by loading an export)."""
    tables = placeholder_tables(encoder, pretrained_dim) or {}
    return UserTower(nn.Embedding(encoder.n_pins, tc.id_embed_dim, padding_idx=0),
                     nn.Embedding(encoder.n_interests + 1, tc.id_embed_dim, padding_idx=0),
                     len(encoder.genders), len(encoder.segments), tc, encoder.history_length,
                     tables.get("context"), tables.get("users"))


def with_blend_tables(module: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Give ``module``'s towers the blend tables ``state`` holds (``Tower.set_blend_table``: a model whose blended
    subspace was refit after training), so that ``state`` loads into it."""
    for name, tower in [(n, m) for n, m in module.named_modules() if isinstance(m, Tower)]:
        key = f"{name}.blend_table.weight" if name else "blend_table.weight"
        if key in state:
            tower.set_blend_table(torch.zeros_like(state[key]))


def _save(payload: dict[str, Any], path: Path) -> None:
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def _load(path: Path) -> dict[str, Any]:
    if not Path(path).is_file():
        raise ArtifactError(f"{path}: no such file")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - pickled code, a corrupt or foreign file: refuse it, say why
        raise ArtifactError(f"{path}: not a model artifact of this project (only tensors and plain data are "
                            f"loaded): {str(e).splitlines()[0][:300]}") from e
    if not isinstance(payload, dict):
        raise ArtifactError(f"{path}: not a model artifact of this project (a {type(payload).__name__})")
    return payload


def save_checkpoint(payload: dict[str, Any], path: Path) -> None:
    """Write a training checkpoint atomically."""
    _save(payload, path)


def load_checkpoint(path: Path) -> tuple[TwoTower, Encoder, dict[str, Any]]:
    """(model in eval mode, encoder, payload) from a ``retrieval train`` checkpoint."""
    payload = _load(path)
    missing = {"config", "encoder", "model", "model_version"} - set(payload)
    if missing:
        raise ArtifactError(f"{path}: not a training checkpoint (lacks {sorted(missing)})")
    encoder = Encoder.from_state(payload["encoder"])
    pretrained = payload.get("pretrained") or {}
    model = build_model(encoder, train_config(payload["config"]), placeholder_tables(encoder, pretrained.get("dim")))
    with_blend_tables(model, payload["model"])
    model.load_state_dict(payload["model"])
    model.eval()
    return model, encoder, payload


def warm_start(model: TwoTower, encoder: Encoder, payload: dict[str, Any]) -> dict[str, int]:
    """Initialise ``model`` (built for ``encoder``) from the checkpoint ``payload`` of an earlier model (a retrain's
    warm start): tensors of the same shape are copied; pin-id tables (one row per vocabulary pin + row 0) are
    copied row by row for the pins both vocabularies hold, new pins keep their fresh initialisation; the
    pre-trained tables stay as built (they come from the current table); anything else that changed shape stays
    fresh. Returns how many tensors were copied, remapped and left fresh."""
    old_ids = Encoder.from_state(payload["encoder"]).pin_ids
    new_ids = encoder.pin_ids
    pos = np.minimum(np.searchsorted(old_ids, new_ids), max(len(old_ids) - 1, 0))
    found = old_ids[pos] == new_ids if len(old_ids) else np.zeros(len(new_ids), bool)
    new_rows = torch.from_numpy(np.flatnonzero(found) + 1)
    old_rows = torch.from_numpy(pos[found] + 1)
    same_vocab = np.array_equal(old_ids, new_ids)
    counts = {"copied": 0, "remapped": 0, "fresh": 0}
    state = model.state_dict()
    source = stack_masknet_blocks(model, payload["model"])
    with torch.no_grad():
        for key, tensor in state.items():
            src = source.get(key)
            pin_table = (src is not None and tensor.ndim == 2 and src.ndim == 2 and tensor.shape[0] == len(new_ids) + 1
                         and src.shape[0] == len(old_ids) + 1 and tensor.shape[1] == src.shape[1])
            if src is None or "pretrained" in key:
                counts["fresh"] += 1
            elif pin_table and not same_vocab:
                tensor[0] = src[0]
                tensor[new_rows] = src[old_rows].to(tensor.dtype)
                counts["remapped"] += 1
            elif tensor.shape == src.shape:
                tensor.copy_(src)
                counts["copied"] += 1
            else:
                counts["fresh"] += 1
    model.load_state_dict(state)
    return counts


def export_user_tower(payload: dict[str, Any], model: TwoTower, collection: str) -> dict[str, Any]:
    """The serving artifact of a checkpoint's model: its user tower, encoder, config, version and collection."""
    return {
        "format": USER_TOWER_FORMAT,
        "model_version": payload["model_version"],
        "project_version": payload.get("project_version", ""),
        "collection": collection,
        "config": payload["config"],
        "encoder": payload["encoder"],
        "feature_services": payload["feature_services"],
        "pretrained": payload.get("pretrained"),
        "user_tower": model.user_tower.state_dict(),
    }


def save_user_tower(export: dict[str, Any], path: Path) -> None:
    _save(export, path)


def load_user_tower(path: Path) -> tuple[UserTower, Encoder, dict[str, Any]]:
    """(user tower in eval mode, encoder, the export's metadata without the weights) from an exported tower."""
    payload = _load(path)
    if payload.get("format") != USER_TOWER_FORMAT:
        raise ArtifactError(f"{path}: not an exported user tower (format {payload.get('format')!r}, "
                            f"expected {USER_TOWER_FORMAT!r})")
    encoder = Encoder.from_state(payload["encoder"])
    tower = build_user_tower(encoder, train_config(payload["config"]), (payload.get("pretrained") or {}).get("dim"))
    with_blend_tables(tower, payload["user_tower"])
    tower.load_state_dict(payload["user_tower"])
    tower.eval()
    return tower, encoder, {k: v for k, v in payload.items() if k != "user_tower"}
