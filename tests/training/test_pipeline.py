"""Bad input end to end: clear errors, and a failed build never replaces the live snapshot."""

from __future__ import annotations

import pandas as pd
import pytest

from tests.training.data.test_contracts import tiny_raw
from training.cli import main
from training.config import Config
from training.data.contracts import ContractError
from training.data.raw import write_raw
from training.data.snapshot import load_live, raw_dir
from training.pipeline import build

pytestmark = pytest.mark.slow


def test_a_failed_build_leaves_the_live_snapshot_serving(tmp_path):
    cfg = Config(data_dir=str(tmp_path))
    write_raw(tiny_raw(400), raw_dir(cfg))
    first = build(cfg)
    live = load_live(cfg)
    assert live.id == first["snapshot_id"]

    # malformed raw file: most event types are unknown -> the contract stops the build
    events = tiny_raw(400).events
    events.loc[:200, "event_type"] = "like"
    events.to_parquet(raw_dir(cfg) / "events.parquet")
    with pytest.raises(ContractError, match="events.parquet"):
        build(cfg)
    assert load_live(cfg).path == live.path and (cfg.data_path / "build").exists()

    # a valid file with nothing to learn from: dbt succeeds but the output check refuses it
    events = tiny_raw(400).events.assign(event_type="impression")
    events.to_parquet(raw_dir(cfg) / "events.parquet")
    with pytest.raises(RuntimeError, match="dbt produced an empty .* table"):
        build(cfg)
    assert load_live(cfg).path == live.path
    assert pd.read_parquet(load_live(cfg).table("fct_engagements")).shape[0] > 0

    # the next good build cleans the leftovers and goes live
    write_raw(tiny_raw(400), raw_dir(cfg))
    build(cfg)
    assert not (cfg.data_path / "build").exists() and load_live(cfg).path != live.path


def test_cli_errors_name_what_is_wrong(tmp_path, capsys):
    missing = tmp_path / "no-such-dir"
    assert main(["ingest", "--data.movielens_path", str(missing), "--data_dir", str(tmp_path)]) == 2
    assert str(missing) in capsys.readouterr().err
    assert main(["build", "--data_dir", str(tmp_path / "empty")]) == 2
    assert "raw input not found" in capsys.readouterr().err
    assert main(["training-set", "--data_dir", str(tmp_path / "empty")]) == 2
    assert "no live data snapshot" in capsys.readouterr().err
    assert main(["build", "--data.n_users", "-3"]) == 2
    assert "data.n_users" in capsys.readouterr().err
