"""Config names and the command lines' flag parsing (train.config_lib)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from absl import flags
from ml_collections import config_flags

from train import config_lib


def test_load_by_name_and_by_path(tmp_path: Path):
  cfg = config_lib.load("resnet56_apib")
  assert cfg.model.name == "resnet56" and cfg.select.method == "apib"
  assert config_lib.load(str(config_lib.resolve("resnet56_apib"))).to_dict() == cfg.to_dict()
  own = tmp_path / "mine.py"
  own.write_text("import ml_collections\n\ndef get_config():\n  return ml_collections.ConfigDict({'seed': 7})\n")
  assert config_lib.load(str(own)).seed == 7


def test_load_refuses_unknown_names_and_files_without_get_config(tmp_path: Path):
  with pytest.raises(config_lib.ConfigError, match=r"unknown config 'resnet57_apib'; available configs: .*resnet56"):
    config_lib.load("resnet57_apib")
  with pytest.raises(config_lib.ConfigError, match="does not exist"):
    config_lib.load(str(tmp_path / "nope.py"))
  (tmp_path / "empty.py").write_text("X = 1\n")
  with pytest.raises(config_lib.ConfigError, match=r"has no get_config\(\)"):
    config_lib.load(str(tmp_path / "empty.py"))


def _command():
  fv = flags.FlagValues()
  config = config_flags.DEFINE_config_file("config", None, "config", lock_config=True, flag_values=fv)
  flags.DEFINE_string("checkpoint", None, "checkpoint", flag_values=fv)
  return fv, config


def test_parse_flags_applies_overrides_and_names_the_config():
  fv, config = _command()
  cfg, name = config_lib.parse_flags(["prog", "--config=digits_apib", "--config.select.ratio=0.25"], fv, config)
  assert name == "digits_apib" and cfg.select.ratio == 0.25
  fv, config = _command()
  cfg, name = config_lib.parse_flags(["prog", "--config", "resnet20_apib", "--checkpoint=x"], fv, config,
                                     required={"checkpoint": "a checkpoint"})
  assert name == "resnet20_apib" and cfg.model.name == "resnet20" and fv["checkpoint"].value == "x"


@pytest.mark.parametrize("argv, said", [
    (["prog"], "--config is required; available configs: "),
    (["prog", "--config=no_such_config"], "unknown config 'no_such_config'"),
    (["prog", "--config=digits_apib", "--config.select.ratoo=0.5"], "unknown config key"),
    (["prog", "--config=digits_apib", "--config.select.ratio=half"], "ratio"),
    (["prog", "--config=digits_apib", "--no_such_flag=1"], "no_such_flag"),
    (["prog", "--config=digits_apib"], "--checkpoint is required (a run workdir)"),
])
def test_parse_flags_errors_are_one_line_on_stderr(argv, said, capsys):
  fv, config = _command()
  assert config_lib.parse_flags(argv, fv, config, required={"checkpoint": "a run workdir"}) is None
  out = capsys.readouterr()
  assert out.out == "" and out.err.startswith("error: ") and said in out.err and out.err.count("\n") == 1


@pytest.mark.parametrize("value, want", [("True", True), ("False", False), ("auto", "auto")])
def test_half_precision_parses_as_a_bool_or_auto_on_any_config(value, want):
  for name in ("digits_apib", "resnet50_apib"):  # the field defaults to False and to "auto" respectively
    fv, config = _command()
    cfg, _ = config_lib.parse_flags(["prog", f"--config={name}", f"--config.half_precision={value}"], fv, config)
    assert cfg.half_precision == want and type(cfg.half_precision) is type(want)


def test_factory_kwargs_overrides_add_replace_and_refuse():
  fv = flags.FlagValues()
  config = config_flags.DEFINE_config_file("config", None, flag_values=fv, lock_config=True)
  cfg, _ = config_lib.parse_flags(["prog", "--config=digits_se_resnet", "--config.model.kwargs.width=32",
                                   "--config.model.kwargs.act='relu6'", "--config.model.kwargs.dropout=0.1"],
                                  fv, config)
  assert cfg.model.kwargs.to_dict() == {"width": 32, "blocks_per_stage": 1, "reduction": 4, "act": "relu6",
                                        "dropout": 0.1}
  rest, found = config_lib.split_kwargs(["--config.model.kwargs={\"width\": 8}", "--config.model.kwargs.depth=2",
                                         "--config.seed=1"])
  assert rest == ["--config.seed=1"] and found == [(None, {"width": 8}), ("depth", 2)]
  for bad, match in [("--config.model.kwargs=[1]", "expected a JSON object"),
                     ("--config.model.kwargs={width: 8}", "not a JSON object"),
                     ("--config.model.kwargs.width", "expected --config.model.kwargs.KEY=VALUE")]:
    with pytest.raises(config_lib.ConfigError, match=re.escape(match)):
      config_lib.split_kwargs([bad])
