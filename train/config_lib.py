"""Config names: ``--config=NAME`` resolves to ``train/configs/NAME.py``; unknown names list the available ones.

:func:`load` gives a config by name to code (a benchmark, a notebook); :func:`parse_flags` is the command lines'
flag parsing (``train.main``, ``train.evaluate``), with their one-line errors.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import re
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import ml_collections
from absl import flags

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
_NOT_CONFIGS = {"__init__", "base", "_cifar_scratch"}


class ConfigError(ValueError):
  """A config name or override the program cannot use."""


def available() -> list[str]:
  """Names of the experiment configs in ``train/configs/``."""
  return sorted(p.stem for p in CONFIG_DIR.glob("*.py") if p.stem not in _NOT_CONFIGS)


def resolve(name: str) -> Path:
  """The config file of a bare name or a path.

  Raises:
    ConfigError: no such config (the message lists the available names).
  """
  path = Path(name)
  if path.suffix == ".py" or "/" in name:
    if not path.exists():
      raise ConfigError(f"config file {name} does not exist; available configs: {', '.join(available())}")
    return path
  if name not in available():
    raise ConfigError(f"unknown config {name!r}; available configs: {', '.join(available())}")
  return CONFIG_DIR / f"{name}.py"


def load(name: str) -> ml_collections.ConfigDict:
  """The config of a bare name (a file of ``train/configs/``) or a path: its ``get_config()``.

  >>> load("resnet20_apib").model.name
  'resnet20'

  Raises:
    ConfigError: no such config (the message lists the available names), or a file without ``get_config()``.
  """
  path = resolve(name)
  spec = importlib.util.spec_from_file_location(f"train_config_{path.stem}", path)
  if spec is None or spec.loader is None:
    raise ConfigError(f"config {name} ({path}) is not a Python file; expected a .py file with get_config()")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  if not callable(getattr(module, "get_config", None)):
    raise ConfigError(f"config file {path} has no get_config(); expected a function returning a ConfigDict")
  return module.get_config()


def resolve_argv(argv: list[str]) -> tuple[list[str], str]:
  """``argv`` with ``--config=NAME`` (or ``--config NAME``) replaced by the file's path; and the config's name."""
  out, name = list(argv), None
  for i, arg in enumerate(out):
    if arg.startswith("--config="):
      value = arg.split("=", 1)[1]
      out[i] = f"--config={resolve(value)}"
      name = Path(value).stem
    elif arg == "--config" and i + 1 < len(out):
      name = Path(out[i + 1]).stem
      out[i + 1] = str(resolve(out[i + 1]))
  if name is None:
    raise ConfigError(f"--config is required; available configs: {', '.join(available())}")
  return out, name


def explain(err: BaseException) -> str:
  """A one-line message for a flag-parsing error (unknown override keys come as AttributeError/KeyError)."""
  text = str(err).strip("'\"").replace("\\n", " ").replace("\\'", "'").replace("\n", " ")
  if isinstance(err, (AttributeError, KeyError)):
    key = re.search(r"'([^']+)'", text)
    return f"unknown config key {key.group(1) if key else text!r} in an override ({text})"
  return text


_KWARGS = "--config.model.kwargs"


def _literal(text: str) -> Any:
  """A command-line value: a Python literal (``16``, ``0.5``, ``True``, ``(3, 3)``, ``'relu'``), else the text."""
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text


def split_kwargs(argv: Sequence[str]) -> tuple[list[str], list[tuple[str | None, Any]]]:
  """``argv`` without the factory-argument overrides, and those overrides in order: ``--config.model.kwargs=JSON``
  (a JSON object replacing every kwarg: ``'{"width": 32}'``, ``'{}'``) gives ``(None, dict)``;
  ``--config.model.kwargs.KEY=VALUE`` gives ``(KEY, value)``. A factory's keyword arguments are the user's, not the
  config's, so a key the config does not hold yet is accepted (the factory's signature checks it).

  Raises:
    ConfigError: a ``--config.model.kwargs=`` value that is not a JSON object, or an override without ``=``.
  """
  rest, found = [], []
  for arg in argv:
    if arg.startswith(_KWARGS + "=") or arg.startswith(_KWARGS + "."):
      key, sep, value = arg[len(_KWARGS):].partition("=")
      if not sep:
        raise ConfigError(f"{arg}: expected {_KWARGS}.KEY=VALUE or {_KWARGS}='{{\"key\": value}}'")
      if not key:
        try:
          obj = json.loads(value)
        except json.JSONDecodeError as e:
          raise ConfigError(f"{_KWARGS}={value}: not a JSON object ({e})") from e
        if not isinstance(obj, dict):
          raise ConfigError(f"{_KWARGS}={value}: expected a JSON object like '{{\"width\": 32}}'")
        found.append((None, obj))
      else:
        found.append((key[1:], _literal(value)))
    else:
      rest.append(arg)
  return rest, found


def apply_kwargs(config: ml_collections.ConfigDict, overrides: Sequence[tuple[str | None, Any]]) -> None:
  """Applies :func:`split_kwargs`' overrides to ``config.model.kwargs``, in order."""
  with config.unlocked():  # the config flag locks the config; a factory's kwargs are open
    for key, value in overrides:
      if key is None:
        config.model.kwargs = ml_collections.ConfigDict(value)
      else:
        config.model.kwargs[key] = value


def parse_flags(argv: Sequence[str], flag_values: flags.FlagValues, config: flags.FlagHolder, *,
                required: Mapping[str, str] | None = None) -> tuple[ml_collections.ConfigDict, str] | None:
  """Parses a command line whose ``--config`` is a config name or path (:func:`resolve_argv`) into ``flag_values``.

  Args:
    argv: the command line, program name first.
    flag_values: the command's own flags (``config`` among them).
    config: the holder of the ``--config`` flag (``config_flags.DEFINE_config_file``).
    required: flags that must be given, name -> what the flag is (said in the error).

  Returns:
    ``(config, name)``: the config with its overrides applied and its name; ``None`` after printing a one-line
    ``error: ...`` to stderr for an unknown config, key or flag, a bad value or a missing required flag (the command
    then exits with status 2).
  """
  saved = sys.argv
  try:
    argv, name = resolve_argv(list(argv))
    argv, kwargs = split_kwargs(argv)
    # ml_collections finds the --config.a.b overrides in sys.argv, whatever list the flags are parsed from.
    sys.argv = argv
    flag_values(argv)
    for flag, what in (required or {}).items():
      if not flag_values[flag].value:
        raise ConfigError(f"--{flag} is required ({what})")
    apply_kwargs(config.value, kwargs)
    return config.value, name
  except (ConfigError, flags.Error, AttributeError, KeyError, TypeError, ValueError) as err:
    print(f"error: {explain(err)}", file=sys.stderr)
    return None
  finally:
    sys.argv = saved
