"""Pin embeddings of a model version: the pin tower over the serving corpus, and their contract.

``embed_corpus`` runs the pin tower over the live serving corpus (canonical pins, as dbt remapped them) with
the pin features the online store serves through the model's pin feature service; ``publish`` checks
whatever it indexes against ``pin_embedding_schema`` (dimension, finite, unit norm, unique ids).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np
import pandas as pd
import pandera.pandas as pa

from training.config import Config
from training.data.snapshot import load_live
from training.features.store import feature_store
from training.model.towers import run_tower
from training.release.index import EMBEDDING, SIGNATURE_MAX, IndexBuildError

log = logging.getLogger(__name__)


def pin_embedding_schema(dim: int, unit_norm: bool = False) -> pa.DataFrameSchema:
    """Contract of the pin embeddings before they reach the index: ``dim`` finite values each (unit norm when the
    model normalises its outputs); unique pin ids, known scalar fields."""

    def vectors_ok(col: pd.Series) -> pd.Series:
        shaped = col.map(lambda v: np.shape(v) == (dim,)).astype(bool)
        out = pd.Series(False, index=col.index)
        if shaped.any():
            a = np.stack(col[shaped].to_numpy()).astype(np.float64)
            ok = np.isfinite(a).all(axis=1)
            if unit_norm:
                ok &= np.abs((a * a).sum(axis=1) - 1.0) < 1e-3
            out[shaped] = ok
        return out

    return pa.DataFrameSchema(
        {
            "pin_id": pa.Column("int64", unique=True, nullable=False),
            "interest_id": pa.Column("int64", pa.Check.ge(-1), nullable=False),
            "image_signature": pa.Column(str, pa.Check.str_length(0, SIGNATURE_MAX), nullable=False),
            "decayed_engagement": pa.Column("float32", pa.Check.ge(0), nullable=False),
            EMBEDDING: pa.Column(object, pa.Check(vectors_ok, element_wise=False,
                                                  error=f"{dim}-d, finite{', unit norm' if unit_norm else ''}"),
                                 nullable=False),
        },
        name="pin_embeddings", strict=True, coerce=True,
    )


@dataclass
class PinEmbeddings:
    """The serving corpus embedded by one model version (validated)."""

    frame: pd.DataFrame
    """pin_id, interest_id, image_signature, decayed_engagement, embedding (object column of float32 rows)."""

    @property
    def vectors(self) -> np.ndarray:
        return np.stack(self.frame[EMBEDDING].to_numpy()).astype(np.float32)

    def __len__(self) -> int:
        return len(self.frame)

    def validated(self, unit_norm: bool = False) -> PinEmbeddings:
        """These embeddings if they pass ``pin_embedding_schema`` (else pandera's error names the failures)."""
        dim = len(self.frame[EMBEDDING].iloc[0]) if len(self.frame) else 0
        return PinEmbeddings(pin_embedding_schema(dim, unit_norm).validate(self.frame, lazy=True))


def corpus(cfg: Config) -> pd.DataFrame:
    """The live serving corpus (canonical pins only; dbt applied the pin -> canonical remapping)."""
    return pd.read_parquet(load_live(cfg).table("serving_corpus"))


def embed_corpus(cfg: Config, model, encoder, pin_service: str) -> PinEmbeddings:
    """Pin tower over the serving corpus, with the online store's features through ``pin_service`` (not yet
    checked: ``publish`` validates whatever it indexes)."""
    pins = corpus(cfg)
    if pins.empty:
        raise IndexBuildError("the serving corpus is empty: nothing to index")
    t0 = time.perf_counter()
    feats = feature_store(cfg).online_frame(pin_service, "pin_id", pins["pin_id"].to_numpy())
    t1 = time.perf_counter()
    # scored as of the snapshot's end: the days since a pin's last feature row count as idle days
    vectors = run_tower(model.pin_tower, encoder.pins(feats, now=load_live(cfg).as_of), batch=8192).astype(np.float32)
    frame = pd.DataFrame({
        "pin_id": pins["pin_id"].astype("int64"),
        "interest_id": pins["interest_id"].fillna(-1).astype("int64"),
        "image_signature": pins["image_signature"].fillna("").astype(str),
        "decayed_engagement": pins["decayed_engagement"].astype("float32"),
        EMBEDDING: list(vectors),
    })
    log.info("embedded %d corpus pins (online features %.1fs, tower %.1fs)", len(frame), t1 - t0,
             time.perf_counter() - t1)
    return PinEmbeddings(frame)
