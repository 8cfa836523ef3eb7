"""Learned retrieval: data stages, two-tower training, indexing and release (docs: `make docs`)."""

__version__ = "0.2.0"
"""The project's version (pyproject.toml reads it from here): checkpoints, releases, reports and the service's
``/metadata`` carry it. CHANGELOG.md says what each version changed."""
