import dataclasses

import pytest
import yaml

from training.cli import build_parser, load_config
from training.config import DEFAULT_YAML, Config, ConfigError, iter_fields


def test_yaml_mirrors_the_dataclass_defaults():
    mirrored = yaml.safe_load(DEFAULT_YAML.read_text())
    defaults = {k: v for k, v in Config().to_dict().items() if k != "data_dir"}
    assert mirrored == defaults


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


def test_unknown_yaml_field_is_named(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("data:\n  n_userz: 3\n")
    with pytest.raises(ConfigError, match=r"data.n_userz: unknown field"):
        Config.load(p)
    with pytest.raises(ConfigError, match="config file not found"):
        Config.load(tmp_path / "missing.yaml")


def test_dbt_vars_cover_the_transform_section():
    names = {f.name for f in dataclasses.fields(Config().transform)} - {"threads"}
    assert set(Config().transform.dbt_vars()) == names
