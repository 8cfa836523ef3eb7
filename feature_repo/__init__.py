"""Feast definitions: entities, parquet sources written by dbt, feature views and feature services.

`feast apply` (from the repo root) discovers the objects below; `retrieval features apply` applies the
same objects through ``training.features.definitions``.
"""
