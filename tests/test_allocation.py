"""ITPruner's importance and width allocation against hand-derived values, brute force and the exact counter."""

from __future__ import annotations

import itertools
import os
from pathlib import Path

import numpy as np
import pytest

from hsic_jax import allocation
from models import flops, itpruner_costs


def test_importance_by_hand():
  s = np.array([[1.0, 0.6, 0.2], [0.6, 1.0, 0.4], [0.2, 0.4, 1.0]])
  r = np.array([0.8, 1.0, 0.6])  # row sums without the diagonal
  np.testing.assert_allclose(allocation.layer_importance(s, beta=3.0), np.exp(-3.0 * r / 2.4))
  np.testing.assert_allclose(allocation.layer_importance(s, beta=3.0, normalize=False), np.exp(-3.0 * r))
  np.testing.assert_allclose(allocation.layer_importance(s, beta=0.0), np.ones(3))
  # the diagonal is ignored
  np.testing.assert_allclose(allocation.layer_importance(s + 5 * np.eye(3), beta=3.0),
                             allocation.layer_importance(s, beta=3.0))


@pytest.mark.parametrize("sim, beta, match", [
    (np.array([[1.0, 0.5], [0.4, 1.0]]), 1.0, "symmetric"),
    (np.array([[1.0, np.nan], [np.nan, 1.0]]), 1.0, "finite"),
    (np.ones((2, 3)), 1.0, "square"),
    (np.eye(2), -1.0, "beta"),
    (np.eye(2), float("nan"), "beta"),
    (np.eye(1), 1.0, "normalize"),
])
def test_importance_refuses_bad_input(sim, beta, match):
  with pytest.raises(ValueError, match=match):
    allocation.layer_importance(sim, beta=beta)


def _chain_cost(base, rng):
  """A conv chain's MACs (bilinear in neighbouring widths, a fixed input width for the first) plus BN params."""
  s2 = rng.integers(1, 5, size=len(base)) * 4

  def cost(w):
    macs = 3 * w[0] * s2[0] + sum(w[i - 1] * w[i] * s2[i] for i in range(1, len(w))) + 10 * w[-1]
    return {"macs": float(macs), "params": float(sum(2 * x for x in w) + 3 * w[0] + sum(
        w[i - 1] * w[i] for i in range(1, len(w))))}
  return cost


def _brute_force(a, base, cost, budgets, lo=1, multiple=1):
  best, best_w = -np.inf, None
  choices = [sorted({min(c, v) for v in range(max(lo, multiple) if multiple > 1 else lo, c + 1, multiple)} | {c})
             if multiple > 1 else range(lo, c + 1) for c in base]
  for w in itertools.product(*choices):
    c = cost(w)
    if all(c[k] <= b for k, b in budgets.items()):
      obj = float(np.sum(np.asarray(a) * np.asarray(w) / np.asarray(base)))
      if obj > best + 1e-12:
        best, best_w = obj, w
  return best, best_w


@pytest.mark.parametrize("seed", range(12))
def test_allocation_matches_brute_force_on_small_chains(seed):
  rng = np.random.default_rng(seed)
  base = rng.integers(3, 9, size=4).tolist()
  a = rng.uniform(0.1, 1.0, size=4)
  cost = _chain_cost(base, rng)
  dense, low = cost(base)["macs"], cost([1] * 4)["macs"]
  budgets = {"macs": low + rng.uniform(0.2, 0.7) * (dense - low)}
  if seed % 3 == 0:  # two budgets at once
    budgets["params"] = cost([1] * 4)["params"] + 0.5 * (cost(base)["params"] - cost([1] * 4)["params"])
  alloc = allocation.allocate_widths(a, base, cost, budgets, seed=seed)
  best, best_w = _brute_force(a, base, cost, budgets)
  assert alloc.reached
  assert all(cost(alloc.widths)[k] <= b for k, b in budgets.items())
  assert alloc.costs == cost(alloc.widths)
  assert alloc.extras["objective"] == pytest.approx(best, rel=1e-12), (alloc.widths, best_w)


@pytest.mark.parametrize("multiple", [2, 4])
def test_allocation_on_a_lattice_of_multiples(multiple):
  rng = np.random.default_rng(multiple)
  base = [6, 9, 12, 7]
  a = rng.uniform(0.1, 1.0, size=4)
  cost = _chain_cost(base, rng)
  budgets = {"macs": 0.45 * cost(base)["macs"]}
  alloc = allocation.allocate_widths(a, base, cost, budgets, multiple=multiple, min_width=1)
  for w, c in zip(alloc.widths, base):
    assert w == c or w % multiple == 0
  best, _ = _brute_force(a, base, cost, budgets, lo=1, multiple=multiple)
  assert alloc.extras["objective"] == pytest.approx(best, rel=1e-12)


def test_dense_widths_when_they_fit_and_errors_when_nothing_fits():
  cost = lambda w: {"macs": float(w[0] * w[1])}  # noqa: E731
  alloc = allocation.allocate_widths([1.0, 1.0], [4, 5], cost, {"macs": 20.0})
  assert alloc.widths == (4, 5) and alloc.reached
  with pytest.raises(ValueError, match=r"reachable range \[4, 20\]"):
    allocation.allocate_widths([1.0, 1.0], [4, 5], cost, {"macs": 3.0}, min_width=2)
  with pytest.raises(ValueError, match="importance must be finite"):
    allocation.allocate_widths([np.nan, 1.0], [4, 5], cost, {"macs": 10.0})
  with pytest.raises(ValueError, match="one per layer"):
    allocation.allocate_widths([1.0, 1.0, 1.0], [4, 5], cost, {"macs": 10.0})
  with pytest.raises(ValueError, match="budgets"):
    allocation.allocate_widths([1.0, 1.0], [4, 5], cost, {})
  with pytest.raises(ValueError, match="with key 'params'"):
    allocation.allocate_widths([1.0, 1.0], [4, 5], cost, {"params": 10.0})


def test_quadratic_fit_of_the_exact_counter_is_exact():
  """ResNet-20's MACs and params as a function of its 9 block widths, fitted, then checked at other random widths
  against the counter that traces the model built at those widths."""
  dense = list(flops.count("resnet20").widths)

  def full(w):  # the program's layout: the stem/stage widths stay dense, each block's inner width varies
    ws = list(dense)
    for k, x in enumerate(w):
      ws[1 + 2 * k] = int(x)
    return ws

  base = [dense[1 + 2 * k] for k in range(9)]
  cost = lambda w: {"macs": float(flops.count("resnet20", full(w)).macs),  # noqa: E731
                    "params": float(flops.count("resnet20", full(w)).params)}
  fits = allocation.fit_quadratic_costs(cost, base, keys=("macs", "params"))
  rng = np.random.default_rng(123)
  for _ in range(3):
    w = rng.integers(1, np.asarray(base) + 1).tolist()
    traced = flops.count("resnet20", full(w), exact=True)
    assert fits["macs"](w) == pytest.approx(traced.macs, rel=1e-12)
    assert fits["params"](w) == pytest.approx(traced.params, rel=1e-12)


def test_quadratic_fit_refuses_a_cost_that_is_not_quadratic():
  with pytest.raises(ValueError, match="not quadratic"):
    allocation.fit_quadratic_cost(lambda w: {"macs": float(w[0] ** 3 + w[1])}, [6, 6])


def test_on_itpruner_resnet56_allocation_holds_the_budget_where_the_reference_may_not():
  """ITPruner's own 27-variable ResNet-56 constraint at its 60M budget, importances from a random symmetric
  similarity at beta 50: the reference's SLSQP + round-half-even against this allocation."""
  base = itpruner_costs.base_widths("resnet56")
  cost = lambda w: {"macs": itpruner_costs.constraint_flops("resnet56", w)}  # noqa: E731
  quad = allocation.fit_quadratic_cost(cost, base)
  rng = np.random.default_rng(0)
  m = rng.uniform(0, 1, size=(27, 27))
  sim = (m + m.T) / 2
  np.fill_diagonal(sim, 1.0)
  a = allocation.layer_importance(sim, beta=50.0)
  ref = allocation.reference_allocation(a, base, quad, 60e6)
  alloc = allocation.allocate_widths(a, base, cost, {"macs": 60e6}, fitted={"macs": quad})
  assert alloc.reached and min(alloc.widths) >= 1
  assert cost(alloc.widths)["macs"] <= 60e6
  assert cost(alloc.widths)["macs"] >= 0.99 * 60e6  # the budget is used, not left idle
  if ref.reached and ref.extras["zero_widths"] == 0:
    assert alloc.extras["objective"] >= ref.extras["objective"] - 1e-9
  # The reference widths are scored with the same objective (kept fraction weighted by importance).
  assert ref.extras["objective"] == pytest.approx(float(np.sum(a * np.asarray(ref.widths) / np.asarray(base))))


def test_reference_solver_is_repaired_to_the_budget_and_keeps_widths_above_zero():
  base = itpruner_costs.base_widths("resnet56")
  cost = lambda w: {"macs": itpruner_costs.constraint_flops("resnet56", w)}  # noqa: E731
  quad = allocation.fit_quadratic_cost(cost, base)
  a = np.exp(-50.0 * np.linspace(0.01, 0.07, 27))  # ITPruner-like: smooth, small importances
  ref = allocation.reference_allocation(a, base, quad, 30e6)
  alloc = allocation.allocate_widths(a, base, cost, {"macs": 30e6}, fitted={"macs": quad}, solver="reference")
  assert alloc.extras["solver"] == "reference" and alloc.reached and min(alloc.widths) >= 1
  assert cost(alloc.widths)["macs"] <= 30e6
  # Repair only steps down from the reference's rounding (clamped to >= 1): no width grows.
  assert all(w <= max(r, 1) for w, r in zip(alloc.widths, ref.widths))
  with pytest.raises(ValueError, match="solver"):
    allocation.allocate_widths(a, base, cost, {"macs": 30e6}, solver="slsqp")


SHARED = Path(os.environ.get("HSIC_JAX_SHARED", Path(__file__).resolve().parents[2] / "shared"))


@pytest.mark.skipif(not (SHARED / "weights" / "resnet20_cifar10.npz").exists(), reason="needs ../shared")
def test_reference_solver_gives_itpruners_published_resnet20_widths():
  """ITPruner's published ResNet-20 widths at its 20M budget are [11, 11, 11, 22, 21, 22, 45, 43, 48]. Linear CKA
  between the pretrained ResNet-20's 9 block activations on 100 CIFAR-10 images (batch statistics), importances at
  beta 246 and ITPruner's own constraint give them back through the reference's SLSQP and rounding."""
  import ml_collections  # pylint: disable=import-outside-toplevel
  from models import cifar10, import_torch  # pylint: disable=import-outside-toplevel
  from train import calibrate  # pylint: disable=import-outside-toplevel
  images, _ = cifar10.load_split(SHARED / "data" / "cifar10-subset" / "cifar-10-batches-bin")
  model = import_torch.import_torch_state("resnet20", import_torch.load_npz(SHARED / "weights" / "resnet20_cifar10.npz"))
  calib = ml_collections.ConfigDict({"bn_mode": "batch", "batch_size": 100})
  sim = calibrate.layer_similarity(calibrate.activations(model, cifar10.normalize(images[:100]), calib), "linear")
  a = allocation.layer_importance(sim, beta=246.0)
  base = itpruner_costs.base_widths("resnet20")
  quad = allocation.fit_quadratic_cost(lambda w: {"macs": itpruner_costs.constraint_flops("resnet20", w)}, base)
  ref = allocation.reference_allocation(a, base, quad, 20e6)
  assert ref.widths == (11, 11, 11, 22, 21, 22, 45, 43, 48)
  assert not ref.reached  # 20.16M in the constraint's units: over the budget it was solved for
