"""The global lambda search, phase by phase: the grid hit, the bisection (warm-started, checked against cold
independent solves), the fill when rounding jumps over the band, the reachable-range error (its ends found by
independent solves), rounding and the omega floor."""

import numpy as np
import pytest

import hsic_jax as hj


def _problems(seed=0, n=48, widths=(12, 8, 16)):
  rng = np.random.default_rng(seed)
  out = []
  for c in widths:
    x = rng.normal(size=(n, c, 3)).astype(np.float32)
    # Each layer's output depends on a few of its channels, with different strengths.
    y = np.concatenate([np.sin(2 * x[:, 0]), 0.7 * x[:, 1] ** 2, 0.3 * x[:, 2], 0.1 * np.abs(x[:, 3])], 1)
    out.append(hj.problem_from_features(x, y))
  return out


def _channels(w):
  return {"channels": float(sum(w)), "weighted": float(sum((i + 1) * v for i, v in enumerate(w)))}


def test_widths_are_the_supports_at_the_chosen_lambda():
  problems = _problems()
  res = hj.global_lambda_search(problems, _channels, target=14.0, key="channels", tolerance=0.0)
  assert res.reached and sum(res.widths) == 14
  # Independent check: solve every layer alone at the returned lambda.
  for p, w, k in zip(problems, res.widths, res.keep):
    alone = hj.solve(p, res.value)
    support = int(np.asarray(alone.selected).sum())
    assert w == max(support, 1)
    if support >= 1:
      assert set(k.tolist()) == set(alone.indices().tolist())
  assert [p.phase for p in res.trace][:25] == ["grid"] * 25
  # The trace records every point with both costs.
  assert all({"channels", "weighted"} <= set(p.costs) for p in res.trace)


def test_rounding_to_a_multiple_still_hits_the_target():
  problems = _problems()
  res = hj.global_lambda_search(problems, _channels, target=20.0, key="channels", multiple=4, tolerance=0.0)
  assert res.reached and sum(res.widths) == 20
  assert all(w % 4 == 0 or w == size for w, size in zip(res.widths, (12, 8, 16)))
  assert [len(k) for k in res.keep] == list(res.widths)


def test_omega_floor_and_reachable_range():
  problems = _problems()
  res = hj.global_lambda_search(problems, _channels, target=9.0, key="channels", omega=3, tolerance=0.0)
  assert min(res.widths) >= 3 and sum(res.widths) == 9
  assert res.reachable[0] == 9.0
  with pytest.raises(ValueError, match="outside what the search can reach: reachable range"):
    hj.global_lambda_search(problems, _channels, target=5.0, key="channels", omega=3)
  with pytest.raises(ValueError, match="outside what the search can reach: reachable range"):
    hj.global_lambda_search(problems, _channels, target=1000.0, key="channels")


def test_fill_lands_in_the_band_when_lambda_steps_jump_over_it():
  # A cost where one width step is larger than the band: the lambda bisection alone cannot land in it.
  problems = _problems()
  res = hj.global_lambda_search(problems, _channels, target=31.0, key="weighted", tolerance=0.0, fill=True)
  assert res.reached and res.costs["weighted"] == 31.0
  no_fill = hj.global_lambda_search(problems, _channels, target=31.0, key="weighted", tolerance=0.0, fill=False)
  assert no_fill.costs["weighted"] <= 31.0


@pytest.mark.parametrize("kw, match", [({"omega": 0}, "omega"), ({"multiple": 1.5}, "multiple"),
                                       ({"tolerance": 2.0}, "tolerance"), ({"target": -1.0}, "target"),
                                       ({"grid": 1}, "grid")])
def test_bad_arguments(kw, match):
  args = {"target": 10.0, **kw}
  with pytest.raises(ValueError, match=match):
    hj.global_lambda_search(_problems(), _channels, key="channels", **args)


def test_stacks_by_width_and_one_padded_stack_agree():
  problems = _problems(widths=(12, 8, 16, 8))
  a = hj.global_lambda_search(problems, _channels, target=16.0, key="channels", bucket=True)
  b = hj.global_lambda_search(problems, _channels, target=16.0, key="channels", bucket=False)
  assert a.widths == b.widths and all(np.array_equal(x, y) for x, y in zip(a.keep, b.keep))
  np.testing.assert_allclose([p.value for p in a.trace], [p.value for p in b.trace], rtol=1e-6)


def _alone_widths(problems, lam, multiple=1, omega=1):
  """Each decision solved alone and cold at ``lam``: its support, at least ``omega``, rounded up to ``multiple``."""
  return tuple(hj.budget.round_width(max(int(np.asarray(hj.solve(p, lam).selected).sum()), omega), p.num_channels,
                                     multiple=multiple) for p in problems)


def test_grid_hit_needs_no_bisection():
  problems = _problems()
  first = hj.global_lambda_search(problems, _channels, target=14.0, key="channels", tolerance=0.0)
  grid = [p for p in first.trace if p.phase == "grid"]
  # A target that a grid point reaches exactly: the search stops at the grid, on a point that gives it.
  hit = next(p for p in grid if p.costs["channels"] == 19.0)
  res = hj.global_lambda_search(problems, _channels, target=19.0, key="channels", tolerance=0.0)
  assert res.reached and {p.phase for p in res.trace} == {"grid"} and len(res.trace) == 25
  assert res.costs["channels"] == 19.0 and res.value == hit.value
  assert res.widths == _alone_widths(problems, res.value)


def test_bisection_is_warm_started_and_agrees_with_cold_independent_solves():
  problems = _problems()
  res = hj.global_lambda_search(problems, _channels, target=31.0, key="weighted", tolerance=0.0)
  bisect = [p for p in res.trace if p.phase == "bisect"]
  assert res.reached and bisect and res.value == bisect[-1].value
  grid = [p for p in res.trace if p.phase == "grid"]
  # The bisection stays inside the grid bracket of the target and halves it each step.
  above = next(p for p in grid if p.costs["weighted"] > 31.0)
  below = grid[grid.index(above) - 1]
  assert all(above.value < p.value < below.value for p in bisect)
  assert bisect[0].value == pytest.approx(0.5 * (above.value + below.value))
  # Every warm-started point gives the widths of cold solves of each decision alone at its lambda.
  for p in bisect:
    assert p.widths == _alone_widths(problems, p.value), p


def test_fill_steps_one_multiple_from_the_bisection_result():
  # Widths move 4 channels at a time: the lambda bisection ends below the band, the fill lands exactly on it.
  problems = _problems()
  res = hj.global_lambda_search(problems, _channels, target=32.0, key="weighted", tolerance=0.0, multiple=4)
  fills = [p for p in res.trace if p.phase == "fill"]
  assert res.reached and res.costs["weighted"] == 32.0 and len(fills) == 1 and res.trace[-1] is fills[0]
  start = hj.global_lambda_search(problems, _channels, target=32.0, key="weighted", tolerance=0.0, multiple=4,
                                  fill=False)
  assert not start.reached and start.costs["weighted"] < 32.0 and start.value == res.value
  # The fill point is the bisection's widths with one decision one multiple wider (brute force over decisions).
  grown = [tuple(w + 4 * (i == d) for i, w in enumerate(start.widths)) for d in range(3)]
  assert res.widths in grown and _channels(res.widths)["weighted"] == 32.0
  assert [len(k) for k in res.keep] == list(res.widths)
  assert all(set(a.tolist()) <= set(b.tolist()) for a, b in zip(start.keep, res.keep))  # channels only added


def test_reachable_range_error_gives_the_ends_found_by_independent_solves():
  problems = _problems()
  lowest = _channels([3, 3, 3])["weighted"]  # every decision at omega = 3
  highest = _channels(_alone_widths(problems, 0.0))["weighted"]  # the widest solution, at lam = 0
  with pytest.raises(ValueError) as err:
    hj.global_lambda_search(problems, _channels, target=10.0, key="weighted", omega=3)
  assert str(err.value) == (
      f"target weighted 10 is outside what the search can reach: reachable range [{lowest:g}, {highest:g}] (every "
      f"decision at its minimum width to the widest solution, at lam = 0); expected a target in that range (as a "
      f"ratio of the highest: {lowest / highest:.4f} to 1)")
  res = hj.global_lambda_search(problems, _channels, target=highest, key="weighted", omega=3)
  assert res.reachable == (lowest, highest) and res.reached
