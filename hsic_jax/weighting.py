"""Per-channel penalty weights for HSIC Lasso (a weighted Lasso), and weights from what removing a channel saves.

The weighted problem is::

  minimise_beta  1/2 beta' Q beta - q' beta + lam * sum_k w_k |beta_k|     (beta >= 0 in the nonnegative case)

with weights ``w_k > 0``. Substituting ``beta'_k = w_k beta_k`` turns it into the plain problem of
``Q' = D^-1 Q D^-1``, ``q' = D^-1 q`` (``D = diag(w)``, the constant unchanged): the columns of the design are
divided by their weights. :func:`weighted_problem` builds that problem, so every solver path (``solve``,
``select_k``, ``lasso_path``, the global search) solves the weighted one; :func:`unweight_beta` maps a solution
back, ``beta = beta' / w``. Since ``w > 0`` the supports of ``beta'`` and ``beta`` are the same, and so are the
objective values.

APIB's global penalty trades kept dependence for channels; with ``w`` proportional to the cost one channel's
removal saves (:func:`cost_weights`), one ``lam`` trades kept dependence per unit of cost, the target's unit.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Float

from hsic_jax import _checks, _lasso
from hsic_jax._budget import CostFn
from hsic_jax.problem import LassoProblem

__all__ = ["cost_weighted_problems", "cost_weights", "unweight_beta", "weighted_problem"]


def _check_weights(weights: Any, shape: tuple[int, ...], dtype: Any) -> Array:
  w = jnp.asarray(weights, dtype)
  try:
    w = jnp.broadcast_to(w, shape)
  except ValueError as err:
    raise ValueError(f"weights of shape {jnp.shape(weights)} must broadcast against the problem's q of shape "
                     f"{shape}: one weight per channel (c,), or one per channel of every problem of a batch.") from err
  if _checks.is_concrete(w):
    host = np.asarray(w)
    if not np.all(np.isfinite(host)) or np.any(host <= 0):
      raise ValueError(f"weights must be finite and > 0 (one per channel), got {np.asarray(weights).tolist()}.")
  return w


def weighted_problem(problem: LassoProblem, weights: Float[ArrayLike, "*b c"]) -> LassoProblem:
  """The plain HSIC Lasso problem whose solution ``beta'`` gives the weighted problem's ``beta = beta' / w``.

  The weighted problem is ``min 1/2 beta' Q beta - q' beta + lam sum_k w_k |beta_k|`` (``beta >= 0`` when solved
  with ``positive=True``); this returns ``Q'_ij = Q_ij / (w_i w_j)``, ``q'_i = q_i / w_i``, the same constant and
  row count, and the Lipschitz bound of ``Q'``. scikit-learn's ``Lasso(alpha=lam / rows)`` on the design whose
  columns are divided by ``w`` solves the same problem.

  Args:
    problem: one problem, or a stack (padding channels stay zero whatever their weight).
    weights: penalty weights ``> 0``, shape ``(c,)`` (shared by a batch) or the shape of ``problem.lin``.

  Returns:
    The rescaled :class:`~hsic_jax.LassoProblem`, in ``problem``'s dtype.

  >>> import numpy as np, hsic_jax as hj
  >>> parts = (np.eye(2), [1.0, 1.0], 2.0, 1.0, 4.0)  # Q, q, const, Lipschitz bound, rows
  >>> p = hj.LassoProblem(*(np.asarray(a, np.float32) for a in parts))
  >>> w = np.array([1.0, 4.0], np.float32)  # the second channel costs four times as much
  >>> np.asarray(hj.solve(p, 0.5).selected).tolist()  # q = (1, 1): both channels clear lam = 0.5
  [True, True]
  >>> np.asarray(hj.solve(hj.weighted_problem(p, w), 0.5).selected).tolist()  # q'_1 = q_1 / w_1 = 0.25 < lam
  [True, False]
  """
  _lasso.check_problem(problem)
  w = _check_weights(weights, problem.lin.shape, problem.lin.dtype)
  quad = problem.quad / (w[..., :, None] * w[..., None, :])
  return _lasso.make_problem(quad, problem.lin / w, problem.const, problem.rows)


def unweight_beta(beta: Float[ArrayLike, "*b c"], weights: Float[ArrayLike, "*b c"]) -> Float[Array, "*b c"]:
  """The weighted problem's coefficients ``beta = beta' / w`` from the solution ``beta'`` of
  :func:`weighted_problem`'s problem (same support, since ``w > 0``)."""
  beta = jnp.asarray(beta)
  return beta / _check_weights(weights, beta.shape, beta.dtype)


def cost_weights(cost: CostFn, sizes: Sequence[int], *, key: str = "macs") -> list[np.ndarray]:
  """Per-channel weights proportional to what one channel's removal saves, at the dense widths.

  Decision ``d`` (``sizes[d]`` channels) saves ``s_d = cost(sizes)[key] - cost(sizes - e_d)[key]`` per channel
  removed; every one of its channels gets ``w_d = s_d / s̄`` with ``s̄ = sum_d c_d s_d / sum_d c_d``, so the weights
  average 1 over all channels and a penalty keeps the scale it has without weights.

  Args:
    cost: widths per decision -> ``{name: value}`` (as for :func:`hsic_jax.global_lambda_search`).
    sizes: the dense width of every decision (each >= 2, so that one channel can go).
    key: the cost whose savings weigh the channels (``"macs"``, ``"params"``, ...).

  Returns:
    One float64 array ``(sizes[d],)`` per decision.

  Raises:
    ValueError: bad sizes, a missing key, or a decision whose removal saves nothing (a weight must be > 0).

  >>> cost = lambda w: {"macs": 10.0 * w[0] + 30.0 * w[1]}  # a channel of decision 1 costs 3x
  >>> [ws.tolist() for ws in cost_weights(cost, [2, 2])]
  [[0.5, 0.5], [1.5, 1.5]]
  """
  sizes = [int(s) for s in sizes]
  if not sizes or any(s < 2 for s in sizes):
    raise ValueError(f"sizes must be a non-empty sequence of dense widths >= 2, got {sizes!r}")
  dense = cost(list(sizes))
  if key not in dense:
    raise ValueError(f"key {key!r} is not among the costs {sorted(dense)}")
  savings = []
  for d in range(len(sizes)):
    thinner = list(sizes)
    thinner[d] -= 1
    savings.append(float(dense[key]) - float(cost(thinner)[key]))
  savings = np.asarray(savings)
  if not np.all(np.isfinite(savings)) or np.any(savings <= 0):
    bad = [d for d, s in enumerate(savings) if not (np.isfinite(s) and s > 0)]
    raise ValueError(f"removing one channel of decisions {bad} saves no {key} ({savings[bad].tolist()}); expected "
                     "a cost that grows with every width")
  counts = np.asarray(sizes, np.float64)
  mean = float(np.sum(counts * savings) / np.sum(counts))
  return [np.full(c, s / mean) for c, s in zip(sizes, savings)]


def cost_weighted_problems(problems: Sequence[LassoProblem], cost: CostFn, sizes: Sequence[int] | None = None, *,
                           key: str = "macs") -> list[LassoProblem]:
  """Every decision's problem weighted by :func:`cost_weights` (:func:`weighted_problem`), for a search in which
  one penalty trades kept dependence per unit of ``key`` saved.

  Args:
    problems: one unbatched problem per decision.
    cost: widths per decision -> costs.
    sizes: the dense widths (default: each problem's channel count).
    key: the cost that weighs the channels.
  """
  problems = list(problems)
  sizes = [p.num_channels for p in problems] if sizes is None else list(sizes)
  if len(sizes) != len(problems) or any(int(s) != p.num_channels for s, p in zip(sizes, problems)):
    raise ValueError(f"sizes {list(sizes)} must be the problems' channel counts "
                     f"{[p.num_channels for p in problems]}")
  return [weighted_problem(p, w) for p, w in zip(problems, cost_weights(cost, sizes, key=key))]
