"""Host-side settings for running hsic_jax on JAX's CPU backend.

On the CPU backend JAX runs its linear-algebra ops (the solver's Cholesky factorisations among them) through
SciPy's LAPACK: in a pip install, an OpenBLAS bundled with SciPy that starts one thread per core. After every call its
idle threads spin for about a tenth of a second before they sleep, and meanwhile they take the cores from XLA's own
threads, which build the next problem. The factorisations the solver runs (at most ``c x c`` for a few hundred
channels) gain little from those threads, so a single thread is faster overall; the spin shows up as a slower build
of the next problem, started right after a large solve. benchmarks/README.md gives the measured figures.
"""

from __future__ import annotations

import pathlib
import warnings

__all__ = [
    "limit_lapack_threads",
]


def _scipy_dirs() -> tuple[pathlib.Path, ...]:
  import scipy  # pylint: disable=import-outside-toplevel
  pkg = pathlib.Path(scipy.__file__).resolve().parent
  return pkg, pkg.parent / "scipy.libs"


def limit_lapack_threads(threads: int = 1) -> dict[str, int]:
  """Caps the threads of the BLAS/LAPACK library that JAX's CPU backend calls; returns each one's previous count.

  Call it once at start-up in a program that solves HSIC Lasso on the CPU backend (the examples and the solver
  benchmark do, on that backend only). On a GPU or TPU the solver's factorisations run on the device and the cap
  buys nothing; it would still cap SciPy's host threads, so those programs leave it out.

  The setting is process-wide and lasts until changed: SciPy's own ``scipy.linalg`` calls run with it too. NumPy's
  bundled OpenBLAS is a separate library and keeps its threads, so NumPy matrix products are not slowed. Where no
  BLAS ships inside SciPy's installation (conda or system packages, where NumPy and SciPy share one library), every
  loaded BLAS is capped, NumPy's included. Libraries that cap threads per calling thread (OpenMP-threaded OpenBLAS,
  MKL) apply the cap to this thread only, not to the XLA threads that run JAX's factorisations: for those, set
  ``OMP_NUM_THREADS`` or ``MKL_NUM_THREADS`` before the program starts instead. A library whose count does not
  change (another Python thread controls it) is reported with a warning and left out of the result.

  Args:
    threads: the number of threads, at least 1.

  Returns:
    ``{library path: previous thread count}`` for every library capped (empty when none could be found). Calling
    again with the previous count undoes the cap.

  Raises:
    ValueError: ``threads`` is not a positive integer.
  """
  if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
    raise ValueError(f"threads must be a positive integer, got {threads!r}")
  # JAX's CPU LAPACK kernels take their function pointers from scipy.linalg.cython_lapack; importing it here makes
  # sure that library is loaded (JAX loads it lazily, at the first linear-algebra op) and so visible below.
  import scipy.linalg.cython_lapack  # pylint: disable=import-outside-toplevel,unused-import
  import threadpoolctl  # pylint: disable=import-outside-toplevel

  blas = [lib for lib in threadpoolctl.ThreadpoolController().lib_controllers if lib.user_api == "blas"]
  dirs = _scipy_dirs()
  inside = [lib for lib in blas if any(pathlib.Path(lib.filepath).resolve().is_relative_to(d) for d in dirs)]
  previous = {}
  for lib in inside or blas:
    before = lib.num_threads
    lib.set_num_threads(threads)
    if lib.num_threads != threads:
      warnings.warn(f"could not cap the threads of {lib.filepath}: it reports {lib.num_threads}, not {threads}",
                    RuntimeWarning, stacklevel=2)
      continue
    previous[lib.filepath] = before
  return previous
