"""Stage: transform. Runs the dbt project (dbt-duckdb) on the contract-checked raw files of a build.

dbt reads ``<build>/staged/*.parquet`` and writes ``<build>/warehouse.duckdb`` and the marts and feature
tables as parquet under ``<build>/tables/``. The build folder is always ``<data_dir>/build`` so dbt's
partial parsing survives between runs; ``training.data.snapshot`` renames it once everything passed.
Everything dbt needs comes in ``--vars``: the transform variables of the typed config, ``until`` (``data.until``:
staging drops rows at or after it), the folders (``build_dir``, ``staged_dir``) and DuckDB's settings
(``duckdb_threads``, ``duckdb_memory_limit`` with its spill folder ``duckdb_temp_directory``; see
dbt_project/profiles.yml), so nothing is passed through the environment.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from training.config import REPO_ROOT, Config

log = logging.getLogger(__name__)

DBT_DIR = REPO_ROOT / "dbt_project"


class TransformError(RuntimeError):
    """dbt failed; the message lists the failing nodes."""


@dataclass
class DbtResult:
    seconds: float
    nodes: dict[str, str]
    """node name -> status (success, pass, ...)."""
    timings: dict[str, float]
    """node name -> execution seconds."""


def until_var(cfg: Config) -> str:
    """The ``until`` var: ``data.until`` as an ISO UTC timestamp, '' for no cut (dbt_project/macros/until.sql)."""
    until = cfg.data.until_utc
    return until.isoformat() if until else ""


def dbt_vars(cfg: Config, build_dir: Path) -> dict[str, object]:
    """Everything the project reads: the transform variables, the data stage's end (``until``) and the build's
    folders."""
    return {**cfg.transform.dbt_vars(), "until": until_var(cfg), "build_dir": str(build_dir),
            "staged_dir": str(build_dir / "staged"), "duckdb_threads": cfg.transform.threads,
            "duckdb_memory_limit": f"{cfg.transform.memory_gib:g}GiB",
            "duckdb_temp_directory": str(cfg.data_path / "tmp" / "dbt-spill")}


def warehouse_config(cfg: Config, build_dir: Path) -> dict[str, str]:
    """The DuckDB configuration dbt opens ``<build>/warehouse.duckdb`` with (profiles.yml's ``config_options``): a
    connection in the same process must give the same, since dbt-duckdb keeps its database open."""
    v = dbt_vars(cfg, build_dir)
    return {"temp_directory": str(v["duckdb_temp_directory"]), "memory_limit": str(v["duckdb_memory_limit"])}


def dbt_args(command: str, cfg: Config, build_dir: Path, *extra: str) -> list[str]:
    return [
        command,
        "--project-dir", str(DBT_DIR),
        "--profiles-dir", str(DBT_DIR),
        "--target-path", str(cfg.data_path / "dbt" / "target"),
        "--log-path", str(cfg.data_path / "dbt" / "logs"),
        "--vars", json.dumps(dbt_vars(cfg, build_dir)),
        *extra,
    ]


def run_dbt(command: str, cfg: Config, build_dir: Path, *extra: str) -> DbtResult:
    """Run a dbt command in-process (``build`` = models + data tests + unit tests)."""
    from dbt.cli.main import dbtRunner

    (build_dir / "tables").mkdir(parents=True, exist_ok=True)
    Path(dbt_vars(cfg, build_dir)["duckdb_temp_directory"]).mkdir(parents=True, exist_ok=True)   # DuckDB: one level
    args = dbt_args(command, cfg, build_dir, "--log-level", "warn", "--log-level-file", "info", *extra)
    log.info("dbt %s (vars %s, until %r); log: %s", command, cfg.transform.dbt_vars(), until_var(cfg),
             cfg.data_path / "dbt" / "logs")
    t0 = time.perf_counter()
    with tqdm(desc=f"dbt {command}", unit=" node", disable=None) as bar:

        def on_event(event) -> None:
            if event.info.name == "NodeFinished":
                bar.set_postfix_str(event.data.node_info.node_name[:40], refresh=False)
                bar.update()

        res = dbtRunner(callbacks=[on_event]).invoke(args)
    seconds = time.perf_counter() - t0
    if res.exception is not None:
        raise TransformError(f"dbt {command} could not run: {res.exception}") from res.exception
    results = list(res.result or [])
    nodes = {r.node.name: str(r.status) for r in results}
    timings = {r.node.name: round(float(r.execution_time or 0.0), 3) for r in results}
    failed = [f"{r.node.name} ({r.status}): {(r.message or '').strip()[:300]}" for r in results
              if str(r.status) in ("error", "fail", "runtime error")]
    if not res.success or failed:
        raise TransformError(f"dbt {command} failed in {build_dir}:\n  " + "\n  ".join(failed or ["see dbt logs"]))
    log.info("dbt %s: %d nodes ok in %.1fs", command, len(nodes), seconds)
    return DbtResult(seconds=seconds, nodes=nodes, timings=timings)
