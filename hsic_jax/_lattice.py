"""The integer side of :func:`hsic_jax.allocate_widths`: every layer's allowed widths and the fitted budgets, with
the moves of its search (round down, repair, greedy fill, local search). A module of its own: the allocation reads
as its steps without these 160 lines of lattice bookkeeping."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
  from hsic_jax.allocation import QuadraticCost


class Lattice:
  """The allowed widths of every layer and the fitted budgets, for the integer search."""

  def __init__(self, a: np.ndarray, base: np.ndarray, lo: np.ndarray, multiple: int,
               costs: Sequence[QuadraticCost], budgets: np.ndarray):
    self.a, self.base, self.lo = a, base.astype(np.float64), lo
    self.values = []
    for c, low in zip(base.tolist(), lo.tolist()):
      # ``low`` is a multiple of ``multiple`` unless it is ``c`` itself (round_width caps at the size).
      v = list(range(low, c + 1, multiple)) if low < c else []
      self.values.append(np.unique(np.array(v + [c], np.int64)))
    # Padded (l, L) table of the lattices (each row repeats its last value), for vectorised step look-ups.
    self.length = np.array([len(v) for v in self.values])
    self.table = np.stack([np.pad(v, (0, int(self.length.max()) - len(v)), mode="edge") for v in self.values])
    self.rows = np.arange(len(self.values))
    self.costs = list(costs)
    self.budgets = budgets
    self.slack_tol = 1e-9 * np.maximum(np.abs(budgets), 1.0)
    self.weight = a / self.base  # objective per unit of width

  def objective(self, w: np.ndarray) -> float:
    return float(self.weight @ w)

  def cost(self, w: np.ndarray) -> np.ndarray:
    return np.array([q(w) for q in self.costs])

  def feasible(self, w: np.ndarray) -> bool:
    return bool(np.all(self.cost(w) <= self.budgets + self.slack_tol))

  def floor(self, w: np.ndarray) -> np.ndarray:
    """Each width down to the largest allowed value <= it (the smallest allowed value where none is)."""
    pos = np.sum(self.table <= np.asarray(w, np.float64)[:, None] + 1e-9, axis=1) - 1
    pos = np.clip(np.minimum(pos, self.length - 1), 0, None)
    return self.table[self.rows, pos]

  def nearest(self, w: np.ndarray) -> np.ndarray:
    """Each width to its nearest allowed value (ties to the lower one)."""
    d = np.abs(self.table - np.asarray(w, np.float64)[:, None])
    d = np.where(np.arange(self.table.shape[1])[None, :] < self.length[:, None], d, np.inf)
    return self.table[self.rows, np.argmin(d + 1e-9 * np.arange(self.table.shape[1])[None, :], axis=1)]

  def _pos(self, w: np.ndarray) -> np.ndarray:
    return np.minimum(np.sum(self.table < w[:, None], axis=1), self.length - 1)

  def up_steps(self, w: np.ndarray, s: int) -> np.ndarray:
    """Per layer, the change of ``s`` steps up its lattice (0 where it has fewer than ``s`` above)."""
    pos = self._pos(w) + s
    ok = pos < self.length
    return np.where(ok, self.table[self.rows, np.minimum(pos, self.length - 1)] - w, 0).astype(np.float64)

  def steps(self, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per layer, the change of one step up and one step down on its lattice (0 where there is none)."""
    pos = self._pos(w)
    up = np.where(pos + 1 < self.length, self.table[self.rows, np.minimum(pos + 1, self.length - 1)] - w, 0)
    down = np.where(pos > 0, self.table[self.rows, np.maximum(pos - 1, 0)] - w, 0)
    return up.astype(np.float64), down.astype(np.float64)

  def deltas(self, w: np.ndarray, d: np.ndarray) -> np.ndarray:
    """(keys, l): the change of every cost when layer i alone changes by ``d_i``."""
    wf = w.astype(np.float64)
    return np.stack([d * q.gradient(wf) + q.square * d * d for q in self.costs])

  def repair(self, w: np.ndarray) -> np.ndarray | None:
    """Steps layers down, cheapest objective loss per unit of overshoot removed first, until every budget holds."""
    w = w.copy()
    for _ in range(int(sum(len(v) for v in self.values))):
      over = self.cost(w) - self.budgets
      if np.all(over <= self.slack_tol):
        return w
      _, down = self.steps(w)
      can = down < 0
      if not np.any(can):
        return None
      gain = -self.deltas(w, down)  # cost removed, per key
      norm = self.budgets[:, None]
      relief = np.sum(np.clip(gain, 0, None) / norm * (over[:, None] > 0), axis=0)
      loss = -self.weight * down
      score = np.where(can & (relief > 0), loss / np.maximum(relief, 1e-300), np.inf)
      if not np.isfinite(score).any():
        return None
      i = int(np.argmin(score))
      w[i] += int(down[i])
    return w if self.feasible(w) else None

  def greedy(self, w: np.ndarray) -> np.ndarray:
    """From feasible ``w``, steps up the layer with the most objective per unit of normalised cost while it fits."""
    w = w.copy()
    for _ in range(int(sum(len(v) for v in self.values))):
      up, _ = self.steps(w)
      slack = self.budgets + self.slack_tol - self.cost(w)
      delta = self.deltas(w, up)
      ok = (up > 0) & np.all(delta <= slack[:, None], axis=0)
      if not np.any(ok):
        return w
      price = np.max(np.clip(delta, 0, None) / self.budgets[:, None], axis=0)
      score = np.where(ok, self.weight * up / np.maximum(price, 1e-300), -np.inf)
      i = int(np.argmax(score))
      w[i] += int(up[i])
    return w

  def local_search(self, w: np.ndarray, max_moves: int, *, up_steps: int = 4) -> np.ndarray:
    """Improves feasible ``w`` by moves that gain objective and keep every budget, best move first, until none.

    Moves: one step up of one layer; else ``s <= up_steps`` steps up of layer i with layer j (any ``j != i``) down
    by the fewest lattice steps that bring every budget back (the nearest lower width that fits gains most).
    """
    w = w.copy()
    for _ in range(max_moves):
      up, _ = self.steps(w)
      slack = self.budgets + self.slack_tol - self.cost(w)
      d_up = self.deltas(w, up)
      ok = (up > 0) & np.all(d_up <= slack[:, None], axis=0)
      if np.any(ok):
        i = int(np.argmax(np.where(ok, self.weight * up, -np.inf)))
        w[i] += int(up[i])
        continue
      move = self._best_exchange(w, slack, up_steps)
      if move is None:
        return w
      i, di, j, dj = move
      w[i] += di
      w[j] += dj
    return w

  def _best_exchange(self, w: np.ndarray, slack: np.ndarray, up_steps: int) -> tuple[int, int, int, int] | None:
    owner, down = [], []
    for j, v in enumerate(self.values):
      below = v[v < w[j]]
      owner.append(np.full(below.size, j))
      down.append(below - w[j])
    owner_a, dj = np.concatenate(owner), np.concatenate(down).astype(np.float64)
    if owner_a.size == 0:
      return None
    wf = w.astype(np.float64)
    grads = [q.gradient(wf) for q in self.costs]
    floor = 1e-12 * max(self.objective(w), 1.0)
    best: tuple[float, tuple[int, int, int, int]] | None = None
    for s in range(1, up_steps + 1):
      di = self.up_steps(w, s)
      movable = np.flatnonzero(di > 0)
      if movable.size == 0:
        break
      d = di[movable]
      gain = (self.weight[movable] * d)[:, None] - (self.weight[owner_a] * -dj)[None, :]
      fits = (gain > floor) & (movable[:, None] != owner_a[None, :])
      for k, q in enumerate(self.costs):
        g = grads[k]
        up_cost = d * g[movable] + q.square[movable] * d * d
        # j's change at w with i already moved: d_j (g_j + D_ij d_i) + q_j d_j^2.
        down_cost = dj[None, :] * (g[owner_a][None, :] + q.cross[movable][:, owner_a] * d[:, None]) + \
            (q.square[owner_a] * dj * dj)[None, :]
        fits &= (up_cost[:, None] + down_cost) <= slack[k]
      if not np.any(fits):
        continue
      flat = int(np.argmax(np.where(fits, gain, -np.inf)))
      r, col = np.unravel_index(flat, gain.shape)
      if best is None or gain[r, col] > best[0]:
        best = (float(gain[r, col]), (int(movable[r]), int(d[r]), int(owner_a[col]), int(dj[col])))
    return None if best is None else best[1]
