"""Compile time: a new process's first pass over the ResNet-50 selection workload, cold and with a warm cache.

``python -m benchmarks.compile_time [--repeats 3] [--no-readme]``

The workload is the shape of APIB's ResNet-50 selection: 32 decisions (6 with 64 input channels, 8 with 128, 12
with 256, 6 with 512; synthetic post-ReLU-like features, n = 64 samples, 49 values per channel), each one
``hsic_jax.lasso_select(gram_x, gram_y, lam)`` from its Grams, as a user calling the primitive layer by layer does.
A pass is all 32 calls, results read back. Each figure comes from a fresh Python process (``python -c``), since
compilation is per process:

- **cold**: the first pass with no persistent compilation cache (what a first run pays);
- **cache warm**: the first pass of a second process sharing JAX's persistent compilation cache with the first;
- **steady**: the median of ``--repeats`` later passes in the same process (nothing left to compile).

The peer is the steady pass of the same process: the ratios say how many steady passes a first pass costs.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import tempfile
from typing import Any

from benchmarks import _common

NAME = "compile_time"
WIDTHS = [64] * 6 + [128] * 8 + [256] * 12 + [512] * 6
N, D = 64, 49
GOAL_COLD_S = 3.0
GOAL_WARM_RATIO = 3.0

CHILD = r"""
import json, sys, time
import numpy as np
import jax
import hsic_jax as hj
from benchmarks.solver_throughput import synthetic_features
if jax.default_backend() == "cpu":
  hj.limit_lapack_threads()
widths, n, d, repeats = json.loads(sys.argv[1])
layers = []
for i, c in enumerate(widths):
  x, y = synthetic_features(n, c, d, seed=i)
  layers.append((np.asarray(hj.channel_grams(x)), np.asarray(hj.gaussian_gram(y))))
lams = [0.05 * float(hj.lambda_max(hj.problem_from_grams(gx, gy))) for gx, gy in layers]
jax.clear_caches()  # the set-up above compiled builds of these shapes: start the timed pass from nothing

def one_pass():
  t = time.perf_counter()
  kept = [int(np.asarray(hj.lasso_select(gx, gy, lam).selected).sum()) for (gx, gy), lam in zip(layers, lams)]
  return time.perf_counter() - t, kept

first, kept = one_pass()
steady = sorted(one_pass()[0] for _ in range(repeats))[repeats // 2]
print(json.dumps({"first": first, "steady": steady, "kept": kept}))
"""


def child(cache_dir: str, repeats: int) -> dict[str, Any]:
  """One fresh process's first pass and steady pass, with ``cache_dir`` as its persistent cache ("" for none)."""
  env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=cache_dir, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
  env.pop("XLA_FLAGS", None)
  root = pathlib.Path(__file__).resolve().parents[1]
  out = subprocess.run([sys.executable, "-c", CHILD, json.dumps([WIDTHS, N, D, repeats])], cwd=root, env=env,
                       capture_output=True, text=True, check=True, timeout=1800)
  return json.loads(out.stdout.strip().splitlines()[-1])


def run(repeats: int) -> dict[str, Any]:
  no_cache = child("", repeats)
  with tempfile.TemporaryDirectory(prefix="hsic_jax_cache_") as cache:
    filling = child(cache, repeats)
    warm = child(cache, repeats)
  if not (no_cache["kept"] == filling["kept"] == warm["kept"]):
    raise RuntimeError("the three processes kept different channels: " + json.dumps([no_cache, filling, warm]))
  return {"workload": {"widths": WIDTHS, "n": N, "d": D}, "repeats": repeats,
          "cold": no_cache["first"], "cold_filling_cache": filling["first"], "cache_warm": warm["first"],
          "steady": no_cache["steady"], "steady_cache_run": warm["steady"]}


def table(p: dict[str, Any]) -> str:
  steady = p["steady"]
  rows = [["cold (no persistent cache)", _common.fmt(p["cold"]), f"{p['cold'] / steady:.0f}x",
           f"< {GOAL_COLD_S:g} s: " + ("met" if p["cold"] < GOAL_COLD_S else "**not met**")],
          ["cold, filling the cache", _common.fmt(p["cold_filling_cache"]),
           f"{p['cold_filling_cache'] / steady:.0f}x", ""],
          ["new process, cache warm", _common.fmt(p["cache_warm"]), f"{p['cache_warm'] / p['steady_cache_run']:.1f}x",
           f"<= {GOAL_WARM_RATIO:g}x steady: " + ("met" if p["cache_warm"] <= GOAL_WARM_RATIO * p["steady_cache_run"]
                                                  else "**not met**")],
          ["steady (same process)", _common.fmt(steady), "1x", ""]]
  return _common.markdown_table(["first pass of 32 lasso_select calls", "s", "vs steady", "goal"], rows)


def main(argv: list[str] | None = None) -> None:
  parser = _common.parser(__doc__, ("no-readme",))
  parser.add_argument("--repeats", type=int, default=3)
  args = parser.parse_args(argv)
  payload = run(args.repeats)
  print(table(payload))
  path = _common.write_results(NAME, payload)
  print(f"wrote {path}")
  if not args.no_readme:
    m = _common.machine()
    _common.update_readme(NAME, f"Run {m['date']} on {m['cpu_count']} CPU cores ({m['device']}), jax {m['jax']}.\n\n"
                          + table(payload))
    print(f"updated {_common.README}")


if __name__ == "__main__":
  main()
