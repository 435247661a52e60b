"""Gram + quadratic-form throughput: GFLOP/s of building HSIC Lasso's inputs, against this machine's matmul peak.

``python -m benchmarks.gram_throughput [--quick] [--out DIR] [--no-readme]``

For one layer with features ``x`` of shape ``(n, c, d)`` and an output ``y`` of shape ``(n, q)``,
:func:`hsic_jax.problem_from_features` computes every channel's Gaussian Gram, centers it, and accumulates
``Q = [<K̄_i, K̄_j>]`` and ``q = [<K̄_i, L̄>]``. Centered Grams are symmetric, so the library multiplies only their
packed upper triangles (``n(n+1)/2`` entries). The work is counted as the products it needs:

  ``2 c n^2 d`` (distances) + ``2 n^2 q`` (output Gram) + ``c^2 n (n+1)`` (Q) + ``c n (n+1)`` (q)  FLOPs,

and divided by the measured time (column "GFLOP/s"). The "dense-count" column divides the count of full
``n^2``-long products (``2 c^2 n^2 + 2 c n^2`` for Q and q) instead: a speed figure, not a hardware-efficiency one.
Two references are measured in the same run:

- **peak**: a jitted float32 square matmul at full float32 precision, as the library's products ask for (the best
  this machine's XLA backend does on dense products; 2048^2 on a CPU, 8192^2 on an accelerator);
- **numpy64**: the reference code's way, in NumPy float64: per channel ``K``, then ``K̄ = H @ K @ H`` with an explicit
  centering matrix, stacked into the ``n^2 x c`` design, then ``A' A`` and ``A' b``. Its GFLOP/s use the same
  useful-FLOP count (its extra ``H`` products are waste, not work).

Goal: hsic_jax at >= 50% of the matmul peak. Shapes include the streaming case (all Grams larger than the memory
budget), where kernels are computed tile by tile from the features.
"""

from __future__ import annotations

import json
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

import hsic_jax as hj
from benchmarks import _common, plots

# (n, c, d, label)
SHAPES = [
    (128, 64, 1024, "VGG-16 conv2 (n=128, c=64, 32x32)"),
    (128, 256, 64, "VGG-16 conv6 (n=128, c=256, 8x8)"),
    (64, 512, 49, "ResNet-50 stage 4 (n=64, c=512, 7x7)"),
    (256, 512, 64, "n=256, c=512, 8x8"),
    (1024, 128, 16, "n=1024, c=128, 4x4 (streamed)"),
]
QUICK_SHAPES = [(32, 8, 16, "tiny"), (64, 16, 16, "small")]
# Timed calls repeat at least REPEATS times and for at least MIN_SECONDS (a median of 3 moved by 10-20% between
# runs on a shared 2-core VM).
REPEATS = 5
MIN_SECONDS = 2.0


def useful_flops(n: int, c: int, d: int, q: int) -> float:
  """The products the library performs (each kernel counted once, Q and q over packed triangles)."""
  return 2.0 * c * n * n * d + 2.0 * n * n * q + c * c * n * (n + 1) + c * n * (n + 1)


def dense_count_flops(n: int, c: int, d: int, q: int) -> float:
  return 2.0 * c * n * n * d + 2.0 * n * n * q + 2.0 * c * c * n * n + 2.0 * c * n * n


def peak_size(backend: str) -> int:
  """Side of the square matmul that measures the peak: 2048 is past the knee on a CPU; an accelerator needs more
  work per call to leave its launch overhead behind."""
  return 2048 if backend == "cpu" else 8192


def peak_matmul(a: jax.Array, b: jax.Array) -> jax.Array:
  """The reference product, at the precision the library asks for in every Gram and ``Q`` product (full float32).

  The backend default would be a different operation on accelerators (TF32 on recent GPUs, bfloat16 passes on
  TPUs), several times faster than full float32: a peak taken that way would not be the peak of the work measured.
  """
  return jnp.matmul(a, b, precision=jax.lax.Precision.HIGHEST)


def matmul_peak(size: int, *, dtype=jnp.float32) -> float:
  """GFLOP/s of a jitted ``size x size`` matmul on the default device: float32 at full float32 precision (the
  library's products), or bfloat16 at the backend's default (the peak of bfloat16 convolutions, for comparison)."""
  a = jax.random.normal(jax.random.key(0), (size, size), dtype)
  b = jax.random.normal(jax.random.key(1), (size, size), dtype)
  f = jax.jit(peak_matmul if jnp.dtype(dtype) == jnp.float32 else jnp.matmul)
  jax.block_until_ready(f(a, b))
  secs = _common.time_call(lambda: jax.block_until_ready(f(a, b)), repeats=5, min_seconds=1.0)
  return 2.0 * size**3 / secs / 1e9


def numpy64_problem(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """The reference code's construction: explicit H, per-channel H K H, the n^2 x c design, A'A and A'b."""
  n, c, d = x.shape
  h = np.eye(n) - np.ones((n, n)) / n

  def gauss(f):
    sq = np.sum(f * f, 1)
    d2 = np.maximum(sq[:, None] + sq[None, :] - 2.0 * f @ f.T, 0.0)
    return np.exp(-d2 / f.shape[1])

  design = np.empty((n * n, c))
  for k in range(c):
    design[:, k] = (h @ gauss(x[:, k]) @ h).ravel()
  target = (h @ gauss(y) @ h).ravel()
  return design.T @ design, design.T @ target


def bench_shape(n: int, c: int, d: int, label: str, peak: float, numpy_cap: float,
                min_seconds: float = MIN_SECONDS) -> dict[str, Any]:
  rng = np.random.default_rng(n + c + d)
  x = np.maximum(rng.normal(size=(n, c, d)), 0.0).astype(np.float32)
  q = 64
  y = rng.normal(size=(n, q)).astype(np.float32)
  xj, yj = jnp.asarray(x), jnp.asarray(y)
  jax.block_until_ready(hj.problem_from_features(xj, yj))  # compile
  ours = _common.time_call(lambda: jax.block_until_ready(hj.problem_from_features(xj, yj)), repeats=REPEATS,
                           min_seconds=min_seconds)
  flops = useful_flops(n, c, d, q)
  row = {"label": label, "n": n, "c": c, "d": d, "q": q, "gflop": flops / 1e9, "ours_seconds": ours,
         "ours_gflops": flops / ours / 1e9, "fraction_of_peak": flops / ours / 1e9 / peak,
         "dense_count_gflops": dense_count_flops(n, c, d, q) / ours / 1e9}
  # The NumPy reference: timed once when slow (it is the slow side of the ratio).
  est = 4.0 * c * n**3 / 20e9 + flops / 20e9
  if est < numpy_cap:
    x64, y64 = x.astype(np.float64), y.astype(np.float64)
    t = _common.time_call(lambda: numpy64_problem(x64, y64), repeats=1)
    quad_np, _ = numpy64_problem(x64[:, : min(c, 8)], y64) if c > 8 else numpy64_problem(x64, y64)
    with jax.enable_x64(True):
      quad_ref = np.asarray(hj.problem_from_features(x64[:, : min(c, 8)], y64, dtype=jnp.float64).quad)
    row.update({"numpy64_seconds": t, "numpy64_gflops": flops / t / 1e9, "speedup_vs_numpy64": t / ours,
                "q_matches_numpy64": bool(np.allclose(quad_np, quad_ref, rtol=1e-8, atol=1e-8))})
  return row


def main(argv: list[str] | None = None) -> None:
  parser = _common.parser(__doc__, help={"quick": "small shapes (a smoke run)"})
  parser.add_argument("--numpy-cap", type=float, default=120.0, help="skip the NumPy reference above this estimate (s)")
  args = parser.parse_args(argv)

  size = 512 if args.quick else peak_size(jax.default_backend())
  peak = matmul_peak(size)
  shapes = QUICK_SHAPES if args.quick else SHAPES
  rows = [bench_shape(*s, peak=peak, numpy_cap=args.numpy_cap, min_seconds=0.0 if args.quick else MIN_SECONDS)
          for s in tqdm(shapes, desc="shapes", unit="shape")]
  headers = ["layer", "GFLOP", "hsic_jax s", "hsic_jax GFLOP/s", "% of matmul peak", "dense-count GFLOP/s",
             "NumPy f64 (H K H) s", "speedup vs NumPy"]
  table = [[r["label"], _common.fmt(r["gflop"]), _common.fmt(r["ours_seconds"]), _common.fmt(r["ours_gflops"]),
            f"{100 * r['fraction_of_peak']:.0f}%", _common.fmt(r["dense_count_gflops"]),
            _common.fmt(r.get("numpy64_seconds", float("nan"))),
            f"{r['speedup_vs_numpy64']:.1f}x" if "speedup_vs_numpy64" in r else "skipped"] for r in rows]
  md = _common.markdown_table(headers, table)
  summary = f"Matmul peak (jitted float32 {size}^2 matmul at full float32 precision, same run): {peak:.1f} GFLOP/s."
  print(md)
  print(summary)
  payload = {"matmul_peak_gflops": peak, "quick": args.quick, "rows": rows}
  if args.out is not None:
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gram_throughput.json").write_text(json.dumps(payload, indent=2))
  else:
    print(f"wrote {_common.write_results('gram_throughput', payload)}")
  if not args.no_readme and not args.quick:
    m = _common.machine()
    _common.update_readme("gram_throughput", (
        f"Measured {m['date']} on {m['device']} ({m['cpu_count']} CPU cores), jax {m['jax']}; median of at least "
        f"{REPEATS} runs and {MIN_SECONDS:g} s after compilation. {summary}\n\n" + md + "\n\n"
        + plots.readme_link("gram_throughput")))
    plots.gram_throughput(payload, plots.png_path("gram_throughput"))


if __name__ == "__main__":
  main()
