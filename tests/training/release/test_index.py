"""The index layer's inner-product-to-cosine reduction (what makes HNSW usable for pins of unequal norms)."""

from __future__ import annotations

import numpy as np

from training.config import IndexConfig
from training.evaluation.metrics import top_k
from training.release.index import mips_transform, needs_mips_transform


def _pins(n: int = 2000, d: int = 16, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True) * rng.uniform(0.9, 1.1, (n, 1)).astype(np.float32)


def test_the_transform_makes_unit_pins_and_keeps_every_ranking_and_score():
    x = _pins()
    y, top = mips_transform(x)
    assert y.shape == (len(x), x.shape[1] + 1)
    np.testing.assert_allclose(np.linalg.norm(y, axis=1), 1.0, atol=1e-5)
    assert top == np.linalg.norm(x, axis=1).max()
    q = np.random.default_rng(1).normal(size=(50, x.shape[1])).astype(np.float32)
    padded = np.hstack([q, np.zeros((len(q), 1), np.float32)])
    np.testing.assert_allclose(padded @ y.T * top, q @ x.T, atol=1e-4)   # the scores search() restores
    assert (top_k(padded @ y.T, 100) == top_k(q @ x.T, 100)).mean() > 0.999


def test_only_approximate_indexes_over_unequal_norms_are_transformed():
    x = _pins()
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    assert needs_mips_transform(IndexConfig(index_type="HNSW"), x)
    assert needs_mips_transform(IndexConfig(index_type="IVF_FLAT"), x)
    assert not needs_mips_transform(IndexConfig(index_type="FLAT"), x)
    assert not needs_mips_transform(IndexConfig(index_type="HNSW"), unit)
    assert not needs_mips_transform(IndexConfig(index_type="HNSW"), x[:0])


class _Client:
    """Records the one search call and answers it with two hits."""

    def search(self, name, data, limit, anns_field, filter, output_fields, search_params):
        self.call = {"data": data, "limit": limit, "filter": filter, "search_params": search_params}
        return [[{"id": 7, "distance": 0.5, "entity": {}}, {"id": 8, "distance": 0.25, "entity": {}}] for _ in data]


def test_search_pads_queries_restores_scores_and_keeps_ef_at_least_k():
    from training.release.index import MIPS_NORM, search

    c = _Client()
    hits = search(c, "pins_x", np.ones((1, 3), np.float32), 150, {"ef": 128, MIPS_NORM: 2.0}, interests=[4, 2])
    assert c.call["data"] == [[1.0, 1.0, 1.0, 0.0]]
    assert c.call["search_params"] == {"metric_type": "IP", "params": {"ef": 150}}   # Milvus needs ef >= k
    assert c.call["filter"] == "interest_id in [2, 4]"
    assert hits == [[{"pin_id": 7, "score": 1.0}, {"pin_id": 8, "score": 0.5}]]
    search(c, "pins_x", np.ones((1, 3), np.float32), 10, {"ef": 128})
    assert c.call["data"] == [[1.0, 1.0, 1.0]] and c.call["search_params"]["params"] == {"ef": 128}
