"""Filling a keep set beyond the Lasso support by the residual of the quadratic form (greedy, with refits).

Why not the nonnegative refit: once a set holds the support of the nonnegative least-squares solution over all
channels (the Lasso at ``lam -> 0``), every superset has the same nonnegative restricted objective, since the KKT
conditions there say ``r_j = (q - Q beta)_j <= 0`` for every other channel: no channel beyond the support lowers the
nonnegative objective, and a nonnegative refit could not tell the fill's candidates apart. Without the sign
constraint it can: the fill minimises the restricted least-squares objective

  ``F(S) = min_{beta: supp(beta) in S} 1/2 beta' Q beta - q' beta``

greedily (orthogonal matching pursuit on the quadratic form). From the start set, each step refits ``beta`` on the
set (least squares, minimum-norm where ``Q_SS`` is singular; on the nonnegative support this is the nonnegative
solution itself, which is positive there), takes the residual correlation ``r = q - Q beta`` (``r_j = <K̄_j, R>``
with ``R = L̄ - sum_i beta_i K̄_i`` the residual target) and adds the channel of largest ``|r_j| / ||K̄_j||``
(``||K̄_j|| = sqrt(Q_jj)``): the normalised correlation, which is the channel whose coefficient alone lowers ``F``
the most, ``r_j^2 / (2 Q_jj)``. Ties go to the larger relevance ``q``. For orthogonal channels (diagonal ``Q``) the
greedy set is the best one.
"""

from __future__ import annotations

import numpy as np


def refit(quad: np.ndarray, lin: np.ndarray, members: np.ndarray) -> np.ndarray:
  """The least-squares ``beta`` supported on ``members`` (float64; zeros elsewhere)."""
  beta = np.zeros(lin.shape, np.float64)
  if members.size:
    sub = quad[np.ix_(members, members)]
    beta[members] = np.linalg.lstsq(sub, lin[members], rcond=None)[0]
  return beta


def restricted_objective(quad: np.ndarray, lin: np.ndarray, members: np.ndarray) -> float:
  """``F(S)`` of the module docstring: ``1/2 beta' Q beta - q' beta`` at the least-squares refit on ``members``."""
  quad, lin = np.asarray(quad, np.float64), np.asarray(lin, np.float64)
  beta = refit(quad, lin, np.asarray(members, np.int64))
  return float(0.5 * beta @ quad @ beta - lin @ beta)


def residual_fill(quad: np.ndarray, lin: np.ndarray, start: np.ndarray, k: int, width: int | None = None
                  ) -> np.ndarray:
  """``start`` (a boolean mask) grown to ``k`` channels among the first ``width`` by the greedy residual rule.

  Args:
    quad, lin: one problem's ``Q`` (c, c) and ``q`` (c,).
    start: the channels kept already (at most ``k``).
    k: the channels to keep.
    width: the true channel count of a zero-padded problem (default: all); padding is never added.

  Returns:
    A boolean mask (c,) with ``k`` True entries, ``start`` among them.
  """
  quad, lin = np.asarray(quad, np.float64), np.asarray(lin, np.float64)
  c = lin.shape[0]
  width = c if width is None else int(width)
  mask = np.asarray(start, bool).copy()
  mask[width:] = False
  norms = np.sqrt(np.maximum(np.diagonal(quad), 0.0))
  while int(mask.sum()) < k:
    r = lin - quad @ refit(quad, lin, np.flatnonzero(mask))
    # A constant channel (K̄_j = 0) explains nothing: last, whatever rounding left in r_j.
    score = np.where(norms > 0, np.abs(r) / np.where(norms > 0, norms, 1.0), -1.0)
    candidates = np.flatnonzero(~mask[:width])
    best = candidates[np.lexsort((-lin[candidates], -score[candidates]))[0]]
    mask[best] = True
  return mask


def residual_masks(quad: np.ndarray, lin: np.ndarray, masks: np.ndarray, k: np.ndarray, widths: np.ndarray
                   ) -> np.ndarray:
  """:func:`residual_fill` of every problem of a batch (any leading axes) whose mask holds fewer than ``k``."""
  quad, lin = np.asarray(quad), np.asarray(lin)
  masks = np.asarray(masks, bool).copy()
  k = np.broadcast_to(np.asarray(k), masks.shape[:-1])
  widths = np.broadcast_to(np.asarray(widths), masks.shape[:-1])
  for idx in np.ndindex(*masks.shape[:-1]):
    if int(masks[idx].sum()) < int(k[idx]):
      masks[idx] = residual_fill(quad[idx], lin[idx], masks[idx], int(k[idx]), int(widths[idx]))
  return masks
