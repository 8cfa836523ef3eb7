"""Learned retrieval: data stages, two-tower training, indexing and release (see README)."""
