"""Feast definitions: entities, parquet sources written by dbt, feature views and feature services, one kind
per module; ``infra/`` holds the project's bulk SQLite online store and Arrow materialization engine.

`feast apply` (from the repo root) discovers the objects below; ``retrieval features`` applies the same
objects through ``training.features.store.definitions``.
"""
