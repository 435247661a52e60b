"""hsic_jax.budget: the reachable-range error, rounding to a multiple, the integer contract, the result type, and the
uniform and global allocators against brute force and values derived by hand."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

import hsic_jax as hj
from hsic_jax import budget, criteria


def _sum_cost(w):
  return {"macs": float(sum(w)), "params": 2.0 * float(sum(w))}


def test_uniform_by_hand():
  res = budget.allocate_uniform([10, 20, 40], _sum_cost, 35.0)
  assert res.widths == (5, 10, 20) and res.reached and res.value == 0.5
  assert res.costs == {"macs": 35.0, "params": 70.0} and res.keep is None
  # multiple=4 and min_width=3: f = 0.2 gives ceil -> (2, 4, 8) -> min 3 -> rounded (4, 4, 8) = 16 <= 17.
  res = budget.allocate_uniform([10, 20, 40], _sum_cost, 17.0, min_width=3, multiple=4, tolerance=0.1)
  assert all(w % 4 == 0 or w == s for w, s in zip(res.widths, [10, 20, 40]))
  assert min(res.widths) >= 3 and res.costs["macs"] <= 17.0
  # Every breakpoint fraction k/size was a candidate: none gives more cost within the target.
  best = max(sum(budget.round_width(max(math.ceil(f * s - 1e-9), 3), s, multiple=4) for s in [10, 20, 40])
             for f in np.unique(np.concatenate([np.arange(1, s + 1) / s for s in [10, 20, 40]]))
             if sum(budget.round_width(max(math.ceil(f * s - 1e-9), 3), s, multiple=4) for s in [10, 20, 40])
             <= 17)
  assert res.costs["macs"] == best
  assert len(res.trace) <= 2 + math.ceil(math.log2(70)) + 1


def test_global_by_hand():
  scores = [np.array([4.0, 3.0, 0.0]), np.array([1.0, 2.0])]
  # "max": (1, .75, 0) and (.5, 1). cost = sum of widths = 3: threshold .75 keeps 0, 1 of the first, 1 of the second.
  res = budget.allocate_global(scores, _sum_cost, 3.0, normalize="max")
  assert res.widths == (2, 1) and res.value == 0.75 and res.reached
  assert [k.tolist() for k in res.keep] == [[0, 1], [1]]
  # "none": thresholds 4, 3, 2, 1, 0 -> 2 channels at t = 3 (plus min_width 1 for the second) = 3.
  res = budget.allocate_global(scores, _sum_cost, 3.0, normalize="none")
  assert res.widths == (2, 1) and [k.tolist() for k in res.keep] == [[0, 1], [1]]
  # "sum": (4/7, 3/7, 0) and (1/3, 2/3): t = 4/7 keeps channel 0 and channel 1 of the second.
  res = budget.allocate_global(scores, _sum_cost, 2.0, normalize="sum")
  assert [k.tolist() for k in res.keep] == [[0], [1]]
  # multiple=2: the first decision's single channel is rounded up to 2 by score order (channel 1 next).
  res = budget.allocate_global(scores, _sum_cost, 4.0, normalize="max", multiple=2)
  assert res.widths == (2, 2) and [k.tolist() for k in res.keep] == [[0, 1], [0, 1]]
  np.testing.assert_allclose(criteria.normalize_scores([3.0, 4.0], normalize="l2"), [0.6, 0.8])
  with pytest.raises(ValueError, match="normalize"):
    budget.allocate_global(scores, _sum_cost, 3.0, normalize="zscore")


def test_allocation_target_errors_and_band():
  for fn in (lambda t: budget.allocate_uniform([4, 4], _sum_cost, t, min_width=2),
             lambda t: budget.allocate_global([np.ones(4), np.ones(4)], _sum_cost, t, min_width=2)):
    with pytest.raises(ValueError, match=r"reachable range \[4, 8\]"):
      fn(2.0)
    with pytest.raises(ValueError, match="reach"):
      fn(9.0)
    assert fn(8.05).widths == (4, 4)  # above dense, within 1 %
  with pytest.raises(ValueError, match="tolerance"):
    budget.allocate_uniform([4], _sum_cost, 2.0, tolerance=1.5)
  with pytest.raises(ValueError, match="min_width"):
    budget.allocate_uniform([4], _sum_cost, 2.0, min_width=0)
  with pytest.raises(ValueError, match="key 'flops'"):
    budget.allocate_uniform([4], _sum_cost, 2.0, key="flops")
  # Widths jump 8 at a time: cost 16, then 32; nothing lands in the band around 20, so the point below is kept.
  res = budget.allocate_uniform([16, 16], _sum_cost, 20.0, multiple=8)
  assert res.widths == (8, 8) and not res.reached




# ----------------------------------------------------------------------------------------------------------------
# The shared pieces.


def test_round_width_against_brute_force():
  # The smallest multiple of m that is >= max(k, 1), or the size when that is larger: found by counting up.
  for size, m, k in itertools.product(range(1, 13), range(1, 6), range(0, 15)):
    want = next(w for w in range(1, 100) if w % m == 0 and w >= max(k, 1))
    assert budget.round_width(k, size, multiple=m) == min(want, size), (k, size, m)
  assert hj.surgery.round_width is budget.round_width  # one function, importable from its old home
  for kw in ({"size": 0}, {"multiple": 0}):
    with pytest.raises(ValueError, match=next(iter(kw))):
      budget.round_width(3, **{"size": 10, "multiple": 1, **kw})


@pytest.mark.parametrize("value, ok", [(3, True), (np.int32(3), True), (1e4, True), (3.0, True), (2.5, False),
                                       (True, False), (np.bool_(True), False), (float("nan"), False),
                                       (float("inf"), False), ("3", False), (0, False)])
def test_the_integer_contract(value, ok):
  if ok:
    assert budget.check_count("n", value, 1) == int(value) and type(budget.check_count("n", value, 1)) is int
  else:
    with pytest.raises(ValueError, match=r"^n must be an integer >= 1, got "):
      budget.check_count("n", value, 1)


def test_every_allocator_keeps_the_integer_contract():
  problems = [hj.problem_from_features(np.random.default_rng(0).normal(size=(16, 4, 2)).astype(np.float32),
                                       np.random.default_rng(1).normal(size=(16, 3)).astype(np.float32))]
  # An integral float is an integer everywhere; a bool or 2.5 nowhere.
  assert hj.global_lambda_search(problems, _sum_cost, 2.0, grid=4.0, max_steps=2.0).widths
  assert budget.allocate_uniform([4], _sum_cost, 2.0, min_width=2.0).widths == (2,)
  assert budget.allocate_global([np.arange(4.0)], _sum_cost, 2.0, multiple=2.0).widths == (2,)
  assert hj.allocate_widths([1.0], [4], _sum_cost, {"macs": 2.0}, min_width=2.0).widths == (2,)
  assert [k.tolist() for k in criteria.keep_for_widths([np.arange(4.0)], [1], multiple=2.0)] == [[2, 3]]
  for call in (lambda: hj.global_lambda_search(problems, _sum_cost, 2.0, omega=True),
               lambda: budget.allocate_uniform([4], _sum_cost, 2.0, multiple=2.5),
               lambda: budget.allocate_global([np.arange(4.0)], _sum_cost, 2.0, min_width=True),
               lambda: hj.allocate_widths([1.0], [4], _sum_cost, {"macs": 2.0}, starts=2.5),
               lambda: criteria.keep_for_widths([np.arange(4.0)], [1], multiple=True)):
    with pytest.raises(ValueError, match="must be an integer >= "):
      call()


def test_one_reachable_range_error_for_every_allocator():
  problems = [hj.problem_from_features(np.random.default_rng(0).normal(size=(16, 4, 2)).astype(np.float32),
                                       np.random.default_rng(1).normal(size=(16, 3)).astype(np.float32))]
  pattern = r"^target macs 0\.5 is outside what .* can reach: reachable range \[[0-9.]+, [0-9.]+\] \(.*\); expected"
  for call in (lambda: hj.global_lambda_search(problems, _sum_cost, 0.5, omega=2),
               lambda: budget.allocate_uniform([4], _sum_cost, 0.5, min_width=2),
               lambda: budget.allocate_global([np.arange(4.0)], _sum_cost, 0.5, min_width=2),
               lambda: hj.allocate_widths([1.0], [4], _sum_cost, {"macs": 0.5}, min_width=2)):
    with pytest.raises(ValueError, match=pattern):
      call()
  with pytest.raises(ValueError, match=r"reachable range \[2, 4\]"):
    budget.allocate_uniform([4], _sum_cost, 0.5, min_width=2)
  # Large costs read as whole numbers with separators.
  with pytest.raises(ValueError, match=r"target macs 1,000,000 .* \[2,000,000, 8,000,000\]"):
    budget.check_reachable("macs", 1e6, 2e6, 8e6)
  budget.check_reachable("macs", 9e6, 2e6, 8e6, above=False)  # a budget above dense is met by the dense widths
  budget.check_reachable("macs", 8.05, 4.0, 8.0, tolerance=0.01)


def test_every_allocator_returns_the_one_result_type():
  problems = [hj.problem_from_features(np.random.default_rng(0).normal(size=(16, 4, 2)).astype(np.float32),
                                       np.random.default_rng(1).normal(size=(16, 3)).astype(np.float32))]
  results = [hj.global_lambda_search(problems, _sum_cost, 2.0), budget.allocate_uniform([4], _sum_cost, 2.0),
             budget.allocate_global([np.arange(4.0)], _sum_cost, 2.0),
             hj.allocate_widths([1.0], [4], _sum_cost, {"macs": 2.0})]
  assert [r.method for r in results] == ["lambda_search", "uniform", "global", "itpruner"]
  for r in results:
    assert isinstance(r, hj.BudgetResult) and r.widths == (2,) and r.costs == _sum_cost(r.widths)
    assert r.key == "macs" and r.target == 2.0 and r.reached and r.reachable == (1.0, 4.0)
  assert all(isinstance(p, hj.BudgetPoint) for r in results[:3] for p in r.trace)
  assert results[3].extras["budgets"] == {"macs": 2.0} and results[3].extras["reachable"] == {"macs": (1.0, 4.0)}


def test_bisect_finds_the_last_point_under_the_target():
  for target in range(0, 30):
    cost = lambda i: 3 * i  # noqa: E731
    below, above, stopped = budget.bisect(0, 9, midpoint=lambda a, b: None if b - a <= 1 else (a + b) // 2,
                                          evaluate=lambda m, a, b: m, is_below=lambda i: cost(i) <= target)
    if target < 27:
      assert below == max(i for i in range(10) if cost(i) <= target) and above == below + 1 and stopped is None
  # stop ends it at the first point it holds for, and max_steps caps the evaluations.
  seen = []
  out = budget.bisect(0, 64, midpoint=lambda a, b: None if b - a <= 1 else (a + b) // 2,
                      evaluate=lambda m, a, b: seen.append(m) or m, is_below=lambda i: i <= 40, stop=lambda i: i == 40)
  assert out == (32, 48, 40) and seen == [32, 48, 40]
  assert budget.bisect(0, 64, midpoint=lambda a, b: (a + b) // 2, evaluate=lambda m, a, b: m,
                       is_below=lambda i: i <= 40, max_steps=2) == (32, 48, None)


def test_uniform_and_global_against_brute_force():
  rng = np.random.default_rng(3)
  sizes = [3, 5, 4]
  scores = [rng.normal(size=s) for s in sizes]

  def cost(w):
    return {"macs": float(2 * w[0] * w[1] + w[1] * w[2] + w[2])}

  for target in (12.0, 20.0, 31.0, 45.0):
    # Every kept fraction k / size_d (and 0): the largest cost under the target.
    fracs = sorted({0.0} | {k / s for s in sizes for k in range(1, s + 1)})
    ws = [[max(math.ceil(f * s - 1e-9), 1) for s in sizes] for f in fracs]
    want = max(cost(w)["macs"] for w in ws if cost(w)["macs"] <= target)
    res = budget.allocate_uniform(sizes, cost, target, tolerance=0.0)
    assert res.costs["macs"] == want and res.costs == cost(res.widths)
    # Every threshold on the max-normalised scores: the largest cost under the target.
    norm = [s / np.max(np.abs(s)) for s in scores]
    ws = [[max(int(np.sum(n >= t)), 1) for n in norm] for t in np.concatenate(norm)] + [[1, 1, 1]]
    want = max(cost(w)["macs"] for w in ws if cost(w)["macs"] <= target)
    res = budget.allocate_global(scores, cost, target, normalize="max", tolerance=0.0)
    assert res.costs["macs"] == want
    assert [k.tolist() for k in res.keep] == [sorted(np.argsort(-s, kind="stable")[:w].tolist())
                                              for s, w in zip(scores, res.widths)]
