"""Shared plumbing for the benchmark programs: their common flags, timing, machine description, JSON results and
README tables."""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import platform
import re
import statistics
import textwrap
import time
from typing import Any, Callable, Mapping, Sequence

import jax

ROOT = pathlib.Path(__file__).resolve().parent
RESULTS = ROOT / "results"
README = ROOT / "README.md"


GOALS_SECTION = "## Where the goals stand"  # new benchmark sections go before it

FLAGS: dict[str, dict[str, Any]] = {
    "quick": {"action": "store_true", "help": "a small, CI-sized run"},
    "out": {"type": pathlib.Path, "default": None, "help": "results folder (default benchmarks/results)"},
    "no-readme": {"action": "store_true", "help": "do not update benchmarks/README.md"},
    "render": {"action": "store_true",
               "help": "rewrite the README block and the plots from the saved results, running nothing"},
}
"""The flags every benchmark means the same by: name -> ``argparse.add_argument`` keywords."""


def parser(doc: str, flags: Sequence[str] = ("quick", "out", "no-readme"), *, prog: str | None = None,
           help: Mapping[str, str] | None = None) -> argparse.ArgumentParser:  # pylint: disable=redefined-builtin
  """A benchmark's argument parser, described by the first line of its docstring ``doc``, holding the shared
  flags named in ``flags`` (of :data:`FLAGS`, in that order); ``help`` rewords a flag's help for this benchmark
  (e.g. what its ``--quick`` run is). The benchmark adds its own flags to it.

  Raises:
    ValueError: a name in ``flags`` or ``help`` that is not one of :data:`FLAGS`.
  """
  help = dict(help or {})
  unknown = sorted((set(flags) | set(help)) - set(FLAGS))
  if unknown:
    raise ValueError(f"flags {unknown} are not shared benchmark flags; expected names of {sorted(FLAGS)}")
  out = argparse.ArgumentParser(prog=prog, description=doc.strip().splitlines()[0])
  for name in flags:
    out.add_argument(f"--{name}", **{**FLAGS[name], **({"help": help[name]} if name in help else {})})
  return out


def time_call(fn: Callable[[], Any], *, repeats: int = 3, min_seconds: float = 0.0) -> float:
  """Median wall-clock seconds of ``fn()`` (which must block until its work is done) over ``repeats`` runs."""
  times = []
  start = time.perf_counter()
  while len(times) < repeats or (time.perf_counter() - start < min_seconds and len(times) < 50):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def machine() -> dict[str, Any]:
  dev = jax.devices()[0]
  return {
      "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      "platform": platform.platform(),
      "python": platform.python_version(),
      "cpu_count": os.cpu_count(),
      "jax": jax.__version__,
      "jax_backend": jax.default_backend(),
      "device": f"{dev.platform}:{getattr(dev, 'device_kind', '')}",
  }


def write_results(name: str, payload: dict[str, Any], out: pathlib.Path | None = None) -> pathlib.Path:
  """Writes ``{"benchmark": name, "machine": ..., **payload}`` to ``<out>/<name>.json`` (default
  benchmarks/results) and returns the path."""
  folder = RESULTS if out is None else pathlib.Path(out)
  folder.mkdir(parents=True, exist_ok=True)
  path = folder / f"{name}.json"
  path.write_text(json.dumps({"benchmark": name, "machine": machine(), **payload}, indent=2))
  return path


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
  out = ["| " + " | ".join(headers) + " |", "|" + "|".join("---:" for _ in headers) + "|"]
  out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
  return "\n".join(out)


def update_readme(name: str, text: str) -> None:
  """Replaces the block between ``<!-- BEGIN name -->`` and ``<!-- END name -->`` in benchmarks/README.md."""
  begin, end = f"<!-- BEGIN {name} -->", f"<!-- END {name} -->"
  block = f"{begin}\n{text.strip()}\n{end}"
  current = README.read_text() if README.exists() else "# Benchmarks\n"
  if begin in current and end in current:
    current = re.sub(re.escape(begin) + r".*?" + re.escape(end), lambda _: block, current, flags=re.S)
  else:
    current = current.rstrip() + "\n\n" + block + "\n"
  README.write_text(current)



def ensure_section(name: str, heading: str, paragraph: str) -> None:
  """Adds the README section ``heading`` (with ``paragraph`` wrapped and an empty block ``name`` that
  :func:`update_readme` fills) before the goals section, once."""
  text = README.read_text() if README.exists() else "# Benchmarks\n"
  if f"<!-- BEGIN {name} -->" in text:
    return
  paragraph = textwrap.fill(paragraph, width=116, break_long_words=False, break_on_hyphens=False)
  section = f"{heading}\n\n{paragraph}\n\n<!-- BEGIN {name} -->\n<!-- END {name} -->\n\n"
  at = text.find(GOALS_SECTION)
  text = text[:at] + section + text[at:] if at >= 0 else text.rstrip() + "\n\n" + section
  README.write_text(text)

def fmt(x: float, digits: int = 3) -> str:
  if x == 0 or x != x:
    return str(x)
  return f"{x:.{digits}g}"
