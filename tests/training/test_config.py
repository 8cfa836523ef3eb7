import dataclasses

import pytest
import yaml

from training.cli import build_parser
from training.config import CONFIG_ENV, REPO_ROOT, Config, ConfigError, config_from_args, iter_fields

load_config = config_from_args


def test_yaml_files_hold_overrides_only(tmp_path, monkeypatch):
    p = tmp_path / "c.yaml"
    p.write_text("train:\n  lr: 0.5\ntransform:\n  engagement_weights: {closeup: 1, click: 1, save: 3, hide: 0}\n")
    cfg = Config.load(p)
    assert cfg.train.lr == 0.5 and cfg.transform.engagement_weights["save"] == 3.0
    assert cfg.train.epochs == Config().train.epochs   # everything else: the dataclass defaults
    monkeypatch.setenv(CONFIG_ENV, str(p))
    assert Config.load().train.lr == 0.5   # the service's way: RETRIEVAL_CONFIG
    args = build_parser().parse_args(["build", "--transform.engagement_weights",
                                      "{closeup: 2, click: 2, save: 2, hide: 0}"])
    assert load_config(args).transform.engagement_weights == {"closeup": 2.0, "click": 2.0, "save": 2.0, "hide": 0.0}
    with pytest.raises(ConfigError, match="transform.engagement_weights"):
        Config.load(overrides={"transform.engagement_weights": {"save": 1}})


def test_dbt_project_defaults_equal_the_typed_config():
    """A plain `dbt build` uses dbt_project.yml's vars; `retrieval build` passes the config's: they must agree."""
    project = yaml.safe_load((REPO_ROOT / "dbt_project" / "dbt_project.yml").read_text())
    assert project["vars"] == Config().transform.dbt_vars()


def test_every_field_has_a_docstring_and_a_cli_flag():
    parser = build_parser()
    sub = parser._subparsers._group_actions[0].choices["build"]  # noqa: SLF001 - argparse has no public API for this
    flags = {opt for action in sub._actions for opt in action.option_strings}  # noqa: SLF001
    for name, _type, _default, doc in iter_fields():
        assert doc, f"config field {name} has no docstring"
        assert f"--{name}" in flags


def test_cli_overrides_are_typed_and_validated(tmp_path):
    args = build_parser().parse_args(["build", "--data.seed", "11", "--transform.half_life_days", "3.5",
                                      "--data_dir", str(tmp_path)])
    cfg = load_config(args)
    assert cfg.data.seed == 11 and cfg.transform.half_life_days == 3.5 and cfg.data_path == tmp_path
    with pytest.raises(ConfigError, match="data.seed: expected int"):
        load_config(build_parser().parse_args(["build", "--data.seed", "x"]))
    with pytest.raises(ConfigError, match="transform.half_life_days"):
        load_config(build_parser().parse_args(["build", "--transform.half_life_days", "-1"]))
    with pytest.raises(ConfigError, match="train.blend_table: must be one of training, refit, got 'newest'"):
        load_config(build_parser().parse_args(["build", "--train.blend_table", "newest"]))
    with pytest.raises(ConfigError, match="train.blend_validation: must be one of horizon, adjacent, got 'test'"):
        load_config(build_parser().parse_args(["build", "--train.blend_validation", "test"]))
    with pytest.raises(ConfigError, match="train.index_refresh_days: must be > 0, got 0"):
        load_config(build_parser().parse_args(["build", "--train.index_refresh_days", "0"]))


def test_unknown_yaml_field_is_named(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("data:\n  n_userz: 3\n")
    with pytest.raises(ConfigError, match=r"data.n_userz: unknown field"):
        Config.load(p)
    with pytest.raises(ConfigError, match="config file not found"):
        Config.load(tmp_path / "missing.yaml")


def test_dbt_vars_are_the_marked_transform_fields():
    marked = {f.name for f in dataclasses.fields(Config().transform) if f.metadata.get("dbt_var")}
    assert set(Config().transform.dbt_vars()) == marked and {"threads", "keep_snapshots"}.isdisjoint(marked)


def test_data_until_is_a_date_or_empty():
    assert Config().data.until == "" and Config().data.until_utc is None
    cfg = load_config(build_parser().parse_args(["build", "--data.until", "2026-10-01"]))
    assert cfg.data.until_utc.isoformat() == "2026-10-01T00:00:00+00:00"
    assert Config.load(overrides={"data.until": "2026-10-01T02:00:00+02:00"}).data.until_utc == cfg.data.until_utc
    with pytest.raises(ConfigError, match="data.until: not an ISO date"):
        Config.load(overrides={"data.until": "next week"})
    with pytest.raises(ConfigError, match="data.until: must be a date"):
        Config.load(overrides={"data.until": "2026-10-01T12:00:00"})
