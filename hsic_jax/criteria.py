"""Baseline channel-selection criteria behind one registry, and width allocation from their scores.

A criterion scores every channel of a :class:`~hsic_jax.groups.ChannelGroup` (higher = more important, kept first)
from what it needs: the weights (a state pytree, a pure dict ``nnx.to_pure_dict(nnx.state(model))`` or an
``nnx.State``), the activations of the group's channels (``(n, h, w, c)``, e.g. a decision's input after BN and
ReLU) or the gradient of a loss with respect to the parameters (a pytree with the paths of the state). The built-in
criteria:

========== ================================================================ ===============
name       score of channel ``c``                                           needs
========== ================================================================ ===============
random     uniform in [0, 1), keyed by the seed and the group's name        --
l1         ``sum_m ||W_m[c]||_1`` over the producing kernels ``m``          weights
l2         ``sum_m ||W_m[c]||_2``                                           weights
fpgm       ``sum_j ||w_c - w_j||_2`` (distance to all other filters)        weights
bn_scale   ``|gamma_c|``                                                    weights
taylor     ``(gamma_c dL/dgamma_c + beta_c dL/dbeta_c)^2`` at the BN gate   weights, grads
hrank      mean over images of ``rank(F_c)``, ``F_c`` the (h, w) map        activations
chip       mean over images of ``||A||_* - ||A with row c zeroed||_*``      activations
========== ================================================================ ===============

Users add their own with :func:`register_criterion`. Scores become widths with the same cost function as the APIB
search (``cost(widths) -> {"macs": .., "params": ..}``, see :mod:`hsic_jax.search`):

- :func:`allocate_uniform`: one kept fraction for every decision;
- :func:`allocate_global`: one threshold on the per-decision-normalised scores of all decisions;
- :func:`keep_for_widths`: the top-scoring channels of each decision for given widths.

>>> import numpy as np
>>> from hsic_jax.groups import ChannelGroup, ChannelSlice
>>> state = {"conv": {"kernel": np.array([1.0, -3.0, 2.0]).reshape(1, 1, 1, 3)}}
>>> group = ChannelGroup("conv", 3, (ChannelSlice(("conv", "kernel"), 3, "out"),))
>>> channel_scores("l1", group, state=state).tolist()
[1.0, 3.0, 2.0]
>>> res = allocate_global([np.array([1.0, 3.0, 2.0])], lambda w: {"macs": float(sum(w))}, 2.0, normalize="max")
>>> res.widths, [k.tolist() for k in res.keep]
((2,), [[1, 2]])
"""

from __future__ import annotations

import dataclasses
import functools
import math
import zlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np

from hsic_jax import _floor
from hsic_jax.groups import ChannelGroup, ChannelSlice, Path, flatten_state, path_str
from hsic_jax.surgery import keep_top_k, round_width

CostFn = Callable[[Sequence[int]], Mapping[str, float]]
NEEDS = frozenset({"weights", "activations", "grads"})
NORMALIZATIONS = ("l2", "max", "sum", "none")

# Leaf names that mark a normalisation layer's members (flax's BatchNorm: scale, bias, mean, var).
_SCALE_NAMES = frozenset({"scale", "gamma"})
_SHIFT_NAMES = frozenset({"bias", "beta"})
_STAT_NAMES = frozenset({"mean", "var", "variance", "running_mean", "running_var", "moving_mean", "moving_var",
                         "moving_variance"})
# Elements (float32) that one compiled batch of matrices may hold in hrank / chip / fpgm: 2**24 is 64 MiB, so the
# peak memory stays bounded whatever the layer, with batches still large enough to amortise each call.
CHUNK_ELEMENTS = 2 ** 24


class CriterionFn(Protocol):
  """A criterion: ``fn(group, *, state, activations, grads, seed) -> (group.size,)`` scores, higher kept first."""

  def __call__(self, group: ChannelGroup, *, state: Any, activations: Any, grads: Any, seed: int) -> Any:
    ...


@dataclasses.dataclass(frozen=True)
class Criterion:
  """A registered criterion: its name, function and the inputs it needs (a subset of :data:`NEEDS`)."""

  name: str
  fn: CriterionFn
  needs: frozenset[str]


_REGISTRY: dict[str, Criterion] = {}


def register_criterion(name: str, fn: CriterionFn, *, needs: Iterable[str] = frozenset(),
                       replace: bool = False) -> None:
  """Adds a criterion to the registry, so that :func:`channel_scores` and the pipeline can use it by name.

  ``fn`` is called as ``fn(group, state=..., activations=..., grads=..., seed=...)`` (inputs it does not need may
  be ``None``) and returns one score per channel of ``group``; higher scores are kept first.

  >>> register_criterion("first", lambda g, **_: -np.arange(g.size), needs=frozenset())
  >>> from hsic_jax.groups import ChannelGroup
  >>> channel_scores("first", ChannelGroup("g", 3, ())).tolist()
  [0.0, -1.0, -2.0]
  >>> unregister_criterion("first")

  Raises:
    ValueError: ``name`` is not a non-empty string or is taken (and not ``replace``), ``fn`` is not callable, or
      ``needs`` holds something other than ``"weights"``, ``"activations"``, ``"grads"``.
  """
  if not isinstance(name, str) or not name:
    raise ValueError(f"name must be a non-empty string, got {name!r}")
  if not callable(fn):
    raise ValueError(f"fn must be callable, got {type(fn).__name__}")
  if isinstance(needs, str) or not isinstance(needs, Iterable):
    raise ValueError(f"needs must be a set of strings among {sorted(NEEDS)}, got {needs!r}")
  needs = frozenset(needs)
  if not needs <= NEEDS:
    raise ValueError(f"needs must be a subset of {sorted(NEEDS)}, got unknown {sorted(needs - NEEDS)}")
  if name in _REGISTRY and not replace:
    raise ValueError(f"criterion {name!r} is already registered; pass replace=True to replace it")
  _REGISTRY[name] = Criterion(name, fn, needs)


def unregister_criterion(name: str) -> None:
  """Removes a criterion from the registry (the built-ins too: :func:`register_criterion` can put them back).

  Raises:
    ValueError: an unknown name (the message lists the known ones).
  """
  _lookup(name)
  del _REGISTRY[name]


def criterion_names() -> tuple[str, ...]:
  """Names of the registered criteria, in registration order (the built-ins first).

  >>> criterion_names()[:4]
  ('random', 'l1', 'l2', 'fpgm')
  """
  return tuple(_REGISTRY)


def _lookup(name: Any) -> Criterion:
  if not isinstance(name, str) or name not in _REGISTRY:
    raise ValueError(f"unknown criterion {name!r}; expected one of {list(_REGISTRY)}")
  return _REGISTRY[name]


def criterion_needs(name: str) -> frozenset[str]:
  """The inputs criterion ``name`` needs (a subset of :data:`NEEDS`).

  >>> sorted(criterion_needs("taylor"))
  ['grads', 'weights']

  Raises:
    ValueError: an unknown name (the message lists the known ones).
  """
  return _lookup(name).needs


def channel_scores(name: str, group: ChannelGroup, *, state: Any = None, activations: Any = None, grads: Any = None,
                   seed: int = 0) -> np.ndarray:
  """Scores of every channel of ``group`` by criterion ``name`` (higher = more important), as float64 numpy.

  Args:
    name: a registered criterion (:func:`criterion_names`).
    group: the channel group to score.
    state: the model's state pytree (pure dict or ``nnx.State``), for criteria that need ``"weights"``.
    activations: ``(n, h, w, group.size)`` activations of the group's channels, for ``"activations"``.
    grads: a pytree of loss gradients with the paths of ``state``'s parameters, for ``"grads"``.
    seed: seed of random criteria.

  >>> from hsic_jax.groups import ChannelGroup
  >>> channel_scores("random", ChannelGroup("g", 3, ()), seed=1).shape
  (3,)

  Raises:
    ValueError: an unknown criterion, a missing input it needs (named), a bad group or input, scores of the wrong
      shape or non-finite scores (naming the criterion and the group).
  """
  crit = _lookup(name)
  if not isinstance(group, ChannelGroup):
    raise ValueError(f"group must be a ChannelGroup, got {type(group).__name__}")
  if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
    raise ValueError(f"seed must be an integer, got {seed!r}")
  given = {"weights": state, "activations": activations, "grads": grads}
  missing = sorted(k for k in crit.needs if given[k] is None)
  if missing:
    args = {"weights": "state", "activations": "activations", "grads": "grads"}
    raise ValueError(f"criterion {name!r} needs {missing} (pass {', '.join(args[m] + '=...' for m in missing)}) "
                     f"to score group {group.name!r}")
  if activations is not None and "activations" in crit.needs:
    shape = tuple(np.shape(activations))
    if len(shape) != 4 or shape[-1] != group.size or min(shape) < 1:
      raise ValueError(f"activations must have shape (n, h, w, {group.size}) for group {group.name!r}, got {shape}")
  scores = np.asarray(crit.fn(group, state=state, activations=activations, grads=grads, seed=int(seed)),
                      dtype=np.float64)
  if scores.shape != (group.size,):
    raise ValueError(f"criterion {name!r} returned scores of shape {scores.shape} for group {group.name!r}; "
                     f"expected ({group.size},)")
  if not np.all(np.isfinite(scores)):
    raise ValueError(f"criterion {name!r} gave non-finite scores for group {group.name!r} at channels "
                     f"{np.flatnonzero(~np.isfinite(scores)).tolist()}")
  return scores


# ----------------------------------------------------------------------------------------------------------------
# Reading a group's slices.


def _leaves(tree: Any, what: str) -> dict[Path, Any]:
  try:
    return flatten_state(tree)
  except Exception as e:  # pylint: disable=broad-except
    raise ValueError(f"{what} must be a pytree of arrays (a pure state dict or an nnx.State), got "
                     f"{type(tree).__name__}") from e


def _leaf(leaves: Mapping[Path, Any], path: Path, what: str, group: ChannelGroup) -> Any:
  if tuple(path) not in leaves:
    raise ValueError(f"{what} has no leaf at {path_str(path)!r}, which group {group.name!r} names")
  return leaves[tuple(path)]


def _per_channel(leaf: Any, member: ChannelSlice, group: ChannelGroup, xp: Any = np) -> Any:
  """``(group.size, rest)``: row ``c`` holds every entry of the leaf that belongs to channel ``c`` of the group
  (all spatial copies, see :class:`~hsic_jax.groups.ChannelSlice`)."""
  arr = xp.asarray(leaf)
  if arr.ndim == 0:
    raise ValueError(f"leaf {path_str(member.path)!r} of group {group.name!r} is a scalar; expected an array")
  axis = member.axis % arr.ndim
  n_axis = arr.shape[axis]
  if n_axis % member.spatial or member.offset + group.size > n_axis // member.spatial:
    raise ValueError(f"leaf {path_str(member.path)!r} has {n_axis} entries on axis {member.axis}, too few for "
                     f"group {group.name!r} ({group.size} channels at offset {member.offset}, spatial "
                     f"{member.spatial})")
  c_total = n_axis // member.spatial
  pos = np.arange(member.spatial)[:, None] * c_total + member.offset + np.arange(group.size)[None, :]
  moved = xp.moveaxis(arr, axis, 0)
  rows = moved[pos.reshape(-1)].reshape((member.spatial, group.size, -1))
  return xp.transpose(rows, (1, 0, 2)).reshape(group.size, -1)


def _out_members(group: ChannelGroup, leaves: Mapping[Path, Any]) -> list[tuple[ChannelSlice, Any]]:
  return [(m, _leaf(leaves, m.path, "state", group)) for m in group.members if m.role == "out"]


def _kernels(group: ChannelGroup, leaves: Mapping[Path, Any]) -> list[tuple[ChannelSlice, Any]]:
  """The producing conv / dense kernels of the group (``role="out"`` members of rank >= 2)."""
  found = [(m, x) for m, x in _out_members(group, leaves) if np.ndim(x) >= 2]
  if not found:
    raise ValueError(f"group {group.name!r} has no producing kernel (a role='out' member of rank >= 2)")
  return found


def _bn_gates(group: ChannelGroup, leaves: Mapping[Path, Any]) -> list[tuple[ChannelSlice, ChannelSlice | None]]:
  """``(scale member, shift member or None)`` of every normalisation layer producing the group's channels: a
  1-D ``role="out"`` member named ``scale``/``gamma``, with its sibling ``bias``/``beta`` when that is a member."""
  outs = {tuple(m.path): m for m, x in _out_members(group, leaves) if np.ndim(x) == 1}
  gates = []
  for path, m in outs.items():
    if str(path[-1]) in _SCALE_NAMES:
      shift = next((outs[path[:-1] + (s,)] for s in sorted(_SHIFT_NAMES) if path[:-1] + (s,) in outs), None)
      gates.append((m, shift))
  return gates


def _float(x: Any) -> jax.Array:
  """``x`` as a jax float array: float32, or float64 where given so and 64-bit types are enabled."""
  arr = jnp.asarray(x)
  if arr.dtype == jnp.float64 and jax.config.read("jax_enable_x64"):
    return arr
  return arr.astype(jnp.float32)


# ----------------------------------------------------------------------------------------------------------------
# Built-in criteria.


def random_scores(group: ChannelGroup, *, seed: int = 0, **_: Any) -> np.ndarray:
  """Random scores, the control every criterion should beat: ``u_c ~ U[0, 1)`` i.i.d.

  The key is ``fold_in(PRNGKey(seed), crc32(group.name))``, so layers differ, and a seed repeats a run.

  >>> from hsic_jax.groups import ChannelGroup
  >>> bool(np.all(random_scores(ChannelGroup("a", 4, ()), seed=0) == random_scores(ChannelGroup("a", 4, ()))))
  True
  """
  key = jax.random.fold_in(jax.random.PRNGKey(seed), zlib.crc32(group.name.encode()) & 0x7FFFFFFF)
  return np.asarray(jax.random.uniform(key, (group.size,)), np.float64)


def l1_scores(group: ChannelGroup, *, state: Any, **_: Any) -> np.ndarray:
  """Norm-based importance (Li et al. 2017, "Pruning Filters for Efficient ConvNets"): the L1 norm of each
  channel's filter, ``s_c = sum_m sum_i |W_m[..., c]_i|``, summed over the group's producing kernels ``m``
  (``role="out"`` members of rank >= 2: conv kernels ``(kh, kw, c_in, c_out)``, dense kernels).

  >>> from hsic_jax.groups import ChannelGroup, ChannelSlice
  >>> g = ChannelGroup("c", 2, (ChannelSlice(("k",), 1, "out"),))
  >>> l1_scores(g, state={"k": np.array([[1.0, -2.0], [3.0, 0.5]])}).tolist()
  [4.0, 2.5]
  """
  leaves = _leaves(state, "state")
  return sum(np.abs(_per_channel(x, m, group).astype(np.float64)).sum(1) for m, x in _kernels(group, leaves))


def l2_scores(group: ChannelGroup, *, state: Any, **_: Any) -> np.ndarray:
  """The L2 variant of :func:`l1_scores` (Li et al. 2017): ``s_c = sum_m ||W_m[..., c]||_2``.

  >>> from hsic_jax.groups import ChannelGroup, ChannelSlice
  >>> g = ChannelGroup("c", 2, (ChannelSlice(("k",), 1, "out"),))
  >>> l2_scores(g, state={"k": np.array([[3.0, 0.0], [4.0, 1.0]])}).tolist()
  [5.0, 1.0]
  """
  leaves = _leaves(state, "state")
  return sum(np.sqrt(np.square(_per_channel(x, m, group).astype(np.float64)).sum(1))
             for m, x in _kernels(group, leaves))


@functools.partial(jax.jit, static_argnames=("rows",))
def _distance_sums(w: jax.Array, rows: int) -> jax.Array:
  """``sum_j ||w_i - w_j||_2`` for every row ``i`` of ``w``, ``rows`` rows at a time (``len(w)`` a multiple).

  The differences are formed explicitly (not from ``|a|^2 + |b|^2 - 2 a.b``, which loses all precision for nearly
  equal filters, exactly the ones FPGM looks for).
  """
  def block(wi):
    return jnp.sqrt(jnp.sum(jnp.square(wi[:, None, :] - w[None, :, :]), -1)).sum(1)
  return jax.lax.map(block, w.reshape(-1, rows, w.shape[1])).reshape(-1)


def fpgm_scores(group: ChannelGroup, *, state: Any, **_: Any) -> np.ndarray:
  """Filter pruning via geometric median (He et al. 2019, "Filter Pruning via Geometric Median for Deep
  Convolutional Neural Networks Acceleration"): filters near the geometric median of the layer's filters are the
  most replaceable, so ``s_c = sum_j ||w_c - w_j||_2``, ``w_c`` the channel's producing filters flattened and
  concatenated over the group's kernels; the smallest sums are pruned first.

  >>> from hsic_jax.groups import ChannelGroup, ChannelSlice
  >>> g = ChannelGroup("c", 3, (ChannelSlice(("k",), 1, "out"),))
  >>> fpgm_scores(g, state={"k": np.array([[0.0, 1.0, 3.0]])}).tolist()
  [4.0, 3.0, 5.0]
  """
  leaves = _leaves(state, "state")
  w = jnp.concatenate([_float(_per_channel(x, m, group, jnp)) for m, x in _kernels(group, leaves)], axis=1)
  c, d = w.shape
  rows = max(1, min(c, CHUNK_ELEMENTS // max(c * d, 1)))
  pad = -c % rows
  w_pad = jnp.concatenate([w, jnp.zeros((pad, d), w.dtype)]) if pad else w
  # Padded rows are zero filters: they add ||w_i|| to every real row's sum, taken off again below.
  sums = _distance_sums(w_pad, rows)[:c]
  if pad:
    sums = sums - pad * jnp.sqrt(jnp.sum(jnp.square(w), 1))
  return np.asarray(sums, np.float64)


def bn_scale_scores(group: ChannelGroup, *, state: Any, **_: Any) -> np.ndarray:
  """Network slimming (Liu et al. 2017, "Learning Efficient Convolutional Networks through Network Slimming"):
  ``s_c = |gamma_c|``, the BatchNorm scale of the channel (summed over the group's normalisation layers when
  several produce it, e.g. every block writing one residual stream).

  >>> from hsic_jax.groups import ChannelGroup, ChannelSlice
  >>> g = ChannelGroup("c", 2, (ChannelSlice(("bn", "scale"), 0, "out"),))
  >>> bn_scale_scores(g, state={"bn": {"scale": np.array([-0.5, 0.25])}}).tolist()
  [0.5, 0.25]

  Raises:
    ValueError: the group has no BatchNorm scale member (a 1-D ``role="out"`` leaf named ``scale``/``gamma``).
  """
  leaves = _leaves(state, "state")
  gates = _bn_gates(group, leaves)
  if not gates:
    raise ValueError(f"criterion 'bn_scale' needs a BatchNorm scale in group {group.name!r} (a role='out' 1-D "
                     f"member named {sorted(_SCALE_NAMES)}); it has none")
  return sum(np.abs(_per_channel(leaves[tuple(s.path)], s, group).astype(np.float64)[:, 0]) for s, _ in gates)


def taylor_scores(group: ChannelGroup, *, state: Any, grads: Any, **_: Any) -> np.ndarray:
  """First-order Taylor importance (Molchanov et al. 2019, "Importance Estimation for Neural Network Pruning"):
  the squared first-order estimate of the loss change when channel ``c`` is removed, ``(sum_m w_m dL/dw_m)^2``
  over the parameters ``m`` that gate the channel.

  With a BatchNorm among the group's producers (the paper's preferred form, at the BN gate)
  ``s_c = (gamma_c dL/dgamma_c + beta_c dL/dbeta_c)^2``, the sum inside the square running over every normalisation
  layer of the group; without one, the sum runs over every entry of the channel's producing kernel and bias slices.
  ``grads`` is one gradient (e.g. of the mean loss over the calibration images), so this is the square of the mean
  contribution, not the paper's running average over minibatches of squared per-batch contributions.

  >>> from hsic_jax.groups import ChannelGroup, ChannelSlice
  >>> g = ChannelGroup("c", 2, (ChannelSlice(("bn", "scale"), 0, "out"), ChannelSlice(("bn", "bias"), 0, "out")))
  >>> st = {"bn": {"scale": np.array([2.0, 1.0]), "bias": np.array([1.0, 0.0])}}
  >>> gr = {"bn": {"scale": np.array([0.5, 3.0]), "bias": np.array([-4.0, 1.0])}}
  >>> taylor_scores(g, state=st, grads=gr).tolist()
  [9.0, 9.0]
  """
  leaves = _leaves(state, "state")
  gl = _leaves(grads, "grads")
  gates = _bn_gates(group, leaves)
  if gates:
    members = [m for gate in gates for m in gate if m is not None]
  else:
    members = [m for m, x in _out_members(group, leaves)
               if np.ndim(x) >= 2 or (np.ndim(x) == 1 and str(m.path[-1]) not in _STAT_NAMES)]
    if not members:
      raise ValueError(f"criterion 'taylor' found no producing kernel, bias or BatchNorm in group {group.name!r}")
  total = np.zeros(group.size, np.float64)
  for m in members:
    w, g = leaves[tuple(m.path)], _leaf(gl, m.path, "grads", group)
    if np.shape(g) != np.shape(w):
      raise ValueError(f"grads at {path_str(m.path)!r} has shape {np.shape(g)}; expected {np.shape(w)} like state")
    total += (_per_channel(w, m, group).astype(np.float64) * _per_channel(g, m, group).astype(np.float64)).sum(1)
  return np.square(total)


def _chunks(total: int, per_item: int, cap: int | None = None) -> int:
  return max(1, min(total, cap or total, CHUNK_ELEMENTS // max(per_item, 1)))


@jax.jit
def _ranks(maps: jax.Array) -> jax.Array:
  """Ranks of a batch of matrices with numpy's ``matrix_rank`` default tolerance:
  ``sigma > sigma_max * max(h, w) * eps``."""
  s = jnp.linalg.svd(maps, compute_uv=False)
  tol = s.max(-1, keepdims=True) * max(maps.shape[-2:]) * jnp.finfo(maps.dtype).eps
  return jnp.sum(s > tol, -1)


def hrank_scores(group: ChannelGroup, *, activations: Any, **_: Any) -> np.ndarray:
  """HRank (Lin et al. 2020, "HRank: Filter Pruning using High-Rank Feature Map"): the average rank of the
  channel's feature map, ``s_c = mean_i rank(F_{i,c})``, ``F_{i,c}`` the ``(h, w)`` map of image ``i``, with
  numpy's default tolerance (singular values above ``sigma_max * max(h, w) * eps``; a zero map has rank 0).

  >>> from hsic_jax.groups import ChannelGroup
  >>> a = np.zeros((1, 3, 3, 2), np.float32); a[0, :, :, 0] = np.eye(3); a[0, :, :, 1] = 1.0
  >>> hrank_scores(ChannelGroup("c", 2, ()), activations=a).tolist()
  [3.0, 1.0]
  """
  x = _float(activations)
  n, h, w, c = x.shape
  maps = jnp.transpose(x, (0, 3, 1, 2)).reshape(n * c, h, w)
  b = _chunks(n * c, h * w)
  total = n * c
  pad = -total % b
  if pad:
    maps = jnp.concatenate([maps, jnp.zeros((pad, h, w), maps.dtype)])
  ranks = np.concatenate([np.asarray(_ranks(maps[s:s + b])) for s in range(0, total + pad, b)])[:total]
  return ranks.reshape(n, c).astype(np.float64).mean(0)


@jax.jit
def _chip_wide(a: jax.Array, channels: jax.Array) -> jax.Array:
  """``(b, k)``: ``||A||_* - ||A with row channels[j] zeroed||_*`` for ``a`` ``(b, c, hw)`` with ``hw >= c``.

  ``A^T = Q R`` gives ``A = R^T Q^T``; zeroing row ``k`` of ``A`` zeroes row ``k`` of ``R^T``, and ``Q^T``'s
  orthonormal rows keep the singular values, so every SVD is of a ``(c, c)`` matrix.
  """
  m = jnp.swapaxes(jnp.linalg.qr(jnp.swapaxes(a, 1, 2), mode="r"), 1, 2)
  full = jnp.linalg.svd(m, compute_uv=False).sum(-1)
  keep = 1.0 - jax.nn.one_hot(channels, m.shape[1], dtype=m.dtype)  # (k, c)

  def without(mat):
    return jnp.linalg.svd(mat[None] * keep[:, :, None], compute_uv=False).sum(-1)

  return full[:, None] - jax.vmap(without)(m)


@jax.jit
def _chip_tall(a: jax.Array, channels: jax.Array) -> jax.Array:
  """``(b, k)`` as :func:`_chip_wide`, for ``hw < c``, with SVDs of ``(hw, hw)`` matrices only.

  ``A = Q R`` (``Q`` ``(c, hw)`` with orthonormal columns); zeroing row ``k`` gives ``(Q - e_k q^T) R``, ``q`` row
  ``k`` of ``Q``, whose Gram matrix is ``R^T (I - q q^T) R``: the same singular values as ``(I - beta q q^T) R``
  with ``(I - beta q q^T)^2 = I - q q^T``, i.e. ``beta = 1 / (1 + sqrt(1 - |q|^2))`` (``|q| <= 1``).
  """
  q, r = jnp.linalg.qr(a)  # (b, c, hw), (b, hw, hw)
  full = jnp.linalg.svd(r, compute_uv=False).sum(-1)
  rows = q[:, channels]  # (b, k, hw)
  beta = 1.0 / (1.0 + jnp.sqrt(jnp.clip(1.0 - jnp.sum(rows * rows, -1), 0.0)))  # (b, k)
  qr_ = jnp.einsum("bkh,bhw->bkw", rows, r)  # q^T R
  mats = r[:, None] - beta[..., None, None] * rows[..., :, None] * qr_[..., None, :]
  return full[:, None] - jnp.linalg.svd(mats, compute_uv=False).sum(-1)


def chip_scores(group: ChannelGroup, *, activations: Any, **_: Any) -> np.ndarray:
  """CHIP, channel independence (Sui et al. 2021, "CHIP: CHannel Independence-based Pruning for Compact Neural
  Networks"): for each image, ``A`` is the ``(c, h*w)`` matrix of the layer's feature maps and
  ``s_c = ||A||_* - ||A with row c set to 0||_*`` (nuclear norms), averaged over images. A channel that is zero or a
  combination of the others changes ``||A||_*`` little and goes first.

  Each image costs one QR factorisation and ``c + 1`` singular value decompositions of ``(m, m)`` matrices,
  ``m = min(c, h*w)``, with the same singular values as ``A`` and as each ``A`` with a row zeroed (see
  :func:`_chip_wide` and :func:`_chip_tall`), batched over images and channels and compiled, in chunks of at most
  :data:`CHUNK_ELEMENTS` elements. In float32 the differences carry an absolute error of about ``1e-6 ||A||_*``.

  >>> from hsic_jax.groups import ChannelGroup
  >>> a = np.zeros((1, 1, 2, 3), np.float32); a[0, 0, 0] = [3.0, 3.0, 0.0]; a[0, 0, 1, 2] = 2.0
  >>> np.round(chip_scores(ChannelGroup("c", 3, ()), activations=a), 4).tolist()  # rows (3,0), (3,0), (0,2)
  [1.2426, 1.2426, 2.0]
  """
  x = _float(activations)
  n, h, w, c = x.shape
  a = jnp.transpose(x.reshape(n, h * w, c), (0, 2, 1))
  mdim = min(c, h * w)
  per_channel = (c if h * w >= c else mdim) * mdim  # one masked matrix
  k = _chunks(c, per_channel)  # channels per call
  b = _chunks(n, k * per_channel + c * h * w)  # images per call
  drops_of = _chip_wide if h * w >= c else _chip_tall
  channel_sets = [np.arange(s, s + k) % c for s in range(0, c, k)]  # the last set wraps: fixed shapes, one compile
  total = np.zeros(c, np.float64)
  for s in range(0, n, b):
    chunk = a[s:s + b]
    real = chunk.shape[0]
    if real < b:  # zero images: their drops are 0 (tall: a zero R), and they are cut off anyway
      chunk = jnp.concatenate([chunk, jnp.zeros((b - real,) + chunk.shape[1:], chunk.dtype)])
    for j, chans in enumerate(channel_sets):
      drops = np.asarray(drops_of(chunk, jnp.asarray(chans)), np.float64)[:real].sum(0)
      width = min(k, c - j * k)
      total[chans[:width]] += drops[:width]
  return total / n


for _name, _fn, _needs in (
    ("random", random_scores, frozenset()),
    ("l1", l1_scores, frozenset({"weights"})),
    ("l2", l2_scores, frozenset({"weights"})),
    ("fpgm", fpgm_scores, frozenset({"weights"})),
    ("bn_scale", bn_scale_scores, frozenset({"weights"})),
    ("taylor", taylor_scores, frozenset({"weights", "grads"})),
    ("hrank", hrank_scores, frozenset({"activations"})),
    ("chip", chip_scores, frozenset({"activations"})),
):
  register_criterion(_name, _fn, needs=_needs)


# ----------------------------------------------------------------------------------------------------------------
# Allocation.


@dataclasses.dataclass(frozen=True)
class ScorePoint:
  """One evaluated point of an allocation search.

  Attributes:
    value: the searched parameter: the kept fraction ``f`` (uniform) or the threshold ``t`` (global); ``None``
      for the minimum widths (every decision at ``min_width``).
    widths: the widths it gives.
    costs: the cost function's values there (every key it returns).
    phase: ``"bound"`` (the minimum or the dense widths) or ``"bisect"``.
  """

  value: float | None
  widths: tuple[int, ...]
  costs: Mapping[str, float]
  phase: str


@dataclasses.dataclass(frozen=True)
class ScoreAllocation:
  """The outcome of :func:`allocate_uniform` or :func:`allocate_global`.

  Attributes:
    method: ``"uniform"`` or ``"global"``.
    value: the chosen fraction (uniform) or threshold (global); ``None`` at the minimum widths.
    widths: kept channels per decision.
    keep: kept channel indices per decision (sorted; ``None`` for uniform, which knows no scores).
    costs: the cost function's values at ``widths``.
    target: the target value of ``costs[key]``.
    key: the cost that was targeted.
    within_tolerance: whether ``|costs[key] - target| <= tolerance * target``.
    trace: every point evaluated, in order.
    reachable: ``(lowest, highest)`` cost: every decision at its minimum width / dense.
    normalize: the score normalisation of ``"global"`` (``None`` for uniform).
  """

  method: str
  value: float | None
  widths: tuple[int, ...]
  keep: tuple[np.ndarray, ...] | None
  costs: Mapping[str, float]
  target: float
  key: str
  within_tolerance: bool
  trace: tuple[ScorePoint, ...]
  reachable: tuple[float, float]
  normalize: str | None = None


def _check_sizes(sizes: Any) -> list[int]:
  if isinstance(sizes, (str, bytes)) or not isinstance(sizes, Iterable):
    raise ValueError(f"sizes must be a sequence of channel counts, got {type(sizes).__name__}")
  out = list(sizes)
  if not out or any(isinstance(s, bool) or not isinstance(s, (int, np.integer)) or s < 1 for s in out):
    raise ValueError(f"sizes must be a non-empty sequence of integers >= 1, got {out!r}")
  return [int(s) for s in out]


def _check_common(target: Any, tolerance: Any, multiple: Any, key: Any) -> float:
  if isinstance(multiple, bool) or not isinstance(multiple, (int, np.integer)) or multiple < 1:
    raise ValueError(f"multiple must be an integer >= 1, got {multiple!r}")
  if isinstance(tolerance, bool) or not (isinstance(tolerance, (int, float)) and 0 <= tolerance < 1):
    raise ValueError(f"tolerance must be in [0, 1), got {tolerance!r}")
  if isinstance(target, bool) or not (isinstance(target, (int, float, np.number)) and math.isfinite(target)
                                      and target > 0):
    raise ValueError(f"target must be a finite number > 0, got {target!r}")
  if not isinstance(key, str):
    raise ValueError(f"key must be a string naming a cost, got {key!r}")
  return float(target)


class _Search:
  """Bisection over a monotone family of width vectors ``widths_at(i)``, ``i = 0 .. n - 1`` (nondecreasing in
  every width, so the cost is nondecreasing in ``i`` for a cost increasing in the widths)."""

  def __init__(self, cost_fn: CostFn, key: str, target: float, tolerance: float):
    if not callable(cost_fn):
      raise ValueError(f"cost_fn must be callable (widths -> {{name: value}}), got {type(cost_fn).__name__}")
    self.cost_fn, self.key, self.target, self.tolerance = cost_fn, key, target, tolerance
    self.trace: list[ScorePoint] = []

  def evaluate(self, value: float | None, widths: Sequence[int], phase: str) -> ScorePoint:
    widths = tuple(int(w) for w in widths)
    costs = self.cost_fn(list(widths))
    if not isinstance(costs, Mapping) or self.key not in costs:
      raise ValueError(f"cost_fn must return a mapping with key {self.key!r}, got {costs!r}")
    costs = {k: float(v) for k, v in costs.items()}
    if not math.isfinite(costs[self.key]):
      raise ValueError(f"cost_fn returned a non-finite {self.key} {costs[self.key]!r} at widths {list(widths)}")
    point = ScorePoint(value, widths, costs, phase)
    self.trace.append(point)
    return point

  def value(self, p: ScorePoint) -> float:
    return p.costs[self.key]

  def within(self, p: ScorePoint) -> bool:
    return abs(self.value(p) - self.target) <= self.tolerance * self.target

  def run(self, n: int, value_at: Callable[[int], float | None], widths_at: Callable[[int], Sequence[int]]
          ) -> tuple[ScorePoint, tuple[float, float]]:
    """The point of largest index with cost at most the target (or, where that misses the band and the next index
    lands in it, the next); index 0 is the minimum widths, ``n - 1`` the dense ones."""
    lo_p = self.evaluate(value_at(0), widths_at(0), "bound")
    hi_p = self.evaluate(value_at(n - 1), widths_at(n - 1), "bound")
    lo, hi = self.value(lo_p), self.value(hi_p)
    t, tol = self.target, self.tolerance
    if t < lo * (1 - tol) or t > hi * (1 + tol):
      raise ValueError(f"target {self.key} {t:,.6g} is outside what the allocation can reach: {lo:,.6g} (every "
                       f"decision at its minimum width) to {hi:,.6g} (dense); expected a target in that range (as a "
                       f"ratio of dense: {lo / hi:.4f} to 1)")
    reachable = (lo, hi)
    if hi <= t:
      return hi_p, reachable
    if lo > t:
      return lo_p, reachable  # above the target but within the band (checked above)
    a, b, pa, pb = 0, n - 1, lo_p, hi_p  # invariant: cost(a) <= t < cost(b)
    while b - a > 1:
      mid = (a + b) // 2
      p = self.evaluate(value_at(mid), widths_at(mid), "bisect")
      if self.value(p) <= t:
        a, pa = mid, p
      else:
        b, pb = mid, p
    if not self.within(pa) and self.within(pb):
      return pb, reachable
    return pa, reachable


def allocate_uniform(sizes: Sequence[int], cost_fn: CostFn, target: float, *, key: str = "macs",
                     tolerance: float = 0.01, min_width: int | float | Sequence[int] = 1,
                     multiple: int = 1) -> ScoreAllocation:
  """One kept fraction ``f`` for every decision, the largest whose cost is at most the target.

  ``width_d(f) = round_width(max(ceil(f * size_d), min_width), size_d, multiple=multiple)`` (rounded up to a
  multiple, capped at the size). The widths change only at ``f = k / size_d``, so the search bisects over those
  breakpoints (exact, about ``log2(sum(sizes))`` cost evaluations). Where the largest fraction under the target
  misses the band ``|cost - target| <= tolerance * target`` and the next breakpoint lands in it, that one is taken.

  >>> res = allocate_uniform([10, 20], lambda w: {"macs": float(sum(w))}, 15.0)
  >>> res.widths, res.value, res.within_tolerance
  ((5, 10), 0.5, True)

  Args:
    sizes: the dense channel count of every decision.
    cost_fn: widths -> ``{name: value}``, increasing in every width.
    target: the value of ``cost_fn(widths)[key]`` to reach.
    key: which cost to target.
    tolerance: relative band around the target.
    min_width: the fewest channels a decision keeps (capped at its size): a count ``>= 1``, a fraction in
      ``(0, 1)`` of each size, or one count per decision (:func:`hsic_jax.min_widths`).
    multiple: round every width up to a multiple of this (capped at the size).

  Raises:
    ValueError: bad arguments, or a target outside ``[cost at min widths, dense cost]`` (widened by the tolerance;
      the message gives the range).
  """
  sizes = _check_sizes(sizes)
  target = _check_common(target, tolerance, multiple, key)
  floor = _floor.min_widths(min_width, sizes, name="min_width")
  fractions = np.unique(np.concatenate([[0.0]] + [np.arange(1, s + 1) / s for s in sizes]))

  def widths_at(i: int) -> list[int]:
    f = float(fractions[i])
    # The small slack keeps k / size_d from rounding up to k + 1 (float division then multiplication).
    return [round_width(max(math.ceil(f * s - 1e-9), int(m)), s, multiple=multiple) for s, m in zip(sizes, floor)]

  search = _Search(cost_fn, key, target, float(tolerance))
  best, reachable = search.run(len(fractions), lambda i: float(fractions[i]), widths_at)
  return ScoreAllocation("uniform", best.value, best.widths, None, dict(best.costs), target, key,
                         search.within(best), tuple(search.trace), reachable)


def _check_scores(scores: Any) -> list[np.ndarray]:
  if isinstance(scores, (str, bytes, np.ndarray)) or not isinstance(scores, Iterable):
    raise ValueError(f"scores must be a sequence of 1-D score arrays (one per decision), got {type(scores).__name__}")
  out = []
  for i, s in enumerate(scores):
    arr = np.asarray(s, np.float64)
    if arr.ndim != 1 or arr.size < 1:
      raise ValueError(f"scores[{i}] must be a non-empty 1-D array, got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
      raise ValueError(f"scores[{i}] must be finite; non-finite at {np.flatnonzero(~np.isfinite(arr)).tolist()}")
    out.append(arr)
  if not out:
    raise ValueError("scores must hold at least one decision's scores, got none")
  return out


def normalize_scores(scores: Any, *, normalize: str = "l2") -> np.ndarray:
  """One decision's scores on a scale comparable across decisions: ``s / ||s||_2`` (``"l2"``), ``s / max|s|``
  (``"max"``), ``s / sum|s|`` (``"sum"``) or ``s`` (``"none"``). All-zero scores stay zero.

  >>> normalize_scores([3.0, 4.0]).tolist(), normalize_scores([1.0, 3.0], normalize="sum").tolist()
  ([0.6, 0.8], [0.25, 0.75])

  Raises:
    ValueError: an unknown ``normalize`` or scores that are not a finite 1-D array.
  """
  if normalize not in NORMALIZATIONS:
    raise ValueError(f"normalize must be one of {list(NORMALIZATIONS)}, got {normalize!r}")
  s = _check_scores([scores])[0]
  if normalize == "none":
    return s
  scale = {"l2": lambda: float(np.sqrt(np.sum(s * s))), "max": lambda: float(np.max(np.abs(s))),
           "sum": lambda: float(np.sum(np.abs(s)))}[normalize]()
  return s / scale if scale > 0 else s


def allocate_global(scores: Sequence[Any], cost_fn: CostFn, target: float, *, key: str = "macs",
                    normalize: str = "l2", tolerance: float = 0.01, min_width: int | float | Sequence[int] = 1,
                    multiple: int = 1) -> ScoreAllocation:
  """One threshold ``t`` on every decision's normalised scores (:func:`normalize_scores`), the lowest whose cost is
  at most the target: decision ``d`` keeps its channels with ``s_hat >= t``, at least ``min_width`` of them, their
  count rounded up to ``multiple`` by adding the next best channels (ties to the lower index; capped at the size).

  The widths change only at the scores' distinct values, so the search bisects over those (about
  ``log2(sum(sizes))`` cost evaluations); the band rule is that of :func:`allocate_uniform`.

  >>> res = allocate_global([[0.9, 0.1], [0.5, 0.4]], lambda w: {"macs": float(sum(w))}, 3.0, normalize="none")
  >>> res.widths, [k.tolist() for k in res.keep], res.value
  ((1, 2), [[0], [0, 1]], 0.4)

  Args:
    scores: per decision, one score per channel (higher kept first), e.g. from :func:`channel_scores`.
    cost_fn, target, key, tolerance, min_width, multiple: as in :func:`allocate_uniform`.
    normalize: ``"l2"``, ``"max"``, ``"sum"`` or ``"none"``.

  Raises:
    ValueError: bad arguments, or a target outside the reachable range (the message gives it).
  """
  target = _check_common(target, tolerance, multiple, key)
  if normalize not in NORMALIZATIONS:
    raise ValueError(f"normalize must be one of {list(NORMALIZATIONS)}, got {normalize!r}")
  raw = _check_scores(scores)
  norm = [normalize_scores(s, normalize=normalize) for s in raw]
  sizes = [s.size for s in raw]
  floor = _floor.min_widths(min_width, sizes, name="min_width")
  ascending = [np.sort(s) for s in norm]
  thresholds = np.unique(np.concatenate(norm))[::-1]  # high to low: index 0 keeps the least

  def counts_at(i: int) -> list[int]:
    if i == 0:
      return [0] * len(sizes)  # the minimum widths, below every threshold
    t = thresholds[i - 1]
    return [int(s.size - np.searchsorted(s, t, side="left")) for s in ascending]

  def widths_at(i: int) -> list[int]:
    return [round_width(max(k, int(m)), n, multiple=multiple) for k, n, m in zip(counts_at(i), sizes, floor)]

  search = _Search(cost_fn, key, target, float(tolerance))
  best, reachable = search.run(len(thresholds) + 1, lambda i: None if i == 0 else float(thresholds[i - 1]),
                               widths_at)
  keep = tuple(keep_top_k(s, w) for s, w in zip(raw, best.widths))
  return ScoreAllocation("global", best.value, best.widths, keep, dict(best.costs), target, key,
                         search.within(best), tuple(search.trace), reachable, normalize)


def keep_for_widths(scores: Sequence[Any], widths: Sequence[int], *, multiple: int = 1) -> list[np.ndarray]:
  """The kept channels of every decision: its ``widths[d]`` highest scores (:func:`~hsic_jax.surgery.keep_top_k`,
  the count rounded up to ``multiple``, ties to the lower index), sorted.

  >>> [k.tolist() for k in keep_for_widths([[0.1, 0.9, 0.5], [2.0, 1.0]], [2, 1])]
  [[1, 2], [0]]

  Raises:
    ValueError: scores not finite 1-D arrays, or widths not one integer in ``[1, size]`` per decision.
  """
  raw = _check_scores(scores)
  if isinstance(widths, (str, bytes)) or not isinstance(widths, Iterable):
    raise ValueError(f"widths must be a sequence of integers, got {type(widths).__name__}")
  widths = list(widths)
  if len(widths) != len(raw):
    raise ValueError(f"widths must have one entry per decision ({len(raw)}), got {len(widths)}")
  for d, (w, s) in enumerate(zip(widths, raw)):
    if isinstance(w, bool) or not isinstance(w, (int, np.integer)) or not 1 <= w <= s.size:
      raise ValueError(f"widths[{d}] must be an integer in [1, {s.size}], got {w!r}")
  if isinstance(multiple, bool) or not isinstance(multiple, (int, np.integer)) or multiple < 1:
    raise ValueError(f"multiple must be an integer >= 1, got {multiple!r}")
  return [keep_top_k(s, int(w), multiple=multiple) for s, w in zip(raw, widths)]
