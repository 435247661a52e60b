"""Solver throughput: HSIC Lasso problems solved per second, at equal objective tolerance, against CPU peers.

``python -m benchmarks.solver_throughput [--quick] [--target 1e-4] [--out DIR] [--no-readme]``

Every solver starts from the same centered Gram matrices (APIB kernels: gamma = 1/d per channel, 1/Q for the
output) and solves the same nonnegative HSIC Lasso at the same ``lam`` (5% of ``lambda_max``):

- **hsic_jax**: build the c x c quadratic forms from the Grams, then solve (float32, jitted; compile time excluded
  and reported separately), with SciPy's LAPACK capped at one thread on the CPU backend as the library advises
  (:func:`hsic_jax.limit_lapack_threads`). Layers of one width are built and solved in one batched call each;
  their Grams are stacked outside the timed region, as the peers' designs are prepared outside it. Its tolerance is
  tightened until the objective is within ``--target`` of the optimum.
- **sklearn Lasso**: coordinate descent on the explicit ``n^2 x c`` design (what the APIB reference code runs),
  ``positive=True, fit_intercept=False``, its ``tol`` tightened the same way. The design is prepared outside the
  timed region, in Fortran order (its favourite layout).
- **sklearn LassoLars(positive=True)**: exact LARS path down to ``lam``.
- **pyHSICLasso nlars**: its nonnegative LARS on the same design, run until it holds as many channels as the optimum
  (it is parameterised by a feature count, not by ``lam``).

The optimum ``F*`` is the best objective reached by a float64 hsic_jax run at tol 1e-12 and by LassoLars.
Reported per workload: seconds, the achieved relative objective gap ``(F - F*) / F*``, and the speed ratio of
hsic_jax over each peer.

Workloads are real calibration features, captured as APIB captures them (consumer-layer inputs per channel, its
pre-BN output as the target; train-mode BatchNorm):

- **ResNet-56** with the pretrained CIFAR-10 weights on real CIFAR-10 images (``../shared``): the conv_b decisions of
  blocks 0 and 8 of each stage (c = 16, 32, 64), at n = 64, 128 and 256 samples, one problem each;
- **ResNet-50 workload**: all 32 APIB decisions (conv2 and conv3 of 16 bottlenecks: 6 layers with 64 input channels,
  8 with 128, 12 with 256, 6 with 512), n = 64 CIFAR-10 images resized to 224 x 224, through a randomly initialised
  ResNet-50 (no ImageNet weights are available offline; the features still come from real images through the real
  architecture). hsic_jax solves the 32 layers as one batched call per width.

``--quick`` (or a missing shared folder) replaces them with small synthetic layers.
"""

from __future__ import annotations

import pathlib
import time
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

import hsic_jax as hj
from benchmarks import _common, plots

LAM_FRACTION = 0.05
QUICK_GRID = [(32, 8), (48, 16)]
SHARED = pathlib.Path(__file__).resolve().parents[2] / "shared"


def synthetic_features(n: int, c: int, d: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
  """Post-ReLU-like features ``(n, c, d)`` mixing shared latent factors, and a conv-like output ``(n, 16 d)``."""
  rng = np.random.default_rng(seed)
  r = max(4, c // 2)
  z = rng.normal(size=(n, r, d))
  mix = rng.normal(size=(c, r)) * (rng.random((c, r)) < 0.2)
  x = np.maximum(np.einsum("cr,nrd->ncd", mix, z) + rng.normal(size=(n, c, d)), 0.0)
  w = rng.normal(size=(16, c)) / np.sqrt(c)
  return x, np.einsum("oc,ncd->nod", w, x).reshape(n, -1)


def _tap_features(tap) -> tuple[np.ndarray, np.ndarray]:
  """A calibration tap -> per-channel inputs ``(n, c, h*w)`` and the flattened output ``(n, -1)``."""
  xin = np.asarray(tap.input, np.float64)
  n, h, w, c = xin.shape
  return xin.reshape(n, h * w, c).transpose(0, 2, 1), np.asarray(tap.output, np.float64).reshape(n, -1)


def real_layers(shared: pathlib.Path) -> list[tuple[str, list["Layer"]]]:
  """The ResNet-56 grid and the ResNet-50 workload (see module docstring)."""
  from flax import nnx  # pylint: disable=import-outside-toplevel
  import models  # pylint: disable=import-outside-toplevel
  from models import cifar10, import_torch  # pylint: disable=import-outside-toplevel
  images, _ = cifar10.load_split(shared / "data" / "cifar10-subset" / "cifar-10-batches-bin")
  images = cifar10.normalize(images[np.random.default_rng(0).permutation(len(images))[:256]])
  r56 = import_torch.import_torch_state("resnet56", import_torch.load_npz(shared / "weights" / "resnet56_cifar10.npz"))
  r56.train()  # APIB captures with batch statistics
  workloads = []
  for n in (64, 128, 256):
    _, taps = r56(jnp.asarray(images[:n]), capture=True)
    for stage in (1, 2, 3):
      for block in (0, 8):
        name = f"stage{stage}/block{block}/conv2"
        x, y = _tap_features(taps[name])
        workloads.append((f"ResNet-56 {name}, n={n}, c={x.shape[1]}", [Layer(x, y)]))
  r50 = models.get_model("resnet50", rngs=nnx.Rngs(0))
  r50.train()
  big = jax.image.resize(jnp.asarray(images[:64]), (64, 224, 224, 3), "bilinear")
  _, taps = r50(big, capture=True)
  decisions = [t for name, t in taps.items() if name.endswith(("conv2", "conv3"))]  # not the extra fc tap
  assert len(decisions) == 32, len(decisions)
  workloads.append(("ResNet-50 workload (32 layers, n=64)", [Layer(*_tap_features(t)) for t in decisions]))
  return workloads


def centered_grams(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Centered float64 APIB Grams ``(c, n, n)`` and ``(n, n)`` of one layer."""
  with jax.enable_x64(True):
    gx = np.asarray(hj.channel_grams(x, bandwidth="apib", centered=True, dtype=jnp.float64))
    gy = np.asarray(hj.gaussian_gram(y, bandwidth="apib", centered=True, dtype=jnp.float64))
  return gx, gy


def objective64(gx: np.ndarray, gy: np.ndarray, beta: np.ndarray, lam: float) -> float:
  r = gy - np.einsum("c,cij->ij", np.asarray(beta, np.float64), gx)
  return float(0.5 * np.sum(r * r) + lam * np.sum(np.abs(beta)))


class Layer:
  """One benchmark problem with everything each solver needs, prepared outside the timed regions."""

  def __init__(self, x: np.ndarray, y: np.ndarray):
    self.n, self.c = x.shape[0], x.shape[1]
    n, c = self.n, self.c
    self.gx, self.gy = centered_grams(x, y)
    self.gx32 = jnp.asarray(self.gx, jnp.float32)
    self.gy32 = jnp.asarray(self.gy, jnp.float32)
    self.design = np.asfortranarray(self.gx.reshape(c, n * n).T)
    self.target = self.gy.ravel()
    with jax.enable_x64(True):
      p64 = hj.problem_from_grams(self.gx, self.gy, dtype=jnp.float64)
      self.lam = LAM_FRACTION * float(hj.lambda_max(p64))
      ref = hj.solve(p64, self.lam, tol=1e-10, max_iter=50_000)
      self.ref_beta = np.asarray(ref.beta)
    self.f_star = min(objective64(self.gx, self.gy, self.ref_beta, self.lam),
                      objective64(self.gx, self.gy, _sklearn_lars(self), self.lam))
    self.support = int(np.sum(self.ref_beta > 0))

  def rel_gap(self, beta: np.ndarray) -> float:
    return (objective64(self.gx, self.gy, beta, self.lam) - self.f_star) / self.f_star


def _group_by_width(layers: list[Layer]) -> list[tuple[list[int], jax.Array, jax.Array, jax.Array]]:
  """Layers of one width, their Grams stacked ``(b, c, n, n)`` / ``(b, n, n)`` (prepared outside the timing, like
  the peers' designs), and their penalties."""
  by_width: dict[tuple[int, int], list[int]] = {}
  for i, layer in enumerate(layers):
    by_width.setdefault((layer.c, layer.n), []).append(i)
  return [(idx, jnp.stack([layers[i].gx32 for i in idx]), jnp.stack([layers[i].gy32 for i in idx]),
           jnp.asarray([layers[i].lam for i in idx], jnp.float32)) for idx in by_width.values()]


def _ours_solve(groups, n_layers: int, tol: float) -> list[np.ndarray]:
  """Builds every layer's quadratic form and solves them: one batched build and one batched solve per width."""
  betas: list[Any] = [None] * n_layers
  # Results are fetched at the end, so that one width's solve runs while the next width's problems are built.
  results = [hj.solve(hj.problem_from_grams(gx, gy), lams, tol=tol, max_iter=50_000) for _, gx, gy, lams in groups]
  for (idx, *_), res in zip(groups, results):
    beta = np.asarray(res.beta)
    for j, i in enumerate(idx):
      betas[i] = beta[j]
  return betas


# Timed calls repeat at least REPEATS times and for at least MIN_SECONDS; the median is reported. On a shared VM a
# 0.3 s call varies by 20% or more from run to run, and a median of three did not settle it.
REPEATS = 5
MIN_SECONDS = 3.0


def run_ours(layers: list[Layer], target: float) -> dict[str, Any]:
  groups = _group_by_width(layers)
  for tol in (1e-4, 1e-5, 1e-6, 1e-7):
    t0 = time.perf_counter()
    betas = _ours_solve(groups, len(layers), tol)  # compiles on the first call
    first = time.perf_counter() - t0
    gap = max(layer.rel_gap(b) for layer, b in zip(layers, betas))
    if gap <= target:
      break
  seconds = _common.time_call(lambda: _ours_solve(groups, len(layers), tol), repeats=REPEATS, min_seconds=MIN_SECONDS)
  return {"seconds": seconds, "rel_gap": gap, "setting": f"tol={tol:g}", "first_call_seconds": first,
          "reached": gap <= target}


def _sklearn_lasso(layer: Layer, tol: float) -> np.ndarray:
  from sklearn.linear_model import Lasso  # pylint: disable=import-outside-toplevel
  model = Lasso(alpha=layer.lam / layer.design.shape[0], positive=True, fit_intercept=False, tol=tol,
                max_iter=100_000, precompute=False)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    model.fit(layer.design, layer.target)
  return model.coef_


def _sklearn_lars(layer: Layer) -> np.ndarray:
  from sklearn.linear_model import LassoLars  # pylint: disable=import-outside-toplevel
  model = LassoLars(alpha=layer.lam / layer.design.shape[0], positive=True, fit_intercept=False, max_iter=5000)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    model.fit(layer.design, layer.target)
  return model.coef_


def _nlars(layer: Layer) -> np.ndarray:
  from pyHSICLasso.nlars import nlars  # pylint: disable=import-outside-toplevel
  xty = layer.design.T @ layer.target[:, None]
  # nlars needs one more candidate than it returns: it cannot be asked for every channel.
  _, beta, *_ = nlars(layer.design, xty, max(1, min(layer.support, layer.c - 1)), 0)
  return np.asarray(beta, np.float64).ravel()


def run_peer(name: str, layers: list[Layer], target: float, slow_cap: float) -> dict[str, Any]:
  """Times one peer over all layers (sequentially, as it would be used), tightening tol for sklearn Lasso."""
  settings: list[Any] = [1e-4, 1e-6, 1e-8, 1e-10] if name == "sklearn_lasso" else [None]
  for tol in settings:
    fn = {"sklearn_lasso": lambda l, t=tol: _sklearn_lasso(l, t), "sklearn_lassolars": _sklearn_lars,
          "pyhsiclasso_nlars": _nlars}[name]
    t0 = time.perf_counter()
    try:
      betas = [fn(layer) for layer in layers]
    except Exception as err:  # noqa: BLE001 - a peer that breaks on real data is reported, not fatal
      return {"seconds": float("nan"), "rel_gap": float("nan"), "setting": "", "reached": False,
              "failed": f"{type(err).__name__}: {err}"[:200]}
    first = time.perf_counter() - t0
    gaps = [layer.rel_gap(b) for layer, b in zip(layers, betas)]
    gap = max(gaps)
    if gap <= target:
      break
  seconds = first if first > slow_cap else _common.time_call(lambda: [fn(layer) for layer in layers],
                                                             repeats=REPEATS, min_seconds=MIN_SECONDS)
  return {"seconds": seconds, "rel_gap": gap, "setting": "" if tol is None else f"tol={tol:g}",
          "reached": gap <= target}


PEERS = ("sklearn_lasso", "sklearn_lassolars", "pyhsiclasso_nlars")


def bench_workload(label: str, layers: list[Layer], target: float, slow_cap: float) -> dict[str, Any]:
  row: dict[str, Any] = {"workload": label, "problems": len(layers), "ours": run_ours(layers, target)}
  for peer in PEERS:
    row[peer] = run_peer(peer, layers, target, slow_cap)
    row[peer]["speedup_of_ours"] = row[peer]["seconds"] / row["ours"]["seconds"]
  return row


def results_table(rows: list[dict[str, Any]]) -> str:
  """The Markdown table of :func:`bench_workload` rows: seconds (``†`` where the tolerance was not reached,
  ``failed`` where the solver raised), speed ratios, and the largest relative objective gaps."""
  headers = ["workload", "hsic_jax s", "sklearn Lasso s", "LassoLars s", "pyHSICLasso nlars s",
             "x vs Lasso", "x vs LassoLars", "x vs nlars", "max rel. gap (ours / Lasso / nlars)"]

  def seconds_cell(res: dict[str, Any]) -> str:
    if "failed" in res:
      return "failed"
    return _common.fmt(res["seconds"]) + ("" if res["reached"] else " †")

  table = []
  for r in rows:
    table.append([r["workload"], seconds_cell(r["ours"]), *(seconds_cell(r[p]) for p in PEERS),
                  *("-" if "failed" in r[p] else f"{r[p]['speedup_of_ours']:.1f}x" for p in PEERS),
                  " / ".join(f"{r[k]['rel_gap']:.1e}" for k in ("ours", "sklearn_lasso", "pyhsiclasso_nlars"))])
  return _common.markdown_table(headers, table)


def main(argv: list[str] | None = None) -> None:
  parser = _common.parser(__doc__, help={"quick": "tiny problems, for a smoke run"})
  parser.add_argument("--target", type=float, default=1e-4, help="relative objective gap every solver must reach")
  parser.add_argument("--shared", type=pathlib.Path, default=SHARED, help="shared data and weights folder")
  parser.add_argument("--slow-cap", type=float, default=5.0, help="peers slower than this (s) are timed once")
  args = parser.parse_args(argv)
  if jax.default_backend() == "cpu":
    # As the library advises for the CPU backend (hsic_jax.runtime). It caps SciPy's bundled BLAS only (NumPy's keeps
    # its threads); the peers' times on synthetic c = 64, 256, 512 layers did not move beyond run-to-run noise with
    # the cap (scikit-learn's Lasso: 5.4 / 5.4 s and 21.5 / 21.0 s at c = 256 / 512, without / with).
    capped = hj.limit_lapack_threads()
    print(f"LAPACK threads capped at 1 for: {', '.join(capped) or 'no library found'}")

  if args.quick or not args.shared.is_dir():
    if not args.quick:
      print(f"shared folder {args.shared} not found: running the synthetic quick workloads")
    workloads = [(f"synthetic n={n}, c={c}", [Layer(*synthetic_features(n, c, 16, n + c))]) for n, c in QUICK_GRID]
    workloads.append(("synthetic batch (4 layers)", [Layer(*synthetic_features(32, c, 16, c)) for c in (8, 8, 16, 16)]))
  else:
    workloads = real_layers(args.shared)
  rows = [bench_workload(label, layers, args.target, args.slow_cap)
          for label, layers in tqdm(workloads, desc="workloads", unit="workload")]

  md = results_table(rows)
  print(md)
  r50row = rows[-1]
  verdict = (f"{r50row['workload']}: hsic_jax {r50row['sklearn_lasso']['speedup_of_ours']:.1f}x the throughput "
             f"of scikit-learn's Lasso, measured in this run (goal on the ResNet-50 workload: 100x).")
  print(verdict)

  payload = {"lam_fraction_of_lambda_max": LAM_FRACTION, "target_rel_gap": args.target,
             "quick": args.quick, "rows": rows}
  if args.out is not None:
    args.out.mkdir(parents=True, exist_ok=True)
    import json  # pylint: disable=import-outside-toplevel
    (args.out / "solver_throughput.json").write_text(json.dumps(payload, indent=2))
  else:
    path = _common.write_results("solver_throughput", payload)
    print(f"wrote {path}")
  if not args.no_readme and not args.quick:
    m = _common.machine()
    _common.update_readme("solver_throughput", (
        f"Measured {m['date']} on {m['device']} ({m['cpu_count']} CPU cores), jax {m['jax']}. Seconds per "
        f"workload (median of at least {REPEATS} runs and {MIN_SECONDS:g} s after compilation; peers slower than "
        f"{args.slow_cap:g} s timed once). A time marked † did not reach the relative objective gap of "
        f"{args.target:g}: pyHSICLasso's nlars is given the optimum's number of channels, "
        f"not lam, and stops at a LARS point with that many, not at the optimum; its gap is in the last column and "
        f"in the JSON, and its ratio is not like-for-like.\n\n"
        + md + "\n\n" + verdict + "\n\n" + plots.readme_link("solver_throughput")))
    plots.solver_throughput(payload, plots.png_path("solver_throughput"))


if __name__ == "__main__":
  main()
