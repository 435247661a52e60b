"""Config names: ``--config=NAME`` resolves to ``train/configs/NAME.py``; unknown names list the available ones."""

from __future__ import annotations

import re
from pathlib import Path

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
