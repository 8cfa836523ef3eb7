"""Benchmark of the data layer on synthetic events (default 10M).

Measures, in one run on one data dir:
  1. the synthetic generator and the pandera contracts (context);
  2. `dbt run` as a user types it (a subprocess: CLI start, parse, all models);
  3. the floor: the same transformations as plain DuckDB SQL — dbt's own compiled SQL for every model,
     executed in DAG order in a fresh DuckDB database with the same settings (tables, and COPY to
     parquet for the external models);
  4. `feast materialize` of every feature view into the online store: the in-process call and the CLI
     subprocess (which includes importing feast), with entities/s.

    .venv/bin/python bench/bench_data.py [--events 10000000] [--data-dir .data/bench]

Prints a table and the command to rerun it; writes docs/results/data.json (``--out``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from datetime import UTC
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from common import RESULTS, write_results  # noqa: E402  (bench/common.py)

from training.config import Config, DataConfig  # noqa: E402


def timed(fn, *args, **kwargs):
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - t0


def run_cmd(cmd: list[str], env: dict[str, str]) -> float:
    t0 = time.perf_counter()
    res = subprocess.run(cmd, env={**os.environ, **env}, cwd=ROOT, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if res.returncode != 0:
        sys.exit(f"command failed ({res.returncode}): {' '.join(cmd)}\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}")
    return seconds


def plain_duckdb_floor(cfg: Config, build_dir: Path) -> float:
    """Execute dbt's compiled SQL of every model, in dependency order, with plain DuckDB."""
    import duckdb

    target = cfg.data_path / "dbt" / "target"
    manifest = json.loads((target / "manifest.json").read_text())
    models = {k: v for k, v in manifest["nodes"].items() if v["resource_type"] == "model"}
    order: list[str] = []
    seen: set[str] = set()

    def visit(uid: str) -> None:
        if uid in seen or uid not in models:
            return
        seen.add(uid)
        for dep in models[uid]["depends_on"]["nodes"]:
            visit(dep)
        order.append(uid)

    for uid in sorted(models):
        visit(uid)
    floor_dir = build_dir / "floor"
    shutil.rmtree(floor_dir, ignore_errors=True)
    (floor_dir / "tables").mkdir(parents=True)
    con = duckdb.connect(str(floor_dir / "floor.duckdb"))
    con.execute(f"set threads={cfg.transform.threads}; set TimeZone='UTC'; set preserve_insertion_order=false")
    statements = []
    for uid in order:
        node = models[uid]
        sql = (target / "compiled" / "retrieval" / node["original_file_path"]).read_text()
        name, mat = node["name"], node["config"]["materialized"]
        if mat == "view":
            statements.append(f"create view {name} as {sql}")
        elif mat == "table":
            statements.append(f"create table {name} as {sql}")
        else:  # external: a table, written to parquet, exactly what dbt-duckdb does minus the bookkeeping
            statements.append(f"create table {name} as {sql}")
            statements.append(f"copy {name} to '{floor_dir / 'tables' / (name + '.parquet')}' (format parquet)")
    # compiled SQL refers to "<db>"."main"."<model>": point those at this database's relations
    db_name = manifest["nodes"][order[0]]["database"]
    t0 = time.perf_counter()
    for stmt in statements:
        con.execute(stmt.replace(f'"{db_name}"."main".', ""))
    seconds = time.perf_counter() - t0
    con.close()
    return seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--events", type=int, default=10_000_000)
    ap.add_argument("--users", type=int, default=200_000)
    ap.add_argument("--pins", type=int, default=100_000)
    ap.add_argument("--data-dir", default=str(ROOT / ".data" / "bench"))
    ap.add_argument("--keep-raw", action="store_true", help="reuse raw files of a previous run with the same sizes")
    ap.add_argument("--out", default=str(RESULTS / "data.json"), help="where the figures go (JSON)")
    args = ap.parse_args()

    from training.data.dbt import dbt_args
    from training.data.raw import write_raw
    from training.data.snapshot import raw_dir

    cfg = Config(data_dir=args.data_dir, data=DataConfig(n_users=args.users, n_pins=args.pins, n_events=args.events))
    figures: dict[str, float] = {}

    raw = raw_dir(cfg)
    if not (args.keep_raw and (raw / "events.parquet").exists()):
        from training.data.synthetic import generate

        (tables, _), figures["generate_s"] = timed(generate, cfg.data)
        write_raw(tables, raw)
        del tables

    from training.data import snapshot
    from training.data.contracts import validate_raw

    build_dir = cfg.data_path / "build"
    shutil.rmtree(build_dir, ignore_errors=True)
    reports, figures["contracts_s"] = timed(validate_raw, raw, build_dir, cfg.contracts)
    figures["events"] = reports["events"].accepted
    (build_dir / "tables").mkdir(parents=True, exist_ok=True)

    dbt = str(Path(sys.executable).parent / "dbt")
    env: dict[str, str] = {}   # everything dbt reads comes in --vars (training/data/dbt.py)
    run_cmd([dbt, "parse", *dbt_args("parse", cfg, build_dir)[1:]], env)  # warm the partial-parse cache
    figures["dbt_run_s"] = run_cmd([dbt, *dbt_args("run", cfg, build_dir)], env)
    figures["dbt_test_s"] = run_cmd([dbt, *dbt_args("test", cfg, build_dir)], env)
    figures["duckdb_floor_s"] = plain_duckdb_floor(cfg, build_dir)
    figures["dbt_over_floor"] = figures["dbt_run_s"] / figures["duckdb_floor_s"]

    # make the build live the way the pipeline does, then materialize every view from scratch
    import duckdb

    from training.features.store import definitions, feature_store, materialize_all

    with duckdb.connect(str(build_dir / "warehouse.duckdb"), read_only=True) as con:
        as_of = con.execute("select as_of from int_data_window").fetchone()[0].astimezone(UTC)
    snap_dir = cfg.data_path / "snapshots" / "bench"
    shutil.rmtree(snap_dir, ignore_errors=True)
    shutil.rmtree(build_dir / "floor", ignore_errors=True)
    snap_dir.parent.mkdir(parents=True, exist_ok=True)
    os.rename(build_dir, snap_dir)
    (snap_dir / snapshot.MANIFEST).write_text(json.dumps({"snapshot_id": "bench", "as_of": as_of.isoformat()}))
    snapshot.switch_live(cfg, snapshot.Snapshot(snap_dir, {}))
    rows = {}
    for name in ("user_profile", "user_sequence", "user_features", "pin_profile", "pin_features"):
        rows[name] = duckdb.execute(
            f"select count(distinct {'user_id' if name.startswith('user') else 'pin_id'}) "
            f"from read_parquet('{snap_dir / 'tables' / (name + '.parquet')}')").fetchone()[0]
    store = feature_store(cfg)
    store.apply()
    (cfg.data_path / "feast" / "online_state.json").unlink(missing_ok=True)
    state, figures["materialize_s"] = timed(store.materialize, as_of, "bench")
    entities = sum(rows.values())
    figures["materialized_entities"] = entities
    figures["materialize_entities_per_s"] = entities / figures["materialize_s"]

    # the CLI a user types: one process, every view (includes interpreter start, `import feast`, registry)
    feast = str(Path(sys.executable).parent / "feast")
    repo = _feast_cli_repo(cfg, stock=False)
    end = as_of.replace(tzinfo=None).isoformat()
    figures["feast_cli_materialize_s"] = run_cmd([feast, "-c", str(repo), "materialize", "1970-01-01T00:00:00", end],
                                                 {})
    figures["feast_cli_entities_per_s"] = entities / figures["feast_cli_materialize_s"]
    figures["import_feast_s"] = run_cmd([sys.executable, "-c", "import feast"], {})

    # the floor for the online write: stock Feast (sqlite store, local engine) on the same views, same run
    from feast import FeatureStore

    stock_repo = _feast_cli_repo(cfg, stock=True)
    from feast.repo_config import load_repo_config

    stock = FeatureStore(config=load_repo_config(stock_repo, stock_repo / "feature_store.yaml"))
    stock.apply(definitions(cfg))
    _, figures["stock_feast_materialize_s"] = timed(materialize_all, stock, as_of)
    figures["stock_feast_entities_per_s"] = entities / figures["stock_feast_materialize_s"]
    figures["materialize_speedup_vs_stock"] = figures["stock_feast_materialize_s"] / figures["materialize_s"]
    figures.update({f"rows_{k}": v for k, v in rows.items()})

    doc = write_results(args.out, {"meta": {"events": args.events, "users": args.users, "pins": args.pins},
                                   "figures": figures})
    print(f"\n{'figure':44s} value")
    for k, v in figures.items():
        print(f"{k:44s} {v:,.3f}" if isinstance(v, float) else f"{k:44s} {v:,}")
    print(f"\nwrote {args.out}; rerun: {doc['provenance']['command']}")


def _feast_cli_repo(cfg: Config, stock: bool) -> Path:
    """A feature_store.yaml for the feast CLI on this data dir: the repo's store types, or stock Feast's
    (sqlite online store, default engine) with its own registry and online db."""
    import yaml

    from training.features.store import repo_config

    rc = repo_config(cfg)
    repo = cfg.data_path / ("feast_repo_stock" if stock else "feast_repo")
    repo.mkdir(exist_ok=True)
    raw = yaml.safe_load((ROOT / "feature_store.yaml").read_text())
    if stock:
        raw["registry"] = str(repo / "registry.db")
        raw["online_store"] = {"type": "sqlite", "path": str(repo / "online.db")}
        raw.pop("batch_engine", None)
        for f in repo.glob("*.db"):
            f.unlink()
    else:
        raw["registry"] = str(rc.registry.path if hasattr(rc.registry, "path") else rc.registry)
        raw["online_store"] = {**raw["online_store"], "path": str(rc.online_store.path)}
    (repo / "feature_store.yaml").write_text(yaml.safe_dump(raw))
    return repo


if __name__ == "__main__":
    main()
